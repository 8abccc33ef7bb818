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
tasks), and a channel (``dpy_voice``). Everything on the voice path itself is discord.py's: its
websocket class, keep-alive thread, IP discovery through its socket reader thread, encryption,
Opus encoder and ``AudioPlayer``. Its ``HTTPClient`` is the real one, with the aiohttp session
that ``static_login`` would make (which would first call Discord's REST API) built directly
around a connector whose SSL context trusts the test certificate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import discord
import discord.http
import pytest

from legato.sandbox.voice import SandboxVoiceServer
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

pytestmark = pytest.mark.integration


@pytest.fixture
async def server() -> AsyncIterator[SandboxVoiceServer]:
    async with SandboxVoiceServer(tls=True, dave_protocol_version=0) as srv:
        yield srv


@pytest.fixture
async def http(server: SandboxVoiceServer) -> AsyncIterator[discord.http.HTTPClient]:
    async with dpy_http(server) as client:
        yield client


async def test_stock_voice_client_plays_a_tone(
    server: SandboxVoiceServer, http: discord.http.HTTPClient
) -> None:
    guild = FakeGuild(server)
    vc, state = stock_voice_client(guild, http)

    await vc.connect(reconnect=False, timeout=GUARD)
    assert vc.is_connected()
    await server.wait_session_description(BOT_ID, timeout=GUARD)
    info = server.session(BOT_ID)
    assert info.mode == "aead_xchacha20_poly1305_rtpsize"
    assert info.version == 8
    assert info.ssrc == vc.ssrc

    errors = await play_to_end(vc, SineSource(TONE_FRAMES))
    recording = server.recording(BOT_ID)
    # The stock player ends with five Opus silence frames.
    await recording.wait_frames(TONE_FRAMES + 5, timeout=GUARD)
    await recording.wait_speaking(False, timeout=GUARD)

    await guild.leave()

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
