"""Classifying AWS errors and spacing retries (capped exponential backoff, full jitter)."""

from __future__ import annotations

import asyncio
import random
from typing import Final

import aiohttp
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    ReadTimeoutError,
)

THROTTLING_CODES: Final = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "Throttling",
        "ThrottledException",
        "RequestLimitExceeded",
        "LimitExceededException",
        "TooManyRequestsException",
        "RequestThrottled",
        "RequestThrottledException",
        "SlowDown",
    }
)
TRANSIENT_CODES: Final = frozenset(
    {
        "InternalServerError",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "KMSThrottlingException",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)

NETWORK_ERRORS: Final = (
    EndpointConnectionError,
    ConnectionClosedError,
    ReadTimeoutError,
    aiohttp.ClientError,
    asyncio.TimeoutError,
    ConnectionError,
)


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ClientError; "" for any other exception."""
    if not isinstance(exc, ClientError):
        return ""
    return str(exc.response.get("Error", {}).get("Code", ""))


def is_throttle(exc: BaseException) -> bool:
    return isinstance(exc, ClientError) and error_code(exc) in THROTTLING_CODES


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: throttling, a 5xx, or the connection failing."""
    if isinstance(exc, NETWORK_ERRORS):
        return True
    if not isinstance(exc, ClientError):
        return False
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return error_code(exc) in THROTTLING_CODES | TRANSIENT_CODES or status >= 500


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0.0, min(cap, base * (2 ** min(attempt, 30))))
