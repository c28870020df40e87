"""A lean client for the two hot data-path calls, speaking the AWS JSON protocol directly.

aiobotocore spends about 2 ms of CPU on one 25-item BatchWriteItem (most of it validating and
serializing parameters the service has already built in DynamoDB's wire format) and ~22 µs a
record parsing a GetRecords response. For those two calls this module builds the JSON body with
one `orjson.dumps`, signs it with SigV4 (botocore's algorithm, minus the per-request work that
never changes for one endpoint), POSTs it over a pool of keep-alive HTTP/1.1 connections
(http1.py: a fraction of aiohttp's CPU per call; aiohttp when a proxy is configured) and reads the
answer with one `orjson.loads`.

Everything else stays with botocore: the endpoint, region, timeouts and pool size are taken
from the aiobotocore client this one wraps (so `AWS_ENDPOINT_URL_<SERVICE>`, FIPS and the rest
resolve exactly as botocore resolves them), credentials from the session's provider chain
(refreshed when they expire), and any other operation is passed through to the wrapped client.

Errors look like botocore's: an HTTP error answer raises `botocore.exceptions.ClientError` with
the usual `{"Error": {"Code", "Message"}, "ResponseMetadata": {"HTTPStatusCode"}}` shape, and a
failed connection raises aiohttp's errors (http1.py raises the same classes), so the service's
retry classification is unchanged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import json
import ssl
import time
import zlib
from typing import Any, Final, Self
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp.helpers import get_env_proxy_for_url
from botocore.auth import SigV4Auth, _host_from_url
from botocore.exceptions import ClientError, NoCredentialsError
from botocore.httpsession import get_cert_path
from yarl import URL

from wildrydes_stream.aws.http1 import Http1Pool

USER_AGENT: Final = "wildrydes-stream awsjson"
LARGE_BODY: Final = 512 * 1024


def _blob(value: object) -> str:
    """JSON for values botocore would serialize that orjson does not: blobs, as base64."""
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _dumps(params: Any) -> bytes:
    # orjson: a 25-item BatchWriteItem body in ~8 µs against ~120 µs with the json module,
    # about a tenth of the service's CPU per record (measured with `make bench`).
    return orjson.dumps(params, default=_blob)


class AwsJsonClient:
    """Signed AWS JSON 1.0/1.1 calls to the endpoint of an aiobotocore client.

    Use as an async context manager (it owns its connections). Attributes it does not
    define are looked up on the wrapped client, so it can stand in for it. Calls go over
    http1.Http1Pool, or an aiohttp session when a proxy is configured (or `http1=False`).
    """

    def __init__(self, client: Any, credentials: Any, *, http1: bool = True) -> None:
        meta = client.meta
        model = meta.service_model
        self._client = client
        self._credentials = credentials
        self._region: str = meta.region_name
        self._signing_name: str = model.signing_name
        endpoint: str = meta.endpoint_url
        self._url = endpoint if endpoint.count("/") > 2 else endpoint + "/"
        self._target_prefix: str = model.metadata["targetPrefix"]
        self._content_type = f"application/x-amz-json-{model.metadata.get('jsonVersion', '1.0')}"
        self._check_crc32 = self._signing_name == "dynamodb"
        self._signer = Signer(self._url, self._signing_name, self._region, self._content_type)
        config = meta.config
        self._timeout = aiohttp.ClientTimeout(
            sock_connect=config.connect_timeout, sock_read=config.read_timeout
        )
        self._pool_size: int = config.max_pool_connections
        self._http1 = http1
        self._pool: Http1Pool | None = None
        self._session: aiohttp.ClientSession | None = None
        self._proxy: str | None = None
        self._proxy_auth: aiohttp.BasicAuth | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def __aenter__(self) -> Self:
        ssl_context: ssl.SSLContext | bool = False
        if self._url.startswith("https:"):
            ssl_context = _ssl_context(self._client)
        # trust_env would look up netrc and the proxy in a thread on every request (two thread
        # hops, the largest cost per call): the proxy is resolved once here instead.
        self._proxy, self._proxy_auth = _proxy_for(self._url, self._client.meta.config)
        if self._http1 and self._proxy is None:
            tls = None
            if self._url.startswith("https:"):
                tls = ssl_context if isinstance(ssl_context, ssl.SSLContext) else _unverified()
            self._pool = Http1Pool(
                self._url,
                limit=self._pool_size,
                connect_timeout=self._timeout.sock_connect,
                read_timeout=self._timeout.sock_read,
                ssl_context=tls,
            )
            return self
        connector = aiohttp.TCPConnector(limit=self._pool_size, ssl=ssl_context)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(self, operation: str, body: bytes) -> Any:
        """POST one operation's JSON body; the decoded answer, or ClientError."""
        pool = self._pool
        if pool is not None:
            headers = await self._signed_headers(operation, body)
            status, answer_headers, payload = await pool.post(headers, body)
            if status >= 300:
                raise _client_error(operation, status, answer_headers, payload)
            if self._check_crc32:
                self._check(operation, answer_headers.get("x-amz-crc32"), payload)
            return _loads(operation, payload)
        session = self._session
        if session is None:
            raise RuntimeError("AwsJsonClient used outside `async with`")
        headers = await self._signed_headers(operation, body)
        async with session.post(
            self._url,
            data=_payload(body),
            headers=headers,
            proxy=self._proxy,
            proxy_auth=self._proxy_auth,
        ) as response:
            payload = await response.read()
            status = response.status
            if status >= 300:
                raise _client_error(operation, status, response.headers, payload)
            if self._check_crc32:
                self._check(operation, response.headers.get("x-amz-crc32"), payload)
        return _loads(operation, payload)

    @staticmethod
    def _check(operation: str, expected: str | None, payload: bytes) -> None:
        """DynamoDB's x-amz-crc32: a mismatch is a damaged answer (a transport fault)."""
        if expected is not None and int(expected) != zlib.crc32(payload):
            raise aiohttp.ClientPayloadError(
                f"{operation}: response CRC32 mismatch (expected {expected})"
            )

    async def _signed_headers(self, operation: str, body: bytes) -> dict[str, str]:
        if self._credentials is None:
            raise NoCredentialsError()
        frozen = await self._credentials.get_frozen_credentials()
        return self._signer.headers(frozen, f"{self._target_prefix}.{operation}", body)


class Signer:
    """SigV4 for one endpoint's POST requests: botocore's algorithm, with its invariants hoisted.

    botocore's SigV4Auth spends ~200 µs a request here (an AWSRequest to prepare, the URL split
    twice, header maps, five HMACs). For one fixed endpoint, method and header set almost all of
    that is the same every time: the canonical path, host and scope are computed once (with
    botocore's own helpers) and the signing key once a day per secret; a request then costs two
    SHA-256 and one HMAC. tests/aws/test_lean.py checks the result equals SigV4Auth's.
    """

    def __init__(self, url: str, service: str, region: str, content_type: str) -> None:
        self.service, self.region, self.content_type = service, region, content_type
        self.host: str = _host_from_url(url)
        self.path: str = SigV4Auth(None, service, region)._normalize_url_path(urlsplit(url).path)
        self._keys: dict[tuple[str, str], bytes] = {}
        self._second = -1
        self._amz_date = ""

    def headers(
        self, credentials: Any, target: str, body: bytes, timestamp: str | None = None
    ) -> dict[str, str]:
        """The request's headers, Authorization included; `timestamp` as YYYYMMDDTHHMMSSZ."""
        amz_date = timestamp or self._now()
        date = amz_date[:8]
        token: str | None = credentials.token
        canonical_headers = (
            f"content-type:{self.content_type}\nhost:{self.host}\nx-amz-date:{amz_date}\n"
            + (f"x-amz-security-token:{token}\n" if token else "")
            + f"x-amz-target:{target}\n"
        )
        signed = (
            "content-type;host;x-amz-date;x-amz-security-token;x-amz-target"
            if token
            else "content-type;host;x-amz-date;x-amz-target"
        )
        canonical = (
            f"POST\n{self.path}\n\n{canonical_headers}\n{signed}\n"
            f"{hashlib.sha256(body).hexdigest()}"
        )
        scope = f"{date}/{self.region}/{self.service}/aws4_request"
        string_to_sign = (
            f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n"
            f"{hashlib.sha256(canonical.encode()).hexdigest()}"
        )
        key = self._signing_key(credentials.secret_key, date)
        signature = hmac.digest(key, string_to_sign.encode(), "sha256").hex()
        headers = {
            "Content-Type": self.content_type,
            "X-Amz-Target": target,
            "X-Amz-Date": amz_date,
            "Authorization": f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}",
            "User-Agent": USER_AGENT,
            # aiohttp asks for gzip by default; DynamoDB then computes x-amz-crc32 over the
            # compressed body, which fails the check after decompression (botocore asks for
            # identity for the same reason). Not signed, so it changes no signature.
            "Accept-Encoding": "identity",
        }
        if token:
            headers["X-Amz-Security-Token"] = token
        return headers

    def _now(self) -> str:
        """The current time as YYYYMMDDTHHMMSSZ, formatted once a second."""
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(second))
        return self._amz_date

    def _signing_key(self, secret: str, date: str) -> bytes:
        key = self._keys.get((secret, date))
        if key is None:
            key = f"AWS4{secret}".encode()
            for part in (date, self.region, self.service, "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._keys = {(secret, date): key}  # keep only the current one
        return key


class DynamoDBData(AwsJsonClient):
    """BatchWriteItem on the fast path; every other DynamoDB call goes to the wrapped client.

    `lease_update` and `lease_scan` are the lease table's frequent calls (a renewal per lease
    every few seconds, a scan a second) on the same fast path. Their answers are the wire
    format: binary attributes come back as base64 text, where botocore gives bytes."""

    async def batch_write_item(self, **params: Any) -> dict[str, Any]:
        """Same parameters and answer as botocore's (items already in wire format)."""
        response: dict[str, Any] = await self.call("BatchWriteItem", _dumps(params))
        response.setdefault("UnprocessedItems", {})
        return response

    async def lease_update(self, **params: Any) -> dict[str, Any]:
        """UpdateItem: botocore's parameters (bytes for binary values)."""
        response: dict[str, Any] = await self.call("UpdateItem", _dumps(params))
        return response

    async def lease_scan(self, **params: Any) -> dict[str, Any]:
        """Scan: one page, botocore's parameters."""
        response: dict[str, Any] = await self.call("Scan", _dumps(params))
        return response


class KinesisData(AwsJsonClient):
    """GetRecords on the fast path; every other Kinesis call goes to the wrapped client."""

    async def get_records(self, **params: Any) -> dict[str, Any]:
        """Same answer as botocore's, except ApproximateArrivalTimestamp: epoch seconds."""
        response: dict[str, Any] = await self.call("GetRecords", _dumps(params))
        b64decode = binascii.a2b_base64
        for record in response.get("Records", ()):
            record["Data"] = b64decode(record["Data"])
        return response


def _loads(operation: str, payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        # A 200 that is not JSON (a middlebox's page, a cut-off body) says nothing about the
        # request: a transport fault, retried like one, never blamed on the items sent.
        raise aiohttp.ClientPayloadError(
            f"{operation}: the answer is not JSON ({len(payload)} bytes)"
        ) from None


def _payload(body: bytes) -> bytes | io.BytesIO:
    """Large bodies (a batch of big items) as a stream: aiohttp writes a large `bytes` body to
    the socket in one go, holding the event loop, and warns about it."""
    return body if len(body) < LARGE_BODY else io.BytesIO(body)


def _client_error(operation: str, status: int, headers: Any, payload: bytes) -> ClientError:
    """The ClientError botocore would raise for an AWS JSON error answer."""
    code, message = "", ""
    try:
        body = json.loads(payload) if payload else {}
    except ValueError:
        body = {}
    if isinstance(body, dict):
        code = str(body.get("__type") or body.get("code") or "")
        message = str(body.get("message") or body.get("Message") or "")
    # Header names in lower case: http1's answers have them so, aiohttp's look them up so.
    if not code:
        code = headers.get("x-amzn-errortype", "").split(":")[0]
    code = code.rsplit("#", 1)[-1] or str(status)
    error_response: dict[str, Any] = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {
            "HTTPStatusCode": status,
            "HTTPHeaders": {k.lower(): v for k, v in headers.items()},
            "RequestId": headers.get("x-amzn-requestid", ""),
        },
    }
    return ClientError(error_response, operation)


def _proxy_for(url: str, config: Any) -> tuple[str | None, aiohttp.BasicAuth | None]:
    """The proxy botocore would use: the client config's `proxies`, else HTTP(S)_PROXY/NO_PROXY."""
    configured = (getattr(config, "proxies", None) or {}).get(urlsplit(url).scheme)
    if configured:
        return configured, None
    try:
        proxy, auth = get_env_proxy_for_url(URL(url))
    except LookupError:
        return None, None
    return str(proxy), auth


def _unverified() -> ssl.SSLContext:
    """TLS without verification, for a client created with verify=False."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _ssl_context(client: Any) -> ssl.SSLContext | bool:
    """Verify TLS like the wrapped client: its CA bundle, or no verification if it has none."""
    http_session = getattr(getattr(client, "_endpoint", None), "http_session", None)
    verify = getattr(http_session, "_verify", True)
    if verify is False:
        return False
    return ssl.create_default_context(cafile=get_cert_path(verify))
