"""kinesis-local (npm `kinesis-local`, etspaceman's kinesis-mock compiled to JavaScript) on
loopback, for the tests that need what kinesalite lacks: RegisterStreamConsumer and a real
SubscribeToShard (HTTP/2 cleartext with prior knowledge on its plain port).

It binds 0.0.0.0 on fixed ports (4567 TLS, 4568 plain) in its own code. A preload (`node -r`)
rewrites `net.Server.prototype.listen` to 127.0.0.1 and port 0 and prints the port each server
got, by the port it asked for, on a pipe of its own (its logs go nowhere, so no pipe of theirs
can fill up and stall it), so tests run side by side without port races. It reads its
self-signed certificate from KINESIS_MOCK_CERT_PATH (the package's server.json) even when only
the plain port is used, and may ignore SIGTERM while busy: stopped with SIGKILL after a grace.
"""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wildrydes_stream.local.emulators import find_node_modules

PLAIN_PORT = 4568
TLS_PORT = 4567

_PRELOAD = """
const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  let asked = null;
  if (typeof args[0] === 'object' && args[0] !== null) {
    asked = args[0].port;
    args[0] = { ...args[0], host: '127.0.0.1', port: 0 };
  } else {
    asked = args[0];
    const callback = args.find((a) => typeof a === 'function');
    args = [0, '127.0.0.1', ...(callback ? [callback] : [])];
  }
  this.once('listening', () => require('fs').writeSync(
    Number(process.env.PORTS_FD), `LISTENING ${asked} ${this.address().port}\n`));
  return listen.apply(this, args);
};
// stdin is a pipe from the test process: when it ends, however it ends, so does the mock.
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
"""


@contextmanager
def kinesis_local(tmp: Path, timeout: float = 60.0) -> Iterator[str]:
    """kinesis-local on 127.0.0.1; yields the plain (http://) endpoint."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not on PATH: install Node.js 20 or newer")
    package = find_node_modules() / "kinesis-local"
    if not (package / "main.js").is_file():
        raise RuntimeError(f"kinesis-local is not installed in {package.parent}: run `npm ci`")
    preload = tmp / "kinesis-local-preload.js"
    preload.write_text(_PRELOAD)
    env = {
        **os.environ,
        "KINESIS_MOCK_CERT_PATH": str(package / "server.json"),
        "KINESIS_MOCK_PLAIN_PORT": str(PLAIN_PORT),
        "KINESIS_MOCK_TLS_PORT": str(TLS_PORT),
        "CREATE_STREAM_DURATION": "20ms",
        "DELETE_STREAM_DURATION": "20ms",
        "REGISTER_STREAM_CONSUMER_DURATION": "200ms",
        "DEREGISTER_STREAM_CONSUMER_DURATION": "20ms",
        "SHOULD_PERSIST_DATA": "false",
        "LOG_LEVEL": "WARN",
    }
    reader, writer = os.pipe()
    env["PORTS_FD"] = str(writer)
    try:
        process = subprocess.Popen(
            [node, "-r", str(preload), str(package / "main.js")],
            cwd=tmp,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(writer,),
            start_new_session=True,
        )
    except BaseException:
        os.close(reader)
        raise
    finally:
        os.close(writer)
    try:
        ports = _ports(process, reader, timeout)
        yield f"http://127.0.0.1:{ports[PLAIN_PORT]}"
    finally:
        os.close(reader)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdin is not None:
            process.stdin.close()


def _ports(process: subprocess.Popen[bytes], pipe: int, timeout: float) -> dict[int, int]:
    """Port asked for -> port got, once both servers listen (read from the pipe `pipe`)."""
    ports: dict[int, int] = {}
    received = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(pipe, selectors.EVENT_READ)
        while PLAIN_PORT not in ports or TLS_PORT not in ports:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise RuntimeError(f"kinesis-local did not listen within {timeout:.0f} s")
            chunk = os.read(pipe, 4096)
            if not chunk:
                raise RuntimeError(f"kinesis-local exited with {process.wait()}")
            received += chunk
            *lines, received = received.split(b"\n")
            for line in lines:
                parts = line.decode().split()
                if len(parts) == 3 and parts[0] == "LISTENING" and parts[1].isdigit():
                    ports[int(parts[1])] = int(parts[2])
    return ports
