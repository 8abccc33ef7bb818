"""The per-user command rate of ``[permissions] cooldown_*``: a pure sliding window."""

from __future__ import annotations

import pytest

from legato.cogs.checks import CommandRate


def test_allows_the_limit_then_says_when_to_retry() -> None:
    rate = CommandRate(3, 10.0)
    assert [rate.take(1, t) for t in (0.0, 1.0, 2.0)] == [0.0, 0.0, 0.0]
    assert rate.take(1, 2.5) == pytest.approx(7.5)  # the first leaves the window at 10.0
    assert rate.take(2, 2.5) == 0.0  # another user has a window of their own
    assert rate.take(1, 9.9) == pytest.approx(0.1)
    assert rate.take(1, 10.0) == 0.0  # the first fell out; this one takes its place
    assert rate.take(1, 10.5) == pytest.approx(0.5)  # 1.0 is the oldest now


def test_refused_attempts_do_not_push_the_retry_back() -> None:
    rate = CommandRate(2, 5.0)
    rate.take(7, 0.0)
    rate.take(7, 0.0)
    waits = [rate.take(7, t / 10) for t in range(1, 50)]  # spamming for 4.9 s
    assert all(w > 0 for w in waits)
    assert rate.take(7, 5.0) == 0.0


def test_zero_limit_is_off() -> None:
    rate = CommandRate(0, 10.0)
    assert all(rate.take(1, 0.0) == 0.0 for _ in range(1000))


def test_memory_is_bounded_by_the_users_of_one_window() -> None:
    rate = CommandRate(1, 1.0)
    for user in range(5000):
        assert rate.take(user, float(user)) == 0.0  # each user once, one second apart
    # Sweeps dropped the users whose window had passed: only a few of the 5000 remain.
    assert len(rate) <= 1024
    assert rate.take(4999, 4999.5) == pytest.approx(0.5)  # the live one is still counted
