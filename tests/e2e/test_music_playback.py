"""What the listener hears from the Music cog: transports, loops, seeks, searches, idle answers.

A real discord.py Bot loads ``legato`` and plays into the sandbox (the harness of
``test_music_cog``). The tracks here change over time (a tone that steps to another frequency),
so the recording tells where in a track the bot is: a seek, or a track starting over, shows as
a change of frequency heard.
"""

from __future__ import annotations

import asyncio
import dataclasses
import urllib.parse
from collections.abc import Sequence
from typing import Literal

import pytest

from legato.audio.encode import OpusDecoder
from legato.audio.player import PlayerState
from legato.config import Config
from legato.sandbox.analysis import dominant_frequency, pcm_to_mono, rms
from legato.sandbox.recording import Recording
from legato.sandbox.server import Sandbox
from legato.sandbox.voice import SandboxVoiceServer
from tests.e2e.test_music_cog import (
    A_HZ,
    B_HZ,
    EXPECTED_PATH,
    GUARD,
    Tones,
    _search_page,
    answer,
    heard,
    make_config,
    recording,
    refused,
    running,
    start_playing,
)
from tests.media import audio_list_page, write_steps, write_tone

pytestmark = pytest.mark.e2e

# Every test but the transport one runs on each voice path (path_sandbox, from conftest:
# Discord's v8/udp/DAVE, a self-hosted server's v6/webrtc); that one forces each transport on
# Discord's path.

C_HZ = 660.0
D_HZ = 990.0
#: Frames per analysis window: 200 ms, enough for a clean frequency, short against a segment.
WINDOW = 10
#: A window this quiet (RMS, full scale 1.0) is silence, not the track.
QUIET = 0.02
#: A window within this many Hz of a tone is that tone; windows across a change are neither.
TOLERANCE = 20.0


@dataclasses.dataclass
class Steps:
    """Tracks whose frequency tells the position."""

    short: str  # A_HZ for 1 s, then B_HZ for 1 s
    long: str  # A_HZ for 10 s, then B_HZ for 10 s
    pair: str  # a page listing two 1 s tones: C_HZ, then D_HZ


@pytest.fixture(scope="module")
def steps(tones: Tones) -> Steps:
    root = tones.root
    write_steps(root / "steps2.ogg", [(A_HZ, 1), (B_HZ, 1)], container="ogg", codec="libopus")
    write_steps(root / "steps20.ogg", [(A_HZ, 10), (B_HZ, 10)], container="ogg", codec="libopus")
    write_tone(root / "c660.ogg", container="ogg", codec="libopus", freq=C_HZ, seconds=1)
    write_tone(root / "d990.ogg", container="ogg", codec="libopus", freq=D_HZ, seconds=1)
    server = tones.server
    return Steps(
        short=server.url("steps2.ogg"),
        long=server.url("steps20.ogg"),
        pair=server.add_route(
            "pair.html", body=audio_list_page("Pair", ["/c660.ogg", "/d990.ogg"])
        ),
    )


def with_transport(config: Config, transport: Literal["udp", "webrtc"]) -> Config:
    return dataclasses.replace(config, voice=dataclasses.replace(config.voice, transport=transport))


async def windows(rec: Recording, start: int, count: int) -> list[float]:
    """Wait for frames ``start .. start+count``; the dominant Hz of each window (0.0: quiet)."""
    await rec.wait_frames(start + count, timeout=GUARD)
    packets = rec.opus_frames()[start : start + count]

    def analyse() -> list[float]:
        decoder = OpusDecoder()
        mono = pcm_to_mono(b"".join(decoder.decode(p) for p in packets))
        size = 960 * WINDOW
        found = []
        for i in range(0, mono.size - size + 1, size):
            part = mono[i : i + size]
            found.append(dominant_frequency(part) if rms(part) > QUIET else 0.0)
        return found

    return await asyncio.to_thread(analyse)


def runs(found: Sequence[float], tones: Sequence[float]) -> list[float]:
    """The tones heard, in order, a tone heard for consecutive windows told once.

    Quiet windows and windows across a change of tone (near none of ``tones``) are left out.
    """
    out: list[float] = []
    for freq in found:
        tone = next((t for t in tones if abs(freq - t) <= TOLERANCE), None)
        if tone is not None and (not out or out[-1] != tone):
            out.append(tone)
    return out


# --- transports -------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "webrtc"])
async def test_play_and_skip_are_heard_over_each_transport(
    sandbox: Sandbox, tones: Tones, transport: Literal["udp", "webrtc"]
) -> None:
    sb = sandbox
    async with running(sb, with_transport(make_config(tones), transport)) as bot:
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        await start_playing(sb, alice, tones.a)
        await start_playing(sb, alice, tones.b)
        voice = sb.voice
        assert isinstance(voice, SandboxVoiceServer)
        assert voice.session(bot.user.id).protocol == transport

        rec = recording(sb)
        await rec.wait_speaking(True, timeout=GUARD)
        freq, level = await heard(rec, 50, skip=10)
        assert freq == pytest.approx(A_HZ, abs=15)
        assert level > 0.1

        skipped = await alice.invoke("skip")
        assert "Skipped **a440**" in skipped.text()
        freq, _ = await heard(rec, 40, skip=25)
        assert freq == pytest.approx(B_HZ, abs=20)
        assert rec.stats().gaps == 0


# --- the voice path ---------------------------------------------------------------------------


async def test_legato_takes_each_voice_path_by_itself(path_sandbox: Sandbox, tones: Tones) -> None:
    """``auto`` settings, and the endpoint alone decides: v8/udp/DAVE toward Discord's form."""
    sb = path_sandbox
    async with running(sb, make_config(tones)) as bot:
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        await start_playing(sb, alice, tones.a)
        rec = recording(sb)
        await rec.wait_speaking(True, timeout=GUARD)
        freq, _ = await heard(rec, 25, skip=10)
        assert freq == pytest.approx(A_HZ, abs=15)
        voice = sb.voice_server
        (info,) = [s for s in voice.selections if s.user_id == bot.user.id]
        expected = EXPECTED_PATH["v8-udp-dave" if voice.tls else "v6-webrtc-plain"]
        assert (info.version, info.protocol, info.dave_protocol_version) == expected
        if info.dave_protocol_version:
            assert info.mode == "aead_aes256_gcm_rtpsize"
            assert voice.stats.dave_plaintext_dropped == 0
            assert voice.stats.dave_undecryptable == 0


# --- loops ------------------------------------------------------------------------------------


async def test_loops_are_heard_repeating(path_sandbox: Sandbox, tones: Tones, steps: Steps) -> None:
    sb = path_sandbox
    async with running(sb, make_config(tones)) as bot:
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        assert "Joined" in await answer(await alice.invoke("join"))
        await sb.wait_bot_voice(sb.general)
        session = bot.music.session(sb.guild.id)
        assert session is not None

        # Loop the track: 2 s (A, then B) is heard starting over: A B A B A, five seconds.
        looped = await alice.invoke("loop", mode="track")
        assert looped.text() == "Loop: track."
        await start_playing(sb, alice, steps.short)
        rec = recording(sb)
        heard_tones = runs(await windows(rec, 0, 300), [A_HZ, B_HZ])
        assert heard_tones[:5] == [A_HZ, B_HZ, A_HZ, B_HZ, A_HZ], heard_tones

        # Loop off: the play under way is the last one.
        off = await alice.invoke("loop", mode="off")
        assert off.text() == "Loop: off."
        async with asyncio.timeout(GUARD):
            await session.player.wait_for(PlayerState.IDLE)
        await rec.wait_speaking(False, timeout=GUARD)
        # Counted after a round trip (trailing silence may trail op5); then nothing more comes.
        await alice.invoke("queue")
        ended = rec.frames
        await refused(await alice.invoke("nowplaying"), "Nothing is playing.")
        assert rec.frames == ended

        # Loop the queue: two 1 s tones from one playlist, C D C D.
        assert (await alice.invoke("loop", mode="queue")).text() == "Loop: queue."
        added = await alice.invoke("play", query=steps.pair)
        assert "Queued 2 tracks" in await answer(added)
        heard_tones = runs(await windows(rec, ended, 250), [C_HZ, D_HZ])
        assert heard_tones[:4] == [C_HZ, D_HZ, C_HZ, D_HZ], heard_tones
        stopped = await alice.invoke("stop")
        assert stopped.text() == "Stopped and cleared the queue."


# --- seeking ----------------------------------------------------------------------------------


async def test_seek_moves_what_is_heard(path_sandbox: Sandbox, tones: Tones, steps: Steps) -> None:
    sb = path_sandbox
    async with running(sb, make_config(tones)):
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        await start_playing(sb, alice, steps.long)  # A until 0:10, then B
        rec = recording(sb)
        await rec.wait_speaking(True, timeout=GUARD)
        assert runs(await windows(rec, 0, 40), [A_HZ, B_HZ]) == [A_HZ]

        # Forward past the step: B at once, some 9 s before the track itself gets there.
        sought = await alice.invoke("seek", position="0:11")
        assert "Jumped to 0:11" in await answer(sought)
        assert runs(await windows(rec, rec.frames + 5, 60), [A_HZ, B_HZ]) == [B_HZ]

        # And back before it.
        back = await alice.invoke("seek", position="0:03")
        assert "Jumped to 0:03" in await answer(back)
        assert runs(await windows(rec, rec.frames + 5, 60), [A_HZ, B_HZ]) == [A_HZ]


# --- searching, joining a named channel, answers while idle ----------------------------------


async def test_search_words_join_a_named_channel_and_idle_answers(
    path_sandbox: Sandbox, tones: Tones
) -> None:
    sb = path_sandbox
    search = tones.server.add_route("words", handler=_search_page([tones.b, tones.a]))
    async with running(sb, make_config(tones, search_provider=search + "?q={query}")) as bot:
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)

        # /join with a channel goes there, not to the caller's.
        joined = await alice.invoke("join", options={"channel": sb.lounge})
        assert await answer(joined) == f"Joined <#{sb.lounge.id}>."
        assert joined.ephemeral
        await sb.wait_bot_voice(sb.lounge)
        await alice.join_voice(sb.lounge)

        # Connected, nothing playing: each answer is an ephemeral sentence.
        for command in ("skip", "nowplaying", "pause"):
            assert await refused(await alice.invoke(command), "Nothing is playing.")
        assert bot.music.session(sb.guild.id) is not None

        # Words, not a link: the search page is asked and its first result plays.
        played = await alice.invoke("play", query="eight eighty")
        # (The generic extractor titles a page's entries after the page: "Results (1)".)
        assert (await answer(played)).startswith("Playing **")
        session = bot.music.session(sb.guild.id)
        assert session.player.current.url == tones.b
        asked = [r.target for r in tones.server.request_log if r.path == "/words"]
        assert asked
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(asked[-1]).query)
        assert query["q"] == ["eight eighty"]
        freq, _ = await heard(recording(sb), 40, skip=10)
        assert freq == pytest.approx(B_HZ, abs=20)
        assert list(session.queue.upcoming) == []  # a search queues its first result only
