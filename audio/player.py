"""One guild's player: the queue's tracks, opened and read off the loop, paced out on it.

Shape (songbird's driver/track split, discord.py's absolute deadlines, @discordjs/voice's
explicit state machine). Three rooms:

- ``player.py`` (here): ``GuildPlayer``, its public commands, its state (``PlayerState``, one
  table held by a :class:`~legato.lifecycle.Lifecycle`) and the send path.
- :mod:`legato.audio.feeder`: the one read path. The player's one ``Feeder`` opens each track
  (through the opener) and keeps its buffer (``buffer_ms`` of frames) filled, whatever process
  decodes it; the send path only takes ready frames and wakes the feeder when the buffer is low.
- :mod:`legato.audio.opener`: opening a track (resolve if need be, thread or worker process).
- :mod:`legato.audio.events`: what the player reports (events, ``PlayerStats``).

A drop-in ``discord.VoiceClient``-style ``play(source, after=)`` fits here as a thin command:
queue a one-off track whose opener hands back a ``FrameReader`` adapted from the
``discord.AudioSource`` (see :mod:`legato.audio.source`), and call ``after`` from the
``TrackEnded``/``TrackFailed`` event; pacing, holds and silence come as they are.

How it plays:

- The next track is opened as soon as the current one is within ``preload_s`` of its end (or
  its end is known), so its first frames are buffered before the last frame of the current one
  goes out: track changes leave no empty 20 ms slot.
- Sending is a timer callback on absolute deadlines that asks the pure
  :class:`~legato.audio.pacer.Pacer` what is due. The timers are the loop's shared
  :class:`~legato.audio.timers.SlotTimers` (one loop timer per 1 ms slot for every player on the
  loop), and the steady state is one fused pacer call: per frame the loop pops a deque, calls
  ``sink.send_frame`` and appends the next deadline to its slot. Reads' results come back
  through one batched hand-off per loop (:class:`~legato.audio.handoff.Inbox`), not a
  self-pipe write each.
- Source faults. A stream that breaks off mid-track is opened again by the feeder (see
  :mod:`legato.audio.feeder`). A source that is late (a stalled server) has Opus silence sent
  in its place on the frame grid, speaking left on: the receiver's clock keeps going and it
  hears silence, not its decoder's guesses; a stall is expected to end, and two speaking
  changes would cost a round trip each. Meanwhile the player is ``BUFFERING`` (not
  ``PLAYING``), for anyone to see.
- Slow sources. A source that delivers, but slower than real time (issue #11: a server
  trickling an MP3 at 1 KB/s gave 2 s of sound in every 30 s and stayed "playing"), is judged
  by a :class:`~legato.audio.supply.SupplyMonitor`: the time the player wanted audio and had
  none (``LOADING`` and ``BUFFERING``) is summed over ``starve_window``, and past
  ``starve_limit`` the track fails as too slow (``SourceTooSlow``) and the next one plays. One
  spell with no audio at all for ``stall_timeout`` fails it as stalled. The judge is told only at
  state changes (underrun, frames back, track change, pause) and looks again on one timer per
  starved spell, so the send path pays nothing for it; it sits at the player, so it judges a
  source read in a thread and one read in a decode worker process alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Final, Protocol, runtime_checkable

from legato.audio.clock import Clock, loop_time
from legato.audio.events import (
    EndReason,
    PlayerEvent,
    PlayerStats,
    QueueEnded,
    TrackEnded,
    TrackFailed,
    TrackStarted,
)
from legato.audio.feeder import Entry, Feeder, TrackClosed
from legato.audio.opener import SourceOpener, make_opener
from legato.audio.pacer import FRAME_INTERVAL, Pacer, PacerAction
from legato.audio.queue import LoopMode, TrackQueue
from legato.audio.sink import OPUS_SILENCE, FrameSink, LinkCounters, SendGate
from legato.audio.source import Chunk, SourceTooSlow
from legato.audio.supply import Supply, SupplyMonitor, SupplyReport
from legato.audio.timers import slot_timers
from legato.audio.track import Track
from legato.errors import AudioError, DecodeError, InvalidTransition, LegatoError, QueueEmpty
from legato.lifecycle import Lifecycle, table
from legato.log import GuildLogger

__all__ = [
    "MAX_VOLUME",
    "PASSTHROUGH_BUFFER_MS",
    "EndReason",
    "GuildPlayer",
    "PlayerEvent",
    "PlayerState",
    "PlayerStats",
    "QueueEnded",
    "SourceOpener",
    "TrackEnded",
    "TrackFailed",
    "TrackStarted",
    "make_opener",
]

_log = logging.getLogger(__name__)

#: A frame sent later than this after its deadline counts as late in ``PlayerStats``.
LATE_THRESHOLD: Final = 0.002
#: Lateness histogram: 0.1 ms bins up to 20 ms (the last bin holds everything beyond).
_HIST_BIN: Final = 0.0001
_HIST_SIZE: Final = 201
#: A send that took longer than this (the loop preempted in it) keeps the next frame's minimum
#: gap from when it left rather than from when it was due (``Pacer.sent_at``).
_HELD_UP: Final = 0.001
#: Encode times are kept for this many recent reads (a few seconds of audio per player).
_ENCODE_WINDOW: Final = 256
#: Hands out refill chunk sizes round-robin (see ``GuildPlayer.__init__``).
_spread = itertools.count()
#: Most volume accepted (2.0 = 200 %).
MAX_VOLUME: Final = 2.0
#: ``GuildPlayer``'s default ``passthrough_buffer_ms``. At 1000 players on one loop, 1000 ms
#: against 300 cut CPU per stream by ~15 % and the send gap p99 by a third or more
#: (``bench/bench_voice.py --players 1000``).
PASSTHROUGH_BUFFER_MS: Final = 1000


class PlayerState(enum.Enum):
    """What the player is doing."""

    IDLE = "idle"
    """Nothing to play (not started, stopped, or the queue ended)."""
    LOADING = "loading"
    """A track should be playing but its first frames are not buffered yet."""
    PLAYING = "playing"
    """Frames are going out."""
    BUFFERING = "buffering"
    """A frame was due mid-track and none was buffered: the source is late (silence stands in,
    speaking stays on). Back to ``PLAYING`` when frames come; a source that stays late is judged
    too slow and skipped (see ``starve_limit``)."""
    PAUSED = "paused"
    """Paused by the user; the current track keeps its place and its buffer."""
    CLOSED = "closed"
    """Closed for good."""


_ALLOWED: Final = table(
    {
        PlayerState.IDLE: frozenset({PlayerState.LOADING, PlayerState.CLOSED}),
        PlayerState.LOADING: frozenset(
            {PlayerState.PLAYING, PlayerState.PAUSED, PlayerState.IDLE, PlayerState.CLOSED}
        ),
        PlayerState.PLAYING: frozenset(
            {
                PlayerState.LOADING,
                PlayerState.BUFFERING,
                PlayerState.PAUSED,
                PlayerState.IDLE,
                PlayerState.CLOSED,
            }
        ),
        PlayerState.BUFFERING: frozenset(
            {
                PlayerState.PLAYING,
                PlayerState.LOADING,
                PlayerState.PAUSED,
                PlayerState.IDLE,
                PlayerState.CLOSED,
            }
        ),
        PlayerState.PAUSED: frozenset(
            {PlayerState.PLAYING, PlayerState.LOADING, PlayerState.IDLE, PlayerState.CLOSED}
        ),
        PlayerState.CLOSED: frozenset(),
    }
)
#: States in which audio is wanted (what the supply judge watches; any other resets it).
_WANTED: Final = frozenset({PlayerState.LOADING, PlayerState.PLAYING, PlayerState.BUFFERING})
#: Of those, the ones in which none is buffered: the source is starving the player.
_STARVED: Final = frozenset({PlayerState.LOADING, PlayerState.BUFFERING})


@runtime_checkable
class TimerClock(Clock, Protocol):
    """A clock that can also run a callback at one of its times (a test's fake clock)."""

    def call_at(self, when: float, callback: Callable[[], None]) -> Any: ...


class _Cancellable(Protocol):
    def cancel(self) -> None: ...


class GuildPlayer:
    """Plays a guild's ``TrackQueue`` into a ``FrameSink``.

    Args:
        sink: Where frames and speaking changes go (the voice client, or a test's sink).
        opener: Opens a track at a start position (see :func:`make_opener`).
        queue: The queue to play; a new unbounded one if ``None``.
        clock: Where deadlines come from. ``None``: the running loop's clock and its shared
            ``SlotTimers``. A
            clock with ``call_at`` (a test's fake clock) schedules the pacing timer itself.
        executor: Runs every blocking ``FrameSource`` call; ``None``: a small pool shared by
            every player of the process.
        buffer_ms: How much audio to keep decoded ahead of the send position.
        passthrough_buffer_ms: How much once a track passing Opus through has started (at
            least ``buffer_ms``; ``None``: ``PASSTHROUGH_BUFFER_MS``). Reads start at the same
            low-water mark, so each reads more: a passthrough read costs microseconds and its
            hand-off to the executor tens. A volume change still comes within ``buffer_ms``:
            the buffer is first cut back to that and the rest read again at the new volume
            (unless the source cannot seek: then after the buffer).
        preload_s: Open the next track when the current one has this little left to read.
        on_event: Called on the loop with each ``PlayerEvent``.
        volume: Initial volume (1.0 keeps Opus passthrough possible).
        guild_id: For log lines.
        max_reopens: Times a track whose stream broke off mid-track (``StreamLost``: an expired
            URL's 403, a dropped connection) is opened again where it stopped, with no audio in
            between, before it fails.
        stall_timeout: Seconds a started track may give no audio (silence stands in meanwhile,
            speaking stays on) before it fails as stalled and the next one plays.
        starve_window: Seconds of wall time over which a source's supply is judged.
        starve_limit: Seconds within ``starve_window`` that the current track may leave the
            player wanting audio with none buffered (``LOADING`` or ``BUFFERING``) before it
            fails as too slow (``SourceTooSlow``) and the next one plays. The defaults (10 of
            20) skip a source below half real time within about 10 to 20 s, and a track that
            gives no audio 10 s after it was due; a stream that stops for a few seconds once is
            kept. Must be less than ``starve_window``.
        fill_silence: Send Opus silence in place of audio a source is late with, keeping the
            stream's clock going; ``False`` sends nothing until the audio comes.

    Must be made while an event loop runs.
    """

    def __init__(
        self,
        sink: FrameSink,
        opener: SourceOpener,
        *,
        queue: TrackQueue | None = None,
        clock: Clock | None = None,
        executor: Executor | None = None,
        buffer_ms: int = 300,
        passthrough_buffer_ms: int | None = None,
        preload_s: float = 10.0,
        on_event: Callable[[PlayerEvent], None] | None = None,
        volume: float = 1.0,
        guild_id: int = 0,
        max_reopens: int = 2,
        stall_timeout: float = 10.0,
        fill_silence: bool = True,
        starve_window: float = 20.0,
        starve_limit: float = 10.0,
    ) -> None:
        _check_volume(volume)
        self._loop = asyncio.get_running_loop()
        self._sink = sink
        self._queue = queue if queue is not None else TrackQueue()
        self._on_event = on_event
        self._volume = volume
        self._preload_s = preload_s
        if max_reopens < 0 or not stall_timeout > 0:
            raise ValueError("need max_reopens >= 0 and stall_timeout > 0")
        self._max_reopens = max_reopens
        self._fill = fill_silence
        #: Judges the current track's source (see the module docstring, "Slow sources").
        self._supply = SupplyMonitor(window=starve_window, limit=starve_limit, stall=stall_timeout)
        self._supply_timer: _Cancellable | None = None
        self._supply_when = math.nan
        self._log = GuildLogger(_log, guild_id)
        self._link = sink if isinstance(sink, LinkCounters) else None
        self._gate = sink if isinstance(sink, SendGate) else None
        #: Files the frame timer again from inside its own callback (``SlotTimers.call_again``);
        #: ``None``: a new ``_call_at`` each frame.
        self._call_again: Callable[[Any, float, Callable[[], None]], _Cancellable] | None = None
        if clock is None:
            slots = slot_timers(self._loop)
            self._now: Callable[[], float] = loop_time(self._loop)
            self._call_at: Callable[[float, Callable[[], None]], _Cancellable] = slots.call_at
            self._call_again = slots.call_again
        elif isinstance(clock, TimerClock):
            self._now, self._call_at = clock.now, clock.call_at
        else:
            other = clock
            self._now = other.now
            self._call_at = lambda when, cb: self._loop.call_later(when - other.now(), cb)
        self._cap = max(2, buffer_ms // 20)
        # Refill in chunks of a half to two thirds of the buffer: each executor hand-off costs
        # tens of microseconds on the loop (queue put, thread wake-up, self-pipe, GIL), so
        # fewer, larger reads; a third of the buffer (100 ms by default) is left as cushion.
        # The size varies from player to player: players started together would otherwise
        # all refill in the same 20 ms slot, and that slot's sends would wait behind every
        # hand-off at once.
        lo = max(1, self._cap // 2)
        hi = max(lo, (2 * self._cap) // 3)
        self._low = self._cap - (lo + next(_spread) % (hi - lo + 1))
        self._pacer = Pacer()
        self._life = Lifecycle(PlayerState.IDLE, _ALLOWED, on_change=self._on_state, log=self._log)
        self._feeder = Feeder(
            opener,
            executor=executor,
            cap=self._cap,
            low=self._low,
            passthrough_cap=(
                PASSTHROUGH_BUFFER_MS if passthrough_buffer_ms is None else passthrough_buffer_ms
            )
            // 20,
            max_reopens=max_reopens,
            volume=lambda: self._volume,
            on_update=self._on_entry_update,
            on_chunk=self._on_chunk,
            on_seek=self._on_seek,
            on_reopen=self._on_reopen,
            log=self._log,
        )
        self._cur: Entry | None = None
        self._next: Entry | None = None
        self._timer: _Cancellable | None = None
        self._timer_when = math.nan
        #: ``_on_timer`` bound once, not once per frame.
        self._tick = self._on_timer
        self._speaking_task: asyncio.Task[None] | None = None
        #: Waits for the sink's gate while the track is held (see ``_hold``).
        self._hold_task: asyncio.Task[None] | None = None
        self._hold_since = 0.0
        self._pumping = False
        self._repump = False
        self._in_underrun = False
        self._fail_streak = 0
        # stats
        self._frames_sent = 0
        self._silence_sent = 0
        self._late = 0
        self._max_late = 0.0
        self._hist = [0] * _HIST_SIZE
        self._underruns = 0
        self._source_errors = 0
        self._reopens = 0
        self._sink_errors = 0
        self._holds = 0
        self._held = 0.0
        #: Seconds per frame of recent reads (appended on the loop by the feeders).
        self._encode_times: deque[float] = deque(maxlen=_ENCODE_WINDOW)

    # -- properties ----------------------------------------------------------------------------

    @property
    def state(self) -> PlayerState:
        """The current ``PlayerState``."""
        return self._life.state

    @property
    def queue(self) -> TrackQueue:
        """The queue being played (edit it directly; the player reads it at track changes)."""
        return self._queue

    @property
    def current(self) -> Track | None:
        """The track playing, loading or paused, if any."""
        return self._cur.track if self._cur is not None else None

    @property
    def position(self) -> float:
        """Seconds into the current track of what has been sent."""
        cur = self._cur
        return cur.base + cur.sent * FRAME_INTERVAL if cur is not None else 0.0

    @property
    def duration(self) -> float | None:
        """Length of the current track as its source reports it (else its metadata's), if known."""
        cur = self._cur
        if cur is None:
            return None
        return cur.duration if cur.duration is not None else cur.track.duration

    @property
    def volume(self) -> float:
        """The volume (1.0 = unchanged)."""
        return self._volume

    @property
    def stats(self) -> PlayerStats:
        """A snapshot of the counters."""
        total = sum(self._hist)
        p99 = 0.0
        if total:
            rank, seen = math.ceil(0.99 * total), 0
            for i, count in enumerate(self._hist):
                seen += count
                if seen >= rank:
                    p99 = i * _HIST_BIN * 1e3
                    break
        encode = sorted(self._encode_times)
        link = self._link
        held = self._held
        if self._hold_task is not None:
            held += self._now() - self._hold_since
        return PlayerStats(
            frames_sent=self._frames_sent,
            silence_sent=self._silence_sent,
            late_frames=self._late,
            max_lateness_ms=self._max_late * 1e3,
            p99_lateness_ms=p99,
            reanchors=self._pacer.reanchors,
            underruns=self._underruns,
            buffer_frames=len(self._cur.frames) if self._cur is not None else 0,
            source_errors=self._source_errors,
            reopens=self._reopens,
            sink_errors=self._sink_errors,
            encode_ms_mean=sum(encode) / len(encode) * 1e3 if encode else 0.0,
            encode_ms_p99=encode[math.ceil(0.99 * len(encode)) - 1] * 1e3 if encode else 0.0,
            reconnects=link.reconnects if link is not None else 0,
            resumes=link.resumes if link is not None else 0,
            holds=self._holds,
            held_ms=held * 1e3,
        )

    async def wait_for(self, state: PlayerState) -> None:
        """Wait until the player is in ``state`` (wrap it in ``asyncio.timeout`` to bound it).

        Raises:
            InvalidTransition: The player closed first.
        """
        reached = await self._life.wait_for(state, PlayerState.CLOSED)
        if reached is not state:
            raise InvalidTransition(PlayerState.CLOSED, state)

    # -- commands ------------------------------------------------------------------------------

    def start(self) -> bool:
        """Start playing the queue (its current track, else the next one) if idle.

        Returns:
            False when already busy or when there is nothing to play.
        """
        self._check_open()
        if self._life.state is not PlayerState.IDLE:
            return False
        track = self._queue.current or self._queue.advance()
        if track is None:
            return False
        self._life.move(PlayerState.LOADING, reason="start")
        self._begin(track)
        self._pump()
        return True

    def pause(self) -> bool:
        """Pause; five silence frames then speaking off. Returns False if nothing is playing."""
        self._check_open()
        if self._life.state not in _WANTED:
            return False
        self._life.move(PlayerState.PAUSED, reason="pause")
        self._pump()
        return True

    def resume(self) -> bool:
        """Resume after ``pause``. Returns False if not paused."""
        self._check_open()
        if self._life.state is not PlayerState.PAUSED:
            return False
        cur = self._cur
        ready = cur is not None and bool(cur.frames)
        self._life.move(PlayerState.PLAYING if ready else PlayerState.LOADING, reason="resume")
        self._pump()
        return True

    def stop(self) -> bool:
        """Stop and drop the current track (to the history); the queue stays.

        Returns:
            False if nothing was playing.
        """
        self._check_open()
        if self._life.state is PlayerState.IDLE:
            return False
        self._end_current(EndReason.STOPPED)
        self._queue.finish_current()
        self._drop_next()
        self._life.move(PlayerState.IDLE, reason="stop")
        self._pump()
        return True

    def skip(self, track: Track | None = None) -> bool:
        """Skip to the next track (a looped track does not repeat). While paused, the next track
        loads and stays paused.

        Args:
            track: Skip only if this track (this very object, as ``current`` gave it) is still
                the current one: a skip asked for while it played must not skip the track that
                replaced it in the meantime.

        Returns:
            False if nothing was playing, or ``track`` is no longer current.
        """
        self._check_open()
        if self._cur is None or (track is not None and self._cur.track is not track):
            return False
        self._end_current(EndReason.SKIPPED)
        self._begin(self._queue.advance(skip=True))
        self._pump()
        return True

    def previous(self) -> Track:
        """Go back to the previous track; the current one returns to the front of the queue.

        Returns:
            The track now playing.

        Raises:
            QueueEmpty: There is no previous track.
            QueueFull: The current track would not fit back into the queue.
        """
        self._check_open()
        track = self._queue.previous()
        self._end_current(EndReason.REPLACED)
        if self._life.state is PlayerState.IDLE:
            self._life.move(PlayerState.LOADING, reason="previous")
        self._begin(track)
        self._pump()
        return track

    async def seek(self, seconds: float) -> None:
        """Continue the current track from ``seconds`` (buffered audio is dropped).

        Raises:
            QueueEmpty: Nothing is playing.
            AudioError: The source cannot seek there.
        """
        self._check_open()
        cur = self._cur
        if cur is None:
            raise QueueEmpty("seek with no current track", user_message="Nothing is playing.")
        await self._feeder.request(cur, "seek", max(0.0, seconds))

    async def set_volume(self, volume: float) -> None:
        """Change the volume of this and later tracks.

        Anything but 1.0 makes the source decode and re-encode (no passthrough). Frames already
        buffered, up to ``buffer_ms`` of them, keep the old volume: a passthrough track's larger
        buffer is cut back to that and read again (one that cannot seek keeps it whole).

        Raises:
            AudioError: ``volume`` is outside 0..2.
        """
        self._check_open()
        _check_volume(volume)
        self._volume = volume
        nxt = self._next
        if nxt is not None:
            # The preloaded track gets it too, and drops what it buffered at the old volume (it
            # has sent nothing yet). Nobody waits for these; an error surfaces when it plays.
            for request in (
                self._feeder.request(nxt, "volume", volume),
                self._feeder.request(nxt, "seek", nxt.base),
            ):
                asyncio.ensure_future(request).add_done_callback(_retrieve)
        if self._cur is not None:
            # If the track changes meanwhile, the next one opens at the new volume anyway.
            with contextlib.suppress(TrackClosed):
                await self._feeder.request(self._cur, "volume", volume)

    async def close(self) -> None:
        """Stop everything: cancel every task, close every source. Safe to call twice."""
        if self._life.state is PlayerState.CLOSED:
            return
        self._end_current(EndReason.CLOSED)
        self._drop_next()
        self._life.move(PlayerState.CLOSED, reason="close")
        self._cancel_timer()
        tasks: list[asyncio.Future[Any]] = []
        for task in (self._speaking_task, self._hold_task):
            if task is not None:
                task.cancel()
                tasks.append(task)
        if tasks:
            await asyncio.wait(tasks)
        await self._feeder.close()

    # -- track changes -----------------------------------------------------------------------

    def _end_current(self, reason: EndReason) -> None:
        cur, self._cur = self._cur, None
        if cur is None:
            return
        self._feeder.retire(cur)
        if cur.started:
            self._emit(TrackEnded(cur.track, reason))

    def _drop_next(self) -> None:
        nxt, self._next = self._next, None
        if nxt is not None:
            self._feeder.retire(nxt)

    def _begin(self, track: Track | None) -> None:
        """Make ``track`` current (the preloaded entry when it is that track), or end the queue."""
        if track is None:
            self._drop_next()
            if self._life.state is not PlayerState.IDLE:
                self._life.move(PlayerState.IDLE, reason="queue ended")
            self._emit(QueueEnded())
            return
        nxt = self._next
        if nxt is not None and nxt.track == track:
            self._next, entry = None, nxt
        else:
            self._drop_next()
            entry = self._feeder.open(track)
        self._cur = entry
        self._in_underrun = False
        self._supply.reset(self._now())  # the last track's supply says nothing about this one
        if self._life.state in _WANTED:
            target = PlayerState.PLAYING if entry.frames else PlayerState.LOADING
            if target is not self._life.state:
                self._life.move(target, reason=f"track {track.uid}")
        self._watch_supply()

    def _ensure_preload(self) -> None:
        """Open the track that comes next, unless it is already open (or the queue changed)."""
        predicted = self._queue.peek_next()
        if self._next is not None and self._next.track == predicted:
            return
        self._drop_next()
        if predicted is not None:
            self._next = self._feeder.open(predicted)

    def _finish_current(self) -> None:
        """The current entry is exhausted (or failed): report it and move on."""
        cur = self._cur
        assert cur is not None
        if cur.error is None:
            self._end_current(EndReason.FINISHED)
            self._begin(self._queue.advance())
            return
        self._cur = None
        self._feeder.retire(cur)
        self._source_errors += 1
        self._fail_streak += 1
        self._log.warning("track %r failed: %s", cur.track.title, cur.error)
        self._emit(TrackFailed(cur.track, cur.error))
        track = self._queue.advance(skip=True)
        if self._queue.loop is LoopMode.QUEUE and self._fail_streak > len(self._queue) + 1:
            self._log.warning("every track in the looped queue failed; stopping")
            self._queue.finish_current()
            track = None
        self._begin(track)

    # -- feeder callbacks ----------------------------------------------------------------------

    def _on_chunk(self, entry: Entry, chunk: Chunk) -> None:
        """A read gave frames (stats; the supply judge's measured rate, per read)."""
        self._encode_times.append(chunk.spent / len(chunk.frames))
        if entry is self._cur:
            self._supply.deliver(self._now(), len(chunk.frames) * FRAME_INTERVAL)

    def _on_seek(self, entry: Entry) -> None:
        if entry is self._cur:
            self._in_underrun = True  # the refill gap is not the source's fault

    def _on_reopen(self, entry: Entry) -> None:
        del entry
        self._reopens += 1

    def _on_entry_update(self, entry: Entry) -> None:
        if self._life.state is PlayerState.CLOSED or entry is not self._cur:
            return
        if entry.error is None and (
            entry.eof
            or (
                entry.duration is not None
                and entry.duration - entry.read_position <= self._preload_s
            )
        ):
            self._ensure_preload()
        if entry.frames and self._life.state in _STARVED:
            self._life.move(PlayerState.PLAYING, reason="frames ready")
        if (
            self._timer is not None
            and self._life.state is PlayerState.PLAYING
            and entry.started
            and entry.error is None
            and len(entry.frames) > 1
        ):
            return  # a refill mid-track: the armed frame timer sends them
        self._pump()

    # -- the send path (timer callback; must stay cheap) -----------------------------------

    def _pump(self) -> None:
        if self._pumping:
            self._repump = True
            return
        if (
            self._speaking_task is not None
            or self._hold_task is not None
            or self._life.state is PlayerState.CLOSED
        ):
            return
        self._pumping = True
        try:
            self._repump = True
            # A hold leaves the pacer as it was: polling again would only hold again.
            while self._repump and self._hold_task is None:
                self._repump = False
                self._pump_once()
        finally:
            self._pumping = False

    def _pump_once(self) -> None:
        pacer = self._pacer
        sink = self._sink
        while True:
            cur = self._cur
            if cur is not None and cur.eof and not cur.frames and not cur.pending:
                self._finish_current()
                continue
            ready = cur is not None and bool(cur.frames)
            now = self._now()
            if ready and self._gate is not None and pacer.playing and not self._gate.can_send:
                self._hold(now)
                return
            action = pacer.poll(now, audio_ready=ready, fill=self._fill)
            if action is PacerAction.SEND_AUDIO:
                assert cur is not None
                self._sent_audio(cur)
                # The next frame keeps its gap from when this one left, whichever way the loop
                # goes on: the last frame of the buffer too (held up in its send, the next one,
                # due from before the send, could reach the listener less than 5 ms after it).
                deadline = pacer.sent_at(self._now())
                frames = cur.frames
                if not cur.started:
                    cur.started = True
                    self._fail_streak = 0
                    self._emit(TrackStarted(cur.track))
                    deadline = pacer.next_deadline()
                if frames and self._cur is cur and pacer.playing:
                    # Steady state: nothing else can be due before the next frame's deadline,
                    # so skip the second poll (this path runs 50 times a second per player).
                    self._arm(deadline)
                    return
            elif action is PacerAction.WAIT:
                self._arm(pacer.next_deadline())
                return
            elif action is PacerAction.SEND_SILENCE:
                try:
                    sink.send_frame(OPUS_SILENCE)
                except Exception:  # noqa: BLE001 - counted and logged; see _sink_failed
                    self._sink_failed()
                pacer.sent_at(self._now())
                self._silence_sent += 1
            elif action is PacerAction.UNDERRUN:
                if not self._in_underrun and cur is not None and cur.started:
                    self._in_underrun = True
                    self._underruns += 1
                if self._life.state is PlayerState.PLAYING:
                    self._life.move(PlayerState.BUFFERING, reason="buffer ran dry")
                # The feeder calls back when frames arrive; meanwhile silence may stand in.
                self._arm(pacer.fill_deadline() if self._fill else None)
                return
            else:
                on = action is PacerAction.SPEAKING_ON
                self._cancel_timer()
                self._speaking_task = self._loop.create_task(self._announce(on))
                return

    def _watch_supply(self) -> None:
        """Start or end the current track's starved spell from the state (``LOADING`` and
        ``BUFFERING`` are starved), and keep the judge's timer armed while it lasts."""
        supply, cur = self._supply, self._cur
        if cur is not None and self._life.state in _STARVED:
            now = self._now()
            # The stall rule is for a track that has played; one still opening has the limit.
            supply.starve(now, stall=self._life.state is PlayerState.BUFFERING and cur.started)
            when = supply.deadline(now)
            if when is not None and (self._supply_timer is None or when != self._supply_when):
                self._cancel_supply_timer()
                self._supply_when = when
                self._supply_timer = self._call_at(when, self._on_supply_timer)
            return
        if supply.starving:
            supply.feed(self._now())
        self._cancel_supply_timer()

    def _on_supply_timer(self) -> None:
        """The current track has been starved up to a deadline of the judge's: fail it as
        stalled or too slow, or look again later.

        The decoder's own read timeout ends a stream that sends nothing at all; this bounds any
        source, whatever blocks it or however little it trickles. A read or open still in the
        worker is closed when it returns (see ``_retire``).
        """
        self._supply_timer = None
        self._supply_when = math.nan
        cur = self._cur
        # A closed current track is not slow: its executor is gone and the player is closing.
        if cur is None or cur.eof or cur.closed or self._life.state not in _STARVED:
            return
        now = self._now()
        report = self._supply.check(now)
        if report.verdict is Supply.OK:
            self._watch_supply()
            return
        self._feeder.fail(cur, _supply_error(cur, report, self._supply.limit))

    def _sink_failed(self) -> None:
        """A sink must not raise, but if it does the timer chain must survive it: a raise out of
        this callback would leave no timer armed and the player silent for good. Logged with the
        traceback at the 1st, 2nd, 4th, 8th... failure so a broken sink cannot flood the log."""
        self._sink_errors += 1
        count = self._sink_errors
        if count & (count - 1) == 0:
            self._log.exception("send_frame failed (%d so far); the frame is lost", count)

    def _hold(self, now: float) -> None:
        """Audio is due but the sink cannot send it as it must (DAVE negotiated, its group not in
        force): send nothing, consume no frame, and go on from the same frame once it can.

        The pacer is not polled meanwhile, so a track held before its first frame starts with
        speaking on and its first frame; a hold mid-track resumes on a new grid (a re-anchor).
        """
        self._cancel_timer()
        self._holds += 1
        self._hold_since = now
        self._log.info("holding the track until the voice link can send it (DAVE not ready)")
        self._hold_task = self._loop.create_task(self._await_gate())

    async def _await_gate(self) -> None:
        assert self._gate is not None
        try:
            await self._gate.wait_can_send()
        except Exception:
            self._log.exception("waiting for the voice link to take frames failed")
            raise
        finally:
            self._held += self._now() - self._hold_since
            self._hold_task = None
        self._log.info("the voice link can send: the track goes on")
        self._pump()

    async def _announce(self, speaking: bool) -> None:
        try:
            await self._sink.set_speaking(speaking)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - logged with traceback below
            # The transport may be reconnecting; the frames still go to the sink, which owns
            # what happens to them. Logged, not hidden.
            self._log.exception("set_speaking(%s) failed", speaking)
        self._speaking_task = None
        self._pump()

    def _arm(self, deadline: float | None) -> None:
        if deadline is None:
            self._cancel_timer()
            return
        if self._timer is not None and deadline == self._timer_when:
            return
        self._cancel_timer()
        self._timer_when = deadline
        self._timer = self._call_at(deadline, self._tick)

    def _on_timer(self) -> None:
        timer, self._timer = self._timer, None
        self._timer_when = math.nan
        cur = self._cur
        # Steady state (a started track with frames to spare, no speaking change under way):
        # the frame in one pacer call and one re-arm. Anything else takes the full _pump.
        if (
            cur is not None
            and cur.started
            and len(cur.frames) > 1
            and self._speaking_task is None
            and not self._pumping
            and (self._gate is None or self._gate.can_send)
        ):
            now = self._now()
            pacer = self._pacer
            deadline = pacer.send_due(now)
            if deadline is not None:
                self._sent_audio(cur)
                after = self._now()
                if after - now > _HELD_UP:  # preempted before the send: gap from it
                    deadline = pacer.sent_at(after) or deadline
                self._timer_when = deadline
                again = self._call_again
                if again is not None and timer is not None:
                    self._timer = again(timer, deadline, self._tick)
                else:
                    self._timer = self._call_at(deadline, self._tick)
                return
        self._pump()

    def _sent_audio(self, cur: Entry) -> None:
        """Send ``cur``'s next frame, which the pacer just took as sent, and count it."""
        frames = cur.frames
        try:
            self._sink.send_frame(frames.popleft())
        except Exception:  # noqa: BLE001 - counted and logged; see _sink_failed
            self._sink_failed()
        cur.sent += 1
        self._frames_sent += 1
        self._in_underrun = False
        late = self._pacer.last_lateness
        if late > 0.0:
            i = int(late / _HIST_BIN)
            self._hist[i if i < _HIST_SIZE else _HIST_SIZE - 1] += 1
            if late > LATE_THRESHOLD:
                self._late += 1
            if late > self._max_late:
                self._max_late = late
        else:
            self._hist[0] += 1
        if len(frames) <= self._low:
            self._feeder.wake(cur)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_when = math.nan

    def _cancel_supply_timer(self) -> None:
        if self._supply_timer is not None:
            self._supply_timer.cancel()
            self._supply_timer = None
            self._supply_when = math.nan

    # -- state machine ---------------------------------------------------------------------

    def _on_state(self, old: PlayerState, new: PlayerState, reason: str) -> None:
        """What a move of the lifecycle does to the pacer and the supply judge."""
        del reason
        if new is PlayerState.PLAYING or new is PlayerState.BUFFERING:
            self._pacer.play()  # BUFFERING keeps the grid and speaking: silence stands in
        else:
            self._pacer.stop()
        if old not in _WANTED or new not in _WANTED:
            # Paused, stopped or resumed: the judge starts afresh (a pause is no one's delay).
            self._supply.reset(self._now())
        self._watch_supply()

    def _check_open(self) -> None:
        if self._life.state is PlayerState.CLOSED:
            raise InvalidTransition(PlayerState.CLOSED, "command on a closed player")

    def _emit(self, event: PlayerEvent) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:  # noqa: BLE001 - logged with traceback below
            # A listener's bug must not stop the music; it is logged with its traceback.
            self._log.exception("on_event handler failed for %r", event)


def _supply_error(cur: Entry, report: SupplyReport, limit: float) -> LegatoError:
    """The error a track judged stalled or too slow fails with (``str`` has the figures)."""
    where = f"{cur.track.url} at {cur.read_position:.2f}s"
    if report.verdict is Supply.STALLED:
        return DecodeError(
            f"{where} stalled: no audio for {report.spell:.1f}s",
            user_message="The track's server stopped sending audio.",
        )
    figures = (
        f"buffer empty {report.starved:.1f}s of the last {report.span:.1f}s; it delivered "
        f"{report.delivered:.2f}s of audio in that time ({report.rate:.2f}x real time)"
    )
    if not cur.started and report.delivered == 0:
        return SourceTooSlow(
            f"{where} too slow: no audio {report.spell:.1f}s after it was due; {figures}",
            user_message=f"The track's server sent no audio within {limit:g} seconds.",
        )
    return SourceTooSlow(f"{where} too slow: {figures}")


def _check_volume(volume: float) -> None:
    if not 0.0 <= volume <= MAX_VOLUME:
        raise AudioError(
            f"volume {volume!r} out of range",
            user_message=f"Volume must be between 0 % and {MAX_VOLUME * 100:.0f} %.",
        )


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()  # marks it retrieved: an unawaited request's error is not an error here
