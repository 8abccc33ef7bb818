"""What the sandbox voice server knows about its users: options, sessions, connections, events.

The rooms of :class:`~legato.sandbox.voice.SandboxVoiceServer` share this module's types:

- :class:`ServerOptions`: the validated constructor options, frozen;
- :class:`Connection`: one websocket, with the two ways to write on it (``send_raw``, ``close``);
- :class:`Session`: one user's voice session, which outlives a dropped connection; its messages
  are buffered (and, in v8, sequenced) for a resume (``send``, ``send_frame``);
- :class:`SessionTable`: tokens, sessions, recordings, the SSRC index and the event log, with the
  lookups every room makes;
- the public records a test reads: :class:`ServerStats`, :class:`VoiceEvent`,
  :class:`SentReport`, :class:`SessionInfo`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from legato.sandbox.crypto import PacketDecryptor
from legato.sandbox.dave_listener import ListenerRole
from legato.sandbox.profiles import VoiceProfile
from legato.sandbox.recording import Recording, Waiters
from legato.sandbox.relay import RelayOptions
from legato.voice.crypto import SUPPORTED_MODES
from legato.voice.rtp import ReportBlock

_log = logging.getLogger(__name__)

#: Offered in op2, in Discord's order of preference.
DEFAULT_MODES: Final = ("aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize")
MIN_VERSION: Final = 4
MAX_VERSION: Final = 8
#: Discord's voice servers ask for 13.75 s.
DEFAULT_HEARTBEAT_INTERVAL: Final = 13.75
DEFAULT_RTCP_INTERVAL: Final = 1.0
_REPLAY_BUFFER: Final = 256

# Close codes (PROTOCOL.md; discord-api-docs "Voice Close Event Codes").
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_UNKNOWN_OPCODE: Final = 4001
CLOSE_DECODE_ERROR: Final = 4002
CLOSE_NOT_AUTHENTICATED: Final = 4003
CLOSE_AUTHENTICATION_FAILED: Final = 4004
CLOSE_ALREADY_AUTHENTICATED: Final = 4005
CLOSE_SESSION_INVALID: Final = 4006
CLOSE_SESSION_TIMEOUT: Final = 4009
CLOSE_UNKNOWN_PROTOCOL: Final = 4012
CLOSE_DISCONNECTED: Final = 4014
CLOSE_SERVER_CRASHED: Final = 4015
CLOSE_UNKNOWN_MODE: Final = 4016
CLOSE_DAVE_REQUIRED: Final = 4017
CLOSE_BAD_REQUEST: Final = 4020
CLOSE_CALL_TERMINATED: Final = 4022

#: Server closes after which the session cannot be resumed.
SESSION_ENDING_CLOSES: Final = frozenset(
    {1000, 4003, 4004, 4005, 4006, 4009, 4011, 4012, 4014, 4016, 4017, 4020, 4021, 4022}
)
#: Server closes that also take the user out of the channel (op13 to the others).
LEAVING_CLOSES: Final = frozenset({4014, 4022})


@dataclass(frozen=True)
class ServerOptions:
    """The voice server's options, checked (see :class:`~legato.sandbox.voice.SandboxVoiceServer`
    for each one's meaning)."""

    host: str
    tls: bool
    endpoint_host: str
    modes: tuple[str, ...]
    dave_protocol_version: int
    dave_preferred_committer: int | None
    dave_listener: ListenerRole
    heartbeat_interval: float
    heartbeat_timeout: float
    strict_v6: bool
    relay: RelayOptions | None
    rtcp_interval: float | None
    profile: VoiceProfile

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in SUPPORTED_MODES]
        if unknown or not self.modes:
            raise ValueError(f"cannot offer encryption modes {unknown or self.modes!r}")
        if self.tls and not self.profile.tls:
            raise ValueError(f"the {self.profile.name} profile serves ws:// only")
        if self.dave_protocol_version and not self.profile.dave:
            raise ValueError(f"the {self.profile.name} profile has no DAVE")
        if self.rtcp_interval is not None and not self.rtcp_interval > 0:
            raise ValueError(f"rtcp_interval must be positive or None, not {self.rtcp_interval!r}")


@dataclass
class ServerStats:
    """Counters over the server's life: what arrived that it could not use, and what it could.

    Attributes:
        connections: Websocket connections accepted.
        bad_json: Text frames that were not a JSON object with an integer ``op`` (closed 4002).
        bad_payloads: Known ops with unusable data (closed 4002).
        unknown_opcodes: Frames with an op the server does not know (closed 4001).
        binary_frames: Binary frames (DAVE MLS; closed 4002 when DAVE is off).
        heartbeats: Heartbeats received.
        heartbeat_acks_withheld: Heartbeats not acked because of ``stop_heartbeat_acks``.
        udp_datagrams: Every datagram on the media socket.
        discovery_requests: IP discovery requests answered.
        rtp_packets: RTP packets decrypted and recorded (udp), or handed over by WebRTC.
        rtcp_packets: RTCP packets received (parsed, otherwise ignored).
        rtcp_reports_sent: Receiver reports sent to ``udp`` users.
        malformed_packets: Datagrams that are neither discovery, RTP nor RTCP.
        undecryptable_packets: RTP packets whose tag did not verify.
        unknown_ssrc_packets: RTP packets from an SSRC with no session key yet.
        dave_undecryptable: DAVE frames (magic marker) the listener could not decrypt.
        dave_plaintext_dropped: Plaintext frames the listener dropped: the sender's group was
            in force, outside any passthrough window (recorded as lost, as Discord's receivers
            drop them).
        dave_bad_binary: Binary frames too short to carry an op.
        ignored_payloads: Messages dropped unanswered, without a close (the Spacebar profile's
            op1 without a top-level ``sdp``).
        streams_dropped: op12s dropped because DTLS did not follow in time (Spacebar profile).
        unpublished_packets: WebRTC audio packets dropped because no accepted op12 announced
            their SSRC (Spacebar profile).
    """

    connections: int = 0
    bad_json: int = 0
    bad_payloads: int = 0
    unknown_opcodes: int = 0
    binary_frames: int = 0
    heartbeats: int = 0
    heartbeat_acks_withheld: int = 0
    udp_datagrams: int = 0
    discovery_requests: int = 0
    rtp_packets: int = 0
    rtcp_packets: int = 0
    rtcp_reports_sent: int = 0
    malformed_packets: int = 0
    undecryptable_packets: int = 0
    unknown_ssrc_packets: int = 0
    dave_undecryptable: int = 0
    dave_plaintext_dropped: int = 0
    dave_bad_binary: int = 0
    ignored_payloads: int = 0
    streams_dropped: int = 0
    unpublished_packets: int = 0


@dataclass(frozen=True)
class VoiceEvent:
    """Something that happened on the voice gateway, in order.

    ``kind`` is one of ``"identify"``, ``"resume"``, ``"select_protocol"``, ``"closed"`` (``code``
    is the close code, None when the TCP connection just ended), ``"left"``, with DAVE
    ``"dave_execute"`` (op22 sent to the user) and ``"dave_invalid"`` (the user sent op31), and
    ``"dtls_connected"`` (a webrtc peer's DTLS is up), and with the Spacebar profile
    ``"resume_refused"`` (an op7, closed 4003; the user is the one its token names),
    ``"streams_published"`` (an op12 answered) and ``"streams_dropped"`` (an op12 DTLS did not
    follow in time).
    ``by_server`` says who closed (``"closed"`` only).
    """

    kind: str
    user_id: int | None
    server_id: int | None
    code: int | None = None
    by_server: bool = False
    endpoint: str = ""


@dataclass(frozen=True)
class SentReport:
    """One receiver report the server sent: to whom, and what it said.

    ``received`` is the distinct packets of the SSRC recorded when it was sent.
    """

    user_id: int
    server_id: int
    received: int
    block: ReportBlock


@dataclass(frozen=True)
class SessionInfo:
    """A snapshot of one user's voice session (no token, no key)."""

    server_id: int
    user_id: int
    session_id: str
    ssrc: int
    version: int
    protocol: str | None
    mode: str | None
    connected: bool
    endpoint: str | None
    resumable: bool
    dave_protocol_version: int


@dataclass(frozen=True)
class Grant:
    """What a token allows: one user to identify for one guild with one session id."""

    server_id: int
    user_id: int
    session_id: str


@dataclass(eq=False)
class Connection:
    """One voice websocket; it may carry a session (after op0 or op7)."""

    ws: web.WebSocketResponse
    transport: asyncio.Transport | None
    version: int
    endpoint: str
    session: Session | None = None
    server_close_code: int | None = None
    watchdog: asyncio.TimerHandle | None = None
    dropped: bool = False

    async def send_raw(self, msg: dict[str, Any] | bytes) -> None:
        """Send one message now, unbuffered (op8, op6, a replay); nothing once closed."""
        if self.ws.closed:
            return
        try:
            if isinstance(msg, bytes):
                await self.ws.send_bytes(msg)
            else:
                await self.ws.send_str(json.dumps(msg))
        except ConnectionResetError:
            _log.debug("voice client went away before a message")

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code`` (once); a session-ending code makes the session unresumable."""
        if self.server_close_code is not None or self.ws.closed:
            return
        self.server_close_code = code
        if self.session is not None and code in SESSION_ENDING_CLOSES:
            self.session.resumable = False
        _log.info("closing voice connection with %d (%s)", code, reason)
        await self.ws.close(code=code, message=reason.encode()[:120])

    def detach(self) -> None:
        """Stop being the connection of its session (the session stays, for a resume)."""
        if self.session is not None and self.session.conn is self:
            self.session.conn = None


@dataclass(eq=False)
class Session:
    """One user's voice session in one guild: its SSRC, key, transport and replay buffer."""

    grant: Grant
    ssrc: int
    recording: Recording
    conn: Connection | None = None
    version: int = MAX_VERSION
    protocol: str | None = None
    mode: str | None = None
    decryptor: PacketDecryptor | None = None
    media_session_id: str = ""
    seq: int = 0
    outbox: deque[tuple[int, dict[str, Any] | bytes]] = field(
        default_factory=lambda: deque(maxlen=_REPLAY_BUFFER)
    )
    resumable: bool = True
    ended: bool = False
    client_address: tuple[str, int] | None = None
    peer: Any = None
    #: Set once the WebRTC peer's DTLS is connected (the Spacebar profile's op12 waits for it).
    dtls_connected: asyncio.Event = field(default_factory=asyncio.Event)
    #: SSRCs an answered op12 announced: the only ones recorded under the Spacebar profile.
    published: set[int] = field(default_factory=set)
    #: ``(expected, received)`` at the last receiver report (RFC 3550 A.3's prior values).
    reported: tuple[int, int] = (0, 0)

    @property
    def key(self) -> tuple[int, int]:
        """``(server_id, user_id)``."""
        return (self.grant.server_id, self.grant.user_id)

    async def send(self, op: int, d: Any) -> None:
        """Send a buffered (v8: sequenced) message to the session, now or on its resume."""
        self.seq += 1
        msg: dict[str, Any] = {"op": op, "d": d}
        if self.version >= 8:
            msg["seq"] = self.seq
        self.outbox.append((self.seq, msg))
        if self.conn is not None:
            await self.conn.send_raw(msg)

    async def send_frame(self, frame: bytes) -> None:
        """Send a buffered binary frame; ``frame`` carries :attr:`seq`, already advanced."""
        self.outbox.append((self.seq, frame))
        if self.conn is not None:
            await self.conn.send_raw(frame)

    def info(self, dave_protocol_version: int) -> SessionInfo:
        """A snapshot of the session (``dave_protocol_version``: the server's)."""
        return SessionInfo(
            server_id=self.grant.server_id,
            user_id=self.grant.user_id,
            session_id=self.grant.session_id,
            ssrc=self.ssrc,
            version=self.version,
            protocol=self.protocol,
            mode=self.mode,
            connected=self.conn is not None,
            endpoint=self.conn.endpoint if self.conn is not None else None,
            resumable=self.resumable,
            dave_protocol_version=dave_protocol_version,
        )

    async def close_peer(self) -> None:
        """Close the WebRTC peer, if there is one."""
        peer, self.peer = self.peer, None
        if peer is not None:
            await peer.close()


class SessionTable:
    """Tokens, sessions, recordings and the gateway's event log: what every room looks up.

    Args:
        waiters: woken after each event.
    """

    def __init__(self, waiters: Waiters) -> None:
        self.waiters = waiters
        self.grants: dict[str, Grant] = {}
        self.sessions: dict[tuple[int, int], Session] = {}
        self.recordings: dict[tuple[int, int], Recording] = {}
        self.by_ssrc: dict[int, Session] = {}
        #: Every gateway event in order (see :class:`VoiceEvent`).
        self.events: list[VoiceEvent] = []
        self._ssrcs = itertools.count(secrets.randbelow(1 << 20) + 1000)

    def next_ssrc(self) -> int:
        """A fresh SSRC."""
        return next(self._ssrcs)

    def grant(self, server_id: int, user_id: int, session_id: str) -> str:
        """Replace the user's token for the guild with a new one, and return it."""
        self.revoke(user_id, server_id)
        token = secrets.token_hex(16)
        self.grants[token] = Grant(server_id, user_id, session_id)
        return token

    def revoke(self, user_id: int, server_id: int | None) -> None:
        """Forget the user's tokens (in ``server_id``, or everywhere)."""
        for token, grant in list(self.grants.items()):
            if grant.user_id == user_id and server_id in (None, grant.server_id):
                del self.grants[token]

    def grant_of(self, d: Any) -> Grant | None:
        """The grant a payload's ``token`` names, if any."""
        token = d.get("token") if isinstance(d, dict) else None
        return self.grants.get(token) if isinstance(token, str) else None

    def recording(self, key: tuple[int, int]) -> Recording:
        """The recording of ``(server_id, user_id)``, made on first use; it outlives sessions."""
        recording = self.recordings.get(key)
        if recording is None:
            recording = self.recordings[key] = Recording(*key)
        return recording

    def find(self, user_id: int, server_id: int | None, *, required: bool) -> Session | None:
        """The user's one session (in ``server_id``, if given).

        Raises:
            KeyError: ``required`` and there is no such session, or more than one.
        """
        matches = [
            s
            for s in self.sessions.values()
            if s.grant.user_id == user_id and server_id in (None, s.grant.server_id)
        ]
        if len(matches) == 1:
            return matches[0]
        if required:
            raise KeyError(f"{len(matches)} voice sessions for user {user_id} in {server_id}")
        return None

    def members(self, server_id: int, *, exclude: Session) -> list[Session]:
        """The guild's other live sessions."""
        return [
            s
            for s in self.sessions.values()
            if s.grant.server_id == server_id and s is not exclude and not s.ended
        ]

    def forget(self, session: Session) -> None:
        """Drop the session from the table and the SSRC index."""
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
        for ssrc in [k for k, v in self.by_ssrc.items() if v is session]:
            del self.by_ssrc[ssrc]

    def event(
        self,
        kind: str,
        grant: Grant | None,
        *,
        code: int | None = None,
        by_server: bool = False,
        endpoint: str = "",
    ) -> None:
        """Log a :class:`VoiceEvent` and wake the waiters."""
        user_id = grant.user_id if grant else None
        server_id = grant.server_id if grant else None
        self.events.append(VoiceEvent(kind, user_id, server_id, code, by_server, endpoint))
        _log.debug("voice event %s user=%s code=%s", kind, user_id, code)
        self.waiters.notify()

    def count(self, kind: str, user_id: int) -> int:
        """How many events of ``kind`` ``user_id`` had."""
        return sum(1 for e in self.events if e.kind == kind and e.user_id == user_id)
