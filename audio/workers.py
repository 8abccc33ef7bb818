"""Decode and encode in worker processes, off the bot's GIL (``[playback] decode_processes``).

In the bot's own threads, transcoding's Python glue (PyAV's demux and resample calls, the
encoder's) holds the GIL against the event loop, which then waits for it after every socket
call. A :class:`DecodePool` runs :func:`legato.audio.decode.open_source` in ``processes`` worker
processes instead, each serving many sources: every worker has a few threads, so one slow open
or read (the network) does not hold up its other sources. The worker processes run under
``SCHED_BATCH``: their wake-ups do not preempt the event loop (at 100 guilds, the bot's
involuntary context switches fell from about 750 to 110 a second, and the loop's wait for a CPU
by a quarter).

Requests and replies carry ids and cross one non-blocking pipe per worker, which the event loop
itself writes and reads (``add_reader``): no thread of the bot's process stands between them.
What a loop queued for a worker within a few milliseconds (``WorkerSource.read_chunk``: the
players' refills) goes to it as one message, and a worker sends the replies that are ready
together as one message too; the loop completes each reply's awaitable as it reads it. (A reader
and a writer thread per worker did this before, handing every reply to the loop through its
inbox: about 0.2 ms of the bot's CPU per read in thread switches, and two more threads that
could be preempted holding the GIL the loop waits for.) A blocking call from another thread
(``DecodePool.open``, run in an executor) waits for a loop to read its reply, or reads the pipe
itself while no loop is running to.

:meth:`DecodePool.open` returns a :class:`WorkerSource`, a
:class:`~legato.audio.source.FrameReader` whose calls are requests to the worker holding the
real source. Each reply carries the source's ``passthrough``, ``position`` and ``duration``,
which the proxy keeps. Errors come back as an :class:`ErrorRecord` (an :class:`ErrorKind` and
the detail) and are raised again as the same Legato error class with the same
``user_message`` (a ``StreamLost`` stays one, so the player reopens the track): the player
handles them as it handles a thread's.

A worker that dies (killed, out of memory) fails its sources' pending and later calls with a
``DecodeError``; the next open starts a replacement. A request with no reply by its deadline
(a hung worker) fails the same way. After :meth:`DecodePool.close`, calls raise
:class:`~legato.audio.source.ShutDown` (a ``RuntimeError``, as a shut-down executor's), which
the player takes for closing.
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
import pickle
import select
import struct
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

#: Seconds between a reading loop's checks for requests past their reply deadline.
_SWEEP_EVERY: Final = 1.0

#: Seconds a blocked caller off the loops waits in one go before it looks again at whether a
#: loop reads its reply or it must read the pipe itself.
_LOOK_EVERY: Final = 0.25

#: Seconds over which a loop's requests to a worker are gathered into one message (against
#: the 300 ms and more that a player reads ahead; at 100 guilds, one message per loop turn
#: made a third more messages, each a wake-up of the worker).
_GATHER: Final = 0.004

#: Bytes read from a worker's pipe at a time (a reply batch is a few KiB).
_READ_SIZE: Final = 1 << 18

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


def _framed(message: Any) -> bytes:
    """``message`` pickled and framed as ``multiprocessing.Connection.send`` frames it (what
    the worker's ``recv`` reads)."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    size = len(data)
    if size > 0x7FFFFFFF:
        return struct.pack("!iQ", -1, size) + data
    return struct.pack("!i", size) + data


def _unframe(buffer: bytearray) -> list[bytearray]:
    """Take the whole messages at the start of ``buffer`` (``Connection`` framing) out of it,
    leaving a partial one; the messages' pickled bytes, in order."""
    out: list[bytearray] = []
    pos, end = 0, len(buffer)
    while end - pos >= 4:
        (size,) = struct.unpack_from("!i", buffer, pos)
        head = 4
        if size == -1:
            if end - pos < 12:
                break
            (size,) = struct.unpack_from("!Q", buffer, pos + 4)
            head = 12
        if end - pos - head < size:
            break
        out.append(buffer[pos + head : pos + head + size])
        pos += head + size
    if pos:
        del buffer[:pos]
    return out


class _Call:
    """A request waiting for its reply: where the result goes, what to apply to it first, and
    the ``time.monotonic()`` by which it is due (``inf``: the caller waits with its own
    timeout)."""

    __slots__ = ("due", "fut", "pending", "then")

    def __init__(
        self,
        then: Callable[[Any], Any] | None,
        due: float,
        *,
        fut: concurrent.futures.Future[Any] | None = None,
        pending: tuple[Pending[Any], Inbox] | None = None,
    ) -> None:
        self.then = then
        self.due = due
        self.fut = fut  # a caller off the loops, blocked in ``call``
        self.pending = pending  # a loop's awaitable, and that loop's inbox

    def finish(self, value: Any, exc: BaseException | None) -> None:
        if self.fut is not None:
            if exc is None:
                self.fut.set_result(value)
            else:
                self.fut.set_exception(exc)
        elif self.pending is not None:
            pending, box = self.pending
            box.settle(pending, value, exc)


class _Worker:
    """One worker process and its pipe, which the event loops that send requests read.

    The parent has no thread of its own per worker. The pipe is non-blocking: a loop that
    sends a request watches it (``add_reader``) and completes the replies it reads, its own
    at once and another loop's through that loop's inbox; what a loop queued within
    ``_GATHER`` s goes out in one write. A blocking :meth:`call` from another thread waits for a
    loop to read its reply, or reads the pipe itself when no loop is running to. One reader at
    a time (``_read_lock``) keeps the replies in order.
    """

    def __init__(self, context: Any) -> None:
        parent, child = context.Pipe(duplex=True)
        self.process = context.Process(target=_serve, args=(child,), daemon=True)
        self.process.start()
        child.close()
        self.conn: multiprocessing.connection.Connection = parent
        self._fd = parent.fileno()
        os.set_blocking(self._fd, False)
        self.sources = 0  # open sources, for choosing the least loaded worker
        self.messages = 0  # messages sent (a batch of requests is one)
        self.requests = 0  # requests sent
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # guards the state below but the buffers
        self._pending: dict[int, _Call] = {}
        self._dead: Exception | None = None
        # Requests submitted on a loop, sent on by one callback of that loop (``_flush``).
        self._staged: dict[asyncio.AbstractEventLoop, list[_Request]] = {}
        # Loops reading the pipe, each with its timer failing overdue requests.
        self._loops: dict[asyncio.AbstractEventLoop, asyncio.TimerHandle | None] = {}
        self._leaving = 0  # loops told to stop reading that have not yet
        self._close_when_free = False
        self._closed = False
        self._read_lock = threading.Lock()  # one reader of the pipe at a time
        self._inbuf = bytearray()
        self._write_lock = threading.Lock()  # the bytes not yet written, and the writes
        self._out = bytearray()
        self._out_loop: asyncio.AbstractEventLoop | None = None  # waiting to write ``_out``

    @property
    def alive(self) -> bool:
        return self._dead is None

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    # -- requests

    def call(self, op: str, sid: int, args: tuple[Any, ...], wait: float) -> Any:
        """Send a request and block for its result (raising the worker's error). Called on a
        loop that reads this worker, it reads the pipe itself while it blocks."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            dead = self._dead
            rid = 0 if dead is not None else next(self._ids)
            if rid:
                self._pending[rid] = _Call(None, math.inf, fut=fut)
        if dead is not None:
            raise self._failure()
        self._send((rid, op, sid, args))
        try:
            return self._wait_for(fut, wait)
        except TimeoutError as exc:
            raise DecodeError(
                f"decode worker {self.process.pid} gave no answer to {op} in {wait:.0f}s",
                user_message=STOPPED,
            ) from exc
        finally:
            with self._lock:
                self._pending.pop(rid, None)

    def request(
        self,
        op: str,
        sid: int,
        args: tuple[Any, ...],
        wait: float,
        then: Callable[[Any], T],
    ) -> Pending[T]:
        """Queue a request on the running loop and return at once: what the loop queued within
        ``_GATHER`` s goes to the worker in one message. The awaitable gets
        ``then(result)``, or the worker's error, or a ``DecodeError`` if no reply came within
        ``wait`` seconds (a hung worker), as :meth:`call` raises one."""
        loop = asyncio.get_running_loop()
        box = inbox(loop)
        pending: Pending[T] = Pending(loop)
        with self._lock:
            if self._dead is not None:
                return Pending.failed(self._failure())
            rid = next(self._ids)
            self._pending[rid] = _Call(then, time.monotonic() + wait, pending=(pending, box))
            staged = self._staged.get(loop)
            flush = staged is None
            if staged is None:
                staged = self._staged[loop] = []
            staged.append((rid, op, sid, args))
            watch = loop not in self._loops
            if watch:
                self._loops[loop] = None
        if watch:
            loop.add_reader(self._fd, self._pump)
            self._sweep(loop)
        if flush:
            # On a grid shared by every worker and loop: the requests of the turns in between
            # go as one message, and the workers wake together.
            loop.call_at(math.ceil(loop.time() / _GATHER) * _GATHER, self._flush, loop)
        return pending

    def tell(self, op: str, sid: int) -> None:
        """Send a request that wants no reply (dropped if the worker is gone)."""
        if self._dead is None:
            self._send((0, op, sid, ()))

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Send what ``loop`` staged since its last flush, as one message."""
        with self._lock:
            staged = self._staged.pop(loop, None)
        if staged:
            self._send(staged if len(staged) > 1 else staged[0])

    def _wait_for(self, fut: concurrent.futures.Future[Any], wait: float) -> Any:
        """``fut``'s result within ``wait`` seconds (else ``TimeoutError``): read by a running
        loop that watches the pipe, or by this thread when none does."""
        end = time.monotonic() + wait
        here = asyncio._get_running_loop()
        while not fut.done():
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError
            step = min(left, _LOOK_EVERY)
            with self._lock:
                read_elsewhere = any(loop is not here and loop.is_running() for loop in self._loops)
            if read_elsewhere:
                with contextlib.suppress(TimeoutError):
                    return fut.result(step)
                continue
            with self._write_lock:
                writing = [self._fd] if self._out else []
            try:
                readable, writable, _ = select.select([self._fd], writing, [], step)
            except (OSError, ValueError):  # the pipe closed: the worker is gone, fut failed
                break
            if writable:
                with self._write_lock:
                    self._write_out()
            if readable:
                self._pump()
        return fut.result()

    # -- the pipe

    def _send(self, request: _Request | list[_Request]) -> None:
        """Write ``request`` now, or as much as the pipe takes and the rest when it can."""
        data = _framed(request)
        with self._write_lock:
            self._out += data
            self.messages += 1
            self.requests += len(request) if isinstance(request, list) else 1
            self._write_out()
            if not self._out or self._out_loop is not None:
                return
            loop = asyncio._get_running_loop()
            if loop is not None:  # off a loop, the caller's wait (or the next send) writes it
                self._out_loop = loop
                loop.add_writer(self._fd, self._on_writable)

    def _write_out(self) -> None:
        """Write what the pipe takes of ``_out`` (with ``_write_lock`` held)."""
        while self._out:
            try:
                written = os.write(self._fd, self._out)
            except BlockingIOError:
                return
            except OSError as exc:  # a closed pipe: the worker is gone
                self._out.clear()
                self._die(
                    DecodeError(f"sending to decode worker failed: {exc}", user_message=STOPPED)
                )
                return
            del self._out[:written]

    def _on_writable(self) -> None:
        with self._write_lock:
            self._write_out()
            loop = self._out_loop
            if not self._out and loop is not None:
                loop.remove_writer(self._fd)
                self._out_loop = None

    def _pump(self) -> None:
        """Read the replies waiting in the pipe and complete them (a loop's reader callback,
        or a waiting caller's read); nothing when another reader is at it."""
        if not self._read_lock.acquire(blocking=False):
            return
        try:
            ended: BaseException | None = None
            try:
                data = os.read(self._fd, _READ_SIZE)
                if not data:
                    ended = EOFError()
            except BlockingIOError:
                data = b""
            except OSError as exc:
                data, ended = b"", exc
            if data:
                self._inbuf += data
                for message in _unframe(self._inbuf):
                    self._complete(pickle.loads(message))
        finally:
            self._read_lock.release()
        if ended is not None:
            self._die(
                DecodeError(
                    f"decode worker {self.process.pid} exited ({type(ended).__name__})",
                    user_message=STOPPED,
                )
            )

    def _complete(self, message: _Reply | list[_Reply]) -> None:
        replies = message if isinstance(message, list) else [message]
        with self._lock:
            found = [(self._pending.pop(r, None), ok, value) for r, ok, value in replies]
        for call, ok, payload in found:
            if call is None:
                continue  # its caller gave up waiting
            try:
                if not ok:
                    call.finish(None, ErrorRecord(*payload).error())
                else:
                    call.finish(payload if call.then is None else call.then(payload), None)
            except Exception:  # noqa: BLE001 - one broken delivery must not lose the others
                _log.exception("completing a decode worker's reply failed")

    # -- deadlines, death and stopping

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail the requests past their reply deadline, then again in ``_SWEEP_EVERY`` s (each
        loop that reads the pipe, while it does)."""
        with self._lock:
            if loop not in self._loops:
                return
            self._loops[loop] = loop.call_later(_SWEEP_EVERY, self._sweep, loop)
            now = time.monotonic()
            late = [rid for rid, call in self._pending.items() if call.due <= now]
            overdue = [self._pending.pop(rid) for rid in late]
        for call in overdue:
            call.finish(
                None,
                DecodeError(
                    f"decode worker {self.process.pid} gave no answer in time",
                    user_message=STOPPED,
                ),
            )

    def _failure(self) -> Exception:
        dead = self._dead
        if isinstance(dead, ShutDown):
            return ShutDown(str(dead))
        return DecodeError(str(dead), user_message=STOPPED)

    def _die(self, error: Exception) -> None:
        """The worker is gone (or stopping): fail what is pending and stop reading the pipe."""
        with self._lock:
            if self._dead is None:
                self._dead = error
                if not isinstance(error, ShutDown):
                    _log.warning("%s; its tracks fail", error)
            pending, self._pending = list(self._pending.values()), {}
            self._staged.clear()
        for call in pending:
            call.finish(None, self._failure())
        self._release(close=False)

    def _release(self, *, close: bool) -> None:
        """Have every loop stop reading the pipe, each on its own thread (at once when it is
        this one or not running); with ``close``, close the pipe once none reads it."""
        here = asyncio._get_running_loop()
        with self._lock:
            loops = list(self._loops.items())
            self._loops.clear()
            self._leaving += len(loops)
            self._close_when_free = self._close_when_free or close
        for loop, sweep in loops:
            if loop is here or not loop.is_running():
                self._leave(loop, sweep)
                continue
            try:
                loop.call_soon_threadsafe(self._leave, loop, sweep)
            except RuntimeError:  # closed meanwhile: its selector is gone with it
                self._leave(loop, sweep)
        self._close_if_free()

    def _leave(self, loop: asyncio.AbstractEventLoop, sweep: asyncio.TimerHandle | None) -> None:
        if sweep is not None:
            sweep.cancel()
        if not loop.is_closed():
            loop.remove_reader(self._fd)
            with self._write_lock:
                if self._out_loop is loop:
                    loop.remove_writer(self._fd)
                    self._out_loop = None
        with self._lock:
            self._leaving -= 1
        self._close_if_free()

    def _close_if_free(self) -> None:
        with self._lock:
            if not self._close_when_free or self._leaving or self._closed:
                return
            self._closed = True
        self.conn.close()

    def stop(self) -> None:
        """End the process (asked first, killed if it lingers) and fail what is pending."""
        with self._lock:
            alive = self._dead is None
        # Shut down first: a reader seeing the worker exit then takes it for the stop it is
        # rather than warning of a worker that died.
        self._die(ShutDown(_SHUT_DOWN))
        if alive:
            self._send((0, "stop", 0, ()))
        self.process.join(_EXIT_WAIT)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(_EXIT_WAIT)
        self._release(close=True)


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

    Every call is a request the loop sends and whose reply it reads: no thread of this process
    waits while the worker works.
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
        return self._worker.request(op, self._sid, (arg,), self._wait, then)
