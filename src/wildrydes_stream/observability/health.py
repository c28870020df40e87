"""Calls that keep failing for a reason retrying alone will not fix.

Permissions, credentials, a missing table: the service keeps retrying (the records stay where
they are, nothing is dead-lettered) but an operator has to act. While any API is in that state
`/readyz` says not ready, `wildrydes_blocked{api}` is 1 and one log line names the cause and
what to change, first at once and then every `interval` seconds for as long as it lasts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from wildrydes_stream.observability.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Blocked:
    cause: str
    message: str
    since: float
    logged_at: float
    failures: int = 1


class BlockedCalls:
    def __init__(self, metrics: Metrics, interval: float) -> None:
        self._metrics = metrics
        self._interval = interval
        self._blocked: dict[str, _Blocked] = {}

    @property
    def blocked(self) -> bool:
        return bool(self._blocked)

    def causes(self) -> list[str]:
        """One line per blocked API: what fails and what to do (for logs and /readyz)."""
        return [f"{api}: {b.message}" for api, b in sorted(self._blocked.items())]

    def failed(self, api: str, cause: str, message: str) -> None:
        """A call to `api` failed for `cause` (a bounded label); `message` says what to do."""
        self._metrics.blocked_errors.labels(api, cause).inc()
        now = time.monotonic()
        state = self._blocked.get(api)
        if state is None or state.cause != cause:
            self._blocked[api] = _Blocked(cause, message, now, now)
            self._metrics.blocked.labels(api).set(1)
            log.error("%s keeps failing, retrying: %s", api, message, extra={"cause": cause})
            return
        state.failures += 1
        state.message = message
        if now - state.logged_at >= self._interval:
            state.logged_at = now
            log.error(
                "%s still failing after %.0f s, retrying: %s",
                api,
                now - state.since,
                message,
                extra={"cause": cause, "failures": state.failures},
            )

    def succeeded(self, api: str) -> None:
        state = self._blocked.pop(api, None)
        if state is None:
            return
        self._metrics.blocked.labels(api).set(0)
        log.warning(
            "%s succeeds again after %.0f s of %s",
            api,
            time.monotonic() - state.since,
            state.cause,
            extra={"failures": state.failures},
        )
