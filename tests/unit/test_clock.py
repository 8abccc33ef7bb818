"""loop_time: the player's per-frame clock read is the loop's own clock."""

from __future__ import annotations

import asyncio

from legato.audio.clock import loop_time


async def test_loop_time_reads_the_loops_clock() -> None:
    loop = asyncio.get_running_loop()
    now = loop_time(loop)
    before = loop.time()
    read = now()
    after = loop.time()
    assert before <= read <= after


def test_a_loop_with_its_own_clock_is_read_through_it() -> None:
    class ShiftedLoop(asyncio.SelectorEventLoop):
        def time(self) -> float:
            return super().time() + 1000.0

    loop = ShiftedLoop()
    try:
        now = loop_time(loop)
        assert abs(now() - loop.time()) < 1.0  # its clock, not time.monotonic's
    finally:
        loop.close()
