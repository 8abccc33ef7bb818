"""Results of work done off the loop (executor threads, decode workers' reader threads), handed
to the loop in batches.

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
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Inbox", "default_executor", "inbox", "settle"]

_log = logging.getLogger(__name__)

T = TypeVar("T")

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

    def future(self, job: concurrent.futures.Future[T]) -> asyncio.Future[T]:
        """A loop future settled (through this inbox) when ``job`` is; on the loop only."""
        result: asyncio.Future[T] = self._loop.create_future()

        def done(ended: concurrent.futures.Future[T]) -> None:
            if ended.cancelled():
                self.put(_cancel, result, None, None)
                return
            exc = ended.exception()
            self.put(settle, result, None if exc is not None else ended.result(), exc)

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


def _cancel(fut: asyncio.Future[Any], _value: Any, _exc: BaseException | None) -> None:
    fut.cancel()


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
