"""A stock discord.py bot that joins a voice channel, plays a 440 Hz tone and leaves.

Nothing here knows about Legato or its sandbox but the URLs, which any bot pointed at a
Discord-compatible server sets: run it with ``SSL_CERT_FILE`` naming the CA that signed the
voice server's certificate. Usage: ``stock_voice_client.py API_BASE GATEWAY_URL TOKEN CHANNEL``.
It prints ``mode``, ``dave`` and ``privacy`` lines, then ``done``; any failure exits non-zero.
"""

from __future__ import annotations

import asyncio
import math
import sys

import discord
import discord.gateway
import discord.http
import numpy as np
import yarl
from discord.voice_state import VoiceConnectionState

TONE_HZ = 440.0
TONE_FRAMES = 100  # 2 s
GUARD = 30.0


class Sine(discord.AudioSource):
    """20 ms frames of 48 kHz stereo s16 PCM: a sine at half scale, then the end."""

    def __init__(self, frames: int) -> None:
        t = np.arange(frames * 960) / 48_000
        mono = (0.5 * 32767 * np.sin(2 * math.pi * TONE_HZ * t)).astype("<i2")
        self._pcm = np.repeat(mono, 2).tobytes()
        self._offset = 0

    def read(self) -> bytes:
        chunk = self._pcm[self._offset : self._offset + 3840]
        self._offset += 3840
        return chunk if len(chunk) == 3840 else b""


class DaveAwareVoiceClient(discord.VoiceClient):
    """The stock client, plus an event set once its DAVE group can encrypt.

    discord.py has no event for that; before it, the stock client sends plaintext, which the
    group's receivers drop. ``create_connection_state`` and the websocket ``hook`` are the seams
    discord.py offers extensions (voice receive uses them); the hook runs after each JSON op
    has been handled, op22 (execute transition) included.
    """

    def __init__(self, client: discord.Client, channel: discord.abc.Connectable) -> None:
        super().__init__(client, channel)
        self.dave_ready = asyncio.Event()

    def create_connection_state(self) -> VoiceConnectionState:
        return VoiceConnectionState(self, hook=self._on_voice_message)

    async def _on_voice_message(self, _ws: object, _msg: object) -> None:
        if self._connection.can_encrypt:
            self.dave_ready.set()


async def play(client: discord.Client, channel_id: int) -> None:
    channel = client.get_channel(channel_id)
    assert isinstance(channel, discord.VoiceChannel), channel
    vc = await channel.connect(timeout=GUARD, reconnect=False, cls=DaveAwareVoiceClient)
    async with asyncio.timeout(GUARD):
        await vc.dave_ready.wait()
    print("mode", vc.mode, flush=True)
    print("dave", vc._connection.dave_protocol_version, flush=True)
    print("privacy", vc.voice_privacy_code, flush=True)
    loop = asyncio.get_running_loop()
    finished = asyncio.Event()
    errors: list[Exception | None] = []

    def after(error: Exception | None) -> None:
        errors.append(error)
        loop.call_soon_threadsafe(finished.set)

    vc.play(Sine(TONE_FRAMES), after=after, fec=False)
    async with asyncio.timeout(GUARD):
        await finished.wait()
    assert errors == [None], errors
    await vc.disconnect(force=False)


async def main(api_base: str, gateway_url: str, token: str, channel_id: int) -> None:
    discord.http.Route.BASE = api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)
    client = discord.Client(intents=discord.Intents.default(), chunk_guilds_at_startup=False)
    outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @client.event
    async def on_ready() -> None:
        try:
            await play(client, channel_id)
        except BaseException as exc:
            outcome.set_exception(exc)
            raise
        outcome.set_result(None)

    async with client:
        runner = asyncio.create_task(client.start(token))
        try:
            async with asyncio.timeout(2 * GUARD):
                await asyncio.wait({runner, outcome}, return_when=asyncio.FIRST_COMPLETED)
            if runner.done():
                runner.result()
            outcome.result()
        finally:
            await client.close()
            await asyncio.gather(runner, return_exceptions=True)
    print("done", flush=True)


if __name__ == "__main__":
    api, gateway, bot_token, channel = sys.argv[1:5]
    asyncio.run(main(api, gateway, bot_token, int(channel)))
