"""Decode and encode in worker processes, off the bot's GIL (``[playback] decode_processes``).

In the bot's own threads, transcoding's Python glue (PyAV's demux and resample calls, the
encoder's) holds the GIL against the event loop, which then waits for it after every socket
call. A :class:`DecodePool` runs :func:`legato.audio.decode.open_source` in ``processes`` worker
processes instead, each serving many sources: every worker has a few threads, so one slow open
or read (the network) does not hold up its other sources. Requests and replies carry ids; the
parent has one reader thread per worker completing the callers' futures, and one writer thread
sending the requests queued from the event loop (``WorkerSource.read_soon``: the players' refills).

:meth:`DecodePool.open` returns a :class:`WorkerSource`, a ``FrameSource`` whose blocking calls
(they run in the player's executor) are requests to the worker holding the real source; each
reply carries the source's ``passthrough``, ``position`` and ``duration``, which the proxy keeps.
Errors come back as plain data and are raised again as the same Legato error class with the
same ``user_message`` (a ``StreamLost`` stays one, so the player reopens the track).

A worker that dies (killed, out of memory) fails its sources' pending and later calls with a
``DecodeError``; the next open starts a replacement. After :meth:`DecodePool.close`, calls
raise ``RuntimeError`` as a shut-down executor does, which the player takes for closing.
"""

from __future__ import annotations

import concurrent.futures
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
from typing import Any, Final

from legato.audio.decode import open_source
from legato.audio.encode import OpusSettings
from legato.audio.resolve import StreamInfo, worker_context
from legato.audio.source import FrameSource, StreamLost
from legato.errors import AudioError, DecodeError, LegatoError, ResolveError

__all__ = ["DecodePool", "WorkerSource"]

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

#: Errors that cross back as themselves (by name); anything else becomes a ``DecodeError``.
_CROSSING: Final = (StreamLost, DecodeError, AudioError, ResolveError)
_ERRORS: Final[dict[str, type[LegatoError]]] = {cls.__name__: cls for cls in _CROSSING}

#: The source's metadata sent with every reply: passthrough, position, duration.
_Meta = tuple[bool, float, float | None]

#: A request: id (0: no reply wanted), operation, source id, arguments.
_Request = tuple[int, str, int, tuple[Any, ...]]

#: A reply: id, True and the result, or False and (error class name, detail, user message).
_Reply = tuple[int, bool, Any]

#: A request's future, what to apply to its result before it is set, and the
#: ``time.monotonic()`` by which a queued request's reply is due (``inf``: the caller waits
#: with its own timeout).
_Waiting = tuple[concurrent.futures.Future[Any], Callable[[Any], Any] | None, float]

_SHUT_DOWN: Final = "cannot schedule new futures after shutdown"  # as an executor says it


# ---- the worker process


def _serve(conn: multiprocessing.connection.Connection) -> None:
    """A worker process's main: run requests from ``conn`` until it closes or says stop."""
    sources: dict[int, FrameSource] = {}
    locks: dict[int, threading.Lock] = {}
    send_lock = threading.Lock()
    pool = concurrent.futures.ThreadPoolExecutor(_WORKER_THREADS, thread_name_prefix="decode")

    def reply(message: _Reply) -> None:
        with send_lock:
            conn.send(message)

    def handle(rid: int, op: str, sid: int, args: tuple[Any, ...]) -> None:
        try:
            result = _run(op, sid, args, sources, locks)
        except Exception as exc:  # noqa: BLE001 - every failure crosses back as data
            if not isinstance(exc, LegatoError | ValueError):
                _log.exception("decode worker: %s on source %d failed unexpectedly", op, sid)
            name = next((c.__name__ for c in type(exc).__mro__ if c in _CROSSING), "")
            if isinstance(exc, ValueError):
                name = "ValueError"
            message = exc.user_message if isinstance(exc, LegatoError) else ""
            if rid:
                reply((rid, False, (name, f"{type(exc).__name__}: {exc}", message)))
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


def _error(name: str, detail: str, message: str) -> Exception:
    """The parent-side exception for an error a worker reported."""
    if name == "ValueError":
        return ValueError(detail)
    cls = _ERRORS.get(name, DecodeError)
    return cls(detail, user_message=message or None)


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
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # guards _pending and _dead
        self._pending: dict[int, _Waiting] = {}
        self._dead: Exception | None = None
        self._reader = threading.Thread(
            target=self._read, name=f"decode-reader-{self.process.pid}", daemon=True
        )
        self._reader.start()
        self._outbox: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._writer = threading.Thread(
            target=self._write, name=f"decode-writer-{self.process.pid}", daemon=True
        )
        self._writer.start()

    @property
    def alive(self) -> bool:
        return self._dead is None

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
        """Queue a request for the writer thread and return at once (on the event loop too);
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
        with self._lock:
            if self._dead is not None:
                fut.set_exception(self._failure())
                return 0, fut
            rid = next(self._ids)
            self._pending[rid] = (fut, then, due)
        if wait is None:
            self._send((rid, op, sid, args))
        else:
            self._outbox.put((rid, op, sid, args))
        return rid, fut

    def _write(self) -> None:
        """The writer thread: send the queued requests (as one message when several wait) and
        about once a second fail those whose reply is overdue."""
        sweep_at = time.monotonic() + _SWEEP_EVERY
        while True:
            batch: list[_Request | None] = []
            try:
                batch.append(self._outbox.get(timeout=_SWEEP_EVERY))
                while not self._outbox.empty():
                    batch.append(self._outbox.get())
            except queue.Empty:
                pass
            requests = [r for r in batch if r is not None]
            if requests:
                self._send(requests if len(requests) > 1 else requests[0])
            if len(requests) < len(batch):
                return  # None: the worker is gone or stopping
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
        except (OSError, ValueError) as exc:  # a closed pipe: the worker is gone
            self._die(DecodeError(f"sending to decode worker failed: {exc}", user_message=STOPPED))

    def _failure(self) -> Exception:
        dead = self._dead
        if isinstance(dead, RuntimeError):
            return RuntimeError(str(dead))
        return DecodeError(str(dead), user_message=STOPPED)

    def _read(self) -> None:
        while True:
            try:
                rid, ok, payload = self.conn.recv()
            except (EOFError, OSError) as exc:
                self._die(
                    DecodeError(
                        f"decode worker {self.process.pid} exited ({type(exc).__name__})",
                        user_message=STOPPED,
                    )
                )
                return
            with self._lock:
                waiting = self._pending.pop(rid, None)
            if waiting is None:
                continue  # its caller gave up waiting
            fut, then, _due = waiting
            if not ok:
                fut.set_exception(_error(*payload))
            elif then is None:
                fut.set_result(payload)
            else:
                fut.set_result(then(payload))

    def _die(self, error: Exception) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = error
                if not isinstance(error, RuntimeError):
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
        self._die(RuntimeError(_SHUT_DOWN))
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

    def __init__(self, processes: int) -> None:
        """Make a pool; its processes start with the first :meth:`open`.

        Args:
            processes: How many worker processes (1 or more).

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
            RuntimeError: the pool is closed.
        """
        worker = self._pick()
        sid = next(self._sids)
        meta = worker.call("open", sid, (info, start, opus, timeout), timeout + _REPLY_MARGIN)
        with self._lock:
            worker.sources += 1
        return WorkerSource(self, worker, sid, meta, timeout + _REPLY_MARGIN)

    def start(self) -> None:
        """Start every worker now rather than with the first track. Blocks while they start.

        Raises:
            RuntimeError: the pool is closed.
        """
        self._pick()  # starts a worker in every empty slot

    def close(self) -> None:
        """End the workers; later calls raise ``RuntimeError``. Safe to call twice."""
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
                raise RuntimeError(_SHUT_DOWN)
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


class WorkerSource:
    """A ``FrameSource`` living in a :class:`DecodePool` worker; its calls block on replies."""

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
        return self._position

    @property
    def duration(self) -> float | None:
        return self._duration

    def read(self, max_frames: int) -> list[bytes]:
        if self._closed:
            return []
        return self._read_reply(self._call("read", max_frames))

    def read_soon(self, max_frames: int) -> concurrent.futures.Future[list[bytes]]:
        """Start a read without waiting for it (on the event loop: no executor thread is held
        while the worker decodes); the future gets what :meth:`read` would return or raise,
        set in the pool's reader thread after ``position`` and ``duration`` are updated."""
        if self._closed:
            done: concurrent.futures.Future[list[bytes]] = concurrent.futures.Future()
            done.set_result([])
            return done
        return self._worker.submit("read", self._sid, (max_frames,), self._wait, self._read_reply)

    def _read_reply(self, reply: tuple[list[bytes], _Meta]) -> list[bytes]:
        frames, meta = reply
        self._passthrough, self._position, self._duration = meta
        return list(frames)

    def seek(self, seconds: float) -> None:
        if self._closed:
            raise DecodeError("seek on a closed source")
        self._passthrough, self._position, self._duration = self._call("seek", seconds)

    def set_volume(self, volume: float) -> None:
        self._passthrough, self._position, self._duration = self._call("volume", volume)

    def close(self) -> None:
        """Tell the worker to close the source; does not wait."""
        if self._closed:
            return
        self._closed = True
        self._worker.tell("close", self._sid)
        self._pool._closed_source(self._worker)

    def _call(self, op: str, arg: Any) -> Any:
        return self._worker.call(op, self._sid, (arg,), self._wait)
