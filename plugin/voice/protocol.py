"""The voice gateway protocol as a sans-I/O core (the python-websockets shape, STYLE.md §2).

:class:`VoiceGatewayCore` takes what arrives (:meth:`~VoiceGatewayCore.receive_text`,
:meth:`~VoiceGatewayCore.receive_binary`), the passing of time (:meth:`~VoiceGatewayCore.tick`)
and the shell's requests (:meth:`~VoiceGatewayCore.connected`,
:meth:`~VoiceGatewayCore.select_protocol`, :meth:`~VoiceGatewayCore.speaking`...), and buffers
what to send (:meth:`~VoiceGatewayCore.outgoing`) and what happened
(:meth:`~VoiceGatewayCore.events`). The asyncio shell moves the bytes, sleeps until
:meth:`~VoiceGatewayCore.next_deadline`, and acts on :class:`CloseRequested` and on the
:class:`CloseDecision` that :meth:`~VoiceGatewayCore.closed` returns. Time is always passed in.

Handshake (PROTOCOL.md, seed capture)::

    webrtc: S op8 hello -> C op0 identify -> S op2 ready -> C op16 -> C op12 -> C op1 select
            -> S op15 -> S op4 session description
    udp:    S op8 hello -> C op0 identify -> S op2 ready -> (IP discovery) -> C op1 -> S op4

op16/op12 are queued by the shell (:meth:`~VoiceGatewayCore.request_backend_version`,
:meth:`~VoiceGatewayCore.announce_streams`) in that order. Nothing received ever raises out of
``receive*``: bad input is counted in :class:`GatewayStats` and reported as
:class:`ProtocolError` or :class:`Unknown` events.
"""

from __future__ import annotations

import copy
import enum
import json
import logging
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from legato.errors import VoiceClosed
from legato.voice.payloads import (
    DAVE_BINARY_OPS,
    DAVE_JSON_OPS,
    OP_BACKEND_VERSION,
    OP_CLIENT_DISCONNECT,
    OP_CLIENT_FLAGS,
    OP_CLIENT_PLATFORM,
    OP_CLIENTS_CONNECT,
    OP_HEARTBEAT,
    OP_HEARTBEAT_ACK,
    OP_HELLO,
    OP_IDENTIFY,
    OP_MEDIA_SINK_WANTS,
    OP_READY,
    OP_RESUME,
    OP_RESUMED,
    OP_SELECT_PROTOCOL,
    OP_SESSION_DESCRIPTION,
    OP_SESSION_UPDATE,
    OP_SPEAKING,
    OP_VIDEO,
    Codec,
    StreamAnnounce,
    StreamRequest,
)
from legato.voice.state import ConnState, ConnStateMachine

__all__ = [
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_TABLE",
    "DEFAULT_WEBRTC_CODECS",
    "MAX_SSRC_USERS",
    "RESUME_REFUSALS",
    "SPEAKING_MICROPHONE",
    "SPEAKING_PRIORITY",
    "SPEAKING_SOUNDSHARE",
    "BackendVersion",
    "ClientDisconnected",
    "ClientFlags",
    "ClientPlatform",
    "ClientsConnected",
    "CloseAction",
    "CloseDecision",
    "CloseRequested",
    "DaveBinary",
    "DaveMessage",
    "Event",
    "GatewayStats",
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
    "VoiceGatewayCore",
    "close_policy",
    "dumps",
    "redact",
]

_log = logging.getLogger(__name__)

SPEAKING_MICROPHONE: Final = 1
SPEAKING_SOUNDSHARE: Final = 2
SPEAKING_PRIORITY: Final = 4

#: The close code we use when *we* end a connection over a protocol violation (RFC 6455 §7.4.1).
CLOSE_PROTOCOL_ERROR: Final = 1002
#: The close code we use to drop a dead link we mean to resume: not 1000/1001, which would end
#: the session server-side (Discord's gateway guidance; discord.py uses 4000 the same way).
CLOSE_RECONNECT: Final = 4000
#: The close code we use when op4 names a mode we did not select (the server's own 4016).
CLOSE_UNKNOWN_MODE: Final = 4016

#: op1 ``codecs`` when the transport gives none: Chrome's opus payload type (PROTOCOL.md).
DEFAULT_WEBRTC_CODECS: Final[tuple[Codec, ...]] = (
    {
        "name": "opus",
        "type": "audio",
        "priority": 1000,
        "payload_type": 111,
        "rtx_payload_type": None,
    },
)

# What a browser identifies with (seed capture, op0).
_BROWSER_STREAMS: Final[tuple[StreamRequest, ...]] = (
    {"type": "video", "rid": "100", "quality": 100},
)
# What a browser announces in op12 (seed capture): one inactive video stream.
_BROWSER_ANNOUNCE: Final[StreamAnnounce] = {
    "type": "video",
    "rid": "100",
    "ssrc": 0,
    "active": False,
    "quality": 100,
    "rtx_ssrc": 0,
    "max_bitrate": 2_500_000,
    "max_framerate": 20,
    "max_resolution": {"type": "fixed", "width": 1280, "height": 720},
}

_SOCKET_OPEN: Final = frozenset(
    {
        ConnState.AWAITING_READY,
        ConnState.SELECTING_PROTOCOL,
        ConnState.AWAITING_SESSION,
        ConnState.READY,
        ConnState.RESUMING,
    }
)


# --- close codes -----------------------------------------------------------------------------


class CloseAction(enum.Enum):
    """What to do after the voice websocket closed."""

    #: Reconnect and send op7 Resume (keeps the session, and the v8 message buffer).
    RESUME = "resume"
    #: Reconnect and identify afresh: the session is gone.
    NEW_SESSION = "new_session"
    #: Stop, unless a new VOICE_SERVER_UPDATE arrives (moved to another channel or server).
    AWAIT_MOVE = "await_move"
    #: Stop for good and report the error.
    STOP = "stop"


@dataclass(frozen=True, slots=True)
class CloseDecision:
    """The policy's answer to a close: an action and why.

    Attributes:
        action: what the shell does next.
        code: the close code (None when the TCP connection dropped without one).
        reason: an operator-facing sentence (safe to log).
        user_message: a short sentence safe to show in Discord when ``action`` is STOP.
        resume_refused: the server answered op7 as a server without resume does: op7 must not
            be sent to it again (the core's ``resume_supported`` becomes False).
    """

    action: CloseAction
    code: int | None
    reason: str
    user_message: str | None = None
    resume_refused: bool = False

    def error(self) -> VoiceClosed:
        """The exception to raise or report when the connection ends here."""
        return VoiceClosed(
            self.code if self.code is not None else 1006,
            self.reason,
            user_message=self.user_message,
        )


_STOP, _RESUME, _NEW, _MOVE = (
    CloseAction.STOP,
    CloseAction.RESUME,
    CloseAction.NEW_SESSION,
    CloseAction.AWAIT_MOVE,
)
_BUG = "The voice connection failed because of a bug; it has been logged."

#: Close codes, their action and meaning. Source: PROTOCOL.md "Close codes" (Discord's voice
#: docs, discord-userdoccers) and discord.py 2.7.1 ``voice_state.py`` (1000 stops, 4014/4022
#: end the call, 4015 resumes, 4021 must not reconnect). 4001-4005, 4011, 4012 and 4020 mean we
#: sent something wrong: reconnecting would only repeat it, so they stop with the reason logged.
CLOSE_TABLE: Final[dict[int, tuple[CloseAction, str, str | None]]] = {
    1000: (_STOP, "normal closure", None),
    # RFC 6455: a message exceeded the receiver's size limit. Sent by aiohttp on our side when the
    # server's message is over legato.voice.gateway.MAX_MESSAGE_SIZE: a resume would be answered
    # with the same message (v8 replays it), so stop.
    1009: (
        _STOP,
        "message too big: a voice gateway message exceeded the size limit",
        "The voice server sent a message too large to accept.",
    ),
    4001: (_STOP, "unknown opcode: we sent an op the server does not know", _BUG),
    4002: (_STOP, "failed to decode payload: the server could not parse what we sent", _BUG),
    4003: (_STOP, "not authenticated: we sent a payload before identifying", _BUG),
    4004: (
        _STOP,
        "authentication failed: the voice token or session was refused",
        "The voice server refused my credentials.",
    ),
    4005: (_STOP, "already authenticated: we identified twice", _BUG),
    4006: (_NEW, "session no longer valid", None),
    4009: (_NEW, "session timed out", None),
    4011: (_STOP, "voice server not found", "The voice server could not be found."),
    4012: (_STOP, "unknown protocol: the server refused our transport", _BUG),
    4014: (
        _MOVE,
        "disconnected: kicked, moved, or the channel was deleted",
        "I was disconnected from the voice channel.",
    ),
    4015: (_RESUME, "voice server crashed", None),
    4016: (
        _STOP,
        "unknown encryption mode: the server refused our mode",
        "The voice server and I share no encryption mode.",
    ),
    4017: (
        _STOP,
        "DAVE (end-to-end encryption) is required by this channel",
        "This channel requires end-to-end encrypted voice, which I cannot do yet.",
    ),
    4020: (_STOP, "bad request: the server rejected a malformed payload", _BUG),
    4021: (_STOP, "rate limited: not reconnecting", "The voice server is rate limiting me."),
    4022: (_STOP, "call terminated", "The call was ended."),
}


#: Closes that answer an op7 Resume (sent, not yet answered with op9) with "identify afresh".
#: 4003: a server without op7 (Spacebar) closes anything before identify with "not
#: authenticated" (PROTOCOL.md, "Facts from running real peers"); it is the server's answer to
#: a resume, not our bug, and every later resume would get it too. 4006: the session expired
#: (Discord's documented answer, and the sandbox's); the server can still resume later sessions.
RESUME_REFUSALS: Final[dict[int, tuple[str, bool]]] = {
    4003: (
        "the server answered op7 Resume with 4003 (not authenticated): it has no resume "
        "(Spacebar); identifying afresh, and not resuming toward it again",
        True,
    ),
    4006: ("the server answered op7 Resume with 4006: session no longer valid", False),
}


def close_policy(
    code: int | None, *, resumable: bool = True, resuming: bool = False
) -> CloseDecision:
    """Decide what a close code means, from :data:`CLOSE_TABLE`.

    Args:
        code: the close code, or None when the TCP connection dropped without a close frame.
        resumable: False when there is no established session to resume (a RESUME becomes
            NEW_SESSION).
        resuming: op7 was sent and not answered yet: a code in :data:`RESUME_REFUSALS` means
            "identify afresh" (NEW_SESSION, at once) rather than what the table says.

    Returns:
        The decision. Abnormal closes (None, 1006, other 1xxx) resume; unknown 4xxx codes stop.
    """
    refusal = RESUME_REFUSALS.get(code) if resuming and code is not None else None
    if refusal is not None:
        reason, refused = refusal
        return CloseDecision(_NEW, code, reason, resume_refused=refused)
    entry = CLOSE_TABLE.get(code) if code is not None else None
    if entry is not None:
        action, reason, user_message = entry
    elif code is None or code == 1006:
        action, reason, user_message = _RESUME, "connection dropped without a close frame", None
    elif 1000 < code < 4000:
        action, reason, user_message = _RESUME, f"websocket closed with {code}", None
    else:
        action, reason = _STOP, f"unknown close code {code}"
        user_message = "The voice server closed the connection."
    if action is _RESUME and not resumable:
        action = _NEW
        reason += " (no session to resume: identifying afresh)"
    return CloseDecision(action, code, reason, user_message)


# --- events ----------------------------------------------------------------------------------


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
    """The server sent something we could not use; counted in :class:`GatewayStats`."""

    reason: str
    op: int | None = None


@dataclass(frozen=True, slots=True)
class Unknown:
    """An op we do not know; counted in :class:`GatewayStats`."""

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


@dataclass(slots=True)
class GatewayStats:
    """Counters; ``malformed``/``unknown_ops``/``protocol_errors`` move on every bad input."""

    messages_received: int = 0
    malformed: int = 0
    unknown_ops: int = 0
    protocol_errors: int = 0
    heartbeats_sent: int = 0
    heartbeat_acks: int = 0
    stale_acks: int = 0
    heartbeat_timeouts: int = 0
    connects: int = 0
    resumes: int = 0
    last_rtt: float | None = None
    #: SSRC -> user entries forgotten because :data:`MAX_SSRC_USERS` was reached.
    ssrc_users_evicted: int = 0


# --- helpers ---------------------------------------------------------------------------------

_REDACTED: Final = "<redacted>"
_SECRET_KEYS: Final = frozenset({"token", "session_id", "secret_key"})
_ICE_PWD = re.compile(r"(a=ice-pwd:)\S+")
_MAX_LOG_DEPTH: Final = 32
# Heartbeat intervals above a day are nonsense (Discord sends about 13.75 s).
_MAX_INTERVAL_MS: Final = 86_400_000
#: Most SSRC -> user entries kept from op5/op12. A voice channel seldom holds more than a few
#: hundred members; a server announcing endless new SSRCs must not grow memory without bound, so
#: past this the entry seen least recently is forgotten (and counted).
MAX_SSRC_USERS: Final = 4096


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


class _Malformed(ValueError):
    """Raised inside :meth:`VoiceGatewayCore.receive` for input we cannot use."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dict(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Malformed(f"{what} is {type(value).__name__}, expected an object")
    return value


def _int(d: Mapping[str, Any], key: str, *, lo: int = 0, hi: int = 0xFFFFFFFF) -> int:
    value = d.get(key)
    if not _is_int(value):
        raise _Malformed(f"{key!r} is {type(value).__name__}, expected an integer")
    assert isinstance(value, int)
    if not lo <= value <= hi:
        raise _Malformed(f"{key!r}={value} out of range")
    return value


def _opt_int(d: Mapping[str, Any], key: str, default: int) -> int:
    if d.get(key) is None:
        return default
    return _int(d, key, lo=-(2**63), hi=2**63)


def _str(d: Mapping[str, Any], key: str) -> str:
    value = d.get(key)
    if not isinstance(value, str):
        raise _Malformed(f"{key!r} is {type(value).__name__}, expected a string")
    return value


def _opt_str(d: Mapping[str, Any], key: str) -> str | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Malformed(f"{key!r} is {type(value).__name__}, expected a string")
    return value


def _snowflake(d: Mapping[str, Any], key: str) -> str:
    """User ids arrive as strings; tolerate integers (some servers send them)."""
    value = d.get(key)
    if _is_int(value):
        assert isinstance(value, int)
        if not 0 <= value < 2**64:
            raise _Malformed(f"{key!r}={value} is not a snowflake")
        return str(value)
    return _str(d, key)


def _str_list(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Malformed(f"{what} is not a list of strings")
    return tuple(value)


# --- the core --------------------------------------------------------------------------------


class VoiceGatewayCore(ConnStateMachine):
    """The voice gateway's protocol logic, with no I/O.

    Args:
        server_id: the guild id (or DM channel id) of VOICE_SERVER_UPDATE.
        user_id: our user id.
        session_id: VOICE_STATE_UPDATE's ``session_id``.
        token: VOICE_SERVER_UPDATE's ``token``.
        version: the gateway version in the URL (``?v=``): 6 is what the capture's browser
            used; 8 adds ``seq``/``seq_ack`` and buffered resume.
        transport_name: ``"udp"`` or ``"webrtc"``.
        max_dave_protocol_version: sent in op0 when above 0.
        browser_like: identify and announce streams as the capture's browser does, and speak
            with ``delay: 5``; otherwise as discord.py does (plain op0, ``delay: 0``).
        max_missed_acks: unanswered heartbeats tolerated when the next one comes due.
        resume_supported: False for servers without op7 (Spacebar): drops start a new session.
            :meth:`closed` sets it to False when the server answers op7 with 4003.
        max_failed_connects: connects in a row that never reach READY before giving up.
    """

    def __init__(
        self,
        server_id: str,
        user_id: str,
        session_id: str,
        token: str,
        *,
        version: int = 6,
        transport_name: str = "udp",
        max_dave_protocol_version: int = 0,
        browser_like: bool = True,
        max_missed_acks: int = 1,
        resume_supported: bool = True,
        max_failed_connects: int = 5,
    ) -> None:
        super().__init__()
        if transport_name not in ("udp", "webrtc"):
            raise ValueError(f"unknown transport {transport_name!r}")
        if version < 4:
            raise ValueError("voice gateway versions below 4 are refused by Discord")
        if max_missed_acks < 1:
            raise ValueError("max_missed_acks must be at least 1")
        self.server_id = str(server_id)
        self.user_id = str(user_id)
        self.session_id = session_id
        self.token = token
        self.version = version
        self.transport_name = transport_name
        self.max_dave_protocol_version = max_dave_protocol_version
        self.browser_like = browser_like
        self.max_missed_acks = max_missed_acks
        self.resume_supported = resume_supported
        self.max_failed_connects = max_failed_connects
        self.stats = GatewayStats()
        self.log = logging.LoggerAdapter(_log, {"guild_id": self.server_id})

        self._out: list[dict[str, Any]] = []
        self._out_binary: list[bytes] = []
        self._events: list[Event] = []

        #: op2's data (kept across resumes).
        self.ready: Ready | None = None
        #: op4's data (kept across resumes).
        self.session: SessionDescription | None = None
        #: The mode we asked for in op1 (udp).
        self.selected_mode: str | None = None
        #: The highest ``seq`` seen from the server (v8), -1 if none.
        self.seq_ack = -1
        #: SSRC -> user id, from op5/op12; at most :data:`MAX_SSRC_USERS`, least recent dropped.
        self.ssrc_users: dict[int, str] = {}

        self._established = False  # a session reached READY and may be resumed
        self._resume_next = False
        self._failed_connects = 0
        self._close_request: CloseRequested | None = None
        self._speaking: bool | None = None
        #: The decision :meth:`closed` made last (None before the first close).
        self.last_decision: CloseDecision | None = None

        self.heartbeat_interval: float | None = None
        self._next_heartbeat: float | None = None
        self._unacked: dict[int, float] = {}
        self._last_nonce = 0

    # -- plumbing -----------------------------------------------------------------------------

    def _notify(self, old: ConnState, new: ConnState, reason: str) -> None:
        self._events.append(StateChanged(old, new, reason))

    def _send(self, op: int, d: Any) -> None:
        message = {"op": op, "d": d}
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("send %s", dumps(redact(message)))
        self._out.append(message)

    def _protocol_error(self, reason: str, op: int | None) -> None:
        self.stats.protocol_errors += 1
        self.log.warning("voice gateway protocol error (op %s): %s", op, reason)
        self._events.append(ProtocolError(reason, op))

    def _request_close(self, code: int, reason: str, action: CloseAction) -> None:
        if self._close_request is not None:
            return
        self._close_request = CloseRequested(code, reason, action)
        self._next_heartbeat = None
        self._events.append(self._close_request)

    def outgoing(self) -> list[dict[str, Any]]:
        """Drain the JSON messages to send, in order."""
        out, self._out = self._out, []
        return out

    def outgoing_text(self) -> list[str]:
        """Drain the JSON messages to send, serialized (compact, as the capture shows)."""
        return [dumps(m) for m in self.outgoing()]

    def outgoing_binary(self) -> list[bytes]:
        """Drain the binary messages to send (DAVE ops 26 and 28: ``[u8 op][payload]``)."""
        out, self._out_binary = self._out_binary, []
        return out

    def events(self) -> list[Event]:
        """Drain what happened since the last call, in order."""
        out, self._events = self._events, []
        return out

    @property
    def close_request(self) -> CloseRequested | None:
        """The pending request to close the websocket, if any."""
        return self._close_request

    @property
    def ssrc(self) -> int | None:
        """Our SSRC from op2, once known."""
        return self.ready.ssrc if self.ready else None

    # -- shell calls --------------------------------------------------------------------------

    def connected(self, now: float, resume: bool = False) -> None:
        """The websocket is open; op0 (or op7) is queued as soon as op8 Hello arrives.

        Args:
            now: the current time (seconds, monotonic).
            resume: resume the previous session; ignored (identify instead) when there is no
                established session or the server cannot resume.
        """
        self.stats.connects += 1
        self._failed_connects += 1
        self._close_request = None
        self._unacked.clear()
        self._next_heartbeat = None
        self._speaking = None
        can_resume = self._established and self.resume_supported
        if resume and not can_resume:
            self.log.info("no session to resume; identifying afresh")
        self._resume_next = resume and can_resume
        if not self._resume_next:
            self._forget_session()
        self._transition(ConnState.AWAITING_HELLO, reason="websocket open")

    def _forget_session(self) -> None:
        self._established = False
        self.seq_ack = -1
        self.ready = None
        self.session = None
        self.selected_mode = None

    def _identify(self) -> None:
        d: dict[str, Any] = {
            "server_id": self.server_id,
            "user_id": self.user_id,
            "session_id": self.session_id,
            "token": self.token,
        }
        if self.browser_like:
            d["video"] = True
            d["streams"] = [dict(s) for s in _BROWSER_STREAMS]
        if self.max_dave_protocol_version > 0:
            d["max_dave_protocol_version"] = self.max_dave_protocol_version
        self._send(OP_IDENTIFY, d)
        self._transition(ConnState.AWAITING_READY, reason="identify sent")

    def _resume(self) -> None:
        d: dict[str, Any] = {
            "server_id": self.server_id,
            "session_id": self.session_id,
            "token": self.token,
        }
        if self.version >= 8:
            d["seq_ack"] = self.seq_ack
        self.stats.resumes += 1
        self._send(OP_RESUME, d)
        self._transition(ConnState.RESUMING, reason="resume sent")

    def select_protocol(self, d: Mapping[str, Any]) -> bool:
        """Queue op1 from the transport's half (:meth:`Transport.prepare`'s result).

        ``udp``: ``{"protocol": "udp", "data": {"address", "port", "mode"}}``; the mode must
        be one op2 offered. ``webrtc``: the SDP fragment goes into both ``data`` and ``sdp``
        (Spacebar reads ``sdp``); ``codecs`` and ``rtc_connection_id`` are filled in if absent.

        Returns:
            False (and nothing queued) when the connection is no longer waiting for op1, e.g.
            the socket dropped during IP discovery.

        Raises:
            ValueError: the payload does not fit the transport (a bug in the caller).
        """
        if self._state is not ConnState.SELECTING_PROTOCOL:
            self.log.info("op1 not sent: state is %s", self._state.name)
            return False
        protocol = d.get("protocol", self.transport_name)
        if protocol != self.transport_name:
            raise ValueError(f"op1 protocol {protocol!r} on a {self.transport_name} connection")
        out: dict[str, Any] = {"protocol": protocol}
        if protocol == "udp":
            data = d.get("data")
            if not isinstance(data, Mapping) or not all(
                k in data for k in ("address", "port", "mode")
            ):
                raise ValueError("udp op1 needs data with address, port and mode")
            mode = data["mode"]
            offered = self.ready.modes if self.ready else ()
            if offered and mode not in offered:
                raise ValueError(f"mode {mode!r} was not offered (offered: {list(offered)})")
            self.selected_mode = str(mode)
            out["data"] = {"address": data["address"], "port": data["port"], "mode": mode}
            out.update({k: v for k, v in d.items() if k not in ("protocol", "data")})
        else:
            fragment = d.get("sdp", d.get("data"))
            if not isinstance(fragment, str):
                raise ValueError("webrtc op1 needs the SDP fragment in data or sdp")
            out["data"] = fragment
            out["sdp"] = fragment
            out["codecs"] = d.get("codecs") or [dict(c) for c in DEFAULT_WEBRTC_CODECS]
            out["rtc_connection_id"] = d.get("rtc_connection_id") or str(uuid.uuid4())
            out.update(
                {
                    k: v
                    for k, v in d.items()
                    if k not in ("protocol", "data", "sdp", "codecs", "rtc_connection_id")
                }
            )
        self._send(OP_SELECT_PROTOCOL, out)
        self._transition(ConnState.AWAITING_SESSION, reason=f"select protocol {protocol}")
        return True

    def _can_send(self) -> bool:
        return self._state in _SOCKET_OPEN and self._close_request is None

    def announce_streams(self, audio_ssrc: int, *, video_ssrc: int = 0, rtx_ssrc: int = 0) -> bool:
        """Queue op12 announcing our SSRCs (the capture's shape when ``browser_like``).

        Spacebar only publishes our audio on op12, and drops one sent long before DTLS is up:
        send it again once the transport is started.

        Returns:
            False when the socket is not open (nothing queued).
        """
        if not self._can_send():
            return False
        streams = [copy.deepcopy(_BROWSER_ANNOUNCE)] if self.browser_like else []
        self._send(
            OP_VIDEO,
            {
                "audio_ssrc": audio_ssrc,
                "video_ssrc": video_ssrc,
                "rtx_ssrc": rtx_ssrc,
                "streams": streams,
            },
        )
        return True

    def speaking(
        self, on: bool, ssrc: int | None = None, *, flags: int = SPEAKING_MICROPHONE
    ) -> bool:
        """Queue op5 ``{speaking, delay, ssrc}`` if the state changed.

        Args:
            on: speaking or not.
            ssrc: our SSRC; defaults to op2's.
            flags: the bitmask when ``on`` (1 microphone, 2 soundshare, 4 priority).

        Returns:
            False when nothing was queued (socket not open, no SSRC, or no change).
        """
        ssrc = self.ssrc if ssrc is None else ssrc
        if not self._can_send() or ssrc is None or self._speaking is on:
            return False
        self._speaking = on
        # The browser in the capture sends delay 5; discord.py sends 0.
        delay = 5 if self.browser_like else 0
        self._send(OP_SPEAKING, {"speaking": flags if on else 0, "delay": delay, "ssrc": ssrc})
        return True

    def request_backend_version(self) -> bool:
        """Queue op16 ``{}`` (the capture sends it right after op2)."""
        if not self._can_send():
            return False
        self._send(OP_BACKEND_VERSION, {})
        return True

    def send(self, op: int, d: Any) -> bool:
        """Queue any JSON op (DAVE ops 23, 31...) while the socket is open."""
        if not self._can_send():
            return False
        self._send(op, d)
        return True

    def send_binary(self, op: int, payload: bytes) -> bool:
        """Queue a binary op (DAVE 26, 28): ``[u8 op][payload]``."""
        if not self._can_send() or not 0 <= op <= 255:
            return False
        self._out_binary.append(bytes([op]) + bytes(payload))
        return True

    def new_server(self, token: str, *, session_id: str | None = None) -> None:
        """A VOICE_SERVER_UPDATE (or a new session id) arrived: the next connect identifies."""
        self.token = token
        if session_id is not None:
            self.session_id = session_id
        self._forget_session()
        self._failed_connects = 0

    def close(self, reason: str = "leaving") -> None:
        """We are leaving: the connection ends for good (the shell closes with 1000)."""
        self._next_heartbeat = None
        if self._state is not ConnState.CLOSED:
            self._transition(ConnState.CLOSED, reason=reason)

    def closed(self, code: int | None, reason: str = "") -> CloseDecision:
        """The websocket closed: decide what to do (:data:`CLOSE_TABLE`).

        Args:
            code: the close code, None if the connection dropped without one.
            reason: the close frame's reason, for the log.

        Returns:
            The decision; the state becomes DISCONNECTED, or CLOSED when it is STOP.
        """
        self._next_heartbeat = None
        self._unacked.clear()
        requested, self._close_request = self._close_request, None
        if self._state is ConnState.CLOSED:
            decision = CloseDecision(CloseAction.STOP, code, "closed by us")
        elif requested is not None:
            action = requested.action
            if action is CloseAction.RESUME and not (self._established and self.resume_supported):
                action = CloseAction.NEW_SESSION
            decision = CloseDecision(
                action, code, requested.reason, _BUG if action is CloseAction.STOP else None
            )
        else:
            decision = close_policy(
                code,
                resumable=self._established and self.resume_supported,
                resuming=self._state is ConnState.RESUMING,
            )
            if decision.resume_refused and self.resume_supported:
                self.resume_supported = False
                self.log.warning("the voice server refused op7 Resume: resume is off toward it")
        if (
            decision.action in (CloseAction.RESUME, CloseAction.NEW_SESSION)
            and self._failed_connects >= self.max_failed_connects
        ):
            decision = CloseDecision(
                CloseAction.STOP,
                code,
                f"gave up after {self._failed_connects} connects without a session "
                f"({decision.reason})",
                "I could not connect to the voice channel.",
            )
        if decision.action is CloseAction.NEW_SESSION:
            self._forget_session()
        self.last_decision = decision
        self.log.info(
            "voice websocket closed (%s%s): %s -> %s",
            code,
            f" {reason}" if reason else "",
            decision.reason,
            decision.action.name,
        )
        if self._state is not ConnState.CLOSED:
            target = (
                ConnState.CLOSED if decision.action is CloseAction.STOP else ConnState.DISCONNECTED
            )
            if self._state is not target:
                self._transition(target, reason=decision.reason)
        return decision

    # -- time ---------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has work (the next heartbeat), or None."""
        return self._next_heartbeat

    def tick(self, now: float) -> None:
        """Send the heartbeat if due, or declare the link dead if the last went unanswered."""
        due = self._next_heartbeat
        if due is None or now < due or self.heartbeat_interval is None:
            return
        if len(self._unacked) >= self.max_missed_acks:
            since = min(self._unacked.values())
            self.stats.heartbeat_timeouts += 1
            self.log.warning("no heartbeat ACK for %.1f s: dropping the link", now - since)
            self._events.append(HeartbeatTimeout(len(self._unacked), since))
            self._request_close(CLOSE_RECONNECT, "heartbeat ACK missed", CloseAction.RESUME)
            return
        nonce = max(int(now * 1000), self._last_nonce + 1)
        self._last_nonce = nonce
        self._unacked[nonce] = now
        if self.version >= 8:
            self._send(OP_HEARTBEAT, {"t": nonce, "seq_ack": self.seq_ack})
        else:
            self._send(OP_HEARTBEAT, nonce)
        self.stats.heartbeats_sent += 1
        # Absolute deadlines; after a stall, skip to the next future slot instead of bursting.
        nxt = due + self.heartbeat_interval
        self._next_heartbeat = nxt if nxt > now else now + self.heartbeat_interval

    # -- input --------------------------------------------------------------------------------

    def receive_text(self, text: str, now: float) -> None:
        """Feed one text frame. Never raises; bad JSON is counted and reported."""
        try:
            payload = json.loads(text)
        except (ValueError, RecursionError) as exc:
            self.stats.messages_received += 1
            self.stats.malformed += 1
            self._protocol_error(f"invalid JSON: {type(exc).__name__}", None)
            return
        self.receive(payload, now)

    def receive_binary(self, data: bytes, now: float) -> None:
        """Feed one binary frame (v8 DAVE: ``[u16 seq][u8 op][payload]``). Never raises."""
        self.stats.messages_received += 1
        if len(data) < 3:
            self.stats.malformed += 1
            self._protocol_error(f"binary message of {len(data)} bytes", None)
            return
        seq = int.from_bytes(data[:2], "big")
        op = data[2]
        if self.version >= 8:
            self.seq_ack = seq
        if op in DAVE_BINARY_OPS:
            self._events.append(DaveBinary(op, bytes(data[3:])))
        else:
            self.stats.unknown_ops += 1
            self._events.append(Unknown(op, bytes(data[3:])))

    def receive(self, payload: object, now: float) -> None:
        """Feed one decoded JSON message. Never raises; bad input is counted and reported."""
        self.stats.messages_received += 1
        op: int | None = None
        try:
            message = _dict(payload, "message")
            raw_op = message.get("op")
            if not _is_int(raw_op):
                raise _Malformed(f"op is {type(raw_op).__name__}, expected an integer")
            assert isinstance(raw_op, int)
            op = raw_op
            if self.version >= 8 and message.get("seq") is not None:
                self.seq_ack = _int(message, "seq", lo=0, hi=2**63)
            if self.log.isEnabledFor(logging.DEBUG):
                self.log.debug("recv %s", dumps(redact(message)))
            self._dispatch(op, message.get("d"), now)
        except _Malformed as exc:
            self.stats.malformed += 1
            self._protocol_error(f"malformed op {op}: {exc}", op)

    def _dispatch(self, op: int, d: Any, now: float) -> None:
        handler = _HANDLERS.get(op)
        if handler is not None:
            handler(self, d, now)
        elif op in DAVE_JSON_OPS:
            self._events.append(DaveMessage(op, d))
        else:
            self.stats.unknown_ops += 1
            self.log.debug("unknown op %d", op)
            self._events.append(Unknown(op, d))

    def _unexpected(self, op: int) -> None:
        self._protocol_error(f"op {op} unexpected in state {self._state.name}", op)

    def _on_hello(self, d: Any, now: float) -> None:
        d = _dict(d, "hello")
        interval = d.get("heartbeat_interval")
        if (
            not isinstance(interval, int | float)
            or isinstance(interval, bool)
            or not math.isfinite(interval)
            or not 0 < interval <= _MAX_INTERVAL_MS
        ):
            raise _Malformed(f"heartbeat_interval {interval!r} is not a positive number")
        version = d.get("v")
        self.heartbeat_interval = interval / 1000.0
        if self._state in _SOCKET_OPEN or self._state is ConnState.AWAITING_HELLO:
            self._next_heartbeat = now + self.heartbeat_interval
        self._events.append(Hello(self.heartbeat_interval, version if _is_int(version) else None))
        if self._state is ConnState.AWAITING_HELLO:
            if self._resume_next:
                self._resume()
            else:
                self._identify()

    def _on_ready(self, d: Any, now: float) -> None:
        if self._state is not ConnState.AWAITING_READY:
            self._unexpected(OP_READY)
            return
        try:
            d = _dict(d, "ready")
            ssrc = _int(d, "ssrc")
            if self.transport_name == "udp":
                ip = _str(d, "ip")
                port = _int(d, "port", hi=0xFFFF)
                modes = _str_list(d.get("modes"), "modes")
            else:  # webrtc servers may omit the udp fields (Spacebar sends them empty)
                ip = _opt_str(d, "ip") or ""
                port = _int(d, "port", hi=0xFFFF) if d.get("port") is not None else 0
                modes = _str_list(d.get("modes") or [], "modes")
            streams = d.get("streams") or []
            if not isinstance(streams, list) or not all(isinstance(s, dict) for s in streams):
                raise _Malformed("streams is not a list of objects")
            experiments = d.get("experiments") or []
            experiments_t = _str_list(experiments, "experiments")
        except _Malformed as exc:
            self.stats.malformed += 1
            reason = f"invalid op2 Ready: {exc}"
            self._protocol_error(reason, OP_READY)
            self._request_close(CLOSE_PROTOCOL_ERROR, reason, CloseAction.STOP)
            return
        self.ready = Ready(ssrc, ip, port, modes, tuple(streams), experiments_t, d)
        self._transition(ConnState.SELECTING_PROTOCOL, reason="ready")
        self._events.append(self.ready)

    def _on_session_description(self, d: Any, now: float) -> None:
        if self._state not in (ConnState.AWAITING_SESSION, ConnState.READY):
            self._unexpected(OP_SESSION_DESCRIPTION)
            return
        try:
            d = _dict(d, "session description")
            mode = _opt_str(d, "mode")
            key: bytes | None = None
            sdp = _opt_str(d, "sdp")
            if self.transport_name == "udp":
                if mode != self.selected_mode:
                    reason = f"server chose mode {mode!r}, we selected {self.selected_mode!r}"
                    self._protocol_error(reason, OP_SESSION_DESCRIPTION)
                    self._request_close(CLOSE_UNKNOWN_MODE, reason, CloseAction.STOP)
                    return
                raw_key = d.get("secret_key")
                if (
                    not isinstance(raw_key, list)
                    or len(raw_key) != 32
                    or not all(_is_int(b) and 0 <= b <= 255 for b in raw_key)
                ):
                    raise _Malformed("secret_key is not 32 bytes")
                key = bytes(raw_key)
            elif sdp is None:
                raise _Malformed("webrtc op4 has no sdp")
            session = SessionDescription(
                mode=mode,
                secret_key=key,
                sdp=sdp,
                audio_codec=_opt_str(d, "audio_codec"),
                video_codec=_opt_str(d, "video_codec"),
                media_session_id=_opt_str(d, "media_session_id"),
                dave_protocol_version=_opt_int(d, "dave_protocol_version", 0),
                data=d,
            )
        except _Malformed as exc:
            self.stats.malformed += 1
            reason = f"invalid op4 Session Description: {exc}"
            self._protocol_error(reason, OP_SESSION_DESCRIPTION)
            self._request_close(CLOSE_PROTOCOL_ERROR, reason, CloseAction.STOP)
            return
        self.session = session
        if self._state is ConnState.AWAITING_SESSION:
            self._established = True
            self._failed_connects = 0
            self._transition(ConnState.READY, reason="session description")
        self._events.append(session)

    def _on_resumed(self, d: Any, now: float) -> None:
        if self._state is not ConnState.RESUMING:
            self._unexpected(OP_RESUMED)
            return
        self._failed_connects = 0
        self._transition(ConnState.READY, reason="resumed")
        self._events.append(Resumed())

    def _on_heartbeat_ack(self, d: Any, now: float) -> None:
        nonce: object = d.get("t") if isinstance(d, dict) else d
        rtt: float | None = None
        if nonce is None:
            # No nonce to match: any ACK still proves the link is alive.
            acked = bool(self._unacked)
            self._unacked.clear()
        elif not _is_int(nonce):
            raise _Malformed(f"heartbeat ACK nonce {type(nonce).__name__}")
        else:
            assert isinstance(nonce, int)
            sent = self._unacked.get(nonce)
            acked = sent is not None
            if sent is not None:
                rtt = now - sent
                # An ACK for a later heartbeat answers the earlier ones too.
                self._unacked = {n: t for n, t in self._unacked.items() if n > nonce}
        if not acked:
            self.stats.stale_acks += 1
            return
        self.stats.heartbeat_acks += 1
        if rtt is not None:
            self.stats.last_rtt = rtt
        self._events.append(HeartbeatAck(rtt))

    def _on_speaking(self, d: Any, now: float) -> None:
        d = _dict(d, "speaking")
        ssrc = _int(d, "ssrc")
        speaking = d.get("speaking")
        if isinstance(speaking, bool):
            speaking = int(speaking)
        if not _is_int(speaking):
            raise _Malformed("speaking is not an integer")
        user_id = _snowflake(d, "user_id") if d.get("user_id") is not None else None
        if user_id is not None:
            self._remember_ssrc(ssrc, user_id)
        self._events.append(SpeakingSeen(user_id, ssrc, speaking))

    def _on_video(self, d: Any, now: float) -> None:
        d = _dict(d, "video")
        user_id = _snowflake(d, "user_id") if d.get("user_id") is not None else None
        audio = _opt_int(d, "audio_ssrc", 0)
        video = _opt_int(d, "video_ssrc", 0)
        if user_id is not None and 0 < audio <= 0xFFFFFFFF:
            self._remember_ssrc(audio, user_id)
        self._events.append(StreamsSeen(user_id, audio, video, d))

    def _remember_ssrc(self, ssrc: int, user_id: str) -> None:
        # Re-inserted so the dict's order is least recently seen first: eviction takes the head.
        self.ssrc_users.pop(ssrc, None)
        self.ssrc_users[ssrc] = user_id
        while len(self.ssrc_users) > MAX_SSRC_USERS:
            del self.ssrc_users[next(iter(self.ssrc_users))]
            self.stats.ssrc_users_evicted += 1

    def _on_clients_connect(self, d: Any, now: float) -> None:
        d = _dict(d, "clients connect")
        ids = d.get("user_ids")
        if not isinstance(ids, list) or not all(isinstance(u, str) or _is_int(u) for u in ids):
            raise _Malformed("user_ids is not a list of ids")
        self._events.append(ClientsConnected(tuple(str(u) for u in ids)))

    def _on_client_disconnect(self, d: Any, now: float) -> None:
        d = _dict(d, "client disconnect")
        user_id = _snowflake(d, "user_id")
        self.ssrc_users = {s: u for s, u in self.ssrc_users.items() if u != user_id}
        self._events.append(ClientDisconnected(user_id))

    def _on_session_update(self, d: Any, now: float) -> None:
        self._events.append(SessionUpdate(_dict(d, "session update")))

    def _on_media_sink_wants(self, d: Any, now: float) -> None:
        d = _dict(d, "media sink wants")
        wants: dict[str, int] = {}
        for key, value in d.items():
            if not _is_int(value):
                raise _Malformed(f"media sink quality for {key!r} is not an integer")
            wants[str(key)] = value
        self._events.append(MediaSinkWants(wants))

    def _on_backend_version(self, d: Any, now: float) -> None:
        d = _dict(d, "backend version")
        self._events.append(BackendVersion(_opt_str(d, "voice"), _opt_str(d, "rtc_worker")))

    def _on_client_flags(self, d: Any, now: float) -> None:
        d = _dict(d, "client flags")
        self._events.append(ClientFlags(_snowflake(d, "user_id"), _opt_int(d, "flags", 0)))

    def _on_client_platform(self, d: Any, now: float) -> None:
        d = _dict(d, "client platform")
        self._events.append(ClientPlatform(_snowflake(d, "user_id"), _opt_int(d, "platform", 0)))


_HANDLERS: Final = {
    OP_HELLO: VoiceGatewayCore._on_hello,
    OP_READY: VoiceGatewayCore._on_ready,
    OP_SESSION_DESCRIPTION: VoiceGatewayCore._on_session_description,
    OP_RESUMED: VoiceGatewayCore._on_resumed,
    OP_HEARTBEAT_ACK: VoiceGatewayCore._on_heartbeat_ack,
    OP_SPEAKING: VoiceGatewayCore._on_speaking,
    OP_VIDEO: VoiceGatewayCore._on_video,
    OP_CLIENTS_CONNECT: VoiceGatewayCore._on_clients_connect,
    OP_CLIENT_DISCONNECT: VoiceGatewayCore._on_client_disconnect,
    OP_SESSION_UPDATE: VoiceGatewayCore._on_session_update,
    OP_MEDIA_SINK_WANTS: VoiceGatewayCore._on_media_sink_wants,
    OP_BACKEND_VERSION: VoiceGatewayCore._on_backend_version,
    OP_CLIENT_FLAGS: VoiceGatewayCore._on_client_flags,
    OP_CLIENT_PLATFORM: VoiceGatewayCore._on_client_platform,
}
