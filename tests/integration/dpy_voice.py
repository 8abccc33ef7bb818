"""discord.py 2.7.1's stock ``VoiceClient`` against the sandbox voice server, without a gateway.

``VoiceClient`` reaches through a few objects only: a ``ConnectionState`` with ``loop``, ``user``
and ``http``, a guild whose ``change_voice_state`` answers the way the gateway does
(VOICE_STATE_UPDATE and VOICE_SERVER_UPDATE delivered to the voice client as two separate tasks),
and a channel. This module stands those in, once, for every test that runs the stock client
(``test_dpy_fidelity``, ``test_dave``, ``dave_members``). Its ``HTTPClient`` is the real one, with
the aiohttp session that ``static_login`` would make (which would first call Discord's REST API)
built directly around a connector whose SSL context trusts the server's certificate.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import discord
import discord.http
import numpy as np

from legato.sandbox.voice import SandboxVoiceServer

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
    def __init__(self, user_id: int) -> None:
        self.id = user_id


class FakeMember:
    voice = None


class FakeGuild:
    """Answers ``change_voice_state`` as the gateway would: two events, two tasks.

    Args:
        server: the sandbox voice server the guild's VOICE_SERVER_UPDATE points at.
        guild_id: the guild's id.
        channel_id: the id of its one voice channel.
        user_id: whose voice state changes.
        session_id: the gateway session id the voice client identifies with.
        dave_group: register the session with the channel id, the MLS group id discord.py's
            DAVE session uses (without it the sandbox names the group by the guild id).
    """

    def __init__(
        self,
        server: SandboxVoiceServer,
        *,
        guild_id: int = GUILD_ID,
        channel_id: int = CHANNEL_ID,
        user_id: int = BOT_ID,
        session_id: str = SESSION_ID,
        dave_group: bool = False,
    ) -> None:
        self.id = guild_id
        self.me = FakeMember()
        self.server = server
        self.user_id = user_id
        self.session_id = session_id
        self.dave_group = dave_group
        self.voice_client: discord.VoiceClient | None = None
        self.channel = FakeChannel(self, channel_id)
        self.tasks: list[asyncio.Task[None]] = []

    def get_channel(self, channel_id: int) -> FakeChannel | None:
        return self.channel if self.channel.id == channel_id else None

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
            "guild_id": str(self.id),
            "channel_id": None if channel is None else str(channel.id),
            "user_id": str(self.user_id),
            "session_id": self.session_id,
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
            group = {"channel_id": self.channel.id} if self.dave_group else {}
            token = self.server.register_session(
                server_id=self.id, user_id=self.user_id, session_id=self.session_id, **group
            )
            update = {"token": token, "guild_id": str(self.id), "endpoint": self.server.endpoint}
        self.tasks.append(asyncio.get_running_loop().create_task(self._dispatch(vc, state, update)))

    async def _dispatch(
        self, vc: discord.VoiceClient, state: dict[str, Any], update: dict[str, Any] | None
    ) -> None:
        # A real gateway answers op4 a network round trip later, when the voice client is already
        # parked on its state event. discord.py's event is set and cleared at once, so it only
        # wakes waiters that are already parked: yield once (the waiter parks in that turn of the
        # loop), then deliver both events, as the gateway's reader would, one after the other.
        await asyncio.sleep(0)
        await vc.on_voice_state_update(state)  # type: ignore[arg-type]  # the gateway's shape
        if update is not None:
            await vc.on_voice_server_update(update)  # type: ignore[arg-type]  # the gateway's shape

    async def leave(self) -> None:
        """Disconnect the voice client; return once the server has seen the user go and both
        gateway events of every voice state change have been delivered."""
        assert self.voice_client is not None
        await self.voice_client.disconnect(force=True)
        await self.server.wait_event("left", self.user_id, timeout=GUARD)
        await asyncio.gather(*self.tasks)


class FakeChannel:
    def __init__(self, guild: FakeGuild, channel_id: int) -> None:
        self.id = channel_id
        self.guild = guild

    def _get_voice_client_key(self) -> tuple[int, str]:
        return self.guild.id, "guild_id"


class FakeConnectionState:
    """The parts of discord.py's ``ConnectionState`` a voice client reaches."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, http: discord.http.HTTPClient, user_id: int
    ) -> None:
        self.loop = loop
        self.http = http
        self.user = FakeUser(user_id)
        self.removed: list[int] = []

    def _remove_voice_client(self, guild_id: int) -> None:
        self.removed.append(guild_id)


class FakeClient:
    def __init__(self, state: FakeConnectionState) -> None:
        self._connection = state
        self.loop = state.loop


def stock_voice_client(
    guild: FakeGuild, http: discord.http.HTTPClient
) -> tuple[discord.VoiceClient, FakeConnectionState]:
    """discord.py's own ``VoiceClient`` for ``guild``'s user and channel, not yet connected.

    Returns:
        The client (also ``guild.voice_client``) and the connection state it reaches.
    """
    state = FakeConnectionState(asyncio.get_running_loop(), http, guild.user_id)
    vc = discord.VoiceClient(FakeClient(state), guild.channel)  # type: ignore[arg-type]  # stand-ins
    guild.voice_client = vc
    return vc, state


async def play_to_end(
    vc: discord.VoiceClient, source: discord.AudioSource
) -> list[Exception | None]:
    """Play ``source`` through discord.py's player (no FEC) and wait for its ``after`` callback.

    Returns:
        What ``after`` was called with, once per call.
    """
    loop = asyncio.get_running_loop()
    finished = asyncio.Event()
    errors: list[Exception | None] = []

    def after(error: Exception | None) -> None:
        errors.append(error)
        loop.call_soon_threadsafe(finished.set)

    vc.play(source, after=after, fec=False)
    async with asyncio.timeout(GUARD):
        await finished.wait()
    return errors


@asynccontextmanager
async def dpy_http(server: SandboxVoiceServer) -> AsyncIterator[discord.http.HTTPClient]:
    """discord.py's HTTP client with the session ``static_login`` would build, trusting the
    server's certificate."""
    assert server.certificate is not None
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(ssl=server.certificate.client_context())
    client = discord.http.HTTPClient(loop, connector=connector)
    # What static_login builds, minus its GET /users/@me against Discord.
    client._HTTPClient__session = aiohttp.ClientSession(  # type: ignore[attr-defined]  # what static_login sets
        connector=connector,
        ws_response_class=discord.gateway.DiscordClientWebSocketResponse,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    try:
        yield client
    finally:
        await client.close()
