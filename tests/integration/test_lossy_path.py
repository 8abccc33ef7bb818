"""Legato on ``udp`` through a lossy path: 5 % loss and reordering between it and the server.

The sandbox's relay (``legato.sandbox.relay``) drops and reorders Legato's RTP with a seeded
generator and lists what it did; the recording must count the same packets as lost and as out
of order, put the reordered ones back in place, and the tone must survive. The server's RTCP
receiver reports carry the loss back to Legato, whose transport stats show it.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from typing import Any

import pytest

from legato.sandbox.relay import LossyRelay, RelayOptions
from legato.voice.client import LegatoVoiceClient, VoiceOptions
from legato.voice.rtp import pack_rtp_header, parse_rtp_header
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

LOSS = 0.05
REORDER = 0.05
SEED = 5


async def test_tone_survives_loss_and_reordering_and_loss_is_reported() -> None:
    frames = tone_frames(3.0)
    relay = RelayOptions(loss=LOSS, reorder=REORDER, seed=SEED)
    async with (
        voice_server(relay=relay, rtcp_interval=0.5) as server,
        discord_world(server) as world,
    ):
        assert server.relay is not None
        assert server.media_port == server.relay.port != server.udp_port
        options = VoiceOptions(transport="udp")
        vc = await world.channel.connect(cls=LegatoVoiceClient.configured(options), timeout=20)
        assert isinstance(vc, LegatoVoiceClient)
        assert vc.connection is not None
        transport = vc.connection.transport
        assert isinstance(transport, UdpTransport)

        player = Player(vc, frames)
        await player.play()  # paced to the end: the loss never stalls the sender
        rec = server.recording(BOT_ID, GUILD_ID)
        await rec.wait_speaking(False, timeout=20)
        await server.relay.wait_idle()
        relay_stats = server.relay.stats
        await rec.wait_frames(relay_stats.forwarded_rtp, timeout=20)

        # Everything Legato sent went through the relay; the seeded run loses and reorders some.
        assert vc.stats.frames_sent == player.sent == len(frames) + 5  # tone + trailing silence
        assert vc.frames_dropped == 0
        assert relay_stats.rtp_packets == player.sent
        assert relay_stats.dropped > 0
        assert relay_stats.reordered > 0
        assert 0.90 * player.sent <= relay_stats.forwarded_rtp <= 0.99 * player.sent

        # The recording counts the same packets: missing ones as gaps, late ones as out of order.
        stats = rec.stats()
        assert stats.frames == relay_stats.forwarded_rtp
        assert stats.duplicates == 0
        assert stats.timestamp_errors == 0
        assert rec.out_of_order_packets() == relay_stats.reordered_packets
        assert stats.out_of_order == relay_stats.reordered
        reception = rec.reception(transport.ssrc)
        assert reception is not None
        first = (reception.highest - reception.expected + 1) % 65536
        # Drops before the first packet received or after the last are no gap to the receiver.
        inside = [
            (ssrc, seq)
            for ssrc, seq in relay_stats.dropped_packets
            if (seq - first) % 65536 < reception.expected
        ]
        assert rec.missing_packets() == inside
        assert stats.gaps == len(inside) > 0
        assert stats.frames + stats.gaps == rec.duration / 0.02

        # Back in sequence order, the tone is intact.
        freq = await asyncio.to_thread(rec.dominant_frequency)
        assert freq == pytest.approx(440.0, abs=2.0)

        # The server's last report covers every packet; Legato has read it and every one before.
        last_report = await server.wait_reported(BOT_ID, stats.frames, timeout=20)
        assert last_report.block.cumulative_lost == stats.gaps
        to_bot = [r for r in server.rtcp_reports if r.user_id == BOT_ID]
        assert to_bot[-1] == last_report
        assert any(r.block.fraction_lost > 0 for r in to_bot)
        async with asyncio.timeout(20):
            await transport.wait_loss_reports(len(to_bot))
        assert vc.stats.loss_reports == len(to_bot)
        assert vc.stats.packets_lost == stats.gaps > 0
        assert vc.stats.fraction_lost == last_report.block.fraction_lost / 256
        assert vc.stats.malformed_received == 0

        await vc.disconnect()
        assert voice_tasks() == []
        assert await server.wait_closed(BOT_ID) == 1000


class _Sink(asyncio.DatagramProtocol):
    """The far side of a bare relay: keeps the sequence numbers of what arrives."""

    def __init__(self) -> None:
        self.sequences: list[int] = []
        self.transport: asyncio.DatagramTransport | None = None
        self.changed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.sequences.append(parse_rtp_header(data)[0].sequence)
        self.changed.set()

    async def wait_count(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.sequences) < count:
                self.changed.clear()
                await self.changed.wait()


async def _through_relay(options: RelayOptions, count: int) -> tuple[LossyRelay, list[int]]:
    """Send ``count`` RTP packets through a bare relay; return it and what came out, in order."""
    loop = asyncio.get_running_loop()
    transport, sink = await loop.create_datagram_endpoint(_Sink, local_addr=("127.0.0.1", 0))
    port = int(transport.get_extra_info("sockname")[1])
    try:
        async with LossyRelay(("127.0.0.1", port), options) as relay:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                # One socket over loopback: the relay reads them in the order they were sent.
                for seq in range(count):
                    packet = pack_rtp_header(seq, seq * 960, 77) + b"x"
                    client.sendto(packet, ("127.0.0.1", relay.port))
                await relay.wait_rtp_packets(count)
                await relay.wait_idle()
                await sink.wait_count(count - relay.stats.dropped)
            return relay, sink.sequences
    finally:
        transport.close()


async def test_the_relay_is_reproducible_and_counts_what_it_did() -> None:
    # A long hold: a stalled test machine must not release a held packet before its successor.
    options = RelayOptions(loss=0.1, reorder=0.1, seed=42, hold=1.0)
    first, out = await _through_relay(options, 200)
    second, again = await _through_relay(options, 200)
    assert out == again  # same seed, same packets: same fate
    assert first.stats.dropped_packets == second.stats.dropped_packets
    stats = first.stats
    assert stats.rtp_packets == 200
    assert 0 < stats.dropped < 40
    assert 0 < stats.reordered < 40
    assert len(out) == 200 - stats.dropped == stats.forwarded_rtp
    assert sorted(out) == sorted(set(range(200)) - {seq for _, seq in stats.dropped_packets})
    late = [seq for k, seq in enumerate(out) if k and seq < max(out[:k])]
    assert late == [seq for _, seq in stats.reordered_packets]
    seed43 = RelayOptions(loss=0.1, reorder=0.1, seed=43, hold=1.0)
    _, different = await _through_relay(seed43, 200)
    assert different != out


async def test_a_held_packet_without_successor_goes_out_on_its_own() -> None:
    # reorder just under 1: the first packet is held; the second frees it; the third is held and
    # nothing follows it.
    relay, out = await _through_relay(RelayOptions(reorder=0.999, seed=1, hold=0.05), 3)
    assert out == [1, 0, 2]
    assert relay.stats.reordered == 1
    assert relay.stats.released == 1
    assert relay.holding == 0


@pytest.mark.parametrize("kwargs", [{"loss": 1.0}, {"loss": -0.1}, {"reorder": 1.5}, {"hold": 0.0}])
def test_relay_options_are_checked(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="relay"):
        RelayOptions(**kwargs)


async def test_command_line_relay_flags() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "legato.sandbox",
        "voice",
        "--loss",
        "0.05",
        "--reorder",
        "0.05",
        "--seed",
        "7",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        async with asyncio.timeout(20):
            while not lines or not lines[-1].startswith("Ctrl-C"):
                lines.append((await proc.stdout.readline()).decode())
        relay_line = next(line for line in lines if line.startswith("lossy relay"))
        assert "loss 0.05, reorder 0.05, seed 7" in relay_line
        media = next(line for line in lines if line.startswith("media (udp)"))
        assert media.split(":")[-1].strip() != relay_line.split(",")[0].rsplit(":", 1)[1]
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            out, _ = await proc.communicate()
    assert proc.returncode == 0
    assert "relay: rtp 0, dropped 0, reordered 0, released 0" in out.decode()


async def test_command_line_rejects_a_bad_fraction() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "legato.sandbox",
        "voice",
        "--loss",
        "1.5",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(20):
        _, err = await proc.communicate()
    assert proc.returncode == 2
    assert "expected a fraction in [0, 1), got '1.5'" in err.decode()
    assert "Traceback" not in err.decode()
