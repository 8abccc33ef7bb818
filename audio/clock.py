"""Time as a seam: the player reads ``Clock.now()`` and never calls ``time`` itself."""

from __future__ import annotations

import asyncio
from typing import Protocol


class Clock(Protocol):
    """A monotonic clock in seconds."""

    def now(self) -> float: ...


class LoopClock:
    """The running event loop's monotonic clock (what ``loop.call_at`` deadlines are in)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()

    def now(self) -> float:
        return self._loop.time()
