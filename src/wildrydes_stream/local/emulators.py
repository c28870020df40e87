"""Starting kinesalite and dynalite on free loopback ports.

Both are npm packages (installed by `make` into ./node_modules). Neither CLI can bind to
127.0.0.1 only (kinesalite's has no --host), so a few lines of Node start them with
`listen(0, '127.0.0.1')` and print the port the kernel chose: no port races between tests.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from wildrydes_stream.errors import EmulatorError

Kind = Literal["kinesalite", "dynalite"]

NODE_MODULES_ENV = "WILDRYDES_NODE_MODULES"

_LAUNCHER = """
const [kind, options] = [process.argv[1], JSON.parse(process.argv[2])];
const server = require(kind)(options);
server.listen(0, '127.0.0.1', () => console.log(server.address().port));
process.on('SIGTERM', () => server.close(() => process.exit(0)));
// stdin is a pipe from the Python process that started us: it closes when that process ends,
// however it ends (a second Ctrl-C, kill -9), and so does the emulator.
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
"""

# Emulated control-plane delays, in ms: real AWS takes seconds, tests want milliseconds.
FAST = {
    "createStreamMs": 20,
    "deleteStreamMs": 20,
    "updateStreamMs": 20,
    "createTableMs": 20,
    "deleteTableMs": 20,
    "updateTableMs": 20,
}


def find_node_modules() -> Path:
    """./node_modules of the checkout (or $WILDRYDES_NODE_MODULES) holding both emulators."""
    candidates = []
    if os.environ.get(NODE_MODULES_ENV):
        candidates.append(Path(os.environ[NODE_MODULES_ENV]))
    here = Path.cwd()
    candidates += [d / "node_modules" for d in (here, *here.parents)]
    source = Path(__file__).resolve()
    candidates += [d / "node_modules" for d in source.parents]
    for candidate in candidates:
        if (candidate / "kinesalite").is_dir() and (candidate / "dynalite").is_dir():
            return candidate
    raise EmulatorError(
        "kinesalite and dynalite are not installed: run `make local` (or `npm ci`) in the "
        f"checkout, or point {NODE_MODULES_ENV} at a node_modules folder holding them"
    )


@dataclass
class Emulator:
    kind: Kind
    port: int
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls,
        kind: Kind,
        *,
        path: str | os.PathLike[str] | None = None,
        shard_limit: int = 50,
        node_modules: Path | None = None,
        timeout: float = 30.0,
    ) -> Emulator:
        node = shutil.which("node")
        if node is None:
            raise EmulatorError("node is not on PATH: install Node.js 20 or newer")
        modules = node_modules or find_node_modules()
        options: dict[str, object] = dict(FAST)
        if kind == "kinesalite":
            options["shardLimit"] = shard_limit
        if path is not None:
            options["path"] = str(path)
        process = subprocess.Popen(
            [node, "-e", _LAUNCHER, kind, json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "NODE_PATH": str(modules)},
            # A session of its own: Ctrl-C in a terminal signals the whole foreground group,
            # and the emulators must outlive the service's drain; they are stopped after it.
            start_new_session=True,
        )
        port = _read_port(process, kind, timeout)
        return cls(kind, port, process)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read_port(process: subprocess.Popen[bytes], kind: str, timeout: float) -> int:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            process.kill()
            raise EmulatorError(f"{kind} did not start within {timeout:.0f}s")
    line = process.stdout.readline().decode().strip()
    if not line.isdigit():
        process.kill()
        raise EmulatorError(f"{kind} failed to start (exit code {process.wait()})")
    return int(line)
