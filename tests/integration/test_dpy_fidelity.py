"""discord.py 2.7.1's own ``VoiceClient`` plays to the sandbox voice server: the sandbox is faithful
enough for the stock client, not only for Legato's.

The stock client hardcodes ``wss://{endpoint}/?v=8``, offers only
``aead_xchacha20_poly1305_rtpsize`` among today's modes, and refuses to construct without
``davey`` installed. So the server runs a TLS listener with a certificate made for this test, and
op4 says ``dave_protocol_version: 0`` so the client sends plain Opus.

There is no Discord gateway here (the sandbox gateway is tested on its own), so the test stands
in for the few objects ``VoiceClient`` reaches through: a ``ConnectionState`` with ``loop``,
``user`` and ``http``, a guild whose ``change_voice_state`` answers the way the gateway does
(VOICE_STATE_UPDATE and VOICE_SERVER_UPDATE delivered to the voice client as two separate
tasks), and a channel. Everything on the voice path itself is discord.py's: its websocket class,
keep-alive thread, IP discovery through its socket reader thread, encryption, Opus encoder and
``AudioPlayer``. Its ``HTTPClient`` is the real one, with the aiohttp session that ``static_login``
would make (which would first call Discord's REST API) built directly around a connector whose
SSL context trusts the test certificate.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import discord
import discord.http
import numpy as np
import pytest

from legato.sandbox.voice import SandboxVoiceServer

pytestmark = pytest.mark.integration

GUILD_ID = 4242
CHANNEL_ID = 4343
BOT_ID = 4444
SESSION_ID = "dpy-session"
TONE_HZ = 440.0
TONE_FRAMES = 75  # 1.5 s
GUARD = 30.0


class SineSource(discord.AudioSource):
    """20 ms frames of 48 kHz stereo s16 PCM (3840 bytes): a 440 Hz sine, then the end."""

    def __init__(self, frames: int, freq: float = TONE_HZ) -> None:
        t = np.arange(frames * 960) / 48_000
        mono = (0.5 * 32767 * np.sin(2 * math.pi * freq * t)).astype("<i2")
        self._pcm = np.repeat(mono, 2).tobytes()
        self._offset = 0

    def read(self) -> bytes:
        chunk = self._pcm[self._offset : self._offset + 3840]
        self._offset += 3840
        return chunk if len(chunk) == 3840 else b""

    def is_opus(self) -> bool:
        return False


class FakeUser:
    id = BOT_ID


class FakeMember:
    voice = None


class FakeGuild:
    """Answers ``change_voice_state`` as the gateway would: two events, two tasks."""

    def __init__(self, server: SandboxVoiceServer) -> None:
        self.id = GUILD_ID
        self.me = FakeMember()
        self.server = server
        self.voice_client: discord.VoiceClient | None = None
        self.channel: FakeChannel | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def get_channel(self, channel_id: int) -> FakeChannel | None:
        return self.channel if self.channel and self.channel.id == channel_id else None

    async def change_voice_state(
        self,
        *,
        channel: Any,
        self_mute: bool = False,
        self_deaf: bool = False,
        self_video: bool = False,
    ) -> None:
        vc = self.voice_client
        assert vc is not None
        state = {
            "guild_id": str(GUILD_ID),
            "channel_id": None if channel is None else str(channel.id),
            "user_id": str(BOT_ID),
            "session_id": SESSION_ID,
            "deaf": False,
            "mute": False,
            "self_deaf": self_deaf,
            "self_mute": self_mute,
            "self_video": self_video,
            "suppress": False,
            "request_to_speak_timestamp": None,
        }
        update: dict[str, Any] | None = None
        if channel is not None:
            token = self.server.register_session(
                server_id=GUILD_ID, user_id=BOT_ID, session_id=SESSION_ID
            )
            update = {"token": token, "guild_id": str(GUILD_ID), "endpoint": self.server.endpoint}
        self.tasks.append(asyncio.get_running_loop().create_task(self._dispatch(vc, state, update)))

    async def _dispatch(
        self, vc: discord.VoiceClient, state: dict[str, Any], update: dict[str, Any] | None
    ) -> None:
        # A real gateway answers op4 a network round trip later, when the voice client is already
        # parked on its state event. discord.py's event is set and cleared at once, so it only
        # wakes waiters that are already parked: yield once (the waiter parks in that turn of the
        # loop), then deliver both events, as the gateway's reader would, one after the other.
        await asyncio.sleep(0)
        await vc.on_voice_state_update(state)  # type: ignore[arg-type]
        if update is not None:
            await vc.on_voice_server_update(update)  # type: ignore[arg-type]


class FakeChannel:
    def __init__(self, guild: FakeGuild) -> None:
        self.id = CHANNEL_ID
        self.guild = guild

    def _get_voice_client_key(self) -> tuple[int, str]:
        return GUILD_ID, "guild_id"


class FakeConnectionState:
    def __init__(self, loop: asyncio.AbstractEventLoop, http: discord.http.HTTPClient) -> None:
        self.loop = loop
        self.http = http
        self.user = FakeUser()
        self.removed: list[int] = []

    def _remove_voice_client(self, guild_id: int) -> None:
        self.removed.append(guild_id)


class FakeClient:
    def __init__(self, state: FakeConnectionState) -> None:
        self._connection = state
        self.loop = state.loop


@pytest.fixture
async def server() -> AsyncIterator[SandboxVoiceServer]:
    async with SandboxVoiceServer(tls=True, dave_protocol_version=0) as srv:
        yield srv


@pytest.fixture
async def http(server: SandboxVoiceServer) -> AsyncIterator[discord.http.HTTPClient]:
    assert server.certificate is not None
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(ssl=server.certificate.client_context())
    client = discord.http.HTTPClient(loop, connector=connector)
    # What static_login builds, minus its GET /users/@me against Discord.
    client._HTTPClient__session = aiohttp.ClientSession(  # type: ignore[attr-defined]
        connector=connector,
        ws_response_class=discord.gateway.DiscordClientWebSocketResponse,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    yield client
    await client.close()


async def test_stock_voice_client_plays_a_tone(
    server: SandboxVoiceServer, http: discord.http.HTTPClient
) -> None:
    loop = asyncio.get_running_loop()
    state = FakeConnectionState(loop, http)
    guild = FakeGuild(server)
    channel = FakeChannel(guild)
    guild.channel = channel
    vc = discord.VoiceClient(FakeClient(state), channel)  # type: ignore[arg-type]
    guild.voice_client = vc

    await vc.connect(reconnect=False, timeout=GUARD)
    assert vc.is_connected()
    await server.wait_session_description(BOT_ID, timeout=GUARD)
    info = server.session(BOT_ID)
    assert info.mode == "aead_xchacha20_poly1305_rtpsize"
    assert info.version == 8
    assert info.ssrc == vc.ssrc

    finished = asyncio.Event()
    errors: list[Exception | None] = []

    def after(error: Exception | None) -> None:
        errors.append(error)
        loop.call_soon_threadsafe(finished.set)

    vc.play(SineSource(TONE_FRAMES), after=after, fec=False)
    async with asyncio.timeout(GUARD):
        await finished.wait()
    recording = server.recording(BOT_ID)
    # The stock player ends with five Opus silence frames.
    await recording.wait_frames(TONE_FRAMES + 5, timeout=GUARD)
    await recording.wait_speaking(False, timeout=GUARD)

    await vc.disconnect(force=True)
    await server.wait_event("left", BOT_ID, timeout=GUARD)
    await asyncio.gather(*guild.tasks)

    assert errors == [None]
    stats = recording.stats()
    assert stats.frames == TONE_FRAMES + 5
    assert stats.gaps == 0
    assert stats.sequence_errors == 0
    assert stats.timestamp_errors == 0
    # op5 0 right after op4 (discord.py announces its SSRC that way), then on, then off (the
    # player's stop and the disconnect may each say "off").
    speaking = [c.speaking for c in recording.speaking_changes]
    assert speaking[:3] == [0, 1, 0]
    assert set(speaking[3:]) <= {0}
    assert {c.ssrc for c in recording.speaking_changes} == {vc.ssrc}
    assert server.stats.undecryptable_packets == 0
    assert server.stats.discovery_requests == 1
    assert server.close_codes(BOT_ID) == [1000]
    assert set(state.removed) == {GUILD_ID}  # the library cleans up more than once
    freq = await asyncio.to_thread(recording.dominant_frequency)
    assert freq == pytest.approx(TONE_HZ, abs=2.0)
