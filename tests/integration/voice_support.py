"""Helpers for the voice client's integration tests: a tone, a paced player, a Discord stand-in.

Why a stand-in: ``LegatoVoiceClient`` needs discord.py's ``ConnectionState`` (voice client
registry, guild cache) and a main gateway to send op4 on. Everything here is real discord.py
(``Client``, ``ConnectionState``, ``Guild``, ``VoiceChannel``, ``ClientUser``, and its own
``parse_voice_state_update``/``parse_voice_server_update`` dispatch into the voice protocol) except
the main gateway websocket: :class:`MainGatewayStandIn` replaces the one object
``Guild.change_voice_state`` talks to (``state._get_websocket``) and answers op4 as Discord
does, with a VOICE_STATE_UPDATE and a VOICE_SERVER_UPDATE pointing at the sandbox voice server.
It goes away once the sandbox Discord gateway can be used in these tests.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import discord
import numpy as np

from legato.audio.encode import OpusEncoder
from legato.audio.sink import OPUS_SILENCE, SILENCE_FRAMES, FrameSink
from legato.audio.source import FRAME_SAMPLES, SAMPLE_RATE
from legato.sandbox.voice import SandboxVoiceServer

BOT_ID: Final = 4242
GUILD_ID: Final = 1001
CHANNEL_ID: Final = 2002
OTHER_CHANNEL_ID: Final = 2003
FRAME_S: Final = 0.020


def voice_tasks() -> list[asyncio.Task[object]]:
    """The voice client's tasks still running (all are named ``legato-voice-*``)."""
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("legato-voice")]


def tone_frames(seconds: float, freq: float = 440.0) -> list[bytes]:
    """Opus frames of a sine tone at half scale, 20 ms each."""
    encoder = OpusEncoder()
    frames = []
    for k in range(round(seconds / FRAME_S)):
        t = (np.arange(FRAME_SAMPLES) + k * FRAME_SAMPLES) / SAMPLE_RATE
        mono = (0.5 * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2")
        frames.append(encoder.encode(np.repeat(mono, 2).tobytes()))
    return frames


@dataclass
class Player:
    """A minimal paced player over a FrameSink: absolute 20 ms deadlines on the loop clock.

    ``progress`` is set after every frame so tests can inject faults at a given frame without
    sleeping.
    """

    sink: FrameSink
    frames: Sequence[bytes]
    sent: int = 0
    progress: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def play(self) -> None:
        loop = asyncio.get_running_loop()
        await self.sink.set_speaking(True)
        start = loop.time()
        tail = [OPUS_SILENCE] * SILENCE_FRAMES
        for k, frame in enumerate([*self.frames, *tail]):
            delay = start + k * FRAME_S - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.sink.send_frame(frame)
            self.sent = k + 1
            async with self.progress:
                self.progress.notify_all()
        await self.sink.set_speaking(False)

    async def wait_sent(self, count: int) -> None:
        async with asyncio.timeout(30), self.progress:
            await self.progress.wait_for(lambda: self.sent >= count)


class MainGatewayStandIn:
    """Answers ``Guild.change_voice_state`` the way Discord's main gateway does.

    Args:
        client: The real discord.py client whose state receives the dispatches.
        server: The sandbox voice server the VOICE_SERVER_UPDATE points at.
        server_first: Send VOICE_SERVER_UPDATE before VOICE_STATE_UPDATE (both orders happen).
        answer: Whether to answer a join at all (False: the connect must time out).
    """

    def __init__(
        self,
        client: discord.Client,
        server: SandboxVoiceServer,
        *,
        server_first: bool = False,
        answer: bool = True,
    ) -> None:
        self.client = client
        self.server = server
        self.server_first = server_first
        self.answer = answer
        self.session_id = secrets.token_hex(16)
        self.token: str | None = None
        self.calls: list[tuple[int, int | None, bool, bool]] = []
        self.left = asyncio.Event()

    async def voice_state(
        self,
        guild_id: int,
        channel_id: int | None,
        self_mute: bool = False,
        self_deaf: bool = False,
    ) -> None:
        self.calls.append((guild_id, channel_id, self_mute, self_deaf))
        if channel_id is None:
            self.left.set()
            self.dispatch_state(guild_id, None)
            return
        if not self.answer:
            return
        self.token = self.server.register_session(
            server_id=guild_id, user_id=BOT_ID, session_id=self.session_id
        )
        if self.server_first:
            self.dispatch_server(guild_id, self.server.endpoint)
            self.dispatch_state(guild_id, channel_id)
        else:
            self.dispatch_state(guild_id, channel_id)
            self.dispatch_server(guild_id, self.server.endpoint)

    def dispatch_state(self, guild_id: int, channel_id: int | None) -> None:
        data: Any = {
            "guild_id": str(guild_id),
            "channel_id": None if channel_id is None else str(channel_id),
            "user_id": str(BOT_ID),
            "session_id": self.session_id,
            "deaf": False,
            "mute": False,
            "self_deaf": True,
            "self_mute": False,
            "self_video": False,
            "suppress": False,
            "request_to_speak_timestamp": None,
        }
        loop = asyncio.get_running_loop()
        loop.call_soon(self.client._connection.parse_voice_state_update, data)

    def dispatch_server(self, guild_id: int, endpoint: str) -> None:
        assert self.token is not None
        data: Any = {"token": self.token, "guild_id": str(guild_id), "endpoint": endpoint}
        loop = asyncio.get_running_loop()
        loop.call_soon(self.client._connection.parse_voice_server_update, data)


def _guild_payload() -> Any:
    def voice_channel(cid: int, name: str, position: int) -> dict[str, Any]:
        return {
            "id": str(cid),
            "type": 2,
            "name": name,
            "position": position,
            "bitrate": 64000,
            "user_limit": 0,
        }

    return {
        "id": str(GUILD_ID),
        "name": "sandbox",
        "owner_id": "1",
        "roles": [
            {
                "id": str(GUILD_ID),
                "name": "@everyone",
                "permissions": "0",
                "position": 0,
                "color": 0,
                "hoist": False,
                "managed": False,
                "mentionable": False,
            }
        ],
        "channels": [
            voice_channel(CHANNEL_ID, "music", 0),
            voice_channel(OTHER_CHANNEL_ID, "other", 1),
        ],
        "members": [],
        "voice_states": [],
        "emojis": [],
        "stickers": [],
        "features": [],
        "member_count": 1,
    }


@dataclass
class World:
    client: discord.Client
    guild: discord.Guild
    channel: discord.VoiceChannel
    other_channel: discord.VoiceChannel
    gateway: MainGatewayStandIn
    server: SandboxVoiceServer


@asynccontextmanager
async def discord_world(
    server: SandboxVoiceServer, *, server_first: bool = False, answer: bool = True
) -> AsyncIterator[World]:
    """A logged-out but otherwise real discord.py client with one guild and two voice channels."""
    client = discord.Client(intents=discord.Intents.default())
    await client._async_setup_hook()
    state = client._connection
    state.user = discord.ClientUser(
        state=state,
        data={
            "id": str(BOT_ID),
            "username": "legato",
            "discriminator": "0",
            "avatar": None,
            "global_name": None,
            "bot": True,
        },
    )
    guild = state._add_guild_from_data(_guild_payload())
    gateway = MainGatewayStandIn(client, server, server_first=server_first, answer=answer)
    state._get_websocket = lambda *_args, **_kwargs: gateway  # type: ignore[assignment]  # the stand-in
    channel = guild.get_channel(CHANNEL_ID)
    other = guild.get_channel(OTHER_CHANNEL_ID)
    assert isinstance(channel, discord.VoiceChannel)
    assert isinstance(other, discord.VoiceChannel)
    try:
        yield World(client, guild, channel, other, gateway, server)
    finally:
        await client.close()  # disconnects every voice client with force=True


@asynccontextmanager
async def voice_server(**kwargs: Any) -> AsyncIterator[SandboxVoiceServer]:
    """A started sandbox voice server with a short heartbeat interval."""
    kwargs.setdefault("heartbeat_interval", 0.5)
    server = SandboxVoiceServer(**kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.close()
