"""The lean data-path client against the emulators, checked against aiobotocore's answers."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials
from botocore.exceptions import ClientError

from tests.aws.test_http1 import self_signed
from tests.helpers import put_records, scan_table
from wildrydes_stream.aws.lean import DynamoDBData, KinesisData, Signer
from wildrydes_stream.aws.retry import error_code, fault_of, is_transient
from wildrydes_stream.config import Settings


@pytest.fixture(params=[True, False], ids=["http1", "aiohttp"])
def http1(request: pytest.FixtureRequest) -> bool:
    """Both transports: http1.py (direct connections) and aiohttp (when behind a proxy)."""
    return bool(request.param)


@pytest.fixture
async def fast_dynamodb(dynamodb: Any, http1: bool) -> AsyncIterator[DynamoDBData]:
    credentials = await get_session().get_credentials()
    async with DynamoDBData(dynamodb, credentials, http1=http1) as client:
        assert (client._pool is not None) is http1
        yield client


@pytest.fixture
async def fast_kinesis(kinesis: Any, http1: bool) -> AsyncIterator[KinesisData]:
    credentials = await get_session().get_credentials()
    async with KinesisData(kinesis, credentials, http1=http1) as client:
        yield client


def _item(name: str, minute: int, distance: str = "1317") -> dict[str, Any]:
    return {
        "Name": {"S": name},
        "StatusTime": {"N": str(1455235200000 + minute * 60000)},
        "Distance": {"N": distance},
        "MinMagicPoints": {"N": "146"},
        "Flag": {"BOOL": True},
        "Note": {"NULL": True},
    }


async def test_batch_write_item_writes_items_aiobotocore_reads_back(
    resources: Settings, dynamodb: Any, fast_dynamodb: DynamoDBData
) -> None:
    items = [_item("Shadowfax", m) for m in range(25)]
    response = await fast_dynamodb.batch_write_item(
        RequestItems={resources.table_name: [{"PutRequest": {"Item": i}} for i in items]}
    )

    assert response["UnprocessedItems"] == {}
    stored = await scan_table(dynamodb, resources.table_name)
    key = lambda item: item["StatusTime"]["N"]  # noqa: E731
    assert sorted(stored, key=key) == sorted(items, key=key)


async def test_batch_write_item_sends_blobs_as_base64(
    resources: Settings, dynamodb: Any, fast_dynamodb: DynamoDBData
) -> None:
    item = {**_item("Shadowfax", 0), "Raw": {"B": b"\x00\xffunicorn"}}
    await fast_dynamodb.batch_write_item(
        RequestItems={resources.table_name: [{"PutRequest": {"Item": item}}]}
    )

    [stored] = await scan_table(dynamodb, resources.table_name)
    assert stored["Raw"] == {"B": b"\x00\xffunicorn"}


async def test_get_records_matches_aiobotocore(
    resources: Settings, kinesis: Any, fast_kinesis: KinesisData
) -> None:
    records = [{"Name": f"Unicorn{i}", "StatusTime": "2016-02-12 00:00:00.000"} for i in range(40)]
    await put_records(kinesis, resources.stream_name, records)
    shards = (await kinesis.list_shards(StreamName=resources.stream_name))["Shards"]
    compared = 0
    for shard in shards:
        iterator = (
            await kinesis.get_shard_iterator(
                StreamName=resources.stream_name,
                ShardId=shard["ShardId"],
                ShardIteratorType="TRIM_HORIZON",
            )
        )["ShardIterator"]
        slow = await kinesis.get_records(ShardIterator=iterator, Limit=100)
        fast = await fast_kinesis.get_records(ShardIterator=iterator, Limit=100)

        assert [_comparable(r) for r in fast["Records"]] == [
            _comparable(r) for r in slow["Records"]
        ]
        for mine, theirs in zip(fast["Records"], slow["Records"], strict=True):
            assert isinstance(mine["Data"], bytes)
            assert mine["ApproximateArrivalTimestamp"] == pytest.approx(
                theirs["ApproximateArrivalTimestamp"].timestamp(), abs=0.001
            )
        assert fast["MillisBehindLatest"] == slow["MillisBehindLatest"]
        assert isinstance(fast["NextShardIterator"], str)
        compared += len(fast["Records"])
    assert compared == len(records)


def _comparable(record: dict[str, Any]) -> tuple[str, bytes, str]:
    return record["SequenceNumber"], record["Data"], record["PartitionKey"]


async def test_other_operations_fall_through_to_the_wrapped_client(
    resources: Settings, fast_kinesis: KinesisData
) -> None:
    summary = await fast_kinesis.describe_stream_summary(StreamName=resources.stream_name)
    assert summary["StreamDescriptionSummary"]["OpenShardCount"] == 4


async def test_missing_table_is_a_client_error_with_the_code(
    resources: Settings, fast_dynamodb: DynamoDBData
) -> None:
    with pytest.raises(ClientError) as caught:
        await fast_dynamodb.batch_write_item(
            RequestItems={"no-such-table": [{"PutRequest": {"Item": _item("Shadowfax", 0)}}]}
        )

    assert error_code(caught.value) == "ResourceNotFoundException"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert caught.value.response["Error"]["Message"]
    assert not is_transient(caught.value)


async def test_bad_item_is_a_validation_error(
    resources: Settings, fast_dynamodb: DynamoDBData
) -> None:
    bad = {"Name": {"S": "Shadowfax"}, "StatusTime": {"N": "not a number"}}
    with pytest.raises(ClientError) as caught:
        await fast_dynamodb.batch_write_item(
            RequestItems={resources.table_name: [{"PutRequest": {"Item": bad}}]}
        )

    assert error_code(caught.value) == "ValidationException"
    assert not is_transient(caught.value)


async def test_bad_iterator_is_a_client_error_with_the_code(
    resources: Settings, fast_kinesis: KinesisData
) -> None:
    with pytest.raises(ClientError) as caught:
        await fast_kinesis.get_records(ShardIterator="x" * 100, Limit=10)

    assert error_code(caught.value) in ("InvalidArgumentException", "ValidationException")


async def test_a_dead_endpoint_raises_a_transient_aiohttp_error(
    settings: Settings, http1: bool
) -> None:
    session = get_session()
    async with session.create_client(
        "dynamodb", region_name="us-east-1", endpoint_url="http://127.0.0.1:9"
    ) as dead:
        credentials = await session.get_credentials()
        async with DynamoDBData(dead, credentials, http1=http1) as client:
            with pytest.raises(aiohttp.ClientError) as caught:
                await client.batch_write_item(RequestItems={settings.table_name: []})

    assert is_transient(caught.value)
    assert fault_of(caught.value) == "transient"


@pytest.mark.parametrize("token", [None, "session-token"])
@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:4567", "https://dynamodb.eu-west-1.amazonaws.com/"]
)
def test_signature_equals_botocores(token: str | None, url: str) -> None:
    credentials = ReadOnlyCredentials(
        "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token
    )
    body = b'{"RequestItems":{"t":[]}}'
    content_type = "application/x-amz-json-1.0"
    target = "DynamoDB_20120810.BatchWriteItem"
    url = url if url.count("/") > 2 else url + "/"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())

    mine = Signer(url, "dynamodb", "eu-west-1", content_type).headers(
        credentials, target, body, stamp
    )

    request = AWSRequest(
        method="POST",
        url=url,
        data=body,
        headers={"Content-Type": content_type, "X-Amz-Target": target, "X-Amz-Date": stamp},
    )
    if token:
        request.headers["X-Amz-Security-Token"] = token
    request.context["timestamp"] = stamp
    auth = SigV4Auth(credentials, "dynamodb", "eu-west-1")
    canonical = auth.canonical_request(request)
    signature = auth.signature(auth.string_to_sign(request, canonical), request)
    auth._inject_signature_to_request(request, signature)
    assert mine["Authorization"] == request.headers["Authorization"]
    assert mine.get("X-Amz-Security-Token") == token


# The client's own rules, against a local endpoint that answers what each test needs.

Answer = Callable[[web.Request], Awaitable[web.Response]]


@asynccontextmanager
async def endpoint(answer: Answer, tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)
    scheme = "https" if tls else "http"
    try:
        yield f"{scheme}://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def dynamodb_at(
    url: str, http1: bool, verify: bool | str | None = None, **config: Any
) -> AsyncIterator[DynamoDBData]:
    session = get_session()
    async with session.create_client(
        "dynamodb",
        region_name="us-east-1",
        endpoint_url=url,
        config=AioConfig(**config),
        verify=verify,
    ) as wrapped:
        credentials = await session.get_credentials()
        async with DynamoDBData(wrapped, credentials, http1=http1) as client:
            yield client


@pytest.fixture
def credentials_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)


def _answer(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Answer:
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status, body=body, headers=headers)

    return answer


BATCH = {"RequestItems": {"t": [{"PutRequest": {"Item": {"Name": {"S": "Shadowfax"}}}}]}}


@pytest.mark.usefixtures("credentials_env")
async def test_answer_with_the_right_crc32_passes(http1: bool) -> None:
    body = b'{"UnprocessedItems":{}}'
    answer = _answer(body, headers={"x-amz-crc32": str(zlib.crc32(body))})
    async with endpoint(answer) as url, dynamodb_at(url, http1) as client:
        assert await client.batch_write_item(**BATCH) == {"UnprocessedItems": {}}


@pytest.mark.usefixtures("credentials_env")
async def test_crc32_mismatch_is_a_transient_payload_error(http1: bool) -> None:
    body = b'{"UnprocessedItems":{}}'
    answer = _answer(body, headers={"x-amz-crc32": str(zlib.crc32(body) ^ 1)})
    async with endpoint(answer) as url, dynamodb_at(url, http1) as client:
        with pytest.raises(aiohttp.ClientPayloadError, match="CRC32") as caught:
            await client.batch_write_item(**BATCH)

    assert fault_of(caught.value) == "transient"


@pytest.mark.usefixtures("credentials_env")
async def test_answer_not_json_is_a_transient_payload_error(http1: bool) -> None:
    answer = _answer(b"<html>502 Bad Gateway</html>")
    async with endpoint(answer) as url, dynamodb_at(url, http1) as client:
        with pytest.raises(aiohttp.ClientPayloadError, match="not JSON") as caught:
            await client.batch_write_item(**BATCH)

    assert fault_of(caught.value) == "transient"


@pytest.mark.usefixtures("credentials_env")
async def test_error_code_from_the_header_when_the_body_has_none(http1: bool) -> None:
    answer = _answer(
        b"",
        status=400,
        headers={
            "x-amzn-ErrorType": "ThrottlingException:http://internal.amazon.com/coral/",
            "x-amzn-RequestId": "request-1",
        },
    )
    async with endpoint(answer) as url, dynamodb_at(url, http1) as client:
        with pytest.raises(ClientError) as caught:
            await client.batch_write_item(**BATCH)

    assert error_code(caught.value) == "ThrottlingException"
    metadata = caught.value.response["ResponseMetadata"]
    assert metadata["HTTPStatusCode"] == 400
    assert metadata["RequestId"] == "request-1"
    assert metadata["HTTPHeaders"]["x-amzn-requestid"] == "request-1"
    assert fault_of(caught.value) == "throttle"


@pytest.mark.usefixtures("credentials_env")
async def test_request_is_signed_for_the_host_it_is_sent_to(http1: bool) -> None:
    seen: list[tuple[dict[str, str], bytes]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append((dict(request.headers), await request.read()))
        return web.Response(body=b'{"UnprocessedItems":{}}')

    async with endpoint(record) as url, dynamodb_at(url, http1) as client:
        await client.batch_write_item(**BATCH)
        signer = client._signer

    [(headers, body)] = seen
    assert headers["Host"] == signer.host == url.removeprefix("http://")
    assert headers["Content-Length"] == str(len(body))
    assert headers["Accept-Encoding"] == "identity"
    assert headers["X-Amz-Target"] == "DynamoDB_20120810.BatchWriteItem"
    assert "SignedHeaders=content-type;host;x-amz-date;x-amz-target" in headers["Authorization"]
    assert json.loads(body) == BATCH


@pytest.mark.usefixtures("credentials_env")
async def test_a_configured_proxy_keeps_the_aiohttp_path() -> None:
    targets: list[str] = []

    async def proxy(request: web.Request) -> web.Response:
        targets.append(str(request.url))
        await request.read()
        return web.Response(body=b'{"UnprocessedItems":{}}')

    upstream = "http://dynamodb.example.invalid:4567"
    async with (
        endpoint(proxy) as proxy_url,
        dynamodb_at(upstream, True, proxies={"http": proxy_url}) as client,
    ):
        assert client._pool is None
        assert await client.batch_write_item(**BATCH) == {"UnprocessedItems": {}}

    assert targets == [upstream + "/"]


@pytest.mark.usefixtures("credentials_env")
async def test_https_verifies_like_the_wrapped_client(http1: bool, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    answer = _answer(b'{"UnprocessedItems":{}}')
    async with endpoint(answer, tls) as url:
        for verify in (str(cert), False):  # its CA bundle; no verification
            async with dynamodb_at(url, http1, verify=verify) as client:
                assert await client.batch_write_item(**BATCH) == {"UnprocessedItems": {}}
        async with dynamodb_at(url, http1) as client:  # the default bundle: not this server
            with pytest.raises(aiohttp.ClientError, match="CERTIFICATE_VERIFY_FAILED") as caught:
                await client.batch_write_item(**BATCH)

    assert fault_of(caught.value) == "transient"
