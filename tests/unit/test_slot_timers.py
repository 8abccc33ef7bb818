"""SlotTimers: the players' frame deadlines coalesced into 1 ms slots on a real event loop."""

from __future__ import annotations

import asyncio

import pytest

from legato.audio.pacer import EARLY
from legato.audio.timers import SLOT, SlotTimer, SlotTimers, slot_timers


async def test_each_callback_runs_within_its_deadlines_allowance() -> None:
    loop = asyncio.get_running_loop()
    timers = SlotTimers(loop)
    base = loop.time() + 0.01
    wanted = [base + k * 0.00037 for k in range(60)]
    ran: dict[int, float] = {}
    done = loop.create_future()

    def make(k: int) -> None:
        def cb() -> None:
            ran[k] = loop.time()
            if len(ran) == len(wanted):
                done.set_result(None)

        timers.call_at(wanted[k], cb)

    for k in range(len(wanted)):
        make(k)
    await asyncio.wait_for(done, 5)
    for k, when in enumerate(wanted):
        # Never more than EARLY before its deadline (the pacer's allowance).
        assert ran[k] >= when - EARLY - 1e-9
    # 60 deadlines 0.37 ms apart span 22 ms: far fewer loop timers than callbacks.
    assert timers.runs <= 24
    assert timers.pending() == 0


async def test_cancelled_timer_never_runs_and_others_in_its_slot_do() -> None:
    loop = asyncio.get_running_loop()
    timers = SlotTimers(loop)
    when = loop.time() + 0.005
    ran: list[str] = []
    a = timers.call_at(when, lambda: ran.append("a"))
    timers.call_at(when, lambda: ran.append("b"))
    a.cancel()
    done = loop.create_future()
    timers.call_at(when + 0.002, lambda: done.set_result(None))
    await asyncio.wait_for(done, 5)
    assert ran == ["b"]


async def test_past_and_minus_inf_deadlines_run_soon_in_order_of_arming() -> None:
    loop = asyncio.get_running_loop()
    timers = SlotTimers(loop)
    ran: list[int] = []
    done = loop.create_future()
    timers.call_at(loop.time() + 0.05, lambda: done.set_result(None))
    timers.call_at(float("-inf"), lambda: ran.append(1))
    timers.call_at(loop.time() - 1.0, lambda: ran.append(2))
    timers.call_at(loop.time(), lambda: ran.append(3))
    await asyncio.sleep(0.01)
    assert ran == [1, 2, 3]
    await asyncio.wait_for(done, 5)


async def test_a_callback_rearming_a_due_slot_does_not_hold_the_loop() -> None:
    """A callback that keeps arming "now" runs once per loop timer, and other work interleaves."""
    loop = asyncio.get_running_loop()
    timers = SlotTimers(loop)
    count = 0

    def again() -> None:
        nonlocal count
        count += 1
        if count < 200:
            timers.call_at(loop.time(), again)

    timers.call_at(loop.time(), again)
    other = 0
    while count < 200:
        other += 1
        await asyncio.sleep(0)
    assert other > 50


async def test_a_raising_callback_is_reported_and_its_slot_goes_on() -> None:
    loop = asyncio.get_running_loop()
    timers = SlotTimers(loop)
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    try:
        when = loop.time() + 0.003
        ran: list[str] = []

        def boom() -> None:
            raise ValueError("broken callback")

        timers.call_at(when, boom)
        done = loop.create_future()

        def after() -> None:
            ran.append("after")
            done.set_result(None)

        timers.call_at(when, after)
        await asyncio.wait_for(done, 5)
    finally:
        loop.set_exception_handler(None)
    assert ran == ["after"]
    assert len(reported) == 1
    assert isinstance(reported[0]["exception"], ValueError)


async def test_one_instance_per_loop() -> None:
    loop = asyncio.get_running_loop()
    assert slot_timers(loop) is slot_timers(loop)


def test_slot_wider_than_the_pacers_allowance_is_refused() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError, match="slot"):
            SlotTimers(loop, slot=SLOT * 10)
    finally:
        loop.close()


async def test_call_again_refiles_a_timer_that_ran_and_never_one_still_due() -> None:
    """A callback re-arming its own timer gets the same timer back; a pending or cancelled timer
    is left alone (a new one is filed), so nothing runs twice or comes back from a cancel."""
    loop = asyncio.get_running_loop()
    timers = SlotTimers(loop)
    ran: list[str] = []
    done = loop.create_future()
    timer: SlotTimer | None = None

    def first() -> None:
        ran.append("first")
        assert timer is not None
        again = timers.call_again(timer, loop.time() + 0.002, second)
        assert again is timer  # it ran: filed again, no new object
        ran.append("refiled")

    def second() -> None:
        ran.append("second")
        done.set_result(None)

    timer = timers.call_at(loop.time() + 0.002, first)
    pending = timers.call_at(loop.time() + 0.004, lambda: ran.append("pending"))
    other = timers.call_again(pending, loop.time() + 0.004, lambda: ran.append("other"))
    assert other is not pending  # still due: a second filing would run it twice
    cancelled = timers.call_at(loop.time() + 0.004, lambda: ran.append("cancelled"))
    cancelled.cancel()
    revived = timers.call_again(cancelled, loop.time() + 0.004, lambda: ran.append("revived"))
    assert revived is not cancelled
    await asyncio.wait_for(done, 5)
    await asyncio.sleep(0.01)
    assert sorted(ran) == ["first", "other", "pending", "refiled", "revived", "second"]
    assert timers.pending() == 0


async def test_a_timer_cancelled_after_it_ran_is_not_refiled() -> None:
    loop = asyncio.get_running_loop()
    timers = SlotTimers(loop)
    done = loop.create_future()
    timer = timers.call_at(loop.time(), lambda: done.set_result(None))
    await asyncio.wait_for(done, 5)
    timer.cancel()
    ran: list[int] = []
    again = timers.call_again(timer, loop.time(), lambda: ran.append(1))
    assert again is not timer
    await asyncio.sleep(0.01)
    assert ran == [1]
