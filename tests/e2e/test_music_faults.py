"""Source faults a listener lives through: a real discord.py Bot with Legato plays into the sandbox.

- A stream URL that expires mid-track (the server cuts the download and refuses FFmpeg's
  reconnect with 403; the page names a new URL when asked again): the track is resolved again
  and goes on from where it broke off, with no notice.
- A server that stops sending mid-track: silence goes out in its place (speaking stays on)
  for ``stall_timeout``, then the track is skipped with a notice and the next one is heard.

The media servers are :func:`tests.media.expiring_stream` and a ``stall_after`` route, the same
ones the player's own tests (``tests/integration/test_player_real.py``) use. What was heard is
read from the sandbox's recording: Legato's Opus silence frame tells the fill apart from audio.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

import numpy as np
import pytest
from numpy.typing import NDArray

from legato.audio.encode import OpusDecoder
from legato.audio.player import PlayerState
from legato.audio.sink import OPUS_SILENCE
from legato.audio.source import SAMPLE_RATE
from legato.sandbox.analysis import dominant_frequency, pcm_to_mono, rms
from legato.sandbox.server import Sandbox
from tests.e2e import test_music_cog
from tests.e2e.test_music_admin import add_admin, fields
from tests.e2e.test_music_cog import (
    GUARD,
    Tones,
    answer,
    make_config,
    recording,
    running,
    start_playing,
)
from tests.media import expected_frames, expiring_stream, write_steps, write_tone

pytestmark = pytest.mark.e2e

#: One second each: what is heard at a time tells where in the track the bot is.
STEPS = ((440.0, 1.0), (660.0, 1.0), (880.0, 1.0))
AFTER_HZ = 550.0
STALL_HZ = 660.0
B_HZ = test_music_cog.B_HZ
STALLED = "The track's server stopped sending audio."
_EXPIRING_RUNS = itertools.count(1)


def decode(frames: Sequence[bytes]) -> NDArray[np.float64]:
    """Mono samples of ``frames`` (one decoder, in order)."""
    decoder = OpusDecoder()
    return pcm_to_mono(b"".join(decoder.decode(f) for f in frames))


def tone(frames: Sequence[bytes]) -> float:
    """The dominant frequency of ``frames``, which must not be near silence."""
    mono = decode(frames)
    assert rms(mono) > 0.1, "near silence"
    return dominant_frequency(mono)


async def test_an_expired_stream_url_is_resolved_again_and_heard_to_its_end(
    path_sandbox: Sandbox, tones: Tones
) -> None:
    sb = path_sandbox
    server = tones.server
    body = write_steps(
        tones.root / "faults-steps.mp3", STEPS, container="mp3", codec="libmp3lame", rate=44100
    )
    # A name of its own each run: the module's media server keeps counting a route's requests,
    # and the page names the renewed URL once the first was asked twice (by any earlier run).
    urls = expiring_stream(server, f"faults-expiring-{next(_EXPIRING_RUNS)}", body, renewed=True)
    write_tone(
        tones.root / "faults-after.ogg", container="ogg", codec="libopus", freq=AFTER_HZ, seconds=1
    )
    async with running(sb, make_config(tones)) as bot:
        alice = sb.add_user("alice")
        ada = add_admin(sb, "ada")
        await alice.join_voice(sb.general)
        await start_playing(sb, alice, urls.page)
        await start_playing(sb, alice, server.url("faults-after.ogg"))
        session = bot.music.session(sb.guild.id)
        rec = recording(sb)
        async with asyncio.timeout(GUARD):
            await session.player.wait_for(PlayerState.IDLE)
        await rec.wait_speaking(False, timeout=GUARD)

        # The first URL broke off and refused FFmpeg's reconnect; the page, asked again,
        # named the second, which the track was read on from.
        assert server.request_count(urls.first, "GET") == 2
        assert server.request_count(urls.second, "GET") >= 1
        stats = session.stats.player
        assert (stats.reopens, stats.source_errors) == (1, 0)
        shown = await ada.invoke("music debug")
        await answer(shown)
        assert fields(shown)["Errors"].split("\n")[:2] == ["source 0", "reopens 1"]

        # One speaking burst for both tracks, and every step heard at its time: nothing was
        # skipped or played twice across the reopen (silence may have stood in while it ran).
        assert [c.on for c in rec.speaking_changes] == [True, False]
        audio = [f for f in rec.opus_frames() if f != OPUS_SILENCE]
        track, after = audio[: expected_frames(3.0)], audio[expected_frames(3.0) :]
        assert abs(len(after) - expected_frames(1.0)) <= 3
        mono = await asyncio.to_thread(decode, track)
        for i, (freq, _) in enumerate(STEPS):
            window = mono[int((i + 0.25) * SAMPLE_RATE) : int((i + 0.75) * SAMPLE_RATE)]
            found = dominant_frequency(window)
            assert found == pytest.approx(freq, abs=3.0), f"step {i}"
        assert await asyncio.to_thread(tone, after[10:]) == pytest.approx(AFTER_HZ, abs=3.0)

        # No failure was told: the channel has the two announcements and nothing else.
        posts = sb.messages(sb.music)
        assert not [m for m in posts if "Skipped" in m.content], [m.content for m in posts]


async def test_a_stalled_server_is_heard_as_silence_then_skipped_with_a_notice(
    path_sandbox: Sandbox, tones: Tones
) -> None:
    sb = path_sandbox
    # The stall comes after FFmpeg's probing (which reads the first seconds at open): 6 s in.
    body = write_tone(
        tones.root / "faults-stalls.mp3",
        container="mp3",
        codec="libmp3lame",
        freq=STALL_HZ,
        seconds=8.0,
    )
    url = tones.server.add_route(
        "faults-stalls.mp3", body=body, stall_after=body.stat().st_size * 3 // 4
    )
    # Given up after 1 s without audio; the decoder's own read timeout is longer.
    config = make_config(tones, stall_timeout=1.0, stream_timeout=3.0)
    async with running(sb, config) as bot:
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        await start_playing(sb, alice, url)
        await start_playing(sb, alice, tones.b)
        rec = recording(sb)

        notice = await sb.wait_for_message(sb.music, lambda m: m.content.endswith(STALLED))
        assert notice.content.startswith("Skipped **")
        assert "://" not in notice.content
        # Then the next track is heard.
        await rec.wait_frames(rec.frames + 60, timeout=GUARD)
        session = bot.music.session(sb.guild.id)
        assert session.player.current.url == tones.b
        assert session.stats.player.source_errors == 1

        # Speaking went on once and stayed on: through the stall and into the next track.
        assert [c.on for c in rec.speaking_changes] == [True]
        frames = rec.opus_frames()
        silent = [f == OPUS_SILENCE for f in frames]
        # The longest run of silence is the stall's fill, stall_timeout long (counted from when
        # the missing frame was due; the first silence frame goes out one frame after that).
        start, length, i = 0, 0, 0
        while i < len(silent):
            j = i
            while j < len(silent) and silent[j]:
                j += 1
            if j - i > length:
                start, length = i, j - i
            i = j + 1
        assert length >= expected_frames(1.0) - 1
        before = [f for f, s in zip(frames[:start], silent[:start], strict=True) if not s]
        next_track = [f for f in frames[start + length :] if f != OPUS_SILENCE]
        assert abs(len(before) - expected_frames(6.0)) <= 15
        assert await asyncio.to_thread(tone, before) == pytest.approx(STALL_HZ, abs=3.0)
        assert len(next_track) >= 40
        assert await asyncio.to_thread(tone, next_track[10:]) == pytest.approx(B_HZ, abs=3.0)
