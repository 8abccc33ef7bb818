"""Legato on ``udp`` through a lossy path: 5 % loss and reordering between it and the server.

The sandbox's relay (``legato.sandbox.relay``) drops and reorders Legato's RTP with a seeded
generator and lists what it did; the recording must count the same packets as lost and as out
of order, put the reordered ones back in place, and the tone must survive. The server's RTCP
receiver reports carry the loss back to Legato, whose transport stats show it.
"""

from __future__ import annotations

import asyncio

import pytest

from legato.sandbox.relay import RelayOptions
from legato.voice.client import LegatoVoiceClient, VoiceOptions
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
