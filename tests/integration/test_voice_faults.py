"""The voice client under faults: closes, drops, moves, silence from the server, bad input."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from legato.errors import VoiceClosed, VoiceConnectError, VoiceError
from legato.sandbox.recording import Recording
from legato.sandbox.rtp import discovery_response, parse_discovery_request
from legato.sandbox.voice import SandboxVoiceServer
from legato.voice.client import LegatoVoiceClient
from legato.voice.gateway import MAX_MESSAGE_SIZE, VoiceConnection, VoiceOptions
from legato.voice.state import ClientState, LinkState
from legato.voice.transport.udp import UdpTransport
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

FAULT_AT_FRAME = 50


@asynccontextmanager
async def connection(server: SandboxVoiceServer, **options: Any) -> AsyncIterator[VoiceConnection]:
    token = server.register_session(server_id=GUILD_ID, user_id=BOT_ID, session_id="sess")
    conn = VoiceConnection(
        endpoint=server.endpoint,
        token=token,
        session_id="sess",
        user_id=BOT_ID,
        server_id=GUILD_ID,
        options=VoiceOptions(**options),
    )
    await conn.connect()
    try:
        yield conn
    finally:
        await conn.close()
        assert voice_tasks() == []  # every task the connection started is gone


async def play_with_fault(
    conn: VoiceConnection, fault: Callable[[], Awaitable[object]], seconds: float = 3.0
) -> Player:
    """Play a tone and run ``fault`` once ``FAULT_AT_FRAME`` frames have gone out."""
    player = Player(conn, tone_frames(seconds))
    playing = asyncio.create_task(player.play())
    try:
        await player.wait_sent(FAULT_AT_FRAME)
        await fault()
    finally:
        await playing
    return player


async def assert_continuous_440(server: SandboxVoiceServer, conn: VoiceConnection) -> None:
    """Every frame the transport sent arrived, in sequence, and the tone is intact."""
    rec = server.recording(BOT_ID)
    await rec.wait_frames(conn.stats.frames_sent, timeout=20)
    stats = rec.stats()
    assert stats.frames == conn.stats.frames_sent
    assert stats.gaps == 0
    assert stats.sequence_errors == 0
    assert stats.timestamp_errors == 0
    # Audio went on after the fault: well past the frame it struck at.
    assert stats.frames > FAULT_AT_FRAME + 50
    assert await asyncio.to_thread(rec.dominant_frequency) == pytest.approx(440.0, abs=2.0)


@pytest.mark.parametrize(("fault", "version"), [("4015", 8), ("4015", 6), ("drop", 8), ("drop", 6)])
async def test_resume_keeps_ssrc_and_sequence(fault: str, version: int) -> None:
    async with voice_server() as server, connection(server, gateway_version=version) as conn:
        ssrc = conn.ssrc

        async def strike() -> None:
            if fault == "drop":
                await server.inject_drop(BOT_ID)
            else:
                await server.inject_close(BOT_ID, 4015)
            await server.wait_resumed(BOT_ID)

        await play_with_fault(conn, strike)
        assert conn.ssrc == ssrc
        assert conn.gateway_stats.resumes == 1
        assert (conn.reconnects, conn.resumes) == (1, 1)
        await assert_continuous_440(server, conn)
        assert server.recording(BOT_ID).stats().streams == 1  # same SSRC throughout
        assert conn.is_connected()


async def test_4006_starts_a_new_session() -> None:
    async with voice_server() as server, connection(server) as conn:
        first_ssrc = conn.ssrc

        async def strike() -> None:
            await server.inject_close(BOT_ID, 4006)
            await server.wait_identified(BOT_ID, count=2)

        await play_with_fault(conn, strike)
        assert conn.ssrc != first_ssrc
        assert conn.gateway_stats.resumes == 0
        assert (conn.reconnects, conn.resumes) == (1, 0)
        rec = server.recording(BOT_ID)
        await rec.wait_frames(conn.stats.frames_sent, timeout=20)
        stats = rec.stats()
        assert stats.streams == 2
        assert stats.gaps == 0
        assert stats.frames == conn.stats.frames_sent
        assert stats.frames > FAULT_AT_FRAME + 50
        await rec.wait_speaking(False)
        # Speaking was restated for the new SSRC before its media.
        assert [c.ssrc for c in rec.speaking_changes if c.on] == [first_ssrc, conn.ssrc]


async def test_move_to_a_new_endpoint_reconnects_there() -> None:
    async with voice_server() as server, connection(server) as conn:
        first = server.endpoint

        async def strike() -> None:
            new_endpoint = await server.move(BOT_ID)
            assert new_endpoint != first
            # What the main gateway hands out on a move: the new endpoint and a new token.
            token = server.register_session(server_id=GUILD_ID, user_id=BOT_ID, session_id="sess")
            conn.update_server(new_endpoint, token)
            await server.wait_identified(BOT_ID, count=2)

        await play_with_fault(conn, strike)
        assert conn.endpoint != first
        assert server.session(BOT_ID).endpoint == conn.endpoint
        # A fresh gateway session at the new server; the count spans both.
        assert (conn.reconnects, conn.resumes) == (1, 0)
        rec = server.recording(BOT_ID)
        await rec.wait_frames(conn.stats.frames_sent, timeout=20)
        assert rec.stats().streams == 2
        assert rec.stats().gaps == 0
        assert rec.stats().frames > FAULT_AT_FRAME + 50


async def test_4014_then_a_new_server_within_the_grace_period_reconnects() -> None:
    async with voice_server() as server, connection(server, move_timeout=10.0) as conn:

        async def strike() -> None:
            # Discord's order on a move: the old voice server closes 4014, then the main
            # gateway's VOICE_SERVER_UPDATE follows.
            new_endpoint = await server.move(BOT_ID, close_code=4014)
            await server.wait_closed(BOT_ID)
            token = server.register_session(server_id=GUILD_ID, user_id=BOT_ID, session_id="sess")
            conn.update_server(new_endpoint, token)
            await server.wait_identified(BOT_ID, count=2)

        await play_with_fault(conn, strike)
        assert conn.is_connected()
        assert conn.link_state is LinkState.CONNECTED
        assert server.session(BOT_ID).endpoint == conn.endpoint
        rec = server.recording(BOT_ID)
        await rec.wait_frames(conn.stats.frames_sent, timeout=20)
        assert rec.stats().streams == 2
        assert rec.stats().gaps == 0
        assert rec.stats().frames > FAULT_AT_FRAME + 50


async def test_missed_heartbeat_acks_resume() -> None:
    async with (
        voice_server(heartbeat_interval=0.2) as server,
        connection(server) as conn,
    ):

        async def strike() -> None:
            server.stop_heartbeat_acks(BOT_ID)
            await server.wait_resumed(BOT_ID)
            server.resume_heartbeat_acks(BOT_ID)

        await play_with_fault(conn, strike)
        assert conn.gateway_stats.heartbeat_timeouts >= 1
        await assert_continuous_440(server, conn)
        assert server.recording(BOT_ID).stats().streams == 1


async def test_4014_without_a_move_stops_and_cleans_up() -> None:
    async with voice_server() as server, discord_world(server) as world:
        options = VoiceOptions(move_timeout=0.5)
        vc = await world.channel.connect(cls=LegatoVoiceClient.configured(options), timeout=20)
        assert isinstance(vc, LegatoVoiceClient)
        gone: asyncio.Future[VoiceError | None] = asyncio.get_running_loop().create_future()
        vc.add_disconnect_listener(lambda _vc, error: gone.set_result(error))
        await server.inject_close(BOT_ID, 4014)
        async with asyncio.timeout(20):
            error = await gone
        assert isinstance(error, VoiceClosed)
        assert error.code == 4014
        assert error.user_message == "I was disconnected from the voice channel."
        assert world.guild.voice_client is None  # cleanup() ran
        assert world.gateway.left.is_set()  # and we told the main gateway we left
        assert not vc.is_connected()
        assert vc.state is ClientState.CLOSED
        assert vc.connection is not None
        assert vc.connection.link_state is LinkState.CLOSED
        vc.send_frame(b"\xf8\xff\xfe")  # the player may still hand over a frame: no crash
        await vc.disconnect()  # and a late disconnect is harmless


def stream_gaps(rec: Recording) -> list[float]:
    """Seconds between the last packet of each SSRC and the first of the next, as recorded."""
    spans: dict[int, list[float]] = {}
    for packet in rec.packets:
        spans.setdefault(packet.ssrc, []).append(packet.arrival)
    ordered = sorted(spans.values(), key=lambda arrivals: arrivals[0])
    return [b[0] - a[-1] for a, b in itertools.pairwise(ordered)]


async def test_drops_from_spacebar_reidentify_at_once_and_resume_is_not_tried_again() -> None:
    # Issue #12: the voice websocket's TCP connection to Spacebar cut mid-track. Spacebar has no
    # op7 and closes anything before identify with 4003: the first drop's resume gets that, the
    # client identifies at once and plays on; the second drop goes straight to identify.
    frames = tone_frames(6.0)
    async with voice_server(profile="spacebar") as server, discord_world(server) as world:
        options = VoiceOptions(transport="webrtc", gateway_version=6)
        vc = await world.channel.connect(cls=LegatoVoiceClient.configured(options), timeout=30)
        assert isinstance(vc, LegatoVoiceClient)
        ended: list[VoiceError | None] = []
        vc.add_disconnect_listener(lambda _vc, error: ended.append(error))
        player = Player(vc, frames)
        playing = asyncio.create_task(player.play())
        try:
            for drop, at_frame in enumerate((FAULT_AT_FRAME, 3 * FAULT_AT_FRAME), start=1):
                await player.wait_sent(at_frame)
                await server.inject_drop(BOT_ID)
                await server.wait_identified(BOT_ID, count=drop + 1, timeout=20)
                await server.wait_event("streams_published", BOT_ID, count=drop + 1, timeout=20)
        finally:
            await playing
        rec = server.recording(BOT_ID, GUILD_ID)
        await rec.wait_speaking(False, timeout=20)

        # The session went on: never torn down, every frame handed over or counted as dropped.
        assert ended == []
        assert vc.is_connected()
        assert player.sent == len(frames) + 5
        assert vc.stats.frames_sent + vc.frames_dropped == player.sent
        # One op7 in all (the first drop's, refused with 4003); the second drop sent none.
        kinds = [e.kind for e in server.events if e.user_id == BOT_ID]
        assert kinds.count("resume_refused") == 1
        assert kinds.count("identify") == 3
        assert "resume" not in kinds
        assert (vc.reconnects, vc.resumes) == (3, 1)
        # Spacebar's op11 object (one a session) is counted as malformed and nothing more.
        assert vc.connection is not None
        assert vc.connection.gateway_stats.malformed == 3
        # Three sessions, three SSRCs; within each, no gap; audio back within 1 s of each drop,
        # measured between the recorded arrivals on either side of it.
        heard = vc.stats.frames_sent - server.stats.unpublished_packets
        await rec.wait_frames(heard, timeout=20)
        stats = rec.stats()
        assert stats.streams == 3
        assert stats.gaps == 0
        assert stats.frames == heard
        gaps = stream_gaps(rec)
        assert len(gaps) == 2
        assert all(0 < gap < 1.0 for gap in gaps), gaps
        assert await asyncio.to_thread(rec.dominant_frequency) == pytest.approx(440.0, abs=2.0)

        await vc.disconnect()
        assert voice_tasks() == []


async def test_a_refused_resume_is_remembered_per_endpoint() -> None:
    # After a move the new endpoint is tried with op7 once (a refusal from the old one says
    # nothing of it); each endpoint refuses once, and later drops there go straight to identify.
    async with (
        voice_server(profile="spacebar") as server,
        connection(server, transport="webrtc", gateway_version=6) as conn,
    ):
        player = Player(conn, tone_frames(6.0))
        playing = asyncio.create_task(player.play())
        identified = 1

        async def drop_at(frame: int) -> None:
            nonlocal identified
            await player.wait_sent(frame)
            await server.inject_drop(BOT_ID)
            identified += 1
            await server.wait_identified(BOT_ID, count=identified, timeout=20)

        try:
            await drop_at(FAULT_AT_FRAME)
            await drop_at(2 * FAULT_AT_FRAME)
            await player.wait_sent(3 * FAULT_AT_FRAME)
            new_endpoint = await server.move(BOT_ID)
            token = server.register_session(server_id=GUILD_ID, user_id=BOT_ID, session_id="sess")
            conn.update_server(new_endpoint, token)
            identified += 1
            await server.wait_identified(BOT_ID, count=identified, timeout=20)
            await drop_at(4 * FAULT_AT_FRAME)
            await drop_at(5 * FAULT_AT_FRAME)
        finally:
            await playing
        refused = [e.endpoint for e in server.events if e.kind == "resume_refused"]
        assert refused == [server.endpoint, new_endpoint]
        assert conn.resumes == 2
        assert conn.is_connected()
        assert conn.endpoint == new_endpoint


async def test_reconnect_gives_up_with_a_clear_error() -> None:
    server = SandboxVoiceServer(heartbeat_interval=0.5)
    await server.start()
    try:
        async with connection(server, reconnect_timeout=2.0, backoff_base=0.05) as conn:
            await server.close()  # the voice server is gone for good
            async with asyncio.timeout(30):
                error = await conn.wait_closed()
            assert isinstance(error, VoiceError)
            assert "gave up" in str(error)
            assert not conn.is_connected()
            conn.send_frame(b"\xf8\xff\xfe")
            assert conn.frames_dropped == 1
    finally:
        await server.close()


async def test_garbage_datagrams_to_the_client_are_counted() -> None:
    async with voice_server() as server, connection(server) as conn:
        transport = conn.transport
        assert isinstance(transport, UdpTransport)
        assert transport.local_address is not None
        target = ("127.0.0.1", transport.local_address[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk:
            for payload in (b"\x00", b"\xff" * 3, b"\x80\x78" + bytes(40), bytes(74)):
                junk.sendto(payload, target)
        frames = tone_frames(1.0)
        await Player(conn, frames).play()  # the loop reads the junk while this plays
        assert conn.stats.malformed_received == 4
        rec = server.recording(BOT_ID)
        await rec.wait_frames(len(frames) + 5, timeout=20)
        assert rec.stats().gaps == 0


# -- a scripted voice server for what the sandbox does not do ------------------------------


class ScriptedVoiceServer:
    """A bare voice gateway: answers IP discovery and the udp handshake, with two quirks.

    Args:
        op4_mode: The mode op4 names (default: the one op1 selected).
        refuse_v8_heartbeat: Close 4002 on a heartbeat object, as Spacebar does.
        padding: Before op4, send an unknown op this many bytes long (0: none).
    """

    def __init__(
        self,
        *,
        op4_mode: str | None = None,
        refuse_v8_heartbeat: bool = False,
        padding: int = 0,
    ) -> None:
        self.op4_mode = op4_mode
        self.refuse_v8_heartbeat = refuse_v8_heartbeat
        self.padding = padding
        self.versions: list[int] = []
        self.closes: list[int | None] = []
        self.sessions = 0
        self.refused = 0
        self.heartbeats = 0
        self.changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self.endpoint = ""

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        outer = self

        class Discovery(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
                if len(data) == 74 and outer._udp is not None:
                    ssrc = parse_discovery_request(data)
                    outer._udp.sendto(discovery_response(ssrc, addr[0], addr[1]), addr)

        self._udp, _ = await loop.create_datagram_endpoint(Discovery, local_addr=("127.0.0.1", 0))
        app = web.Application()
        app.router.add_get("/", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.endpoint = f"127.0.0.1:{self._runner.addresses[0][1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._udp is not None:
            self._udp.close()

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        assert self._udp is not None
        self.versions.append(int(request.query["v"]))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(json.dumps({"op": 8, "d": {"heartbeat_interval": 100}}))
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                break
            message = json.loads(msg.data)
            op, d = message["op"], message["d"]
            if op == 0:
                ready = {
                    "ssrc": 7 + len(self.versions),
                    "ip": "127.0.0.1",
                    "port": self._udp.get_extra_info("sockname")[1],
                    "modes": ["aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize"],
                }
                await ws.send_str(json.dumps({"op": 2, "d": ready}))
            elif op == 1:
                mode = self.op4_mode or d["data"]["mode"]
                if self.padding:
                    frame = json.dumps({"op": 99, "d": {"pad": ""}})
                    pad = "x" * (self.padding - len(frame))
                    with contextlib.suppress(ConnectionError):
                        await ws.send_str(json.dumps({"op": 99, "d": {"pad": pad}}))
                    if ws.closed:
                        break
                await ws.send_str(
                    json.dumps({"op": 4, "d": {"mode": mode, "secret_key": [1] * 32}})
                )
                async with self.changed:
                    self.sessions += 1
                    self.changed.notify_all()
            elif op == 3:
                if isinstance(d, dict) and self.refuse_v8_heartbeat:
                    self.refused += 1
                    await ws.close(code=4002, message=b"bad heartbeat")
                    break
                await ws.send_str(json.dumps({"op": 6, "d": d}))
                async with self.changed:
                    self.heartbeats += 1
                    self.changed.notify_all()
        self.closes.append(ws.close_code)
        return ws


@asynccontextmanager
async def scripted(**kwargs: Any) -> AsyncIterator[ScriptedVoiceServer]:
    server = ScriptedVoiceServer(**kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def scripted_connection(server: ScriptedVoiceServer, **options: Any) -> VoiceConnection:
    return VoiceConnection(
        endpoint=server.endpoint,
        token="t",
        session_id="s",
        user_id=BOT_ID,
        server_id=GUILD_ID,
        options=VoiceOptions(**options),
    )


async def test_op4_with_another_mode_is_a_clear_close() -> None:
    async with scripted(op4_mode="aead_xchacha20_poly1305_rtpsize") as server:
        conn = scripted_connection(server)
        with pytest.raises(VoiceConnectError) as info:
            await conn.connect()
        cause = info.value.__cause__
        assert isinstance(cause, VoiceClosed)
        assert cause.code == 4016
        assert "mode" in str(cause)
        assert server.closes == [4016]  # we closed with the server's own code for a bad mode
        assert server.versions == [6]  # and did not retry


async def test_auto_version_is_v6_toward_a_self_hosted_server() -> None:
    # A server that refuses v8's heartbeat object, as Spacebar does, is spoken to in v6 from
    # the first session on: "auto" picks v8 only for Discord's hosts (auto_gateway_version).
    async with scripted(refuse_v8_heartbeat=True) as server:
        conn = scripted_connection(server, gateway_version="auto")
        await conn.connect()
        try:
            async with asyncio.timeout(20), server.changed:
                await server.changed.wait_for(lambda: server.heartbeats >= 2)
            assert conn.is_connected()
            assert server.versions == [6]
            assert server.refused == 0
            assert server.sessions == 1
        finally:
            await conn.close()
        assert conn.error is None


async def test_a_message_near_the_size_limit_is_read() -> None:
    # DAVE welcomes and commits run to tens of KB; half a megabyte still passes (and, being an
    # unknown op, is counted and ignored).
    async with scripted(padding=MAX_MESSAGE_SIZE // 2) as server:
        conn = scripted_connection(server)
        await conn.connect()  # op4 came after the padded message: it was read and dropped
        try:
            assert conn.gateway_stats.unknown_ops == 1
            assert conn.gateway_stats.malformed == 0
        finally:
            await conn.close()
        assert conn.error is None


async def test_an_oversize_message_is_a_clear_close() -> None:
    # A hostile server's endless message must not be buffered: aiohttp refuses it from the frame
    # header, closes 1009, and the session ends with a clear error, without a crash or a retry.
    async with scripted(padding=MAX_MESSAGE_SIZE + 1) as server:
        conn = scripted_connection(server)
        with pytest.raises(VoiceConnectError) as info:
            await conn.connect()
        cause = info.value.__cause__
        assert isinstance(cause, VoiceClosed)
        assert cause.code == 1009
        assert cause.user_message == "The voice server sent a message too large to accept."
        assert "too big" in str(cause)
        assert server.versions == [6]  # stopped: a resume would be sent the same message
        assert server.closes == [1009]
        assert voice_tasks() == []
