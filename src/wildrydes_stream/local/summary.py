"""The live summary of `local`: every stage's counts, rates and lag on one line.

On a terminal the line is rewritten in place every interval; otherwise (a pipe, CI, a log
file) a plain line is printed every interval, so the output stays readable as a log.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

Counts = dict[str, float]


@dataclass
class Stage:
    """One stage of the pipeline: its name and a function reading its counters now."""

    name: str
    counts: Callable[[], Counts]
    rated: tuple[str, ...] = ()
    """Counters shown with their rate a second as well."""


@dataclass
class LiveSummary:
    stages: list[Stage]
    out: TextIO = field(default_factory=lambda: sys.stdout)
    interval: float = 2.0
    started: float = field(default_factory=time.monotonic)
    _last: dict[str, Counts] = field(default_factory=dict)
    _last_at: float = 0.0

    @property
    def tty(self) -> bool:
        return self.out.isatty()

    def line(self) -> str:
        """`12s | produced 240 (20/s) | copy: read 238 (19.8/s) written 236 ...`"""
        now = time.monotonic()
        span = now - (self._last_at or self.started)
        parts = [f"{now - self.started:4.0f}s"]
        for stage in self.stages:
            counts = stage.counts()
            before = self._last.get(stage.name, {})
            shown = []
            for key, value in counts.items():
                text = f"{key} {_number(value)}"
                if key in stage.rated and span > 0:
                    rate = (value - before.get(key, 0.0)) / span
                    text += f" ({rate:.1f}/s)"
                shown.append(text)
            self._last[stage.name] = counts
            parts.append(f"{stage.name}: " + " ".join(shown))
        self._last_at = now
        return " | ".join(parts)

    def show(self) -> None:
        text = self.line()
        if self.tty:
            self.out.write("\r\x1b[2K" + text)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def end(self) -> None:
        """Leave the terminal on a fresh line before anything else is printed."""
        if self.tty:
            self.out.write("\n")
            self.out.flush()

    async def run(self) -> None:
        """Show the line every interval until cancelled."""
        try:
            while True:
                await asyncio.sleep(self.interval)
                self.show()
        finally:
            self.end()


def _number(value: float) -> str:
    if value == int(value):
        return f"{int(value)}"
    return f"{value:.1f}"
