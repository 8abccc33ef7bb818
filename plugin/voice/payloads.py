"""Voice gateway payload shapes (PROTOCOL.md op table; the seed capture for browser fields).

Incoming payloads are validated field by field in :mod:`legato.voice.protocol` before use; these
types describe what a valid one holds.
"""

from __future__ import annotations

from typing import Any, Final, Literal, NotRequired, TypedDict

__all__ = [
    "DAVE_BINARY_OPS",
    "DAVE_JSON_OPS",
    "OP_BACKEND_VERSION",
    "OP_CLIENTS_CONNECT",
    "OP_CLIENT_DISCONNECT",
    "OP_CLIENT_FLAGS",
    "OP_CLIENT_PLATFORM",
    "OP_HEARTBEAT",
    "OP_HEARTBEAT_ACK",
    "OP_HELLO",
    "OP_IDENTIFY",
    "OP_MEDIA_SINK_WANTS",
    "OP_READY",
    "OP_RESUME",
    "OP_RESUMED",
    "OP_SELECT_PROTOCOL",
    "OP_SESSION_DESCRIPTION",
    "OP_SESSION_UPDATE",
    "OP_SPEAKING",
    "OP_VIDEO",
    "Codec",
    "GatewayMessage",
    "HelloData",
    "IdentifyData",
    "MaxResolution",
    "ReadyData",
    "ResumeData",
    "SelectProtocolData",
    "SessionDescriptionData",
    "SpeakingData",
    "StreamAnnounce",
    "StreamRequest",
    "UdpSelectData",
    "VideoData",
]

OP_IDENTIFY: Final = 0
OP_SELECT_PROTOCOL: Final = 1
OP_READY: Final = 2
OP_HEARTBEAT: Final = 3
OP_SESSION_DESCRIPTION: Final = 4
OP_SPEAKING: Final = 5
OP_HEARTBEAT_ACK: Final = 6
OP_RESUME: Final = 7
OP_HELLO: Final = 8
OP_RESUMED: Final = 9
OP_CLIENTS_CONNECT: Final = 11
OP_VIDEO: Final = 12
OP_CLIENT_DISCONNECT: Final = 13
OP_SESSION_UPDATE: Final = 14
OP_MEDIA_SINK_WANTS: Final = 15
OP_BACKEND_VERSION: Final = 16
OP_CLIENT_FLAGS: Final = 18
OP_CLIENT_PLATFORM: Final = 20
# DAVE (end-to-end encryption): JSON 21-24 and 31, binary 25-30 (PROTOCOL.md "DAVE").
DAVE_JSON_OPS: Final = frozenset({21, 22, 23, 24, 31})
DAVE_BINARY_OPS: Final = frozenset({25, 26, 27, 28, 29, 30})


class GatewayMessage(TypedDict):
    """Any voice gateway message; v8 server messages also carry ``seq``."""

    op: int
    d: Any
    seq: NotRequired[int]


class StreamRequest(TypedDict):
    """A stream a browser asks for in op0 (seed capture)."""

    type: str
    rid: str
    quality: int


class IdentifyData(TypedDict):
    """op0."""

    server_id: str
    user_id: str
    session_id: str
    token: str
    video: NotRequired[bool]
    streams: NotRequired[list[StreamRequest]]
    max_dave_protocol_version: NotRequired[int]


class ResumeData(TypedDict):
    """op7; ``seq_ack`` from v8 on."""

    server_id: str
    session_id: str
    token: str
    seq_ack: NotRequired[int]


class HelloData(TypedDict):
    """op8; ``heartbeat_interval`` in milliseconds (may be fractional)."""

    v: NotRequired[int]
    heartbeat_interval: float


class ReadyData(TypedDict):
    """op2."""

    ssrc: int
    ip: str
    port: int
    modes: list[str]
    experiments: NotRequired[list[str]]
    streams: NotRequired[list[dict[str, Any]]]


class UdpSelectData(TypedDict):
    """op1 ``data`` on the ``udp`` transport."""

    address: str
    port: int
    mode: str


class Codec(TypedDict):
    """One entry of op1's ``codecs``."""

    name: str
    type: Literal["audio", "video"]
    priority: int
    payload_type: int
    rtx_payload_type: int | None


class SelectProtocolData(TypedDict):
    """op1: ``data`` is :class:`UdpSelectData` (udp) or the SDP fragment (webrtc)."""

    protocol: Literal["udp", "webrtc"]
    data: UdpSelectData | str
    sdp: NotRequired[str]
    codecs: NotRequired[list[Codec]]
    rtc_connection_id: NotRequired[str]


class SessionDescriptionData(TypedDict, total=False):
    """op4: ``mode``/``secret_key`` on udp, ``sdp`` on webrtc."""

    mode: str
    secret_key: list[int]
    sdp: str
    audio_codec: str
    video_codec: str
    media_session_id: str
    dave_protocol_version: int


class SpeakingData(TypedDict):
    """op5 as we send it (the server adds ``user_id``)."""

    speaking: int
    delay: int
    ssrc: int


class MaxResolution(TypedDict):
    """op12 stream resolution cap."""

    type: str
    width: int
    height: int


class StreamAnnounce(TypedDict):
    """One op12 stream (seed capture)."""

    type: str
    rid: str
    ssrc: int
    active: bool
    quality: int
    rtx_ssrc: int
    max_bitrate: int
    max_framerate: int
    max_resolution: MaxResolution


class VideoData(TypedDict):
    """op12 as we send it."""

    audio_ssrc: int
    video_ssrc: int
    rtx_ssrc: int
    streams: list[StreamAnnounce]
