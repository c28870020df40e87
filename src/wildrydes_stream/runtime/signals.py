"""Signal handling shared by every long-running command: a first SIGTERM or SIGINT asks for a
graceful stop, a second one exits at once."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable

log = logging.getLogger("wildrydes_stream")


def install_signal_handlers(request_stop: Callable[[], None]) -> None:
    """First SIGTERM/SIGINT: graceful stop. Second: exit at once, non-zero."""
    loop = asyncio.get_running_loop()
    received = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        name = signal.Signals(signum).name
        if len(received) == 1:
            log.info("signal received, stopping gracefully", extra={"signal": name})
            request_stop()
            return
        log.warning("second signal received, exiting at once", extra={"signal": name})
        logging.shutdown()
        os._exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
