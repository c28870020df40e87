"""`make local` on a terminal and beside other programs: the live summary fits the terminal,
a taken metrics port, the emulators-only mode, and what `make local` installs."""

from __future__ import annotations

import asyncio
import functools
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from aiobotocore.session import get_session

from tests.helpers import holds, wait_for
from tests.process import ServiceProcess, bare_env, run_to_exit
from wildrydes_stream.local.summary import LiveSummary, Stage

ROOT = Path(__file__).resolve().parents[2]
ESCAPE = re.compile(r"\x1b\[(\d*)([A-Za-z])")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def screen(output: str, width: int) -> list[str]:
    """The rows a terminal of `width` columns shows after `output` (the control sequences the
    summary uses: CR, LF, erase line, cursor to a previous line's start, cursor forward). A
    row written past the width wraps onto the next, as on a real terminal."""
    rows = [""]
    row = col = 0
    i = 0
    while i < len(output):
        match = ESCAPE.match(output, i)
        if match:
            count = int(match.group(1) or 1)
            op = match.group(2)
            if op == "K":
                rows[row] = rows[row][:col]
            elif op == "F":
                row, col = max(row - count, 0), 0
            elif op == "C":
                col = min(col + count, width - 1)
            i = match.end()
            continue
        char = output[i]
        i += 1
        if char == "\r":
            col = 0
        elif char == "\n":
            row += 1
            col = 0
            if row == len(rows):
                rows.append("")
        else:
            if col == width:  # wrap
                row += 1
                col = 0
                if row == len(rows):
                    rows.append("")
            text = rows[row].ljust(col)
            rows[row] = text[:col] + char + text[col + 1 :]
            col += 1
    return rows


def wide_stages() -> list[Stage]:
    """The four stages of `local`, with the counts a busy run shows (up to ~175 characters)."""
    n = {"value": 0.0}

    def grow() -> float:
        n["value"] += 123456.0
        return n["value"]

    return [
        Stage("fleet", lambda: {"readings": grow()}, rated=("readings",)),
        Stage(
            "aggregate",
            lambda: {"read": grow(), "windows": grow(), "open": 12.0},
            rated=("read",),
        ),
        Stage(
            "run",
            lambda: {"read": grow(), "written": grow(), "dead-lettered": 0.0, "lag_s": 1.5},
            rated=("written",),
        ),
        Stage("alerts", lambda: {"received": 42.0}),
    ]


def test_the_live_summary_never_leaves_wrapped_rows_behind() -> None:
    for width in (80, 120, 400):
        out = Terminal()
        live = LiveSummary(wide_stages(), out=out, columns=functools.partial(int, width))
        assert len(live.line()) > 120  # the one-line form wraps on 80 and 120 columns
        for _ in range(5):
            live.show()
        rows = [row for row in screen(out.getvalue(), width) if row.strip()]
        # Five refreshes leave one summary on screen, every row within the width.
        assert all(len(row) < width for row in rows), rows
        assert len(rows) == (1 if width == 400 else 4), rows
        assert sum(row.count("fleet:") for row in rows) == 1, rows
        for stage in ("fleet:", "aggregate:", "run:", "alerts:"):
            assert any(stage in row for row in rows), (stage, rows)


def test_the_summary_follows_a_widening_terminal() -> None:
    widths = iter([80, 80, 400])
    out = Terminal()
    live = LiveSummary(wide_stages(), out=out, columns=lambda: next(widths))
    live.show()
    live.show()  # a block of four rows
    live.show()  # one row: the block's other rows are cleared
    rows = [row for row in screen(out.getvalue(), 400) if row.strip()]
    assert len(rows) == 1, rows


def test_the_summary_gives_way_to_alerts() -> None:
    out = Terminal()
    live = LiveSummary(wide_stages(), out=out, columns=lambda: 80)
    live.show()
    live.release()  # what the webhook receiver calls before printing an alert
    out.write("ALERT firing   Shadowfax\n")
    live.show()
    live.show()
    rows = [row for row in screen(out.getvalue(), 80) if row.strip()]
    assert all(len(row) < 80 for row in rows), rows
    alert = rows.index("ALERT firing   Shadowfax")
    # The alert stays; the summary is redrawn below it, whole, once.
    assert len(rows[alert + 1 :]) == 4, rows
    assert rows[alert + 1].lstrip().split()[1] == "fleet:", rows


def test_a_pipe_gets_plain_lines() -> None:
    out = io.StringIO()
    live = LiveSummary(wide_stages(), out=out, columns=lambda: 80)
    live.show()
    live.show()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "\x1b" not in out.getvalue()


async def test_local_picks_a_free_port_when_the_metrics_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = bare_env(WILDRYDES_HTTP_PORT=str(port), WILDRYDES_HTTP_HOST="127.0.0.1")
        code, stdout, stderr = await run_to_exit(
            env, "local", "--duration", "2", "--unicorns", "1", "--speed", "600", timeout=120
        )
    assert code == 0, stderr
    assert f"port {port} is taken: run serves its metrics on a free port" in stdout
    served = re.search(r"run metrics on http://127\.0\.0\.1:(\d+)/metrics", stdout)
    assert served is not None, stdout
    assert int(served.group(1)) not in (0, port)
    assert "OK: all" in stdout


async def test_emulators_mode_prints_working_exports_and_stops_on_ctrl_c() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wildrydes_stream.local",
        "--shards",
        "1",
        env=bare_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    emulators = ServiceProcess(process)
    try:
        await wait_for(holds(lambda: "Running until Ctrl-C" in emulators.stdout), timeout=60)
        exported = dict(re.findall(r"^export (\w+)=(\S+)$", emulators.stdout, re.MULTILINE))
        assert set(exported) >= {
            "AWS_ENDPOINT_URL_KINESIS",
            "AWS_ENDPOINT_URL_DYNAMODB",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
        }
        # What the exports point at holds both streams and the table.
        saved = {k: os.environ.get(k) for k in exported}
        os.environ.update(exported)
        try:
            session = get_session()
            async with (
                session.create_client("kinesis") as kinesis,
                session.create_client("dynamodb") as dynamodb,
            ):
                streams = (await kinesis.list_streams())["StreamNames"]
                tables = (await dynamodb.list_tables())["TableNames"]
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        assert {"wildrydes", "wildrydes-aggregated"} <= set(streams)
        assert "UnicornSensorData" in tables
        os.killpg(emulators.pid, signal.SIGINT)
        assert await emulators.wait(timeout=30) == 0, emulators.stderr
        assert "emulators stopped" in emulators.stdout
    finally:
        await emulators.close()


# --- what `make local` installs ----------------------------------------------------------------


def make_dry_run(venv: Path, target: str) -> str:
    make = shutil.which("make")
    assert make is not None, "make is not installed"
    result = subprocess.run(
        [make, "--dry-run", "-C", str(ROOT), f"VENV={venv}", target],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_local_installs_the_runtime_only_and_make_test_the_test_tools_after_it(
    tmp_path: Path,
) -> None:
    venv = tmp_path / "venv"
    # A fresh clone: `make local` makes the venv and installs the lock and the package only.
    local = make_dry_run(venv, "local")
    assert "--require-hashes --no-deps -r requirements.lock" in local
    assert "[test]" not in local
    # After `make local` (its stamp newer than pyproject.toml and the lock), `make test` still
    # installs the test tools, and not the runtime again.
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    (venv / ".installed-runtime").touch()
    for stamp in (venv / "bin" / "python", venv / ".installed-runtime"):
        os.utime(stamp, (4_000_000_000, 4_000_000_000))
    test = make_dry_run(venv, "test")
    assert "install --quiet -e '.[test]'" in test
    assert "requirements.lock" not in test
    # ... and once installed, neither again.
    (venv / ".installed-test").touch()
    os.utime(venv / ".installed-test", (4_000_000_001, 4_000_000_001))
    assert "pip" not in make_dry_run(venv, "lint").replace("pip-audit", "")
