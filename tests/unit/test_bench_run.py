"""``make bench``'s derived figures: the codec's own CPU for the 100-guild mix, from the same
run's single-stream rows, and the bot's CPU over it."""

from __future__ import annotations

import pytest

from bench.bench_load import CASE_KEYS, LOAD_CASES
from bench.run import ISSUE_GOALS, ISSUE_REPORTED, derive


def test_the_codec_floor_is_the_mix_of_the_single_stream_rows() -> None:
    share = LOAD_CASES["mixed"][1]
    figures = {
        "ours.mp3.defaults.cpu": 1.2,
        "ours.passthrough.cpu": 0.02,
        "load.mixed.cpu_pct_per_stream": 1.3,
    }
    derive(figures)
    floor = (1 - share) * 1.2 + share * 0.02
    assert figures["load.mixed.codec_floor_pct_per_stream"] == pytest.approx(floor)
    assert figures["load.mixed.cpu_over_codec_floor"] == pytest.approx(1.3 / floor)


def test_nothing_is_derived_from_a_section_that_did_not_run() -> None:
    figures = {"load.mixed.cpu_pct_per_stream": 1.3}
    derive(figures)
    assert figures == {"load.mixed.cpu_pct_per_stream": 1.3}


def test_every_load_figure_beside_the_goals_is_one_a_case_collects_or_derive_makes() -> None:
    inputs = {
        "ours.mp3.defaults.cpu": 1.2,
        "ours.passthrough.cpu": 0.02,
        "load.mixed.cpu_pct_per_stream": 1.3,
    }
    figures = dict(inputs)
    derive(figures)
    derived = set(figures) - set(inputs)
    named = [goal[0] for goal in ISSUE_GOALS] + [key for key, _ in ISSUE_REPORTED]
    for key in (k for k in named if k.startswith("load.")):
        _, case, figure = key.split(".", 2)
        assert case in LOAD_CASES, key
        assert figure in CASE_KEYS or key in derived, key
    assert "load.mixed.reanchored_in_pause" in named
    assert "load.mixed.machine_pause_max_ms" in named
