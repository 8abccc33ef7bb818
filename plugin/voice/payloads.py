"""Voice gateway payload shapes (PROTOCOL.md op table; the seed capture for browser fields).

Incoming payloads are validated field by field before use, by the sans-I/O core
(:mod:`legato.voice.protocol`) with the readers below (``read_int``... raise :class:`Malformed`);
the types describe what a valid one holds. :func:`dumps` writes a message as the capture shows,
and :func:`redact` makes one safe to log.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
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
    "Malformed",
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
    "as_object",
    "dumps",
    "is_int",
    "read_int",
    "read_opt_int",
    "read_opt_str",
    "read_snowflake",
    "read_str",
    "read_str_list",
    "redact",
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


# --- reading, writing and logging messages -------------------------------------------------

_REDACTED: Final = "<redacted>"
_SECRET_KEYS: Final = frozenset({"token", "session_id", "secret_key"})
_ICE_PWD = re.compile(r"(a=ice-pwd:)\S+")
_MAX_LOG_DEPTH: Final = 32


def redact(payload: Any, *, _depth: int = 0) -> Any:
    """Return a copy of ``payload`` safe to log: tokens, session ids, keys, ICE passwords hidden.

    Args:
        payload: a gateway message or any JSON-like value. Nesting deeper than 32 levels is
            elided (a hostile server must not make logging recurse without bound).
    """
    if isinstance(payload, Mapping | list | tuple) and _depth >= _MAX_LOG_DEPTH:
        return "..."
    if isinstance(payload, Mapping):
        return {
            k: (_REDACTED if k in _SECRET_KEYS else redact(v, _depth=_depth + 1))
            for k, v in payload.items()
        }
    if isinstance(payload, list | tuple):
        return [redact(v, _depth=_depth + 1) for v in payload]
    if isinstance(payload, str) and "a=ice-pwd:" in payload:
        return _ICE_PWD.sub(r"\1" + _REDACTED, payload)
    return payload


def dumps(message: Mapping[str, Any]) -> str:
    """Serialize a gateway message compactly, as the capture shows (``{"op":3,"d":1}``)."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


class Malformed(ValueError):
    """A field of an incoming payload is missing, of the wrong type, or out of range."""


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def as_object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Malformed(f"{what} is {type(value).__name__}, expected an object")
    return value


def read_int(d: Mapping[str, Any], key: str, *, lo: int = 0, hi: int = 0xFFFFFFFF) -> int:
    value = d.get(key)
    if not is_int(value):
        raise Malformed(f"{key!r} is {type(value).__name__}, expected an integer")
    assert isinstance(value, int)
    if not lo <= value <= hi:
        raise Malformed(f"{key!r}={value} out of range")
    return value


def read_opt_int(d: Mapping[str, Any], key: str, default: int) -> int:
    if d.get(key) is None:
        return default
    return read_int(d, key, lo=-(2**63), hi=2**63)


def read_str(d: Mapping[str, Any], key: str) -> str:
    value = d.get(key)
    if not isinstance(value, str):
        raise Malformed(f"{key!r} is {type(value).__name__}, expected a string")
    return value


def read_opt_str(d: Mapping[str, Any], key: str) -> str | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise Malformed(f"{key!r} is {type(value).__name__}, expected a string")
    return value


def read_snowflake(d: Mapping[str, Any], key: str) -> str:
    """User ids arrive as strings; tolerate integers (some servers send them)."""
    value = d.get(key)
    if is_int(value):
        assert isinstance(value, int)
        if not 0 <= value < 2**64:
            raise Malformed(f"{key!r}={value} is not a snowflake")
        return str(value)
    return read_str(d, key)


def read_str_list(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Malformed(f"{what} is not a list of strings")
    return tuple(value)
