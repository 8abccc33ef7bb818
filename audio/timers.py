"""One loop timer for every player's frame deadlines: deadlines coalesced into 1 ms slots.

Each player sends a frame every 20 ms on its own grid. With one ``loop.call_at`` per frame, a
loop carrying hundreds of players pushes and pops that many ``TimerHandle``s through asyncio's
heap every second, each push and pop a dozen Python-level ``__lt__`` calls, and runs each as its
own ``Handle``. Here a deadline goes into the bucket of its 1 ms slot (a list append), and one
loop timer per non-empty slot runs the whole bucket: at 660 players that is 1,000 loop timers a
second in place of 33,000 (songbird's shared mixer tick, but players keep their own phase, so
their sends stay spread over the 20 ms instead of leaving in one burst).

A slot runs at its start, at most ``EARLY`` before the deadlines in it (the pacer accepts a
frame that much early; it would only wait again for anything earlier) and less than one slot
after them. A grid of ``anchor + k * 20 ms`` keeps its offset into the slot from frame to frame,
so the rounding is the same each time and adds no jitter.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import weakref
from collections.abc import Callable
from typing import Final

from legato.audio.pacer import EARLY

#: Width of a slot, in seconds.
SLOT: Final = 0.001


def _ran() -> None:
    """What a timer's callback becomes once it has run (``call_again`` may file it again)."""


class SlotTimer:
    """A deadline handed to :meth:`SlotTimers.call_at`; ``cancel()`` drops it."""

    __slots__ = ("callback",)

    def __init__(self, callback: Callable[[], None]) -> None:
        #: ``None`` once cancelled; ``_ran`` once run (and not cancelled since).
        self.callback: Callable[[], None] | None = callback

    def cancel(self) -> None:
        self.callback = None


class SlotTimers:
    """Coalesces ``call_at`` deadlines on one loop into 1 ms slots run by one loop timer each.

    A callback raising is reported to the loop's exception handler (as a ``Handle`` would be)
    and the rest of its slot still runs.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, slot: float = SLOT) -> None:
        if not 0 < slot <= 2 * EARLY:
            raise ValueError(f"slot must be in (0, {2 * EARLY}] s, got {slot}")
        self._loop = loop
        self._width = slot
        self._buckets: dict[int, list[SlotTimer]] = {}
        self._order: list[int] = []  # heap of the slots in _buckets
        self._handle: asyncio.TimerHandle | None = None
        self._armed = math.inf  # the slot _handle runs
        #: Loop timers run so far (for benchmarks and tests).
        self.runs = 0

    def call_at(self, when: float, callback: Callable[[], None]) -> SlotTimer:
        """Run ``callback`` (on the loop) at ``when``'s slot: at most ``EARLY`` before ``when``,
        less than one slot after it. ``when`` in the past (or ``-inf``) runs as soon as it can."""
        timer = SlotTimer(callback)
        self._file(timer, when)
        return timer

    def call_again(self, timer: SlotTimer, when: float, callback: Callable[[], None]) -> SlotTimer:
        """``call_at(when, callback)``, filing ``timer`` again when it has run and has not been
        cancelled since, rather than making a new one (a callback re-arming itself from inside
        itself: a player's frame timer, 50 times a second per stream). Returns the timer filed:
        ``timer``, or a new one when ``timer`` is still pending or was cancelled."""
        if timer.callback is not _ran:
            return self.call_at(when, callback)
        timer.callback = callback
        self._file(timer, when)
        return timer

    def _file(self, timer: SlotTimer, when: float) -> None:
        slot = math.ceil((when - EARLY) / self._width) if when > 0.0 else 0
        bucket = self._buckets.get(slot)
        if bucket is None:
            self._buckets[slot] = [timer]
            heapq.heappush(self._order, slot)
            if slot < self._armed:
                self._arm(slot)
        else:
            bucket.append(timer)

    def pending(self) -> int:
        """Timers waiting (cancelled ones included until their slot runs)."""
        return sum(len(b) for b in self._buckets.values())

    def _arm(self, slot: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed = slot
        self._handle = self._loop.call_at(slot * self._width, self._run)

    def _run(self) -> None:
        self._handle = None
        self._armed = math.inf
        self.runs += 1
        # Only the slots due now; a callback arming a slot that is already due is run by the
        # next loop timer (at once), never by this loop, so a callback cannot hold the loop.
        due = math.floor(self._loop.time() / self._width + 1e-6)
        order, buckets = self._order, self._buckets
        batch: list[list[SlotTimer]] = []
        while order and order[0] <= due:
            batch.append(buckets.pop(heapq.heappop(order)))
        if order:
            self._arm(order[0])
        for bucket in batch:
            for timer in bucket:
                callback = timer.callback
                if callback is None:
                    continue
                timer.callback = _ran
                try:
                    callback()
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:  # noqa: BLE001 - reported as a Handle's would be
                    self._loop.call_exception_handler(
                        {
                            "message": f"Exception in slot timer callback {callback!r}",
                            "exception": exc,
                        }
                    )


_per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SlotTimers] = (
    weakref.WeakKeyDictionary()
)


def slot_timers(loop: asyncio.AbstractEventLoop) -> SlotTimers:
    """The ``SlotTimers`` every player on ``loop`` shares."""
    timers = _per_loop.get(loop)
    if timers is None:
        timers = _per_loop[loop] = SlotTimers(loop)
    return timers
