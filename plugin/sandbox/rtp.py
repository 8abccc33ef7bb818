"""The voice server's half of RTP, RTCP and IP discovery: what the sandbox answers a sender.

The layouts are :mod:`legato.voice.rtp`'s (the client's side); this module holds only what a
server does with them: read a discovery request and answer it with the address it came from,
and send receiver reports about what it heard. Pure functions over bytes.
"""

from __future__ import annotations

import struct

from legato.voice.rtp import (
    DISCOVERY_REQUEST,
    DISCOVERY_RESPONSE,
    RTCP_RR,
    MalformedPacket,
    ReportBlock,
    pack_discovery,
    pack_rtcp,
    unpack_discovery,
)

__all__ = ["discovery_response", "pack_receiver_report", "parse_discovery_request"]


def parse_discovery_request(data: bytes) -> int:
    """Return the SSRC of an IP discovery request.

    Raises:
        MalformedPacket: wrong size, type or length field.
    """
    kind, ssrc, _raw, _port = unpack_discovery(data)
    if kind != DISCOVERY_REQUEST:
        raise MalformedPacket(f"discovery type {kind:#06x} is not a request")
    return ssrc


def discovery_response(ssrc: int, ip: str, port: int) -> bytes:
    """Build the 74-byte IP discovery response for ``ip:port``.

    Raises:
        ValueError: the address is empty, not ASCII or does not fit in 63 bytes, or the port is
            out of range.
    """
    try:
        address = ip.encode("ascii")
    except UnicodeEncodeError as exc:
        raise ValueError(f"address {ip!r} is not ASCII") from exc
    if not address:
        raise ValueError("an empty address does not fit the discovery packet")
    return pack_discovery(DISCOVERY_RESPONSE, ssrc, address, port)


def pack_receiver_report(ssrc: int, reports: tuple[ReportBlock, ...] = ()) -> bytes:
    """Build an RTCP receiver report with the given report blocks (at most 31)."""
    if len(reports) > 31:
        raise ValueError("at most 31 report blocks fit in one RR")
    body = struct.pack(">I", ssrc & 0xFFFFFFFF) + b"".join(block.pack() for block in reports)
    return pack_rtcp(RTCP_RR, len(reports), body)
