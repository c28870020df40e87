"""The live summary of `local`: every stage's counts, rates and lag.

On a terminal it is redrawn in place every interval, never wider than the terminal (read at
each redraw, so a resize is followed): one line when it fits, else a small block of one line
per stage (each cut to the width), so no refresh leaves wrapped rows behind. Otherwise (a pipe,
CI, a log file) a plain line is printed every interval, so the output stays readable as a log.
"""

from __future__ import annotations

import asyncio
import shutil
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
    columns: Callable[[], int] = field(default=lambda: shutil.get_terminal_size().columns)
    """The terminal's width, read at every redraw."""
    _drawn: int = 0
    """Rows of the block on screen now (0: start on the current row)."""

    @property
    def tty(self) -> bool:
        return self.out.isatty()

    def parts(self) -> list[str]:
        """`12s`, then one `stage: key value (rate/s) ...` per stage."""
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
        return parts

    def line(self) -> str:
        """`12s | fleet: readings 240 (20.0/s) | run: read 238 (19.8/s) written 236 ...`"""
        return " | ".join(self.parts())

    def rows(self, parts: list[str], width: int) -> list[str]:
        """The summary as rows of at most width - 1 characters (the last column would wrap on
        some terminals): one row when it fits, else the time on the first stage's row and one
        row per stage."""
        limit = max(width - 1, 10)
        single = " | ".join(parts)
        if len(single) <= limit:
            return [single]
        rows = [f"{parts[0]} {parts[1]}", *(" " * (len(parts[0]) + 1) + p for p in parts[2:])]
        return [row if len(row) <= limit else row[: limit - 1] + "~" for row in rows]

    def show(self) -> None:
        parts = self.parts()
        if not self.tty:
            self.out.write(" | ".join(parts) + "\n")
            self.out.flush()
            return
        rows = self.rows(parts, self.columns())
        # Back to the first row of the block drawn last, then every row rewritten and cleared
        # to its end; rows the last block had beyond this one are cleared too.
        text = f"\x1b[{self._drawn - 1}F" if self._drawn > 1 else "\r"
        text += "\n".join("\r\x1b[2K" + row for row in rows)
        extra = self._drawn - len(rows)
        if extra > 0:
            text += "\n\r\x1b[2K" * extra + f"\x1b[{extra}F" + f"\x1b[{len(rows[-1])}C"
        self._drawn = len(rows)
        self.out.write(text)
        self.out.flush()

    def release(self) -> None:
        """Something else prints now: clear the row the cursor is on and draw the next block
        below whatever is printed."""
        if self.tty and self._drawn:
            self.out.write("\r\x1b[2K")
            self.out.flush()
        self._drawn = 0

    def end(self) -> None:
        """Leave the terminal on a fresh line before anything else is printed."""
        if self.tty and self._drawn:
            self.out.write("\n")
            self.out.flush()
        self._drawn = 0

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
