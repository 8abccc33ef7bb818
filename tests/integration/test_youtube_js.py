"""YouTube's JavaScript challenges, offline: yt-dlp in this venv finds the Deno and the EJS scripts
Legato installs, and its solver runs under that Deno on a player script kept in the tests.

``tests/js/challenge_player.js`` is a synthetic player with the shape yt-dlp-ejs looks for (see
its header); yt-dlp's own challenge director is handed it as a player it already downloaded, and
solves "n" and signature challenges through the Deno provider, as it does for a real video.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any

import pytest
import yt_dlp
from yt_dlp.extractor.youtube.jsc.provider import (
    JsChallengeRequest,
    JsChallengeType,
    NChallengeInput,
    SigChallengeInput,
)

from legato.audio.resolve import worker_context
from legato.audio.sources import SourceSettings, bundled_deno, ydl_params
from legato.doctor import Status, check_all

pytestmark = pytest.mark.integration

PLAYER = Path(__file__).resolve().parents[1] / "js" / "challenge_player.js"
PLAYER_URL = "https://www.youtube.com/s/player/0123abcd/player_ias.vflset/en_US/base.js"


class Lines:
    """A yt-dlp logger that keeps what it is told."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def debug(self, msg: str) -> None:
        self.lines.append(msg)

    info = warning = error = debug


def youtube_dl(logger: Lines, *, verbose: bool = False) -> Any:
    options = {"quiet": True, "cachedir": False, "logger": logger, "verbose": verbose}
    return yt_dlp.YoutubeDL({**options, **ydl_params(SourceSettings())})


def test_yt_dlp_detects_the_bundled_deno_and_the_ejs_scripts() -> None:
    logger = Lines()
    with youtube_dl(logger, verbose=True):  # verbose: yt-dlp writes its debug header
        pass
    header = {
        line.split(": ", 1)[0]: line.split(": ", 1)[1]
        for line in logger.lines
        if line.startswith("[debug] ") and ": " in line
    }
    assert header["[debug] JS runtimes"].startswith("deno-2.")
    assert "(unsupported)" not in header["[debug] JS runtimes"]
    assert "yt_dlp_ejs-" in header["[debug] Optional libraries"]
    assert str(bundled_deno()) in header["[debug] params"]  # the path Legato gave it


def test_the_solver_runs_under_deno_on_a_stored_player() -> None:
    logger = Lines()
    with youtube_dl(logger) as ydl:
        youtube = ydl.get_info_extractor("Youtube")
        youtube.initialize()
        # As if yt-dlp had downloaded this player for a video: no network.
        key = youtube._player_js_cache_key(PLAYER_URL)
        youtube._code_cache[key] = PLAYER.read_text(encoding="utf-8")
        solved = youtube._jsc_director.bulk_solve(
            [
                JsChallengeRequest(
                    JsChallengeType.N, NChallengeInput(PLAYER_URL, ["abcdef", "Zq9-x_"]), "vid"
                ),
                JsChallengeRequest(
                    JsChallengeType.SIG, SigChallengeInput(PLAYER_URL, ["0123456789AB"]), "vid"
                ),
            ]
        )
    results = {request.type: response.output.results for request, response in solved}
    # The player's transforms (see its header), worked out here independently.
    assert results[JsChallengeType.N] == {"abcdef": "fedcba.6", "Zq9-x_": "_x-9qZ.6"}
    assert results[JsChallengeType.SIG] == {"0123456789AB": "A9876543210"}


def test_resolver_worker_processes_find_the_same_runtime() -> None:
    here = {r.check: r for r in check_all(None)}
    context = worker_context()
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        params = pool.submit(ydl_params, SourceSettings()).result(timeout=60)
        there = {r.check: r for r in pool.submit(check_all, None).result(timeout=60)}
    assert params == ydl_params(SourceSettings())
    for check in ("JS runtime", "EJS scripts"):
        assert there[check] == here[check]
        assert there[check].status is Status.OK
