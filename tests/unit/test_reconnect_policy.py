"""What follows a closed voice websocket: the pure reconnect policy, driven by a fake `now`.

The shell (:class:`legato.voice.gateway.VoiceConnection`) only carries these steps out; here
they are checked one decision at a time, with a fixed jitter so delays are exact.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import pytest

from legato.errors import VoiceClosed, VoiceConnectError
from legato.voice.close import (
    AwaitMove,
    CloseAction,
    CloseDecision,
    GiveUp,
    Reconnect,
    ReconnectPolicy,
    close_policy,
)
from legato.voice.state import (
    CLIENT_TRANSITIONS,
    LINK_TRANSITIONS,
    TRANSITIONS,
    ClientState,
    ConnState,
    LinkState,
)

ENDPOINT = "voice.example:443"


def policy(**kwargs: object) -> ReconnectPolicy:
    options: dict[str, object] = {"backoff_base": 0.25, "backoff_max": 5.0, "jitter": lambda: 1.0}
    options.update(kwargs)
    return ReconnectPolicy(**options)  # type: ignore[arg-type]  # keyword options of one test


def test_a_drop_after_media_resumes_at_once() -> None:
    p = policy()
    p.socket_ended(10.0, reached_media=True)
    assert p.step(close_policy(None), 10.0, endpoint=ENDPOINT) == Reconnect(resume=True, delay=0.0)


def test_a_new_session_identifies_afresh() -> None:
    p = policy()
    p.socket_ended(0.0, reached_media=True)
    assert p.step(close_policy(4006), 0.0, endpoint=ENDPOINT) == Reconnect(resume=False, delay=0)


def test_failures_in_a_row_back_off_exponentially_up_to_the_cap() -> None:
    p = policy()
    p.socket_ended(0.0, reached_media=True)
    delays = []
    for attempt in range(8):
        p.socket_ended(float(attempt), reached_media=False)
        step = p.step(close_policy(None), float(attempt), endpoint=ENDPOINT)
        assert isinstance(step, Reconnect)
        delays.append(step.delay)
    # The first failure retries at once; then 0.25 s doubling, capped at 5 s.
    assert delays == [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_jitter_scales_the_delay() -> None:
    p = policy(jitter=lambda: 0.5)
    for now in (0.0, 1.0):
        p.socket_ended(now, reached_media=False)
    step = p.step(close_policy(None), 1.0, endpoint=ENDPOINT)
    assert step == Reconnect(resume=True, delay=0.125)


def test_reaching_media_again_ends_the_episode() -> None:
    p = policy(timeout=10.0)
    p.socket_ended(0.0, reached_media=False)
    p.socket_ended(9.0, reached_media=False)
    p.socket_ended(50.0, reached_media=True)  # media flowed on that one: a new episode
    assert p.failures == 0
    assert p.step(close_policy(None), 50.0, endpoint=ENDPOINT) == Reconnect(True, 0.0)


def test_an_episode_longer_than_the_timeout_gives_up() -> None:
    p = policy(timeout=60.0)
    p.socket_ended(100.0, reached_media=True)
    p.socket_ended(130.0, reached_media=False)
    assert isinstance(p.step(close_policy(None), 160.0, endpoint=ENDPOINT), Reconnect)
    step = p.step(close_policy(None), 160.5, endpoint=ENDPOINT)
    assert isinstance(step, GiveUp)
    assert isinstance(step.error, VoiceConnectError)
    assert str(step.error).startswith(f"gave up reconnecting to {ENDPOINT} after 60 s")


def test_reconnect_off_ends_with_the_close_code() -> None:
    p = policy(enabled=False)
    p.socket_ended(0.0, reached_media=True)
    step = p.step(close_policy(4015), 0.0, endpoint=ENDPOINT)
    assert isinstance(step, GiveUp)
    assert isinstance(step.error, VoiceClosed)
    assert step.error.code == 4015
    assert "reconnect is off" in str(step.error)
    dropped = p.step(close_policy(None), 0.0, endpoint=ENDPOINT)
    assert isinstance(dropped, GiveUp)
    assert isinstance(dropped.error, VoiceClosed)
    assert dropped.error.code == 1006


def test_stop_gives_up_with_the_decision_error() -> None:
    p = policy()
    p.socket_ended(0.0, reached_media=True)
    step = p.step(close_policy(4004), 0.0, endpoint=ENDPOINT)
    assert isinstance(step, GiveUp)
    assert isinstance(step.error, VoiceClosed)
    assert step.error.code == 4004
    assert step.error.user_message == "The voice server refused my credentials."


def test_4014_waits_for_a_move_then_starts_afresh() -> None:
    p = policy(move_timeout=5.0)
    p.socket_ended(0.0, reached_media=True)
    decision = close_policy(4014)
    step = p.step(decision, 0.0, endpoint=ENDPOINT)
    assert isinstance(step, AwaitMove)
    assert step.timeout == 5.0
    assert isinstance(step.error, VoiceClosed)
    assert step.error.code == 4014
    assert p.after_move(decision, 1.0, endpoint=ENDPOINT) == Reconnect(resume=False, delay=0.0)


def test_a_move_with_reconnect_off_still_ends() -> None:
    p = policy(enabled=False)
    p.socket_ended(0.0, reached_media=True)
    decision = close_policy(4014)
    assert isinstance(p.step(decision, 0.0, endpoint=ENDPOINT), AwaitMove)
    assert isinstance(p.after_move(decision, 1.0, endpoint=ENDPOINT), GiveUp)


def test_a_requested_resume_reconnects_with_resume() -> None:
    p = policy()
    p.socket_ended(0.0, reached_media=True)
    decision = CloseDecision(CloseAction.RESUME, 4000, "heartbeat ACK missed")
    assert p.step(decision, 0.0, endpoint=ENDPOINT) == Reconnect(resume=True, delay=0.0)


@pytest.mark.parametrize(
    ("transitions", "terminal"),
    [
        (TRANSITIONS, ConnState.CLOSED),
        (LINK_TRANSITIONS, LinkState.CLOSED),
        (CLIENT_TRANSITIONS, ClientState.CLOSED),
    ],
)
def test_every_lifecycle_has_one_terminal_state(
    transitions: Mapping[enum.Enum, frozenset[enum.Enum]], terminal: enum.Enum
) -> None:
    assert set(transitions) == set(type(terminal))
    assert [state for state, moves in transitions.items() if not moves] == [terminal]
