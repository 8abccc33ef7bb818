"""Results of work done off the loop (executor threads, and decode workers' replies read by
another loop or thread), handed to the loop in batches.

A job's ``call_soon_threadsafe`` writes to the loop's self-pipe, and the worker thread then
takes the GIL back from the loop, which waits for it. With hundreds of players refilling, that
is thousands of wake-ups a second; an :class:`Inbox` appends a result under a lock and only the
first one since the loop last drained wakes it. A busy loop drains many at once.

Every frame reader (:mod:`legato.audio.source`, :mod:`legato.audio.workers`) settles its
loop futures through the loop's one inbox (:func:`inbox`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["Completion", "Inbox", "Pending", "completion", "default_executor", "inbox", "settle"]

_log = logging.getLogger(__name__)

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

#: ``deliver(target, value, exc)``: what the loop calls with one result.
Deliver = Callable[[Any, Any, BaseException | None], None]


class Inbox:
    """One loop's batched hand-off of results from other threads."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[Deliver, Any, Any, BaseException | None]] = []
        self._woken = False
        self._wakes = 0

    @property
    def wakes(self) -> int:
        """Times the loop was woken to drain (fewer than results put, under load)."""
        return self._wakes

    def put(self, deliver: Deliver, target: Any, value: Any, exc: BaseException | None) -> None:
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

    def settle(self, pending: Pending[Any], value: Any, exc: BaseException | None) -> None:
        """Deliver ``value`` (or ``exc``) to ``pending``, one of this inbox's loop: at once when
        called on that loop, through the inbox from any other thread."""
        if asyncio._get_running_loop() is self._loop:
            pending._settle(value, exc)
        else:
            self.put(_deliver, pending, value, exc)

    def future(self, job: concurrent.futures.Future[T]) -> Pending[T]:
        """What ``job`` gives, delivered to the loop through this inbox; on the loop only."""
        result: Pending[T] = Pending(self._loop)

        def done(ended: concurrent.futures.Future[T]) -> None:
            if ended.cancelled():
                self.put(_cancel, result, None, None)
                return
            exc = ended.exception()
            self.put(_deliver, result, None if exc is not None else ended.result(), exc)

        job.add_done_callback(done)
        return result

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._woken = False
        self._wakes += 1
        for deliver, target, value, exc in items:
            try:
                deliver(target, value, exc)
            except Exception:  # noqa: BLE001 - one broken delivery must not lose the others
                _log.exception("delivering an executor job's result failed")


def settle(fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    """Set ``fut``'s result (or exception), unless it is done already (a ``Deliver``)."""
    if fut.done():
        return
    if exc is None:
        fut.set_result(value)
    else:
        fut.set_exception(exc)


class Pending(Generic[T]):
    """A result on its way to the loop through an :class:`Inbox`: awaitable, and with
    ``asyncio.Future``'s ``add_done_callback``, ``done``, ``cancelled``, ``exception`` and
    ``result``.

    Unlike a loop future's, its callbacks run when the inbox delivers it, in the same drain, not
    one loop turn later: a reader's result is applied without a ``call_soon`` per read.
    """

    __slots__ = ("_callbacks", "_cancelled", "_done", "_exc", "_loop", "_value")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._done = False
        self._cancelled = False
        self._value: Any = None
        self._exc: BaseException | None = None
        self._callbacks: list[Callable[[Pending[T]], object]] = []

    @classmethod
    def ready(cls, value: T) -> Pending[T]:
        """One delivered already (on the loop) with ``value``."""
        pending: Pending[T] = cls(asyncio.get_running_loop())
        pending._settle(value, None)
        return pending

    @classmethod
    def failed(cls, exc: BaseException) -> Pending[Any]:
        """One delivered already (on the loop) with ``exc`` raised."""
        pending: Pending[Any] = cls(asyncio.get_running_loop())
        pending._settle(None, exc)
        return pending

    def done(self) -> bool:
        """Whether it was delivered (or cancelled)."""
        return self._done

    def cancelled(self) -> bool:
        """Whether the job was cancelled (an executor shut down with it queued)."""
        return self._cancelled

    def exception(self) -> BaseException | None:
        """What the job raised, if it did (only once done and not cancelled)."""
        if self._cancelled:
            raise asyncio.CancelledError
        if not self._done:
            raise asyncio.InvalidStateError("result is not ready")
        return self._exc

    def result(self) -> T:
        """What the job returned (raises what it raised)."""
        exc = self.exception()
        if exc is not None:
            raise exc
        value: T = self._value
        return value

    def add_done_callback(self, fn: Callable[[Pending[T]], object]) -> None:
        """Call ``fn(self)`` when delivered (at once if it was)."""
        if self._done:
            fn(self)
        else:
            self._callbacks.append(fn)

    def _settle(self, value: Any, exc: BaseException | None, *, cancelled: bool = False) -> None:
        if self._done:
            return
        self._done, self._cancelled, self._value, self._exc = True, cancelled, value, exc
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)

    def __await__(self) -> Generator[Any, None, T]:
        if not self._done:
            waiter: asyncio.Future[None] = self._loop.create_future()

            def wake(_pending: Pending[T]) -> None:
                if not waiter.done():
                    waiter.set_result(None)

            self.add_done_callback(wake)
            yield from waiter.__await__()
        return self.result()


class Completion(Protocol[T_co]):
    """What a started call is watched through: a ``Pending``, a loop future or a task."""

    def add_done_callback(self, fn: Callable[[Any], object], /) -> None: ...

    def cancelled(self) -> bool: ...

    def exception(self) -> BaseException | None: ...

    def result(self) -> T_co: ...


def completion(call: Awaitable[T]) -> Completion[T]:
    """Watch ``call``: a ``Pending`` or a future as it is, anything else (a reader's coroutine)
    as a task."""
    if isinstance(call, Pending | asyncio.Future):
        return call
    return asyncio.ensure_future(call)


def _deliver(pending: Pending[Any], value: Any, exc: BaseException | None) -> None:
    pending._settle(value, exc)


def _cancel(pending: Pending[Any], _value: Any, _exc: BaseException | None) -> None:
    pending._settle(None, None, cancelled=True)


_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Inbox] = weakref.WeakKeyDictionary()


def inbox(loop: asyncio.AbstractEventLoop) -> Inbox:
    """The loop's one inbox (made on first use)."""
    found = _inboxes.get(loop)
    if found is None:
        found = _inboxes[loop] = Inbox(loop)
    return found


_pool: concurrent.futures.ThreadPoolExecutor | None = None


def default_executor() -> concurrent.futures.Executor:
    """The players' shared pool when none is given: a few threads are plenty (reads are short)."""
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(8, (os.cpu_count() or 1) + 2), thread_name_prefix="legato-audio"
        )
    return _pool
