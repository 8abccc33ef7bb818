"""The load bench tells a paused machine from a stalled bot: the pause probe's late wake-ups in a
window, and the players whose re-anchor a pause of 50 ms or more explains (see
``bench/pause_probe.py``). A probe that did not run says "not measured", never 0."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time

from bench.pause_probe import PauseProbe, machine_pause_figures, pause_probe

#: A window of 30 s, reported on every 10 s as the load bench's bot does.
WINDOW = (100.0, 130.0)
INTERVAL = 10.0
PERIODS = [
    (100.2, 110.2, {"a": 1}),
    (110.2, 120.2, {"b": 2}),
    (120.2, 129.8, {"c": 1}),
]


def test_a_pause_in_a_period_explains_that_period_s_re_anchors_only() -> None:
    figures = machine_pause_figures(["105.0000 104.00"], WINDOW, PERIODS, INTERVAL)
    assert figures == {
        "machine_pauses": 1.0,
        "machine_pause_max_ms": 104.0,
        "reanchored_in_pause": 1.0,
    }


def test_a_pause_outside_the_window_is_neither_counted_nor_blamed() -> None:
    # The window's first period is short: a pause one report interval before its end would be
    # blamed for its re-anchors, were it in the window.
    periods = [(100.2, 103.0, {"a": 1}), *PERIODS[1:]]
    lines = ["99.0000 120.00", "130.5000 300.00"]
    figures = machine_pause_figures(lines, WINDOW, periods, INTERVAL)
    assert figures == {
        "machine_pauses": 0.0,
        "machine_pause_max_ms": 0.0,
        "reanchored_in_pause": 0.0,
    }


def test_a_pause_under_50_ms_is_counted_but_explains_no_re_anchor() -> None:
    figures = machine_pause_figures(["105.0000 45.00"], WINDOW, PERIODS, INTERVAL)
    assert figures == {
        "machine_pauses": 1.0,
        "machine_pause_max_ms": 45.0,
        "reanchored_in_pause": 0.0,
    }


def test_comments_and_unreadable_lines_are_left_out() -> None:
    lines = [
        "# pause probe, SCHED_FIFO; monotonic s, ms late",
        "",
        "112.5000",
        "not a pause",
        "113.0000 slow",
        "nan 80.00",
        "115.0000 80.00",
        "# 1 wake-ups over 30 ms late, longest 80.0 ms",
    ]
    figures = machine_pause_figures(lines, WINDOW, PERIODS, INTERVAL)
    assert figures == {
        "machine_pauses": 1.0,
        "machine_pause_max_ms": 80.0,
        "reanchored_in_pause": 1.0,
    }


def test_a_pause_just_before_a_short_period_explains_it_and_a_player_counts_once() -> None:
    # The bench's request ends the window 0.4 s after the bot's last periodic report; the pause
    # ended 0.1 s before that report, whose counters may not hold its re-anchors yet.
    periods = [(110.2, 120.2, {"a": 1}), (120.2, 120.6, {"a": 2, "b": 1})]
    figures = machine_pause_figures(["120.1000 95.00"], (110.0, 120.7), periods, INTERVAL)
    assert figures["reanchored_in_pause"] == 2.0


def test_a_probe_that_did_not_run_is_not_measured_rather_than_zero() -> None:
    figures = machine_pause_figures(None, WINDOW, PERIODS, INTERVAL)
    assert set(figures) == {"machine_pauses", "machine_pause_max_ms", "reanchored_in_pause"}
    assert all(math.isnan(v) for v in figures.values())


async def test_a_probe_that_cannot_start_says_why_and_is_not_measured() -> None:
    probe = PauseProbe(5.0, python="/nonexistent/python3")
    async with asyncio.timeout(30):  # guards a hang only
        await probe.start()
        await probe.stop()
    assert probe.lines is None
    assert probe.problem is not None
    assert probe.problem.startswith("not started")


async def test_the_runner_reads_a_real_pause_of_the_probe() -> None:
    async with asyncio.timeout(30):  # guards a hang only
        async with pause_probe(30.0) as probe:
            assert probe.proc is not None
            stopped = time.monotonic()
            os.kill(probe.proc.pid, signal.SIGSTOP)
            await asyncio.sleep(0.2)  # the pause itself: the probe does not run in it
            os.kill(probe.proc.pid, signal.SIGCONT)
        ended = time.monotonic()
    assert probe.problem is None
    assert probe.lines is not None
    figures = machine_pause_figures(
        probe.lines, (stopped, ended), [(stopped, ended, {"guild": 1})], INTERVAL
    )
    assert figures["machine_pauses"] >= 1, probe.lines
    assert figures["machine_pause_max_ms"] >= 150, probe.lines
    assert figures["reanchored_in_pause"] == 1
