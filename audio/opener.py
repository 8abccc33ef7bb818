"""Opening a track: resolve it if need be, choose where it decodes, open the decoder.

:func:`make_opener` gives the player's ``SourceOpener``: ``await opener(track, start)`` returns
a :class:`~legato.audio.source.FrameReader` positioned at ``start`` seconds.

- **Resolve once.** ``/play`` resolves the query into tracks (:meth:`Resolver.resolve`); a
  single item comes back carrying its stream (``Track.stream``) and when it was found. The
  opener plays that stream as it is while it is younger than ``fresh_for``; it resolves again
  (:meth:`Resolver.stream`) when the track has none (a playlist entry, a search result, a track
  restored from the store), when it is older, when opening it fails (the URL expired), and
  always for a reopen after the stream broke off mid-track (the player passes the track with
  its stream dropped).
- **Where it decodes.** In this process (:class:`~legato.audio.source.ThreadedReader` over
  :func:`~legato.audio.decode.open_source`, read in ``executor``) or in a
  :class:`~legato.audio.workers.DecodePool` worker (:class:`~legato.audio.workers.WorkerSource`);
  see ``threads_first``. The player reads either through the same awaitable read.

A source that finishes opening after the caller gave up (the player skipped or closed) is
closed, not leaked. An executor or pool shut down under an open raises
:class:`~legato.audio.source.ShutDown`, which the player takes for closing.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Final, Protocol

from legato.audio.source import FrameReader, FrameSource, ShutDown, ThreadedReader
from legato.audio.track import StreamInfo, Track
from legato.errors import DecodeError

if TYPE_CHECKING:
    from legato.audio.encode import OpusSettings
    from legato.audio.workers import DecodePool

__all__ = ["STREAM_FRESH_FOR", "SourceOpener", "StreamResolver", "make_opener"]

_log = logging.getLogger(__name__)

#: ``(track, start seconds) -> opened source``. A blocking ``FrameSource`` is read in the
#: player's executor; a ``FrameReader`` is read as it is.
SourceOpener = Callable[[Track, float], Awaitable[FrameReader | FrameSource]]

#: Seconds for which a stream found by ``/play``'s resolve is played without resolving again.
#: Stream URLs expire (YouTube's after hours); a track that waited in the queue longer than
#: this is resolved afresh, and one that fails to open from its old stream is too.
STREAM_FRESH_FOR: Final = 600.0


class StreamResolver(Protocol):
    """What the opener needs of a resolver (:class:`legato.audio.resolve.Resolver` is one)."""

    async def stream(self, track: Track) -> StreamInfo:
        """Resolve ``track`` now to a fresh stream."""
        ...


def make_opener(
    resolver: StreamResolver,
    *,
    opus: OpusSettings | None = None,
    executor: Executor | None = None,
    timeout: float | None = None,
    pool: DecodePool | None = None,
    threads_first: int = 0,
    fresh_for: float = STREAM_FRESH_FOR,
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[Track, float], Awaitable[FrameReader]]:
    """A ``SourceOpener`` that plays a track's resolved stream, resolving it when needed.

    Returns:
        ``await opener(track, start)``: a ``FrameReader`` positioned at ``start`` seconds.

    Args:
        resolver: Gives ``await stream(track)`` (a ``StreamInfo``) when the track needs one.
        opus: Encoder settings for sources that cannot pass Opus through.
        executor: Where ``open_source`` runs and an in-process source is read (``None``: the
            loop's default for opening, the players' shared pool for reading).
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
        fresh_for: Seconds a track's own stream (``Track.stream``) is played without
            resolving again.
        clock: Where "now" for ``fresh_for`` comes from (``Track.resolved_at``'s clock).
    """
    from legato.audio.decode import DEFAULT_TIMEOUT, open_source

    limit = DEFAULT_TIMEOUT if timeout is None else timeout
    local: weakref.WeakSet[ThreadedReader] = weakref.WeakSet()

    def in_process(info: StreamInfo) -> bool:
        if pool is None:
            return True
        if threads_first <= 0:
            return False
        if info.codec in (None, "opus"):
            return True
        decoding = sum(1 for r in list(local) if not r.passthrough and not r.closed)
        return decoding < threads_first

    async def open_info(info: StreamInfo, start: float) -> FrameReader:
        here = in_process(info)
        opener: Callable[..., FrameSource | FrameReader] = (
            open_source if here or pool is None else pool.open
        )
        try:
            fut = asyncio.get_running_loop().run_in_executor(
                executor, lambda: opener(info, start=start, opus=opus, timeout=limit)
            )
        except RuntimeError as exc:  # submit raises nothing else: the executor is shut down
            raise ShutDown(str(exc)) from exc
        try:
            source: FrameSource | FrameReader = await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(_close_result)
            raise
        if isinstance(source, FrameReader):
            return source
        reader = ThreadedReader(source, executor)
        local.add(reader)
        return reader

    async def open_track(track: Track, start: float) -> FrameReader:
        known = track.stream
        if (
            known is not None
            and track.resolved_at is not None
            and (known.is_local or clock() - track.resolved_at < fresh_for)
        ):
            try:
                return await open_info(known, start)
            except DecodeError as exc:
                # The stream it was resolved to may have expired since: resolve it afresh.
                _log.info("opening %s from its stream failed (%s); resolving again", track.url, exc)
        return await open_info(await resolver.stream(track), start)

    return open_track


def _close_result(fut: asyncio.Future[FrameSource | FrameReader]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().close()
