"""Classifying AWS errors and spacing retries (capped exponential backoff, full jitter).

A failed write is either the items' own fault (DynamoDB refused what was sent: isolate the item
and dead-letter it) or not (everything else: retried for as long as it lasts). Of the latter,
throttling and transient faults clear by themselves; permissions, credentials and a missing
table need an operator, so they are also reported (see observability/health.py).
"""

from __future__ import annotations

import asyncio
import random
from typing import Final, Literal

import aiohttp
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    CredentialRetrievalError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
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

# DynamoDB refused what was sent, not the request as such: an item with a bad key or attribute,
# too large, duplicated in the batch; an item collection (LSI) over its size limit.
ITEM_FAULT_CODES: Final = frozenset(
    {"ValidationException", "ItemCollectionSizeLimitExceededException"}
)
PERMISSION_CODES: Final = frozenset(
    {
        "AccessDeniedException",
        "AccessDenied",
        "UnauthorizedOperation",
        "KMSAccessDeniedException",
        "KMSDisabledException",
        "KMSInvalidStateException",
    }
)
CREDENTIAL_CODES: Final = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "ExpiredTokenException",
        "ExpiredToken",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "MissingAuthenticationTokenException",
        "IncompleteSignatureException",
        "RequestExpired",
    }
)
MISSING_CODES: Final = frozenset({"ResourceNotFoundException"})

Fault = Literal["item", "throttle", "transient", "permission", "credentials", "missing", "other"]
BLOCKING_FAULTS: Final = frozenset({"permission", "credentials", "missing", "other"})
"""Faults that do not clear by themselves: an operator has to act (retried meanwhile)."""

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


def fault_of(exc: BaseException) -> Fault:
    """Whose fault a failed call is, and whether it clears by itself."""
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return "credentials"
    if isinstance(exc, (*NETWORK_ERRORS, BotoCoreError)):
        return "transient"
    if not isinstance(exc, ClientError):
        return "other"
    code = error_code(exc)
    if code in THROTTLING_CODES:
        return "throttle"
    if code in ITEM_FAULT_CODES:
        return "item"
    if code in PERMISSION_CODES:
        return "permission"
    if code in CREDENTIAL_CODES:
        return "credentials"
    if code in MISSING_CODES:
        return "missing"
    if is_transient(exc):
        return "transient"
    return "other"


def describe_error(exc: BaseException) -> str:
    """`Code: message` for an AWS error, `Type: message` for anything else; one line."""
    code = error_code(exc) or type(exc).__name__
    text = str(exc).replace("\n", " ")
    return f"{code}: {text}"[:300]


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0.0, min(cap, base * (2 ** min(attempt, 30))))
