"""A clock that moves only when the test says so, with ``call_at`` timers on it."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable, Callable

#: Loop iterations ``settle`` runs: enough for any chain of task wake-ups and executor hand-offs
#: in the unit tests (each hop takes one or two iterations); no wall-clock time passes.
SETTLE_ROUNDS = 64


async def settle(rounds: int = SETTLE_ROUNDS) -> None:
    """Let every ready task and callback on the loop run (no real time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class FakeTimer:
    """A timer on a :class:`FakeClock`; mirrors ``asyncio.TimerHandle.cancel``."""

    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A manually advanced monotonic clock.

    ``now()`` only changes in :meth:`advance` / :meth:`run_until`, which fire due timers in
    deadline order, each at its own time, and let the event loop settle after each. With
    ``quiesce`` (a real thread pool's :meth:`~tests.fakes.executor.SettlingPool.quiet`), settling
    also waits for the jobs running on real threads: time never moves past them.
    """

    def __init__(
        self, start: float = 1000.0, *, quiesce: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self._quiesce = quiesce
        self._now = start
        self._heap: list[tuple[float, int, FakeTimer]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], object]) -> FakeTimer:
        """Run ``callback`` once the clock reaches ``when``."""
        timer = FakeTimer(when, callback)
        heapq.heappush(self._heap, (when, next(self._seq), timer))
        return timer

    def next_timer(self) -> float | None:
        """When the earliest live timer is due, or ``None``."""
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    @property
    def pending(self) -> int:
        """Number of live timers."""
        return sum(1 for _, _, t in self._heap if not t.cancelled)

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, firing every timer due on the way."""
        await self.advance_to(self._now + seconds)

    async def _settle(self) -> None:
        await settle()
        if self._quiesce is not None:
            await self._quiesce()
            await settle()

    async def advance_to(self, when: float) -> None:
        """Move time forward to ``when``, firing every timer due on the way."""
        await self._settle()
        # Sums of 0.020 steps drift in the last bits; a timer due within a nanosecond of the
        # target counts as due (advance(0.06) from 1000.04 must reach a timer at 1000.1).
        while (due := self.next_timer()) is not None and due <= when + 1e-9:
            _, _, timer = heapq.heappop(self._heap)
            self._now = max(self._now, due)
            timer.callback()
            await self._settle()
        self._now = max(self._now, when)
        await self._settle()

    def hold(self, seconds: float) -> None:
        """The running code is held up (preempted) for ``seconds`` where it stands: time jumps
        under it, and no timer fires before it returns to the loop."""
        self._now += seconds

    async def stall(self, seconds: float) -> None:
        """The loop was blocked for ``seconds``: time jumps, then every overdue timer fires late."""
        await settle()
        self._now += seconds
        while (due := self.next_timer()) is not None and due <= self._now:
            _, _, timer = heapq.heappop(self._heap)
            timer.callback()
            await settle()

    async def run_until(self, predicate: Callable[[], bool], *, limit: float = 600.0) -> None:
        """Jump from timer to timer until ``predicate()`` holds.

        Raises:
            AssertionError: No timer is left and the predicate is still false, or more than
                ``limit`` fake seconds passed.
        """
        end = self._now + limit
        await self._settle()
        while not predicate():
            due = self.next_timer()
            if due is None:
                raise AssertionError(f"nothing scheduled and the condition is false at {self._now}")
            if due > end:
                raise AssertionError(f"condition still false after {limit} fake seconds")
            await self.advance_to(due)
