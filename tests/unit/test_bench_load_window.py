"""The load bench's listener analysis: a sender that stalls is seen stalled, one that keeps its
grid is not. The bench must never be kinder than the truth (see ``bench/bench_load.py``)."""

from __future__ import annotations

from bench.bench_load import STALL_GAP_S, _window
from legato.sandbox.recording import Recording

SSRC = 0xBEEF


def recorded(arrivals: list[float], sequences: list[int] | None = None) -> Recording:
    rec = Recording(1, 2)
    for index, arrival in enumerate(arrivals):
        seq = index if sequences is None else sequences[index]
        rec.add_packet(arrival=arrival, ssrc=SSRC, sequence=seq, timestamp=seq * 960, opus=b"\xf8")
    return rec


def test_a_steady_sender_is_not_stalled() -> None:
    w = _window(recorded([k * 0.020 for k in range(500)]).packets)
    assert (w["frames"], w["lost"], w["bursts"]) == (500, 0, 0)
    assert w["max_gap"] <= STALL_GAP_S


def test_a_sender_that_stalls_is_seen_stalled() -> None:
    # 250 frames on the grid, then nothing for 300 ms, then the rest a grid later: every
    # frame arrived (nothing lost), and the stall is still heard.
    arrivals = [k * 0.020 for k in range(250)] + [5.3 + k * 0.020 for k in range(250)]
    w = _window(recorded(arrivals).packets)
    assert w["lost"] == 0
    assert w["max_gap"] > STALL_GAP_S


def test_frames_the_listener_never_got_are_lost_and_a_gap() -> None:
    sequences = [*range(100), *range(110, 200)]
    w = _window(recorded([s * 0.020 for s in sequences], sequences).packets)
    assert (w["frames"], w["lost"]) == (190, 10)
    assert w["max_gap"] > STALL_GAP_S


def test_a_catch_up_burst_is_counted() -> None:
    arrivals = [k * 0.020 for k in range(50)] + [1.0 + k * 0.001 for k in range(5)]
    w = _window(recorded(arrivals).packets)
    assert w["bursts"] >= 4
