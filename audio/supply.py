"""Whether a track's source keeps up with real time: a pure judge with time passed in.

A source slower than real time (a server trickling a 128 kbit/s MP3 at 1 KB/s) does not fail: each
read returns a few frames, late. Without a judge the player plays them as they come (a fraction of
a second of sound in every few seconds, silence in between) and stays "playing" forever, because
no single gap is long enough to count as a stall (issue #11).

What is measured. A player reads only when its buffer is low, so a healthy source's delivery is
bound by demand: it delivers audio exactly as fast as it is played, 1x real time. A source that
cannot keep up shows its deficit as time the player wanted audio and had none buffered (the
buffer "starved"): a source delivering at a fraction *r* of real time leaves the player starved
about *1 - r* of the time. So the judge adds up starved time over a trailing window of wall
time, and a track is too slow once that sum passes ``limit`` (``limit / window`` = 0.5 is "below
half real time"). Starved time needs no per-frame work (the player reports the start and end of
each starved spell, which are underrun and refill events) and ignores time the player did not
want audio (paused: the player resets the judge). The audio delivered in the window is kept too,
per read and summed in slots of a twentieth of the window, for the report an operator sees (the
measured rate). Everything kept is pruned to the window as it comes, so a player on a live stream
for hours keeps a few numbers, not its history.

A short hiccup is forgiven: a stream that stops for a few seconds and then keeps up again never
sums ``limit`` within one window. A spell with no audio at all for ``stall`` seconds (a server
that stopped sending) is told apart as ``STALLED``: its message to users differs.

Time spent waiting for a track's first audio (opening a slow stream) counts as starved: a track
that has given nothing after ``limit`` seconds is judged too slow like one that trickles.

The player asks :meth:`SupplyMonitor.deadline` when to look again (one timer per starved spell,
not per frame) and :meth:`SupplyMonitor.check` what to do then.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass
from typing import Final

__all__ = ["RECHECK", "Supply", "SupplyMonitor", "SupplyReport"]

#: Least time between two looks while starved. The starved sum can stay just short of ``limit``
#: for a while (an old spell leaving the window as fast as the current one grows); each look
#: then waits at least this long instead of spinning.
RECHECK: Final = 0.25


#: Deliveries are summed per slot of ``window / _SLOTS`` (a read's time to that precision): a
#: player keeps a few numbers per window however often it reads, for hours of a live stream.
_SLOTS: Final = 20

#: Sums of float times drift in their last bits: a look at the exact deadline must see it reached.
_EPSILON: Final = 1e-9


class Supply(enum.Enum):
    """The judge's verdict on a source."""

    OK = "ok"
    """Keeping up, or not starved long enough to tell."""
    STALLED = "stalled"
    """No audio at all for ``stall`` seconds while it was wanted (the server stopped sending)."""
    TOO_SLOW = "too_slow"
    """Starved for more than ``limit`` seconds of the last ``window``: slower than real time."""


@dataclass(frozen=True, slots=True)
class SupplyReport:
    """What :meth:`SupplyMonitor.check` found.

    Attributes:
        verdict: The verdict.
        starved: Seconds, within the last ``span``, that audio was wanted and none was buffered.
        span: Seconds looked at: the window, or less since the track began (or was resumed).
        delivered: Seconds of audio the source delivered within ``span``.
        spell: Seconds the current starved spell has lasted (0.0 when not starved).
    """

    verdict: Supply
    starved: float
    span: float
    delivered: float
    spell: float

    @property
    def rate(self) -> float:
        """Audio delivered per second of wall time within ``span`` (1.0 is real time)."""
        return self.delivered / self.span if self.span > 0 else 0.0


class SupplyMonitor:
    """Judges one track's source from its starved spells and deliveries (time passed in).

    Args:
        window: Seconds of wall time looked back over.
        limit: Starved seconds within ``window`` past which the source is too slow
            (``0 < limit < window``).
        stall: Seconds one starved spell may last with no audio before the source counts as
            stalled, for spells started with ``stall=True``; ``None``: never.

    Raises:
        ValueError: The figures are out of range.
    """

    def __init__(self, *, window: float, limit: float, stall: float | None = None) -> None:
        if not 0 < limit < window or (stall is not None and not stall > 0):
            raise ValueError("need 0 < limit < window and stall > 0")
        self.window = window
        self.limit = limit
        self.stall = stall
        self._since = 0.0
        self._spells: deque[tuple[float, float]] = deque()  # ended starved spells (start, end)
        self._spell: float | None = None  # start of the current spell
        self._spell_stalls = False
        self._slot = window / _SLOTS
        #: Audio delivered per slot: ``[slot number, seconds]``, oldest first.
        self._deliveries: deque[list[float]] = deque()

    @property
    def starving(self) -> bool:
        """Whether a starved spell is under way."""
        return self._spell is not None

    def reset(self, now: float) -> None:
        """Forget everything: a new track, or audio no longer wanted (paused, stopped)."""
        self._since = now
        self._spells.clear()
        self._deliveries.clear()
        self._spell = None

    def starve(self, now: float, *, stall: bool = False) -> None:
        """Audio is wanted and none is buffered from ``now`` (no-op while already starved).

        Args:
            now: The time.
            stall: Whether the ``stall`` rule applies to this spell (a track that has played;
                a track still opening has only ``limit``).
        """
        if self._spell is None:
            self._spell = now
            self._spell_stalls = stall

    def feed(self, now: float) -> None:
        """The starved spell (if any) ended at ``now``: audio came, or is no longer wanted."""
        start, self._spell = self._spell, None
        if start is not None and now > start:
            self._spells.append((start, now))
            self._prune(now)

    def deliver(self, now: float, seconds: float) -> None:
        """The source delivered ``seconds`` of audio at ``now`` (one read)."""
        slot = math.floor(now / self._slot)
        deliveries = self._deliveries
        if deliveries and deliveries[-1][0] == slot:
            deliveries[-1][1] += seconds
            return
        deliveries.append([slot, seconds])
        while deliveries[0][0] <= slot - _SLOTS:
            deliveries.popleft()

    def deadline(self, now: float) -> float | None:
        """When :meth:`check` should next be asked, or ``None`` when not starved.

        Never earlier than the verdict can change if the spell goes on (starved time grows at
        most as fast as the clock), and at least ``RECHECK`` after ``now``.
        """
        start = self._spell
        if start is None:
            return None
        when = now + (self.limit - self._starved(now))
        if self._spell_stalls and self.stall is not None:
            when = min(when, start + self.stall)
        return max(when, now + RECHECK)

    def check(self, now: float) -> SupplyReport:
        """Judge the source at ``now``."""
        self._prune(now)
        starved = self._starved(now)
        start = self._spell
        spell = now - start if start is not None else 0.0
        verdict = Supply.OK
        if start is not None:
            if self._spell_stalls and self.stall is not None and spell >= self.stall - _EPSILON:
                verdict = Supply.STALLED
            elif starved >= self.limit - _EPSILON:
                verdict = Supply.TOO_SLOW
        first = math.floor(now / self._slot) - _SLOTS  # the slot the window's start is in
        delivered = sum(s for slot, s in self._deliveries if slot > first)
        span = min(self.window, now - self._since)
        return SupplyReport(verdict, starved, span, delivered, spell)

    def _starved(self, now: float) -> float:
        edge = now - self.window
        total = sum(end - max(start, edge) for start, end in self._spells if end > edge)
        if self._spell is not None:
            total += now - max(self._spell, edge)
        return total

    def _prune(self, now: float) -> None:
        edge = now - self.window
        spells = self._spells
        while spells and spells[0][1] <= edge:
            spells.popleft()
