"""RTP/RTCP headers, sequence arithmetic and IP discovery: exact bytes and hostile input."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from legato.sandbox.rtp import discovery_response, pack_receiver_report, parse_discovery_request
from legato.voice.rtp import (
    DISCOVERY_PACKET_SIZE,
    OPUS_PAYLOAD_TYPE,
    RTP_HEADER_SIZE,
    MalformedPacket,
    ReceiverReport,
    ReportBlock,
    RtcpUnknown,
    RtpHeader,
    RtpSequencer,
    SenderReport,
    discovery_request,
    is_rtcp,
    pack_rtp_header,
    pack_sender_report,
    parse_discovery_response,
    parse_rtcp,
    parse_rtp,
    seq_diff,
    ts_diff,
)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)


def test_header_is_discord_layout() -> None:
    # PROTOCOL.md: 80 78 | seq u16 | timestamp u32 | ssrc u32
    header = pack_rtp_header(0x0102, 0x03040506, 0x0708090A)
    assert header == bytes.fromhex("80780102030405060708090a")
    assert len(header) == RTP_HEADER_SIZE
    assert OPUS_PAYLOAD_TYPE == 0x78


def test_header_marker_and_wrapping() -> None:
    header = pack_rtp_header(65536 + 5, 2**32 + 7, 1, marker=True)
    assert header[1] == 0x80 | 0x78
    assert struct.unpack(">HI", header[2:8]) == (5, 7)


@given(seq=u16, ts=u32, ssrc=u32, marker=st.booleans(), pt=st.integers(0, 127))
def test_parse_roundtrip(seq: int, ts: int, ssrc: int, marker: bool, pt: int) -> None:
    if 64 <= pt <= 95 and marker:
        pt = 120  # 0xC0-0xDF in byte 1 is RTCP under rtcp-mux
    packet = pack_rtp_header(seq, ts, ssrc, pt, marker) + b"opus"
    parsed = parse_rtp(packet)
    assert parsed.header == RtpHeader(seq, ts, ssrc, pt, marker)
    assert parsed.header_bytes == packet[:12]
    assert parsed.payload == b"opus"
    assert parsed.media() == b"opus"
    assert parsed.extension_profile is None


def test_parse_csrcs_extension_and_padding() -> None:
    header = RtpHeader(7, 960, 42, csrcs=(1, 2), extension=True, padding=True)
    preamble = struct.pack(">HH", 0xBEDE, 1)
    ext_body = bytes([0x10, 0xAA, 0, 0])
    packet = header.pack() + preamble + ext_body + b"media" + bytes([0, 0, 3])
    parsed = parse_rtp(packet)
    assert parsed.header == header
    assert parsed.header.csrc_count == 2
    assert parsed.header_bytes == header.pack() + preamble
    assert len(parsed.header_bytes) == 12 + 8 + 4
    assert parsed.extension_profile == 0xBEDE
    assert parsed.extension_length == 1
    assert parsed.payload == ext_body + b"media" + bytes([0, 0, 3])
    assert parsed.media() == b"media"


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"\x80\x78",
        bytes(11),
        bytes.fromhex("40780001000000000000002a"),  # version 1
        bytes.fromhex("82780001000000000000002a") + bytes(4),  # 2 CSRCs, only one present
        bytes.fromhex("90780001000000000000002a") + b"\xbe",  # X set, preamble cut
        bytes.fromhex("80c8000600000001") + bytes(4),  # an RTCP SR
    ],
)
def test_parse_rejects(packet: bytes) -> None:
    with pytest.raises(MalformedPacket):
        parse_rtp(packet)


def test_media_rejects_bad_extension_and_padding() -> None:
    too_long = RtpHeader(1, 1, 1, extension=True).pack()
    parsed = parse_rtp(too_long + struct.pack(">HH", 0xBEDE, 5) + bytes(8))
    with pytest.raises(MalformedPacket):
        parsed.media()
    padded = parse_rtp(RtpHeader(1, 1, 1, padding=True).pack() + b"ab\x05")
    with pytest.raises(MalformedPacket):
        padded.media()
    zero = parse_rtp(RtpHeader(1, 1, 1, padding=True).pack() + b"ab\x00")
    with pytest.raises(MalformedPacket):
        zero.media()


@given(st.binary(max_size=200))
def test_parse_rtp_only_raises_malformed(data: bytes) -> None:
    try:
        parsed = parse_rtp(data)
    except MalformedPacket:
        return
    with contextlib.suppress(MalformedPacket):
        parsed.media()
    assert parsed.header_bytes + parsed.payload == data


def test_sequencer_wraps_and_counts() -> None:
    seq = RtpSequencer(99, sequence=65534, timestamp=2**32 - 960)
    assert seq.next() == (65534, 2**32 - 960)
    assert seq.next() == (65535, 0)
    assert seq.next() == (0, 960)
    assert seq.frames_sent == 3
    seq.skip(5)
    assert seq.next() == (1, 960 * 7)
    header = seq.next_header(marker=True)
    assert parse_rtp(header).header == RtpHeader(2, 960 * 8, 99, marker=True)
    with pytest.raises(ValueError, match="negative"):
        seq.skip(-1)


def test_sequencer_starts_at_zero_by_default() -> None:
    seq = RtpSequencer(1)
    assert [seq.next() for _ in range(3)] == [(0, 0), (1, 960), (2, 1920)]


@pytest.mark.parametrize(
    ("a", "b", "diff"),
    [(5, 3, 2), (3, 5, -2), (0, 65535, 1), (65535, 0, -1), (32767, 0, 32767), (32768, 0, -32768)],
)
def test_seq_diff(a: int, b: int, diff: int) -> None:
    assert seq_diff(a, b) == diff


@given(a=u16, d=st.integers(-32768, 32767))
def test_seq_diff_inverts_addition(a: int, d: int) -> None:
    assert seq_diff((a + d) % 65536, a) == d


def test_ts_diff_wraps() -> None:
    assert ts_diff(100, 2**32 - 860) == 960
    assert ts_diff(0, 960) == -960


def test_discovery_request_bytes() -> None:
    packet = discovery_request(0x01020304)
    assert packet == bytes.fromhex("0001004601020304") + bytes(66)
    assert len(packet) == DISCOVERY_PACKET_SIZE
    assert parse_discovery_request(packet) == 0x01020304


def test_discovery_response_bytes() -> None:
    packet = discovery_response(7, "203.0.113.9", 50004)
    assert packet[:8] == bytes.fromhex("0002004600000007")
    assert packet[8:19] == b"203.0.113.9"
    assert packet[19:72] == bytes(53)
    assert packet[72:] == struct.pack(">H", 50004)
    assert parse_discovery_response(packet) == ("203.0.113.9", 50004)


def test_discovery_cross_type_and_junk() -> None:
    with pytest.raises(MalformedPacket):
        parse_discovery_response(discovery_request(1))
    with pytest.raises(MalformedPacket):
        parse_discovery_request(discovery_response(1, "1.2.3.4", 1))
    with pytest.raises(MalformedPacket):
        parse_discovery_response(discovery_response(1, "1.2.3.4", 1)[:-1])
    empty = bytearray(discovery_response(1, "1.2.3.4", 1))
    empty[8:72] = bytes(64)
    with pytest.raises(MalformedPacket):
        parse_discovery_response(bytes(empty))
    wrong_len = bytearray(discovery_request(1))
    wrong_len[3] = 0x45
    with pytest.raises(MalformedPacket):
        parse_discovery_request(bytes(wrong_len))
    with pytest.raises(ValueError, match="does not fit"):
        discovery_response(1, "x" * 64, 1)


@given(st.binary(max_size=100))
def test_discovery_parsers_only_raise_malformed(data: bytes) -> None:
    for parse in (parse_discovery_request, parse_discovery_response):
        with contextlib.suppress(MalformedPacket):
            parse(data)


@given(ip=st.from_regex(r"[0-9a-f.:]{1,63}", fullmatch=True), port=u16, ssrc=u32)
def test_discovery_roundtrip(ip: str, port: int, ssrc: int) -> None:
    assert parse_discovery_response(discovery_response(ssrc, ip, port)) == (ip, port)


def test_sender_report_bytes_and_roundtrip() -> None:
    block = ReportBlock(9, 12, -3, 70000, 44, 0x11223344, 65536)
    packet = pack_sender_report(5, 3_900_000_000.25, 960, 10, 1234, (block,))
    assert packet[:4] == bytes([0x81, 200, 0, 12])
    assert len(packet) == 28 + 24
    assert struct.unpack(">II", packet[8:16]) == (3_900_000_000, 1 << 30)
    assert is_rtcp(packet)
    [report] = parse_rtcp(packet)
    assert report == SenderReport(5, 3_900_000_000.25, 960, 10, 1234, (block,))


def test_compound_rr_and_unknown() -> None:
    rr = pack_receiver_report(8)
    bye = bytes([0x81, 203, 0, 1]) + struct.pack(">I", 8)
    reports = parse_rtcp(rr + bye)
    assert reports == [ReceiverReport(8), RtcpUnknown(203, 1, struct.pack(">I", 8))]


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"\x80\xc8",
        bytes([0x80, 200, 0, 6]) + bytes(8),  # length overruns
        bytes([0x40, 200, 0, 0]),  # version 1
        bytes([0x80, 120, 0, 0]),  # not an RTCP type
        bytes([0x80, 200, 0, 1]) + bytes(4),  # SR too short for its sender info
        bytes([0x81, 201, 0, 1]) + bytes(4),  # RR claims a block it lacks
        bytes([0xA0, 201, 0, 1]) + bytes(4),  # padding count 0
    ],
)
def test_parse_rtcp_rejects(packet: bytes) -> None:
    with pytest.raises(MalformedPacket):
        parse_rtcp(packet)


@given(st.binary(max_size=200))
def test_parse_rtcp_only_raises_malformed(data: bytes) -> None:
    with contextlib.suppress(MalformedPacket):
        parse_rtcp(data)


def test_is_rtcp_demux() -> None:
    assert not is_rtcp(pack_rtp_header(1, 1, 1))
    assert not is_rtcp(pack_rtp_header(1, 1, 1, marker=True))
    assert is_rtcp(pack_receiver_report(1))
    assert not is_rtcp(b"\x80")
    assert not is_rtcp(discovery_request(1))
