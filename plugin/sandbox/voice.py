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

The server is five rooms behind :class:`SandboxVoiceServer`, the facade tests and the CLI use:
:mod:`legato.sandbox.voice_gateway` (the websocket: ops, sessions' lifecycles),
:mod:`legato.sandbox.voice_negotiation` (op1, op5, op12: how each session's media is set up),
:mod:`legato.sandbox.voice_media` (the media socket: discovery, RTP, RTCP, webrtc peers,
recording), :mod:`legato.sandbox.voice_dave` (DAVE groups on the websockets) and
:mod:`legato.sandbox.voice_session` (options, sessions, connections and the event log they
share).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from legato.sandbox import names
from legato.sandbox.dave_listener import DaveChannel, ListenerRole
from legato.sandbox.profiles import VoiceProfile, voice_profile
from legato.sandbox.recording import Recording, Waiters
from legato.sandbox.relay import LossyRelay, RelayOptions
from legato.sandbox.tls import ServerCertificate, local_ca, trust_in_process
from legato.sandbox.voice_dave import DAVE_LISTENER_ID, DaveHub
from legato.sandbox.voice_gateway import Listeners, VoiceGateway
from legato.sandbox.voice_media import ArrivalClock, MediaPlane
from legato.sandbox.voice_session import (
    CLOSE_DISCONNECTED,
    CLOSE_GOING_AWAY,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_MODES,
    DEFAULT_RTCP_INTERVAL,
    LEAVING_CLOSES,
    SentReport,
    ServerOptions,
    ServerStats,
    SessionInfo,
    SessionTable,
    VoiceEvent,
)

if TYPE_CHECKING:
    from legato.voice.transport.aiortc_compat import DtlsCertificate

__all__ = [
    "DAVE_LISTENER_ID",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_MODES",
    "DEFAULT_RTCP_INTERVAL",
    "SandboxVoiceServer",
    "SentReport",
    "ServerStats",
    "SessionInfo",
    "VoiceEvent",
]

_log = logging.getLogger(__name__)


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
            :class:`~legato.sandbox.dave_listener.ListenerRole` or its value: ``"founder"`` (in the
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
        chosen = voice_profile(profile)
        tls = chosen.tls if tls is None else tls
        if dave_protocol_version is None:
            dave_protocol_version = 1 if chosen.dave else 0
        self._minted_name = tls and endpoint_host is None
        #: The options, checked.
        self.options = ServerOptions(
            host=host,
            tls=tls,
            endpoint_host=names.mint() if self._minted_name else (endpoint_host or host),
            modes=tuple(DEFAULT_MODES if modes is None else modes),
            dave_protocol_version=dave_protocol_version,
            dave_preferred_committer=dave_preferred_committer,
            dave_listener=ListenerRole(dave_listener),
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=(
                max(3 * heartbeat_interval, 5.0) if heartbeat_timeout is None else heartbeat_timeout
            ),
            strict_v6=strict_v6 or chosen.version is not None,
            relay=relay,
            rtcp_interval=rtcp_interval,
            profile=chosen,
        )
        # Read-only copies of the options, under the names the constructor takes.
        self.profile = chosen
        self.host = host
        self.tls = tls
        #: The host of every endpoint handed out (see ``endpoint_host``).
        self.endpoint_host: str = self.options.endpoint_host
        self.modes: tuple[str, ...] = self.options.modes
        self.dave_protocol_version = dave_protocol_version
        self.dave_preferred_committer = dave_preferred_committer
        self.dave_listener = self.options.dave_listener
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = self.options.heartbeat_timeout
        self.strict_v6 = self.options.strict_v6
        self.rtcp_interval = rtcp_interval
        self.relay_options = relay
        self.stats = ServerStats()
        self.certificate: ServerCertificate | None = None

        self._port = port
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiters = Waiters()
        self._table = SessionTable(self._waiters)
        self._dave = DaveHub(self.options, self._table, self.stats, self._waiters)
        self._media = MediaPlane(
            self.options, self._table, self.stats, self._waiters, self._dave.hear, self._spawn
        )
        self._gateway = VoiceGateway(
            self.options,
            self._table,
            self._media,
            self._dave,
            self.stats,
            self._spawn,
            lambda: self.endpoint,
        )
        self._listeners = Listeners(self.host, self.endpoint_host, self._gateway.handle_ws)
        #: Every gateway event in order (see :class:`VoiceEvent`).
        self.events: list[VoiceEvent] = self._table.events
        #: Each session as its op1 was answered (version, transport, mode, DAVE), in order.
        self.selections: list[SessionInfo] = self._gateway.selections
        #: The latest receiver reports sent, in order (bounded: a long run does not grow it).
        self.rtcp_reports: deque[SentReport] = self._media.rtcp_reports

    # -- life ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the websocket listener and the UDP socket."""
        await self._media.start()
        ssl_context = None
        if self.tls:
            hosts = dict.fromkeys((self.endpoint_host, self.host, "localhost"))
            self.certificate = local_ca().issue(tuple(hosts))
            ssl_context = self.certificate.server_context()
            trust_in_process()
        if self._minted_name:
            names.register(self.endpoint_host, self.host)
        await self._listeners.start(self._port, ssl_context)
        _log.info("voice sandbox on %s (udp %s:%d)", self.url, self.host, self.udp_port)

    async def plain_endpoint(self) -> str:
        """A ``ws://`` endpoint of this server beside its ``wss://`` one (made on first use).

        The same server, sessions and DAVE groups: a TLS server can hold discord.py's stock
        client (``wss://`` only) and a client that has no way to trust a self-signed
        certificate in one channel. Not one of :meth:`move`'s targets.
        """
        return await self._listeners.plain() if self.tls else self.endpoint

    async def close(self) -> None:
        """Close the listeners, every connection (1001) and the UDP socket."""
        # Listeners first: a client reconnecting at once must be refused, not let in again
        # while the connections close.
        await self._listeners.stop_accepting()
        await self._gateway.close_all(CLOSE_GOING_AWAY, "server shutting down")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._listeners.cleanup()
        await self._media.close()
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

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def endpoint(self) -> str:
        """``host:port`` of the first listener, as VOICE_SERVER_UPDATE hands it out."""
        return self._listeners.endpoint

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
        return self._media.udp_port

    @property
    def media_port(self) -> int:
        """The port op2 hands out: the relay's with ``relay=``, else :attr:`udp_port`."""
        return self._media.media_port

    @property
    def relay(self) -> LossyRelay | None:
        """The lossy relay in front of the media socket, with ``relay=``."""
        return self._media.relay

    @property
    def arrival_clock(self) -> ArrivalClock:
        """What puts the media socket's kernel receive stamps on the loop's clock."""
        return self._media.arrival_clock

    @property
    def dtls_certificate(self) -> DtlsCertificate | None:
        """The one DTLS certificate of every WebRTC peer (RSA profiles); None: one each."""
        return self._media.dtls_certificate

    # -- what the Discord gateway side calls -----------------------------------------------------

    def register_session(
        self, *, server_id: int, user_id: int, session_id: str, channel_id: int | None = None
    ) -> str:
        """Allow one user to identify for one guild; return the token for VOICE_SERVER_UPDATE.

        A later registration for the same guild and user replaces the earlier token.
        ``channel_id`` names the DAVE group (MLS group id); the guild id stands in without it.
        """
        self._dave.name_channel((int(server_id), int(user_id)), int(channel_id or server_id))
        return self._table.grant(int(server_id), int(user_id), str(session_id))

    async def disconnect_user(
        self, user_id: int, *, server_id: int | None = None, code: int = CLOSE_DISCONNECTED
    ) -> None:
        """Take a user out of voice (they left the channel): revoke the token, close, op13."""
        self._table.revoke(user_id, server_id)
        session = self._table.find(user_id, server_id, required=False)
        if session is None:
            return
        session.resumable = False
        if session.conn is not None:
            await session.conn.close(code, "disconnected")
        await self._gateway.end_session(session)

    # -- inspection ------------------------------------------------------------------------------

    @property
    def recordings(self) -> dict[tuple[int, int], Recording]:
        """Every recording so far, by ``(server_id, user_id)`` (a copy)."""
        return dict(self._table.recordings)

    def recording(self, user_id: int, server_id: int | None = None) -> Recording:
        """The recording of ``user_id`` (in ``server_id``, needed only if they used several).

        Raises:
            KeyError: the user never identified (or is ambiguous without ``server_id``).
        """
        matches = [
            rec
            for (sid, uid), rec in self._table.recordings.items()
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
        s = self._table.find(user_id, server_id, required=True)
        assert s is not None
        return s.info(self.dave_protocol_version)

    def close_codes(self, user_id: int) -> list[int | None]:
        """Close codes of the user's connections so far, in order (None: TCP just ended)."""
        return [e.code for e in self.events if e.kind == "closed" and e.user_id == user_id]

    # -- waiting ---------------------------------------------------------------------------------

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
            lambda: self._table.count(kind, user_id) >= count,
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
        session = self._table.find(user_id, server_id, required=True)
        assert session is not None
        if session.conn is None:
            raise KeyError(f"user {user_id} is not connected")
        await session.conn.close(code, "injected")
        if code in LEAVING_CLOSES:
            await self._gateway.end_session(session)

    async def inject_drop(self, user_id: int, *, server_id: int | None = None) -> None:
        """Abort the user's TCP connection without a close frame; the session stays resumable.

        Raises:
            KeyError: the user has no connected session.
        """
        session = self._table.find(user_id, server_id, required=True)
        assert session is not None
        conn = session.conn
        if conn is None or conn.transport is None:
            raise KeyError(f"user {user_id} is not connected")
        self._gateway.drop(conn)

    def stop_heartbeat_acks(self, user_id: int) -> None:
        """Stop answering the user's heartbeats (this and later connections)."""
        self._gateway.silenced.add(user_id)

    def resume_heartbeat_acks(self, user_id: int) -> None:
        """Answer the user's heartbeats again."""
        self._gateway.silenced.discard(user_id)

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
        session = self._table.find(user_id, server_id, required=True)
        assert session is not None
        session.resumable = False
        current = session.conn.endpoint if session.conn is not None else self.endpoint
        target = await self._listeners.other_than(current)
        if close_code is not None and session.conn is not None:
            await session.conn.close(close_code, "moved")
        return target

    # -- DAVE (legato.sandbox.voice_dave moves the groups' messages) -----------------------------

    def dave_channel(self, server_id: int, channel_id: int | None = None) -> DaveChannel:
        """The DAVE group of a channel (``channel_id`` defaults to the guild id).

        Raises:
            KeyError: no DAVE member has joined that channel.
        """
        return self._dave.channels[(server_id, channel_id or server_id)]

    def dave_channels(self) -> dict[tuple[int, int], DaveChannel]:
        """Every DAVE group so far, by ``(server_id, channel_id)`` (a copy)."""
        return dict(self._dave.channels)

    def dave_wire_frames(self, user_id: int, server_id: int | None = None) -> list[bytes]:
        """The last media payloads of ``user_id`` as the server received them (pre-listener)."""
        return self._dave.wire_frames(user_id, server_id)

    async def dave_downgrade(self, server_id: int, channel_id: int | None = None) -> None:
        """Run a transition to protocol 0 (op21, op23s, op22) in a channel."""
        channel = self.dave_channel(server_id, channel_id)
        await self._dave.deliver(server_id, channel.downgrade())

    async def dave_upgrade(self, server_id: int, channel_id: int | None = None) -> None:
        """Start a new DAVE group at protocol 1 (op24 epoch 1, op25) in a channel."""
        channel = self.dave_channel(server_id, channel_id)
        await self._dave.deliver(server_id, channel.upgrade())

    def corrupt_next_dave(self, user_id: int, op: int) -> None:
        """Fault: flip a byte in the middle of the next binary DAVE ``op`` sent to ``user_id``.

        An MLS commit (29) or welcome (30) damaged this way fails to process; the client is
        expected to answer op31 and rejoin with a fresh key package.
        """
        self._dave.corrupt_next(user_id, op)

    def hold_dave(self, user_id: int) -> None:
        """Fault: keep every DAVE message for ``user_id`` (op25 on) until :meth:`release_dave`.

        A slow DAVE group: the user's voice session is up (op4 said DAVE) but its group is not
        in force until the messages go out.
        """
        self._dave.hold(user_id)

    async def release_dave(self, user_id: int) -> None:
        """Send the DAVE messages :meth:`hold_dave` kept, in order, and stop holding them."""
        await self._dave.release(user_id)

    def hold_dave_commits(self, user_id: int) -> None:
        """Fault: keep ``user_id``'s op28 commits from the DAVE group until
        :meth:`release_dave_commits`: a commit slow on the wire, so that another member's
        commit for the same epoch arrives first and wins the race."""
        self._dave.hold_commits(user_id)

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
            lambda: self._dave.commits_held(user_id) >= count,
            timeout,
            f"{count} held commits of user {user_id}",
        )

    async def release_dave_commits(self, user_id: int) -> None:
        """Deliver the commits :meth:`hold_dave_commits` kept, in order, and stop holding."""
        await self._dave.release_commits(user_id)

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

        await self._waiters.wait_for(
            lambda: self._dave.group_holds(key, predicate), timeout, f"DAVE group of {key}"
        )
        return self._dave.channels[key]
