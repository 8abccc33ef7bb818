"""What the voice gateway core reports: one frozen dataclass per kind of event.

:meth:`legato.voice.protocol.VoiceGatewayCore.events` drains them in order; the shell
(:mod:`legato.voice.gateway`) acts on the ones it needs. Secrets (op4's key, raw payloads) stay
out of ``repr`` so an event can be logged as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from legato.voice.close import CloseAction
from legato.voice.state import ConnState

__all__ = [
    "BackendVersion",
    "ClientDisconnected",
    "ClientFlags",
    "ClientPlatform",
    "ClientsConnected",
    "CloseRequested",
    "DaveBinary",
    "DaveMessage",
    "Event",
    "HeartbeatAck",
    "HeartbeatTimeout",
    "Hello",
    "MediaSinkWants",
    "ProtocolError",
    "Ready",
    "Resumed",
    "SessionDescription",
    "SessionUpdate",
    "SpeakingSeen",
    "StateChanged",
    "StreamsSeen",
    "Unknown",
]


@dataclass(frozen=True, slots=True)
class StateChanged:
    """The connection moved from ``old`` to ``new``."""

    old: ConnState
    new: ConnState
    reason: str


@dataclass(frozen=True, slots=True)
class Hello:
    """op8: heartbeats start (``heartbeat_interval`` in seconds)."""

    heartbeat_interval: float
    version: int | None


@dataclass(frozen=True, slots=True)
class Ready:
    """op2: our SSRC, the media server's address and the offered encryption modes.

    ``data`` is op2's validated ``d`` for :meth:`Transport.prepare`.
    """

    ssrc: int
    ip: str
    port: int
    modes: tuple[str, ...]
    streams: tuple[dict[str, Any], ...]
    experiments: tuple[str, ...]
    data: dict[str, Any] = field(repr=False)


@dataclass(frozen=True, slots=True)
class SessionDescription:
    """op4: the negotiated session; ``data`` (op4's ``d``) goes to :meth:`Transport.start`.

    ``secret_key`` and ``data`` stay out of ``repr`` so the key never reaches a log.
    """

    mode: str | None
    secret_key: bytes | None = field(repr=False)
    sdp: str | None
    audio_codec: str | None
    video_codec: str | None
    media_session_id: str | None
    dave_protocol_version: int
    data: dict[str, Any] = field(repr=False)


@dataclass(frozen=True, slots=True)
class Resumed:
    """op9: the resume worked; media may flow again."""


@dataclass(frozen=True, slots=True)
class SpeakingSeen:
    """op5 from the server: ``user_id`` speaks (or stopped) on ``ssrc``."""

    user_id: str | None
    ssrc: int
    speaking: int


@dataclass(frozen=True, slots=True)
class StreamsSeen:
    """op12 from the server: another client's SSRCs."""

    user_id: str | None
    audio_ssrc: int
    video_ssrc: int
    data: dict[str, Any] = field(repr=False)


@dataclass(frozen=True, slots=True)
class ClientsConnected:
    """op11: users joined the call."""

    user_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ClientDisconnected:
    """op13: a user left the call."""

    user_id: str


@dataclass(frozen=True, slots=True)
class BackendVersion:
    """op16's answer."""

    voice: str | None
    rtc_worker: str | None


@dataclass(frozen=True, slots=True)
class MediaSinkWants:
    """op15: which streams (by SSRC, or ``any``) the server wants and at what quality."""

    wants: dict[str, int]


@dataclass(frozen=True, slots=True)
class SessionUpdate:
    """op14 from the server (codec changes)."""

    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ClientFlags:
    """op18."""

    user_id: str
    flags: int


@dataclass(frozen=True, slots=True)
class ClientPlatform:
    """op20."""

    user_id: str
    platform: int


@dataclass(frozen=True, slots=True)
class DaveMessage:
    """A JSON DAVE op (21-24, 31) for the DAVE session layer."""

    op: int
    data: Any


@dataclass(frozen=True, slots=True)
class DaveBinary:
    """A binary DAVE op (25-30) for the DAVE session layer."""

    op: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class HeartbeatAck:
    """op6 matched a heartbeat; ``rtt`` in seconds (None when the ACK named no nonce)."""

    rtt: float | None


@dataclass(frozen=True, slots=True)
class HeartbeatTimeout:
    """A heartbeat came due while ``missed`` earlier ones were unanswered: the link is dead."""

    missed: int
    since: float


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The server sent something we could not use (counted in ``GatewayStats``)."""

    reason: str
    op: int | None = None


@dataclass(frozen=True, slots=True)
class Unknown:
    """An op we do not know (counted in ``GatewayStats``)."""

    op: int
    data: Any = field(repr=False)


@dataclass(frozen=True, slots=True)
class CloseRequested:
    """The core wants the websocket closed with ``code``; then follow ``action``."""

    code: int
    reason: str
    action: CloseAction


Event = (
    StateChanged
    | Hello
    | Ready
    | SessionDescription
    | Resumed
    | SpeakingSeen
    | StreamsSeen
    | ClientsConnected
    | ClientDisconnected
    | BackendVersion
    | MediaSinkWants
    | SessionUpdate
    | ClientFlags
    | ClientPlatform
    | DaveMessage
    | DaveBinary
    | HeartbeatAck
    | HeartbeatTimeout
    | ProtocolError
    | Unknown
    | CloseRequested
)
