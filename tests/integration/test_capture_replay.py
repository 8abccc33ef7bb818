"""The seed capture replayed: its server's messages to Legato's client, its client's to the sandbox.

``tests/capture.py`` holds the capture's voice gateway messages verbatim (Discord's browser
client, gateway v6, transport ``webrtc``). Each direction is replayed over a real websocket on
loopback, in the capture's order, and what the other side answers is compared with what the
capture shows its counterpart answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from legato.errors import TransportError, VoiceConnectError
from legato.sandbox.voice import SandboxVoiceServer
from legato.voice import sdp
from legato.voice.gateway import VoiceConnection, VoiceOptions
from legato.voice.transport.webrtc import WebRtcTransport
from tests import capture
from tests.capture import d

GUARD = 30.0  # seconds; only guards against hangs on a loaded machine
READY = d(capture.READY)
SESSION = d(capture.SESSION_DESCRIPTION)


def lines_of(text: str) -> list[str]:
    return [line for line in text.replace("\r\n", "\n").split("\n") if line]


def op4_template(fragment: str) -> list[str]:
    """op4's ``sdp`` lines with the values a server picks (port, address, ICE, digest) blanked."""
    blanked = []
    for line in lines_of(fragment):
        line = re.sub(r"sha-256 [0-9A-F:]{95}$", "sha-256 DIGEST", line)
        line = re.sub(r"^a=ice-(ufrag|pwd):.*$", r"a=ice-\1:X", line)
        line = re.sub(r"\b\d{1,3}(\.\d{1,3}){3}\b", "IP", line)
        line = re.sub(r"\b\d{2,5}\b(?= ICE/SDP| typ host|$)", "PORT", line)
        blanked.append(line)
    return blanked


# -- the capture's client messages to the sandbox -------------------------------------------------


@dataclass
class Conversation:
    """One websocket to the sandbox: every message it answered, in order."""

    ws: aiohttp.ClientWebSocketResponse
    received: list[dict[str, Any]] = field(default_factory=list)

    async def send(self, text: str) -> None:
        await self.ws.send_str(text)

    async def expect(self, op: int) -> dict[str, Any]:
        """The next message; it must be op ``op`` (the sandbox answers in the capture's order)."""
        async with asyncio.timeout(GUARD):
            msg = await self.ws.receive()
        assert msg.type is aiohttp.WSMsgType.TEXT, f"expected op {op}, got {msg.type} {msg.data}"
        data: dict[str, Any] = json.loads(msg.data)
        self.received.append(data)
        assert data["op"] == op, f"expected op {op}, got {data}"
        return data


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxVoiceServer]:
    # What the capture's server was: plain v6 as the client asked, no DAVE (2022), no TLS here.
    async with SandboxVoiceServer("127.0.0.1", tls=False, dave_protocol_version=0) as server:
        yield server


@pytest.mark.integration
async def test_the_sandbox_answers_the_captures_client_messages_as_discord_did(
    sandbox: SandboxVoiceServer,
) -> None:
    token = sandbox.register_session(
        server_id=int(capture.SERVER_ID),
        user_id=int(capture.USER_ID),
        session_id=capture.SESSION_ID,
    )
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{sandbox.url}/?v=6", autoclose=False)
        talk = Conversation(ws)
        hello = await talk.expect(8)
        assert set(hello["d"]) == set(d(capture.HELLO))

        # The capture's identify; only its redacted token is replaced by the one the sandbox
        # handed out.
        await talk.send(capture.IDENTIFY.replace('"<token>"', json.dumps(token)))
        ready = (await talk.expect(2))["d"]
        assert set(ready) == set(READY)
        (stream,) = ready["streams"]
        assert set(stream) == set(READY["streams"][0])
        assert (stream["type"], stream["rid"], stream["quality"], stream["active"]) == (
            "video",
            "100",
            100,
            False,
        )

        await talk.send(capture.BACKEND_VERSION_REQUEST)
        assert set((await talk.expect(16))["d"]) == set(d(capture.BACKEND_VERSION))
        await talk.send(capture.STREAMS)

        # op1 exactly as Discord accepted it: no fingerprint, H264/VP8/VP9 beside opus on 109.
        await talk.send(capture.SELECT_PROTOCOL)
        assert (await talk.expect(15))["d"] == d(capture.MEDIA_SINK_WANTS)
        session = (await talk.expect(4))["d"]

        await talk.send(capture.HEARTBEAT)
        assert (await talk.expect(6))["d"] == d(capture.HEARTBEAT_ACK)
        await talk.send(capture.SPEAKING_ON)
        await talk.send(capture.SPEAKING_OFF)
        # Still open: one more heartbeat is answered (a lone user gets no op5 relayed).
        await talk.send(capture.HEARTBEAT)
        assert (await talk.expect(6))["d"] == d(capture.HEARTBEAT_ACK)
        info = sandbox.session(int(capture.USER_ID), int(capture.SERVER_ID))
        assert info.protocol == "webrtc"
        await ws.close()

    # op4 in the capture's shape: its keys, its codecs, and its sdp line for line, with the
    # media port and address of op2 (one media port per server, as Discord's).
    assert set(SESSION) <= set(session)
    assert (session["audio_codec"], session["video_codec"]) == ("opus", "H264")
    assert re.fullmatch(r"[0-9a-f]{32}", session["media_session_id"])
    assert op4_template(session["sdp"]) == op4_template(SESSION["sdp"])
    assert session["sdp"].endswith("\n")
    server = sdp.ServerFragment.parse(session["sdp"])
    assert (server.port, server.address) == (ready["port"], ready["ip"])
    fingerprints = [x for x in lines_of(session["sdp"]) if x.startswith("a=fingerprint:")]
    assert len(fingerprints) == 2
    assert len(set(fingerprints)) == 1
    assert server.candidates == (f"1 1 UDP 4261412862 {ready['ip']} {ready['port']} typ host",)
    assert f"a=rtcp:{ready['port']}" in lines_of(session["sdp"])


# -- the capture's server messages to Legato's client ---------------------------------------------


@dataclass
class ScriptedServer:
    """Answers a voice client with the capture's server messages, verbatim, in its order."""

    sent_op4: asyncio.Event = field(default_factory=asyncio.Event)
    received: list[str] = field(default_factory=list)
    closes: list[int | None] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(capture.HELLO)
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            self.received.append(msg.data)
            op = json.loads(msg.data)["op"]
            if op == 0:
                await ws.send_str(capture.READY)
            elif op == 16:
                await ws.send_str(capture.BACKEND_VERSION)
            elif op == 1:
                await ws.send_str(capture.MEDIA_SINK_WANTS)
                await ws.send_str(capture.SESSION_DESCRIPTION)
                self.sent_op4.set()
        self.closes.append(ws.close_code)
        return ws


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedServer, str]]:
    server = ScriptedServer()
    app = web.Application()
    app.router.add_get("/", server.handle)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield server, f"127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.mark.integration
async def test_legato_answers_the_captures_server_messages_as_the_browser_did(
    scripted: tuple[ScriptedServer, str],
) -> None:
    server, endpoint = scripted
    connection = VoiceConnection(
        endpoint=endpoint,
        token="<token>",  # the capture's identify carries it redacted: compare texts exactly
        session_id=capture.SESSION_ID,
        user_id=int(capture.USER_ID),
        server_id=int(capture.SERVER_ID),
        # The capture's client: v6, webrtc, before DAVE existed.
        options=VoiceOptions(transport="webrtc", gateway_version=6, dave=False, reconnect=False),
    )
    connecting = asyncio.ensure_future(connection.connect())
    try:
        async with asyncio.timeout(GUARD):
            await server.sent_op4.wait()
    finally:
        # The capture's media server (213.163.95.84) is not reachable from a test: the client
        # cannot finish, and what it answered up to op4 is what is compared.
        await connection.close()
        with contextlib.suppress(VoiceConnectError):
            await connecting

    identify, backend, streams, select, *rest = server.received
    assert identify == capture.IDENTIFY  # byte for byte
    assert backend == capture.BACKEND_VERSION_REQUEST
    # op12 as the browser's, but announcing the audio SSRC op2 gave (PROTOCOL.md: the client
    # announces its audio SSRC in op12; the browser sent 0 before it had one).
    expected_streams = {**d(capture.STREAMS), "audio_ssrc": READY["ssrc"]}
    assert json.loads(streams)["d"] == expected_streams
    assert list(json.loads(streams)["d"]) == list(d(capture.STREAMS))
    assert rest == []  # nothing else before op4: the first heartbeat is 13.75 s away

    op1 = json.loads(select)["d"]
    captured = d(capture.SELECT_PROTOCOL)
    assert list(op1) == list(captured)  # protocol, data, sdp, codecs, rtc_connection_id
    assert op1["protocol"] == "webrtc"
    assert op1["data"] == op1["sdp"]
    uuid.UUID(op1["rtc_connection_id"])
    (opus,) = op1["codecs"]
    assert set(opus) == set(captured["codecs"][0])
    assert (opus["name"], opus["type"], opus["rtx_payload_type"]) == ("opus", "audio", None)
    fragment = lines_of(op1["sdp"])
    assert not [x for x in fragment if not x.startswith("a=")]  # attribute lines only
    names = [x[2:].partition(":")[0] for x in fragment]
    assert names.count("ice-ufrag") == names.count("ice-pwd") == names.count("fingerprint") == 1
    assert f"a=rtpmap:{opus['payload_type']} opus/48000/2" in fragment
    assert any(x.startswith("a=extmap:") for x in fragment)


@pytest.mark.integration
async def test_legato_builds_its_answer_from_the_captures_op4() -> None:
    """The capture's op4 is applied and ICE checks begin toward its candidate.

    The capture's media server cannot be reached from here, so the transport's own verdict
    tells how far it got: "did not connect" with ICE under way (not "cannot apply").
    """
    transport = WebRtcTransport(host_candidates_allow_loopback=True, connect_timeout=1.0)
    try:
        op1 = await transport.prepare(READY)
        assert op1["codecs"][0]["name"] == "opus"
        assert transport.ssrc == READY["ssrc"]
        async with asyncio.timeout(GUARD):
            with pytest.raises(TransportError) as failed:
                await transport.start(SESSION)
    finally:
        await transport.close()
    assert "cannot apply" not in str(failed.value)
    assert re.search(r"did not connect within 1 s \(ICE (checking|failed)", str(failed.value)) or (
        "WebRTC connection failed" in str(failed.value)
    )
