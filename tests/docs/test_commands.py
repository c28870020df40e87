"""Every command in the docs is run by a test, or checked as far as this machine allows.

Each line of each ```sh block of README.md and docs/*.md is handled by its first word:

- `wildrydes-stream ...` (also after `kubectl exec ... --`, as `python -m wildrydes_stream`):
  run for real against the emulators (Kinesis, DynamoDB) and moto (SQS, S3, SNS), in a
  directory of its own holding `config/` and a dead-letter file, with the resources the docs
  name created first and `$AWS_REGION`/`$ACCOUNT_ID` set. A command that runs until stopped
  (`run`, `aggregate`, `produce` without `--count`) is stopped with SIGTERM once it has
  started (its start line, or its first record put) and must exit 0; any other must exit 0.
- `make TARGET ...`: `make -n` (a dry run) must accept it; `make local` and `make test` are
  not run inside the tests.
- `aws SERVICE OPERATION --param value ...`: the aws CLI is not installed here. The line is
  translated to botocore's operation and parameters (JSON and `file://` values read, the files
  an `envsubst` line of the docs writes taken from their source with the placeholders
  filled in) and validated against the service model: an unknown operation or parameter, a
  wrong type or a missing required parameter fails naming the line.
- `kubectl kustomize DIR` runs (offline); `kubectl apply -f -` checks the manifests it is fed;
  the commands that need a cluster (`rollout`, `get`, `logs`, `exec`) check that the
  namespace and Deployment they name are the manifests'.
- `envsubst`: its input exists and uses only the documented placeholders.
- `export NAME=...`: every name is a setting's variable, an AWS SDK variable or a deploy
  placeholder.
- the rest: `ALLOWED`, each with why it cannot run here and what is checked instead.
  A first word in none of these fails `test_every_command_has_a_check`, naming the line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import botocore.session
import pytest
import yaml
from botocore import xform_name
from botocore.model import Shape
from botocore.validate import ParamValidator

from tests.conftest import Emulators
from tests.deadletter_support import letter, reading, record
from tests.deploy import support as deploy
from tests.docs.support import ROOT, Line, Stage, doc_lines, expand
from wildrydes_stream import __version__
from wildrydes_stream.config import Settings, describe
from wildrydes_stream.sink.letters import dumps, entry

LINES = doc_lines()

# Values of the variables the docs' commands use, for the runs here (moto's account).
VARIABLES = {"AWS_REGION": "us-east-1", "ACCOUNT_ID": "123456789012"}
# Variables an `export` line may set besides the settings' own.
AWS_VARIABLES = frozenset(
    {
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_KINESIS",
        "AWS_ENDPOINT_URL_DYNAMODB",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_PROFILE",
    }
)
# Options of the aws CLI itself, not of the operation (each takes a value).
AWS_CLI_OPTIONS = frozenset({"--query", "--output", "--region", "--profile", "--endpoint-url"})

# Commands no test runs here, with why; what is checked instead is in `check_allowed`.
ALLOWED = {
    "buildah": "needs a container runtime and a registry (the image tag is checked)",
    "docker": "needs a container runtime (the image tag is checked)",
    "sh": "the benchmark twice (minutes of CPU), or debootstrap and buildah (the script must "
    "exist and parse)",
    "sed": "a text filter in a pipeline (the command feeding it is checked)",
}
# kubectl subcommands that need a cluster: the namespace and Deployment they name are checked.
KUBECTL_CLUSTER = frozenset({"apply", "rollout", "get", "logs", "exec", "describe", "cp"})


def line_id(line: Line) -> str:
    return f"{line.path.name}:{line.number}"


def service_words(stage: Stage) -> list[str] | None:
    """The arguments of a wildrydes-stream command, however it is spelt; None if not one."""
    words = stage.words
    if words[:1] == ["wildrydes-stream"]:
        return words[1:]
    if words[:3] == ["python", "-m", "wildrydes_stream"]:
        return words[3:]
    return None


def checks() -> dict[str, Callable[..., None]]:
    return {
        "make": check_make,
        "aws": check_aws,
        "kubectl": check_kubectl,
        "envsubst": check_envsubst,
        "export": check_export,
    }


def test_the_docs_have_commands_of_every_kind() -> None:
    kinds = {line.command for line in LINES}
    assert {"make", "wildrydes-stream", "aws", "kubectl", "export", "envsubst"} <= kinds
    assert len(LINES) >= 50


def test_every_command_has_a_check() -> None:
    """A command of a kind nothing here runs or checks fails, naming its line."""
    for line in LINES:
        stages = [*line.stages, *(s for sub in line.substitutions for s in sub.stages)]
        for stage in stages:
            first = stage.words[0] if stage.words else ""
            known = first in checks() or first in ALLOWED or service_words(stage) is not None
            assert known, f"no test runs or checks `{first}`: {line.where}"


# --- the world the service commands run in ------------------------------------------------


@dataclass
class World:
    environ: dict[str, str]
    moto: str
    clients: dict[str, Any]


@pytest.fixture(scope="module")
def world(emulators: Emulators) -> Iterator[World]:
    """The emulators and a moto server, with what the docs' commands expect to exist: both
    streams and the table (by `provision`), the alert topic, the dead-letter queue and
    bucket."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    moto = f"http://{host}:{port}"
    with urllib.request.urlopen(
        urllib.request.Request(f"{moto}/moto-api/reset", method="POST"), timeout=10
    ):
        pass
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("WILDRYDES_", "AWS_")) and key != "TABLE_NAME"
    }
    environ.update(emulators.environ())
    environ.update(
        AWS_REGION=VARIABLES["AWS_REGION"],
        AWS_ENDPOINT_URL_SQS=moto,
        AWS_ENDPOINT_URL_S3=moto,
        AWS_ENDPOINT_URL_SNS=moto,
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        WILDRYDES_HTTP_HOST="127.0.0.1",
        WILDRYDES_HTTP_PORT="0",
        WILDRYDES_LOG_FORMAT="json",
    )
    session = botocore.session.get_session()
    clients = {
        name: session.create_client(
            name,
            region_name="us-east-1",
            endpoint_url=moto,
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )
        for name in ("sqs", "s3", "sns")
    }
    clients["sns"].create_topic(Name="wildrydes-unicorn-alerts")
    clients["sqs"].create_queue(QueueName="wildrydes-stream-deadletter")
    clients["s3"].create_bucket(Bucket=f"wildrydes-stream-deadletter-{VARIABLES['ACCOUNT_ID']}")
    for args in (["provision"], ["provision", "--app", "aggregate"]):
        done = subprocess.run(
            [sys.executable, "-m", "wildrydes_stream", *args],
            env=environ,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    seed_leases(emulators)
    yield World(environ, moto, clients)
    server.stop()


def seed_leases(emulators: Emulators) -> None:
    """A lease for every shard of both consumers, free (as a stopped deployment leaves them),
    so that a `reset --shard` of the docs finds the lease it moves, whichever commands ran
    before it."""
    settings = Settings()
    session = botocore.session.get_session()
    env = emulators.environ()
    options: dict[str, Any] = {
        "region_name": "us-east-1",
        "aws_access_key_id": "test",
        "aws_secret_access_key": "test",
    }
    kinesis = session.create_client(
        "kinesis", endpoint_url=env["AWS_ENDPOINT_URL_KINESIS"], **options
    )
    dynamodb = session.create_client(
        "dynamodb", endpoint_url=env["AWS_ENDPOINT_URL_DYNAMODB"], **options
    )
    for stream, table in (
        (settings.stream_name, settings.lease_table_name),
        (settings.raw_stream_name, settings.aggregate_lease_table_name),
    ):
        with contextlib.suppress(dynamodb.exceptions.ResourceInUseException):
            dynamodb.create_table(
                TableName=table,
                KeySchema=[{"AttributeName": "leaseKey", "KeyType": "HASH"}],
                AttributeDefinitions=[{"AttributeName": "leaseKey", "AttributeType": "S"}],
                BillingMode="PAY_PER_REQUEST",
            )
        dynamodb.get_waiter("table_exists").wait(
            TableName=table, WaiterConfig={"Delay": 0.1, "MaxAttempts": 100}
        )
        for shard in kinesis.list_shards(StreamName=stream)["Shards"]:
            dynamodb.put_item(
                TableName=table,
                Item={
                    "leaseKey": {"S": shard["ShardId"]},
                    "checkpoint": {"S": "TRIM_HORIZON"},
                    "leaseCounter": {"N": "1"},
                },
            )


def seed_dead_letters(args: list[str], world: World, cwd: Path) -> None:
    """A letter where a `redrive --from` of the docs takes it from: one `aggregate` put back
    onto the raw stream when the line says `--app aggregate`, else one `run` writes."""
    if "redrive" not in args:
        return
    source = args[args.index("--from") + 1]
    now = datetime.now(UTC)
    if "aggregate" in args:
        dead = letter(reading("Rocinante", 1), 1, kind="invalid_record", stream="wildrydes")
        line = dumps(entry(dead, now, "aggregate"))
    else:
        line = dumps(entry(letter(record("Rocinante", 1), 1), now, "run"))
    if source.startswith("https://sqs."):
        url = world.clients["sqs"].get_queue_url(QueueName=source.rsplit("/", 1)[1])["QueueUrl"]
        world.clients["sqs"].send_message(QueueUrl=url, MessageBody=line)
    elif source.startswith("s3://"):
        bucket, _, prefix = source.removeprefix("s3://").partition("/")
        key = f"{prefix.split('/')[0]}/2026/11/28/18/20261128T180405.310000Z-doc.jsonl"
        world.clients["s3"].put_object(Bucket=bucket, Key=key, Body=line.encode() + b"\n")
    else:
        (cwd / source).write_text(line + "\n")


def runs_until_stopped(args: list[str]) -> bool:
    words = [a for i, a in enumerate(args) if i == 0 or args[i - 1] != "--config"]
    command = next((a for a in words if not a.startswith("-")), "")
    if command in ("run", "aggregate"):
        return True
    return command == "produce" and "--count" not in args


def run_service(
    args: list[str], assignments: dict[str, str], world: World, cwd: Path, where: str
) -> None:
    (cwd / "config").symlink_to(ROOT / "config")
    seed_dead_letters(args, world, cwd)
    env = {**world.environ, **{k: expand(v, VARIABLES) for k, v in assignments.items()}}
    out, err = cwd / "stdout", cwd / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "wildrydes_stream", *args],
            cwd=cwd,
            env=env,
            stdout=stdout,
            stderr=stderr,
        )
        try:
            if runs_until_stopped(args):
                deadline = time.monotonic() + 60
                while process.poll() is None and time.monotonic() < deadline:
                    if "service started" in err.read_text() or "." in out.read_text():
                        break
                    time.sleep(0.1)
                assert process.poll() is None, f"{where}: ended early\n{err.read_text()}"
                assert time.monotonic() < deadline, f"{where}: never started\n{err.read_text()}"
                process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert code == 0, f"{where}: exit {code}\n{out.read_text()[-2000:]}\n{err.read_text()[-4000:]}"


SERVICE_LINES = [line for line in LINES if service_words(line.stages[0]) is not None]


@pytest.mark.slow
@pytest.mark.parametrize("line", SERVICE_LINES, ids=line_id)
def test_service_command_runs(line: Line, world: World, tmp_path: Path) -> None:
    args = [expand(word, VARIABLES) for word in service_words(line.stages[0]) or []]
    run_service(args, line.assignments, world, tmp_path, line.where)


# --- make --------------------------------------------------------------------------------


def check_make(stage: Stage, line: Line) -> None:
    done = subprocess.run(
        ["make", "-n", *stage.words[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"{line.where}: make -n refuses it: {done.stderr}"


# --- aws ---------------------------------------------------------------------------------


def envsubst_outputs() -> dict[str, Path]:
    """File written by an `envsubst < IN > OUT` line of the docs -> its input."""
    return {
        stage.stdout: ROOT / stage.stdin
        for line in LINES
        for stage in line.stages
        if stage.words[:1] == ["envsubst"] and stage.stdin and stage.stdout
    }


def aws_value(text: str, shape: Shape, where: str) -> Any:
    if text.startswith("file://"):
        name = text.removeprefix("file://")
        source = envsubst_outputs().get(name)
        assert source is not None, f"{where}: no line of the docs writes {name}"
        text = deploy.substitute(source.read_text())
    kind = shape.type_name
    if kind == "string":
        return text
    if kind in ("integer", "long"):
        return int(text)
    if kind == "boolean":
        return text.lower() == "true"
    if kind in ("list", "structure", "map"):
        return json.loads(text)
    raise AssertionError(f"{where}: no translation for a {kind} value")


def check_aws(stage: Stage, line: Line) -> None:
    words = stage.words
    assert len(words) >= 3, f"{line.where}: aws SERVICE OPERATION ..."
    service, operation = words[1], words[2]
    session = botocore.session.get_session()
    assert service in session.get_available_services(), f"{line.where}: no service {service}"
    model = session.get_service_model(service)
    operations = {xform_name(name, "-"): name for name in model.operation_names}
    assert operation in operations, f"{line.where}: {service} has no operation {operation}"
    op = model.operation_model(operations[operation])
    members = dict(op.input_shape.members) if op.input_shape else {}
    by_option = {"--" + xform_name(name, "-"): name for name in members}
    params: dict[str, Any] = {}
    rest = iter(words[3:])
    for option in rest:
        if option in AWS_CLI_OPTIONS:
            next(rest)
            continue
        assert option in by_option, f"{line.where}: {operation} has no parameter {option}"
        name = by_option[option]
        value = expand(next(rest), VARIABLES)
        if value == "SUBSTITUTED":
            value = "arn:aws:kinesis:us-east-1:123456789012:stream/wildrydes-aggregated"
        params[name] = aws_value(value, members[name], line.where)
    report = ParamValidator().validate(params, op.input_shape)
    assert not report.has_errors(), f"{line.where}: {report.generate_report()}"


# --- kubectl, envsubst -------------------------------------------------------------------


def kustomized(directory: str) -> list[dict[str, Any]]:
    done = deploy.run([deploy.tool("kubectl"), "kustomize", str(ROOT / directory)])
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def check_kubectl(stage: Stage, line: Line) -> None:
    words = stage.words[1:]
    if words[:1] == ["kustomize"]:
        assert kustomized(words[1]), line.where
        return
    manifests = kustomized("config/kubernetes")
    namespace = deploy.kustomization()["namespace"]
    deployments = {m["metadata"]["name"] for m in manifests if m["kind"] == "Deployment"}
    if "-n" in words:
        assert words[words.index("-n") + 1] == namespace, f"{line.where}: namespace"
    verb = next(w for w in words if not w.startswith("-") and w != namespace)
    assert verb in KUBECTL_CLUSTER, f"{line.where}: no check for kubectl {verb}"
    if verb == "apply":
        assert words[words.index("-f") + 1] == "-", line.where
        return
    for word in words:
        kind, _, name = word.partition("/")
        if kind in ("deployment", "deploy"):
            assert name in deployments, f"{line.where}: no Deployment {name}"
    if "--" in words:
        inner = Stage(words[words.index("--") + 1 :])
        assert service_words(inner) is not None, f"{line.where}: runs {inner.words}"


def check_envsubst(stage: Stage, line: Line) -> None:
    for word in stage.words[1:]:
        for name in re.findall(r"\$\{(\w+)\}", word):
            assert name in deploy.PLACEHOLDERS, f"{line.where}: {name} is no placeholder"
    if stage.stdin is not None:
        source = ROOT / stage.stdin
        assert source.is_file(), f"{line.where}: no file {stage.stdin}"
        used = set(deploy.PLACEHOLDER.findall(source.read_text()))
        assert used <= set(deploy.PLACEHOLDERS), f"{line.where}: {used}"


def check_export(stage: Stage, line: Line) -> None:
    settings = {env for _, envs, _, _ in describe() for env in envs.split(" / ")}
    known = settings | AWS_VARIABLES | set(deploy.PLACEHOLDERS)
    for name in line.assignments:
        assert name in known, f"{line.where}: {name} is no setting, AWS or deploy variable"


def check_allowed(stage: Stage, line: Line) -> None:
    first = stage.words[0]
    if first in ("buildah", "docker"):
        images = [w for w in stage.words if "wildrydes-stream:" in w]
        assert images, line.where
        for image in images:
            assert image.endswith(f"wildrydes-stream:{__version__}"), f"{line.where}: tag"
    elif first == "sh":
        script = ROOT / stage.words[1]
        assert script.is_file(), f"{line.where}: no {stage.words[1]}"
        done = subprocess.run(["sh", "-n", str(script)], capture_output=True, check=False)
        assert done.returncode == 0, f"{line.where}: {done.stderr!r}"


OTHER_LINES = [line for line in LINES if line not in SERVICE_LINES]


@pytest.mark.parametrize("line", OTHER_LINES, ids=line_id)
def test_command_is_checked(line: Line) -> None:
    for sub in line.substitutions:
        for stage in sub.stages:
            dispatch(stage, sub)
    for stage in line.stages:
        dispatch(stage, line)
    for name in line.assignments if line.command != "export" else ():
        assert name in {env for _, e, _, _ in describe() for env in e.split(" / ")}, name


def dispatch(stage: Stage, line: Line) -> None:
    first = stage.words[0]
    if first in checks():
        checks()[first](stage, line)
    elif first in ALLOWED:
        check_allowed(stage, line)
    else:
        assert service_words(stage) is None, f"{line.where}: a service command in a pipeline"
        raise AssertionError(f"no test runs or checks `{first}`: {line.where}")
