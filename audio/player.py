"""One guild's player: the queue's tracks, opened and read off the loop, paced out on it.

Shape (songbird's driver/track split, discord.py's absolute deadlines, @discordjs/voice's
explicit state machine):

- Each opened track is an ``_Entry`` with its own feeder task, which opens (and reopens) the
  source, fills its buffer and applies seek and volume requests between reads. The
  ``FrameSource`` is only ever called in the executor, in chunks of several frames, one call at
  a time. In the steady state (the feeder parked, nothing requested) the player's refills go to
  the executor straight from the send path, batched after the timer slot, and come back through
  the loop's ``_Inbox``: no task step per refill. A source in a decode worker process
  (``ReadsSoon``) is not read through the executor at all: the loop queues the request for the
  pool's writer thread and the pool's reader thread hands the reply to the inbox, so no thread
  waits out the round trip. The buffer holds ``buffer_ms`` of frames.
- The next track is opened as soon as the current one is within ``preload_s`` of its end (or
  its end is known), so its first frames are buffered before the last frame of the current one
  goes out: track changes leave no empty 20 ms slot.
- Sending is a timer callback on absolute deadlines that asks the pure
  :class:`~legato.audio.pacer.Pacer` what is due. The timers are the loop's shared
  :class:`~legato.audio.timers.SlotTimers` (one loop timer per 1 ms slot for every player on the
  loop), and the steady state is one fused pacer call: per frame the loop pops a deque, calls
  ``sink.send_frame`` and appends the next deadline to its slot. Feeders' read results come back
  through one batched hand-off per loop (``_Inbox``), not a self-pipe write each.
- Source faults. A stream that breaks off mid-track (``StreamLost``: stream URLs expire, so a
  server that answered may refuse FFmpeg's reconnect with 403) is opened again through the
  opener, which resolves a fresh stream URL, at the position its frames end: the buffered frames
  run straight into the new ones. ``max_reopens`` tries without audio in between, then the track
  fails. A source that is late (a stalled server) has Opus silence sent in its place on the
  frame grid, speaking left on: the receiver's clock keeps going and it hears silence, not its
  decoder's guesses; a stall is expected to end, and two speaking changes would cost a round
  trip each. Meanwhile the player is ``BUFFERING`` (not ``PLAYING``), for anyone to see.
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
import concurrent.futures
import contextlib
import enum
import itertools
import logging
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypeVar, runtime_checkable

from legato.audio.clock import Clock
from legato.audio.pacer import FRAME_INTERVAL, Pacer, PacerAction
from legato.audio.queue import LoopMode, TrackQueue
from legato.audio.sink import OPUS_SILENCE, FrameSink, LinkCounters, SendGate
from legato.audio.source import FrameSource, ReadsSoon, SourceTooSlow, StreamLost
from legato.audio.supply import Supply, SupplyMonitor, SupplyReport
from legato.audio.timers import slot_timers
from legato.audio.track import Track
from legato.errors import AudioError, DecodeError, InvalidTransition, LegatoError, QueueEmpty
from legato.log import GuildLogger

if TYPE_CHECKING:
    from legato.audio.encode import OpusSettings
    from legato.audio.resolve import Resolver, StreamInfo
    from legato.audio.workers import DecodePool

_log = logging.getLogger(__name__)

T = TypeVar("T")

#: ``(track, start seconds) -> opened source``; runs blocking work in an executor itself.
SourceOpener = Callable[[Track, float], Awaitable[FrameSource]]

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


_ALLOWED: Final[dict[PlayerState, frozenset[PlayerState]]] = {
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
#: States in which audio is wanted (what the supply judge watches; any other resets it).
_WANTED: Final = frozenset({PlayerState.LOADING, PlayerState.PLAYING, PlayerState.BUFFERING})
#: Of those, the ones in which none is buffered: the source is starving the player.
_STARVED: Final = frozenset({PlayerState.LOADING, PlayerState.BUFFERING})


class EndReason(enum.Enum):
    """Why a track stopped playing."""

    FINISHED = "finished"
    SKIPPED = "skipped"
    STOPPED = "stopped"
    REPLACED = "replaced"
    """``previous()`` put another track in its place."""
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class TrackStarted:
    """The track's first frame went out."""

    track: Track


@dataclass(frozen=True, slots=True)
class TrackEnded:
    """The track stopped playing (its last frame went out, or it was skipped/stopped).

    Only for tracks that sent a frame (``TrackStarted``); a track that fails after starting gets
    ``TrackFailed`` instead.
    """

    track: Track
    reason: EndReason


@dataclass(frozen=True, slots=True)
class TrackFailed:
    """The track could not be opened or read; the player went on with the next one."""

    track: Track
    error: LegatoError


@dataclass(frozen=True, slots=True)
class QueueEnded:
    """The queue ran out; the player is idle."""


PlayerEvent = TrackStarted | TrackEnded | TrackFailed | QueueEnded


@dataclass(frozen=True, slots=True)
class PlayerStats:
    """Counters since the player was made.

    Attributes:
        frames_sent: Audio frames sent.
        silence_sent: Silence frames sent (trailing silence, and standing in for audio a source
            is late with).
        late_frames: Frames sent more than ``LATE_THRESHOLD`` after their deadline.
        max_lateness_ms: Largest lateness of a frame against its deadline (re-anchors excluded).
        p99_lateness_ms: 99th percentile of that lateness (0.1 ms bins; 20 ms means "20 or more").
        reanchors: Times the grid was moved because a frame was more than a frame late.
        underruns: Times a frame was due mid-track and none was buffered (source too slow).
        buffer_frames: Frames buffered now for the current track.
        source_errors: Tracks that failed to open or to read.
        reopens: Times a stream that broke off mid-track was opened again (each try counts,
            whether it opened or not).
        sink_errors: Frames whose ``send_frame`` raised (the frame is lost, playing goes on).
        encode_ms_mean: Worker time to produce one frame (read, decode and encode; demux only
            for passthrough), mean over the last reads (each read's time over its frames).
        encode_ms_p99: 99th percentile of that per-read figure (0.0 before any read).
        reconnects: Times the sink's link was re-established (voice websocket reconnects,
            resumes included); 0 for a sink that does not count them.
        resumes: Of those, how many resumed the session.
        holds: Times a track was held because the sink could not send it yet (a voice link
            whose DAVE group is not in force): nothing was sent and no frame consumed meanwhile.
        held_ms: Time spent holding, in all (a hold under way included).
    """

    frames_sent: int
    silence_sent: int
    late_frames: int
    max_lateness_ms: float
    p99_lateness_ms: float
    reanchors: int
    underruns: int
    buffer_frames: int
    source_errors: int
    reopens: int
    sink_errors: int
    encode_ms_mean: float
    encode_ms_p99: float
    reconnects: int
    resumes: int
    holds: int = 0
    held_ms: float = 0.0


@runtime_checkable
class TimerClock(Clock, Protocol):
    """A clock that can also run a callback at one of its times (a test's fake clock)."""

    def call_at(self, when: float, callback: Callable[[], None]) -> Any: ...


class _Cancellable(Protocol):
    def cancel(self) -> None: ...


@dataclass
class _Op:
    kind: Literal["seek", "volume"]
    value: float
    done: asyncio.Future[None]


class _Entry:
    """One opened (or opening) track: its source, its buffered frames and its feeder task."""

    def __init__(self, player: GuildPlayer, track: Track, start: float) -> None:
        self.player = player
        self.track = track
        self.frames: deque[bytes] = deque()
        self.source: FrameSource | None = None
        self.eof = False
        self.error: LegatoError | None = None
        self.base = start  # seconds at which the `sent` count starts
        self.sent = 0
        self.started = False
        self.closed = False
        self.duration: float | None = None
        self.read_position = start
        self.ops: deque[_Op] = deque()
        self.wake = asyncio.Event()
        self.inflight: concurrent.futures.Future[Any] | None = None
        #: ``source.read_soon`` when the source has it (refills then hold no executor thread).
        self.read_soon: Callable[[int], concurrent.futures.Future[list[bytes]]] | None = None
        #: The feeder waits in ``_feed`` for a wake: reads may be sent from ``refill``.
        self.parked = False
        #: A read sent by ``refill`` is out (in the executor, or with a decode worker).
        self.reading = False
        #: What that read raised, for the feeder to handle (reopen, fail).
        self.read_error: BaseException | None = None
        self.reopens = 0  # reopens since the stream last gave audio
        self.task = asyncio.get_running_loop().create_task(
            self._run(start), name=f"legato-feed-{track.uid}"
        )

    # -- requests from the player (on the loop) -----------------------------------------------

    def request(self, kind: Literal["seek", "volume"], value: float) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.closed or self.task.done():
            done.set_exception(_gone(self.track))
            return done
        self.ops.append(_Op(kind, value, done))
        self.wake.set()
        return done

    def refill(self) -> None:
        """The player took frames and the buffer is low: read more.

        In the steady state (the feeder parked, no request waiting, no read in flight) the
        read goes to the executor from here and ``_read_done`` applies it: no feeder task step
        on the loop either way, which at hundreds of players is most of the loop's work besides
        sending. Otherwise the feeder is woken to do it.
        """
        if self.reading:
            return
        if not self.parked or self.ops or self.eof or self.closed or self.source is None:
            self.wake.set()
            return
        self.reading = True
        self.player._inbox.submit_soon(self)

    def _submit_read(self) -> None:
        """Start the read ``refill`` asked for (after the loop's current callback: the sends of
        a timer slot are not interleaved with worker wake-ups): with the source's ``read_soon``
        when it has one (a decode pool's source: the reply comes back through the inbox from
        the pool's reader thread), else in the executor."""
        source = self.source
        if self.closed or source is None:
            self.reading = False
            return
        count = self.player._cap - len(self.frames)
        inbox = self.player._inbox
        read_soon = self.read_soon
        fut: concurrent.futures.Future[Any]
        started = time.perf_counter()
        if read_soon is not None:
            fut = read_soon(count)
        else:
            try:
                fut = (self.player._executor or _default_executor()).submit(
                    _read_chunk, source, count
                )
            except RuntimeError as exc:  # submit raises nothing else: the executor is shut down
                self.reading = False
                self._executor_gone(_ExecutorGone(str(exc)))
                return

        def done(ended: concurrent.futures.Future[Any]) -> None:
            # In the thread that finished the read; the loop gets it through the inbox.
            if ended.cancelled():
                return  # an executor shut down with the job still queued: the player is closing
            exc = ended.exception()
            if exc is not None:
                inbox.put(_Entry._read_done, self, None, exc)
                return
            value = ended.result()
            if read_soon is not None:  # frames alone: add what _read_chunk adds to them
                value = (value, source.position, source.duration, time.perf_counter() - started)
            inbox.put(_Entry._read_done, self, value, None)

        self.inflight = fut
        fut.add_done_callback(done)

    def _read_done(self, value: _Chunk | None, exc: BaseException | None) -> None:
        """A read sent by ``refill`` returned (on the loop)."""
        self.reading = False
        if self.closed:
            return  # close() closes the source once the read is done
        if exc is not None:
            if isinstance(exc, RuntimeError) and _shut_down(exc):
                exc = _ExecutorGone(str(exc))
            self.read_error = exc  # raised in the feeder, which handles it as its own reads'
            self.wake.set()
            return
        assert value is not None
        self._apply_read(value)
        self.player._on_entry_update(self)
        if self.ops:
            self.wake.set()

    def _apply_read(self, chunk: _Chunk) -> None:
        frames, position, duration, spent = chunk
        if frames:
            player = self.player
            player._encode_times.append(spent / len(frames))
            self.reopens = 0
            if player._cur is self:  # per read, for the measured rate in the too-slow report
                player._supply.deliver(player._now(), len(frames) * FRAME_INTERVAL)
        self.frames.extend(frames)
        self.read_position = position
        self.duration = duration if duration is not None else self.track.duration
        if not frames:
            self.eof = True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.task.cancel()
        self._settle_ops(_gone(self.track))
        source = self.source
        if source is None:
            return
        inflight = self.inflight
        if inflight is not None and not inflight.done():
            # Never call close while a read runs in the worker; close right after it (in the
            # worker: FrameSource.close does not block).
            inflight.add_done_callback(lambda _f: source.close())
        else:
            source.close()

    # -- the feeder task ---------------------------------------------------------------------

    async def _run(self, start: float) -> None:
        player = self.player
        try:
            source: FrameSource | None = await self._open(start)
        except LegatoError as exc:
            self._fail(exc)
            return
        except _ExecutorGone as exc:
            self._executor_gone(exc)
            return
        while source is not None:
            if self.closed:  # closed while the opener was returning
                source.close()
                return
            self.source = source
            self.read_soon = source.read_soon if isinstance(source, ReadsSoon) else None
            try:
                if player._volume != 1.0:
                    await self._call(source.set_volume, player._volume)
                await self._feed(source)
            except asyncio.CancelledError:
                raise
            except StreamLost as exc:
                source = await self._reopen(source, exc)
            except LegatoError as exc:
                self._fail(exc)
                return
            except _ExecutorGone as exc:
                self._executor_gone(exc)
                return
            except Exception as exc:  # noqa: BLE001 - logged with traceback, reported as TrackFailed
                player._log.exception("reading %s failed unexpectedly", self.track.url)
                self._fail(DecodeError(f"reading {self.track.url} failed: {exc!r}"))
                return

    async def _open(self, start: float) -> FrameSource:
        """Open the track at ``start`` with the player's opener (unexpected errors wrapped)."""
        try:
            return await self.player._opener(self.track, start)
        except (asyncio.CancelledError, LegatoError):
            raise
        except Exception as exc:  # logged with traceback, re-raised as AudioError (TrackFailed)
            if isinstance(exc, RuntimeError) and _shut_down(exc):
                raise _ExecutorGone(str(exc)) from exc
            self.player._log.exception("opening %s failed unexpectedly", self.track.url)
            raise AudioError(f"opening {self.track.url} failed: {exc!r}") from exc

    async def _reopen(self, old: FrameSource, lost: StreamLost) -> FrameSource | None:
        """The stream broke off: open the track again (the opener resolves a fresh stream URL)
        where the frames read so far end, so the buffered frames run straight into the new ones.

        At most ``max_reopens`` tries without audio in between; then the track fails with the
        last error. Returns the new source, or None once the track has failed.
        """
        player = self.player
        self.source = None
        old.close()  # no read is in flight: the one that raised has returned
        error: LegatoError = lost
        while self.reopens < player._max_reopens:
            self.reopens += 1
            player._reopens += 1
            player._log.warning(
                "track %r broke off at %.2fs (%s); reopening (try %d of %d)",
                self.track.title,
                self.read_position,
                error,
                self.reopens,
                player._max_reopens,
            )
            try:
                return await self._open(self.read_position)
            except LegatoError as exc:
                error = exc
        self._fail(error)
        return None

    async def _feed(self, source: FrameSource) -> None:
        player = self.player
        cap, low = player._cap, player._low
        while True:
            if self.read_error is not None:
                error, self.read_error = self.read_error, None
                raise error
            # While a read sent by refill() is out, nothing else may touch the source: wait for
            # it (it wakes the feeder when a request waits or it failed).
            while self.ops and not self.reading:
                op = self.ops[0]
                try:
                    if op.kind == "seek":
                        position = await self._call(_seek_and_tell, source, op.value)
                        # Everything buffered is from before the seek. Until here the old
                        # frames kept playing, so a seek that fails leaves no hole.
                        self.base, self.sent, self.read_position = position, 0, position
                        self.frames.clear()
                        self.eof = False
                        if player._cur is self:
                            player._in_underrun = True  # the refill gap is not the source's fault
                    else:
                        await self._call(source.set_volume, op.value)
                except LegatoError as exc:
                    self.ops.popleft()
                    if not op.done.done():
                        op.done.set_exception(exc)
                    continue
                self.ops.popleft()
                if not op.done.done():
                    op.done.set_result(None)
            if not self.eof and len(self.frames) <= low and not self.ops and not self.reading:
                self._apply_read(await self._call(_read_chunk, source, cap - len(self.frames)))
                player._on_entry_update(self)
                continue
            self.wake.clear()
            self.parked = True
            try:
                await self.wake.wait()
            finally:
                self.parked = False

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the executor and await its result.

        Lighter than ``run_in_executor`` + ``shield`` (this runs every few frames per player):
        one loop future, its result handed back through the loop's ``_Inbox``. A cancel leaves
        the job running; its concurrent future stays in ``inflight`` so ``close`` can wait for
        it.
        """
        result: asyncio.Future[T] = self.player._loop.create_future()
        inbox = self.player._inbox

        def job() -> None:
            try:
                value = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting feeder
                inbox.put(_settle, result, None, exc)
            else:
                inbox.put(_settle, result, value, None)

        try:
            inflight = self.inflight = (self.player._executor or _default_executor()).submit(job)
        except RuntimeError as exc:  # submit raises nothing else: the executor is shut down
            raise _ExecutorGone(str(exc)) from exc
        try:
            return await result
        except RuntimeError as exc:
            if _shut_down(exc):  # a decode pool shut down under the source (see make_opener)
                raise _ExecutorGone(str(exc)) from exc
            raise
        finally:
            if inflight.done():
                self.inflight = None

    def _executor_gone(self, exc: _ExecutorGone) -> None:
        """The executor was shut down under the track (its owner is unloading): nothing more
        can be read or opened, so the track ends as a closed one does, without a failure."""
        self.player._log.info("%r stops: the player is closing (%s)", self.track.title, exc)
        self.close()

    def _fail(self, error: LegatoError) -> None:
        self.error = error
        self.eof = True
        self._settle_ops(error)
        self.player._on_entry_update(self)

    def _settle_ops(self, error: LegatoError) -> None:
        while self.ops:
            op = self.ops.popleft()
            if not op.done.done():
                op.done.set_exception(error)


class _ExecutorGone(Exception):
    """The executor refused work: it was shut down (the player's owner is going away)."""


def _shut_down(exc: RuntimeError) -> bool:
    """Whether ``exc`` is an executor's refusal after ``shutdown()`` (from ``run_in_executor``
    deeper down, e.g. in the opener's resolver)."""
    return "after shutdown" in str(exc) or "after interpreter shutdown" in str(exc)


class _Gone(AudioError):
    """A request reached a track that was closed (skipped, finished) before it ran."""


def _gone(track: Track) -> AudioError:
    return _Gone(
        f"track {track.uid} closed before the request ran",
        user_message="The track changed before that could be done.",
    )


class _Inbox:
    """Results of executor jobs on their way to the loop, handed over in batches.

    A job's ``call_soon_threadsafe`` writes to the loop's self-pipe, and the worker thread then
    takes the GIL back from the loop, which waits for it. With hundreds of players refilling,
    that is thousands of wake-ups a second; here a result is appended under a lock and only the
    first one since the loop last drained wakes it. A busy loop drains many at once.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[
            tuple[Callable[[Any, Any, BaseException | None], None], Any, Any, BaseException | None]
        ] = []
        self._woken = False
        self._reads: list[_Entry] = []

    def submit_soon(self, entry: _Entry) -> None:
        """Have ``entry._submit_read()`` called right after the loop's current callback, with
        every other read asked for meanwhile (on the loop)."""
        if not self._reads:
            self._loop.call_soon(self._submit_reads)
        self._reads.append(entry)

    def _submit_reads(self) -> None:
        entries, self._reads = self._reads, []
        for entry in entries:
            entry._submit_read()

    def put(
        self,
        deliver: Callable[[Any, Any, BaseException | None], None],
        target: Any,
        value: Any,
        exc: BaseException | None,
    ) -> None:
        """Call ``deliver(target, value, exc)`` on the loop (from any thread)."""
        with self._lock:
            self._items.append((deliver, target, value, exc))
            if self._woken:
                return
            self._woken = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: no one awaits these results any more
            _log.debug("result of an executor job dropped: its event loop is closed")

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._woken = False
        for deliver, target, value, exc in items:
            try:
                deliver(target, value, exc)
            except Exception:  # noqa: BLE001 - one broken delivery must not lose the others
                _log.exception("delivering an executor job's result failed")


def _settle(fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(value)
    else:
        fut.set_exception(exc)


_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Inbox] = weakref.WeakKeyDictionary()


def _inbox(loop: asyncio.AbstractEventLoop) -> _Inbox:
    inbox = _inboxes.get(loop)
    if inbox is None:
        inbox = _inboxes[loop] = _Inbox(loop)
    return inbox


_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _default_executor() -> concurrent.futures.Executor:
    """The players' shared pool when none is given: a few threads are plenty (reads are short)."""
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(8, (os.cpu_count() or 1) + 2), thread_name_prefix="legato-audio"
        )
    return _pool


#: What ``_read_chunk`` returns: frames, read position, duration, seconds the read took.
_Chunk = tuple[list[bytes], float, float | None, float]


def _read_chunk(source: FrameSource, count: int) -> _Chunk:
    """Read up to ``count`` frames (in the worker); also return the seconds the read took."""
    started = time.perf_counter()
    frames = source.read(count)
    return frames, source.position, source.duration, time.perf_counter() - started


def _seek_and_tell(source: FrameSource, seconds: float) -> float:
    source.seek(seconds)
    return source.position


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
        #: The loop's hand-off of executor results (and of refill reads to the executor).
        self._inbox = _inbox(self._loop)
        self._sink = sink
        self._opener = opener
        self._queue = queue if queue is not None else TrackQueue()
        self._executor = executor
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
        if clock is None:
            self._now: Callable[[], float] = self._loop.time
            self._call_at: Callable[[float, Callable[[], None]], _Cancellable] = slot_timers(
                self._loop
            ).call_at
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
        self._state = PlayerState.IDLE
        self._waiters: list[tuple[PlayerState, asyncio.Future[None]]] = []
        self._cur: _Entry | None = None
        self._next: _Entry | None = None
        self._timer: _Cancellable | None = None
        self._timer_when = math.nan
        self._speaking_task: asyncio.Task[None] | None = None
        #: Waits for the sink's gate while the track is held (see ``_hold``).
        self._hold_task: asyncio.Task[None] | None = None
        self._hold_since = 0.0
        self._pumping = False
        self._repump = False
        self._in_underrun = False
        self._fail_streak = 0
        self._closing: list[asyncio.Task[None]] = []
        self._inflight: list[concurrent.futures.Future[None]] = []
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
        return self._state

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
        if self._state is state:
            return
        future: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append((state, future))
        try:
            await future
        finally:
            self._waiters = [w for w in self._waiters if w[1] is not future]

    # -- commands ------------------------------------------------------------------------------

    def start(self) -> bool:
        """Start playing the queue (its current track, else the next one) if idle.

        Returns:
            False when already busy or when there is nothing to play.
        """
        self._check_open()
        if self._state is not PlayerState.IDLE:
            return False
        track = self._queue.current or self._queue.advance()
        if track is None:
            return False
        self._transition(PlayerState.LOADING, reason="start")
        self._begin(track)
        self._pump()
        return True

    def pause(self) -> bool:
        """Pause; five silence frames then speaking off. Returns False if nothing is playing."""
        self._check_open()
        if self._state not in _WANTED:
            return False
        self._transition(PlayerState.PAUSED, reason="pause")
        self._pump()
        return True

    def resume(self) -> bool:
        """Resume after ``pause``. Returns False if not paused."""
        self._check_open()
        if self._state is not PlayerState.PAUSED:
            return False
        cur = self._cur
        ready = cur is not None and bool(cur.frames)
        self._transition(PlayerState.PLAYING if ready else PlayerState.LOADING, reason="resume")
        self._pump()
        return True

    def stop(self) -> bool:
        """Stop and drop the current track (to the history); the queue stays.

        Returns:
            False if nothing was playing.
        """
        self._check_open()
        if self._state is PlayerState.IDLE:
            return False
        self._end_current(EndReason.STOPPED)
        self._queue.finish_current()
        self._drop_next()
        self._transition(PlayerState.IDLE, reason="stop")
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
        if self._state is PlayerState.IDLE:
            self._transition(PlayerState.LOADING, reason="previous")
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
        await cur.request("seek", max(0.0, seconds))

    async def set_volume(self, volume: float) -> None:
        """Change the volume of this and later tracks.

        Anything but 1.0 makes the source decode and re-encode (no passthrough). Frames already
        buffered (up to ``buffer_ms``) keep the old volume.

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
            nxt.request("volume", volume).add_done_callback(_retrieve)
            nxt.request("seek", nxt.base).add_done_callback(_retrieve)
        if self._cur is not None:
            # If the track changes meanwhile, the next one opens at the new volume anyway.
            with contextlib.suppress(_Gone):
                await self._cur.request("volume", volume)

    async def close(self) -> None:
        """Stop everything: cancel every task, close every source. Safe to call twice."""
        if self._state is PlayerState.CLOSED:
            return
        self._end_current(EndReason.CLOSED)
        self._drop_next()
        self._transition(PlayerState.CLOSED, reason="close")
        for state, future in self._waiters:
            if not future.done():
                future.set_exception(InvalidTransition(PlayerState.CLOSED, state))
        self._cancel_timer()
        tasks: list[asyncio.Future[Any]] = []
        for task in (self._speaking_task, self._hold_task):
            if task is not None:
                task.cancel()
                tasks.append(task)
        tasks.extend(self._closing)
        inflight = [f for f in self._inflight if not f.done()]
        self._closing.clear()
        self._inflight.clear()
        if tasks or inflight:
            await asyncio.wait([*tasks, *(asyncio.wrap_future(f) for f in inflight)])

    # -- track changes -----------------------------------------------------------------------

    def _retire(self, entry: _Entry) -> None:
        """Close an entry, keeping its task and in-flight read until ``close()`` waits for them."""
        self._closing = [t for t in self._closing if not t.done()]
        self._inflight = [f for f in self._inflight if not f.done()]
        if entry.inflight is not None and not entry.inflight.done():
            self._inflight.append(entry.inflight)
        entry.close()
        if not entry.task.done():
            self._closing.append(entry.task)

    def _end_current(self, reason: EndReason) -> None:
        cur, self._cur = self._cur, None
        if cur is None:
            return
        self._retire(cur)
        if cur.started:
            self._emit(TrackEnded(cur.track, reason))

    def _drop_next(self) -> None:
        nxt, self._next = self._next, None
        if nxt is not None:
            self._retire(nxt)

    def _begin(self, track: Track | None) -> None:
        """Make ``track`` current (the preloaded entry when it is that track), or end the queue."""
        if track is None:
            self._drop_next()
            if self._state is not PlayerState.IDLE:
                self._transition(PlayerState.IDLE, reason="queue ended")
            self._emit(QueueEnded())
            return
        nxt = self._next
        if nxt is not None and nxt.track == track:
            self._next, entry = None, nxt
        else:
            self._drop_next()
            entry = _Entry(self, track, 0.0)
        self._cur = entry
        self._in_underrun = False
        self._supply.reset(self._now())  # the last track's supply says nothing about this one
        if self._state in _WANTED:
            target = PlayerState.PLAYING if entry.frames else PlayerState.LOADING
            if target is not self._state:
                self._transition(target, reason=f"track {track.uid}")
        self._watch_supply()

    def _ensure_preload(self) -> None:
        """Open the track that comes next, unless it is already open (or the queue changed)."""
        predicted = self._queue.peek_next()
        if self._next is not None and self._next.track == predicted:
            return
        self._drop_next()
        if predicted is not None:
            self._next = _Entry(self, predicted, 0.0)

    def _finish_current(self) -> None:
        """The current entry is exhausted (or failed): report it and move on."""
        cur = self._cur
        assert cur is not None
        if cur.error is None:
            self._end_current(EndReason.FINISHED)
            self._begin(self._queue.advance())
            return
        self._cur = None
        self._retire(cur)
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

    def _on_entry_update(self, entry: _Entry) -> None:
        if self._state is PlayerState.CLOSED or entry is not self._cur:
            return
        if entry.error is None and (
            entry.eof
            or (
                entry.duration is not None
                and entry.duration - entry.read_position <= self._preload_s
            )
        ):
            self._ensure_preload()
        if entry.frames and self._state in _STARVED:
            self._transition(PlayerState.PLAYING, reason="frames ready")
        if (
            self._timer is not None
            and self._state is PlayerState.PLAYING
            and entry.started
            and entry.error is None
            and len(entry.frames) > 1
        ):
            return  # a refill mid-track: the armed frame timer sends them (perf, issue #14)
        self._pump()

    # -- the send path (timer callback; must stay cheap) -----------------------------------

    def _pump(self) -> None:
        if self._pumping:
            self._repump = True
            return
        if (
            self._speaking_task is not None
            or self._hold_task is not None
            or self._state is PlayerState.CLOSED
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
            if cur is not None and cur.eof and not cur.frames and not cur.ops:
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
                frames = cur.frames
                if not cur.started:
                    cur.started = True
                    self._fail_streak = 0
                    self._emit(TrackStarted(cur.track))
                if frames and self._cur is cur and pacer.playing:
                    # Steady state: nothing else can be due before the next frame's deadline,
                    # so skip the second poll (this path runs 50 times a second per player).
                    self._arm(pacer.sent_at(self._now()))
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
                if self._state is PlayerState.PLAYING:
                    self._transition(PlayerState.BUFFERING, reason="buffer ran dry")
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
        if cur is not None and self._state in _STARVED:
            now = self._now()
            # The stall rule is for a track that has played; one still opening has the limit.
            supply.starve(now, stall=self._state is PlayerState.BUFFERING and cur.started)
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
        if cur is None or cur.eof or cur.closed or self._state not in _STARVED:
            return
        now = self._now()
        report = self._supply.check(now)
        if report.verdict is Supply.OK:
            self._watch_supply()
            return
        cur._fail(_supply_error(cur, report, self._supply.limit))

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
        self._timer = self._call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
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
            deadline = self._pacer.send_due(now)
            if deadline is not None:
                self._sent_audio(cur)
                if self._now() - now > _HELD_UP:  # preempted before the send: gap from it
                    deadline = self._pacer.sent_at(self._now()) or deadline
                self._timer_when = deadline
                self._timer = self._call_at(deadline, self._on_timer)
                return
        self._pump()

    def _sent_audio(self, cur: _Entry) -> None:
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
            self._hist[min(int(late / _HIST_BIN), _HIST_SIZE - 1)] += 1
            if late > LATE_THRESHOLD:
                self._late += 1
            if late > self._max_late:
                self._max_late = late
        else:
            self._hist[0] += 1
        if len(frames) <= self._low:
            cur.refill()

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

    def _transition(self, new: PlayerState, *, reason: str) -> None:
        if new not in _ALLOWED[self._state]:
            raise InvalidTransition(self._state, new)
        self._log.debug("%s -> %s (%s)", self._state.name, new.name, reason)
        old, self._state = self._state, new
        if new is PlayerState.PLAYING or new is PlayerState.BUFFERING:
            self._pacer.play()  # BUFFERING keeps the grid and speaking: silence stands in
        else:
            self._pacer.stop()
        if old not in _WANTED or new not in _WANTED:
            # Paused, stopped or resumed: the judge starts afresh (a pause is no one's delay).
            self._supply.reset(self._now())
        self._watch_supply()
        for state, future in self._waiters:
            if state is new and not future.done():
                future.set_result(None)

    def _check_open(self) -> None:
        if self._state is PlayerState.CLOSED:
            raise InvalidTransition(self._state, "command on a closed player")

    def _emit(self, event: PlayerEvent) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:  # noqa: BLE001 - logged with traceback below
            # A listener's bug must not stop the music; it is logged with its traceback.
            self._log.exception("on_event handler failed for %r", event)


def _supply_error(cur: _Entry, report: SupplyReport, limit: float) -> LegatoError:
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


def make_opener(
    resolver: Resolver,
    *,
    opus: OpusSettings | None = None,
    executor: Executor | None = None,
    timeout: float | None = None,
    pool: DecodePool | None = None,
    threads_first: int = 0,
) -> SourceOpener:
    """A ``SourceOpener`` that resolves the track's stream URL again and opens it.

    Stream URLs expire, so they are fetched at play time (``resolver.stream``), then
    ``open_source`` runs in ``executor``; a source that finishes opening after the caller gave
    up (the player skipped or closed) is closed, not leaked.

    Args:
        resolver: Gives ``await stream(track)`` (a ``StreamInfo``).
        opus: Encoder settings for sources that cannot pass Opus through.
        executor: Where ``open_source`` runs (``None``: the loop's default).
        timeout: Seconds a stream may take to open, and any one read of it (a stalled server
            fails the track after this); ``None``: the decoder's ``DEFAULT_TIMEOUT``.
        pool: Open (and so decode and encode) in these worker processes instead of in this
            process; the open still waits in ``executor``. ``None``: in this process.
        threads_first: With a pool, open in this process while fewer than this many sources
            opened here are decoding (not passing Opus through), and streams that are Opus
            (likely passed through, which costs next to nothing) or of an unknown codec
            always; the rest in the pool. A few transcodes stay cheap in threads and a small
            bot never starts a worker; many would hold the interpreter lock the event loop
            needs to send. 0: everything in the pool.
    """
    from legato.audio.decode import DEFAULT_TIMEOUT, open_source

    limit = DEFAULT_TIMEOUT if timeout is None else timeout
    local: weakref.WeakSet[FrameSource] = weakref.WeakSet()

    def in_process(info: StreamInfo) -> bool:
        if pool is None:
            return True
        if threads_first <= 0:
            return False
        if info.codec in (None, "opus"):
            return True
        decoding = sum(1 for s in list(local) if not s.passthrough and not _closed(s))
        return decoding < threads_first

    async def open_track(track: Track, start: float) -> FrameSource:
        info = await resolver.stream(track)
        here = in_process(info)
        opener: Callable[..., FrameSource] = open_source if here or pool is None else pool.open
        fut = asyncio.get_running_loop().run_in_executor(
            executor, lambda: opener(info, start=start, opus=opus, timeout=limit)
        )
        try:
            source = await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(_close_result)
            raise
        if here:
            local.add(source)
        return source

    return open_track


def _closed(source: FrameSource) -> bool:
    return bool(getattr(source, "closed", False))


def _close_result(fut: asyncio.Future[FrameSource]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().close()


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()  # marks it retrieved: an unawaited request's error is not an error here
