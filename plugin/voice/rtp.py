"""RTP and RTCP packets, sequence/timestamp arithmetic and Discord's IP discovery.

The client's side: what a sender builds and parses. The server's half (answering IP discovery,
receiver reports) is :mod:`legato.sandbox.rtp`.

Pure functions over bytes: no sockets, no clocks. Everything that parses untrusted input raises
:class:`MalformedPacket` (a ``ValueError``) and nothing else.

Layout references: RFC 3550 (RTP/RTCP), RFC 5761 (RTP/RTCP multiplexing on one port) and
PROTOCOL.md "Transport udp" (IP discovery, payload type 120, +960 per 20 ms frame).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DISCOVERY_PACKET_SIZE",
    "DISCOVERY_REQUEST",
    "DISCOVERY_RESPONSE",
    "NTP_UNIX_OFFSET",
    "OPUS_PAYLOAD_TYPE",
    "RTCP_BYE",
    "RTCP_RR",
    "RTCP_SR",
    "RTP_HEADER_SIZE",
    "SAMPLES_PER_FRAME",
    "MalformedPacket",
    "ReceiverReport",
    "ReportBlock",
    "RtcpPacket",
    "RtcpUnknown",
    "RtpHeader",
    "RtpPacket",
    "RtpSequencer",
    "SenderReport",
    "discovery_request",
    "is_rtcp",
    "pack_discovery",
    "pack_rtcp",
    "pack_rtp_header",
    "pack_sender_report",
    "parse_discovery_response",
    "parse_rtcp",
    "parse_rtp",
    "parse_rtp_header",
    "seq_diff",
    "ts_diff",
    "unpack_discovery",
]

RTP_HEADER_SIZE: Final = 12
RTP_VERSION: Final = 2
# Discord's `udp` transport sends Opus with payload type 0x78 (PROTOCOL.md "Transport udp").
OPUS_PAYLOAD_TYPE: Final = 120
# 20 ms of 48 kHz audio: the RTP timestamp advances this much per Opus frame.
SAMPLES_PER_FRAME: Final = 960
SEQ_MODULO: Final = 1 << 16
TS_MODULO: Final = 1 << 32

# The one-byte/two-byte header extension preamble: 16-bit profile, 16-bit length in words.
EXTENSION_PREAMBLE_SIZE: Final = 4

RTCP_SR: Final = 200
RTCP_RR: Final = 201
RTCP_SDES: Final = 202
RTCP_BYE: Final = 203
RTCP_APP: Final = 204
# Seconds from the NTP epoch (1900-01-01) to the Unix epoch (1970-01-01).
NTP_UNIX_OFFSET: Final = 2_208_988_800

DISCOVERY_PACKET_SIZE: Final = 74
#: The discovery packet's type field: the client's request, the server's response.
DISCOVERY_REQUEST: Final = 0x0001
DISCOVERY_RESPONSE: Final = 0x0002
# The length field counts what follows it: ssrc (4) + address (64) + port (2).
_DISCOVERY_LENGTH: Final = 70
_DISCOVERY_ADDRESS_SIZE: Final = 64

_HEADER = struct.Struct(">BBHII")
#: The second header byte with the marker bit set and payload type 120.
_OPUS_MARKED: Final = 0x80 | OPUS_PAYLOAD_TYPE
_DISCOVERY = struct.Struct(">HHI64sH")


class MalformedPacket(ValueError):
    """A packet is truncated or does not follow the format it claims."""


@dataclass(frozen=True, slots=True)
class RtpHeader:
    """The fields of an RTP fixed header (plus its CSRC list).

    ``extension`` and ``padding`` mirror the X and P bits; the extension itself is described by
    :class:`RtpPacket`, because in Discord's ``*_rtpsize`` modes its body is encrypted.
    """

    sequence: int
    timestamp: int
    ssrc: int
    payload_type: int = OPUS_PAYLOAD_TYPE
    marker: bool = False
    extension: bool = False
    padding: bool = False
    csrcs: tuple[int, ...] = ()

    @property
    def csrc_count(self) -> int:
        """How many CSRC identifiers follow the fixed header."""
        return len(self.csrcs)

    def pack(self) -> bytes:
        """Serialize the fixed header and CSRC list (without any extension preamble).

        Raises:
            ValueError: a field is out of range.
        """
        if len(self.csrcs) > 15:
            raise ValueError("at most 15 CSRCs fit in an RTP header")
        if not 0 <= self.payload_type < 128:
            raise ValueError(f"payload type {self.payload_type} out of range")
        first = (
            (RTP_VERSION << 6)
            | (0x20 if self.padding else 0)
            | (0x10 if self.extension else 0)
            | len(self.csrcs)
        )
        second = (0x80 if self.marker else 0) | self.payload_type
        out = _HEADER.pack(
            first, second, self.sequence % SEQ_MODULO, self.timestamp % TS_MODULO, self.ssrc
        )
        if self.csrcs:
            out += struct.pack(f">{len(self.csrcs)}I", *self.csrcs)
        return out


@dataclass(frozen=True, slots=True)
class RtpPacket:
    """A parsed RTP packet.

    Attributes:
        header: the decoded header fields.
        header_bytes: the fixed header, the CSRCs and, when X is set, the 4-byte extension
            preamble: exactly the additional authenticated data of the ``*_rtpsize`` modes.
        payload: everything after ``header_bytes`` (extension body, media, padding; still
            encrypted when the packet came off the wire in an encrypted mode).
        extension_profile: the preamble's profile (``0xBEDE`` for one-byte extensions), or None.
        extension_length: the extension body's length in 32-bit words (0 without X).
    """

    header: RtpHeader
    header_bytes: bytes
    payload: bytes
    extension_profile: int | None = None
    extension_length: int = 0

    @property
    def extension_size(self) -> int:
        """The extension body's length in bytes."""
        return self.extension_length * 4

    def media(self, data: bytes | None = None) -> bytes:
        """Return the media payload: ``data`` without the extension body and RTP padding.

        Args:
            data: the plaintext that follows ``header_bytes``; defaults to ``payload`` (right for
                unencrypted packets).

        Raises:
            MalformedPacket: the extension body or the padding does not fit.
        """
        body = self.payload if data is None else data
        start = self.extension_size
        if len(body) < start:
            raise MalformedPacket(
                f"extension body of {start} bytes does not fit in {len(body)} bytes"
            )
        end = len(body)
        if self.header.padding:
            if end == start:
                raise MalformedPacket("padding bit set on an empty payload")
            pad = body[-1]
            if pad == 0 or pad > end - start:
                raise MalformedPacket(f"invalid padding length {pad}")
            end -= pad
        return body[start:end]


def pack_rtp_header(
    sequence: int,
    timestamp: int,
    ssrc: int,
    payload_type: int = OPUS_PAYLOAD_TYPE,
    marker: bool = False,
) -> bytes:
    """Build the 12-byte RTP header Discord expects (``0x80``, no CSRC, no extension).

    Args:
        sequence: the 16-bit sequence number (taken modulo 2**16).
        timestamp: the 32-bit timestamp (taken modulo 2**32).
        ssrc: our synchronisation source.
        payload_type: 120 for Opus on Discord's ``udp`` transport.
        marker: the M bit (first packet after silence).

    Returns:
        Exactly :data:`RTP_HEADER_SIZE` bytes.
    """
    return _HEADER.pack(
        0x80,
        (0x80 if marker else 0) | (payload_type & 0x7F),
        sequence % SEQ_MODULO,
        timestamp % TS_MODULO,
        ssrc & 0xFFFFFFFF,
    )


def parse_rtp_header(packet: bytes) -> tuple[RtpHeader, int]:
    """Decode the fixed header and CSRCs and return them with the header's length.

    The returned length covers the fixed header, the CSRCs and, when X is set, the 4-byte
    extension preamble.

    Raises:
        MalformedPacket: truncated, or not RTP version 2.
    """
    if len(packet) < RTP_HEADER_SIZE:
        raise MalformedPacket(f"RTP packet of {len(packet)} bytes is shorter than its header")
    first, second, sequence, timestamp, ssrc = _HEADER.unpack_from(packet)
    if first >> 6 != RTP_VERSION:
        raise MalformedPacket(f"RTP version {first >> 6}, expected 2")
    cc = first & 0x0F
    size = RTP_HEADER_SIZE + 4 * cc
    extension = bool(first & 0x10)
    if extension:
        size += EXTENSION_PREAMBLE_SIZE
    if len(packet) < size:
        raise MalformedPacket(f"RTP header needs {size} bytes, packet has {len(packet)}")
    csrcs = struct.unpack_from(f">{cc}I", packet, RTP_HEADER_SIZE) if cc else ()
    header = RtpHeader(
        sequence=sequence,
        timestamp=timestamp,
        ssrc=ssrc,
        payload_type=second & 0x7F,
        marker=bool(second & 0x80),
        extension=extension,
        padding=bool(first & 0x20),
        csrcs=tuple(csrcs),
    )
    return header, size


def parse_rtp(packet: bytes) -> RtpPacket:
    """Split an RTP packet into header, header bytes and payload.

    The payload is not interpreted (it may be encrypted); use :meth:`RtpPacket.media` on
    plaintext to drop the extension body and padding.

    Raises:
        MalformedPacket: truncated, not version 2, or an RTCP packet.
    """
    packet = bytes(packet)
    header, size = parse_rtp_header(packet)
    if is_rtcp(packet):
        raise MalformedPacket(f"payload type byte {packet[1]} is RTCP, not RTP")
    profile: int | None = None
    length = 0
    if header.extension:
        profile, length = struct.unpack_from(">HH", packet, size - EXTENSION_PREAMBLE_SIZE)
    return RtpPacket(
        header=header,
        header_bytes=packet[:size],
        payload=packet[size:],
        extension_profile=profile,
        extension_length=length,
    )


def seq_diff(a: int, b: int) -> int:
    """Return ``a - b`` for 16-bit sequence numbers, in ``[-32768, 32767]``.

    Positive when ``a`` is after ``b`` across a wrap (``seq_diff(0, 65535) == 1``).
    """
    d = (a - b) % SEQ_MODULO
    return d - SEQ_MODULO if d >= SEQ_MODULO // 2 else d


def ts_diff(a: int, b: int) -> int:
    """Return ``a - b`` for 32-bit RTP timestamps, in ``[-2**31, 2**31 - 1]``."""
    d = (a - b) % TS_MODULO
    return d - TS_MODULO if d >= TS_MODULO // 2 else d


class RtpSequencer:
    """Hands out contiguous sequence numbers and timestamps for one SSRC.

    ``next()`` returns the values for the frame about to be sent and advances: sequence by 1
    (mod 2**16), timestamp by :data:`SAMPLES_PER_FRAME` (mod 2**32). ``skip(n)`` advances only
    the timestamp, for a silence gap during which nothing was sent (RFC 3550 §5.1: sequence
    numbers count packets, timestamps count samples).
    """

    __slots__ = ("frames_sent", "samples_per_frame", "sequence", "ssrc", "timestamp")

    def __init__(
        self,
        ssrc: int,
        *,
        sequence: int = 0,
        timestamp: int = 0,
        samples_per_frame: int = SAMPLES_PER_FRAME,
    ) -> None:
        self.ssrc = ssrc
        self.sequence = sequence % SEQ_MODULO
        self.timestamp = timestamp % TS_MODULO
        self.samples_per_frame = samples_per_frame
        self.frames_sent = 0

    def next(self) -> tuple[int, int]:
        """Return ``(sequence, timestamp)`` for the next packet and advance."""
        out = (self.sequence, self.timestamp)
        self.next_header()
        return out

    def next_header(self, *, marker: bool = False) -> bytes:
        """Return the 12-byte header for the next packet and advance."""
        # ``pack_rtp_header`` written out (and the advance here, not through ``next()``): this
        # runs per frame for every stream.
        sequence, timestamp = self.sequence, self.timestamp
        self.sequence = (sequence + 1) % SEQ_MODULO
        self.timestamp = (timestamp + self.samples_per_frame) % TS_MODULO
        self.frames_sent += 1
        return _HEADER.pack(
            0x80,
            _OPUS_MARKED if marker else OPUS_PAYLOAD_TYPE,
            sequence,
            timestamp,
            self.ssrc & 0xFFFFFFFF,
        )

    def skip(self, frames: int) -> None:
        """Advance the timestamp by ``frames`` frames that were not sent.

        Raises:
            ValueError: ``frames`` is negative.
        """
        if frames < 0:
            raise ValueError("cannot skip a negative number of frames")
        self.timestamp = (self.timestamp + frames * self.samples_per_frame) % TS_MODULO


# --- IP discovery (PROTOCOL.md "Transport udp") -------------------------------------------


def discovery_request(ssrc: int) -> bytes:
    """Build the 74-byte IP discovery request: ``00 01 | 00 46 | ssrc | 66 zero bytes``."""
    return pack_discovery(DISCOVERY_REQUEST, ssrc)


def parse_discovery_response(data: bytes) -> tuple[str, int]:
    """Return ``(ip, port)`` from an IP discovery response.

    Raises:
        MalformedPacket: wrong size/type/length, or an address that is empty or not ASCII.
    """
    kind, _ssrc, raw, port = unpack_discovery(data)
    if kind != DISCOVERY_RESPONSE:
        raise MalformedPacket(f"discovery type {kind:#06x} is not a response")
    address = raw.split(b"\0", 1)[0]
    if not address:
        raise MalformedPacket("discovery response carries no address")
    try:
        ip = address.decode("ascii")
    except UnicodeDecodeError as exc:
        raise MalformedPacket("discovery address is not ASCII") from exc
    if not ip.isprintable():
        raise MalformedPacket("discovery address has control characters")
    return ip, port


def pack_discovery(kind: int, ssrc: int, address: bytes = b"", port: int = 0) -> bytes:
    """Build a 74-byte IP discovery packet of type ``kind`` (the layout both sides share).

    Raises:
        ValueError: the address does not fit in 63 bytes with its terminator, or the port is
            out of range.
    """
    if len(address) >= _DISCOVERY_ADDRESS_SIZE or b"\0" in address:
        raise ValueError(f"address {address!r} does not fit the discovery packet")
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")
    return _DISCOVERY.pack(kind, _DISCOVERY_LENGTH, ssrc & 0xFFFFFFFF, address, port)


def unpack_discovery(data: bytes) -> tuple[int, int, bytes, int]:
    """Split a discovery packet into ``(kind, ssrc, raw_address, port)``.

    ``raw_address`` is the 64-byte field as sent (NUL-padded).

    Raises:
        MalformedPacket: wrong size or length field.
    """
    if len(data) != DISCOVERY_PACKET_SIZE:
        raise MalformedPacket(f"discovery packet of {len(data)} bytes, expected 74")
    kind, length, ssrc, raw, port = _DISCOVERY.unpack(bytes(data))
    if length != _DISCOVERY_LENGTH:
        raise MalformedPacket(f"discovery length field {length}, expected 70")
    return kind, ssrc, raw, port


# --- RTCP (RFC 3550 §6.4) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReportBlock:
    """One reception report block (24 bytes) of an SR or RR."""

    ssrc: int
    fraction_lost: int
    cumulative_lost: int
    highest_sequence: int
    jitter: int
    last_sr: int
    delay_since_last_sr: int

    def pack(self) -> bytes:
        """The block's 24 bytes (RFC 3550 6.4.1)."""
        return _REPORT_BLOCK.pack(
            self.ssrc & 0xFFFFFFFF,
            ((self.fraction_lost & 0xFF) << 24) | (self.cumulative_lost & 0xFFFFFF),
            self.highest_sequence & 0xFFFFFFFF,
            self.jitter & 0xFFFFFFFF,
            self.last_sr & 0xFFFFFFFF,
            self.delay_since_last_sr & 0xFFFFFFFF,
        )


@dataclass(frozen=True, slots=True)
class SenderReport:
    """RTCP SR (payload type 200)."""

    ssrc: int
    ntp_time: float
    rtp_timestamp: int
    packet_count: int
    octet_count: int
    reports: tuple[ReportBlock, ...] = ()


@dataclass(frozen=True, slots=True)
class ReceiverReport:
    """RTCP RR (payload type 201)."""

    ssrc: int
    reports: tuple[ReportBlock, ...] = ()


@dataclass(frozen=True, slots=True)
class RtcpUnknown:
    """Any other RTCP packet in a compound packet (SDES, BYE, APP, feedback): kept raw."""

    packet_type: int
    count: int
    body: bytes


RtcpPacket = SenderReport | ReceiverReport | RtcpUnknown

_RTCP_COMMON = struct.Struct(">BBH")
_SR_INFO = struct.Struct(">IIIIII")
_REPORT_BLOCK = struct.Struct(">IIIIII")


def is_rtcp(packet: bytes) -> bool:
    """Tell RTCP from RTP on a multiplexed port (RFC 5761 §4).

    The second byte of RTCP is its packet type, 192-223 in practice (SR 200 ... APP 204,
    feedback 205/206); RTP puts marker+payload type there, and payload types 64-95 are never
    used with rtcp-mux, so the ranges do not collide.
    """
    return len(packet) >= 2 and (packet[0] >> 6) == RTP_VERSION and 192 <= packet[1] <= 223


def pack_sender_report(
    ssrc: int,
    ntp_time: float,
    rtp_timestamp: int,
    packet_count: int,
    octet_count: int,
    reports: tuple[ReportBlock, ...] = (),
) -> bytes:
    """Build an RTCP sender report.

    Args:
        ssrc: the sender's SSRC.
        ntp_time: wallclock in NTP seconds (since 1900; add :data:`NTP_UNIX_OFFSET` to a Unix
            time).
        rtp_timestamp: the RTP timestamp matching ``ntp_time``.
        packet_count: packets sent so far (mod 2**32).
        octet_count: payload octets sent so far (mod 2**32).
        reports: reception report blocks, at most 31.

    Returns:
        The packet bytes (28 + 24 per report block).
    """
    if len(reports) > 31:
        raise ValueError("at most 31 report blocks fit in one SR")
    if ntp_time < 0:
        raise ValueError("NTP time must be positive")
    seconds = int(ntp_time)
    fraction = int((ntp_time - seconds) * (1 << 32)) & 0xFFFFFFFF
    body = _SR_INFO.pack(
        ssrc & 0xFFFFFFFF,
        seconds & 0xFFFFFFFF,
        fraction,
        rtp_timestamp % TS_MODULO,
        packet_count & 0xFFFFFFFF,
        octet_count & 0xFFFFFFFF,
    )
    body += b"".join(block.pack() for block in reports)
    return pack_rtcp(RTCP_SR, len(reports), body)


def pack_rtcp(packet_type: int, count: int, body: bytes) -> bytes:
    """Put RTCP's common header (version 2, no padding, ``count``) in front of ``body``.

    Raises:
        ValueError: ``body`` is not a whole number of 32-bit words, or ``count`` is over 31.
    """
    if len(body) % 4:
        raise ValueError(f"an RTCP body of {len(body)} bytes is not whole 32-bit words")
    if not 0 <= count <= 31:
        raise ValueError(f"RTCP count {count} out of range")
    return _RTCP_COMMON.pack(0x80 | count, packet_type, len(body) // 4) + body


def _parse_blocks(body: bytes, offset: int, count: int) -> tuple[ReportBlock, ...]:
    if len(body) < offset + count * _REPORT_BLOCK.size:
        raise MalformedPacket(f"{count} report blocks do not fit in {len(body)} bytes")
    blocks = []
    for i in range(count):
        ssrc, lost, highest, jitter, lsr, dlsr = _REPORT_BLOCK.unpack_from(
            body, offset + i * _REPORT_BLOCK.size
        )
        cumulative = lost & 0xFFFFFF
        if cumulative & 0x800000:  # a signed 24-bit count (duplicates make it negative)
            cumulative -= 1 << 24
        blocks.append(ReportBlock(ssrc, lost >> 24, cumulative, highest, jitter, lsr, dlsr))
    return tuple(blocks)


def parse_rtcp(packet: bytes) -> list[RtcpPacket]:
    """Parse a (possibly compound) RTCP packet.

    Returns:
        One entry per RTCP packet: :class:`SenderReport`, :class:`ReceiverReport`, or
        :class:`RtcpUnknown` for the other types.

    Raises:
        MalformedPacket: empty, truncated, wrong version, or a length that overruns the data.
    """
    data = bytes(packet)
    if not data:
        raise MalformedPacket("empty RTCP packet")
    out: list[RtcpPacket] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _RTCP_COMMON.size:
            raise MalformedPacket("truncated RTCP header")
        first, packet_type, length = _RTCP_COMMON.unpack_from(data, offset)
        if first >> 6 != RTP_VERSION:
            raise MalformedPacket(f"RTCP version {first >> 6}, expected 2")
        if not 192 <= packet_type <= 223:
            raise MalformedPacket(f"RTCP packet type {packet_type} out of range")
        end = offset + 4 + length * 4
        if end > len(data):
            raise MalformedPacket("RTCP length overruns the packet")
        body = data[offset + 4 : end]
        if first & 0x20:  # padding: the last octet counts the padding octets
            if not body or body[-1] == 0 or body[-1] > len(body):
                raise MalformedPacket("invalid RTCP padding")
            body = body[: -body[-1]]
        count = first & 0x1F
        if packet_type == RTCP_SR:
            if len(body) < _SR_INFO.size:
                raise MalformedPacket("truncated sender report")
            ssrc, msw, lsw, rtp_ts, packets, octets = _SR_INFO.unpack_from(body)
            out.append(
                SenderReport(
                    ssrc=ssrc,
                    ntp_time=msw + lsw / (1 << 32),
                    rtp_timestamp=rtp_ts,
                    packet_count=packets,
                    octet_count=octets,
                    reports=_parse_blocks(body, _SR_INFO.size, count),
                )
            )
        elif packet_type == RTCP_RR:
            if len(body) < 4:
                raise MalformedPacket("truncated receiver report")
            (ssrc,) = struct.unpack_from(">I", body)
            out.append(ReceiverReport(ssrc=ssrc, reports=_parse_blocks(body, 4, count)))
        else:
            out.append(RtcpUnknown(packet_type=packet_type, count=count, body=body))
        offset = end
    return out
