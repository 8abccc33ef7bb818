"""The voice gateway protocol as a sans-I/O core (the python-websockets shape, STYLE.md §2).

:class:`VoiceGatewayCore` takes what arrives (:meth:`~VoiceGatewayCore.receive_text`,
:meth:`~VoiceGatewayCore.receive_binary`), the passing of time (:meth:`~VoiceGatewayCore.tick`)
and the shell's requests (:meth:`~VoiceGatewayCore.connected`,
:meth:`~VoiceGatewayCore.select_protocol`, :meth:`~VoiceGatewayCore.speaking`...), and buffers
what to send (:meth:`~VoiceGatewayCore.outgoing`) and what happened
(:meth:`~VoiceGatewayCore.events`, the dataclasses of :mod:`legato.voice.events`). The asyncio
shell moves the bytes, sleeps until :meth:`~VoiceGatewayCore.next_deadline`, and acts on
:class:`~legato.voice.events.CloseRequested` and on the :class:`~legato.voice.close.CloseDecision`
that :meth:`~VoiceGatewayCore.closed` returns (:mod:`legato.voice.close` holds the close-code
table and the reconnect policy). Its state is one :class:`~legato.lifecycle.Lifecycle` over
:class:`~legato.voice.state.ConnState`. Time is always passed in.

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
import json
import logging
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from legato.lifecycle import Lifecycle
from legato.voice.close import (
    BUG_MESSAGE,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_RECONNECT,
    CLOSE_UNKNOWN_MODE,
    CloseAction,
    CloseDecision,
    close_policy,
)
from legato.voice.events import (
    BackendVersion,
    ClientDisconnected,
    ClientFlags,
    ClientPlatform,
    ClientsConnected,
    CloseRequested,
    DaveBinary,
    DaveMessage,
    Event,
    HeartbeatAck,
    HeartbeatTimeout,
    Hello,
    MediaSinkWants,
    ProtocolError,
    Ready,
    Resumed,
    SessionDescription,
    SessionUpdate,
    SpeakingSeen,
    StateChanged,
    StreamsSeen,
    Unknown,
)
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
    Malformed,
    StreamAnnounce,
    StreamRequest,
    as_object,
    dumps,
    is_int,
    read_int,
    read_opt_int,
    read_opt_str,
    read_snowflake,
    read_str,
    read_str_list,
    redact,
)
from legato.voice.state import TRANSITIONS, ConnState

__all__ = [
    "DEFAULT_WEBRTC_CODECS",
    "MAX_SSRC_USERS",
    "SPEAKING_MICROPHONE",
    "SPEAKING_PRIORITY",
    "SPEAKING_SOUNDSHARE",
    "GatewayStats",
    "VoiceGatewayCore",
    "dumps",
    "redact",
]

_log = logging.getLogger(__name__)

SPEAKING_MICROPHONE: Final = 1
SPEAKING_SOUNDSHARE: Final = 2
SPEAKING_PRIORITY: Final = 4


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


# Heartbeat intervals above a day are nonsense (Discord sends about 13.75 s).
_MAX_INTERVAL_MS: Final = 86_400_000
#: Most SSRC -> user entries kept from op5/op12. A voice channel seldom holds more than a few
#: hundred members; a server announcing endless new SSRCs must not grow memory without bound, so
#: past this the entry seen least recently is forgotten (and counted).
MAX_SSRC_USERS: Final = 4096


# --- the core --------------------------------------------------------------------------------


class VoiceGatewayCore:
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
    ) -> None:
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
        self.stats = GatewayStats()
        self.log = logging.LoggerAdapter(_log, {"guild_id": self.server_id})
        #: The connection's state; every move queues a :class:`StateChanged` event.
        self.lifecycle = Lifecycle(
            ConnState.DISCONNECTED, TRANSITIONS, on_change=self._notify, log=self.log
        )

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
    def state(self) -> ConnState:
        """The connection's state (:attr:`lifecycle` holds it)."""
        return self.lifecycle.state

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
        self.lifecycle.move(ConnState.AWAITING_HELLO, reason="websocket open")

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
        self.lifecycle.move(ConnState.AWAITING_READY, reason="identify sent")

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
        self.lifecycle.move(ConnState.RESUMING, reason="resume sent")

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
        if self.state is not ConnState.SELECTING_PROTOCOL:
            self.log.info("op1 not sent: state is %s", self.state.name)
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
        self.lifecycle.move(ConnState.AWAITING_SESSION, reason=f"select protocol {protocol}")
        return True

    def _can_send(self) -> bool:
        return self.state in _SOCKET_OPEN and self._close_request is None

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

    def close(self, reason: str = "leaving") -> None:
        """We are leaving: the connection ends for good (the shell closes with 1000)."""
        self._next_heartbeat = None
        if self.state is not ConnState.CLOSED:
            self.lifecycle.move(ConnState.CLOSED, reason=reason)

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
        if self.state is ConnState.CLOSED:
            decision = CloseDecision(CloseAction.STOP, code, "closed by us")
        elif requested is not None:
            action = requested.action
            if action is CloseAction.RESUME and not (self._established and self.resume_supported):
                action = CloseAction.NEW_SESSION
            decision = CloseDecision(
                action, code, requested.reason, BUG_MESSAGE if action is CloseAction.STOP else None
            )
        else:
            decision = close_policy(
                code,
                resumable=self._established and self.resume_supported,
                resuming=self.state is ConnState.RESUMING,
            )
            if decision.resume_refused and self.resume_supported:
                self.resume_supported = False
                self.log.warning("the voice server refused op7 Resume: resume is off toward it")
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
        if self.state is not ConnState.CLOSED:
            target = (
                ConnState.CLOSED if decision.action is CloseAction.STOP else ConnState.DISCONNECTED
            )
            if self.state is not target:
                self.lifecycle.move(target, reason=decision.reason)
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
            message = as_object(payload, "message")
            raw_op = message.get("op")
            if not is_int(raw_op):
                raise Malformed(f"op is {type(raw_op).__name__}, expected an integer")
            assert isinstance(raw_op, int)
            op = raw_op
            if self.version >= 8 and message.get("seq") is not None:
                self.seq_ack = read_int(message, "seq", lo=0, hi=2**63)
            if self.log.isEnabledFor(logging.DEBUG):
                self.log.debug("recv %s", dumps(redact(message)))
            self._dispatch(op, message.get("d"), now)
        except Malformed as exc:
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
        self._protocol_error(f"op {op} unexpected in state {self.state.name}", op)

    def _on_hello(self, d: Any, now: float) -> None:
        d = as_object(d, "hello")
        interval = d.get("heartbeat_interval")
        if (
            not isinstance(interval, int | float)
            or isinstance(interval, bool)
            or not math.isfinite(interval)
            or not 0 < interval <= _MAX_INTERVAL_MS
        ):
            raise Malformed(f"heartbeat_interval {interval!r} is not a positive number")
        version = d.get("v")
        self.heartbeat_interval = interval / 1000.0
        if self.state in _SOCKET_OPEN or self.state is ConnState.AWAITING_HELLO:
            self._next_heartbeat = now + self.heartbeat_interval
        self._events.append(Hello(self.heartbeat_interval, version if is_int(version) else None))
        if self.state is ConnState.AWAITING_HELLO:
            if self._resume_next:
                self._resume()
            else:
                self._identify()

    def _on_ready(self, d: Any, now: float) -> None:
        if self.state is not ConnState.AWAITING_READY:
            self._unexpected(OP_READY)
            return
        try:
            d = as_object(d, "ready")
            ssrc = read_int(d, "ssrc")
            if self.transport_name == "udp":
                ip = read_str(d, "ip")
                port = read_int(d, "port", hi=0xFFFF)
                modes = read_str_list(d.get("modes"), "modes")
            else:  # webrtc servers may omit the udp fields (Spacebar sends them empty)
                ip = read_opt_str(d, "ip") or ""
                port = read_int(d, "port", hi=0xFFFF) if d.get("port") is not None else 0
                modes = read_str_list(d.get("modes") or [], "modes")
            streams = d.get("streams") or []
            if not isinstance(streams, list) or not all(isinstance(s, dict) for s in streams):
                raise Malformed("streams is not a list of objects")
            experiments = d.get("experiments") or []
            experiments_t = read_str_list(experiments, "experiments")
        except Malformed as exc:
            self.stats.malformed += 1
            reason = f"invalid op2 Ready: {exc}"
            self._protocol_error(reason, OP_READY)
            self._request_close(CLOSE_PROTOCOL_ERROR, reason, CloseAction.STOP)
            return
        self.ready = Ready(ssrc, ip, port, modes, tuple(streams), experiments_t, d)
        self.lifecycle.move(ConnState.SELECTING_PROTOCOL, reason="ready")
        self._events.append(self.ready)

    def _on_session_description(self, d: Any, now: float) -> None:
        if self.state not in (ConnState.AWAITING_SESSION, ConnState.READY):
            self._unexpected(OP_SESSION_DESCRIPTION)
            return
        try:
            d = as_object(d, "session description")
            mode = read_opt_str(d, "mode")
            key: bytes | None = None
            sdp = read_opt_str(d, "sdp")
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
                    or not all(is_int(b) and 0 <= b <= 255 for b in raw_key)
                ):
                    raise Malformed("secret_key is not 32 bytes")
                key = bytes(raw_key)
            elif sdp is None:
                raise Malformed("webrtc op4 has no sdp")
            session = SessionDescription(
                mode=mode,
                secret_key=key,
                sdp=sdp,
                audio_codec=read_opt_str(d, "audio_codec"),
                video_codec=read_opt_str(d, "video_codec"),
                media_session_id=read_opt_str(d, "media_session_id"),
                dave_protocol_version=read_opt_int(d, "dave_protocol_version", 0),
                data=d,
            )
        except Malformed as exc:
            self.stats.malformed += 1
            reason = f"invalid op4 Session Description: {exc}"
            self._protocol_error(reason, OP_SESSION_DESCRIPTION)
            self._request_close(CLOSE_PROTOCOL_ERROR, reason, CloseAction.STOP)
            return
        self.session = session
        if self.state is ConnState.AWAITING_SESSION:
            self._established = True
            self.lifecycle.move(ConnState.READY, reason="session description")
        self._events.append(session)

    def _on_resumed(self, d: Any, now: float) -> None:
        if self.state is not ConnState.RESUMING:
            self._unexpected(OP_RESUMED)
            return
        self.lifecycle.move(ConnState.READY, reason="resumed")
        self._events.append(Resumed())

    def _on_heartbeat_ack(self, d: Any, now: float) -> None:
        nonce: object = d.get("t") if isinstance(d, dict) else d
        rtt: float | None = None
        if nonce is None:
            # No nonce to match: any ACK still proves the link is alive.
            acked = bool(self._unacked)
            self._unacked.clear()
        elif not is_int(nonce):
            raise Malformed(f"heartbeat ACK nonce {type(nonce).__name__}")
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
        d = as_object(d, "speaking")
        ssrc = read_int(d, "ssrc")
        speaking = d.get("speaking")
        if isinstance(speaking, bool):
            speaking = int(speaking)
        if not is_int(speaking):
            raise Malformed("speaking is not an integer")
        user_id = read_snowflake(d, "user_id") if d.get("user_id") is not None else None
        if user_id is not None:
            self._remember_ssrc(ssrc, user_id)
        self._events.append(SpeakingSeen(user_id, ssrc, speaking))

    def _on_video(self, d: Any, now: float) -> None:
        d = as_object(d, "video")
        user_id = read_snowflake(d, "user_id") if d.get("user_id") is not None else None
        audio = read_opt_int(d, "audio_ssrc", 0)
        video = read_opt_int(d, "video_ssrc", 0)
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
        d = as_object(d, "clients connect")
        ids = d.get("user_ids")
        if not isinstance(ids, list) or not all(isinstance(u, str) or is_int(u) for u in ids):
            raise Malformed("user_ids is not a list of ids")
        self._events.append(ClientsConnected(tuple(str(u) for u in ids)))

    def _on_client_disconnect(self, d: Any, now: float) -> None:
        d = as_object(d, "client disconnect")
        user_id = read_snowflake(d, "user_id")
        self.ssrc_users = {s: u for s, u in self.ssrc_users.items() if u != user_id}
        self._events.append(ClientDisconnected(user_id))

    def _on_session_update(self, d: Any, now: float) -> None:
        self._events.append(SessionUpdate(as_object(d, "session update")))

    def _on_media_sink_wants(self, d: Any, now: float) -> None:
        d = as_object(d, "media sink wants")
        wants: dict[str, int] = {}
        for key, value in d.items():
            if not is_int(value):
                raise Malformed(f"media sink quality for {key!r} is not an integer")
            wants[str(key)] = value
        self._events.append(MediaSinkWants(wants))

    def _on_backend_version(self, d: Any, now: float) -> None:
        d = as_object(d, "backend version")
        self._events.append(BackendVersion(read_opt_str(d, "voice"), read_opt_str(d, "rtc_worker")))

    def _on_client_flags(self, d: Any, now: float) -> None:
        d = as_object(d, "client flags")
        self._events.append(ClientFlags(read_snowflake(d, "user_id"), read_opt_int(d, "flags", 0)))

    def _on_client_platform(self, d: Any, now: float) -> None:
        d = as_object(d, "client platform")
        self._events.append(
            ClientPlatform(read_snowflake(d, "user_id"), read_opt_int(d, "platform", 0))
        )


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
