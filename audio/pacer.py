"""When each 20 ms frame goes out: a pure scheduler with time passed in (STYLE.md section 2).

Deadlines are absolute, ``anchor + k * 20 ms``, so sleeping late never accumulates drift. What
this pacer does not do is catch up: discord.py's ``AudioPlayer`` keeps its schedule after a stall
and clamps the sleep to zero, so a 200 ms stall comes out as ten frames 0.1 ms apart (discord.py
issue #9120). A receiver's jitter buffer overflows on such a burst. Here a frame more than one
frame late re-anchors the grid at "now" (the lost time is lost, as it is for a live stream), and
no two frames are ever sent closer than ``min_gap`` (15 ms, less the ``EARLY`` allowance): a frame
a little late keeps the grid, and the next one waits at least ``min_gap``, so the grid is caught up
gradually.

How late is "a little" depends on whose fault it is. Audio the source was late with (the pacer
said ``UNDERRUN`` for that frame) re-anchors past ``stall`` (one frame): the source has fallen
behind and the stream goes on from where it is. A sender that was late itself (the loop busy, or
waiting for a CPU) with audio ready keeps the grid up to ``catch_up`` (three frames, as JDA's
send loop does): a busy loop is late by a few frames now and then (100 ``/play`` starting at
once, a CPU-bound neighbour), and catching up at ``min_gap`` puts the stream back where it was,
where a re-anchor at each hiccup would push it later each time.

Past its limit, a frame re-anchors the grid once; while frames keep going out past their limits
(until ``rearm`` seconds pass without one), the grid is kept and caught up at ``min_gap`` rather
than re-anchored again. An overloaded loop, or a decoder falling behind while 100 tracks open,
would otherwise re-anchor every stream at every hiccup, each time adding to its latency, where
catching up gives the time back once the load passes. A stall on its own still re-anchors (once),
and no two frames are closer than ``min_gap`` either way.

The player drives it::

    while (action := pacer.poll(now, audio_ready=bool(buffer))) is not PacerAction.WAIT: ...
    sleep until pacer.next_deadline() (None: until something changes)
"""

from __future__ import annotations

import enum
from typing import Final

from legato.audio.sink import SILENCE_FRAMES

#: One Opus frame.
FRAME_INTERVAL: Final = 0.020
#: No two frames closer than this, whatever happened before. A catch-up goes at this pace: at
#: 15 ms rather than 10, a sender paused between reading the clock and sending (a busy machine
#: preempts it there too) must be held up more than 10 ms, not 5, for two packets to reach the
#: listener less than 5 ms apart.
MIN_GAP: Final = 0.015
#: A frame may go out this much before its deadline (timer and float rounding).
EARLY: Final = 0.0005
#: A frame sent late with its audio ready (the sender was late) keeps the grid up to this.
CATCH_UP: Final = 3 * FRAME_INTERVAL
#: After a re-anchor, seconds with no frame past its limit before another may re-anchor the grid
#: (meanwhile late frames keep it and ``MIN_GAP`` catches it up).
REARM: Final = 10.0


class PacerAction(enum.Enum):
    """What the player must do now."""

    WAIT = "wait"
    """Nothing is due; sleep until ``next_deadline()`` (or until audio arrives)."""
    SPEAKING_ON = "speaking_on"
    """Announce speaking (await it), then poll again."""
    SEND_AUDIO = "send_audio"
    """Send the next audio frame now."""
    SEND_SILENCE = "send_silence"
    """Send one ``OPUS_SILENCE`` frame now (trailing silence, or filling an underrun)."""
    SPEAKING_OFF = "speaking_off"
    """Announce speaking off (await it), then poll again."""
    UNDERRUN = "underrun"
    """A frame is due but no audio is ready; poll again when it is (nothing was sent)."""


class Pacer:
    """Schedule audio frames, speaking changes and the trailing silence for one stream.

    Args:
        interval: Seconds between frames.
        silence_frames: Silence frames sent after audio stops, before speaking goes off.
        min_gap: Smallest interval ever allowed between two frames (less ``EARLY``).
        stall: Audio the source was late with (an ``UNDERRUN`` for its frame) re-anchors the grid
            when it goes out later than this (default: one interval); also the grace before
            ``fill`` stands silence in.
        catch_up: A frame whose audio was ready but whose sender was late re-anchors the grid
            only when later than this (default ``CATCH_UP``); less late, the grid is kept and
            caught up at ``min_gap``.
        rearm: After a re-anchor, seconds without a frame past its limit (``stall`` or
            ``catch_up``) before the next may re-anchor (meanwhile the grid is kept and caught
            up at ``min_gap``).
    """

    def __init__(
        self,
        *,
        interval: float = FRAME_INTERVAL,
        silence_frames: int = SILENCE_FRAMES,
        min_gap: float = MIN_GAP,
        stall: float | None = None,
        catch_up: float = CATCH_UP,
        rearm: float = REARM,
    ) -> None:
        if interval <= 0 or not 0 <= min_gap <= interval:
            raise ValueError("need interval > 0 and 0 <= min_gap <= interval")
        self.interval = interval
        self.min_gap = min_gap
        self.stall = interval if stall is None else stall
        self.catch_up = max(catch_up, self.stall)
        self.rearm = rearm
        #: A late sender may re-anchor from this time on (see ``rearm``).
        self._calm_from = float("-inf")
        self._silence_frames = silence_frames
        self._want_audio = False
        self._speaking = False
        self._silence_left = 0
        self._anchor: float | None = None
        self._k = 0
        self._last_sent: float | None = None
        self._filling = False
        #: An ``UNDERRUN`` was said for the frame due now: its lateness is the source's.
        self._starved = False
        #: Lateness of the last frame sent, against its deadline (after any re-anchor: 0).
        self.last_lateness = 0.0
        #: Frames that re-anchored the grid because they were more than ``stall`` late.
        self.reanchors = 0

    # -- inputs ------------------------------------------------------------------------------

    def play(self) -> None:
        """Audio is wanted from now on (start or resume); speaking goes on before the first frame.

        A play during the trailing silence cancels the rest of it and keeps the grid.
        """
        self._want_audio = True
        self._silence_left = 0

    def stop(self) -> None:
        """Audio stops (pause, stop, queue end, loading): trailing silence, then speaking off."""
        if not self._want_audio:
            return
        self._want_audio = False
        self._filling = False
        self._silence_left = self._silence_frames if self._speaking else 0

    # -- state -------------------------------------------------------------------------------

    @property
    def speaking(self) -> bool:
        """Whether speaking is (being) announced as on."""
        return self._speaking

    @property
    def playing(self) -> bool:
        """Whether audio is wanted."""
        return self._want_audio

    @property
    def idle(self) -> bool:
        """Nothing to send and nothing to announce."""
        return not self._want_audio and not self._speaking

    @property
    def filling(self) -> bool:
        """Whether silence is standing in for audio that is not there (see ``poll``'s ``fill``)."""
        return self._filling

    def fill_deadline(self) -> float | None:
        """After an ``UNDERRUN``: when ``poll(..., fill=True)`` would send silence in its place.

        ``None`` when there is no grid to keep (no frame sent since speaking went on).
        """
        if not (self._want_audio and self._speaking) or self._anchor is None:
            return None
        if self._filling:
            return self._deadline()
        return self._deadline() + self.stall

    def next_deadline(self) -> float | None:
        """When the next frame is due, or ``None`` when only new audio (or ``play``) can start it.

        An action that is due immediately (speaking on or off) returns ``-inf``.
        """
        if self._want_audio:
            if not self._speaking:
                return None  # speaking on waits for audio, not for time
            if self._anchor is None:
                return None  # the first frame goes out as soon as audio is ready
            return self._deadline()
        if self._speaking:
            if self._silence_left == 0:
                return float("-inf")
            if self._anchor is None:
                return float("-inf")
            return self._deadline()
        return None

    # -- the step ----------------------------------------------------------------------------

    def poll(self, now: float, *, audio_ready: bool = True, fill: bool = False) -> PacerAction:
        """Say what to do at ``now``; the action is taken to be done once returned.

        Args:
            now: The current time in seconds on the clock all deadlines are on.
            audio_ready: Whether an audio frame is buffered and could be sent now.
            fill: While audio is wanted and speaking is on, stand in silence for audio that is
                more than ``stall`` late (and then for every frame until audio is ready), so
                the stream's clock keeps going through a source's stall. The first fill frame
                re-anchors the grid (as a late frame does: once per ``rearm``); audio that
                comes back keeps it.

        Returns:
            The action; call again until it is ``WAIT`` or ``UNDERRUN``.
        """
        if self._want_audio:
            if not self._speaking:
                if not audio_ready:
                    return PacerAction.UNDERRUN
                self._speaking = True
                self._anchor = None  # the grid starts with the first frame after speaking on
                return PacerAction.SPEAKING_ON
            if not self._is_due(now):
                return PacerAction.WAIT
            if not audio_ready:
                self._starved = True
                if not fill or self._anchor is None:
                    return PacerAction.UNDERRUN
                if not self._filling:
                    if now < self._deadline() + self.stall - EARLY:
                        return PacerAction.UNDERRUN
                    self._filling = True
                    self._late(now)
                self._sent(now)
                return PacerAction.SEND_SILENCE
            self._filling = False
            self._sent(now)
            return PacerAction.SEND_AUDIO
        if self._speaking:
            if self._silence_left == 0:
                self._speaking = False
                self._filling = False
                self._anchor = None
                return PacerAction.SPEAKING_OFF
            if not self._is_due(now):
                return PacerAction.WAIT
            self._silence_left -= 1
            self._sent(now)
            return PacerAction.SEND_SILENCE
        return PacerAction.WAIT

    def send_due(self, now: float) -> float | None:
        """``poll(now, audio_ready=True)``'s ``SEND_AUDIO``, fused for the player's steady state.

        When that poll would say ``SEND_AUDIO``, the frame is taken as sent (as ``poll`` does)
        and the next frame's deadline is returned; otherwise nothing changes and ``None`` says
        to ``poll``. One call in place of ``poll`` + ``next_deadline`` (50 times a second per
        stream), with ``_deadline`` and ``_sent`` written out inline: at a thousand streams
        their calls were a tenth of the player's own work per frame.
        """
        if not (self._want_audio and self._speaking):
            return None
        anchor = self._anchor
        if anchor is None:
            self._filling = False
            self._sent(now)
            return self._deadline()
        interval, min_gap = self.interval, self.min_gap
        grid = anchor + self._k * interval
        last = self._last_sent
        due = grid if last is None or grid >= last + min_gap else last + min_gap
        if now < due - EARLY:
            return None
        lateness = now - grid
        if lateness > (self.stall if self._starved else self.catch_up):
            self._late(now)  # may re-anchor
            anchor = self._anchor
            assert anchor is not None
            lateness = now - (anchor + self._k * interval)
        self.last_lateness = lateness
        self._filling = False
        self._starved = False
        self._last_sent = now
        k = self._k = self._k + 1
        grid = anchor + k * interval
        return grid if grid >= now + min_gap else now + min_gap

    def sent_at(self, when: float) -> float | None:
        """The frame last taken as sent left at ``when`` (the clock read after the send call),
        later than the ``now`` it was taken at: the sender was held up in between (preempted
        on a busy machine). The next frame keeps ``min_gap`` from ``when``, so the two cannot
        reach the listener closer than that. Returns ``next_deadline()``."""
        if self._last_sent is not None and when > self._last_sent:
            self._last_sent = when
        return self.next_deadline()

    def _deadline(self) -> float:
        assert self._anchor is not None
        grid = self._anchor + self._k * self.interval
        if self._last_sent is not None:
            return max(grid, self._last_sent + self.min_gap)
        return grid

    def _is_due(self, now: float) -> bool:
        return self._anchor is None or now >= self._deadline() - EARLY

    def _late(self, now: float) -> None:
        """A frame goes out past its limit: re-anchor the grid at ``now``, unless one was
        re-anchored less than ``rearm`` seconds after an earlier late frame (then the grid is
        kept and ``min_gap`` catches it up). Either way the calm period starts over."""
        if now >= self._calm_from:
            self._anchor, self._k = now, 0
            self.reanchors += 1
        self._calm_from = now + self.rearm

    def _sent(self, now: float) -> None:
        if self._anchor is None:
            self._anchor, self._k = now, 0
            self.last_lateness = 0.0
        else:
            lateness = now - (self._anchor + self._k * self.interval)
            if lateness > (self.stall if self._starved else self.catch_up):
                # Re-anchor rather than send the backlog in a burst (discord.py #9120).
                self._late(now)
                lateness = now - (self._anchor + self._k * self.interval)
            self.last_lateness = lateness
        self._starved = False
        self._last_sent = now
        self._k += 1
