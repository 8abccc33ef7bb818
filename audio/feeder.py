"""The one read path: a player's feeder keeps each open track's buffer filled.

A player has one :class:`Feeder`, and each track it has open (the current one, and the next
once preloaded) an :class:`Entry`: its :class:`~legato.audio.source.FrameReader`, its buffered
frames and where they end. The feeder is the only caller of a reader, one call at a time per
entry (an open, a read, a seek or a volume change), and every call is the same shape: started
on the loop, awaited through the reader's awaitable, applied on the loop when it comes back.
Where the work runs (an executor thread, a decode worker process) is the reader's business, and
so errors come back one way: the awaitable raises the ``legato.errors`` class.

- **Reads.** An entry is read whenever its buffer is at or below the player's low-water mark, up
  to ``cap`` frames (``passthrough_cap`` once it started, while its reader passes Opus through);
  the read's result is applied in its done-callback, which reads again at once if the buffer is
  still low. The send path never starts a read: when a frame it takes leaves the buffer low it
  calls :meth:`Feeder.wake`, which notes the entry, and the feeder starts the reads noted in one
  callback after the timer slot's (the sends of a slot are not interleaved with worker
  wake-ups). Not a task step per refill: one per refill at 256 players cost 10-20 % more CPU per
  stream than this (``bench/bench_player.py``, measured side by side).
- **Tasks.** Opening a track is the one call that is a coroutine (the opener resolves, then
  opens): each open runs in a task the feeder owns, cancelled when its entry is retired and
  awaited by :meth:`Feeder.close`.
- **Requests.** Seek and volume requests queue on the entry and run between reads. A seek
  drops the frames buffered before it only once it succeeded, so a seek that fails leaves no
  hole.
- **Trims.** A volume change must be heard within ``cap`` frames (``buffer_ms``), but a
  passthrough entry may hold up to ``passthrough_cap``. So before a volume change runs on an
  entry holding more than ``cap`` frames, the reader is sought back to where the first ``cap``
  of them end, and only once that seek succeeded are the frames after that point dropped (the
  reader reads them again, at the new volume). A source that cannot seek keeps its buffer whole
  and the change is heard after it; a seek that outlasts the kept frames puts the reader back
  where the buffer ends, so no frame is lost or sent twice either way.
- **Opening and reopening.** An entry opens through the player's opener (:mod:`.opener`) in a
  task the feeder owns. A stream that breaks off mid-track (``StreamLost``) is opened again
  where its frames end, with its stream dropped so that the opener resolves a fresh URL: the
  buffered frames run straight into the new ones. ``max_reopens`` tries without audio in
  between, then the track fails.
- **Closing.** A closed entry's reader is closed (after a call still running, if any); an
  executor or pool shut down under it (``ShutDown``) ends it quietly, as a closing player does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from legato.audio.handoff import Completion, completion
from legato.audio.pacer import FRAME_INTERVAL
from legato.audio.source import Chunk, FrameReader, ShutDown, StreamLost, ThreadedReader
from legato.audio.track import Track
from legato.errors import AudioError, DecodeError, LegatoError

if TYPE_CHECKING:
    from legato.audio.opener import SourceOpener
    from legato.log import GuildLogger

__all__ = ["Entry", "Feeder", "TrackClosed"]

_log = logging.getLogger(__name__)


class TrackClosed(AudioError):
    """A request reached a track that was closed (skipped, finished) before it ran."""

    default_user_message = "The track changed before that could be done."


@dataclass
class _Op:
    #: ``trim``: seek the reader back to ``value`` and drop the frames buffered after it (see
    #: the module docstring, "Trims").
    kind: Literal["seek", "volume", "trim"]
    value: float
    #: Who waits for it; ``None``: nobody (the volume set on opening: its failure fails the
    #: track; a trim).
    done: asyncio.Future[None] | None
    #: A volume change: its trim ran (or was not needed).
    trimmed: bool = False


class Entry:
    """One opened (or opening) track: its reader, its buffered frames and where they are.

    Attributes:
        track: The track.
        frames: Opus frames read and not yet sent.
        eof: No more frames will be read (the end, or the track failed: see ``error``).
        error: Why the track failed, if it did.
        base: Seconds at which the ``sent`` count starts (the last seek's position).
        sent: Frames sent since ``base``.
        started: Its first frame was sent.
        closed: Closed for good (skipped, finished, the player closing).
        duration: Length as the source reports it (else the track's metadata's), if known.
        read_position: Seconds at which the frames read so far end.
    """

    def __init__(self, track: Track, start: float) -> None:
        self.track = track
        self.frames: deque[bytes] = deque()
        self.eof = False
        self.error: LegatoError | None = None
        self.base = start
        self.sent = 0
        self.started = False
        self.closed = False
        self.duration: float | None = track.duration
        self.read_position = start
        self.reader: FrameReader | None = None
        self.ops: deque[_Op] = deque()
        #: The one call out on this entry (an open task, or a reader's call).
        self.busy: Completion[Any] | None = None
        #: Open (again) at ``read_position`` when nothing is busy.
        self.need_open = True
        self.reopens = 0  # reopens since the stream last gave audio

    @property
    def pending(self) -> bool:
        """A seek or volume request is waiting to run."""
        return bool(self.ops)


#: Per loop, the feeders the send path woke since the loop last ran
#: :func:`_read_low_feeders` (one callback a slot for all of them).
_LOW_FEEDERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[Feeder]] = (
    weakref.WeakKeyDictionary()
)


def _read_low_feeders(loop: asyncio.AbstractEventLoop) -> None:
    feeders = _LOW_FEEDERS.get(loop)
    if not feeders:
        return
    _LOW_FEEDERS[loop] = []
    for feeder in feeders:
        feeder._read_low()


class Feeder:
    """Fills the buffers of one player's open tracks (see the module docstring).

    Args:
        opener: Opens a track at a start position.
        executor: Reads a blocking ``FrameSource`` an opener returns (``None``: the players'
            shared pool).
        cap: Frames buffered at most.
        low: Read when this many frames or fewer are buffered.
        passthrough_cap: Frames buffered at most while the reader passes Opus through and
            the entry has started (its reads cost microseconds; what costs is each hand-off,
            so fewer, larger ones). A volume change first cuts such a buffer back to ``cap``
            (see "Trims"). ``None``: ``cap``.
        max_reopens: Tries to reopen a stream that broke off, without audio in between.
        volume: Gives the player's volume (applied to every track opened).
        on_update: Called with an entry after frames came, it ended or failed.
        on_chunk: Called with an entry and each read that gave frames (stats, supply).
        on_seek: Called with an entry after a seek dropped its buffer.
        on_reopen: Called before each reopen try.
        log: The player's logger.
    """

    def __init__(
        self,
        opener: SourceOpener,
        *,
        executor: Executor | None,
        cap: int,
        low: int,
        passthrough_cap: int | None = None,
        max_reopens: int,
        volume: Callable[[], float],
        on_update: Callable[[Entry], None],
        on_chunk: Callable[[Entry, Chunk], None],
        on_seek: Callable[[Entry], None],
        on_reopen: Callable[[Entry], None],
        log: GuildLogger,
    ) -> None:
        self._opener = opener
        self._executor = executor
        self._cap = cap
        self._low = low
        self._passthrough_cap = cap if passthrough_cap is None else max(cap, passthrough_cap)
        self._max_reopens = max_reopens
        self._volume = volume
        self._on_update = on_update
        self._on_chunk = on_chunk
        self._on_seek = on_seek
        self._on_reopen = on_reopen
        self._log = log
        self._loop = asyncio.get_running_loop()
        self._entries: list[Entry] = []
        #: Entries whose buffer the send path found low (read by ``_read_low``).
        self._low_entries: list[Entry] = []
        #: What closed entries still have running (open tasks, executor jobs): ``close`` waits.
        self._closing: list[asyncio.Future[Any]] = []
        self._jobs: list[concurrent.futures.Future[Any]] = []

    # -- the player's calls (on the loop) -----------------------------------------------------

    def open(self, track: Track, start: float = 0.0) -> Entry:
        """Open ``track`` at ``start`` seconds and start filling its buffer."""
        entry = Entry(track, start)
        self._entries.append(entry)
        self._step(entry)
        return entry

    def wake(self, entry: Entry) -> None:
        """The send path took frames and ``entry``'s buffer is low: have it read right after
        the current callback. Cheap; never starts a read itself."""
        if entry.busy is not None or entry.eof:
            return  # a call is out: its completion reads again if need be
        if not self._low_entries:
            waiting = _LOW_FEEDERS.get(self._loop)
            if waiting is None:
                waiting = _LOW_FEEDERS[self._loop] = []
            if not waiting:
                # One callback for every feeder of the loop woken in this slot, not one each.
                self._loop.call_soon(_read_low_feeders, self._loop)
            waiting.append(self)
        self._low_entries.append(entry)

    def request(
        self, entry: Entry, kind: Literal["seek", "volume"], value: float
    ) -> Awaitable[None]:
        """Queue a seek or volume change on ``entry``; the awaitable ends when it has run."""
        done: asyncio.Future[None] = self._loop.create_future()
        if entry.closed:
            done.set_exception(_closed(entry.track))
            return done
        entry.ops.append(_Op(kind, value, done))
        self._step(entry)
        return done

    def fail(self, entry: Entry, error: LegatoError) -> None:
        """End ``entry`` with ``error`` (it is reported when the player gets to it)."""
        entry.error = error
        entry.eof = True
        _settle_ops(entry, error)
        self._on_update(entry)

    def retire(self, entry: Entry) -> None:
        """Close ``entry`` for good, keeping what still runs for it until :meth:`close`."""
        if entry in self._entries:
            self._entries.remove(entry)
        if entry.closed:
            return
        entry.closed = True
        _settle_ops(entry, _closed(entry.track))
        self._closing = [f for f in self._closing if not f.done()]
        self._jobs = [j for j in self._jobs if not j.done()]
        busy = entry.busy
        if isinstance(busy, asyncio.Task) and not busy.done():
            busy.cancel()  # an open: the opener closes what it opens after the cancel
            self._closing.append(busy)
        reader = entry.reader
        entry.reader = None
        if reader is not None:
            if isinstance(reader, ThreadedReader) and reader.inflight is not None:
                self._jobs.append(reader.inflight)
            reader.close()

    async def close(self) -> None:
        """Close every entry; waits for what still runs for them (opens, executor jobs)."""
        for entry in list(self._entries):
            self.retire(entry)
        waits: list[asyncio.Future[Any]] = list(self._closing)
        waits.extend(asyncio.wrap_future(j) for j in self._jobs if not j.done())
        self._closing.clear()
        self._jobs.clear()
        if waits:
            await asyncio.wait(waits)

    def _read_low(self) -> None:
        """Start the reads the send path asked for since the last time."""
        entries, self._low_entries = self._low_entries, []
        for entry in entries:
            self._step(entry)

    # -- one call at a time per entry -------------------------------------------------------

    def _step(self, entry: Entry) -> None:
        """Start the entry's next call, if it needs one and none is out."""
        if entry.closed or entry.busy is not None or entry.error is not None:
            return
        reader = entry.reader
        if reader is None:
            if entry.need_open:
                entry.need_open = False
                entry.busy = self._loop.create_task(
                    self._open(entry), name=f"legato-open-{entry.track.uid}"
                )
                entry.busy.add_done_callback(lambda t: self._opened(entry, t))
            return
        if entry.ops:
            op = entry.ops[0]
            if op.kind == "volume" and not op.trimmed:
                op.trimmed = True
                trim = self._trim_for(entry)
                if trim is not None:
                    entry.ops.appendleft(op := trim)
            call: Awaitable[Any] = (
                reader.volume_to(op.value) if op.kind == "volume" else reader.seek_to(op.value)
            )
            busy = entry.busy = completion(call)
            busy.add_done_callback(lambda f: self._op_done(entry, op, f))
            return
        if not entry.eof and len(entry.frames) <= self._low:
            # A track's first fill (and a preloaded one's) is ``cap``: no later start.
            cap = self._passthrough_cap if reader.passthrough and entry.started else self._cap
            read = entry.busy = completion(reader.read_chunk(cap - len(entry.frames)))
            read.add_done_callback(lambda f: self._read_done(entry, f))

    def _trim_for(self, entry: Entry) -> _Op | None:
        """The trim a volume change at the front of ``entry``'s requests needs first, if any:
        more than ``cap`` frames are buffered (passthrough reads) and no seek queued behind it
        drops them anyway."""
        extra = len(entry.frames) - self._cap
        if extra <= 0 or any(op.kind == "seek" for op in entry.ops):
            return None
        return _Op("trim", entry.read_position - extra * FRAME_INTERVAL, None)

    def _trimmed(self, entry: Entry, op: _Op, position: float) -> None:
        """A trim's seek succeeded and the reader reads from ``position`` on: drop the frames
        buffered from there on (the reader gives them again)."""
        frames = entry.frames
        first = entry.read_position - len(frames) * FRAME_INTERVAL  # where the unsent frames start
        keep = round((position - first) / FRAME_INTERVAL)
        if keep < 0 and op.value < entry.read_position:
            # The seek took longer than the kept frames lasted: frames from after ``position``
            # were sent meanwhile. Put the reader back where the buffer ends (dropping nothing);
            # the change is heard after the buffer, as with a source that cannot seek.
            entry.ops.appendleft(_Op("trim", entry.read_position, None))
            return
        for _ in range(len(frames) - max(0, keep)):
            frames.pop()
        entry.read_position = position
        entry.eof = False

    async def _open(self, entry: Entry) -> FrameReader:
        """Open the entry's track where its frames end (unexpected errors wrapped)."""
        track = entry.track
        if entry.reopens:
            track = track.with_stream(None, None)  # the old stream broke off: resolve afresh
        try:
            opened = await self._opener(track, entry.read_position)
        except (asyncio.CancelledError, LegatoError, ShutDown):
            raise
        except Exception as exc:  # logged with traceback, re-raised as AudioError (TrackFailed)
            self._log.exception("opening %s failed unexpectedly", track.url)
            raise AudioError(f"opening {track.url} failed: {exc!r}") from exc
        if isinstance(opened, FrameReader):
            return opened
        return ThreadedReader(opened, self._executor)

    def _opened(self, entry: Entry, task: asyncio.Task[FrameReader]) -> None:
        entry.busy = None
        if task.cancelled():
            return
        exc = task.exception()
        if entry.closed:
            if exc is None:
                task.result().close()  # closed while the opener was returning
            return
        if exc is not None:
            self._failed(entry, exc, opening=True)
            return
        entry.reader = task.result()
        volume = self._volume()
        if volume != 1.0:
            entry.ops.appendleft(_Op("volume", volume, None))
        self._step(entry)

    def _read_done(self, entry: Entry, fut: Completion[Chunk]) -> None:
        entry.busy = None
        if entry.closed or fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self._failed(entry, exc, opening=False)
            return
        chunk = fut.result()
        if chunk.frames:
            entry.reopens = 0
            entry.frames.extend(chunk.frames)
            self._on_chunk(entry, chunk)
        else:
            entry.eof = True
        entry.read_position = chunk.position
        entry.duration = chunk.duration if chunk.duration is not None else entry.track.duration
        self._step(entry)
        self._on_update(entry)

    def _op_done(self, entry: Entry, op: _Op, fut: Completion[Any]) -> None:
        entry.busy = None
        if entry.closed or fut.cancelled():
            return
        if entry.ops and entry.ops[0] is op:
            entry.ops.popleft()
        exc = fut.exception()
        if exc is None:
            if op.kind == "trim":
                self._trimmed(entry, op, fut.result())
            elif op.kind == "seek":
                # Everything buffered is from before the seek. Until here the old frames kept
                # playing, so a seek that fails leaves no hole.
                position = fut.result()
                entry.base, entry.sent, entry.read_position = position, 0, position
                entry.frames.clear()
                entry.eof = False
                self._on_seek(entry)
            if op.done is not None and not op.done.done():
                op.done.set_result(None)
        elif isinstance(exc, LegatoError) and op.done is not None:
            if not op.done.done():
                op.done.set_exception(exc)
        elif op.kind == "trim" and isinstance(exc, LegatoError) and not isinstance(exc, StreamLost):
            # It cannot seek (a live stream): the buffer stays whole, the change comes after it.
            self._log.info(
                "could not cut %r's buffer for a volume change: %s", entry.track.title, exc
            )
        else:
            if op.done is not None and not op.done.done():
                op.done.set_exception(exc)
            self._failed(entry, exc, opening=False)
            return
        self._step(entry)
        self._on_update(entry)

    def _failed(self, entry: Entry, exc: BaseException, *, opening: bool) -> None:
        """What a call raised: reopen a lost stream, end quietly on a shut-down executor, else
        fail the track."""
        if isinstance(exc, ShutDown):
            self._log.info("%r stops: the player is closing (%s)", entry.track.title, exc)
            self.retire(entry)
            return
        if isinstance(exc, StreamLost) or (
            opening and entry.reopens and isinstance(exc, LegatoError)
        ):
            self._reopen(entry, exc)
            return
        if isinstance(exc, LegatoError):
            self.fail(entry, exc)
            return
        self._log.error(
            "reading %s failed unexpectedly",
            entry.track.url,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        self.fail(entry, DecodeError(f"reading {entry.track.url} failed: {exc!r}"))

    def _reopen(self, entry: Entry, error: BaseException) -> None:
        """The stream broke off (or a reopen failed): open it again where the frames read so
        far end, at most ``max_reopens`` times without audio in between; then fail."""
        reader, entry.reader = entry.reader, None
        if reader is not None:
            reader.close()  # no call is out: the one that raised has returned
        if entry.reopens >= self._max_reopens:
            assert isinstance(error, LegatoError)
            self.fail(entry, error)
            return
        entry.reopens += 1
        self._on_reopen(entry)
        self._log.warning(
            "track %r broke off at %.2fs (%s); reopening (try %d of %d)",
            entry.track.title,
            entry.read_position,
            error,
            entry.reopens,
            self._max_reopens,
        )
        entry.need_open = True
        self._step(entry)


def _closed(track: Track) -> AudioError:
    return TrackClosed(f"track {track.uid} closed before the request ran")


def _settle_ops(entry: Entry, error: LegatoError) -> None:
    while entry.ops:
        op = entry.ops.popleft()
        if op.done is not None and not op.done.done():
            op.done.set_exception(error)
