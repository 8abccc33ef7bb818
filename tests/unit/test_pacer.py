"""Pacer: exact frame times, speaking order, trailing silence and what happens after a stall."""

from __future__ import annotations

import itertools
import random

import pytest

from legato.audio.pacer import CATCH_UP, MIN_GAP, REARM, Pacer, PacerAction

A = PacerAction
T0 = 1000.0
#: The minimum gap of the tests that follow a catch-up frame by frame (10 ms steps).
GAP = 0.010


def drain(pacer: Pacer, now: float, *, audio: bool = True) -> list[PacerAction]:
    """Poll until the pacer waits, as the player does after every wake-up."""
    out: list[PacerAction] = []
    while (action := pacer.poll(now, audio_ready=audio)) not in (A.WAIT, A.UNDERRUN):
        out.append(action)
        assert len(out) < 50, "pacer never settles"
    out.append(action)
    return out


def run(
    pacer: Pacer,
    start: float,
    end: float,
    *,
    audio: bool = True,
    wake_late: float = 0.0,
    log: list[tuple[float, PacerAction]] | None = None,
) -> list[tuple[float, PacerAction]]:
    """Drive the pacer as a timer-driven player would: wake at each deadline (plus lateness)."""
    log = [] if log is None else log
    now = start
    while now <= end + 1e-9:
        for action in drain(pacer, now, audio=audio):
            if action not in (A.WAIT, A.UNDERRUN):
                log.append((round(now - T0, 6), action))
        deadline = pacer.next_deadline()
        if deadline is None:
            break
        now = max(now, deadline) + wake_late
    return log


def sends(log: list[tuple[float, PacerAction]]) -> list[float]:
    return [t for t, a in log if a in (A.SEND_AUDIO, A.SEND_SILENCE)]


def test_idle_pacer_does_nothing() -> None:
    p = Pacer()
    assert p.idle
    assert p.poll(T0) is A.WAIT
    assert p.next_deadline() is None


def test_speaking_on_comes_before_first_frame_and_frames_are_on_a_grid() -> None:
    p = Pacer()
    p.play()
    assert p.next_deadline() is None  # speaking waits for audio
    assert drain(p, T0, audio=False) == [A.UNDERRUN]
    assert not p.speaking
    assert drain(p, T0) == [A.SPEAKING_ON, A.SEND_AUDIO, A.WAIT]
    assert p.next_deadline() == pytest.approx(T0 + 0.020)
    log = run(p, T0 + 0.020, T0 + 0.100)
    assert log == [(round(0.020 * k, 6), A.SEND_AUDIO) for k in range(1, 6)]


def test_deadlines_are_absolute_no_drift_when_woken_slightly_late() -> None:
    p = Pacer()
    p.play()
    drain(p, T0)
    log = run(p, T0 + 0.0207, T0 + 2.001, wake_late=0.0007)
    times = sends(log)
    assert len(times) == 100
    # Each frame is 0.7 ms late against its own grid point: the lateness never accumulates.
    for k, t in enumerate(times, start=1):
        assert t == pytest.approx(0.020 * k + 0.0007, abs=1e-6)
    assert p.last_lateness == pytest.approx(0.0007, abs=1e-6)
    assert p.reanchors == 0


def test_pause_sends_five_silence_frames_on_the_grid_then_speaking_off() -> None:
    p = Pacer()
    p.play()
    log = run(p, T0, T0 + 0.040)
    p.stop()
    assert p.next_deadline() == pytest.approx(T0 + 0.060)
    run(p, T0 + 0.060, T0 + 1.0, log=log)
    assert [a for _, a in log] == [
        A.SPEAKING_ON,
        A.SEND_AUDIO,
        A.SEND_AUDIO,
        A.SEND_AUDIO,
        *[A.SEND_SILENCE] * 5,
        A.SPEAKING_OFF,
    ]
    assert sends(log) == [0.0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.14]
    assert log[-1] == (0.14, A.SPEAKING_OFF)
    assert p.idle
    assert p.next_deadline() is None


def test_resume_after_speaking_off_announces_again_and_re_anchors() -> None:
    p = Pacer()
    p.play()
    run(p, T0, T0 + 0.020)
    p.stop()
    run(p, T0 + 0.040, T0 + 1.0)
    assert p.idle
    p.play()
    later = T0 + 5.0013
    assert drain(p, later) == [A.SPEAKING_ON, A.SEND_AUDIO, A.WAIT]
    assert p.next_deadline() == pytest.approx(later + 0.020)
    assert p.reanchors == 0  # a new grid after speaking on is not a stall


def test_play_during_trailing_silence_keeps_speaking_and_grid() -> None:
    p = Pacer()
    p.play()
    log = run(p, T0, T0 + 0.020)
    p.stop()
    run(p, T0 + 0.040, T0 + 0.060, log=log)  # two silence frames
    p.play()
    run(p, T0 + 0.080, T0 + 0.120, log=log)
    assert [a for _, a in log] == [
        A.SPEAKING_ON,
        A.SEND_AUDIO,
        A.SEND_AUDIO,
        A.SEND_SILENCE,
        A.SEND_SILENCE,
        A.SEND_AUDIO,
        A.SEND_AUDIO,
        A.SEND_AUDIO,
    ]
    assert sends(log) == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.08, 0.10, 0.12])


def test_stop_before_any_frame_after_speaking_on_still_sends_silence_then_off() -> None:
    p = Pacer()
    p.play()
    assert p.poll(T0) is A.SPEAKING_ON
    p.stop()
    log = run(p, T0 + 0.001, T0 + 1.0)
    assert [a for _, a in log] == [*[A.SEND_SILENCE] * 5, A.SPEAKING_OFF]


def test_stop_when_never_speaking_is_silent() -> None:
    p = Pacer()
    p.play()
    p.stop()
    assert drain(p, T0) == [A.WAIT]
    assert p.idle


def test_stall_re_anchors_instead_of_bursting() -> None:
    """discord.py #9120: after a 200 ms stall the stock player sends 10 frames 0.1 ms apart."""
    p = Pacer()
    p.play()
    log = run(p, T0, T0 + 0.100)
    # The loop is blocked for 200 ms: the next wake-up happens at 0.320 instead of 0.120.
    run(p, T0 + 0.320, T0 + 0.500, log=log)
    times = sends(log)
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.020 - 1e-9
    assert times[:6] == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.08, 0.10])
    assert times[6:9] == pytest.approx([0.32, 0.34, 0.36])
    assert p.reanchors == 1


def test_underrun_longer_than_a_frame_re_anchors() -> None:
    p = Pacer()
    p.play()
    run(p, T0, T0 + 0.040)
    assert drain(p, T0 + 0.060, audio=False) == [A.UNDERRUN]
    assert drain(p, T0 + 0.090, audio=False) == [A.UNDERRUN]
    # Audio arrives 75 ms after the frame was due: sent now, the grid moves here.
    assert drain(p, T0 + 0.135) == [A.SEND_AUDIO, A.WAIT]
    assert p.reanchors == 1
    assert p.next_deadline() == pytest.approx(T0 + 0.155)


def test_slightly_late_frame_keeps_grid_but_never_closer_than_min_gap() -> None:
    p = Pacer(min_gap=GAP)
    p.play()
    run(p, T0, T0 + 0.020)
    # Frame 2 (due 0.040) goes out 15 ms late; frame 3 stays on the grid only as far as the
    # minimum gap allows: 0.055 + 10 ms = 0.065 instead of 0.060; frame 4 is back on 0.080.
    assert drain(p, T0 + 0.055) == [A.SEND_AUDIO, A.WAIT]
    assert p.last_lateness == pytest.approx(0.015)
    assert p.next_deadline() == pytest.approx(T0 + 0.055 + GAP)
    log = run(p, p.next_deadline() or 0.0, T0 + 0.100)
    assert sends(log) == pytest.approx([0.065, 0.080, 0.100])
    assert p.reanchors == 0


def test_late_sender_keeps_the_grid_up_to_catch_up_and_catches_it_up() -> None:
    """A frame with its audio ready but sent 50 ms late (the loop was busy) is not a stall: the
    grid stays, and the frames after it go out ``GAP`` apart until they are back on it."""
    p = Pacer(min_gap=GAP)
    p.play()
    log = run(p, T0, T0 + 0.040)  # frames at 0, 20, 40 ms; the next is due at 60 ms
    run(p, T0 + 0.110, T0 + 0.200, log=log)
    times = sends(log)
    assert p.reanchors == 0
    assert times[3:10] == pytest.approx([0.110, 0.120, 0.130, 0.140, 0.150, 0.160, 0.180])
    assert min(b - a for a, b in itertools.pairwise(times)) >= GAP - 1e-9


def test_late_sender_re_anchors_past_catch_up() -> None:
    p = Pacer()
    p.play()
    log = run(p, T0, T0 + 0.040)
    late = T0 + 0.060 + CATCH_UP + 0.005
    run(p, late, late + 0.040, log=log)
    assert p.reanchors == 1
    assert sends(log)[3:6] == pytest.approx([late - T0, late - T0 + 0.020, late - T0 + 0.040])


def test_late_sender_re_anchors_once_then_catches_up_until_it_keeps_time() -> None:
    """Under a loop that stays overloaded, a stream is re-anchored once, not at every hiccup:
    later stalls are caught up at ``GAP`` until the sender has kept time for ``REARM``."""
    p = Pacer(min_gap=GAP)
    p.play()
    log = run(p, T0, T0 + 0.100)
    run(p, T0 + 0.320, T0 + 1.000, log=log)  # a 200 ms stall: re-anchored
    assert p.reanchors == 1
    run(p, T0 + 1.200, T0 + 2.000, log=log)  # another, soon after: caught up, no re-anchor
    assert p.reanchors == 1
    times = sends(log)
    assert min(b - a for a, b in itertools.pairwise(times)) >= GAP - 1e-9
    # Caught up: by 2 s the frames are back on the grid of the first re-anchor (0.32 + k 20 ms).
    assert (times[-1] - 0.320) / 0.020 == pytest.approx(round((times[-1] - 0.320) / 0.020))
    calm = T0 + 2.000 + REARM
    run(p, T0 + 2.020, calm, log=log)  # keeping time for REARM seconds re-arms it
    run(p, calm + 0.200, calm + 0.300, log=log)
    assert p.reanchors == 2


def test_a_second_fill_soon_after_the_first_keeps_the_grid() -> None:
    """A decoder falling behind twice in a row (100 tracks opening at once) moves the grid
    once: the second fill's silence goes out on the same grid, caught up at ``GAP``."""
    p = Pacer(min_gap=GAP)
    p.play()
    run(p, T0, T0 + 0.040)
    assert p.poll(T0 + 0.080, audio_ready=False, fill=True) is A.SEND_SILENCE
    assert p.reanchors == 1
    log = run(p, T0 + 0.100, T0 + 0.200)  # audio back on the grid of 80 ms
    assert p.poll(T0 + 0.220, audio_ready=False, fill=True) is A.UNDERRUN
    assert p.poll(T0 + 0.240, audio_ready=False, fill=True) is A.SEND_SILENCE
    assert p.reanchors == 1
    assert p.next_deadline() == pytest.approx(T0 + 0.250)  # the grid's 240 ms, then GAP
    run(p, T0 + 0.250, T0 + 0.300, log=log)
    assert sends(log)[-4:] == pytest.approx([0.250, 0.260, 0.280, 0.300])


def test_audio_late_from_the_source_still_re_anchors_past_one_frame() -> None:
    """The catch-up allowance is the sender's: audio the source was late with (an underrun for
    that frame) re-anchors past ``stall`` as before, whatever the sender did."""
    p = Pacer()
    p.play()
    run(p, T0, T0 + 0.040)
    assert drain(p, T0 + 0.060, audio=False) == [A.UNDERRUN]
    assert drain(p, T0 + 0.085) == [A.SEND_AUDIO, A.WAIT]
    assert p.reanchors == 1


def test_a_send_held_up_keeps_the_next_frame_min_gap_after_it_left() -> None:
    """A catch-up frame taken as sent at 110 ms but out only at 122 ms (the sender preempted
    in between): the next waits ``min_gap`` from 122 ms, not from 110 ms."""
    p = Pacer(min_gap=GAP)
    p.play()
    run(p, T0, T0 + 0.040)
    assert drain(p, T0 + 0.110) == [A.SEND_AUDIO, A.WAIT]
    assert p.next_deadline() == pytest.approx(T0 + 0.120)
    assert p.sent_at(T0 + 0.122) == pytest.approx(T0 + 0.132)
    assert p.sent_at(T0 + 0.115) == pytest.approx(T0 + 0.132)  # never earlier again
    assert p.reanchors == 0


def test_no_two_frames_closer_than_min_gap_under_random_wakeups() -> None:
    import random

    rng = random.Random(3)
    p = Pacer()
    p.play()
    now, times = T0, list[float]()
    for _ in range(3000):
        actions = drain(p, now, audio=rng.random() > 0.05)
        times.extend(now for action in actions if action is A.SEND_AUDIO)
        deadline = p.next_deadline()
        base = deadline if deadline is not None else now
        # Wake up late by 0-30 ms (sometimes), or early polls caused by other events.
        now = max(now, base) + rng.choice([0.0, 0.0, 0.0005, 0.004, 0.012, 0.030])
        if rng.random() < 0.1:
            now = max(now - 0.015, times[-1] if times else now)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) > 1000
    assert min(gaps) >= MIN_GAP - 1e-9


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="interval"):
        Pacer(interval=0.0)
    with pytest.raises(ValueError, match="min_gap"):
        Pacer(min_gap=0.05)


def test_fill_stands_silence_in_for_late_audio_on_the_grid() -> None:
    p = Pacer()
    p.play()
    run(p, T0, T0 + 0.040)  # frames at 0, 20, 40 ms; the next is due at 60 ms
    assert p.fill_deadline() == pytest.approx(T0 + 0.080)  # one frame of grace
    assert p.poll(T0 + 0.060, audio_ready=False, fill=True) is A.UNDERRUN
    assert p.poll(T0 + 0.079, audio_ready=False, fill=True) is A.UNDERRUN
    assert not p.filling
    # 20 ms late: silence goes out in its place, the grid moves here (once)...
    assert p.poll(T0 + 0.080, audio_ready=False, fill=True) is A.SEND_SILENCE
    assert p.filling
    assert p.reanchors == 1
    assert p.speaking
    # ...and silence keeps the grid while the audio stays away, with no grace any more.
    assert p.fill_deadline() == pytest.approx(T0 + 0.100)
    assert p.poll(T0 + 0.090, audio_ready=False, fill=True) is A.WAIT
    assert p.poll(T0 + 0.100, audio_ready=False, fill=True) is A.SEND_SILENCE
    # Audio is back: sent on the same grid, no second re-anchor.
    assert p.poll(T0 + 0.120, audio_ready=True, fill=True) is A.SEND_AUDIO
    assert not p.filling
    assert p.last_lateness == pytest.approx(0.0)
    assert p.reanchors == 1
    assert p.next_deadline() == pytest.approx(T0 + 0.140)
    # Stopping ends the fill: trailing silence, then speaking off.
    p.stop()
    assert drain(p, T0 + 0.140) == [A.SEND_SILENCE, A.WAIT]
    assert not p.filling


def test_fill_needs_a_grid() -> None:
    p = Pacer()
    p.play()
    # Nothing sent yet (a track still loading): nothing to keep going, so nothing is filled.
    assert p.poll(T0, audio_ready=False, fill=True) is A.UNDERRUN
    assert p.fill_deadline() is None


def test_send_due_is_poll_send_audio_plus_next_deadline() -> None:
    """The player's fused fast path agrees with poll + next_deadline on every wake-up, late,
    early, after stalls and around pause/resume; where poll would not send audio it does
    nothing and says so."""
    rng = random.Random(7)
    fast, slow = Pacer(), Pacer()
    for p in (fast, slow):
        p.play()
        assert p.poll(T0) is A.SPEAKING_ON
    now = T0
    sent = 0
    for step in range(3000):
        if step % 500 == 250:
            fast.stop()
            slow.stop()
        if step % 500 == 300:
            fast.play()
            slow.play()
        now += rng.choice([0.0, 0.0003, 0.004, 0.019, 0.0205, 0.021, 0.06])
        expected = slow.poll(now, audio_ready=True)
        got = fast.send_due(now)
        if expected is A.SEND_AUDIO:
            sent += 1
            assert got == slow.next_deadline()
            assert fast.last_lateness == slow.last_lateness
        else:
            assert got is None
            # Let the fast pacer take the same non-audio step through poll.
            assert fast.poll(now, audio_ready=True) is expected
        assert fast.reanchors == slow.reanchors
    assert sent > 1000
