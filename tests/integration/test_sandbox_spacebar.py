"""The sandbox's Spacebar profile enforces each Spacebar behaviour, seen from a scripted client.

One test a behaviour (issue #12): no op7 (4003, as anything before identify), v6 whatever
``?v=`` says (an object heartbeat gets 4002), op1 read from its top-level ``sdp``, op12 answered
only once DTLS is connected, one RSA DTLS certificate, ``ws://`` only, op11 as
``{"user_ids": {}}``, and ``udp`` refused with 4000.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from legato.sandbox.__main__ import build_parser
from legato.sandbox.profiles import SPACEBAR, voice_profile
from legato.sandbox.voice import SandboxVoiceServer
from legato.voice import sdp
from legato.voice.endpoint import websocket_url
from legato.voice.transport.webrtc import WebRtcTransport
from tests.integration.test_sandbox_voice import (
    ALICE,
    GUARD,
    GUILD,
    ScriptedClient,
    command_line_voice_server,
    send_webrtc,
    tone_frames,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def server() -> AsyncIterator[SandboxVoiceServer]:
    async with SandboxVoiceServer(heartbeat_interval=0.25, profile="spacebar") as srv:
        yield srv


async def identified(
    server: SandboxVoiceServer, http: aiohttp.ClientSession, *, version: int = 6
) -> ScriptedClient:
    client = ScriptedClient(http, server.url, version)
    await client.open(heartbeat=False)
    await client.identify(server, ALICE)
    return client


def ops(client: ScriptedClient) -> list[int]:
    return [m["op"] for m in client.messages]


async def test_resume_is_closed_4003_even_for_a_live_session(
    server: SandboxVoiceServer, http: aiohttp.ClientSession
) -> None:
    first = await identified(server, http)
    await server.inject_drop(ALICE)  # the session is still there: Discord would resume it
    await first.closed()
    second = ScriptedClient(http, server.url, 6)
    second.token, second.user_id = first.token, ALICE
    await second.open(heartbeat=False)
    await second.resume(server)
    assert await second.closed() == 4003
    assert [e.kind for e in server.events if e.user_id == ALICE].count("resume_refused") == 1
    assert server.stats.connections == 2
    assert not any(e.kind == "resume" for e in server.events)


async def test_a_heartbeat_before_identify_is_closed_4003(
    server: SandboxVoiceServer, http: aiohttp.ClientSession
) -> None:
    client = ScriptedClient(http, server.url, 6)
    await client.open(heartbeat=False)
    await client.send(3, 1)  # Discord acks this; Spacebar checks authentication first
    assert await client.closed() == 4003


@pytest.mark.parametrize("version", [6, 8])
async def test_v6_only_an_object_heartbeat_is_closed_4002(
    server: SandboxVoiceServer, http: aiohttp.ClientSession, version: int
) -> None:
    client = await identified(server, http, version=version)
    hello = client.messages[0]
    assert hello == {"op": 8, "d": {"heartbeat_interval": 250.0}}  # no "v"
    assert all("seq" not in m for m in client.messages)  # v6 shapes, whatever ?v= said
    await client.send(3, 12345)
    assert (await client.expect(6))["d"] == 12345  # an integer nonce is echoed
    await client.send(3, {"t": 12346, "seq_ack": -1})
    assert await client.closed() == 4002


async def test_op11_is_an_object(server: SandboxVoiceServer, http: aiohttp.ClientSession) -> None:
    client = await identified(server, http)
    op11 = await client.expect(11)
    assert op11["d"] == {"user_ids": {}}
    assert ops(client) == [8, 2, 11]
    await client.close()


async def test_udp_is_closed_4000(server: SandboxVoiceServer, http: aiohttp.ClientSession) -> None:
    client = await identified(server, http)
    ip, port = await client.discover()
    data = {"address": ip, "port": port, "mode": "aead_aes256_gcm_rtpsize"}
    await client.send(1, {"protocol": "udp", "data": data})
    assert await client.closed() == 4000


async def test_op1_without_a_top_level_sdp_is_not_answered(
    server: SandboxVoiceServer, http: aiohttp.ClientSession
) -> None:
    client = await identified(server, http)
    transport = WebRtcTransport(host_candidates_allow_loopback=True)
    try:
        op1 = await transport.prepare((await client.expect(2))["d"])
        fragment = op1["data"]
        assert isinstance(fragment, str)
        without_sdp = {k: v for k, v in op1.items() if k != "sdp"}
        await client.send(1, without_sdp)
        # Messages are handled in order: the ACK comes after whatever op1 brought (nothing).
        await client.send(3, 1)
        await client.expect(6)
        assert 4 not in ops(client)
        assert server.stats.ignored_payloads == 1
        await client.send(1, {**without_sdp, "sdp": fragment, "data": "garbage"})
        description = (await client.expect(4))["d"]
        assert "dave_protocol_version" not in description
    finally:
        await transport.close()
    await client.close()


async def test_op12_before_dtls_is_answered_once_dtls_is_up_on_an_rsa_certificate(
    server: SandboxVoiceServer, http: aiohttp.ClientSession
) -> None:
    client = await identified(server, http)
    ready = (await client.expect(2))["d"]
    transport = WebRtcTransport(host_candidates_allow_loopback=True)
    frames = tone_frames(0.5)
    try:
        op1 = await transport.prepare(ready)
        assert transport.ssrc == ready["ssrc"]
        # As the Legato client does: op12 right after op2, long before DTLS.
        await client.send(12, {"audio_ssrc": transport.ssrc, "video_ssrc": 0, "rtx_ssrc": 0})
        await client.send(1, op1)
        description = (await client.expect(4))["d"]
        assert 15 not in ops(client)  # DTLS cannot be up before we start it: op12 is held
        await transport.start(description)
        assert (await client.expect(15))["d"] == {"any": 100}
        kinds = [e.kind for e in server.events if e.user_id == ALICE]
        assert kinds.index("dtls_connected") < kinds.index("streams_published")
        recording = server.recording(ALICE)
        await send_webrtc(transport, frames, recording)
    finally:
        await transport.close()
    await client.close()
    # The peer's DTLS certificate is the server's one RSA certificate (medooze's kind): the
    # client, offering ECDHE-RSA suites as browsers do, negotiated with it.
    certificate = server.dtls_certificate
    assert certificate is not None
    assert certificate.key_type == "rsa"
    [fingerprint] = [f for f in certificate.getFingerprints() if f.algorithm == "sha-256"]
    assert sdp.ServerFragment.parse(description["sdp"]).fingerprint == fingerprint.value
    assert server.stats.unpublished_packets == 0


async def test_op12_that_dtls_does_not_follow_is_dropped(
    server: SandboxVoiceServer, http: aiohttp.ClientSession
) -> None:
    client = await identified(server, http)
    await client.send(12, {"audio_ssrc": client.ssrc, "video_ssrc": 0, "rtx_ssrc": 0})
    await client.send(3, 1)
    await client.expect(6)
    assert 15 not in ops(client)

    async def beat() -> None:
        for nonce in itertools.count(2):
            await client.send(3, nonce)
            await asyncio.sleep(0.25)  # the protocol's own period

    # Spacebar drops it about 3 s on (the profile's window); heartbeats keep the link meanwhile.
    beater = asyncio.create_task(beat())
    try:
        await server.wait_event("streams_dropped", ALICE, timeout=GUARD)
    finally:
        beater.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beater
    assert server.stats.streams_dropped == 1
    assert 15 not in ops(client)
    await client.close()


def test_the_profile_serves_ws_only_and_has_no_dave() -> None:
    with pytest.raises(ValueError, match="ws://"):
        SandboxVoiceServer(profile="spacebar", tls=True)
    with pytest.raises(ValueError, match="DAVE"):
        SandboxVoiceServer(profile="spacebar", dave_protocol_version=1)
    with pytest.raises(ValueError, match="unknown sandbox profile"):
        voice_profile("matrix")
    assert voice_profile("spacebar") is SPACEBAR


async def test_the_endpoint_is_plain_ws(server: SandboxVoiceServer) -> None:
    assert server.url.startswith("ws://")
    assert "://" not in server.endpoint  # host:port, as Spacebar hands it out
    assert websocket_url(server.endpoint, 6) == f"ws://{server.endpoint}/?v=6"


async def test_the_command_line_voice_server_plays_spacebar(http: aiohttp.ClientSession) -> None:
    async with command_line_voice_server("--profile", "spacebar") as lines:
        url = lines[0].split()[-1]
        assert url.startswith("ws://")
        assert url.endswith("/?v=6")
        token = lines[2].split()[-1]
        ws = await http.ws_connect(url)
        assert await ws.receive_json() == {"op": 8, "d": {"heartbeat_interval": 13750.0}}
        d = {"server_id": str(GUILD), "session_id": "sA", "token": token}
        await ws.send_json({"op": 7, "d": d})
        await ws.receive()
        assert ws.close_code == 4003
        await ws.close()


def test_the_command_line_takes_a_profile() -> None:
    args: Any = build_parser().parse_args(["voice", "--profile", "spacebar"])
    assert args.profile == "spacebar"
    args = build_parser().parse_args(["discord", "--profile", "spacebar"])
    assert args.profile == "spacebar"
    assert build_parser().parse_args(["voice"]).profile == "discord"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["voice", "--profile", "matrix"])
