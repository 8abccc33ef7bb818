"""SupplyMonitor, the pure judge of a source's speed: starved time summed over a window."""

from __future__ import annotations

import pytest

from legato.audio.supply import RECHECK, Supply, SupplyMonitor


def spells(monitor: SupplyMonitor, pattern: list[tuple[float, float]]) -> None:
    """Starve from each ``start`` to each ``end`` (absolute times)."""
    for start, end in pattern:
        monitor.starve(start)
        monitor.feed(end)


def test_starved_time_over_the_limit_within_the_window_is_too_slow() -> None:
    monitor = SupplyMonitor(window=20.0, limit=10.0)
    monitor.reset(0.0)
    # A source at a quarter of real time: 1 s of audio, 3 s starved, over and over.
    spells(monitor, [(1.0, 4.0), (5.0, 8.0), (9.0, 12.0)])
    monitor.starve(13.0)
    assert monitor.deadline(13.0) == pytest.approx(14.0)  # 9 s starved so far: 1 s to go
    assert monitor.check(13.9).verdict is Supply.OK
    report = monitor.check(14.0)
    assert report.verdict is Supply.TOO_SLOW
    assert report.starved == pytest.approx(10.0)
    assert report.span == pytest.approx(14.0)
    assert report.spell == pytest.approx(1.0)


def test_a_hiccup_shorter_than_the_limit_is_forgiven_and_forgotten() -> None:
    monitor = SupplyMonitor(window=20.0, limit=10.0)
    monitor.reset(0.0)
    spells(monitor, [(5.0, 13.0)])  # 8 s without audio once
    monitor.starve(30.0)
    # At 32 s only the last second of the old spell is in the window; by 40 s none of it is,
    # and the new spell has the whole limit to itself.
    assert monitor.check(32.0).starved == pytest.approx(1.0 + 2.0)
    assert monitor.check(39.9).verdict is Supply.OK
    assert monitor.check(40.0).verdict is Supply.TOO_SLOW


def test_the_deadline_never_comes_before_the_verdict_can_change() -> None:
    monitor = SupplyMonitor(window=10.0, limit=5.0)
    monitor.reset(0.0)
    spells(monitor, [(0.0, 4.9)])
    monitor.starve(10.0)
    # Starved 4.9 s of the window at 10 s, but that spell leaves it as fast as this one grows:
    # each look finds it short and the next is at least RECHECK away, never a spin.
    when = monitor.deadline(10.0)
    assert when is not None
    assert when == pytest.approx(10.0 + RECHECK)
    assert monitor.check(when).verdict is Supply.OK
    later = monitor.deadline(when)
    assert later is not None
    assert later >= when + RECHECK
    assert monitor.check(15.0).verdict is Supply.TOO_SLOW


def test_one_spell_with_no_audio_for_the_stall_timeout_is_stalled() -> None:
    monitor = SupplyMonitor(window=20.0, limit=10.0, stall=3.0)
    monitor.reset(0.0)
    monitor.starve(1.0, stall=True)
    assert monitor.deadline(1.0) == pytest.approx(4.0)
    assert monitor.check(4.0).verdict is Supply.STALLED
    # A spell that the stall rule does not cover (a track still opening) has only the limit.
    monitor.reset(10.0)
    monitor.starve(10.0)
    assert monitor.deadline(10.0) == pytest.approx(20.0)
    assert monitor.check(19.0).verdict is Supply.OK


def test_deliveries_in_the_window_give_the_measured_rate() -> None:
    monitor = SupplyMonitor(window=10.0, limit=5.0)
    monitor.reset(0.0)
    for t in range(0, 20, 2):
        monitor.deliver(float(t), 0.5)  # half a second of audio every two seconds
    monitor.starve(19.0)
    report = monitor.check(20.0)
    assert report.delivered == pytest.approx(2.0)  # the reads at 12, 14, 16 and 18 s
    assert report.span == pytest.approx(10.0)
    assert report.rate == pytest.approx(0.2)


def test_reset_forgets_spells_and_deliveries() -> None:
    monitor = SupplyMonitor(window=20.0, limit=10.0)
    monitor.reset(0.0)
    monitor.deliver(1.0, 0.2)
    spells(monitor, [(1.0, 9.0)])
    monitor.starve(9.5)
    monitor.reset(10.0)
    assert not monitor.starving
    assert monitor.deadline(10.0) is None
    report = monitor.check(11.0)
    assert (report.verdict, report.starved, report.delivered) == (Supply.OK, 0.0, 0.0)
    assert report.span == pytest.approx(1.0)


@pytest.mark.parametrize(("window", "limit", "stall"), [(10.0, 10.0, None), (10.0, 0.0, None)])
def test_limits_out_of_range_are_refused(window: float, limit: float, stall: float | None) -> None:
    with pytest.raises(ValueError, match="limit"):
        SupplyMonitor(window=window, limit=limit, stall=stall)


def test_an_hour_of_healthy_reads_with_short_hiccups_stays_ok_and_reports_the_window() -> None:
    monitor = SupplyMonitor(window=20.0, limit=10.0)
    monitor.reset(0.0)
    for i in range(36_000):  # a read of 0.1 s of audio every 0.1 s for an hour
        now = i * 0.1
        monitor.deliver(now, 0.1)
        if i % 600 == 0:  # a 1 s hiccup every minute
            monitor.starve(now)
            monitor.feed(now + 1.0)
    now = 3600.0
    monitor.starve(now)
    report = monitor.check(now + 1.0)
    assert report.verdict is Supply.OK
    assert report.starved == pytest.approx(1.0)  # the last minute's hiccup left the window
    assert report.rate == pytest.approx(0.95, abs=0.06)  # 19 s of reads in the last 20 s
