"""The command line as an operator meets it: where --config goes, the settings in effect,
strictness about variables that are not settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from wildrydes_stream.cli import main

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


def test_a_directory_as_config_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"wildrydes-stream: config file {tmp_path} is a directory, not a TOML file"]
