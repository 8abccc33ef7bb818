"""LegatoVoiceClient and VoiceConnection against the sandbox voice server, on udp and webrtc.

The discord.py side is real (Client, ConnectionState, Guild, VoiceChannel, its event dispatch to
the voice protocol); only the main gateway websocket is a stand-in (see ``voice_support``).
"""

from __future__ import annotations

import asyncio

import discord
import pytest

from legato.errors import VoiceConnectError
from legato.voice.client import LegatoVoiceClient, VoiceOptions
from legato.voice.endpoint import websocket_url
from legato.voice.gateway import VoiceConnection
from legato.voice.state import ClientState, LinkState
from tests.integration.voice_support import (
    BOT_ID,
    GUILD_ID,
    Player,
    discord_world,
    tone_frames,
    voice_server,
    voice_tasks,
)

pytestmark = pytest.mark.integration

TONE_SECONDS = 3.0


async def _assert_tone_recorded(server: object, frames_sent: int) -> None:
    from legato.sandbox.voice import SandboxVoiceServer

    assert isinstance(server, SandboxVoiceServer)
    rec = server.recording(BOT_ID, GUILD_ID)
    await rec.wait_frames(int(frames_sent * 0.98), timeout=20)
    await rec.wait_speaking(False, timeout=20)
    stats = rec.stats()
    assert stats.frames >= 0.98 * frames_sent
    assert stats.streams == 1
    assert stats.gaps == 0
    assert stats.sequence_errors == 0
    assert stats.timestamp_errors == 0
    ons = [change.on for change in rec.speaking_changes]
    assert ons[0] is True
    assert ons[-1] is False
    freq = await asyncio.to_thread(rec.dominant_frequency)
    assert freq == pytest.approx(440.0, abs=2.0)


@pytest.mark.parametrize("version", [6, 8])
async def test_tone_through_discord_voice_protocol(version: int) -> None:
    frames = tone_frames(TONE_SECONDS)
    async with voice_server() as server, discord_world(server) as world:
        options = VoiceOptions(transport="udp", gateway_version=version)
        vc = await world.channel.connect(cls=LegatoVoiceClient.configured(options), timeout=20)
        assert isinstance(vc, LegatoVoiceClient)
        assert vc.is_connected()
        assert vc.lifecycle.state is ClientState.CONNECTED
        assert world.guild.voice_client is vc
        assert vc.transport_name == "udp"
        assert vc.mode == "aead_aes256_gcm_rtpsize"
        assert server.session(BOT_ID).version == version
        assert world.gateway.calls[0] == (GUILD_ID, world.channel.id, False, True)

        player = Player(vc, frames)
        await player.play()
        await _assert_tone_recorded(server, len(frames))
        assert vc.stats.frames_sent == player.sent
        assert vc.frames_dropped == 0
        assert vc.latency < 5.0  # a heartbeat was acknowledged (0.5 s interval)

        conn = vc.connection
        await vc.disconnect()
        await vc.disconnect()  # twice is fine
        assert vc.state is ClientState.CLOSED
        assert conn is not None
        assert conn.link_state is LinkState.CLOSED
        assert voice_tasks() == []
        assert world.guild.voice_client is None
        assert world.gateway.calls[-1][1] is None
        assert await server.wait_closed(BOT_ID) == 1000


async def test_events_in_either_order_and_connect_via_voice_connection() -> None:
    async with voice_server() as server, discord_world(server, server_first=True) as world:
        vc = await world.channel.connect(
            cls=LegatoVoiceClient.configured(VoiceOptions()), timeout=20
        )
        assert isinstance(vc, LegatoVoiceClient)
        assert vc.is_connected()
        await vc.disconnect(force=True)
        assert world.guild.voice_client is None

    # The reusable part on its own: no discord.py at all.
    async with voice_server() as server:
        token = server.register_session(server_id=GUILD_ID, user_id=BOT_ID, session_id="s1")
        conn = VoiceConnection(
            endpoint=server.endpoint,
            token=token,
            session_id="s1",
            user_id=BOT_ID,
            server_id=GUILD_ID,
            options=VoiceOptions(gateway_version=8),
        )
        await conn.connect()
        try:
            frames = tone_frames(1.0)
            await Player(conn, frames).play()
            rec = server.recording(BOT_ID)
            await rec.wait_frames(len(frames), timeout=20)
            assert rec.stats().gaps == 0
        finally:
            await conn.close()
        assert not conn.is_connected()
        assert conn.error is None


async def test_connect_failure_cleans_up_and_raises_voice_connect_error() -> None:
    async with voice_server() as server, discord_world(server, answer=False) as world:
        with pytest.raises(VoiceConnectError):
            await world.channel.connect(
                cls=LegatoVoiceClient.configured(VoiceOptions()), timeout=0.5
            )
        assert world.guild.voice_client is None  # unregistered from discord.py's state
        assert world.gateway.calls[-1][1] is None  # and left the channel

    async with voice_server() as server, discord_world(server) as world:
        # Wrong token: the voice server closes 4004, which ends the attempt at once.
        real = world.gateway.dispatch_server

        def bad_token(guild_id: int, endpoint: str) -> None:
            world.gateway.token = "not-a-token"
            real(guild_id, endpoint)

        world.gateway.dispatch_server = bad_token  # type: ignore[method-assign]
        with pytest.raises(VoiceConnectError) as info:
            await world.channel.connect(
                cls=LegatoVoiceClient.configured(VoiceOptions()), timeout=20
            )
        assert "4004" in str(info.value)
        assert info.value.user_message == "The voice server refused my credentials."
        assert world.guild.voice_client is None
        # No stale registration: discord.py would say "Already connected" if there were one.
        world.gateway.dispatch_server = real  # type: ignore[method-assign]
        vc = await world.channel.connect(
            cls=LegatoVoiceClient.configured(VoiceOptions()), timeout=20
        )
        assert isinstance(vc, LegatoVoiceClient)
        assert vc.is_connected()
        with pytest.raises(discord.ClientException, match="Already connected"):
            await world.channel.connect(cls=LegatoVoiceClient.configured(VoiceOptions()))
        await vc.disconnect()


async def test_move_to_another_channel_and_kick() -> None:
    async with voice_server() as server, discord_world(server) as world:
        vc = await world.channel.connect(
            cls=LegatoVoiceClient.configured(VoiceOptions()), timeout=20
        )
        assert isinstance(vc, LegatoVoiceClient)
        await vc.move_to(world.other_channel, timeout=20)
        assert vc.channel.id == world.other_channel.id  # type: ignore[attr-defined]
        assert vc.is_connected()
        assert vc.lifecycle.state is ClientState.CONNECTED
        await server.wait_identified(BOT_ID, count=2)  # a fresh session for the new token
        frames = tone_frames(0.5)
        await Player(vc, frames).play()
        rec = server.recording(BOT_ID)
        await rec.wait_frames(len(frames) + 5, timeout=20)
        assert rec.stats().streams == 1  # nothing was sent before the move

        gone: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        vc.add_disconnect_listener(lambda _vc, error: gone.set_result(error))
        # Kicked: Discord ends the voice session and sends VOICE_STATE_UPDATE channel_id=None.
        await server.disconnect_user(BOT_ID, code=4014)
        world.gateway.dispatch_state(GUILD_ID, None)
        async with asyncio.timeout(20):
            error = await gone
        assert error is not None
        assert not vc.is_connected()
        assert vc.state is ClientState.CLOSED
        assert world.guild.voice_client is None


@pytest.mark.parametrize("version", [6, 8])
async def test_tone_through_webrtc(version: int) -> None:
    frames = tone_frames(TONE_SECONDS)
    async with voice_server() as server, discord_world(server) as world:
        options = VoiceOptions(transport="webrtc", gateway_version=version)
        vc = await world.channel.connect(cls=LegatoVoiceClient.configured(options), timeout=30)
        assert isinstance(vc, LegatoVoiceClient)
        assert vc.transport_name == "webrtc"
        assert vc.mode == "dtls-srtp"
        session = server.session(BOT_ID)
        assert session.protocol == "webrtc"
        assert session.version == version

        player = Player(vc, frames)
        await player.play()
        await _assert_tone_recorded(server, len(frames))
        assert vc.stats.frames_sent == player.sent
        assert vc.frames_dropped == 0

        await vc.disconnect()
        assert voice_tasks() == []
        assert await server.wait_closed(BOT_ID) == 1000


def test_websocket_url_scheme() -> None:
    assert websocket_url("rotterdam5347.discord.media:443", 8) == (
        "wss://rotterdam5347.discord.media:443/?v=8"
    )
    assert websocket_url("c-ams.discord.media", 6) == "wss://c-ams.discord.media/?v=6"
    assert websocket_url("127.0.0.1:3004", 6) == "ws://127.0.0.1:3004/?v=6"
    assert websocket_url("localhost", 6) == "ws://localhost/?v=6"
    assert websocket_url("voice.example.org:8443", 8) == "ws://voice.example.org:8443/?v=8"
    assert websocket_url("voice.example.org:8443", 8, secure=True) == (
        "wss://voice.example.org:8443/?v=8"
    )
    assert websocket_url("wss://127.0.0.1:3004", 6) == "wss://127.0.0.1:3004/?v=6"
    assert websocket_url("[::1]:3004", 6) == "ws://[::1]:3004/?v=6"


@pytest.mark.parametrize("transport", ["webrtc", "auto"])
async def test_webrtc_is_selected_by_name(transport: str) -> None:
    # "auto" picks webrtc first only toward a self-hosted endpoint: plain ws://, no DAVE.
    self_hosted: dict[str, object] = {"tls": False, "dave_protocol_version": 0}
    kwargs = self_hosted if transport == "auto" else {}
    async with voice_server(**kwargs) as server, discord_world(server) as world:
        options = VoiceOptions(transport=transport)  # type: ignore[arg-type]  # parametrized literal
        vc = await world.channel.connect(cls=LegatoVoiceClient.configured(options), timeout=30)
        assert isinstance(vc, LegatoVoiceClient)
        assert vc.transport_name == "webrtc"
        assert vc.mode == "dtls-srtp"
        assert server.session(BOT_ID).protocol == "webrtc"
        frames = tone_frames(0.5)
        await Player(vc, frames).play()
        await server.recording(BOT_ID).wait_frames(len(frames) // 2, timeout=20)
        await vc.disconnect()
