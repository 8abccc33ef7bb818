"""`Signal`: wake every waiter when the sandbox world changes; waiters re-check a predicate."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Signal:
    """A level-triggered change notification for the sandbox's servers and scripted users.

    Anything that changes the world calls `notify()`; waiters pass a predicate and are woken to
    re-check it after every change. No polling, no sleeping.
    """

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[None]] = set()

    def notify(self) -> None:
        """Wake every waiter so it re-checks its predicate."""
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def wait_for(self, predicate: Callable[[], T | None], *, timeout: float) -> T:  # noqa: ASYNC109
        """Wait until `predicate()` returns something truthy, and return it.

        Args:
            predicate: Checked now and after every `notify()`.
            timeout: Seconds before giving up (a hang guard, not a pacing tool).

        Returns:
            The predicate's first truthy result (an empty list or 0 keeps waiting).

        Raises:
            TimeoutError: The predicate stayed false for `timeout` seconds.
        """
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                result = predicate()
                if result:
                    return result
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters.add(waiter)
                try:
                    await waiter
                finally:
                    self._waiters.discard(waiter)
