"""The seam between the decoder/encoder and the player: sources of 20 ms Opus frames.

Two layers:

- :class:`FrameSource`: a blocking pull source (the decoder's ``open_source`` gives one, and so
  does a test's scripted source). It runs off the loop, in a thread or a decode worker process.
- :class:`FrameReader`: what the player reads, whatever process does the work: one awaitable
  read (:meth:`FrameReader.read_chunk`) and one way errors come back (the awaitable raises the
  ``legato.errors`` class). :class:`ThreadedReader` reads a ``FrameSource`` in an executor;
  :class:`legato.audio.workers.WorkerSource` reads one living in a decode worker.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

from legato.audio.handoff import Pending, default_executor, inbox
from legato.errors import DecodeError

T = TypeVar("T")

SAMPLE_RATE: Final = 48_000
CHANNELS: Final = 2
FRAME_MS: Final = 20
FRAME_SAMPLES: Final = SAMPLE_RATE * FRAME_MS // 1000  # 960 per channel
FRAME_BYTES: Final = FRAME_SAMPLES * CHANNELS * 2  # s16 interleaved PCM, 3840 bytes


class StreamLost(DecodeError):
    """The stream broke off mid-track (refused, dropped, or ended short of its length).

    Stream URLs expire: a server that answered at first may refuse (403) or drop the connection
    later. Resolving the track again and reopening it where it stopped may continue it, so the
    player does that (a few times) before it gives up on the track.
    """

    default_user_message = "The connection to the track's server was lost."


class SourceTooSlow(DecodeError):
    """The track's source delivers audio much slower than real time (or none in time to start).

    Raised by the player's judge, not by a source: a slow server never fails a read, it only
    makes each one late (see :mod:`legato.audio.supply`). The player skips the track.
    """

    default_user_message = "The track's server is sending audio slower than real time."


class FrameSource(Protocol):
    """An opened track producing Opus frames.

    Every method but ``close`` may block (network, decode, encode) and is called off the event
    loop, from one worker at a time; the player never calls two methods concurrently.
    """

    @property
    def passthrough(self) -> bool:
        """True while the source's own Opus packets are sent unchanged."""

    @property
    def position(self) -> float:
        """Seconds of audio produced so far (of the next frame to be read)."""

    @property
    def duration(self) -> float | None:
        """Length in seconds when the container knows it."""

    def read(self, max_frames: int) -> list[bytes]:
        """Return up to ``max_frames`` Opus frames; an empty list means the track has ended.

        Raises:
            StreamLost: the stream broke off; the player reopens the track where it stopped.
            DecodeError: the stream failed; the player reports it and moves on.
        """

    def seek(self, seconds: float) -> None:
        """Move so that the next frame read starts at ``seconds``."""

    def set_volume(self, volume: float) -> None:
        """Scale the output; anything but 1.0 forces the decode-and-encode path."""

    def close(self) -> None:
        """Release the stream; safe to call twice."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """What one read gave: the frames (none: the track has ended) and the source's state after.

    Attributes:
        frames: 20 ms Opus frames, in order; empty at the end of the track.
        position: Seconds of audio read so far (of the next frame to be read).
        duration: Length in seconds when known.
        spent: Seconds the read took where it ran (decode and encode; for the stats).
    """

    frames: list[bytes]
    position: float
    duration: float | None
    spent: float


class ShutDown(RuntimeError):
    """The executor or decode pool that would run a source's work was shut down (its owner is
    unloading): nothing more can be opened or read. The player ends the track quietly.

    A ``RuntimeError``, as ``Executor.submit`` raises after ``shutdown()``, so callers that
    took that for "closing" still do.
    """


class FrameReader(abc.ABC):
    """The one read path's source: what the player's feeder reads 20 ms Opus frames from.

    Every method returns at once (on the event loop) and what it starts is awaited: the reader
    decides where the work runs (:class:`ThreadedReader`: an executor thread;
    :class:`~legato.audio.workers.WorkerSource`: a decode worker process). Errors come back
    through the awaitable as the same ``legato.errors`` classes wherever the work ran
    (``StreamLost``, ``DecodeError``, ``ResolveError``; :class:`ShutDown` once the executor or
    pool is gone). The feeder makes one call at a time and never two at once.

    Next steps this is shaped for (not built yet):

    - a ``discord.AudioSource`` adapter, for a drop-in ``VoiceClient.play(source, after=)``:
      wrap the AudioSource in a blocking :class:`FrameSource` whose ``read`` calls
      ``source.read()`` per 20 ms frame and, when ``is_opus()`` is false, encodes the PCM with
      :class:`legato.audio.encode.OpusEncoder`; hand it out as a :class:`ThreadedReader`. The
      feeder and the pacer need nothing more: the player paces whatever frames come.
    - effects: a filter graph belongs in the decoder's PCM stage
      (:mod:`legato.audio.decode`), not here: frames here are already Opus.
    """

    @property
    @abc.abstractmethod
    def passthrough(self) -> bool:
        """True while the source's own Opus packets are sent unchanged."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """True once ``close`` was called."""

    @abc.abstractmethod
    def read_chunk(self, max_frames: int) -> Awaitable[Chunk]:
        """Read up to ``max_frames`` frames (none: the end). Never raises; the awaitable does.

        Raises (through the awaitable):
            StreamLost: the stream broke off; the player reopens the track where it stopped.
            DecodeError: the stream failed; the player reports it and moves on.
            ShutDown: the executor or pool is gone.
        """

    @abc.abstractmethod
    def seek_to(self, seconds: float) -> Awaitable[float]:
        """Move so that the next frame read starts at ``seconds``; gives the new position."""

    @abc.abstractmethod
    def volume_to(self, volume: float) -> Awaitable[None]:
        """Scale the output from the next frame read (not 1.0: no passthrough)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the source (after a call still running, if any); safe to call twice."""


class ThreadedReader(FrameReader):
    """A blocking :class:`FrameSource` read in an executor's threads; results come back to the
    loop through its :class:`~legato.audio.handoff.Inbox` (batched, no task step per read).

    Args:
        source: The opened source (only ever called in ``executor``, one call at a time).
        executor: Where its calls run (``None``: :func:`~legato.audio.handoff.default_executor`).
    """

    def __init__(self, source: FrameSource, executor: Executor | None = None) -> None:
        self.source = source
        self._executor = executor or default_executor()
        self._inbox = inbox(asyncio.get_running_loop())
        self._inflight: concurrent.futures.Future[Any] | None = None
        self._closed = False

    @property
    def passthrough(self) -> bool:
        return self.source.passthrough

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def inflight(self) -> concurrent.futures.Future[Any] | None:
        """The call running in the executor, if any (a closing player waits for it)."""
        job = self._inflight
        return job if job is not None and not job.done() else None

    def read_chunk(self, max_frames: int) -> Pending[Chunk]:
        return self._run(_read_chunk, self.source, max_frames)

    def seek_to(self, seconds: float) -> Pending[float]:
        return self._run(_seek_and_tell, self.source, seconds)

    def volume_to(self, volume: float) -> Pending[None]:
        return self._run(self.source.set_volume, volume)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        job, source = self.inflight, self.source
        if job is not None:
            # Never close while a call runs in the worker; close right after it (in the worker:
            # FrameSource.close does not block).
            job.add_done_callback(lambda _f: source.close())
        else:
            source.close()

    def _run(self, fn: Callable[..., T], *args: Any) -> Pending[T]:
        try:
            job = self._inflight = self._executor.submit(fn, *args)
        except RuntimeError as exc:  # submit raises nothing else: the executor is shut down
            return Pending.failed(ShutDown(str(exc)))
        return self._inbox.future(job)


def _read_chunk(source: FrameSource, count: int) -> Chunk:
    """Read up to ``count`` frames (in the worker), timing the read."""
    started = time.perf_counter()
    frames = source.read(count)
    return Chunk(frames, source.position, source.duration, time.perf_counter() - started)


def _seek_and_tell(source: FrameSource, seconds: float) -> float:
    source.seek(seconds)
    return source.position
