"""The sandbox's per-user recording: sequence statistics, jitter, decoding and Ogg muxing."""

from __future__ import annotations

import asyncio
import gc
import struct

import pytest

from legato.audio.sink import OPUS_SILENCE
from legato.audio.source import FRAME_BYTES
from legato.sandbox.recording import (
    ReceivedPacket,
    Recording,
    ogg_opus_bytes,
    opus_packet_samples,
)

SSRC = 0xCAFE


def fill(rec: Recording, seqs: list[int], *, ssrc: int = SSRC, step: int = 960) -> None:
    for index, seq in enumerate(seqs):
        rec.add_packet(
            arrival=index * 0.02, ssrc=ssrc, sequence=seq, timestamp=seq * step, opus=OPUS_SILENCE
        )


def test_contiguous_packets() -> None:
    rec = Recording(1, 2)
    fill(rec, [10, 11, 12, 13])
    stats = rec.stats()
    assert (stats.frames, stats.gaps, stats.sequence_errors, stats.timestamp_errors) == (4, 0, 0, 0)
    assert stats.jitter == 0.0
    assert rec.duration == pytest.approx(0.08)


def test_a_missing_packet_is_a_gap_and_silence_in_the_pcm() -> None:
    rec = Recording(1, 2)
    fill(rec, [0, 1, 3])
    assert rec.stats().gaps == 1
    assert len(rec.pcm()) == 4 * FRAME_BYTES


async def test_a_dropped_packet_is_lost_not_heard() -> None:
    rec = Recording(1, 2)
    rec.add_lost(arrival=0.0, ssrc=SSRC, sequence=0, timestamp=0)
    fill(rec, [1, 2])
    rec.add_lost(arrival=0.06, ssrc=SSRC, sequence=3, timestamp=3 * 960)
    rec.add_lost(arrival=0.07, ssrc=SSRC, sequence=3, timestamp=3 * 960)  # a duplicate
    fill(rec, [4])
    stats = rec.stats()
    assert (stats.frames, stats.dropped, stats.gaps, stats.duplicates) == (3, 2, 2, 1)
    assert stats.timestamp_errors == 0
    assert rec.missing_packets() == [(SSRC, 0), (SSRC, 3)]
    assert rec.opus_frames() == [OPUS_SILENCE] * 3
    assert len(rec.pcm()) == 5 * FRAME_BYTES  # the lost ones are silence on the timeline
    reception = rec.reception(SSRC)
    assert reception is not None
    # RTP-wise they arrived: the RTCP figures do not count them lost.
    assert (reception.received, reception.expected) == (5, 5)
    await rec.wait_arrivals(5, timeout=1.0)
    await rec.wait_frames(3, timeout=1.0)


def test_packets_read_back_in_arrival_order() -> None:
    rec = Recording(1, 2)
    sent = [
        ReceivedPacket(0.5 + i * 0.02, 0xFFFFFFFF - i % 2, (65534 + i) % 65536, i * 960, bytes([i]))
        for i in range(5)
    ]
    for p in sent:
        rec.add_packet(
            arrival=p.arrival, ssrc=p.ssrc, sequence=p.sequence, timestamp=p.timestamp, opus=p.opus
        )
    assert list(rec.packets) == sent
    assert len(rec.packets) == 5
    assert rec.packets[0] == sent[0]
    assert rec.packets[-1] == sent[-1]
    assert rec.packets[1:4] == sent[1:4]
    assert rec.packets[3:] == sent[3:]
    assert rec.packets[5:] == []
    with pytest.raises(IndexError):
        rec.packets[5]


def test_recorded_packets_leave_the_collector_nothing_to_scan() -> None:
    # A load records 5,000 packets a second; were each an object the cyclic collector tracks,
    # every full collection of the sandbox's process would scan them all (and pause it).
    rec = Recording(1, 2)
    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects())
        fill(rec, [i % 65536 for i in range(10_000)])
        added = len(gc.get_objects()) - before
    finally:
        gc.enable()
    assert added < 100
    assert rec.stats().frames == 10_000


def test_duplicates_and_reordering() -> None:
    rec = Recording(1, 2)
    fill(rec, [0, 2, 1, 1, 3])
    stats = rec.stats()
    assert stats.frames == 4
    assert stats.duplicates == 1
    assert stats.out_of_order == 1
    assert stats.sequence_errors == 2
    assert stats.gaps == 0


def test_lost_and_late_packets_are_listed_and_reception_follows_rfc3550() -> None:
    rec = Recording(1, 2)
    fill(rec, [5, 7, 6, 9, 11, 10])  # 8 lost; 6 and 10 swapped with their successors
    assert rec.missing_packets() == [(SSRC, 8)]
    assert rec.out_of_order_packets() == [(SSRC, 6), (SSRC, 10)]
    stats = rec.stats()
    assert (stats.gaps, stats.out_of_order, stats.duplicates) == (1, 2, 0)
    reception = rec.reception(SSRC)
    assert reception is not None
    assert (reception.received, reception.expected, reception.highest) == (6, 7, 11)
    assert reception.lost == 1
    assert rec.reception(SSRC + 1) is None
    # Put back in sequence order: 5, 6, 7, silence for 8, 9, 10, 11.
    assert len(rec.pcm()) == 7 * FRAME_BYTES


def test_sequence_wraparound_is_contiguous() -> None:
    rec = Recording(1, 2)
    for index, seq in enumerate([65534, 65535, 0, 1]):
        rec.add_packet(
            arrival=index * 0.02, ssrc=SSRC, sequence=seq, timestamp=index * 960, opus=b"\xf8"
        )
    stats = rec.stats()
    assert (stats.frames, stats.gaps, stats.sequence_errors, stats.timestamp_errors) == (4, 0, 0, 0)


def test_timestamp_steps_other_than_960_are_counted() -> None:
    rec = Recording(1, 2)
    fill(rec, [0, 1, 2], step=1920)
    assert rec.stats().timestamp_errors == 2


def test_jitter_follows_rfc3550() -> None:
    rec = Recording(1, 2)
    for arrival, seq in [(0.0, 0), (0.02, 1), (0.05, 2)]:
        rec.add_packet(arrival=arrival, ssrc=SSRC, sequence=seq, timestamp=seq * 960, opus=b"")
    # Transit changes by 10 ms = 480 samples on the third packet: J = 480 / 16 samples.
    assert rec.stats().jitter == pytest.approx(30 / 48_000)


def test_a_new_ssrc_starts_a_new_stream() -> None:
    rec = Recording(1, 2)
    fill(rec, [100, 101])
    fill(rec, [5, 6, 7], ssrc=0xBEEF)
    stats = rec.stats()
    assert stats.streams == 2
    assert stats.frames == 5
    assert stats.gaps == 0
    assert stats.sequence_errors == 0


def test_speaking_state() -> None:
    rec = Recording(1, 2)
    assert rec.speaking is False
    rec.add_speaking(arrival=0.0, speaking=5, ssrc=SSRC)
    assert rec.speaking is True
    assert rec.speaking_changes[-1].on
    assert rec.ssrcs == [SSRC]


async def test_waiting_for_frames_and_speaking() -> None:
    rec = Recording(1, 2)
    frames = asyncio.create_task(rec.wait_frames(2, timeout=10))
    quiet = asyncio.create_task(rec.wait_speaking(False, timeout=10))
    await asyncio.sleep(0)  # let both park; nothing has arrived yet
    assert not frames.done()
    fill(rec, [0, 1])
    rec.add_speaking(arrival=0.0, speaking=1, ssrc=SSRC)
    await frames
    assert not quiet.done()
    rec.add_speaking(arrival=0.1, speaking=0, ssrc=SSRC)
    await quiet
    with pytest.raises(TimeoutError, match="5 frames"):
        await rec.wait_frames(5, timeout=0.01)


@pytest.mark.parametrize(
    ("packet", "samples"),
    [
        (b"\xf8\xff\xfe", 960),  # CELT 20 ms, one frame
        (b"\xf9\x00", 1920),  # two 20 ms frames (code 1)
        (b"\xfb\x03", 2880),  # code 3, three 20 ms frames
        (b"\x08", 960),  # SILK 20 ms
        (b"\x60", 480),  # hybrid 10 ms
        (b"", 0),
    ],
)
def test_opus_packet_samples(packet: bytes, samples: int) -> None:
    assert opus_packet_samples(packet) == samples


def _reference_crc(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = (
                ((crc << 1) ^ 0x04C11DB7) & 0xFFFFFFFF
                if crc & 0x80000000
                else crc << 1 & 0xFFFFFFFF
            )
    return crc


def test_ogg_pages_carry_valid_crcs_and_granules() -> None:
    assert _reference_crc(b"123456789") == 0x89A1897F  # the reference itself is right
    data = ogg_opus_bytes([b"\xf8\xff\xfe"] * 3)
    offset, granules, flags = 0, [], []
    while offset < len(data):
        assert data[offset : offset + 4] == b"OggS"
        flag, granule = struct.unpack_from("<Bq", data, offset + 5)
        (crc,) = struct.unpack_from("<I", data, offset + 22)
        segments = data[offset + 26]
        size = 27 + segments + sum(data[offset + 27 : offset + 27 + segments])
        page = bytearray(data[offset : offset + size])
        page[22:26] = bytes(4)
        assert crc == _reference_crc(bytes(page))
        granules.append(granule)
        flags.append(flag)
        offset += size
    assert granules == [0, 0, 960, 1920, 2880]
    assert flags == [0x02, 0, 0, 0, 0x04]
    assert data[28:36] == b"OpusHead"
