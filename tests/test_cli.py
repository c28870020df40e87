"""The command line as an operator meets it: where --config goes, the settings in effect,
strictness about variables that are not settings, exit codes (2: not run, arguments or
settings wrong or missing; 1: ran and failed), a reader that goes away."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Emulators
from tests.process import PYTHON, bare_env, run_to_exit
from wildrydes_stream.admin.provision import ensure_stream
from wildrydes_stream.cli import main
from wildrydes_stream.config import Settings

CLEAN = ("WILDRYDES_", "TABLE_NAME")


@pytest.fixture(autouse=True)
def no_settings_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(CLEAN):
            monkeypatch.delenv(key)


def test_config_is_accepted_after_the_subcommand_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "settings.toml"
    path.write_text("writers = 3\n")
    assert main(["settings", "--effective", "--config", str(path)]) == 0
    after = capsys.readouterr().out
    assert main(["--config", str(path), "settings", "--effective"]) == 0
    before = capsys.readouterr().out
    assert after == before
    assert f"writers = 3  # {path}: writers" in after.splitlines()


def test_effective_settings_name_their_source(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WILDRYDES_BATCH_SIZE", "20")
    assert main(["settings", "--effective"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "batch_size = 20  # environment variable WILDRYDES_BATCH_SIZE" in lines
    assert "queue_size = 10000  # default" in lines


def test_an_unknown_variable_is_a_warning_and_under_strict_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WILDRYDES_BATCHSIZE", "20")
    assert main(["settings", "--effective"]) == 0
    assert "did you mean WILDRYDES_BATCH_SIZE?" in capsys.readouterr().err

    monkeypatch.setenv("WILDRYDES_STRICT", "1")
    assert main(["run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "WILDRYDES_BATCHSIZE" in err[0]

    monkeypatch.delenv("WILDRYDES_STRICT")
    assert main(["run", "--strict"]) == 2
    # Refused, so not "ignored": the line says what happens.
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "is ignored" not in line
    assert "WILDRYDES_BATCHSIZE is not a setting; did you mean WILDRYDES_BATCH_SIZE?" in line
    assert "--strict" in line


def test_a_directory_as_config_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"wildrydes-stream: config file {tmp_path} is a directory, not a TOML file"]


# --- exit codes: one rule for every command ------------------------------------------------

# Every command that talks to AWS, with what it needs to get that far.
AWS_COMMANDS = [
    ("run",),
    ("aggregate",),
    ("status",),
    ("reset", "--all", "--to", "TRIM_HORIZON"),
    ("provision",),
    ("produce", "--count", "1"),
]


def _no_aws_files(tmp_path: Path, **variables: str) -> dict[str, str]:
    """An environment that finds no profile, config file or instance role to fall back on."""
    return bare_env(
        AWS_CONFIG_FILE=str(tmp_path / "no-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        WILDRYDES_HTTP_HOST="127.0.0.1",
        WILDRYDES_HTTP_PORT="0",
        WILDRYDES_DEADLETTER_FILE=str(tmp_path / "deadletter.jsonl"),
        **variables,
    )


@pytest.mark.parametrize("command", AWS_COMMANDS, ids=lambda c: c[0])
async def test_no_region_is_exit_2_with_the_same_line_for_every_command(
    command: tuple[str, ...], tmp_path: Path
) -> None:
    env = _no_aws_files(tmp_path, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")

    code, stdout, stderr = await run_to_exit(env, *command)

    assert (code, stdout) == (2, "")
    assert stderr.splitlines() == [
        "wildrydes-stream: no AWS region: set AWS_REGION or AWS_DEFAULT_REGION "
        "(or a region in ~/.aws/config)"
    ]


@pytest.mark.parametrize("command", AWS_COMMANDS, ids=lambda c: c[0])
async def test_no_credentials_is_exit_2_and_says_how_to_give_them(
    command: tuple[str, ...], tmp_path: Path, emulators: Emulators
) -> None:
    env = _no_aws_files(tmp_path, AWS_DEFAULT_REGION="us-east-1", **_endpoints(emulators))

    code, stdout, stderr = await run_to_exit(env, *command)

    assert (code, stdout) == (2, "")
    [line] = stderr.splitlines()
    assert line.startswith("wildrydes-stream: no AWS credentials (Unable to locate credentials)")
    assert "AWS_ACCESS_KEY_ID" in line


@pytest.mark.parametrize("command", AWS_COMMANDS, ids=lambda c: c[0])
async def test_an_endpoint_out_of_reach_is_exit_1_with_the_same_line_for_every_command(
    command: tuple[str, ...], tmp_path: Path
) -> None:
    closed = _closed_port()
    endpoint = f"http://127.0.0.1:{closed}"
    env = _no_aws_files(
        tmp_path,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_ENDPOINT_URL=endpoint,
        AWS_MAX_ATTEMPTS="1",  # botocore's own retries of the control calls: not the point
    )

    code, stdout, stderr = await run_to_exit(env, *command, timeout=60)

    assert (code, stdout) == (1, "")
    [line] = stderr.splitlines()
    assert line.startswith(f"wildrydes-stream: cannot connect to {endpoint}/ "), line
    assert "AWS_ENDPOINT_URL" in line


async def test_fanout_without_an_http2_endpoint_is_exit_1_with_one_line(
    tmp_path: Path, emulators: Emulators, settings: Settings, kinesis: Any
) -> None:
    # kinesalite has no SubscribeToShard: it resets an HTTP/2 connection (the embedded
    # backend of `local` is kinesalite too).
    await ensure_stream(kinesis, settings.stream_name, 1)
    env = _no_aws_files(
        tmp_path,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        **_endpoints(emulators),
        WILDRYDES_STREAM_NAME=settings.stream_name,
        WILDRYDES_TABLE_NAME=settings.table_name,
        WILDRYDES_LEASE_TABLE_NAME=settings.lease_table_name,
        WILDRYDES_READ_MODE="fanout",
    )

    code, stdout, stderr = await run_to_exit(env, "run", timeout=60)

    assert (code, stdout) == (1, ""), stderr
    line = stderr.splitlines()[-1]
    assert line.startswith(
        f"wildrydes-stream: cannot reach SubscribeToShard at {emulators.kinesis.endpoint}/ "
        "over HTTP/2 ("
    ), line
    assert "Traceback" not in stderr


def _endpoints(emulators: Emulators) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL_KINESIS": emulators.kinesis.endpoint,
        "AWS_ENDPOINT_URL_DYNAMODB": emulators.dynamodb.endpoint,
    }


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed: connections are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# --- a reader that goes away ------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [("settings",), ("settings", "--format", "toml"), ("settings", "--effective"), ("--help",)],
    ids=" ".join,
)
def test_a_closed_pipe_ends_the_command_quietly(command: tuple[str, ...]) -> None:
    """`settings | head -1`: the reader closes the pipe before everything is printed."""
    read, write = os.pipe()
    os.close(read)  # a reader that went away before the first line
    try:
        done = subprocess.run(
            [PYTHON, "-m", "wildrydes_stream", *command],
            env=bare_env(),
            stdout=write,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)

    assert done.stderr.decode() == ""
    assert done.returncode == 0
