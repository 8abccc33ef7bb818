"""UdpTransport against a tiny voice-server peer on 127.0.0.1: discovery, op1/op4, RTP, RTCP."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any, cast

import pytest

from legato.errors import TransportError
from legato.sandbox.crypto import PacketDecryptor
from legato.sandbox.rtp import discovery_response, pack_receiver_report, parse_discovery_request
from legato.voice.rtp import ReportBlock, SenderReport, is_rtcp, parse_rtcp
from legato.voice.transport.udp import SENDER_REPORT_FRAMES, UdpTransport

pytestmark = pytest.mark.integration

KEY = os.urandom(32)
GCM = "aead_aes256_gcm_rtpsize"
XCHACHA = "aead_xchacha20_poly1305_rtpsize"


class Peer(asyncio.DatagramProtocol):
    """The server side: answers discovery (optionally after ignoring some), records the rest."""

    def __init__(self, *, ignore_discoveries: int = 0) -> None:
        self.ignore = ignore_discoveries
        self.discoveries = 0
        self.packets: list[bytes] = []
        self.client: tuple[str, int] | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.arrived = asyncio.Condition()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.client = (str(addr[0]), int(addr[1]))
        if len(data) == 74 and data[:2] == b"\x00\x01":
            self.discoveries += 1
            if self.discoveries > self.ignore:
                ssrc = parse_discovery_request(data)
                assert self.transport is not None
                self.transport.sendto(discovery_response(ssrc, addr[0], addr[1]), addr)
            return
        self.packets.append(data)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self.arrived:
            self.arrived.notify_all()

    async def wait_packets(self, n: int) -> None:
        async with asyncio.timeout(10), self.arrived:
            await self.arrived.wait_for(lambda: len(self.packets) >= n)

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])


async def start_peer(**kwargs: Any) -> Peer:
    loop = asyncio.get_running_loop()
    _, peer = await loop.create_datagram_endpoint(
        lambda: Peer(**kwargs), local_addr=("127.0.0.1", 0)
    )
    return peer


def ready(peer: Peer, modes: list[str] | None = None, ssrc: int = 0x1234) -> dict[str, Any]:
    return {"ssrc": ssrc, "ip": "127.0.0.1", "port": peer.port, "modes": modes or [XCHACHA, GCM]}


async def test_prepare_discovers_address_and_selects_preferred_mode() -> None:
    peer = await start_peer()
    udp = UdpTransport()
    try:
        op1 = await udp.prepare(ready(peer))
        assert op1["protocol"] == "udp"
        assert op1["data"]["mode"] == GCM
        assert op1["data"]["address"] == "127.0.0.1"
        assert udp.local_address is not None
        assert op1["data"]["port"] == udp.local_address[1]
        assert op1["codecs"][0]["payload_type"] == 120
        assert udp.ssrc == 0x1234
        assert udp.mode == GCM
    finally:
        await udp.close()
        assert peer.transport is not None
        peer.transport.close()


@pytest.mark.parametrize("mode", [GCM, XCHACHA])
async def test_frames_are_rtp_encrypted_contiguous(mode: str) -> None:
    peer = await start_peer()
    udp = UdpTransport()
    try:
        await udp.prepare(ready(peer, modes=[mode]))
        await udp.start({"mode": mode, "secret_key": list(KEY)})
        frames = [bytes([i]) * (20 + i) for i in range(30)]
        for frame in frames:
            udp.send_frame(frame)
        await peer.wait_packets(30)
        decryptor = PacketDecryptor(mode, KEY)
        got = [decryptor.decrypt(p) for p in peer.packets]
        assert [media for _, media in got] == frames
        headers = [rtp.header for rtp, _ in got]
        assert {h.ssrc for h in headers} == {0x1234}
        assert {h.payload_type for h in headers} == {120}
        assert [h.sequence - headers[0].sequence for h in headers] == list(range(30))
        assert [h.timestamp - headers[0].timestamp for h in headers] == [960 * i for i in range(30)]
        assert udp.stats.frames_sent == 30
        assert udp.stats.bytes_sent == sum(len(p) for p in peer.packets)
    finally:
        await udp.close()
        assert peer.transport is not None
        peer.transport.close()


async def test_op4_with_another_mode_is_refused() -> None:
    peer = await start_peer()
    udp = UdpTransport()
    try:
        await udp.prepare(ready(peer))
        with pytest.raises(TransportError, match="mode"):
            await udp.start({"mode": XCHACHA, "secret_key": list(KEY)})
        with pytest.raises(TransportError, match="32"):
            await udp.start({"mode": GCM, "secret_key": [1, 2, 3]})
        udp.send_frame(b"\xf8\xff\xfe")  # no key: dropped and counted, not raised
        assert udp.stats.send_errors == 1
        assert udp.stats.frames_sent == 0
    finally:
        await udp.close()
        assert peer.transport is not None
        peer.transport.close()


async def test_no_common_mode_is_a_transport_error() -> None:
    peer = await start_peer()
    udp = UdpTransport()
    try:
        with pytest.raises(TransportError, match="mode"):
            await udp.prepare(ready(peer, modes=["plain"]))
    finally:
        await udp.close()
        assert peer.transport is not None
        peer.transport.close()


async def test_discovery_retries_then_gives_up() -> None:
    peer = await start_peer(ignore_discoveries=1)
    udp = UdpTransport(discovery_timeout=0.3, discovery_attempts=3)
    try:
        op1 = await udp.prepare(ready(peer))
        assert peer.discoveries == 2
        assert op1["data"]["port"] > 0
    finally:
        await udp.close()
    silent = await start_peer(ignore_discoveries=99)
    udp = UdpTransport(discovery_timeout=0.2, discovery_attempts=2)
    try:
        with pytest.raises(TransportError, match="unanswered 2 times"):
            await udp.prepare(ready(silent))
        assert silent.discoveries == 2
    finally:
        await udp.close()
        for p in (peer, silent):
            assert p.transport is not None
            p.transport.close()


async def test_garbage_datagrams_are_counted_and_dropped() -> None:
    peer = await start_peer()
    udp = UdpTransport()
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        await udp.prepare(ready(peer))
        await udp.start({"mode": GCM, "secret_key": KEY})
        assert peer.transport is not None
        assert udp.local_address is not None
        target = ("127.0.0.1", udp.local_address[1])
        # (asyncio's sendto silently skips empty datagrams, so none is in the list)
        for junk in (b"\x00", os.urandom(3), b"\x00" * 40, b"\x00\x02" + b"\x00" * 72):
            peer.transport.sendto(junk, target)
        peer.transport.sendto(pack_receiver_report(99), target)  # well formed RTCP
        stranger.sendto(b"\x80\x78" + bytes(30), target)  # right shape, wrong sender
        # A frame sent after the junk arrives proves the loop kept running; the junk sent before
        # it on the same loopback path has been read by then.
        udp.send_frame(b"\xf8\xff\xfe")
        await peer.wait_packets(1)
        for _ in range(100):
            if udp.stats.malformed_received + udp.packets_received >= 6:
                break
            await asyncio.sleep(0)  # let the reader callbacks run; bounded, not timing
        assert udp.stats.malformed_received == 5
        assert udp.packets_received == 1
        assert udp.stats.frames_sent == 1
    finally:
        stranger.close()
        await udp.close()
        assert peer.transport is not None
        peer.transport.close()


async def test_loss_reports_about_our_ssrc_reach_the_stats() -> None:
    peer = await start_peer()
    udp = UdpTransport()
    try:
        await udp.prepare(ready(peer, ssrc=0x1234))
        await udp.start({"mode": GCM, "secret_key": KEY})
        assert peer.transport is not None
        assert udp.local_address is not None
        target = ("127.0.0.1", udp.local_address[1])

        def block(ssrc: int, fraction: int, lost: int) -> ReportBlock:
            return ReportBlock(ssrc, fraction, lost, 100, 0, 0, 0)

        peer.transport.sendto(pack_receiver_report(1, (block(0x999, 200, 50),)), target)
        peer.transport.sendto(pack_receiver_report(1, (block(0x1234, 64, 3),)), target)
        peer.transport.sendto(pack_receiver_report(1, (block(0x1234, 13, 5),)), target)
        peer.transport.sendto(b"\x81\xc9\x00\x07" + bytes(8), target)  # RR overrunning its data
        async with asyncio.timeout(10):
            await udp.wait_loss_reports(2)
        stats = udp.stats
        assert stats.loss_reports == 2  # the block about another SSRC is not ours
        assert stats.fraction_lost == 13 / 256
        assert stats.packets_lost == 5
        udp.send_frame(b"\xf8\xff\xfe")  # the malformed report was read before this echoes
        await peer.wait_packets(1)
        for _ in range(100):
            if udp.stats.malformed_received:
                break
            await asyncio.sleep(0)  # let the reader callbacks run; bounded, not timing
        assert udp.stats.malformed_received == 1
        assert udp.packets_received == 3
    finally:
        await udp.close()
        assert peer.transport is not None
        peer.transport.close()


async def test_sender_report_every_250_frames() -> None:
    peer = await start_peer()
    udp = UdpTransport()
    try:
        await udp.prepare(ready(peer))
        await udp.start({"mode": GCM, "secret_key": KEY})
        for _ in range(SENDER_REPORT_FRAMES):
            udp.send_frame(b"\x01\x02\x03")
        await peer.wait_packets(SENDER_REPORT_FRAMES + 1)
        reports = [p for p in peer.packets if is_rtcp(p)]
        assert len(reports) == 1
        (sr,) = parse_rtcp(reports[0])
        assert isinstance(sr, SenderReport)
        assert sr.ssrc == 0x1234
        assert sr.packet_count == SENDER_REPORT_FRAMES
        assert sr.octet_count == 3 * SENDER_REPORT_FRAMES
        assert sr.rtp_timestamp == 960 * SENDER_REPORT_FRAMES
    finally:
        await udp.close()
        assert peer.transport is not None
        peer.transport.close()


async def test_close_is_idempotent_and_stops_sending() -> None:
    peer = await start_peer()
    udp = UdpTransport()
    await udp.close()  # before prepare
    with pytest.raises(TransportError):
        await udp.prepare(ready(peer))
    udp2 = UdpTransport()
    await udp2.prepare(ready(peer))
    await udp2.start({"mode": GCM, "secret_key": KEY})
    await udp2.close()
    await udp2.close()
    udp2.send_frame(b"\x01")
    assert udp2.stats.frames_sent == 0
    assert udp2.stats.send_errors == 1
    assert peer.transport is not None
    peer.transport.close()
