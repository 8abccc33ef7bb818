"""WebRtcTransport against WebRtcServerPeer over loopback: real aiortc peers, ICE, DTLS, SRTP."""

from __future__ import annotations

import asyncio
import itertools
import math
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import opuslib
import pytest
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.rtcdtlstransport import SRTP_AES128_CM_SHA1_80, RTCCertificate
from OpenSSL import SSL

from legato.errors import TransportError
from legato.sandbox.analysis import dominant_frequency, pcm_to_mono, rms
from legato.sandbox.webrtc import WebRtcServerPeer
from legato.voice import sdp
from legato.voice.transport.aiortc_compat import DtlsCertificate, KeyType, host_addresses
from legato.voice.transport.base import TransportStats
from legato.voice.transport.webrtc import (
    FRAME_SAMPLES,
    OpusPacketTrack,
    WebRtcTransport,
    remap_opus_payload_type,
)

RATE = 48_000
TONE_HZ = 440.0
FRAMES = 100  # 2 s of 20 ms frames
OP2_SSRC = 0x1234ABCD
GUARD = 30.0  # seconds; only guards against hangs on a loaded machine


@pytest.fixture(scope="module")
def tone_frames() -> list[bytes]:
    """2 s of a 440 Hz stereo tone, Opus-encoded by libopus the way the player does it."""
    encoder = opuslib.Encoder(RATE, 2, opuslib.APPLICATION_AUDIO)
    frames = []
    for index in range(FRAMES):
        samples = []
        for n in range(FRAME_SAMPLES):
            value = int(
                12_000 * math.sin(2 * math.pi * TONE_HZ * (index * FRAME_SAMPLES + n) / RATE)
            )
            samples += [value, value]
        frames.append(encoder.encode(struct.pack(f"<{len(samples)}h", *samples), FRAME_SAMPLES))
    return frames


@dataclass
class Received:
    """What the server peer reported through ``on_rtp``; wakes waiters on every packet."""

    packets: list[tuple[int, int, int, bytes]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_rtp(self, ssrc: int, sequence: int, timestamp: int, opus: bytes) -> None:
        self.packets.append((ssrc, sequence, timestamp, opus))
        self.changed.set()

    async def wait_count(self, count: int) -> None:
        while len(self.packets) < count:
            self.changed.clear()
            await self.changed.wait()


@dataclass
class Pair:
    client: WebRtcTransport
    server: WebRtcServerPeer
    received: Received


@pytest.fixture
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    key_type: KeyType = getattr(request, "param", "ecdsa")
    received = Received()
    server = WebRtcServerPeer("127.0.0.1", received.on_rtp, key_type=key_type)
    client = WebRtcTransport(host_candidates_allow_loopback=True)
    try:
        async with asyncio.timeout(GUARD):
            op1 = await client.prepare({"ssrc": OP2_SSRC, "ip": "127.0.0.1", "port": 0})
            op4_sdp = await server.accept(op1["sdp"], op1["codecs"])
            await client.start({"sdp": op4_sdp, "audio_codec": "opus", "media_session_id": "x"})
            await server.wait_connected()
        yield Pair(client, server, received)
    finally:
        await client.close()
        await server.close()


async def send_in_lockstep(pair: Pair, frames: list[bytes]) -> None:
    """Send each frame once the previous one arrived: content checks, no timing involved."""
    async with asyncio.timeout(GUARD):
        for index, frame in enumerate(frames):
            pair.client.send_frame(frame)
            await pair.received.wait_count(index + 1)


def decode(payloads: list[bytes]) -> bytes:
    decoder = opuslib.Decoder(RATE, 2)
    return b"".join(decoder.decode(p, FRAME_SAMPLES) for p in payloads)


@pytest.mark.integration
@pytest.mark.parametrize("pair", ["ecdsa", "rsa"], indirect=True)
async def test_pre_encoded_opus_arrives_byte_for_byte(pair: Pair, tone_frames: list[bytes]) -> None:
    await send_in_lockstep(pair, tone_frames)

    packets = pair.received.packets
    assert [opus for _, _, _, opus in packets] == tone_frames  # passthrough: no re-encode
    assert {ssrc for ssrc, _, _, _ in packets} == {OP2_SSRC} == {pair.client.ssrc}
    sequences = [seq for _, seq, _, _ in packets]
    assert all((b - a) % 65536 == 1 for a, b in itertools.pairwise(sequences))
    timestamps = [ts for _, _, ts, _ in packets]
    assert all((b - a) % (1 << 32) == 960 for a, b in itertools.pairwise(timestamps))
    assert pair.server.payload_type == 111
    assert pair.client.mode == "dtls-srtp"
    assert pair.client.stats.frames_sent == FRAMES
    assert pair.client.stats.bytes_sent == sum(map(len, tone_frames))
    assert pair.client.stats.send_errors == 0

    mono = pcm_to_mono(decode([opus for _, _, _, opus in packets]))
    assert dominant_frequency(mono[RATE // 10 :]) == pytest.approx(TONE_HZ, abs=2.0)
    assert rms(mono) > 0.1


@pytest.mark.integration
async def test_a_stock_aiortc_client_cannot_reach_an_rsa_server() -> None:
    """Why the client offers RSA suites: aiortc's own DTLS context offers ECDSA ones only."""
    server = WebRtcServerPeer("127.0.0.1", lambda *_: None, key_type="rsa")
    pc = RTCPeerConnection()  # stock certificate and cipher list
    try:
        transceiver = pc.addTransceiver("audio", direction="sendonly")
        opus = [c for c in RTCRtpSender.getCapabilities("audio").codecs if c.name == "opus"]
        transceiver.setCodecPreferences(opus)
        offer = remap_opus_payload_type((await pc.createOffer()).sdp, 111)
        with host_addresses(lambda found: [*found, "127.0.0.1"]):
            await pc.setLocalDescription(RTCSessionDescription(offer, "offer"))
        fragment = sdp.OfferFragment.from_offer(pc.localDescription.sdp, [111]).render()
        op4_sdp = await server.accept(fragment, [dict(sdp.opus_codec(111))])
        answer = sdp.build_answer(
            pc.localDescription.sdp, sdp.ServerFragment.parse(op4_sdp), opus_payload_type=111
        )
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        async with asyncio.timeout(GUARD):
            with pytest.raises(TransportError, match="failed"):
                await server.wait_connected()
    finally:
        await pc.close()
        await server.close()


@pytest.mark.integration
async def test_close_is_idempotent_and_start_after_close_fails() -> None:
    client = WebRtcTransport(host_candidates_allow_loopback=True)
    op1 = await client.prepare({"ssrc": 7})
    assert op1["protocol"] == "webrtc"
    assert op1["data"] == op1["sdp"]
    await client.close()
    await client.close()
    client.send_frame(b"\xf8\xff\xfe")
    assert client.stats.send_errors == 1
    with pytest.raises(TransportError):
        await client.start({"sdp": "m=audio 1 ICE/SDP"})


@pytest.mark.integration
async def test_start_raises_transport_error_when_the_server_never_answers() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never reads
    silent.bind(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    client = WebRtcTransport(host_candidates_allow_loopback=True, connect_timeout=1.0)
    try:
        await client.prepare({"ssrc": 9})
        with pytest.raises(TransportError, match="no webrtc sdp"):
            await client.start({"audio_codec": "opus"})
        op4_sdp = sdp.ServerFragment(
            port=port,
            address="127.0.0.1",
            ice_ufrag="abcd",
            ice_pwd="0123456789abcdefghijkl",
            fingerprint=":".join(["AB"] * 32),
            candidates=(f"1 1 UDP 1 127.0.0.1 {port} typ host",),
        ).render()
        async with asyncio.timeout(GUARD):
            with pytest.raises(TransportError, match=r"did not connect|failed"):
                await client.start({"sdp": op4_sdp})
    finally:
        await client.close()
        silent.close()


def cipher_names(certificate: RTCCertificate) -> list[str]:
    ctx = certificate._create_ssl_context(srtp_profiles=[SRTP_AES128_CM_SHA1_80])
    names: list[str] = SSL.Connection(ctx).get_cipher_list()
    return names


def test_client_certificate_offers_ecdsa_and_rsa_suites() -> None:
    ours = cipher_names(DtlsCertificate.generate())
    assert any("ECDHE-ECDSA" in name for name in ours)
    assert any("ECDHE-RSA" in name for name in ours)
    stock = cipher_names(RTCCertificate.generateCertificate())
    assert not any("RSA" in name.replace("ECDSA", "") for name in stock)


async def test_track_waits_when_empty_and_drops_the_oldest_when_full() -> None:
    stats = TransportStats()
    track = OpusPacketTrack(stats, maxsize=3)
    pending = asyncio.ensure_future(track.recv())
    for _ in range(3):
        await asyncio.sleep(0)
    assert not pending.done()  # nothing queued: recv() waits instead of spinning
    track.push(b"\x00")
    first = await pending
    assert (bytes(first), first.pts) == (b"\x00", 0)
    for byte in range(1, 6):
        track.push(bytes([byte]))
    # Five frames into three slots: the two oldest went, timestamps still advance by 960.
    rest = [await track.recv() for _ in range(3)]
    assert [(bytes(p), p.pts) for p in rest] == [(b"\x03", 960), (b"\x04", 1920), (b"\x05", 2880)]
    assert stats.frames_sent == 4
    assert stats.send_errors == 2
    track.stop()
    track.push(b"\x09")
    assert stats.send_errors == 3


def without_fingerprint(fragment: str) -> str:
    """op1's fragment as the seed capture's Firefox sent it: no ``a=fingerprint`` line."""
    return "\n".join(line for line in fragment.split("\n") if not line.startswith("a=fingerprint"))


@pytest.mark.integration
async def test_an_op1_without_fingerprint_connects_as_discord_accepted_it(
    tone_frames: list[bytes],
) -> None:
    received = Received()
    server = WebRtcServerPeer("127.0.0.1", received.on_rtp)
    client = WebRtcTransport(host_candidates_allow_loopback=True)
    try:
        async with asyncio.timeout(GUARD):
            op1 = await client.prepare({"ssrc": OP2_SSRC})
            op4_sdp = await server.accept(without_fingerprint(op1["sdp"]), op1["codecs"])
            await client.start({"sdp": op4_sdp, "audio_codec": "opus"})
            await server.wait_connected()
        await send_in_lockstep(Pair(client, server, received), tone_frames[:10])
    finally:
        await client.close()
        await server.close()
    assert not server.client_verified
    assert [opus for _, _, _, opus in received.packets] == tone_frames[:10]


@pytest.mark.integration
async def test_a_wrong_fingerprint_in_op1_still_fails_dtls() -> None:
    """Never kinder than Discord: a fingerprint that is given is checked."""
    server = WebRtcServerPeer("127.0.0.1", lambda *_: None)
    client = WebRtcTransport(host_candidates_allow_loopback=True)
    try:
        async with asyncio.timeout(GUARD):
            op1 = await client.prepare({"ssrc": OP2_SSRC})
            wrong = (
                without_fingerprint(op1["sdp"]) + "\na=fingerprint:sha-256 " + ":".join(["AB"] * 32)
            )
            op4_sdp = await server.accept(wrong, op1["codecs"])
            # The client's side of the handshake completes before the server checks the client's
            # certificate; the server is the one that refuses.
            await client.start({"sdp": op4_sdp, "audio_codec": "opus"})
            with pytest.raises(TransportError, match="failed"):
                await server.wait_connected()
    finally:
        await client.close()
        await server.close()
    assert server.client_verified
