"""Time as a seam: the player reads ``Clock.now()`` and never calls ``time`` itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
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


def loop_time(loop: asyncio.AbstractEventLoop) -> Callable[[], float]:
    """What reads ``loop``'s clock for a caller that reads it per frame: ``time.monotonic``
    itself when ``loop.time`` is asyncio's own (which returns just that), else ``loop.time``.
    The same values, without a Python call around each read."""
    if type(loop).time is asyncio.BaseEventLoop.time:
        return time.monotonic
    return loop.time
