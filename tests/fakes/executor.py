"""Executors for unit tests: one that runs each job at once in the calling thread, and a real
thread pool that a :class:`~tests.fakes.clock.FakeClock` waits for before it moves time."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class InlineExecutor(Executor):
    """``submit`` runs the function before returning (its result or exception in the future)."""

    def __init__(self) -> None:
        self.calls = 0

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        self.calls += 1
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the future, as an executor does
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        del wait, cancel_futures

    def __repr__(self) -> str:
        return f"InlineExecutor(calls={self.calls})"


class SettlingPool(ThreadPoolExecutor):
    """A real thread pool whose jobs a fake clock lets finish before it moves time.

    With a fake clock, time moves only when the test moves it, while a job on a real thread
    takes real time: a clock that jumped to the next frame before a refill read came back would
    make the player underrun where the test means it not to. Give the clock this pool's
    :meth:`quiet` (``FakeClock(quiesce=pool.quiet)``) and every move waits for running jobs,
    except those a test parked on purpose (:meth:`parking`: a read blocked on a gate, which the
    test releases itself).
    """

    def __init__(self, max_workers: int) -> None:
        super().__init__(max_workers)
        self._pending: set[Future[Any]] = set()
        self._parked = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future = super().submit(fn, *args, **kwargs)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def parking(self, parked: bool) -> None:
        """A job is about to block until the test releases it (``True``): do not wait for it;
        it goes on (``False``): wait for it again. A ScriptedSource's ``on_park``."""
        with self._lock:
            self._parked += 1 if parked else -1

    async def quiet(self) -> None:
        """Wait until every job not parked has finished (a guard fails a hung job at 10 s)."""
        async with asyncio.timeout(10):
            while True:
                with self._lock:
                    if len(self._pending) <= self._parked:
                        return
                await asyncio.sleep(0.0005)  # polling real threads: no loop event to await


__all__ = ["InlineExecutor", "SettlingPool"]
