"""DAVE end to end against the sandbox voice server: the listener decrypts what clients send.

The sandbox plays Discord's part (external sender, proposals, commit/welcome relay,
transitions) and a listener member inside it decrypts each sender's frames before they are
recorded; :meth:`SandboxVoiceServer.dave_wire_frames` keeps what the server itself received.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import discord
import discord.http
import pytest

from legato.audio.player import GuildPlayer, PlayerState
from legato.audio.source import FrameSource
from legato.audio.track import Track
from legato.sandbox.analysis import pcm_to_mono
from legato.sandbox.dave import DAVE_MAGIC_MARKER
from legato.sandbox.recording import Recording
from legato.sandbox.voice import DAVE_LISTENER_ID, SandboxVoiceServer
from legato.voice.gateway import VoiceConnection, VoiceOptions
from tests.integration.dpy_voice import (
    BOT_ID,
    GUARD,
    GUILD_ID,
    TONE_FRAMES,
    TONE_HZ,
    FakeGuild,
    SineSource,
    dpy_http,
    play_to_end,
    stock_voice_client,
)
from tests.integration.dpy_voice import CHANNEL_ID as DPY_CHANNEL_ID
from tests.integration.voice_support import FRAME_S, Player, tone_frames, voice_server

pytestmark = pytest.mark.integration


@pytest.fixture
async def dave_server() -> AsyncIterator[SandboxVoiceServer]:
    async with SandboxVoiceServer(tls=True, dave_protocol_version=1) as srv:
        yield srv


@pytest.fixture(name="dpy_http")
async def dpy_http_fixture(
    dave_server: SandboxVoiceServer,
) -> AsyncIterator[discord.http.HTTPClient]:
    async with dpy_http(dave_server) as client:
        yield client


def _wire_tone_share(frames: list[bytes], freq: float) -> float | None:
    """What the server would hear decoding its own copy: the share of its energy within 10 Hz
    of ``freq`` (a clean tone: nearly all of it); None when libopus refuses the frames.

    An energy share, not the dominant frequency: the noise that random bytes decode to has its
    strongest bin anywhere, now and then near the tone, but never most of its energy there.
    """
    import numpy as np
    import opuslib

    decoder = opuslib.Decoder(48_000, 2)
    pcm = bytearray()
    for frame in frames:
        try:
            pcm += decoder.decode(frame, 960)
        except opuslib.OpusError:
            continue
    if len(pcm) < 48_000:
        return None
    mono = pcm_to_mono(bytes(pcm))
    power = np.abs(np.fft.rfft((mono - mono.mean()) * np.hanning(mono.size))) ** 2
    hz = np.fft.rfftfreq(mono.size, 1 / 48_000)
    total = float(power.sum())
    return float(power[np.abs(hz - freq) <= 10.0].sum()) / total if total > 0 else 0.0


async def _recording_problems(rec: Recording, tone_frames: int) -> list[str]:
    """The recording check: what keeps ``rec`` from being the whole tone, heard as a Discord
    user hears it (frames the listener dropped are lost, not heard)."""
    problems = []
    stats = rec.stats()
    if stats.frames < tone_frames:
        problems.append(f"heard {stats.frames} frames of {tone_frames}")
    if stats.gaps:
        problems.append(f"{stats.gaps} frames lost ({stats.dropped} dropped by the listener)")
    freq = await asyncio.to_thread(rec.dominant_frequency)
    if abs(freq - TONE_HZ) > 2.0:
        problems.append(f"dominant frequency {freq:.1f} Hz, not {TONE_HZ:g} Hz")
    return problems


async def _dpy_plays_a_tone(
    server: SandboxVoiceServer, http: discord.http.HTTPClient
) -> tuple[discord.VoiceClient, Recording]:
    """discord.py's stock client joins the DAVE channel, waits for its group, plays the tone
    (and its five silence frames) and leaves; the tone's arrival is awaited, heard or not."""
    guild = FakeGuild(server, dave_group=True)
    vc, _ = stock_voice_client(guild, http)
    await vc.connect(reconnect=False, timeout=GUARD)
    await server.wait_event("dave_execute", BOT_ID, timeout=GUARD)
    errors = await play_to_end(vc, SineSource(TONE_FRAMES))
    recording = server.recording(BOT_ID)
    await recording.wait_arrivals(TONE_FRAMES + 5, timeout=GUARD)
    await guild.leave()
    assert errors == [None]
    return vc, recording


async def test_a_client_that_never_encrypts_is_not_heard_and_fails_the_recording_check(
    dave_server: SandboxVoiceServer,
    dpy_http: discord.http.HTTPClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A misbehaving peer: discord.py's client patched never to DAVE-encrypt what it sends.
    monkeypatch.setattr(
        discord.voice_state.VoiceConnectionState, "can_encrypt", property(lambda self: False)
    )
    _, recording = await _dpy_plays_a_tone(dave_server, dpy_http)
    dave = dave_server.dave_channel(GUILD_ID, DPY_CHANNEL_ID)
    # Every tone frame arrived as plaintext from a member whose group was in force: dropped and
    # lost, as Discord's receivers drop them. Only the trailing silence is heard.
    wire = dave_server.dave_wire_frames(BOT_ID, GUILD_ID)
    assert len([f for f in wire if f != SILENCE]) == TONE_FRAMES
    assert not any(f.endswith(DAVE_MAGIC_MARKER) for f in wire)
    stats = recording.stats()
    assert stats.dropped == TONE_FRAMES
    assert stats.frames == 5
    assert stats.gaps == TONE_FRAMES
    assert dave.listener.stats.plaintext_dropped == TONE_FRAMES
    assert dave.listener.stats.plaintext == 0
    assert dave_server.stats.dave_plaintext_dropped == TONE_FRAMES
    problems = await _recording_problems(recording, TONE_FRAMES)
    assert f"heard 5 frames of {TONE_FRAMES}" in problems
    assert f"{TONE_FRAMES} frames lost ({TONE_FRAMES} dropped by the listener)" in problems


async def test_discord_py_plays_with_its_own_dave_and_the_listener_hears_it(
    dave_server: SandboxVoiceServer, dpy_http: discord.http.HTTPClient
) -> None:
    guild = FakeGuild(dave_server, dave_group=True)
    vc, _ = stock_voice_client(guild, dpy_http)

    await vc.connect(reconnect=False, timeout=GUARD)
    # The listener founds the group and welcomes discord.py; op22 executes it.
    await dave_server.wait_event("dave_execute", BOT_ID, timeout=GUARD)
    # discord.py is in the group (its public privacy code is the group's); that it encrypts is
    # shown by the frames below, which all carry DAVE's marker.
    assert vc.voice_privacy_code is not None
    dave = dave_server.dave_channel(GUILD_ID, DPY_CHANNEL_ID)
    assert set(dave.server.group_members) == {DAVE_LISTENER_ID, BOT_ID}
    assert vc.voice_privacy_code is not None
    assert vc.voice_privacy_code == dave.listener.client.privacy_code

    errors = await play_to_end(vc, SineSource(TONE_FRAMES))
    recording = dave_server.recording(BOT_ID)
    await recording.wait_frames(TONE_FRAMES + 5, timeout=GUARD)
    await guild.leave()

    assert errors == [None]
    assert dave_server.stats.dave_undecryptable == 0
    assert recording.stats().gaps == 0
    freq = await asyncio.to_thread(recording.dominant_frequency)
    assert freq == pytest.approx(TONE_HZ, abs=2.0)
    # The server's own copy: DAVE frames (silence aside), which are not the tone.
    wire = dave_server.dave_wire_frames(BOT_ID, GUILD_ID)
    tone = [f for f in wire if f != b"\xf8\xff\xfe"]
    assert len(tone) == TONE_FRAMES
    assert all(f.endswith(DAVE_MAGIC_MARKER) for f in tone)
    share = await asyncio.to_thread(_wire_tone_share, tone, TONE_HZ)
    assert share is None or share < 0.25
    assert dave.listener.stats.decrypted == TONE_FRAMES
    assert dave.server.stats.bad_commits == 0
    assert await _recording_problems(recording, TONE_FRAMES) == []


async def test_a_client_without_dave_is_closed_with_4017(dave_server: SandboxVoiceServer) -> None:
    token = dave_server.register_session(server_id=GUILD_ID, user_id=77, session_id="s77")
    assert dave_server.certificate is not None
    identify = {"server_id": str(GUILD_ID), "user_id": "77", "session_id": "s77", "token": token}
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(
            dave_server.url + "/?v=8", ssl=dave_server.certificate.client_context()
        ) as ws,
    ):
        await ws.receive_json()  # op8 hello
        await ws.send_json({"op": 0, "d": identify})  # no max_dave_protocol_version
        msg = await ws.receive()
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 4017


# -- Legato's own client ----------------------------------------------------------------------

LEGATO_GUILD = 1001
LEGATO_CHANNEL = 2002
LEGATO_BOT = 4242
OTHER_USER = 5353
SILENCE = b"\xf8\xff\xfe"


@asynccontextmanager
async def legato(
    server: SandboxVoiceServer, user_id: int, transport: str = "udp"
) -> AsyncIterator[VoiceConnection]:
    """Legato's VoiceConnection (v8, DAVE offered) identified in the DAVE channel."""
    token = server.register_session(
        server_id=LEGATO_GUILD,
        user_id=user_id,
        session_id=f"s{user_id}",
        channel_id=LEGATO_CHANNEL,
    )
    conn = VoiceConnection(
        endpoint=server.endpoint,
        token=token,
        session_id=f"s{user_id}",
        user_id=user_id,
        server_id=LEGATO_GUILD,
        channel_id=LEGATO_CHANNEL,
        options=VoiceOptions(transport=transport, gateway_version=8),  # type: ignore[arg-type]  # parametrized literal
    )
    await conn.connect()
    try:
        yield conn
    finally:
        await conn.close()


async def _assert_heard(server: SandboxVoiceServer, user_id: int, frames_sent: int) -> None:
    rec = server.recording(user_id, LEGATO_GUILD)
    await rec.wait_frames(int(frames_sent * 0.98), timeout=GUARD)
    await rec.wait_speaking(False, timeout=GUARD)
    stats = rec.stats()
    assert stats.frames >= 0.98 * frames_sent
    assert stats.gaps == 0
    assert server.stats.dave_undecryptable == 0
    freq = await asyncio.to_thread(rec.dominant_frequency)
    assert freq == pytest.approx(TONE_HZ, abs=2.0)


def _encrypted_tone(server: SandboxVoiceServer, user_id: int) -> list[bytes]:
    wire = [f for f in server.dave_wire_frames(user_id, LEGATO_GUILD) if f != SILENCE]
    return [f for f in wire if f.endswith(DAVE_MAGIC_MARKER)]


@pytest.mark.parametrize("transport", ["udp", "webrtc"])
async def test_legato_plays_end_to_end_encrypted(transport: str) -> None:
    frames = tone_frames(2.0)
    async with (
        voice_server(dave_protocol_version=1) as server,
        legato(server, LEGATO_BOT, transport) as conn,
    ):
        await conn.wait_dave(lambda d: d.stats.transitions_executed == 1, GUARD)
        assert server.session(LEGATO_BOT).protocol == transport
        assert conn.dave.encrypting
        dave = server.dave_channel(LEGATO_GUILD, LEGATO_CHANNEL)
        assert conn.voice_privacy_code is not None
        assert conn.voice_privacy_code == dave.listener.client.privacy_code
        await Player(conn, frames).play()
        await _assert_heard(server, LEGATO_BOT, len(frames))
        tone = _encrypted_tone(server, LEGATO_BOT)
        assert len(tone) >= 0.98 * len(frames)
        assert dave.listener.stats.plaintext == 0
        assert dave.listener.stats.decrypted >= 0.98 * len(frames)
        share = await asyncio.to_thread(_wire_tone_share, tone, TONE_HZ)
        assert share is None or share < 0.25
        # The measure finds the tone where it is: the frames before encryption.
        plain = await asyncio.to_thread(_wire_tone_share, frames, TONE_HZ)
        assert plain is not None
        assert plain > 0.9
        assert conn.dave.stats.encrypted_frames >= len(frames)


@pytest.mark.parametrize("committer", ["listener", "legato"])
async def test_member_joins_and_leaves_mid_track(committer: str) -> None:
    frames = tone_frames(3.0)
    preferred = LEGATO_BOT if committer == "legato" else None
    async with (
        voice_server(dave_protocol_version=1, dave_preferred_committer=preferred) as server,
        legato(server, LEGATO_BOT) as conn,
    ):
        await conn.wait_dave(lambda d: d.stats.transitions_executed == 1, GUARD)
        player = Player(conn, frames)
        playing = asyncio.create_task(player.play())
        await player.wait_sent(40)
        async with legato(server, OTHER_USER) as other:
            await other.wait_dave(lambda d: d.stats.transitions_executed == 1, GUARD)
            await conn.wait_dave(lambda d: d.stats.transitions_executed == 2, GUARD)
            assert other.dave.encrypting
            assert other.voice_privacy_code == conn.voice_privacy_code
            await player.wait_sent(80)
        await server.wait_event("left", OTHER_USER, timeout=GUARD)
        await conn.wait_dave(lambda d: d.stats.transitions_executed == 3, GUARD)
        async with asyncio.timeout(GUARD):
            await playing
        await _assert_heard(server, LEGATO_BOT, len(frames))
        dave = server.dave_channel(LEGATO_GUILD, LEGATO_CHANNEL)
        assert dave.server.epoch == 3
        assert set(dave.server.group_members) == {DAVE_LISTENER_ID, LEGATO_BOT}
        assert conn.dave.stats.transitions_executed == 3
        assert conn.dave.stats.withheld_frames == 0
        if committer == "legato":
            assert conn.dave.stats.commits_sent == 3
        assert dave.listener.stats.plaintext == 0


async def test_downgrade_and_back_while_playing() -> None:
    frames = tone_frames(3.0)
    async with voice_server(dave_protocol_version=1) as server, legato(server, LEGATO_BOT) as conn:
        await conn.wait_dave(lambda d: d.stats.transitions_executed == 1, GUARD)
        player = Player(conn, frames)
        playing = asyncio.create_task(player.play())
        await player.wait_sent(40)
        await server.dave_downgrade(LEGATO_GUILD, LEGATO_CHANNEL)
        await conn.wait_dave(lambda d: d.stats.transitions_executed == 2, GUARD)
        assert conn.dave.protocol_version == 0
        assert conn.voice_privacy_code is None
        await player.wait_sent(player.sent + 20)
        await server.dave_upgrade(LEGATO_GUILD, LEGATO_CHANNEL)
        await conn.wait_dave(lambda d: d.stats.transitions_executed == 3, GUARD)
        assert conn.dave.encrypting
        async with asyncio.timeout(GUARD):
            await playing
        await _assert_heard(server, LEGATO_BOT, len(frames))
        dave = server.dave_channel(LEGATO_GUILD, LEGATO_CHANNEL)
        assert dave.server.protocol_version == 1
        assert dave.listener.stats.plaintext >= 20  # what went out at protocol 0
        assert conn.dave.stats.passthrough_frames >= 20
        assert conn.dave.stats.withheld_frames == 0


async def test_resume_replays_missed_dave_messages() -> None:
    async with voice_server(dave_protocol_version=1) as server, legato(server, LEGATO_BOT) as conn:
        await conn.wait_dave(lambda d: d.stats.transitions_executed == 1, GUARD)
        # Dropped, and while it is away the server prepares a downgrade: op21 is only buffered.
        await server.inject_drop(LEGATO_BOT)
        await server.dave_downgrade(LEGATO_GUILD, LEGATO_CHANNEL)
        await server.wait_resumed(LEGATO_BOT, timeout=GUARD)
        await conn.wait_dave(lambda d: d.stats.transitions_executed == 2, GUARD)
        assert conn.dave.protocol_version == 0
        # Again with binary messages: op24 and op25 (binary, sequenced) are replayed.
        await server.inject_drop(LEGATO_BOT)
        await server.dave_upgrade(LEGATO_GUILD, LEGATO_CHANNEL)
        await server.wait_resumed(LEGATO_BOT, count=2, timeout=GUARD)
        await conn.wait_dave(lambda d: d.stats.transitions_executed == 3, GUARD)
        assert conn.dave.encrypting
        assert server.session(LEGATO_BOT).version == 8
        assert conn.gateway_stats.malformed == 0
        frames = tone_frames(1.0)
        await Player(conn, frames).play()
        await _assert_heard(server, LEGATO_BOT, len(frames))


@pytest.mark.parametrize("op", [30, 29])
async def test_invalid_welcome_or_commit_recovers_through_op31(op: int) -> None:
    frames = tone_frames(1.0)
    async with voice_server(dave_protocol_version=1) as server:
        if op == 30:
            server.corrupt_next_dave(LEGATO_BOT, 30)  # the welcome into the group
        async with legato(server, LEGATO_BOT) as conn:
            if op == 29:
                await conn.wait_dave(lambda d: d.stats.transitions_executed == 1, GUARD)
                server.corrupt_next_dave(LEGATO_BOT, 29)  # the commit adding someone
                async with legato(server, OTHER_USER):
                    await server.wait_event("dave_invalid", LEGATO_BOT, timeout=GUARD)
                    await conn.wait_dave(
                        lambda d: d.encrypting and d.session is not None and d.session.ready, GUARD
                    )
                    await conn.wait_dave(lambda d: d.stats.transitions_executed == 2, GUARD)
            else:
                await server.wait_event("dave_invalid", LEGATO_BOT, timeout=GUARD)
                await conn.wait_dave(lambda d: d.encrypting, GUARD)
            stats = conn.dave.stats
            assert stats.recoveries == 1
            assert (stats.invalid_welcomes if op == 30 else stats.invalid_commits) == 1
            dave = server.dave_channel(LEGATO_GUILD, LEGATO_CHANNEL)
            assert dave.server.stats.invalid_reports == 1
            assert LEGATO_BOT in dave.server.group_members
            await Player(conn, frames).play()
            await _assert_heard(server, LEGATO_BOT, len(frames))
            assert len(_encrypted_tone(server, LEGATO_BOT)) >= 0.98 * len(frames)


# -- never plaintext while DAVE is negotiated (issue #12, section 3) ----------------------------


class _Frames:
    """A FrameSource serving a fixed list of Opus frames (so a test knows the first one)."""

    passthrough = True

    def __init__(self, frames: list[bytes]) -> None:
        self._frames = frames
        self._index = 0

    @property
    def position(self) -> float:
        return self._index * FRAME_S

    @property
    def duration(self) -> float | None:
        return len(self._frames) * FRAME_S

    def read(self, max_frames: int) -> list[bytes]:
        out = self._frames[self._index : self._index + max_frames]
        self._index += len(out)
        return out

    def seek(self, seconds: float) -> None:
        self._index = max(0, min(len(self._frames), round(seconds / FRAME_S)))

    def set_volume(self, volume: float) -> None:
        assert volume == 1.0

    def close(self) -> None:
        self._index = len(self._frames)


@pytest.mark.parametrize("transport", ["udp", "webrtc"])
async def test_playback_started_before_the_group_is_held_then_heard_from_its_first_frame(
    transport: str,
) -> None:
    frames = tone_frames(1.0)

    async def opener(track: Track, start: float) -> FrameSource:
        return _Frames(frames)

    async with voice_server(dave_protocol_version=1) as server:
        server.hold_dave(LEGATO_BOT)  # a slow DAVE group: op4 said DAVE, the group is not there
        async with legato(server, LEGATO_BOT, transport) as conn:
            assert not conn.can_send
            player = GuildPlayer(conn, opener)
            try:
                player.queue.add([Track(url="tone", title="tone")])
                assert player.start()
                async with asyncio.timeout(GUARD):
                    await player.wait_for(PlayerState.PLAYING)
                # The frames are ready and due: the player holds them instead of sending.
                assert player.stats.holds == 1
                assert player.stats.frames_sent == 0
                await server.release_dave(LEGATO_BOT)
                async with asyncio.timeout(GUARD):
                    await conn.wait_can_send()
                    await player.wait_for(PlayerState.IDLE)
                rec = server.recording(LEGATO_BOT, LEGATO_GUILD)
                await rec.wait_frames(len(frames) + 5, timeout=GUARD)
                await rec.wait_speaking(False, timeout=GUARD)
            finally:
                await player.close()
            assert conn.dave.stats.withheld_frames == 0
            assert conn.dave.stats.passthrough_frames == 0
    # What the server received: every media frame DAVE-encrypted (Opus silence aside), and it
    # decrypts to the whole track, first frame first; nothing dropped or lost.
    wire = [f for f in server.dave_wire_frames(LEGATO_BOT, LEGATO_GUILD) if f != SILENCE]
    assert len(wire) == len(frames)
    assert all(f.endswith(DAVE_MAGIC_MARKER) for f in wire)
    heard = [f for f in rec.opus_frames() if f != SILENCE]
    assert heard == frames
    assert rec.opus_frames()[0] == frames[0]
    stats = rec.stats()
    assert (stats.gaps, stats.dropped) == (0, 0)
    assert server.stats.dave_plaintext_dropped == 0
    assert server.stats.dave_undecryptable == 0
    assert player.stats.holds == 1  # (how long: exactly, on a fake clock, in test_player_hold)
