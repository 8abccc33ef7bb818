"""Decode and encode in worker processes, off the bot's GIL (``[playback] decode_processes``).

In the bot's own threads, transcoding's Python glue (PyAV's demux and resample calls, the
encoder's) holds the GIL against the event loop, which then waits for it after every socket
call. A :class:`DecodePool` runs :func:`legato.audio.decode.open_source` in ``processes`` worker
processes instead, each serving many sources: every worker has a few threads, so one slow open
or read (the network) does not hold up its other sources. Requests and replies carry ids; the
parent has one reader thread per worker completing the callers' futures, and one writer thread
sending the requests queued from the event loop (``WorkerSource.read_chunk``: the players'
refills). What one turn of a loop queued for a worker goes to its writer in one hand-off, and on
as one message; a worker sends the replies that are ready together as one message too. The
reader and writer threads and the worker processes run under ``SCHED_BATCH``: their wake-ups do
not preempt the event loop (at 100 guilds, the bot's involuntary context switches fell from
about 750 to 110 a second, and the loop's wait for a CPU by a quarter).

:meth:`DecodePool.open` returns a :class:`WorkerSource`, a
:class:`~legato.audio.source.FrameReader` whose calls are requests to the worker holding the
real source: queued from the loop for the writer thread, answered through the reader thread and
the loop's :class:`~legato.audio.handoff.Inbox`, so no thread waits out the round trip. Each
reply carries the source's ``passthrough``, ``position`` and ``duration``, which the proxy
keeps. Errors come back as an :class:`ErrorRecord` (an :class:`ErrorKind` and the detail) and
are raised again as the same Legato error class with the same ``user_message`` (a
``StreamLost`` stays one, so the player reopens the track): the player handles them as it
handles a thread's.

A worker that dies (killed, out of memory) fails its sources' pending and later calls with a
``DecodeError``; the next open starts a replacement. After :meth:`DecodePool.close`, calls
raise :class:`~legato.audio.source.ShutDown` (a ``RuntimeError``, as a shut-down executor's),
which the player takes for closing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import itertools
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Final, NamedTuple, TypeVar

from legato.audio.decode import open_source
from legato.audio.encode import OpusSettings
from legato.audio.handoff import Inbox, Pending, inbox
from legato.audio.resolve import worker_context
from legato.audio.source import Chunk, FrameReader, FrameSource, ShutDown, StreamLost
from legato.audio.track import StreamInfo
from legato.errors import AudioError, DecodeError, LegatoError, ResolveError

__all__ = ["DecodePool", "ErrorKind", "ErrorRecord", "WorkerSource"]

T = TypeVar("T")

_log = logging.getLogger(__name__)

#: Threads in each worker process: reads waiting on the network do not hold up the others.
_WORKER_THREADS: Final = 8

#: Beyond the decoder's own timeout, seconds a caller waits for a worker's reply before it
#: takes the worker for hung (PyAV gives up on a stalled read after ``timeout`` itself).
_REPLY_MARGIN: Final = 10.0

#: Seconds between the writer thread's checks for queued requests past their reply deadline.
_SWEEP_EVERY: Final = 1.0

#: Seconds a closing pool waits for a worker to exit before it kills it.
_EXIT_WAIT: Final = 2.0

STOPPED: Final = "The audio decoder stopped; skipping."


def _batch_scheduled() -> None:
    """Put the calling thread in ``SCHED_BATCH``: the same share of the CPUs, but its wake-ups
    do not preempt a running thread (the event loop's, which woke it or sits on its CPU)."""
    if hasattr(os, "SCHED_BATCH"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class ErrorKind(enum.Enum):
    """Which error a worker's call raised (the class it is raised again as in the bot)."""

    STREAM_LOST = "stream_lost"
    DECODE = "decode"
    RESOLVE = "resolve"
    AUDIO = "audio"
    VALUE = "value"
    """A bad argument (``ValueError``): a bug of the caller's, raised as one."""


#: The class each kind is raised again as; any other failure crosses as ``DECODE``.
_CLASSES: Final[dict[ErrorKind, type[Exception]]] = {
    ErrorKind.STREAM_LOST: StreamLost,
    ErrorKind.DECODE: DecodeError,
    ErrorKind.RESOLVE: ResolveError,
    ErrorKind.AUDIO: AudioError,
    ErrorKind.VALUE: ValueError,
}
_KINDS: Final[dict[type[Exception], ErrorKind]] = {cls: kind for kind, cls in _CLASSES.items()}


class ErrorRecord(NamedTuple):
    """A worker's failure as data: its kind, the log detail and the user message."""

    kind: ErrorKind
    detail: str
    user_message: str

    @classmethod
    def of(cls, exc: BaseException) -> ErrorRecord:
        """The record of ``exc``: the kind of its nearest class that crosses as itself."""
        kind = next((_KINDS[c] for c in type(exc).__mro__ if c in _KINDS), ErrorKind.DECODE)
        message = exc.user_message if isinstance(exc, LegatoError) else ""
        return cls(kind, f"{type(exc).__name__}: {exc}", message)

    def error(self) -> Exception:
        """The exception to raise in the bot for this record."""
        cls = _CLASSES[self.kind]
        if issubclass(cls, LegatoError):
            return cls(self.detail, user_message=self.user_message or None)
        return cls(self.detail)


#: The source's metadata sent with every reply: passthrough, position, duration.
_Meta = tuple[bool, float, float | None]

#: A request: id (0: no reply wanted), operation, source id, arguments.
_Request = tuple[int, str, int, tuple[Any, ...]]

#: A reply: id, True and the result, or False and an ``ErrorRecord``.
_Reply = tuple[int, bool, Any]

#: A request's future, what to apply to its result before it is set, and the
#: ``time.monotonic()`` by which a queued request's reply is due (``inf``: the caller waits
#: with its own timeout).
_Waiting = tuple[concurrent.futures.Future[Any], Callable[[Any], Any] | None, float]

_SHUT_DOWN: Final = "cannot schedule new futures after shutdown"  # as an executor says it


# ---- the worker process


def _serve(conn: multiprocessing.connection.Connection) -> None:
    """A worker process's main: run requests from ``conn`` until it closes or says stop."""
    _batch_scheduled()  # before its threads start: they inherit it
    sources: dict[int, FrameSource] = {}
    locks: dict[int, threading.Lock] = {}
    send_lock = threading.Lock()
    pool = concurrent.futures.ThreadPoolExecutor(_WORKER_THREADS, thread_name_prefix="decode")
    ready: list[_Reply] = []  # replies waiting for the thread that is sending
    sending = False

    def reply(message: _Reply) -> None:
        # The first thread with a reply sends it and, until none is left, whatever the
        # others made meanwhile, as one message: one write, one wake of the bot's reader.
        nonlocal sending
        with send_lock:
            ready.append(message)
            if sending:
                return
            sending = True
        while True:
            with send_lock:
                batch = ready[:]
                ready.clear()
                if not batch:
                    sending = False
                    return
            try:
                conn.send(batch if len(batch) > 1 else batch[0])
            except OSError:
                with send_lock:
                    sending = False
                raise

    def handle(rid: int, op: str, sid: int, args: tuple[Any, ...]) -> None:
        try:
            result = _run(op, sid, args, sources, locks)
        except Exception as exc:  # noqa: BLE001 - every failure crosses back as data
            if not isinstance(exc, LegatoError | ValueError):
                _log.exception("decode worker: %s on source %d failed unexpectedly", op, sid)
            if rid:
                reply((rid, False, ErrorRecord.of(exc)))
            return
        if rid:
            reply((rid, True, result))

    try:
        while True:
            try:
                message: _Request | list[_Request] = conn.recv()
            except (EOFError, OSError):
                break  # the bot went away
            batch = message if isinstance(message, list) else [message]
            if any(op == "stop" for _rid, op, _sid, _args in batch):
                break
            for rid, op, sid, args in batch:
                pool.submit(handle, rid, op, sid, args)
    finally:
        # Nothing here outlives the process: no need to wait for reads stuck on the network.
        os._exit(0)


def _run(
    op: str,
    sid: int,
    args: tuple[Any, ...],
    sources: dict[int, FrameSource],
    locks: dict[int, threading.Lock],
) -> Any:
    if op == "open":
        info, start, opus, timeout = args
        opened = open_source(info, start=start, opus=opus, timeout=timeout)
        sources[sid] = opened
        locks[sid] = threading.Lock()
        return _meta(opened)
    source = sources.get(sid)
    lock = locks.get(sid)
    if source is None or lock is None:
        if op == "close":
            return None
        raise DecodeError(f"no source {sid} in this worker", user_message=STOPPED)
    with lock:
        if op == "close":
            del sources[sid], locks[sid]
            source.close()
            return None
        if op == "read":
            frames = source.read(args[0])
            return frames, _meta(source)
        if op == "seek":
            source.seek(args[0])
        elif op == "volume":
            source.set_volume(args[0])
        else:
            raise ValueError(f"unknown operation {op!r}")
        return _meta(source)


def _meta(source: FrameSource) -> _Meta:
    return source.passthrough, source.position, source.duration


# ---- the parent side


class _Worker:
    """One worker process: its pipe, a send lock, a reader thread completing futures, and a
    writer thread sending what :meth:`submit` queued."""

    def __init__(self, context: Any) -> None:
        parent, child = context.Pipe(duplex=True)
        self.process = context.Process(target=_serve, args=(child,), daemon=True)
        self.process.start()
        child.close()
        self.conn: multiprocessing.connection.Connection = parent
        self.sources = 0  # open sources, for choosing the least loaded worker
        self.messages = 0  # messages sent (a batch of requests is one)
        self.requests = 0  # requests sent
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # guards _pending and _dead
        self._pending: dict[int, _Waiting] = {}
        self._dead: Exception | None = None
        self._reader = threading.Thread(
            target=self._read, name=f"decode-reader-{self.process.pid}", daemon=True
        )
        self._reader.start()
        self._outbox: queue.SimpleQueue[_Request | list[_Request] | None] = queue.SimpleQueue()
        # Requests submitted on a loop, sent on by one callback of that loop (``_flush``).
        self._staged: dict[asyncio.AbstractEventLoop, list[_Request]] = {}
        self._writer = threading.Thread(
            target=self._write, name=f"decode-writer-{self.process.pid}", daemon=True
        )
        self._writer.start()

    @property
    def alive(self) -> bool:
        return self._dead is None

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def call(self, op: str, sid: int, args: tuple[Any, ...], wait: float) -> Any:
        """Send a request and block for its result (raising the worker's error)."""
        rid, fut = self._request(op, sid, args, None, None)
        try:
            return fut.result(wait)
        except TimeoutError as exc:
            raise DecodeError(
                f"decode worker {self.process.pid} gave no answer to {op} in {wait:.0f}s",
                user_message=STOPPED,
            ) from exc
        finally:
            with self._lock:
                self._pending.pop(rid, None)

    def submit(
        self,
        op: str,
        sid: int,
        args: tuple[Any, ...],
        wait: float,
        then: Callable[[Any], Any] | None = None,
    ) -> concurrent.futures.Future[Any]:
        """Queue a request for the writer thread and return at once (on the event loop too: what
        one turn of the loop queued goes to the writer thread in one hand-off, at the next turn);
        the future gets its result (``then(result)`` when given, applied in the reader thread)
        or the worker's error, or a ``DecodeError`` if no reply came within ``wait`` seconds
        (a hung worker), as :meth:`call` raises one.

        The loop does not write to the pipe itself: the write wakes the worker, and on a busy
        machine the kernel may run the worker in the writer's place until its time slice ends,
        which is a frame sent late when the writer is the loop (profiled at 100 guilds: a
        quarter of the loop's time went in such writes).
        """
        return self._request(op, sid, args, then, wait)[1]

    def _request(
        self,
        op: str,
        sid: int,
        args: tuple[Any, ...],
        then: Callable[[Any], Any] | None,
        wait: float | None,
    ) -> tuple[int, concurrent.futures.Future[Any]]:
        """Register a request and send it now (``wait`` None) or queue it for the writer."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        due = math.inf if wait is None else time.monotonic() + wait
        loop = _running_loop() if wait is not None else None
        flush = False
        with self._lock:
            if self._dead is not None:
                fut.set_exception(self._failure())
                return 0, fut
            rid = next(self._ids)
            self._pending[rid] = (fut, then, due)
            if loop is not None:
                staged = self._staged.get(loop)
                if staged is None:
                    staged = self._staged[loop] = []
                    flush = True
                staged.append((rid, op, sid, args))
        if wait is None:
            self._send((rid, op, sid, args))
        elif loop is None:
            self._outbox.put((rid, op, sid, args))
        elif flush:
            loop.call_soon(self._flush, loop)
        return rid, fut

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand what ``loop`` staged since its last flush to the writer thread, in one put."""
        with self._lock:
            staged = self._staged.pop(loop, None)
        if staged:
            self._outbox.put(staged)

    def _write(self) -> None:
        """The writer thread: send the queued requests (as one message when several wait) and
        about once a second fail those whose reply is overdue."""
        _batch_scheduled()
        sweep_at = time.monotonic() + _SWEEP_EVERY
        while True:
            requests: list[_Request] = []
            stop = False
            try:
                item = self._outbox.get(timeout=_SWEEP_EVERY)
                while True:
                    if item is None:
                        stop = True  # the worker is gone or stopping
                    elif isinstance(item, list):
                        requests += item
                    else:
                        requests.append(item)
                    if self._outbox.empty():
                        break
                    item = self._outbox.get()
            except queue.Empty:
                pass
            if requests:
                self._send(requests if len(requests) > 1 else requests[0])
            if stop:
                return
            now = time.monotonic()
            if now >= sweep_at:
                self._expire(now)
                sweep_at = now + _SWEEP_EVERY

    def _expire(self, now: float) -> None:
        with self._lock:
            late = [rid for rid, (_fut, _then, due) in self._pending.items() if due <= now]
            overdue = [self._pending.pop(rid)[0] for rid in late]
        for fut in overdue:
            if not fut.done():
                fut.set_exception(
                    DecodeError(
                        f"decode worker {self.process.pid} gave no answer in time",
                        user_message=STOPPED,
                    )
                )

    def tell(self, op: str, sid: int) -> None:
        """Send a request that wants no reply (dropped if the worker is gone)."""
        if self._dead is None:
            self._send((0, op, sid, ()))

    def _send(self, request: _Request | list[_Request]) -> None:
        try:
            with self._send_lock:
                self.conn.send(request)
                self.messages += 1
                self.requests += len(request) if isinstance(request, list) else 1
        except (OSError, ValueError) as exc:  # a closed pipe: the worker is gone
            self._die(DecodeError(f"sending to decode worker failed: {exc}", user_message=STOPPED))

    def _failure(self) -> Exception:
        dead = self._dead
        if isinstance(dead, ShutDown):
            return ShutDown(str(dead))
        return DecodeError(str(dead), user_message=STOPPED)

    def _read(self) -> None:
        _batch_scheduled()
        while True:
            try:
                message: _Reply | list[_Reply] = self.conn.recv()
            except (EOFError, OSError) as exc:
                self._die(
                    DecodeError(
                        f"decode worker {self.process.pid} exited ({type(exc).__name__})",
                        user_message=STOPPED,
                    )
                )
                return
            replies = message if isinstance(message, list) else [message]
            with self._lock:
                found = [(self._pending.pop(r, None), ok, value) for r, ok, value in replies]
            for waiting, ok, payload in found:
                if waiting is None:
                    continue  # its caller gave up waiting
                fut, then, _due = waiting
                if not ok:
                    fut.set_exception(ErrorRecord(*payload).error())
                elif then is None:
                    fut.set_result(payload)
                else:
                    fut.set_result(then(payload))

    def _die(self, error: Exception) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = error
                if not isinstance(error, ShutDown):
                    _log.warning("%s; its tracks fail", error)
            pending, self._pending = [fut for fut, _then, _due in self._pending.values()], {}
        self._outbox.put(None)  # the writer ends
        for fut in pending:
            if not fut.done():
                fut.set_exception(self._failure())

    def stop(self) -> None:
        """End the process (asked first, killed if it lingers) and fail what is pending."""
        with self._lock:
            alive = self._dead is None
        # Shut down first: the reader, seeing the worker exit, then takes it for the stop it is
        # rather than warning of a worker that died.
        self._die(ShutDown(_SHUT_DOWN))
        if alive:
            self._send((0, "stop", 0, ()))
        self.process.join(_EXIT_WAIT)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(_EXIT_WAIT)
        self._reader.join(_EXIT_WAIT)
        self._writer.join(_EXIT_WAIT)
        self.conn.close()


class DecodePool:
    """Worker processes that open, decode and encode tracks for the players."""

    def __init__(self, processes: int, *, reply_margin: float = _REPLY_MARGIN) -> None:
        """Make a pool; its processes start with the first :meth:`open`.

        Args:
            processes: How many worker processes (1 or more).
            reply_margin: Seconds beyond a source's own timeout that a call waits for the
                worker's reply before it takes the worker for hung.

        Raises:
            ValueError: ``processes`` is below 1.
        """
        if processes < 1:
            raise ValueError(f"processes must be 1 or more, got {processes}")
        self._workers: list[_Worker | None] = [None] * processes
        self._lock = threading.Lock()
        self._sids = itertools.count(1)
        self._closed = False
        self._context: Any = None
        self._margin = reply_margin

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers started so far (live or not)."""
        with self._lock:
            return [w.process.pid for w in self._workers if w is not None and w.process.pid]

    def open(
        self,
        info: StreamInfo,
        *,
        start: float = 0.0,
        opus: OpusSettings | None = None,
        timeout: float,
    ) -> WorkerSource:
        """Open a stream in a worker, as :func:`legato.audio.decode.open_source` does. Blocks.

        Raises:
            DecodeError: as ``open_source`` does, or the worker died.
            ShutDown: the pool is closed.
        """
        worker = self._pick()
        sid = next(self._sids)
        meta = worker.call("open", sid, (info, start, opus, timeout), timeout + self._margin)
        with self._lock:
            worker.sources += 1
        return WorkerSource(self, worker, sid, meta, timeout + self._margin)

    @property
    def pending(self) -> int:
        """Requests sent to the workers and not answered yet (nor given up on)."""
        with self._lock:
            workers = [w for w in self._workers if w is not None]
        return sum(w.pending for w in workers)

    @property
    def sent(self) -> tuple[int, int]:
        """Messages and requests sent to the workers so far (several queued requests go as one
        message)."""
        with self._lock:
            workers = [w for w in self._workers if w is not None]
        return sum(w.messages for w in workers), sum(w.requests for w in workers)

    def start(self) -> None:
        """Start every worker now rather than with the first track. Blocks while they start.

        Raises:
            ShutDown: the pool is closed.
        """
        self._pick()  # starts a worker in every empty slot

    def close(self) -> None:
        """End the workers; later calls raise ``ShutDown``. Safe to call twice."""
        with self._lock:
            self._closed = True
            workers = [w for w in self._workers if w is not None]
            self._workers = [None] * len(self._workers)
        for worker in workers:
            worker.stop()

    def _pick(self) -> _Worker:
        """The least loaded live worker, starting one in an empty or dead slot."""
        with self._lock:
            if self._closed:
                raise ShutDown(_SHUT_DOWN)
            for i, worker in enumerate(self._workers):
                if worker is None or not worker.alive:
                    if worker is not None:
                        worker.process.join(0)  # reap it
                    if self._context is None:
                        self._context = worker_context()
                    self._workers[i] = _Worker(self._context)
            live = [w for w in self._workers if w is not None]
            return min(live, key=lambda w: w.sources)

    def _closed_source(self, worker: _Worker) -> None:
        with self._lock:
            worker.sources -= 1


class WorkerSource(FrameReader):
    """A source living in a :class:`DecodePool` worker, read through the one read path.

    Every call is queued on the loop for the pool's writer thread and its reply comes back
    through the loop's inbox: no thread of this process waits while the worker works.
    """

    def __init__(
        self, pool: DecodePool, worker: _Worker, sid: int, meta: _Meta, wait: float
    ) -> None:
        self._pool = pool
        self._worker = worker
        self._sid = sid
        self._wait = wait
        self._passthrough, self._position, self._duration = meta
        self._closed = False
        self._inbox: Inbox | None = None

    @property
    def passthrough(self) -> bool:
        return self._passthrough

    @property
    def position(self) -> float:
        """Seconds read so far, as of the last reply."""
        return self._position

    @property
    def duration(self) -> float | None:
        """Length in seconds when known, as of the last reply."""
        return self._duration

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def worker_pid(self) -> int | None:
        """The process id of the worker holding the source."""
        pid: int | None = self._worker.process.pid
        return pid

    def read_chunk(self, max_frames: int) -> Pending[Chunk]:
        if self._closed:
            return Pending.ready(Chunk([], self._position, self._duration, 0.0))
        started = time.perf_counter()

        def chunk(reply: tuple[list[bytes], _Meta]) -> Chunk:
            frames, meta = reply
            self._passthrough, self._position, self._duration = meta
            return Chunk(
                list(frames), self._position, self._duration, time.perf_counter() - started
            )

        return self._request("read", max_frames, chunk)

    def seek_to(self, seconds: float) -> Pending[float]:
        if self._closed:
            return Pending.failed(DecodeError("seek on a closed source"))
        return self._request("seek", seconds, self._meta_position)

    def volume_to(self, volume: float) -> Pending[None]:
        return self._request("volume", volume, self._meta_none)

    def close(self) -> None:
        """Tell the worker to close the source; does not wait."""
        if self._closed:
            return
        self._closed = True
        self._worker.tell("close", self._sid)
        self._pool._closed_source(self._worker)

    def _meta_position(self, meta: _Meta) -> float:
        self._passthrough, self._position, self._duration = meta
        return self._position

    def _meta_none(self, meta: _Meta) -> None:
        self._passthrough, self._position, self._duration = meta

    def _request(self, op: str, arg: Any, then: Callable[[Any], T]) -> Pending[T]:
        box = self._inbox
        if box is None:
            box = self._inbox = inbox(asyncio.get_running_loop())
        return box.future(self._worker.submit(op, self._sid, (arg,), self._wait, then))
