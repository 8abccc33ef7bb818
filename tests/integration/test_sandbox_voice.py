"""The sandbox voice server against a tiny scripted client: real websockets and UDP on loopback.

The client below is deliberately small and separate from Legato's voice client: it speaks the
protocol op by op so that each test can break it where it wants, and it uses only the pure
:mod:`legato.voice.rtp` and :mod:`legato.voice.crypto` helpers.

It has no DAVE (it checks the transport layer's frames as sent), so its servers are asked for
``dave_protocol_version=0``; everything else is the Discord-faithful default (TLS from the local
CA, which aiohttp in this process trusts, and the ``*.discord.media`` endpoint name).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import av
import numpy as np
import pytest

from legato.audio.encode import OpusEncoder
from legato.audio.sink import OPUS_SILENCE, SILENCE_FRAMES
from legato.audio.source import FRAME_SAMPLES, SAMPLE_RATE
from legato.sandbox.__main__ import recording_report
from legato.sandbox.analysis import dominant_frequency
from legato.sandbox.recording import Recording
from legato.sandbox.rtp import pack_receiver_report
from legato.sandbox.voice import SandboxVoiceServer
from legato.sandbox.voice_media import CLOCK_READ_TOLERANCE
from legato.voice.crypto import PacketEncryptor
from legato.voice.rtp import (
    discovery_request,
    pack_rtp_header,
    parse_discovery_response,
    parse_rtp_header,
)
from legato.voice.transport.webrtc import WebRtcTransport

pytestmark = pytest.mark.integration

FRAME_S = FRAME_SAMPLES / SAMPLE_RATE

GUILD = 111
ALICE = 201
BOB = 202
TONE_HZ = 440.0
GUARD = 20.0  # seconds: only against hangs on a loaded machine, never a speed assertion


def tone_frames(seconds: float, freq: float = TONE_HZ) -> list[bytes]:
    """A stereo sine at -6 dBFS, Opus-encoded in 20 ms frames."""
    count = int(seconds * 50)
    t = np.arange(count * FRAME_SAMPLES) / SAMPLE_RATE
    mono = (0.5 * 32767 * np.sin(2 * math.pi * freq * t)).astype("<i2")
    pcm = np.repeat(mono, 2).tobytes()
    encoder = OpusEncoder()
    step = FRAME_SAMPLES * 4
    return [encoder.encode(pcm[i * step : (i + 1) * step]) for i in range(count)]


@pytest.fixture(scope="module")
def tone() -> list[bytes]:
    return tone_frames(1.5)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.received.put_nowait(data)


class ScriptedClient:
    """One voice connection, driven op by op."""

    def __init__(self, session: aiohttp.ClientSession, url: str, version: int) -> None:
        self.http = session
        self.url = f"{url}/?v={version}"
        self.version = version
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.messages: list[dict[str, Any]] = []
        self.seq_ack = -1
        self.close_code: int | None = None
        self._arrived = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None
        self._beater: asyncio.Task[None] | None = None
        self.udp: asyncio.DatagramTransport | None = None
        self.udp_protocol = _Udp()
        self.ssrc = 0
        self.server_udp: tuple[str, int] = ("", 0)
        self.encryptor: PacketEncryptor | None = None
        self.sequence = 0
        self.timestamp = 0

    # websocket ------------------------------------------------------------------------------

    async def open(self, *, heartbeat: bool = True) -> dict[str, Any]:
        self.ws = await self.http.ws_connect(self.url, autoclose=False)
        self.messages.clear()
        self.close_code = None
        self._reader = asyncio.create_task(self._read())
        hello = await self.expect(8)
        if heartbeat:
            interval = hello["d"]["heartbeat_interval"] / 1000
            self._beater = asyncio.create_task(self._beat(interval))
        return hello

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                data = json.loads(msg.data)
                if "seq" in data:
                    self.seq_ack = data["seq"]
                async with self._arrived:
                    self.messages.append(data)
                    self._arrived.notify_all()
        # autoclose is off (as in discord.py): answer the server's close frame ourselves.
        await self.ws.close()
        async with self._arrived:
            self.close_code = self.ws.close_code
            self._arrived.notify_all()

    async def _beat(self, interval: float) -> None:
        nonce = 0
        while True:
            nonce += 1
            if self.version >= 8:
                await self.send(3, {"t": nonce, "seq_ack": self.seq_ack})
            else:
                await self.send(3, nonce)
            # The protocol's own period, not a wait for some other event.
            await asyncio.sleep(interval)

    async def send(self, op: int, d: Any) -> None:
        await self.send_text(json.dumps({"op": op, "d": d}))

    async def send_text(self, text: str) -> None:
        assert self.ws is not None
        with contextlib.suppress(ConnectionResetError):
            await self.ws.send_str(text)

    async def expect(self, op: int, *, after: int = 0) -> dict[str, Any]:
        """The first message with ``op`` at index ``after`` or later."""
        async with asyncio.timeout(GUARD), self._arrived:
            while True:
                for msg in self.messages[after:]:
                    if msg["op"] == op:
                        return msg
                if self._reader is not None and self._reader.done():
                    raise AssertionError(f"closed {self.close_code} before op {op}")
                await self._arrived.wait()

    async def closed(self) -> int | None:
        """Wait for the server to end the connection; its close code (None: no close frame)."""
        async with asyncio.timeout(GUARD):
            assert self._reader is not None
            await self._reader
        await self.stop_beating()
        return self.close_code

    async def stop_beating(self) -> None:
        if self._beater is not None:
            self._beater.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beater
            self._beater = None

    async def close(self, code: int = 1000) -> None:
        await self.stop_beating()
        if self.ws is not None:
            await self.ws.close(code=code)
        if self._reader is not None:
            await self._reader
        if self.udp is not None:
            self.udp.close()

    # handshake ------------------------------------------------------------------------------

    async def identify(self, server: SandboxVoiceServer, user_id: int) -> dict[str, Any]:
        token = server.register_session(server_id=GUILD, user_id=user_id, session_id=f"s{user_id}")
        await self.send(
            0,
            {
                "server_id": str(GUILD),
                "user_id": str(user_id),
                "session_id": f"s{user_id}",
                "token": token,
            },
        )
        self.token = token
        self.user_id = user_id
        ready = await self.expect(2)
        self.ssrc = ready["d"]["ssrc"]
        self.server_udp = (ready["d"]["ip"], ready["d"]["port"])
        return ready

    async def discover(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        if self.udp is not None:
            self.udp.close()
        self.udp, _ = await loop.create_datagram_endpoint(
            lambda: self.udp_protocol, remote_addr=self.server_udp
        )
        self.udp.sendto(discovery_request(self.ssrc))
        async with asyncio.timeout(GUARD):
            return parse_discovery_response(await self.udp_protocol.received.get())

    async def select_udp(self, mode: str) -> dict[str, Any]:
        ip, port = await self.discover()
        await self.send(1, {"protocol": "udp", "data": {"address": ip, "port": port, "mode": mode}})
        description = await self.expect(4)
        self.encryptor = PacketEncryptor(mode, bytes(description["d"]["secret_key"]))
        return description

    async def resume(self, server: SandboxVoiceServer) -> None:
        d: dict[str, Any] = {"server_id": str(GUILD), "session_id": f"s{self.user_id}"}
        d["token"] = self.token
        if self.version >= 8:
            d["seq_ack"] = self.seq_ack
        await self.send(7, d)

    # media ----------------------------------------------------------------------------------

    async def speak(self, on: bool) -> None:
        await self.send(5, {"speaking": 1 if on else 0, "delay": 0, "ssrc": self.ssrc})

    def packet(self, opus: bytes) -> bytes:
        assert self.encryptor is not None
        header = pack_rtp_header(self.sequence, self.timestamp, self.ssrc)
        self.sequence = (self.sequence + 1) % 65536
        self.timestamp = (self.timestamp + FRAME_SAMPLES) % (1 << 32)
        return self.encryptor.encrypt(header, opus)

    async def play(self, frames: list[bytes], server: SandboxVoiceServer) -> None:
        """Send ``frames`` in bursts of 10, each burst once the server has the previous one.

        The recording itself is the flow control: loopback UDP is lossless while the socket
        buffer has room, and waiting keeps it from filling on a slow machine.
        """
        assert self.udp is not None
        recording = server.recording(self.user_id)
        for start in range(0, len(frames), 10):
            base = recording.frames
            burst = frames[start : start + 10]
            for opus in burst:
                self.udp.sendto(self.packet(opus))
            await recording.wait_frames(base + len(burst), timeout=GUARD)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def server() -> AsyncIterator[SandboxVoiceServer]:
    async with SandboxVoiceServer(heartbeat_interval=0.25, dave_protocol_version=0) as srv:
        yield srv


async def connected(
    server: SandboxVoiceServer,
    http: aiohttp.ClientSession,
    user_id: int = ALICE,
    *,
    version: int = 8,
    mode: str = "aead_aes256_gcm_rtpsize",
) -> ScriptedClient:
    client = ScriptedClient(http, server.url, version)
    await client.open()
    await client.identify(server, user_id)
    await client.select_udp(mode)
    return client


async def frequency_of(server: SandboxVoiceServer, user_id: int) -> float:
    return await asyncio.to_thread(server.recording(user_id).dominant_frequency)


async def send_webrtc(
    transport: WebRtcTransport, frames: list[bytes], recording: Recording
) -> None:
    """Send ``frames`` over a started webrtc ``transport``: bursts no larger than the
    transport's queue, each once the server has the last one."""
    for start in range(0, len(frames), 5):
        burst = frames[start : start + 5]
        for opus in burst:
            transport.send_frame(opus)
        await recording.wait_frames(start + len(burst), timeout=GUARD)


@contextlib.asynccontextmanager
async def command_line_voice_server(*options: str) -> AsyncIterator[list[str]]:
    """``python -m legato.sandbox voice`` with ``options`` and a session for ALICE (``sA``).

    Yields:
        What it printed, up to its ``Ctrl-C`` line. On the way out it is sent SIGINT and must
        exit with 0.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "legato.sandbox",
        "voice",
        *options,
        "--session",
        f"{GUILD}:{ALICE}:sA",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        async with asyncio.timeout(GUARD):
            while not lines or not lines[-1].startswith("Ctrl-C"):
                lines.append((await proc.stdout.readline()).decode())
        yield lines
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(GUARD):
            assert await proc.wait() == 0


# -- the happy path on every mode and two gateway versions ---------------------------------------


@pytest.mark.parametrize("version", [6, 8])
@pytest.mark.parametrize("mode", ["aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize"])
async def test_tone_is_recorded(
    server: SandboxVoiceServer,
    http: aiohttp.ClientSession,
    tone: list[bytes],
    mode: str,
    version: int,
) -> None:
    client = ScriptedClient(http, server.url, version)
    hello = await client.open()
    assert hello["d"]["heartbeat_interval"] == 250
    ready = await client.identify(server, ALICE)
    assert ready["d"]["modes"] == ["aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize"]
    assert ready["d"]["port"] == server.udp_port
    assert ready["d"]["experiments"] == []
    assert ("seq" in ready) is (version >= 8)

    ip, port = await client.discover()
    assert client.udp is not None
    assert (ip, port) == client.udp.get_extra_info("sockname")[:2]
    await client.send(1, {"protocol": "udp", "data": {"address": ip, "port": port, "mode": mode}})
    description = (await client.expect(4))["d"]
    assert description["mode"] == mode
    assert description["audio_codec"] == "opus"
    assert description["dave_protocol_version"] == 0
    assert len(description["secret_key"]) == 32
    assert all(0 <= b < 256 for b in description["secret_key"])
    client.encryptor = PacketEncryptor(mode, bytes(description["secret_key"]))

    await client.speak(True)
    await client.play(tone + [OPUS_SILENCE] * SILENCE_FRAMES, server)
    await client.speak(False)
    recording = server.recording(ALICE)
    await recording.wait_speaking(False, timeout=GUARD)

    # A heartbeat was acked in this version's shape.
    ack = (await client.expect(6))["d"]
    assert isinstance(ack, dict) if version >= 8 else isinstance(ack, int)
    await client.close()

    stats = recording.stats()
    assert stats.frames == len(tone) + SILENCE_FRAMES
    assert stats.gaps == 0
    assert stats.sequence_errors == 0
    assert stats.timestamp_errors == 0
    assert stats.streams == 1
    assert [c.on for c in recording.speaking_changes] == [True, False]
    assert recording.ssrcs == [client.ssrc]
    assert server.stats.undecryptable_packets == 0
    assert await frequency_of(server, ALICE) == pytest.approx(TONE_HZ, abs=2.0)


# -- protocol errors ---------------------------------------------------------------------------


async def test_undecodable_json_closes_4002(
    server: SandboxVoiceServer, http: aiohttp.ClientSession
) -> None:
    client = ScriptedClient(http, server.url, 8)
    await client.open(heartbeat=False)
    await client.send_text("{not json")
    assert await client.closed() == 4002
    assert server.stats.bad_json == 1


async def test_unknown_opcode_closes_4001(
    server: SandboxVoiceServer, http: aiohttp.ClientSession
) -> None:
    client = ScriptedClient(http, server.url, 8)
    await client.open(heartbeat=False)
    await client.identify(server, ALICE)
    await client.send(99, {})
    assert await client.closed() == 4001
    assert server.stats.unknown_opcodes == 1
    assert await server.wait_closed(ALICE, timeout=GUARD) == 4001


@pytest.mark.parametrize(
    ("op", "d"),
    [(1, {"protocol": "udp", "data": [1, 2]}), (5, {"speaking": "loud"}), (3, "nonce")],
)
async def test_payload_of_the_wrong_shape_closes_4002(
    server: SandboxVoiceServer, http: aiohttp.ClientSession, op: int, d: Any
) -> None:
    client = ScriptedClient(http, server.url, 8)
    await client.open(heartbeat=False)
    await client.identify(server, ALICE)
    await client.send(op, d)
    assert await client.closed() == 4002
    assert server.stats.bad_payloads == 1


async def test_bad_token_closes_4004(
    server: SandboxVoiceServer, http: aiohttp.ClientSession
) -> None:
    server.register_session(server_id=GUILD, user_id=ALICE, session_id="sA")
    client = ScriptedClient(http, server.url, 8)
    await client.open(heartbeat=False)
    await client.send(
        0, {"server_id": str(GUILD), "user_id": str(ALICE), "session_id": "sA", "token": "nope"}
    )
    assert await client.closed() == 4004


async def test_op_before_identify_closes_4003(
    server: SandboxVoiceServer, http: aiohttp.ClientSession
) -> None:
    client = ScriptedClient(http, server.url, 8)
    await client.open(heartbeat=False)
    await client.send(5, {"speaking": 1, "delay": 0, "ssrc": 1})
    assert await client.closed() == 4003


async def test_mode_not_offered_closes_4016(http: aiohttp.ClientSession) -> None:
    async with SandboxVoiceServer(
        modes=["aead_xchacha20_poly1305_rtpsize"], dave_protocol_version=0
    ) as server:
        client = ScriptedClient(http, server.url, 8)
        await client.open(heartbeat=False)
        await client.identify(server, ALICE)
        ip, port = await client.discover()
        data = {"address": ip, "port": port, "mode": "aead_aes256_gcm_rtpsize"}
        await client.send(1, {"protocol": "udp", "data": data})
        assert await client.closed() == 4016
        await client.close()


async def test_unknown_protocol_closes_4012(
    server: SandboxVoiceServer, http: aiohttp.ClientSession
) -> None:
    client = ScriptedClient(http, server.url, 8)
    await client.open(heartbeat=False)
    await client.identify(server, ALICE)
    await client.send(1, {"protocol": "carrier-pigeon", "data": {}})
    assert await client.closed() == 4012


async def test_unsupported_version_is_refused(
    server: SandboxVoiceServer, http: aiohttp.ClientSession
) -> None:
    ws = await http.ws_connect(f"{server.url}/?v=3")
    msg = await ws.receive()
    assert msg.type is aiohttp.WSMsgType.CLOSE
    assert ws.close_code == 4020
    await ws.close()


async def test_missing_heartbeats_close_4009(http: aiohttp.ClientSession) -> None:
    async with SandboxVoiceServer(
        heartbeat_interval=0.05, heartbeat_timeout=0.2, dave_protocol_version=0
    ) as server:
        client = ScriptedClient(http, server.url, 8)
        await client.open(heartbeat=False)
        await client.identify(server, ALICE)
        assert await client.closed() == 4009


@pytest.mark.parametrize("strict", [False, True])
async def test_v8_heartbeat_on_v6(http: aiohttp.ClientSession, strict: bool) -> None:
    async with SandboxVoiceServer(strict_v6=strict, dave_protocol_version=0) as server:
        client = ScriptedClient(http, server.url, 6)
        await client.open(heartbeat=False)
        await client.send(3, {"t": 7, "seq_ack": -1})
        if strict:
            assert await client.closed() == 4002
        else:
            assert (await client.expect(6))["d"] == {"t": 7}
            await client.close()


async def test_backend_version(server: SandboxVoiceServer, http: aiohttp.ClientSession) -> None:
    client = ScriptedClient(http, server.url, 8)
    await client.open(heartbeat=False)
    await client.send(16, {})
    assert set((await client.expect(16))["d"]) == {"voice", "rtc_worker"}
    await client.close()


# -- media robustness --------------------------------------------------------------------------


async def test_garbage_datagrams_are_counted_and_recording_goes_on(
    server: SandboxVoiceServer, http: aiohttp.ClientSession, tone: list[bytes]
) -> None:
    client = await connected(server, http)
    await client.speak(True)
    assert client.udp is not None
    await client.play(tone[:20], server)

    wrong_key = PacketEncryptor("aead_aes256_gcm_rtpsize", bytes(32))
    garbage = [
        b"\x01",  # one byte (asyncio never sends an empty datagram)
        b"\xde\xad\xbe\xef\x00",  # short of any header
        b"\x00\x01" + bytes(72),  # discovery-shaped, wrong length field
        b"\x00\x01\x00\x46" + bytes(10),  # truncated discovery
        b"\x40" + bytes(40),  # RTP version 1
        wrong_key.encrypt(pack_rtp_header(client.sequence, 0, client.ssrc), tone[0]),
        pack_rtp_header(1, 2, 0xDEAD) + bytes(40),  # nobody's SSRC
        pack_receiver_report(client.ssrc),  # RTCP
    ]
    for datagram in garbage:
        client.udp.sendto(datagram)
    # One more good packet after the garbage: once it is recorded, the garbage was seen too.
    await client.play(tone[20:40], server)
    await client.close()

    stats = server.stats
    assert stats.malformed_packets == 5
    assert stats.udp_datagrams == 1 + 40 + len(garbage)  # discovery, tone, garbage
    assert stats.undecryptable_packets == 1
    assert stats.unknown_ssrc_packets == 1
    assert stats.rtcp_packets == 1
    rec = server.recording(ALICE).stats()
    assert rec.frames == 40
    assert rec.gaps == 0
    assert await frequency_of(server, ALICE) == pytest.approx(TONE_HZ, abs=2.0)


@pytest.mark.skipif(sys.platform != "linux", reason="the kernel's receive stamps are Linux's")
async def test_arrivals_are_the_kernels_receive_times_not_the_loops(
    server: SandboxVoiceServer, http: aiohttp.ClientSession, tone: list[bytes]
) -> None:
    """Packets sent while the sandbox's loop is blocked are read in one burst afterwards, yet
    each is recorded when the kernel took it: no later than its own ``sendto`` returned, so
    before the next packet was sent and before the loop could read any of them."""
    client = await connected(server, http)
    await client.speak(True)
    packets = [client.packet(opus) for opus in tone[:10]]
    loop = asyncio.get_running_loop()
    sent: list[float] = []
    before: list[float] = []
    # Block the loop on purpose from the first send to the last: nothing is read meanwhile.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for packet in packets:
            before.append(loop.time())
            sock.sendto(packet, client.server_udp)
            sent.append(loop.time())  # loopback: the kernel has stamped it by now
    unblocked = loop.time()
    recording = server.recording(ALICE)
    await recording.wait_frames(len(packets), timeout=GUARD)
    await client.close()
    received = recording.packets
    assert [p.sequence for p in received] == [parse_rtp_header(p)[0].sequence for p in packets]
    for heard, sent_by, sent_from in zip(received, sent, before, strict=True):
        assert heard.arrival <= sent_by < unblocked, "recorded when read, not when received"
        # Nor earlier than it was sent (the stamp put on the loop's clock, within its error).
        assert heard.arrival >= sent_from - CLOCK_READ_TOLERANCE


# -- resume, faults, membership ----------------------------------------------------------------


@pytest.mark.parametrize("version", [6, 8])
async def test_resume_after_drop_keeps_the_recording(
    server: SandboxVoiceServer, http: aiohttp.ClientSession, tone: list[bytes], version: int
) -> None:
    client = await connected(server, http, version=version)
    ssrc = client.ssrc
    await client.speak(True)
    await client.play(tone[:35], server)

    await server.inject_drop(ALICE)
    await client.closed()
    assert await server.wait_closed(ALICE, timeout=GUARD) is None
    assert server.session(ALICE).connected is False

    await client.open()
    await client.resume(server)
    await client.expect(9)
    await server.wait_resumed(ALICE, timeout=GUARD)
    info = server.session(ALICE)
    assert info.connected
    assert info.ssrc == ssrc
    # Same key: the packets go on decrypting with the encryptor from before the drop.
    await client.play(tone[35:], server)
    await client.speak(False)
    await server.recording(ALICE).wait_speaking(False, timeout=GUARD)
    await client.close()

    rec = server.recording(ALICE).stats()
    assert rec.frames == len(tone)
    assert rec.streams == 1
    assert rec.gaps == 0
    assert server.stats.undecryptable_packets == 0
    assert await frequency_of(server, ALICE) == pytest.approx(TONE_HZ, abs=2.0)


async def test_v8_resume_replays_what_was_missed(
    server: SandboxVoiceServer, http: aiohttp.ClientSession
) -> None:
    alice = await connected(server, http, ALICE)
    bob = await connected(server, http, BOB)
    joined = await alice.expect(11)
    assert joined["d"]["user_ids"] == [str(BOB)]

    await server.inject_drop(ALICE)
    await alice.closed()
    await bob.speak(True)
    await server.recording(BOB).wait_speaking(True, timeout=GUARD)

    await alice.open()
    await alice.resume(server)
    resumed = await alice.expect(9)
    replayed = await alice.expect(5)
    assert replayed["d"]["user_id"] == str(BOB)
    assert replayed["d"]["speaking"] == 1
    assert replayed["seq"] < resumed["seq"]
    await alice.close()
    await bob.close()


async def test_members_see_each_other_join_and_leave(
    server: SandboxVoiceServer, http: aiohttp.ClientSession
) -> None:
    alice = await connected(server, http, ALICE)
    bob = await connected(server, http, BOB)
    assert (await bob.expect(11))["d"]["user_ids"] == [str(ALICE)]
    assert (await alice.expect(11))["d"]["user_ids"] == [str(BOB)]

    await bob.speak(True)
    speaking = (await alice.expect(5))["d"]
    assert speaking == {"user_id": str(BOB), "ssrc": bob.ssrc, "speaking": 1}

    # op12 announces Bob's audio SSRC: relayed with his user id, remembered in his recording.
    await bob.send(12, {"audio_ssrc": bob.ssrc + 7, "video_ssrc": 0, "rtx_ssrc": 0, "streams": []})
    video = (await alice.expect(12))["d"]
    assert (video["user_id"], video["audio_ssrc"]) == (str(BOB), bob.ssrc + 7)
    assert server.recording(BOB).ssrcs == [bob.ssrc, bob.ssrc + 7]

    await bob.close(1000)
    assert (await alice.expect(13))["d"] == {"user_id": str(BOB)}
    await alice.close()


async def test_injected_close_codes_decide_resumability(
    server: SandboxVoiceServer, http: aiohttp.ClientSession
) -> None:
    client = await connected(server, http)
    await server.inject_close(ALICE, 4015)
    assert await client.closed() == 4015
    await client.open()
    await client.resume(server)
    await client.expect(9)

    await server.inject_close(ALICE, 4006)
    assert await client.closed() == 4006
    await client.open()
    await client.resume(server)
    assert await client.closed() == 4006
    await server.wait_closed(ALICE, count=2, timeout=GUARD)
    # The refused resume had no session, so only the two injected closes are the user's.
    assert server.close_codes(ALICE) == [4015, 4006]
    await client.close()


async def test_withheld_heartbeat_acks(
    server: SandboxVoiceServer, http: aiohttp.ClientSession
) -> None:
    client = ScriptedClient(http, server.url, 8)
    await client.open(heartbeat=False)
    await client.identify(server, ALICE)
    server.stop_heartbeat_acks(ALICE)
    await client.send(3, {"t": 1, "seq_ack": client.seq_ack})
    # Messages are handled in order: op16's answer comes after any ack op3 would have had.
    await client.send(16, {})
    await client.expect(16)
    assert [m for m in client.messages if m["op"] == 6] == []
    assert server.stats.heartbeat_acks_withheld == 1

    server.resume_heartbeat_acks(ALICE)
    await client.send(3, {"t": 2, "seq_ack": client.seq_ack})
    assert (await client.expect(6))["d"] == {"t": 2}
    await client.close()


async def test_move_to_a_second_listener(
    server: SandboxVoiceServer, http: aiohttp.ClientSession, tone: list[bytes]
) -> None:
    client = await connected(server, http)
    await client.play(tone[:10], server)
    endpoint = await server.move(ALICE)
    assert endpoint != server.endpoint
    # As after a real move, the old session cannot be resumed ...
    await client.close(4000)
    client.url = f"wss://{endpoint}/?v=8"
    await client.open()
    await client.resume(server)
    assert await client.closed() == 4006
    # ... but identifying at the new endpoint works with the same token.
    await client.open()
    await client.send(
        0,
        {
            "server_id": str(GUILD),
            "user_id": str(ALICE),
            "session_id": f"s{ALICE}",
            "token": client.token,
        },
    )
    client.ssrc = (await client.expect(2))["d"]["ssrc"]
    await client.select_udp("aead_aes256_gcm_rtpsize")
    assert server.session(ALICE).endpoint == endpoint
    await client.play(tone[10:30], server)
    await client.close()
    rec = server.recording(ALICE).stats()
    assert rec.frames == 30
    assert rec.streams == 2


# -- recording files ---------------------------------------------------------------------------


async def test_recording_files(
    server: SandboxVoiceServer, http: aiohttp.ClientSession, tone: list[bytes], tmp_path: Any
) -> None:
    client = await connected(server, http)
    await client.play(tone, server)
    await client.close()
    # What `python -m legato.sandbox voice --record DIR` prints and writes on exit.
    lines = await asyncio.to_thread(recording_report, server, tmp_path)
    stem = tmp_path / f"server-{GUILD}-user-{ALICE}"
    assert lines[0].startswith(f"server {GUILD} user {ALICE}: {len(tone)} frames")
    assert "gaps 0, sequence errors 0, timestamp errors 0" in lines[0]
    assert float(lines[0].rsplit("dominant ", 1)[1].removesuffix(" Hz")) == pytest.approx(
        TONE_HZ, abs=2.0
    )
    assert lines[1] == f"  wrote {stem}.ogg and {stem}.wav"
    ogg = stem.with_suffix(".ogg")
    wav = stem.with_suffix(".wav")

    def decode(path: Any) -> tuple[str, float, int]:
        with av.open(str(path)) as container:
            stream = container.streams.audio[0]
            codec = stream.codec_context.name
            chunks = []
            for frame in container.decode(stream):
                samples = frame.to_ndarray().astype(np.float64)
                if not frame.format.is_planar:
                    samples = samples.reshape(-1, frame.layout.nb_channels).T
                chunks.append(samples.mean(axis=0))
            rate = stream.rate
        mono = np.concatenate(chunks)
        if codec.startswith("pcm_s16"):
            mono /= 32768.0
        return codec, dominant_frequency(mono, rate), len(chunks)

    codec, freq, frames = await asyncio.to_thread(decode, ogg)
    assert codec in ("opus", "libopus")
    assert frames > 0
    assert freq == pytest.approx(TONE_HZ, abs=2.0)
    assert wav.read_bytes()[:4] == b"RIFF"
    codec, freq, _ = await asyncio.to_thread(decode, wav)
    assert codec == "pcm_s16le"
    assert freq == pytest.approx(TONE_HZ, abs=2.0)


# -- the command line --------------------------------------------------------------------------


async def test_command_line_voice_server(http: aiohttp.ClientSession) -> None:
    async with command_line_voice_server() as lines:
        endpoint = lines[0].split()[3]
        assert endpoint.startswith("localhost:")  # resolvable from any process
        (ca_line,) = [line for line in lines if line.startswith("CA certificate")]
        ca_file = ca_line.split()[-1]
        assert ca_file.endswith(".pem")
        (token_line,) = [line for line in lines if "token" in line]
        token = token_line.split()[-1]
        # Only the printed CA file is trusted: what a client given SSL_CERT_FILE does.
        ctx = ssl.create_default_context(cafile=ca_file)
        ws = await http.ws_connect(f"wss://{endpoint}/?v=8", ssl=ctx)
        await ws.receive_json()  # hello
        d = {"server_id": str(GUILD), "user_id": str(ALICE), "session_id": "sA", "token": token}
        await ws.send_json({"op": 0, "d": {**d, "max_dave_protocol_version": 1}})
        ready = await ws.receive_json()
        assert ready["op"] == 2
        await ws.close()


# -- the webrtc transport ----------------------------------------------------------------------


async def test_webrtc_tone_is_recorded(
    server: SandboxVoiceServer, http: aiohttp.ClientSession, tone: list[bytes]
) -> None:
    client = ScriptedClient(http, server.url, 8)
    await client.open()
    ready = await client.identify(server, ALICE)
    transport = WebRtcTransport(host_candidates_allow_loopback=True)
    try:
        await client.send(1, await transport.prepare(ready["d"]))
        assert (await client.expect(15))["d"] == {"any": 100}
        description = (await client.expect(4))["d"]
        assert description["audio_codec"] == "opus"
        assert "secret_key" not in description
        # One media port for both transports, as Discord's: op4 names op2's port.
        assert f"m=audio {ready['d']['port']} ICE/SDP" in description["sdp"]
        await transport.start(description)
        assert server.session(ALICE).protocol == "webrtc"
        await client.speak(True)
        recording = server.recording(ALICE)
        await send_webrtc(transport, tone, recording)
    finally:
        await transport.close()
    await client.close()

    stats = recording.stats()
    assert stats.frames == len(tone)
    assert stats.gaps == 0
    assert recording.ssrcs == [ready["d"]["ssrc"]]
    assert {p.ssrc for p in recording.packets} == {ready["d"]["ssrc"]}
    assert await frequency_of(server, ALICE) == pytest.approx(TONE_HZ, abs=2.0)


async def test_udp_and_webrtc_users_share_the_one_media_port(
    server: SandboxVoiceServer, http: aiohttp.ClientSession, tone: list[bytes]
) -> None:
    """IP discovery, udp RTP, and a webrtc peer's STUN, DTLS and SRTP all on op2's port."""
    alice = await connected(server, http, ALICE)  # udp: discovery and op4 on op2's port
    bob = ScriptedClient(http, server.url, 8)
    await bob.open()
    ready = await bob.identify(server, BOB)
    assert ready["d"]["port"] == alice.server_udp[1] == server.udp_port
    transport = WebRtcTransport(host_candidates_allow_loopback=True)
    try:
        await bob.send(1, await transport.prepare(ready["d"]))
        description = (await bob.expect(4))["d"]
        assert (
            f"a=candidate:1 1 UDP 4261412862 127.0.0.1 {server.udp_port} typ host"
            in (description["sdp"])
        )
        await transport.start(description)
        await alice.speak(True)
        await bob.speak(True)
        # Interleaved, each burst once the server has the last one (see ScriptedClient.play).
        for start in range(0, len(tone), 5):
            burst = tone[start : start + 5]
            await alice.play(burst, server)
            for opus in burst:
                transport.send_frame(opus)
            await server.recording(BOB).wait_frames(start + len(burst), timeout=GUARD)
    finally:
        await transport.close()
    await alice.close()
    await bob.close()

    for user in (ALICE, BOB):
        stats = server.recording(user).stats()
        assert stats.frames == len(tone)
        assert stats.gaps == 0
        assert await frequency_of(server, user) == pytest.approx(TONE_HZ, abs=2.0)
    assert server.stats.unknown_ssrc_packets == server.stats.malformed_packets == 0


async def test_webrtc_without_the_peer_module_closes_4012(
    server: SandboxVoiceServer, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A None entry in sys.modules makes the server's lazy import fail, as if the module were absent.
    monkeypatch.setitem(sys.modules, "legato.sandbox.webrtc", None)
    client = ScriptedClient(http, server.url, 8)
    await client.open(heartbeat=False)
    await client.identify(server, ALICE)
    await client.send(1, {"protocol": "webrtc", "data": "a=x", "sdp": "a=x", "codecs": []})
    assert await client.closed() == 4012


async def test_requested_streams_are_echoed_in_ready(
    server: SandboxVoiceServer, http: aiohttp.ClientSession
) -> None:
    client = ScriptedClient(http, server.url, 8)
    await client.open(heartbeat=False)
    token = server.register_session(server_id=GUILD, user_id=ALICE, session_id="sA")
    d: dict[str, Any] = {"server_id": str(GUILD), "user_id": str(ALICE), "session_id": "sA"}
    d["token"] = token
    d["streams"] = [{"type": "video", "rid": "100", "quality": 100}]
    await client.send(0, d)
    ready = (await client.expect(2))["d"]
    (stream,) = ready["streams"]
    assert (stream["type"], stream["rid"], stream["quality"]) == ("video", "100", 100)
    assert stream["ssrc"] not in (0, ready["ssrc"])
    assert stream["rtx_ssrc"] == stream["ssrc"] + 1
    await client.close()
