"""A FrameSink that records what the player sent and when, and lets a test wait for it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from legato.audio.clock import Clock
from legato.audio.sink import OPUS_SILENCE


@dataclass(frozen=True, slots=True)
class SinkEvent:
    """One thing the sink saw: a frame (``frame`` set) or a speaking change (``speaking`` set)."""

    time: float
    frame: bytes | None = None
    speaking: bool | None = None


class RecordingSink:
    """Records ``(time, frame)`` and speaking changes in arrival order.

    Args:
        clock: Where times come from (a ``FakeClock`` in unit tests); ``time.monotonic`` if None.
        speaking_gate: When set, ``set_speaking`` waits for it (to test ordering across awaits).
    """

    def __init__(self, clock: Clock | None = None) -> None:
        self._now: Callable[[], float] = clock.now if clock is not None else time.monotonic
        self.events: list[SinkEvent] = []
        self.speaking = False
        self.speaking_gate: asyncio.Event | None = None
        self._waiters: list[tuple[Callable[[RecordingSink], bool], asyncio.Future[None]]] = []

    # -- FrameSink ---------------------------------------------------------------------------

    async def set_speaking(self, speaking: bool) -> None:
        if self.speaking_gate is not None:
            await self.speaking_gate.wait()
        self.speaking = speaking
        self.events.append(SinkEvent(self._now(), speaking=speaking))
        self._notify()

    def send_frame(self, opus: bytes) -> None:
        self.events.append(SinkEvent(self._now(), frame=opus))
        if self._waiters:
            self._notify()

    # -- reading -----------------------------------------------------------------------------

    @property
    def frames(self) -> list[bytes]:
        """Every frame sent, silence included."""
        return [e.frame for e in self.events if e.frame is not None]

    @property
    def audio(self) -> list[bytes]:
        """Every frame but ``OPUS_SILENCE``."""
        return [f for f in self.frames if f != OPUS_SILENCE]

    @property
    def frame_times(self) -> list[float]:
        return [e.time for e in self.events if e.frame is not None]

    @property
    def speaking_changes(self) -> list[bool]:
        return [e.speaking for e in self.events if e.speaking is not None]

    def timeline(self) -> list[str]:
        """Events as short strings: ``"on"``, ``"off"``, ``"S"`` (silence) or the frame decoded."""
        out: list[str] = []
        for e in self.events:
            if e.speaking is not None:
                out.append("on" if e.speaking else "off")
            elif e.frame == OPUS_SILENCE:
                out.append("S")
            else:
                assert e.frame is not None
                out.append(e.frame.decode(errors="replace"))
        return out

    async def wait_for(self, predicate: Callable[[RecordingSink], bool]) -> None:
        """Wait (on a future woken by the sink, not a timer) until ``predicate(self)`` holds."""
        if predicate(self):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((predicate, future))
        try:
            await future
        finally:
            self._waiters = [w for w in self._waiters if w[1] is not future]

    async def wait_frames(self, count: int) -> None:
        """Wait until at least ``count`` frames (silence included) were sent."""
        await self.wait_for(lambda s: len(s.frames) >= count)

    def _notify(self) -> None:
        for predicate, future in self._waiters:
            if not future.done() and predicate(self):
                future.set_result(None)


class GatedSink(RecordingSink):
    """A ``RecordingSink`` that is also a ``SendGate``: frames may go out only while ``open``
    (the voice client while its DAVE group is not in force says no). A frame sent while closed
    is recorded in ``refused`` as well, so a test sees what a player leaked past the gate."""

    def __init__(self, clock: Clock | None = None, *, open: bool = True) -> None:
        super().__init__(clock)
        self._open = asyncio.Event()
        if open:
            self._open.set()
        self.refused: list[bytes] = []

    @property
    def can_send(self) -> bool:
        return self._open.is_set()

    async def wait_can_send(self) -> None:
        await self._open.wait()

    def open(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._open.clear()

    def send_frame(self, opus: bytes) -> None:
        if not self._open.is_set():
            self.refused.append(opus)
        super().send_frame(opus)
