"""Settings: defaults, TOML file, environment overrides, and errors that name the bad setting."""

from __future__ import annotations

import dataclasses
import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from wildrydes_stream.aws import clients as aws
from wildrydes_stream.config import Settings, load, load_settings
from wildrydes_stream.errors import ConfigError


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "wildrydes-stream.toml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_environment() -> None:
    settings = load_settings(environ={})
    assert settings == Settings()
    assert settings.stream_name == "wildrydes-aggregated"
    assert settings.table_name == "UnicornSensorData"
    assert settings.status_time_format == "epoch_ms"  # the original Lambda's choice
    assert settings.starting_position == "TRIM_HORIZON"
    assert settings.batch_size == 25
    assert settings.starting_datetime() is None
    # Every field has a default, so an empty environment is a complete configuration.
    for field in dataclasses.fields(Settings):
        assert field.default is not dataclasses.MISSING, field.name


def test_toml_file_sets_values_with_their_types(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        'stream_name = "file-stream"\n'
        "writers = 3\n"
        "batch_window_seconds = 0.25\n"
        "checkpoint_interval_seconds = 2\n"  # an int where a float is expected is fine
        'status_time_format = "string"\n'
        'starting_position = "latest"\n',  # case-insensitive choice
    )
    settings = load_settings(path, environ={})
    assert settings.stream_name == "file-stream"
    assert settings.writers == 3
    assert isinstance(settings.writers, int)
    assert settings.batch_window_seconds == 0.25
    assert settings.checkpoint_interval_seconds == 2.0
    assert settings.status_time_format == "string"
    assert settings.starting_position == "LATEST"
    assert settings.table_name == "UnicornSensorData"  # untouched settings keep defaults


def test_config_file_can_be_named_by_environment(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'stream_name = "from-env-file"\n')
    settings = load_settings(environ={"WILDRYDES_CONFIG": str(path)})
    assert settings.stream_name == "from-env-file"


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'stream_name = "file-stream"\nwriters = 3\nbatch_size = 10\n')
    settings = load_settings(
        path,
        environ={
            "WILDRYDES_STREAM_NAME": "env-stream",
            "WILDRYDES_WRITERS": "5",
            "WILDRYDES_BATCH_WINDOW_SECONDS": "0.5",
            "WILDRYDES_LOG_LEVEL": "debug",
            "UNRELATED": "ignored",
        },
    )
    assert settings.stream_name == "env-stream"
    assert settings.writers == 5
    assert isinstance(settings.writers, int)
    assert settings.batch_size == 10  # from the file, not overridden
    assert settings.batch_window_seconds == 0.5
    assert settings.log_level == "DEBUG"


def test_table_name_is_honoured_and_wildrydes_table_name_wins(tmp_path: Path) -> None:
    assert load_settings(environ={"TABLE_NAME": "lambda-table"}).table_name == "lambda-table"
    both = {"TABLE_NAME": "lambda-table", "WILDRYDES_TABLE_NAME": "service-table"}
    assert load_settings(environ=both).table_name == "service-table"
    path = _toml(tmp_path, 'table_name = "file-table"\n')
    assert load_settings(path, environ={}).table_name == "file-table"
    # Any environment variable is above the file, TABLE_NAME included.
    assert load_settings(path, environ={"TABLE_NAME": "lambda-table"}).table_name == "lambda-table"


def test_at_timestamp_reads_the_starting_timestamp() -> None:
    settings = load_settings(
        environ={
            "WILDRYDES_STARTING_POSITION": "AT_TIMESTAMP",
            "WILDRYDES_STARTING_TIMESTAMP": "2016-02-12T00:30:00",
        }
    )
    assert settings.starting_datetime() == datetime(2016, 2, 12, 0, 30, tzinfo=UTC)
    zoned = settings.replace(starting_timestamp="2016-02-12T01:30:00+01:00")
    assert zoned.starting_datetime() == datetime(
        2016, 2, 12, 1, 30, tzinfo=timezone(timedelta(hours=1))
    )
    assert zoned.starting_datetime() == datetime(2016, 2, 12, 0, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        # not a whole number
        ({"WILDRYDES_WRITERS": "eight"}, "WILDRYDES_WRITERS"),
        ({"WILDRYDES_WRITERS": "2.5"}, "WILDRYDES_WRITERS"),
        ({"WILDRYDES_HTTP_PORT": ""}, "WILDRYDES_HTTP_PORT"),
        # not a number
        ({"WILDRYDES_BATCH_WINDOW_SECONDS": "soon"}, "WILDRYDES_BATCH_WINDOW_SECONDS"),
        # out of range
        ({"WILDRYDES_BATCH_SIZE": "26"}, "WILDRYDES_BATCH_SIZE"),
        ({"WILDRYDES_BATCH_SIZE": "0"}, "WILDRYDES_BATCH_SIZE"),
        ({"WILDRYDES_WRITERS": "-1"}, "WILDRYDES_WRITERS"),
        ({"WILDRYDES_HTTP_PORT": "65536"}, "WILDRYDES_HTTP_PORT"),
        ({"WILDRYDES_GET_RECORDS_LIMIT": "10001"}, "WILDRYDES_GET_RECORDS_LIMIT"),
        ({"WILDRYDES_SHARD_SYNC_INTERVAL_SECONDS": "0"}, "WILDRYDES_SHARD_SYNC_INTERVAL_SECONDS"),
        # not one of the choices
        ({"WILDRYDES_STATUS_TIME_FORMAT": "iso"}, "WILDRYDES_STATUS_TIME_FORMAT"),
        ({"WILDRYDES_STARTING_POSITION": "EARLIEST"}, "WILDRYDES_STARTING_POSITION"),
        ({"WILDRYDES_LOG_FORMAT": "xml"}, "WILDRYDES_LOG_FORMAT"),
        ({"WILDRYDES_LOG_LEVEL": "LOUD"}, "WILDRYDES_LOG_LEVEL"),
        # cross-setting rules
        ({"WILDRYDES_STARTING_POSITION": "AT_TIMESTAMP"}, "starting_timestamp"),
        ({"WILDRYDES_STARTING_TIMESTAMP": "last tuesday"}, "starting_timestamp"),
        ({"WILDRYDES_STREAM_NAME": ""}, "stream_name"),
        ({"TABLE_NAME": ""}, "table_name"),
        (
            {"WILDRYDES_BACKOFF_BASE_SECONDS": "2", "WILDRYDES_BACKOFF_MAX_SECONDS": "1"},
            "backoff_max_seconds",
        ),
        (
            {"WILDRYDES_DEADLETTER_FILE": "", "WILDRYDES_DEADLETTER_QUEUE_URL": ""},
            "deadletter_file",
        ),
    ],
)
def test_bad_environment_values_name_the_setting(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=environ)
    message = str(caught.value)
    assert named in message
    assert "\n" not in message


def test_bad_values_quote_the_value_and_say_what_is_expected() -> None:
    with pytest.raises(ConfigError, match=r"WILDRYDES_WRITERS: expected a whole number, got 'x'"):
        load_settings(environ={"WILDRYDES_WRITERS": "x"})
    with pytest.raises(ConfigError, match=r"WILDRYDES_BATCH_SIZE: '30' is outside 1\.\.25"):
        load_settings(environ={"WILDRYDES_BATCH_SIZE": "30"})
    with pytest.raises(ConfigError, match=r"'iso' is not one of epoch_ms, string"):
        load_settings(environ={"WILDRYDES_STATUS_TIME_FORMAT": "iso"})


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('writers = "many"\n', "writers"),
        ("writers = 2.5\n", "writers"),  # a float is not a whole number
        ("writers = true\n", "writers"),  # nor is a boolean
        ("writers = 0\n", "writers"),
        ("batch_window_seconds = 11.0\n", "batch_window_seconds"),
        ("batch_window_seconds = false\n", "batch_window_seconds"),
        ("stream_name = 42\n", "stream_name"),
        ('status_time_format = "iso"\n', "status_time_format"),
        ('starting_position = "AT_TIMESTAMP"\n', "starting_timestamp"),
        ("stream_nam = 'typo'\n", "stream_nam"),  # unknown key
        ("[kinesis]\nstream_name = 'nested'\n", "kinesis"),  # unknown table
        ("writers = \n", "not valid TOML"),
    ],
)
def test_bad_file_values_name_the_file_and_setting(tmp_path: Path, text: str, named: str) -> None:
    path = _toml(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    message = str(caught.value)
    assert named in message
    if named != "starting_timestamp":  # the cross-setting check names settings, not the file
        assert str(path) in message


def test_unknown_file_key_is_reported_as_unknown(tmp_path: Path) -> None:
    path = _toml(tmp_path, "stream_nam = 'typo'\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'stream_nam'"):
        load_settings(path, environ={})


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_replace_validates_like_a_loaded_settings() -> None:
    with pytest.raises(ConfigError, match="starting_timestamp"):
        Settings().replace(starting_position="AT_TIMESTAMP")
    assert Settings().replace(writers=2).writers == 2


def test_region_comes_from_aws_region_when_aws_default_region_is_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert aws.region_name() == "eu-west-1"


def test_aws_region_wins_over_aws_default_region_as_in_the_aws_cli(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-southeast-2")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert aws.region_name() == "eu-west-1"


def test_region_from_aws_default_region(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-southeast-2")
    assert aws.region_name() == "ap-southeast-2"


def test_no_region_at_all_is_a_config_error_saying_what_to_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    with pytest.raises(ConfigError, match="AWS_REGION"):
        aws.region_name()


async def test_aws_clients_use_aws_region_when_aws_default_region_is_unset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The clients the service opens get the region from AWS_REGION (botocore alone fails)."""
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    async with aws.AwsClients() as clients:
        assert clients.kinesis.meta.region_name == "eu-central-1"
        assert clients.dynamodb.meta.region_name == "eu-central-1"
        assert clients.dynamodb_control.meta.region_name == "eu-central-1"


def test_a_misspelt_variable_is_reported_with_a_guess() -> None:
    loaded = load(environ={"WILDRYDES_BATCHSIZE": "10", "WILDRYDES_WRITER": "2"})
    assert loaded.warnings == [
        "environment variable WILDRYDES_BATCHSIZE is not a setting and is ignored; "
        "did you mean WILDRYDES_BATCH_SIZE?",
        "environment variable WILDRYDES_WRITER is not a setting and is ignored; "
        "did you mean WILDRYDES_WRITERS?",
    ]
    assert loaded.settings == Settings()


def test_strict_makes_an_unknown_variable_an_error() -> None:
    with pytest.raises(ConfigError, match="WILDRYDES_BATCHSIZE"):
        load(environ={"WILDRYDES_BATCHSIZE": "10"}, strict=True)


def test_variables_that_are_not_settings_by_design_are_not_reported() -> None:
    environ = {"WILDRYDES_STRICT": "1", "WILDRYDES_CONFIG": "", "WILDRYDES_NODE_MODULES": "x"}
    assert load(environ=environ).warnings == []


def test_starting_timestamp_without_at_timestamp_is_reported() -> None:
    loaded = load(environ={"WILDRYDES_STARTING_TIMESTAMP": "2026-01-01T00:00:00"})
    assert len(loaded.warnings) == 1
    assert "starting_timestamp" in loaded.warnings[0]
    assert "no effect with starting_position TRIM_HORIZON" in loaded.warnings[0]


def test_each_setting_says_where_its_value_came_from(tmp_path: Path) -> None:
    path = tmp_path / "settings.toml"
    path.write_text("writers = 4\nbatch_size = 10\n")
    loaded = load(path, environ={"WILDRYDES_BATCH_SIZE": "20"})
    assert loaded.sources["writers"] == f"{path}: writers"
    assert loaded.sources["batch_size"] == "environment variable WILDRYDES_BATCH_SIZE"
    assert loaded.sources["queue_size"] == "default"
    assert (loaded.settings.writers, loaded.settings.batch_size) == (4, 20)


@pytest.mark.parametrize("kind", ["directory", "unreadable", "not-utf8"])
def test_a_config_path_that_cannot_be_read_is_one_config_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "settings.toml"
    if kind == "directory":
        path.mkdir()
    elif kind == "unreadable":
        path.write_text("writers = 2\n")
        path.chmod(0)
        if os.access(path, os.R_OK):  # root reads anything: make it unreadable otherwise
            path.unlink()
            path.symlink_to(path)  # a symlink loop: open() fails with ELOOP
    else:
        path.write_bytes(b"writers = \xff\n")
    with pytest.raises(ConfigError, match=f"config file {path}"):
        load_settings(path, environ={})


def test_an_unknown_setting_in_the_file_gets_a_guess(tmp_path: Path) -> None:
    path = tmp_path / "settings.toml"
    path.write_text("batchsize = 10\n")
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        load_settings(path, environ={})
