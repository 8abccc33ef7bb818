"""A Discord-compatible voice server on loopback: the voice gateway (websocket) and the UDP media
server, recording what each user sends.

It speaks what Discord's voice servers speak (PROTOCOL.md "Voice gateway"), versions 4 to 8, both
transports (``udp`` here, ``webrtc`` through :mod:`legato.sandbox.webrtc` when it is installed),
and records every user's audio into a :class:`~legato.sandbox.recording.Recording`. Tests drive it
through awaitable helpers (:meth:`SandboxVoiceServer.wait_identified` and friends) and break it on
purpose through the fault injectors (:meth:`~SandboxVoiceServer.inject_close`,
:meth:`~SandboxVoiceServer.inject_drop`, :meth:`~SandboxVoiceServer.stop_heartbeat_acks`,
:meth:`~SandboxVoiceServer.move`).

Its defaults are Discord's: ``wss://`` with a certificate from the process's local CA
(:mod:`legato.sandbox.tls`), an endpoint named as Discord names them
(``c-sbx01-1a2b3c4d.discord.media:PORT``, resolved in this process by
:mod:`legato.sandbox.names`), DAVE required (4017 without ``max_dave_protocol_version``), the two
``aead_*_rtpsize`` modes, and ``heartbeat_interval`` in op8 as an integer of milliseconds. The
lenient path (``tls=False, dave_protocol_version=0``: ``ws://``, ``host:port``, no DAVE) is asked
for explicitly, as self-hosted servers behave.

Choices where Discord's behaviour is not public:

- ``seq`` (v8) is carried by every server message except op8 Hello and op6 Heartbeat ACK, which
  are per-connection and never replayed. A v8 resume replays the buffered messages whose ``seq``
  is above the client's ``seq_ack`` (the last 256 kept), then sends op9.
- Heartbeats: v8 acks ``{t}`` from ``{t, seq_ack}``; earlier versions echo the bare nonce. A
  pre-v8 client sending the v8 object is acked too (Discord does), unless ``strict_v6=True``:
  then it is closed with 4002, which is what Spacebar does (named for the v6 that Spacebar's
  clients use; it applies to every version below 8, none of which defines the object form).
- A missing heartbeat closes the connection with 4009 after ``heartbeat_timeout`` seconds
  (default: three intervals, at least 5 s, so a loaded test machine does not trip it).
- A client closing with 1000 leaves the channel (op13 to the others); any other end of the
  connection (drop, 4xxx) keeps the session resumable until the user identifies again.
- Session-ending codes sent by the server (4006, 4009, 4014, ...) make a later op7 fail with
  4006; 4015 and the 1xxx codes but 1000 leave it resumable.
- RTCP: every ``rtcp_interval`` seconds (1 s by default) each ``udp`` user whose audio arrived
  since the last report gets a receiver report (RFC 3550 6.4.2) about its SSRC, sent to the
  address it gave in op1: fraction lost, cumulative lost, extended highest sequence and jitter,
  from the recording. LSR/DLSR are 0 (the sandbox does not track the client's sender reports).
- ``relay=RelayOptions(...)`` puts a :class:`~legato.sandbox.relay.LossyRelay` in front of the
  media socket (loss and reordering of the clients' RTP); op2 then names the relay's port.
- ``profile="spacebar"`` plays a self-hosted Spacebar server instead of Discord's
  (:mod:`legato.sandbox.profiles` lists each difference): v6 only, no op7 (4003), integer
  heartbeats (4002 otherwise), op1's top-level ``sdp``, op12 answered only once DTLS is
  connected, one RSA DTLS certificate, ``ws://`` only, op11 as ``{"user_ids": {}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import itertools
import json
import logging
import secrets
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

from aiohttp import WSMsgType, web

from legato.errors import TransportError
from legato.sandbox import names
from legato.sandbox.dave import DaveChannel, Deliver, ListenerRole
from legato.sandbox.profiles import VoiceProfile, voice_profile
from legato.sandbox.recording import Recording, Waiters
from legato.sandbox.relay import LossyRelay, RelayOptions
from legato.sandbox.tls import ServerCertificate, local_ca, trust_in_process
from legato.voice.crypto import (
    KEY_SIZE,
    SUPPORTED_MODES,
    DecryptionFailed,
    PacketDecryptor,
)
from legato.voice.dave import (
    OP_MLS_COMMIT_WELCOME,
    MalformedDaveFrame,
    SendJson,
    pack_server_binary,
    parse_client_binary,
)
from legato.voice.rtp import (
    DISCOVERY_PACKET_SIZE,
    MalformedPacket,
    ReportBlock,
    discovery_response,
    is_rtcp,
    pack_receiver_report,
    parse_discovery_request,
    parse_rtcp,
    parse_rtp,
)

if TYPE_CHECKING:
    # Typing only: aiortc is imported lazily, where the webrtc path needs it.
    from legato.sandbox.webrtc import SharedMediaPort
    from legato.voice.transport.aiortc_compat import DtlsCertificate

_log = logging.getLogger(__name__)

#: Offered in op2, in Discord's order of preference.
DEFAULT_MODES: Final = ("aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize")
MIN_VERSION: Final = 4
MAX_VERSION: Final = 8
#: Discord's voice servers ask for 13.75 s.
DEFAULT_HEARTBEAT_INTERVAL: Final = 13.75
BACKEND_VERSION: Final = {"voice": "legato-sandbox-0.1.0", "rtc_worker": "legato-sandbox-0.1.0"}
_REPLAY_BUFFER: Final = 256
_CLOSE_TIMEOUT: Final = 2.0
#: Bytes asked for the media socket's receive buffer (Linux caps it at net.core.rmem_max).
UDP_RECEIVE_BUFFER: Final = 4 * 1024 * 1024

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
CLOSE_BAD_REQUEST: Final = 4020
CLOSE_CALL_TERMINATED: Final = 4022

#: Server closes after which the session cannot be resumed.
_SESSION_ENDING_CLOSES: Final = frozenset(
    {1000, 4003, 4004, 4005, 4006, 4009, 4011, 4012, 4014, 4016, 4017, 4020, 4021, 4022}
)
#: Server closes that also take the user out of the channel (op13 to the others).
_LEAVING_CLOSES: Final = frozenset({4014, 4022})
#: Client ops the sandbox accepts and ignores: session update, media sink wants, DAVE replies
#: (when DAVE is off).
_IGNORED_OPS: Final = frozenset({14, 15, 17, 23, 31})
CLOSE_DAVE_REQUIRED: Final = 4017
#: The sandbox's DAVE listener (a group member that decrypts every sender), as a user id.
DAVE_LISTENER_ID: Final = 1_000_000_000_000_000_001
_DAVE_WIRE_FRAMES: Final = 500
#: The SSRC the sandbox's receiver reports come from (it sends no media of its own).
RTCP_SSRC: Final = 1
DEFAULT_RTCP_INTERVAL: Final = 1.0
_REPORTS_KEPT: Final = 4096


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
        heartbeat_acks_withheld: Heartbeats not acked because of :meth:`stop_heartbeat_acks`.
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
class _Grant:
    server_id: int
    user_id: int
    session_id: str


@dataclass(eq=False)
class _Connection:
    ws: web.WebSocketResponse
    transport: asyncio.Transport | None
    version: int
    endpoint: str
    session: _Session | None = None
    server_close_code: int | None = None
    watchdog: asyncio.TimerHandle | None = None
    dropped: bool = False


@dataclass(eq=False)
class _Session:
    grant: _Grant
    ssrc: int
    recording: Recording
    conn: _Connection | None = None
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
        return (self.grant.server_id, self.grant.user_id)


if sys.platform == "linux":
    import fcntl

    #: The ioctl giving a socket's last receive stamp as a timespec (Linux).
    _SIOCGSTAMPNS: int | None = 0x8907
else:
    _SIOCGSTAMPNS = None
_TIMESPEC: Final = bytes(struct.calcsize("@qq"))


class _MediaProtocol(asyncio.DatagramProtocol):
    """The media socket's datagrams, each with the time it reached the socket.

    That time is the kernel's receive stamp (Linux's ``SIOCGSTAMPNS`` of the datagram just
    read), put on the event loop's clock: the recordings then show when a packet arrived, not
    when this loop got round to it, so a pause of the sandbox's own loop (100 streams are
    5,000 datagrams a second) is not mistaken for the sender's. Where the kernel does not
    stamp, the loop's time on reading stands in.
    """

    def __init__(self, on_datagram: Callable[[bytes, tuple[str, int], float], None]) -> None:
        self._on_datagram = on_datagram
        self._loop = asyncio.get_running_loop()
        self._fd: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is None or _SIOCGSTAMPNS is None:
            return
        self._fd = sock.fileno()
        self._stamp()  # the first ask turns the socket's stamping on (and finds none yet)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        # Both clocks read back to back, before the stamp's ioctl: a syscall's return is where a
        # busy machine preempts, and a pause between the two reads would move the arrival.
        now = self._loop.time()
        offset = time.time() - now
        stamped = self._stamp()
        # Realtime -> the loop's monotonic clock; never later than the datagram was read.
        arrival = now if stamped is None else min(now, stamped - offset)
        self._on_datagram(data, (str(addr[0]), int(addr[1])), arrival)

    def _stamp(self) -> float | None:
        """The kernel's (realtime) receive time of the datagram last read, if it has one."""
        if self._fd is None or _SIOCGSTAMPNS is None:
            return None
        try:
            raw = fcntl.ioctl(self._fd, _SIOCGSTAMPNS, _TIMESPEC)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: nothing stamped yet; else: never will be
                self._fd = None
            return None
        seconds, nanoseconds = struct.unpack("@qq", raw)
        return float(seconds) + float(nanoseconds) * 1e-9

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable after a client went away: nothing to do but note it.
        _log.debug("media socket error: %s", exc)


class SandboxVoiceServer:
    """A voice server (gateway websocket + UDP media) on a loopback address.

    Args:
        host: Address to listen on (TCP and UDP).
        port: Websocket port; 0 picks a free one.
        tls: Serve ``wss://`` with a certificate from the process's local CA
            (:func:`legato.sandbox.tls.local_ca`; :attr:`ca_file` is its ``.pem``), trusted by
            aiohttp in this process. None (the default): as the profile does, Discord's TLS,
            Spacebar's plain ``ws://``.
        endpoint_host: The host VOICE_SERVER_UPDATE names. None: with TLS a name in Discord's
            form (``c-sbx01-1a2b3c4d.discord.media``) that this process resolves to ``host``
            (:mod:`legato.sandbox.names`), so clients take their Discord path on their own;
            without TLS ``host`` itself, as a self-hosted server hands out ``127.0.0.1:3004``.
        modes: Encryption modes offered in op2, in order; default :data:`DEFAULT_MODES`, the
            two Discord offers.
        dave_protocol_version: 1 runs DAVE (:mod:`legato.sandbox.dave`): a client identifying
            without ``max_dave_protocol_version`` is closed with 4017, members get op25 after
            op4, the server proposes, relays commits and welcomes and runs the transitions, and
            a listener member decrypts every sender's frames before they are recorded (the
            server's own view is kept by :meth:`dave_wire_frames`). 0: no DAVE. None (the
            default): 1 where the profile has DAVE (Discord requires it), else 0.
        dave_preferred_committer: Only this member's commits are taken when it can commit
            (tests use it to make a client, not the listener, commit).
        dave_listener: The listener's role in each channel's group, a
            :class:`~legato.sandbox.dave.ListenerRole` or its value: ``"founder"`` (in the
            group first: it founds every group and wins every commit race), ``"late"`` (joins
            once the clients formed the group, never commits) or ``"off"`` (no listener: media
            is recorded as it arrives, still encrypted).
        heartbeat_interval: Seconds, sent in op8 (in milliseconds). Small in tests.
        heartbeat_timeout: Seconds without a heartbeat before closing 4009; None picks
            ``max(3 * heartbeat_interval, 5.0)``; ``float("inf")`` never closes.
        strict_v6: Close with 4002 a pre-v8 connection that sends a v8 heartbeat object.
        relay: Put a lossy relay in front of the media socket (:mod:`legato.sandbox.relay`);
            op2 names the relay's port, :attr:`relay` gives its counts.
        rtcp_interval: Seconds between receiver reports to ``udp`` users; None sends none.
        profile: ``"discord"`` or ``"spacebar"`` (or a
            :class:`~legato.sandbox.profiles.VoiceProfile`): which server to play.

    Raises:
        ValueError: a mode is not one :mod:`legato.voice.crypto` implements, the profile is
            unknown, or it cannot serve ``tls`` or DAVE (Spacebar: neither).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        port: int = 0,
        tls: bool | None = None,
        endpoint_host: str | None = None,
        modes: Sequence[str] | None = None,
        dave_protocol_version: int | None = None,
        dave_preferred_committer: int | None = None,
        dave_listener: ListenerRole | str = ListenerRole.FOUNDER,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        heartbeat_timeout: float | None = None,
        strict_v6: bool = False,
        relay: RelayOptions | None = None,
        rtcp_interval: float | None = DEFAULT_RTCP_INTERVAL,
        profile: str | VoiceProfile = "discord",
    ) -> None:
        self.profile = voice_profile(profile)
        tls = self.profile.tls if tls is None else tls
        if dave_protocol_version is None:
            dave_protocol_version = 1 if self.profile.dave else 0
        if tls and not self.profile.tls:
            raise ValueError(f"the {self.profile.name} profile serves ws:// only")
        if dave_protocol_version and not self.profile.dave:
            raise ValueError(f"the {self.profile.name} profile has no DAVE")
        self.host = host
        self.tls = tls
        self._minted_name = tls and endpoint_host is None
        #: The host of every endpoint handed out (see ``endpoint_host``).
        self.endpoint_host: str = names.mint() if self._minted_name else (endpoint_host or host)
        self.modes: tuple[str, ...] = tuple(DEFAULT_MODES if modes is None else modes)
        unknown = [m for m in self.modes if m not in SUPPORTED_MODES]
        if unknown or not self.modes:
            raise ValueError(f"cannot offer encryption modes {unknown or self.modes!r}")
        self.dave_protocol_version = dave_protocol_version
        self.dave_preferred_committer = dave_preferred_committer
        self.dave_listener = ListenerRole(dave_listener)
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = (
            max(3 * heartbeat_interval, 5.0) if heartbeat_timeout is None else heartbeat_timeout
        )
        self.strict_v6 = strict_v6 or self.profile.version is not None
        if rtcp_interval is not None and not rtcp_interval > 0:
            raise ValueError(f"rtcp_interval must be positive or None, not {rtcp_interval!r}")
        self.rtcp_interval = rtcp_interval
        self.relay_options = relay
        self.stats = ServerStats()
        #: The latest receiver reports sent, in order (bounded: a long run does not grow it).
        self.rtcp_reports: deque[SentReport] = deque(maxlen=_REPORTS_KEPT)
        self._relay: LossyRelay | None = None
        #: Every gateway event in order (see :class:`VoiceEvent`).
        self.events: list[VoiceEvent] = []
        #: Each session as its op1 was answered (version, transport, mode, DAVE), in order.
        self.selections: list[SessionInfo] = []
        self.certificate: ServerCertificate | None = None
        #: The one DTLS certificate of every WebRTC peer (RSA profiles); None: one each.
        self.dtls_certificate: DtlsCertificate | None = None

        self._port = port
        self._runner: web.AppRunner | None = None
        self._listeners: list[tuple[str, web.SockSite]] = []
        self._ssl: Any = None
        self._udp: asyncio.DatagramTransport | None = None
        #: The webrtc peers' demultiplexer on the media socket, made with the first peer.
        self._webrtc_port: SharedMediaPort | None = None
        self._udp_port = 0
        self._grants: dict[str, _Grant] = {}
        self._sessions: dict[tuple[int, int], _Session] = {}
        self._recordings: dict[tuple[int, int], Recording] = {}
        self._by_ssrc: dict[int, _Session] = {}
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._silenced: set[int] = set()
        self._ssrcs = itertools.count(secrets.randbelow(1 << 20) + 1000)
        self._waiters = Waiters()
        self._channel_ids: dict[tuple[int, int], int] = {}
        self._dave: dict[tuple[int, int], DaveChannel] = {}
        self._dave_wire: dict[tuple[int, int], deque[bytes]] = {}
        self._dave_corrupt: dict[int, int] = {}
        #: DAVE messages kept from a user by :meth:`hold_dave`: ``user_id -> (server_id, item)``.
        self._dave_held: dict[int, list[tuple[int, Deliver]]] = {}
        #: op28 commits kept by :meth:`hold_dave_commits`: ``user_id -> [(session, payload)]``.
        self._commits_held: dict[int, list[tuple[_Session, bytes]]] = {}
        self._extra_sites: list[web.SockSite] = []
        self._plain_endpoint = ""

    # -- life ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the websocket listener and the UDP socket."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _MediaProtocol(self._on_datagram), local_addr=(self.host, 0)
        )
        self._udp = transport
        self._udp_port = int(transport.get_extra_info("sockname")[1])
        # One socket takes every client's media: at 100 streams that is 5,000 datagrams a
        # second, and the default receive buffer (about 270 of them) overflows on a 50 ms loop
        # stall, losing IP discovery requests with the audio. A voice server sizes it up.
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
        if self.relay_options is not None:
            self._relay = LossyRelay(
                (self.host, self._udp_port), self.relay_options, host=self.host
            )
            await self._relay.start()
        if self.rtcp_interval is not None:
            self._spawn(self._report_loop(self.rtcp_interval))
        if self.tls:
            hosts = dict.fromkeys((self.endpoint_host, self.host, "localhost"))
            self.certificate = local_ca().issue(tuple(hosts))
            self._ssl = self.certificate.server_context()
            trust_in_process()
        if self._minted_name:
            names.register(self.endpoint_host, self.host)
        if self.profile.dtls_key_type == "rsa":
            await self._make_dtls_certificate()
        app = web.Application()
        app.router.add_get("/", self._handle_ws)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        await self._add_listener(self._port)
        _log.info("voice sandbox on %s (udp %s:%d)", self.url, self.host, self._udp_port)

    async def _make_dtls_certificate(self) -> None:
        """One RSA certificate for every peer, as a medooze media server holds: made once here
        (RSA 2048 generation is CPU work, off the loop), not on every (re)connect."""
        try:
            module = importlib.import_module("legato.sandbox.webrtc")
        except ImportError:
            return  # no aiortc: webrtc is refused anyway
        loop = asyncio.get_running_loop()
        key_type = self.profile.dtls_key_type
        self.dtls_certificate = await loop.run_in_executor(
            None, module.DtlsCertificate.generate, key_type
        )

    async def _add_listener(self, port: int) -> str:
        endpoint, site = await self._open_site(port, self._ssl)
        self._listeners.append((endpoint, site))
        return endpoint

    async def _open_site(self, port: int, ssl_context: Any) -> tuple[str, web.SockSite]:
        assert self._runner is not None, "start() first"
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, port))
        site = web.SockSite(self._runner, sock, ssl_context=ssl_context)
        await site.start()
        # TLS listeners are named as Discord names its servers; a plain one by its address.
        host = self.endpoint_host if ssl_context is not None else self.host
        return f"{host}:{sock.getsockname()[1]}", site

    async def plain_endpoint(self) -> str:
        """A ``ws://`` endpoint of this server beside its ``wss://`` one (made on first use).

        The same server, sessions and DAVE groups: a TLS server can hold discord.py's stock
        client (``wss://`` only) and a client that has no way to trust a self-signed
        certificate in one channel. Not one of :meth:`move`'s targets.
        """
        if not self.tls:
            return self.endpoint
        if not self._extra_sites:
            endpoint, site = await self._open_site(0, None)
            self._extra_sites.append(site)
            self._plain_endpoint = endpoint
        return self._plain_endpoint

    async def close(self) -> None:
        """Close the listeners, every connection (1001) and the UDP socket."""
        # Listeners first: a client reconnecting at once must be refused, not let in again
        # while the connections close.
        for _endpoint, site in self._listeners:
            await site.stop()
        await asyncio.gather(
            *(self._close(c, CLOSE_GOING_AWAY, "server shutting down") for c in self._connections)
        )
        for session in list(self._sessions.values()):
            await self._close_peer(session)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._listeners.clear()
        self._extra_sites.clear()
        if self._relay is not None:
            await self._relay.close()
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        # The name keeps resolving after close, as a dead voice server's does: a client that
        # tries again is refused at once rather than left waiting for a DNS answer.

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def endpoint(self) -> str:
        """``host:port`` of the first listener, as VOICE_SERVER_UPDATE hands it out."""
        if not self._listeners:
            raise RuntimeError("the voice sandbox is not started")
        return self._listeners[0][0]

    @property
    def url(self) -> str:
        """``ws://host:port`` or ``wss://host:port`` of the first listener."""
        return f"{'wss' if self.tls else 'ws'}://{self.endpoint}"

    @property
    def ca_file(self) -> Path:
        """The ``.pem`` of the CA that signed the TLS certificate, for ``SSL_CERT_FILE``."""
        return local_ca().ca_file

    @property
    def udp_port(self) -> int:
        """The media socket's port (op2's ``port``, unless a relay is in front of it)."""
        return self._udp_port

    @property
    def media_port(self) -> int:
        """The port op2 hands out: the relay's with ``relay=``, else :attr:`udp_port`."""
        return self._relay.port if self._relay is not None else self._udp_port

    @property
    def relay(self) -> LossyRelay | None:
        """The lossy relay in front of the media socket, with ``relay=``."""
        return self._relay

    # -- what the Discord gateway side calls -----------------------------------------------------

    def register_session(
        self, *, server_id: int, user_id: int, session_id: str, channel_id: int | None = None
    ) -> str:
        """Allow one user to identify for one guild; return the token for VOICE_SERVER_UPDATE.

        A later registration for the same guild and user replaces the earlier token.
        ``channel_id`` names the DAVE group (MLS group id); the guild id stands in without it.
        """
        self._channel_ids[(int(server_id), int(user_id))] = int(channel_id or server_id)
        for token, grant in list(self._grants.items()):
            if (grant.server_id, grant.user_id) == (server_id, user_id):
                del self._grants[token]
        token = secrets.token_hex(16)
        self._grants[token] = _Grant(int(server_id), int(user_id), str(session_id))
        return token

    async def disconnect_user(
        self, user_id: int, *, server_id: int | None = None, code: int = CLOSE_DISCONNECTED
    ) -> None:
        """Take a user out of voice (they left the channel): revoke the token, close, op13."""
        for token, grant in list(self._grants.items()):
            if grant.user_id == user_id and server_id in (None, grant.server_id):
                del self._grants[token]
        session = self._find_session(user_id, server_id, required=False)
        if session is None:
            return
        session.resumable = False
        if session.conn is not None:
            await self._close(session.conn, code, "disconnected")
        await self._end_session(session)

    # -- inspection ------------------------------------------------------------------------------

    @property
    def recordings(self) -> dict[tuple[int, int], Recording]:
        """Every recording so far, by ``(server_id, user_id)`` (a copy)."""
        return dict(self._recordings)

    def recording(self, user_id: int, server_id: int | None = None) -> Recording:
        """The recording of ``user_id`` (in ``server_id``, needed only if they used several).

        Raises:
            KeyError: the user never identified (or is ambiguous without ``server_id``).
        """
        matches = [
            rec
            for (sid, uid), rec in self._recordings.items()
            if uid == user_id and server_id in (None, sid)
        ]
        if len(matches) != 1:
            raise KeyError(f"{len(matches)} recordings for user {user_id} in {server_id}")
        return matches[0]

    def session(self, user_id: int, server_id: int | None = None) -> SessionInfo:
        """A snapshot of the user's current session.

        Raises:
            KeyError: the user has no session.
        """
        s = self._find_session(user_id, server_id, required=True)
        assert s is not None
        return self._info(s)

    def _info(self, s: _Session) -> SessionInfo:
        return SessionInfo(
            server_id=s.grant.server_id,
            user_id=s.grant.user_id,
            session_id=s.grant.session_id,
            ssrc=s.ssrc,
            version=s.version,
            protocol=s.protocol,
            mode=s.mode,
            connected=s.conn is not None,
            endpoint=s.conn.endpoint if s.conn is not None else None,
            resumable=s.resumable,
            dave_protocol_version=self.dave_protocol_version,
        )

    def close_codes(self, user_id: int) -> list[int | None]:
        """Close codes of the user's connections so far, in order (None: TCP just ended)."""
        return [e.code for e in self.events if e.kind == "closed" and e.user_id == user_id]

    # -- waiting ---------------------------------------------------------------------------------

    def _count(self, kind: str, user_id: int) -> int:
        return sum(1 for e in self.events if e.kind == kind and e.user_id == user_id)

    async def wait_event(
        self,
        kind: str,
        user_id: int,
        *,
        count: int = 1,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> VoiceEvent:
        """Return the ``count``-th event of ``kind`` for ``user_id`` once it has happened.

        Raises:
            TimeoutError: it did not happen in time.
        """
        await self._waiters.wait_for(
            lambda: self._count(kind, user_id) >= count,
            timeout,
            f"{kind} #{count} of user {user_id}",
        )
        return [e for e in self.events if e.kind == kind and e.user_id == user_id][count - 1]

    async def wait_identified(self, user_id: int, *, count: int = 1, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Return once ``user_id`` has identified ``count`` times."""
        await self.wait_event("identify", user_id, count=count, timeout=timeout)

    async def wait_resumed(self, user_id: int, *, count: int = 1, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Return once ``user_id`` has resumed ``count`` times."""
        await self.wait_event("resume", user_id, count=count, timeout=timeout)

    async def wait_reported(
        self,
        user_id: int,
        received: int,
        *,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> SentReport:
        """Return the first receiver report to ``user_id`` covering ``received`` packets or more.

        Raises:
            TimeoutError: no such report was sent in time.
        """

        def find() -> SentReport | None:
            return next(
                (r for r in self.rtcp_reports if r.user_id == user_id and r.received >= received),
                None,
            )

        await self._waiters.wait_for(
            lambda: find() is not None, timeout, f"a report of {received} packets to {user_id}"
        )
        found = find()
        assert found is not None
        return found

    async def wait_session_description(
        self,
        user_id: int,
        *,
        count: int = 1,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> None:
        """Return once op4 has been sent to ``user_id`` ``count`` times (media may flow)."""
        await self.wait_event("select_protocol", user_id, count=count, timeout=timeout)

    async def wait_closed(
        self,
        user_id: int,
        *,
        count: int = 1,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> int | None:
        """Return the close code of ``user_id``'s ``count``-th ended connection."""
        event = await self.wait_event("closed", user_id, count=count, timeout=timeout)
        return event.code

    # -- faults ----------------------------------------------------------------------------------

    async def inject_close(self, user_id: int, code: int, *, server_id: int | None = None) -> None:
        """Close the user's websocket with ``code``, as a voice server would.

        4015 and 1xxx but 1000 leave the session resumable; 4014 and 4022 also take the user
        out of the channel; every other 4xxx makes a later resume fail with 4006.

        Raises:
            KeyError: the user has no connected session.
        """
        session = self._find_session(user_id, server_id, required=True)
        assert session is not None
        if session.conn is None:
            raise KeyError(f"user {user_id} is not connected")
        await self._close(session.conn, code, "injected")
        if code in _LEAVING_CLOSES:
            await self._end_session(session)

    async def inject_drop(self, user_id: int, *, server_id: int | None = None) -> None:
        """Abort the user's TCP connection without a close frame; the session stays resumable.

        Raises:
            KeyError: the user has no connected session.
        """
        session = self._find_session(user_id, server_id, required=True)
        assert session is not None
        conn = session.conn
        if conn is None or conn.transport is None:
            raise KeyError(f"user {user_id} is not connected")
        conn.dropped = True
        self._detach(conn)
        conn.transport.abort()

    def stop_heartbeat_acks(self, user_id: int) -> None:
        """Stop answering the user's heartbeats (this and later connections)."""
        self._silenced.add(user_id)

    def resume_heartbeat_acks(self, user_id: int) -> None:
        """Answer the user's heartbeats again."""
        self._silenced.discard(user_id)

    async def move(
        self, user_id: int, *, server_id: int | None = None, close_code: int | None = None
    ) -> str:
        """Move the user to another voice server: a second listener of this one.

        Returns the new endpoint for a VOICE_SERVER_UPDATE (the user's token stays valid
        there). The session cannot be resumed any more, as on a real move: the client must
        identify at the new endpoint, which gives it a new SSRC and key; its recording goes on.
        The current connection is left open (discord.py closes it itself when the update
        arrives) unless ``close_code`` is given.

        Raises:
            KeyError: the user has no session.
        """
        session = self._find_session(user_id, server_id, required=True)
        assert session is not None
        session.resumable = False
        current = session.conn.endpoint if session.conn is not None else self.endpoint
        target = next((ep for ep, _site in self._listeners if ep != current), None)
        if target is None:
            target = await self._add_listener(0)
        if close_code is not None and session.conn is not None:
            await self._close(session.conn, close_code, "moved")
        return target

    # -- websocket -------------------------------------------------------------------------------

    async def _handle_ws(self, request: web.Request) -> web.StreamResponse:
        # timeout: how long a close waits for the client's answering close frame (aiohttp: 10 s).
        ws = web.WebSocketResponse(
            timeout=_CLOSE_TIMEOUT, autoping=True, heartbeat=None, max_msg_size=1 << 20
        )
        await ws.prepare(request)
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        endpoint = f"{self.endpoint_host}:{sockname[1]}" if sockname else self.endpoint
        version = _parse_version(request.query.get("v"))
        if version is not None and self.profile.version is not None:
            version = self.profile.version  # Spacebar speaks v6 whatever ?v= asks for
        conn = _Connection(ws, request.transport, version or 0, endpoint)
        self._connections.add(conn)
        self.stats.connections += 1
        try:
            if version is None:
                await self._close(conn, CLOSE_BAD_REQUEST, "unsupported gateway version")
                return ws
            # An integer of milliseconds, as Discord sends it (13750).
            hello: dict[str, Any] = {"heartbeat_interval": round(self.heartbeat_interval * 1e3)}
            if self.profile.hello_version:
                hello = {"v": version, **hello}
            await self._send_raw(conn, {"op": 8, "d": hello})
            self._arm_watchdog(conn)
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    await self._on_text(conn, msg.data)
                elif msg.type is WSMsgType.BINARY:
                    self.stats.binary_frames += 1
                    if self.dave_protocol_version == 0:
                        await self._close(conn, CLOSE_DECODE_ERROR, "binary frame without DAVE")
                    else:
                        await self._on_dave_binary(conn, msg.data)
                if conn.server_close_code is not None or conn.dropped:
                    break
        finally:
            await self._connection_ended(conn)
        return ws

    async def _connection_ended(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        if conn.watchdog is not None:
            conn.watchdog.cancel()
        session = conn.session
        if conn.dropped:
            code = None
        elif conn.server_close_code is not None:
            code = conn.server_close_code
        else:
            code = conn.ws.close_code
        grant = session.grant if session is not None else None
        self._event(
            "closed",
            grant,
            code=code,
            by_server=conn.server_close_code is not None,
            endpoint=conn.endpoint,
        )
        if session is not None and session.conn is conn:
            session.conn = None
            if conn.server_close_code is None and code == CLOSE_NORMAL:
                # The client hung up on purpose: it left the channel.
                session.resumable = False
                await self._end_session(session)

    def _detach(self, conn: _Connection) -> None:
        if conn.session is not None and conn.session.conn is conn:
            conn.session.conn = None

    async def _close(self, conn: _Connection, code: int, reason: str) -> None:
        if conn.server_close_code is not None or conn.ws.closed:
            return
        conn.server_close_code = code
        if conn.session is not None and code in _SESSION_ENDING_CLOSES:
            conn.session.resumable = False
        _log.info("closing voice connection with %d (%s)", code, reason)
        await conn.ws.close(code=code, message=reason.encode()[:120])

    async def _send_raw(self, conn: _Connection, msg: dict[str, Any] | bytes) -> None:
        if conn.ws.closed:
            return
        try:
            if isinstance(msg, bytes):
                await conn.ws.send_bytes(msg)
            else:
                await conn.ws.send_str(json.dumps(msg))
        except ConnectionResetError:
            _log.debug("voice client went away before a message")

    async def _send(self, session: _Session, op: int, d: Any) -> None:
        """Send a buffered (v8: sequenced) message to the session, now or on its resume."""
        session.seq += 1
        msg: dict[str, Any] = {"op": op, "d": d}
        if session.version >= 8:
            msg["seq"] = session.seq
        session.outbox.append((session.seq, msg))
        if session.conn is not None:
            await self._send_raw(session.conn, msg)

    def _arm_watchdog(self, conn: _Connection) -> None:
        if conn.watchdog is not None:
            conn.watchdog.cancel()
        if self.heartbeat_timeout == float("inf"):
            return
        loop = asyncio.get_running_loop()
        conn.watchdog = loop.call_later(self.heartbeat_timeout, self._heartbeat_missed, conn)

    def _heartbeat_missed(self, conn: _Connection) -> None:
        self._spawn(self._close(conn, CLOSE_SESSION_TIMEOUT, "no heartbeat"))

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_text(self, conn: _Connection, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            msg = None
        if not isinstance(msg, dict) or type(msg.get("op")) is not int:
            self.stats.bad_json += 1
            await self._close(conn, CLOSE_DECODE_ERROR, "undecodable payload")
            return
        op: int = msg["op"]
        d = msg.get("d")
        if self.profile.identify_first and op != 0 and conn.session is None:
            if op == 7:
                self._event("resume_refused", self._grant_of(d), endpoint=conn.endpoint)
            await self._close(conn, CLOSE_NOT_AUTHENTICATED, f"op {op} before identify")
            return
        handler = self._handlers.get(op)
        if handler is None:
            if op in _IGNORED_OPS and conn.session is not None:
                _log.debug("ignoring client op %d", op)
                return
            self.stats.unknown_opcodes += 1
            await self._close(conn, CLOSE_UNKNOWN_OPCODE, f"unknown opcode {op}")
            return
        if op not in (0, 3, 7, 16) and conn.session is None:
            await self._close(conn, CLOSE_NOT_AUTHENTICATED, f"op {op} before identify")
            return
        try:
            await handler(self, conn, d)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            # A payload of the wrong shape (d missing, a list for a dict, "abc" for an id).
            self.stats.bad_payloads += 1
            _log.info("bad op %d payload: %s", op, type(exc).__name__)
            await self._close(conn, CLOSE_DECODE_ERROR, f"invalid op {op} payload")

    def _grant_of(self, d: Any) -> _Grant | None:
        """The grant a payload's ``token`` names, if any (for the event log only)."""
        token = d.get("token") if isinstance(d, dict) else None
        return self._grants.get(token) if isinstance(token, str) else None

    # -- ops -------------------------------------------------------------------------------------

    async def _op_identify(self, conn: _Connection, d: Any) -> None:
        if conn.session is not None:
            await self._close(conn, CLOSE_ALREADY_AUTHENTICATED, "already identified")
            return
        server_id, user_id = int(d["server_id"]), int(d["user_id"])
        session_id, token = str(d["session_id"]), str(d["token"])
        grant = self._grants.get(token)
        if grant is None or grant != _Grant(server_id, user_id, session_id):
            await self._close(conn, CLOSE_AUTHENTICATION_FAILED, "authentication failed")
            return
        offered = d.get("max_dave_protocol_version") or 0
        if self.dave_protocol_version > 0 and (type(offered) is not int or offered < 1):
            # Discord since 2026-03-01: no E2EE, no voice in ordinary channels.
            await self._close(conn, CLOSE_DAVE_REQUIRED, "DAVE required")
            return
        key = (server_id, user_id)
        previous = self._sessions.get(key)
        if previous is not None:
            await self._retire(previous)
        recording = self._recordings.get(key)
        if recording is None:
            recording = self._recordings[key] = Recording(server_id, user_id)
        session = _Session(grant, next(self._ssrcs), recording, conn, version=conn.version)
        recording.note_ssrc(session.ssrc)
        self._sessions[key] = session
        self._by_ssrc[session.ssrc] = session
        conn.session = session
        streams = []
        for stream in d.get("streams") or []:
            if isinstance(stream, dict):
                ssrc = next(self._ssrcs)
                streams.append({**stream, "ssrc": ssrc, "rtx_ssrc": ssrc + 1, "active": False})
                next(self._ssrcs)
        await self._send(
            session,
            2,
            {
                "ssrc": session.ssrc,
                "ip": self.host,
                "port": self.media_port,
                "modes": list(self.modes),
                "experiments": [],
                "streams": streams,
            },
        )
        others = self._members(server_id, exclude=session)
        if self.profile.clients_connect_object:
            # Spacebar's op11: an object where Discord has a list, sent even to a lone user.
            await self._send(session, 11, {"user_ids": {}})
            if previous is None:
                for other in others:
                    await self._send(other, 11, {"user_ids": {}})
        else:
            if others:
                ids = [str(o.grant.user_id) for o in others]
                await self._send(session, 11, {"user_ids": ids})
            if previous is None:
                for other in others:
                    await self._send(other, 11, {"user_ids": [str(user_id)]})
        self._event("identify", grant, endpoint=conn.endpoint)

    async def _op_resume(self, conn: _Connection, d: Any) -> None:
        if conn.session is not None:
            await self._close(conn, CLOSE_ALREADY_AUTHENTICATED, "already identified")
            return
        server_id, session_id, token = int(d["server_id"]), str(d["session_id"]), str(d["token"])
        raw_ack = d.get("seq_ack", -1)
        seq_ack = raw_ack if type(raw_ack) is int else -1
        grant = self._grants.get(token)
        session = self._sessions.get((grant.server_id, grant.user_id)) if grant else None
        if (
            grant is None
            or session is None
            or grant.server_id != server_id
            or grant.session_id != session_id
            or not session.resumable
        ):
            await self._close(conn, CLOSE_SESSION_INVALID, "session no longer valid")
            return
        old = session.conn
        if old is not None:
            # The client gave up on that connection; it gets no close frame, as after a drop.
            old.dropped = True
            self._detach(old)
            if old.transport is not None:
                old.transport.abort()
        session.conn = conn
        session.version = conn.version
        conn.session = session
        if conn.version >= 8:
            for seq, msg in list(session.outbox):
                if seq > seq_ack:
                    await self._send_raw(conn, msg)
        await self._send(session, 9, None)
        self._event("resume", grant, endpoint=conn.endpoint)

    async def _op_heartbeat(self, conn: _Connection, d: Any) -> None:
        self.stats.heartbeats += 1
        if isinstance(d, dict):
            if conn.version < 8 and self.strict_v6:
                await self._close(conn, CLOSE_DECODE_ERROR, "heartbeat object before v8")
                return
            ack: Any = {"t": d["t"]}
        elif type(d) is int:
            ack = d
        else:
            raise TypeError("heartbeat nonce")
        self._arm_watchdog(conn)
        session = conn.session
        if session is not None and session.grant.user_id in self._silenced:
            self.stats.heartbeat_acks_withheld += 1
            return
        await self._send_raw(conn, {"op": 6, "d": ack})

    async def _op_backend_version(self, conn: _Connection, d: Any) -> None:
        msg: dict[str, Any] = {"op": 16, "d": dict(BACKEND_VERSION)}
        if conn.session is not None:
            await self._send(conn.session, 16, dict(BACKEND_VERSION))
        else:
            await self._send_raw(conn, msg)

    async def _op_select_protocol(self, conn: _Connection, d: Any) -> None:
        session = conn.session
        assert session is not None
        protocol = d["protocol"]
        if protocol == "udp" and not self.profile.udp:
            code = self.profile.udp_close_code
            await self._close(conn, code, "only webrtc protocol supported currently")
            return
        if protocol == "udp":
            data = d["data"]
            mode = data.get("mode") or d.get("mode")
            if mode not in self.modes:
                await self._close(conn, CLOSE_UNKNOWN_MODE, "unknown encryption mode")
                return
            address, port = str(data["address"]), int(data["port"])
            key = secrets.token_bytes(KEY_SIZE)
            session.protocol, session.mode = "udp", mode
            session.decryptor = PacketDecryptor(mode, key)
            session.client_address = (address, port)
            session.media_session_id = secrets.token_hex(16)
            await self._send(
                session,
                4,
                {
                    "mode": mode,
                    "secret_key": list(key),
                    "audio_codec": "opus",
                    "media_session_id": session.media_session_id,
                    "dave_protocol_version": self._dave_version(session),
                },
            )
            await self._dave_join(session)
        elif protocol == "webrtc":
            if not await self._select_webrtc(conn, session, d):
                return
        else:
            await self._close(conn, CLOSE_UNKNOWN_PROTOCOL, "unknown protocol")
            return
        self.selections.append(self._info(session))
        self._event("select_protocol", session.grant, endpoint=conn.endpoint)

    async def _select_webrtc(self, conn: _Connection, session: _Session, d: Any) -> bool:
        if self.profile.op1_reads_sdp_only:
            fragment = d.get("sdp")
            if not isinstance(fragment, str):
                # Spacebar's schema check throws; the error is logged and nothing answers.
                self.stats.ignored_payloads += 1
                _log.info("op1 webrtc without a top-level sdp: ignored (Spacebar profile)")
                return False
        else:
            fragment = d.get("sdp") or d.get("data")
        if not isinstance(fragment, str):
            raise TypeError("webrtc offer fragment")
        codecs = d.get("codecs") or []
        try:
            module = importlib.import_module("legato.sandbox.webrtc")
        except ImportError:
            _log.warning("webrtc asked for but legato.sandbox.webrtc is not available")
            await self._close(conn, CLOSE_UNKNOWN_PROTOCOL, "webrtc unavailable")
            return False
        await self._close_peer(session)

        gated = self.profile.streams_after_dtls is not None

        def on_rtp(ssrc: int, sequence: int, timestamp: int, opus: bytes) -> None:
            if gated and ssrc not in session.published:
                self.stats.unpublished_packets += 1
                return
            self.stats.rtp_packets += 1
            self._record(
                session, asyncio.get_running_loop().time(), ssrc, sequence, timestamp, opus
            )

        if self._webrtc_port is None:
            assert self._udp is not None, "start() first"
            # op2's port serves webrtc too, as a Discord voice server's one media port does.
            self._webrtc_port = module.SharedMediaPort(self._udp, self.media_port)
        peer = module.WebRtcServerPeer(
            self.host,
            on_rtp=on_rtp,
            key_type=self.profile.dtls_key_type,
            certificate=self.dtls_certificate,
            shared=self._webrtc_port,
        )
        session.peer = peer
        if not gated:
            await self._send(session, 15, {"any": 100})
        try:
            sdp = await peer.accept(fragment, list(codecs))
        except Exception:  # noqa: BLE001 - any failure of the peer ends this connection, logged
            _log.exception("the WebRTC peer refused the offer")
            await self._close(conn, CLOSE_INTERNAL_ERROR, "webrtc negotiation failed")
            return False
        session.protocol, session.mode = "webrtc", None
        session.media_session_id = secrets.token_hex(16)
        op4: dict[str, Any] = {
            "sdp": sdp,
            "audio_codec": "opus",
            "video_codec": "H264",
            "media_session_id": session.media_session_id,
        }
        if self.profile.session_description_dave:
            op4["dave_protocol_version"] = self._dave_version(session)
        await self._send(session, 4, op4)
        self._spawn(self._watch_dtls(session, peer))
        await self._dave_join(session)
        return True

    async def _watch_dtls(self, session: _Session, peer: Any) -> None:
        try:
            await peer.wait_connected()
        except TransportError:
            return  # failed or closed (a new session replaced it): nothing is published
        if session.peer is peer and not session.ended:
            session.dtls_connected.set()
            self._event("dtls_connected", session.grant)

    async def _op_speaking(self, conn: _Connection, d: Any) -> None:
        session = conn.session
        assert session is not None
        speaking = int(d["speaking"])
        ssrc = d.get("ssrc")
        ssrc = int(ssrc) if ssrc is not None else None
        if ssrc is not None and ssrc != session.ssrc:
            self._by_ssrc.setdefault(ssrc, session)
        session.recording.add_speaking(
            arrival=asyncio.get_running_loop().time(), speaking=speaking, ssrc=ssrc
        )
        relay = {"user_id": str(session.grant.user_id), "ssrc": ssrc or session.ssrc}
        relay["speaking"] = speaking
        for other in self._members(session.grant.server_id, exclude=session):
            await self._send(other, 5, relay)

    async def _op_video(self, conn: _Connection, d: Any) -> None:
        session = conn.session
        assert session is not None
        audio_ssrc = int(d.get("audio_ssrc") or 0)
        window = self.profile.streams_after_dtls
        if window is not None:
            # Held, not awaited: the connection's other messages (heartbeats) go on meanwhile.
            self._spawn(self._publish_after_dtls(session, audio_ssrc, dict(d), window))
            return
        if audio_ssrc:
            session.recording.note_ssrc(audio_ssrc)
            if audio_ssrc != session.ssrc:
                self._by_ssrc.setdefault(audio_ssrc, session)
        relay = {**d, "user_id": str(session.grant.user_id)}
        for other in self._members(session.grant.server_id, exclude=session):
            await self._send(other, 12, relay)

    async def _publish_after_dtls(
        self, session: _Session, audio_ssrc: int, d: dict[str, Any], window: float
    ) -> None:
        """Spacebar publishes a client's audio on op12, and only once DTLS is connected."""
        try:
            async with asyncio.timeout(window):
                await session.dtls_connected.wait()
        except TimeoutError:
            if session.ended:
                return  # a new identify replaced the session: nothing to drop
            self.stats.streams_dropped += 1
            _log.info("op12 %.1f s before DTLS: dropped (Spacebar profile)", window)
            self._event("streams_dropped", session.grant)
            return
        if session.ended:
            return
        if audio_ssrc:
            session.published.add(audio_ssrc)
            session.recording.note_ssrc(audio_ssrc)
        await self._send(session, 15, {"any": 100})
        relay = {**d, "user_id": str(session.grant.user_id)}
        for other in self._members(session.grant.server_id, exclude=session):
            await self._send(other, 12, relay)
        self._event("streams_published", session.grant)

    async def _op_dave_transition_ready(self, conn: _Connection, d: Any) -> None:
        await self._on_dave_json(conn, 23, d)

    async def _op_dave_invalid_commit_welcome(self, conn: _Connection, d: Any) -> None:
        session = conn.session
        if session is not None and session.key in self._dave_wire:
            self._event("dave_invalid", session.grant)
        await self._on_dave_json(conn, 31, d)

    # -- DAVE (legato.sandbox.dave does the protocol; this moves its messages) -------------------

    def dave_channel(self, server_id: int, channel_id: int | None = None) -> DaveChannel:
        """The DAVE group of a channel (``channel_id`` defaults to the guild id).

        Raises:
            KeyError: no DAVE member has joined that channel.
        """
        return self._dave[(server_id, channel_id or server_id)]

    def dave_channels(self) -> dict[tuple[int, int], DaveChannel]:
        """Every DAVE group so far, by ``(server_id, channel_id)`` (a copy)."""
        return dict(self._dave)

    def dave_wire_frames(self, user_id: int, server_id: int | None = None) -> list[bytes]:
        """The last media payloads of ``user_id`` as the server received them (pre-listener)."""
        session = self._find_session(user_id, server_id, required=False)
        if session is not None:
            return list(self._dave_wire.get(session.key, ()))
        for (sid, uid), frames in self._dave_wire.items():
            if uid == user_id and server_id in (None, sid):
                return list(frames)
        raise KeyError(f"no DAVE frames for user {user_id}")

    async def dave_downgrade(self, server_id: int, channel_id: int | None = None) -> None:
        """Run a transition to protocol 0 (op21, op23s, op22) in a channel."""
        channel = self.dave_channel(server_id, channel_id)
        await self._dave_deliver(server_id, channel.downgrade())

    async def dave_upgrade(self, server_id: int, channel_id: int | None = None) -> None:
        """Start a new DAVE group at protocol 1 (op24 epoch 1, op25) in a channel."""
        channel = self.dave_channel(server_id, channel_id)
        await self._dave_deliver(server_id, channel.upgrade())

    def corrupt_next_dave(self, user_id: int, op: int) -> None:
        """Fault: flip a byte in the middle of the next binary DAVE ``op`` sent to ``user_id``.

        An MLS commit (29) or welcome (30) damaged this way fails to process; the client is
        expected to answer op31 and rejoin with a fresh key package.
        """
        self._dave_corrupt[user_id] = op

    def hold_dave(self, user_id: int) -> None:
        """Fault: keep every DAVE message for ``user_id`` (op25 on) until :meth:`release_dave`.

        A slow DAVE group: the user's voice session is up (op4 said DAVE) but its group is not
        in force until the messages go out.
        """
        self._dave_held.setdefault(user_id, [])

    async def release_dave(self, user_id: int) -> None:
        """Send the DAVE messages :meth:`hold_dave` kept, in order, and stop holding them."""
        for server_id, item in self._dave_held.pop(user_id, []):
            await self._dave_deliver(server_id, [item])

    def hold_dave_commits(self, user_id: int) -> None:
        """Fault: keep ``user_id``'s op28 commits from the DAVE group until
        :meth:`release_dave_commits`: a commit slow on the wire, so that another member's
        commit for the same epoch arrives first and wins the race."""
        self._commits_held.setdefault(user_id, [])

    async def wait_dave_commit_held(
        self,
        user_id: int,
        *,
        count: int = 1,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> None:
        """Return once :meth:`hold_dave_commits` keeps ``count`` of ``user_id``'s commits.

        Raises:
            TimeoutError: they did not arrive in time.
        """
        await self._waiters.wait_for(
            lambda: len(self._commits_held.get(user_id, ())) >= count,
            timeout,
            f"{count} held commits of user {user_id}",
        )

    async def release_dave_commits(self, user_id: int) -> None:
        """Deliver the commits :meth:`hold_dave_commits` kept, in order, and stop holding."""
        for session, payload in self._commits_held.pop(user_id, []):
            channel = self._dave.get(self._dave_key(session))
            if channel is None or session.ended:
                continue
            deliveries = channel.receive_binary(user_id, OP_MLS_COMMIT_WELCOME, payload)
            await self._dave_deliver(session.grant.server_id, deliveries)

    def _dave_key(self, session: _Session) -> tuple[int, int]:
        server_id = session.grant.server_id
        return (server_id, self._channel_ids.get(session.key, server_id))

    def _dave_version(self, session: _Session) -> int:
        channel = self._dave.get(self._dave_key(session))
        if channel is not None:
            return channel.server.session_protocol_version
        return self.dave_protocol_version

    async def _dave_join(self, session: _Session) -> None:
        if self.dave_protocol_version == 0:
            return
        key = self._dave_key(session)
        channel = self._dave.get(key)
        if channel is None:
            channel = self._dave[key] = DaveChannel(
                key[1],
                listener_id=DAVE_LISTENER_ID,
                listener_role=self.dave_listener,
                protocol_version=self.dave_protocol_version,
                preferred_committer=self.dave_preferred_committer,
            )
        self._dave_wire[session.key] = deque(maxlen=_DAVE_WIRE_FRAMES)
        await self._dave_deliver(session.grant.server_id, channel.join(session.grant.user_id))

    async def _on_dave_json(self, conn: _Connection, op: int, d: Any) -> None:
        session = conn.session
        assert session is not None
        channel = self._dave.get(self._dave_key(session))
        if channel is None:
            return  # DAVE is off: ignored, as before
        deliveries = channel.receive_json(session.grant.user_id, op, d)
        await self._dave_deliver(session.grant.server_id, deliveries)

    async def _on_dave_binary(self, conn: _Connection, data: bytes) -> None:
        session = conn.session
        if session is None:
            await self._close(conn, CLOSE_NOT_AUTHENTICATED, "binary frame before identify")
            return
        try:
            op, payload = parse_client_binary(data)
        except MalformedDaveFrame:
            self.stats.dave_bad_binary += 1
            return
        channel = self._dave.get(self._dave_key(session))
        if channel is None:
            return
        held = self._commits_held.get(session.grant.user_id)
        if held is not None and op == OP_MLS_COMMIT_WELCOME:
            held.append((session, payload))
            self._waiters.notify()
            return
        deliveries = channel.receive_binary(session.grant.user_id, op, payload)
        await self._dave_deliver(session.grant.server_id, deliveries)

    async def wait_dave_group(
        self,
        server_id: int,
        channel_id: int | None,
        predicate: Callable[[DaveChannel], bool],
        *,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> DaveChannel:
        """Return a channel's DAVE group once ``predicate`` holds for it (rechecked after every
        DAVE message the server handles or sends).

        Raises:
            TimeoutError: it did not hold in time.
        """
        key = (server_id, channel_id or server_id)

        def holds() -> bool:
            channel = self._dave.get(key)
            return channel is not None and predicate(channel)

        await self._waiters.wait_for(holds, timeout, f"DAVE group of {key}")
        return self._dave[key]

    async def _dave_deliver(self, server_id: int, deliveries: list[Deliver]) -> None:
        try:
            await self._dave_send(server_id, deliveries)
        finally:
            self._waiters.notify()

    async def _dave_send(self, server_id: int, deliveries: list[Deliver]) -> None:
        for item in deliveries:
            held = self._dave_held.get(item.user_id)
            if held is not None:
                held.append((server_id, item))
                continue
            session = self._sessions.get((server_id, item.user_id))
            if session is None or session.ended:
                continue
            message = item.message
            if isinstance(message, SendJson):
                await self._send(session, message.op, message.data)
                if message.op == 22:
                    self._event("dave_execute", session.grant)
            else:
                payload = message.payload
                if self._dave_corrupt.get(item.user_id) == message.op:
                    del self._dave_corrupt[item.user_id]
                    damaged = bytearray(payload)
                    damaged[len(damaged) // 2] ^= 0xFF
                    payload = bytes(damaged)
                session.seq += 1
                frame = pack_server_binary(session.seq, message.op, payload)
                session.outbox.append((session.seq, frame))
                if session.conn is not None:
                    await self._send_raw(session.conn, frame)

    def _dave_open(self, session: _Session, payload: bytes) -> bytes | None:
        """The listener's view of a media payload: the Opus it hears, or None when a Discord
        receiver would drop it (a DAVE frame that does not decrypt, or plaintext while the
        group is in force for the sender outside a passthrough window)."""
        wire = self._dave_wire.get(session.key)
        if wire is None:
            return payload
        wire.append(payload)
        channel = self._dave.get(self._dave_key(session))
        listener = channel.joined_listener if channel is not None else None
        if listener is None:
            return payload  # no listener (yet): recorded as it arrived
        dropped = listener.stats.plaintext_dropped
        opened = listener.decrypt(session.grant.user_id, payload)
        if opened is None:
            if listener.stats.plaintext_dropped > dropped:
                self.stats.dave_plaintext_dropped += 1
            else:
                self.stats.dave_undecryptable += 1
        return opened

    _handlers: Final[dict[int, Callable[[SandboxVoiceServer, _Connection, Any], Any]]] = {
        0: _op_identify,
        1: _op_select_protocol,
        3: _op_heartbeat,
        5: _op_speaking,
        7: _op_resume,
        12: _op_video,
        16: _op_backend_version,
        23: _op_dave_transition_ready,
        31: _op_dave_invalid_commit_welcome,
    }

    # -- sessions --------------------------------------------------------------------------------

    def _find_session(
        self, user_id: int, server_id: int | None, *, required: bool
    ) -> _Session | None:
        matches = [
            s
            for s in self._sessions.values()
            if s.grant.user_id == user_id and server_id in (None, s.grant.server_id)
        ]
        if len(matches) == 1:
            return matches[0]
        if required:
            raise KeyError(f"{len(matches)} voice sessions for user {user_id} in {server_id}")
        return None

    def _members(self, server_id: int, *, exclude: _Session) -> list[_Session]:
        return [
            s
            for s in self._sessions.values()
            if s.grant.server_id == server_id and s is not exclude and not s.ended
        ]

    async def _retire(self, session: _Session) -> None:
        """A fresh identify replaced this session: forget it without telling the others."""
        session.ended = True
        session.resumable = False
        self._forget(session)
        await self._close_peer(session)
        if session.conn is not None:
            conn = session.conn
            self._detach(conn)
            await self._close(conn, CLOSE_SESSION_INVALID, "replaced by a new session")

    async def _end_session(self, session: _Session) -> None:
        if session.ended:
            return
        session.ended = True
        self._forget(session)
        await self._close_peer(session)
        for other in self._members(session.grant.server_id, exclude=session):
            await self._send(other, 13, {"user_id": str(session.grant.user_id)})
        channel = self._dave.get(self._dave_key(session))
        if channel is not None:
            await self._dave_deliver(session.grant.server_id, channel.leave(session.grant.user_id))
        self._event("left", session.grant)

    def _forget(self, session: _Session) -> None:
        if self._sessions.get(session.key) is session:
            del self._sessions[session.key]
        for ssrc in [k for k, v in self._by_ssrc.items() if v is session]:
            del self._by_ssrc[ssrc]

    async def _close_peer(self, session: _Session) -> None:
        peer, session.peer = session.peer, None
        if peer is not None:
            await peer.close()

    def _event(
        self,
        kind: str,
        grant: _Grant | None,
        *,
        code: int | None = None,
        by_server: bool = False,
        endpoint: str = "",
    ) -> None:
        self.events.append(
            VoiceEvent(
                kind,
                grant.user_id if grant else None,
                grant.server_id if grant else None,
                code,
                by_server,
                endpoint,
            )
        )
        _log.debug("voice event %s user=%s code=%s", kind, grant.user_id if grant else None, code)
        self._waiters.notify()

    # -- media -----------------------------------------------------------------------------------

    async def _report_loop(self, interval: float) -> None:
        # A plain period: reports are sampled, their timing carries no meaning.
        while True:
            await asyncio.sleep(interval)
            self._send_receiver_reports()

    def _send_receiver_reports(self) -> None:
        """One RR per udp session heard from since its last one (RFC 3550 6.4.2, A.3)."""
        if self._udp is None:
            return
        for session in list(self._sessions.values()):
            if session.protocol != "udp" or session.client_address is None or session.ended:
                continue
            reception = session.recording.reception(session.ssrc)
            if reception is None:
                continue
            prior_expected, prior_received = session.reported
            if reception.received == prior_received:
                continue  # nothing heard since the last report: no block about this source
            expected_interval = reception.expected - prior_expected
            lost_interval = expected_interval - (reception.received - prior_received)
            fraction = (
                0
                if expected_interval <= 0 or lost_interval <= 0
                else min(255, (lost_interval << 8) // expected_interval)
            )
            session.reported = (reception.expected, reception.received)
            block = ReportBlock(
                ssrc=session.ssrc,
                fraction_lost=fraction,
                cumulative_lost=max(-(1 << 23), min((1 << 23) - 1, reception.lost)),
                highest_sequence=reception.highest & 0xFFFFFFFF,
                jitter=int(reception.jitter),
                last_sr=0,
                delay_since_last_sr=0,
            )
            self._udp.sendto(pack_receiver_report(RTCP_SSRC, (block,)), session.client_address)
            self.stats.rtcp_reports_sent += 1
            self.rtcp_reports.append(
                SentReport(
                    session.grant.user_id, session.grant.server_id, reception.received, block
                )
            )
        self._waiters.notify()

    def _on_datagram(self, data: bytes, addr: tuple[str, int], arrival: float) -> None:
        self.stats.udp_datagrams += 1
        if self._webrtc_port is not None and self._webrtc_port.datagram_received(data, addr):
            return  # a webrtc peer's STUN, DTLS or SRTP
        try:
            if len(data) == DISCOVERY_PACKET_SIZE and data[:2] == b"\x00\x01":
                ssrc = parse_discovery_request(data)
                self.stats.discovery_requests += 1
                if self._udp is not None:
                    self._udp.sendto(discovery_response(ssrc, addr[0], addr[1]), addr)
                return
            if is_rtcp(data):
                parse_rtcp(data)
                self.stats.rtcp_packets += 1
                return
            header = parse_rtp(data).header
        except MalformedPacket:
            self.stats.malformed_packets += 1
            return
        session = self._by_ssrc.get(header.ssrc)
        if session is None or session.decryptor is None:
            self.stats.unknown_ssrc_packets += 1
            return
        try:
            rtp, opus = session.decryptor.decrypt(data)
        except DecryptionFailed:
            self.stats.undecryptable_packets += 1
            return
        except MalformedPacket:
            self.stats.malformed_packets += 1
            return
        self.stats.rtp_packets += 1
        header = rtp.header
        self._record(session, arrival, header.ssrc, header.sequence, header.timestamp, opus)

    def _record(
        self,
        session: _Session,
        arrival: float,
        ssrc: int,
        sequence: int,
        timestamp: int,
        opus: bytes,
    ) -> None:
        """The one place a media payload becomes what the user is heard saying, or a loss."""
        opened = self._dave_open(session, opus)
        if opened is None:
            session.recording.add_lost(
                arrival=arrival, ssrc=ssrc, sequence=sequence, timestamp=timestamp
            )
            return
        session.recording.add_packet(
            arrival=arrival, ssrc=ssrc, sequence=sequence, timestamp=timestamp, opus=opened
        )


def _parse_version(raw: str | None) -> int | None:
    """``?v=`` as an int in 4..8; absent means 4 (Discord's oldest still accepted); else None."""
    if raw is None:
        return MIN_VERSION
    try:
        version = int(raw)
    except ValueError:
        return None
    return version if MIN_VERSION <= version <= MAX_VERSION else None
