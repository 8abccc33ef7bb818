"""The main gateway resumes while Legato plays: the listener hears no interruption.

A real discord.py bot with Legato plays a chirp (its frequency tells the position) into the
sandbox. The sandbox's gateway then drops the bot's socket and refuses to let it resume for two
seconds of audio, and later sends op7 RECONNECT; each time discord.py resumes the session. The
voice connection is Legato's own and must not notice: one RTP stream throughout (no new voice
session), no sequence gaps, no silence, and the chirp's position advancing 20 ms a frame across
both resumes (nothing skipped or repeated).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Final

import pytest

from legato.audio.encode import OpusDecoder
from legato.audio.sink import OPUS_SILENCE
from legato.config import Config, PlaybackConfig, VoiceConfig
from legato.sandbox.analysis import dominant_frequency, pcm_to_mono
from legato.sandbox.recording import Recording
from legato.sandbox.server import Sandbox
from tests.e2e.test_music_cog import MusicBot, answer, running
from tests.media import MediaServer, ToneSpec

pytestmark = pytest.mark.e2e

GUARD: Final = 30.0
#: 200 Hz to 2000 Hz over 60 s: 30 Hz a second.
CHIRP: Final = ToneSpec("ogg", "libopus", 200.0, seconds=60.0, freq_end=2000.0)
#: Frames heard before, during, between and after the two resumes.
STRETCH: Final = 100
#: Frames per analysis window (0.5 s) and how far the measured position may stray from the one
#: the frame count gives (the estimate's own error is a few hundredths).
WINDOW: Final = 25
TOLERANCE: Final = 0.15


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MediaServer]:
    root = tmp_path_factory.mktemp("gateway-resume")
    CHIRP.write(root / "chirp.ogg")
    with MediaServer(root) as server:
        yield server


def positions(frames: list[bytes]) -> list[float]:
    """The chirp position at the start of each whole window of ``frames`` (one decoder)."""
    decoder = OpusDecoder()
    pcm = [decoder.decode(f) for f in frames]
    out = []
    for start in range(WINDOW, len(pcm) - WINDOW + 1, WINDOW):  # the first window warms up
        mono = pcm_to_mono(b"".join(pcm[start : start + WINDOW]))
        out.append(CHIRP.time_of(dominant_frequency(mono)) - WINDOW / 2 * 0.02)
    return out


def make_config(media: MediaServer) -> Config:
    return Config(
        voice=VoiceConfig(transport="udp"),
        playback=PlaybackConfig(
            idle_timeout=0,
            leave_when_alone_after=0,
            allowed_hosts=(f"127.0.0.1:{media.port}",),
        ),
    )


async def test_playback_goes_on_through_gateway_resumes(media: MediaServer) -> None:
    config = make_config(media)
    async with Sandbox(timeout=GUARD) as sb:
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        async with running(sb, config, MusicBot(config, sb.guild.id)) as bot:
            text = await answer(await alice.invoke("play", query=media.url("chirp.ogg")))
            assert text.startswith("Playing"), text
            rec: Recording = sb.voice_server.recording(sb.bot.id, server_id=sb.guild.id)
            await rec.wait_frames(STRETCH, timeout=GUARD)

            # The socket drops and the gateway stays away for two seconds of audio.
            resumed = asyncio.ensure_future(bot.wait_for("resumed", timeout=GUARD))
            async with sb.gateway.offline():
                await rec.wait_frames(rec.frames + STRETCH, timeout=GUARD)
                assert not resumed.done()
            await resumed
            assert len(sb.gateway.resumes) == 1
            await rec.wait_frames(rec.frames + STRETCH, timeout=GUARD)

            resumed = asyncio.ensure_future(bot.wait_for("resumed", timeout=GUARD))
            sb.gateway.send_reconnect()
            await resumed
            assert len(sb.gateway.resumes) == 2
            await rec.wait_frames(rec.frames + STRETCH, timeout=GUARD)

            assert sb.gateway.identifies == 1  # resumed both times, never a new session
            session = bot.music.session(sb.guild.id)
            assert session is not None
            assert session.player.stats.reconnects == 0

        stats = rec.stats()
        assert stats.streams == 1, stats  # the voice connection was never redone
        assert stats.gaps == 0, stats
        assert stats.sequence_errors == 0, stats
        assert stats.timestamp_errors == 0, stats
        frames = rec.opus_frames()
        first = next(i for i, f in enumerate(frames) if f != OPUS_SILENCE)
        # Up to the bot's own leave at the end (trailing silence), not one frame of silence.
        audible = frames[first:]
        while audible and audible[-1] == OPUS_SILENCE:
            audible.pop()
        assert len(audible) >= 4 * STRETCH
        assert OPUS_SILENCE not in audible
        heard = await asyncio.to_thread(positions, audible)
        base = heard[0]
        for k, position in enumerate(heard):
            expected = base + k * WINDOW * 0.02
            assert abs(position - expected) <= TOLERANCE, (k, position, expected)


async def test_voice_survives_a_new_gateway_session_and_still_obeys(media: MediaServer) -> None:
    """op9 (not resumable): discord.py identifies anew and forgets its voice clients; the music
    goes on, and Legato's client still gets the gateway's voice events (a move works)."""
    config = make_config(media)
    async with Sandbox(timeout=GUARD) as sb:
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        async with running(sb, config, MusicBot(config, sb.guild.id)) as bot:
            text = await answer(await alice.invoke("play", query=media.url("chirp.ogg")))
            assert text.startswith("Playing"), text
            rec: Recording = sb.voice_server.recording(sb.bot.id, server_id=sb.guild.id)
            await rec.wait_frames(STRETCH, timeout=GUARD)
            sb.gateway.invalidate_session(resumable=False)
            await sb.wait_for(lambda: sb.gateway.identifies == 2)
            await rec.wait_frames(rec.frames + STRETCH, timeout=GUARD)
            session = bot.music.session(sb.guild.id)
            guild = bot.get_guild(sb.guild.id)
            assert guild is not None
            assert guild.voice_client is session.voice

            text = await answer(await alice.invoke("join", options={"channel": sb.lounge}))
            assert "Lounge" in text or str(sb.lounge.id) in text, text
            await sb.wait_bot_voice(sb.lounge)
            await rec.wait_frames(rec.frames + STRETCH, timeout=GUARD)
            assert bot.music.session(sb.guild.id) is session

        stats = rec.stats()
        assert stats.gaps == 0, stats
        frames = rec.opus_frames()
        first = next(i for i, f in enumerate(frames) if f != OPUS_SILENCE)
        audible = frames[first:]
        while audible and audible[-1] == OPUS_SILENCE:
            audible.pop()
        assert len(audible) >= 3 * STRETCH
        assert OPUS_SILENCE not in audible
