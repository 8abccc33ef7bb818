"""The sandbox voice server's defaults are Discord's (issue #12 §1).

Without options it presents its endpoint as Discord does (a ``*.discord.media`` name with a port,
TLS from a local CA whose ``.pem`` a client can trust), requires DAVE (4017 without it), offers
the two ``aead_*_rtpsize`` modes only and sends an integer ``heartbeat_interval``. Legato's voice
client, left on ``auto``, then takes the path it takes on Discord by itself: v8, ``wss://``,
``udp``, DAVE.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from legato.sandbox.voice import SandboxVoiceServer
from legato.voice.endpoint import (
    auto_gateway_version,
    auto_transports,
    is_discord_endpoint,
    websocket_url,
)
from legato.voice.gateway import VoiceConnection, VoiceOptions
from tests.integration.voice_support import Player, tone_frames

pytestmark = pytest.mark.integration

GUILD = 5150
USER = 5151
GUARD = 20.0  # only against hangs


@pytest.fixture
async def server() -> AsyncIterator[SandboxVoiceServer]:
    async with SandboxVoiceServer() as srv:
        yield srv


async def _hello_and_first(server: SandboxVoiceServer, identify: dict[str, Any]) -> list[Any]:
    """Connect as a bare client trusting only the CA file, identify, return what came back."""
    ctx = ssl.create_default_context(cafile=str(server.ca_file))
    token = server.register_session(server_id=GUILD, user_id=USER, session_id="s")
    identify = {"server_id": str(GUILD), "user_id": str(USER), "session_id": "s", **identify}
    identify["token"] = token
    seen: list[Any] = []
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(server.url + "/?v=8", ssl=ctx) as ws,
    ):
        async with asyncio.timeout(GUARD):
            seen.append(json.loads((await ws.receive()).data))
            await ws.send_str(json.dumps({"op": 0, "d": identify}))
            msg = await ws.receive()
            seen.append(json.loads(msg.data) if msg.type is aiohttp.WSMsgType.TEXT else msg)
            if msg.type is aiohttp.WSMsgType.CLOSE:
                seen.append(ws.close_code)
    return seen


async def test_the_endpoint_is_presented_as_discord_presents_it(
    server: SandboxVoiceServer,
) -> None:
    endpoint = server.endpoint
    host, _, port = endpoint.rpartition(":")
    assert host.endswith(".discord.media")
    assert port.isdigit()
    assert is_discord_endpoint(endpoint)
    assert auto_gateway_version(endpoint) == 8
    assert auto_transports(endpoint)[0] == "udp"
    assert websocket_url(endpoint, 8) == f"wss://{endpoint}/?v=8"
    assert server.url == f"wss://{endpoint}"
    assert server.ca_file.suffix == ".pem"
    assert server.ca_file.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


async def test_hello_carries_an_integer_heartbeat_interval(server: SandboxVoiceServer) -> None:
    hello, *_ = await _hello_and_first(server, {"max_dave_protocol_version": 1})
    assert hello == {"op": 8, "d": {"v": 8, "heartbeat_interval": 13750}}
    assert type(hello["d"]["heartbeat_interval"]) is int


async def test_a_client_without_dave_is_closed_4017(server: SandboxVoiceServer) -> None:
    _hello, closed, code = await _hello_and_first(server, {})
    assert closed.type is aiohttp.WSMsgType.CLOSE
    assert code == 4017


async def test_ready_offers_only_the_two_rtpsize_modes(server: SandboxVoiceServer) -> None:
    _hello, ready = await _hello_and_first(server, {"max_dave_protocol_version": 1})
    assert ready["op"] == 2
    assert ready["d"]["modes"] == ["aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize"]


async def test_legato_on_auto_takes_its_discord_path(server: SandboxVoiceServer) -> None:
    token = server.register_session(server_id=GUILD, user_id=USER, session_id="s")
    conn = VoiceConnection(
        endpoint=server.endpoint,
        token=token,
        session_id="s",
        user_id=USER,
        server_id=GUILD,
        options=VoiceOptions(),  # transport, version and scheme all chosen from the endpoint
    )
    await conn.connect()
    try:
        await conn.wait_dave(lambda d: d.stats.transitions_executed >= 1, GUARD)
        info = server.session(USER)
        assert (info.version, info.protocol, info.mode) == (8, "udp", "aead_aes256_gcm_rtpsize")
        assert info.dave_protocol_version == 1
        assert conn.dave.encrypting
        dave = server.dave_channel(GUILD, GUILD)
        assert conn.voice_privacy_code == dave.listener.client.privacy_code
        frames = tone_frames(1.0)
        await Player(conn, frames).play()
        rec = server.recording(USER)
        await rec.wait_frames(len(frames), timeout=GUARD)
        assert rec.stats().gaps == 0
        assert dave.listener.stats.plaintext == 0
        assert dave.listener.stats.decrypted >= len(frames)
        assert await asyncio.to_thread(rec.dominant_frequency) == pytest.approx(440.0, abs=2.0)
    finally:
        await conn.close()
    assert conn.error is None
