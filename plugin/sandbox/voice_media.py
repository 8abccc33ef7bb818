"""The sandbox voice server's media plane: one UDP socket, both transports, and the recordings.

:class:`MediaPlane` owns the media socket (and the lossy relay in front of it, if asked for). Each
datagram is routed here: a webrtc peer's STUN, DTLS or SRTP to its peer (through
:class:`~legato.sandbox.webrtc.SharedMediaPort`, made with the first peer), an IP discovery
request answered with the address it came from, RTCP counted, and RTP decrypted with the key of
the session its SSRC belongs to. Every media payload, from either transport, reaches
:meth:`MediaPlane.record`, where it becomes what the user is heard saying (after the DAVE
listener's view of it) or a loss. The plane also sends the ``udp`` users' receiver reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import logging
import math
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final

from legato.sandbox.crypto import DecryptionFailed
from legato.sandbox.recording import Waiters
from legato.sandbox.relay import LossyRelay
from legato.sandbox.rtp import discovery_response, pack_receiver_report, parse_discovery_request
from legato.sandbox.voice_session import (
    SentReport,
    ServerOptions,
    ServerStats,
    Session,
    SessionTable,
)
from legato.voice.rtp import (
    DISCOVERY_PACKET_SIZE,
    MalformedPacket,
    ReportBlock,
    is_rtcp,
    parse_rtcp,
    parse_rtp,
)

if TYPE_CHECKING:
    # Typing only: aiortc is imported lazily, where the webrtc path needs it.
    from legato.sandbox.webrtc import SharedMediaPort, WebRtcServerPeer
    from legato.voice.transport.aiortc_compat import DtlsCertificate

_log = logging.getLogger(__name__)

#: Bytes asked for the media socket's receive buffer (Linux caps it at net.core.rmem_max).
UDP_RECEIVE_BUFFER: Final = 4 * 1024 * 1024
#: The SSRC the sandbox's receiver reports come from (it sends no media of its own).
RTCP_SSRC: Final = 1
_REPORTS_KEPT: Final = 4096

if sys.platform == "linux":
    import fcntl

    #: The ioctl giving a socket's last receive stamp as a timespec (Linux).
    _SIOCGSTAMPNS: int | None = 0x8907
else:
    _SIOCGSTAMPNS = None
_TIMESPEC: Final = bytes(struct.calcsize("@qq"))

#: The DAVE listener's view of a media payload: the Opus heard, or None for a loss.
Hear = Callable[[Session, bytes], "bytes | None"]


#: Two monotonic reads around a realtime read this close together give a usable
#: realtime-monotonic offset (its error is at most half of it). Back to back they are well under
#: a microsecond apart; further apart, the process was held up between them.
CLOCK_READ_TOLERANCE: Final = 50e-6
#: Tries at a tight pair of reads when the clock starts (the tightest is kept if none is).
_FIRST_TRIES: Final = 100


class ArrivalClock:
    """Puts a kernel receive stamp (realtime) on a monotonic clock (the event loop's).

    The two clocks differ by an offset that only NTP slew (or a step of the wall clock) moves.
    Reading it afresh for each datagram as ``realtime() - monotonic()`` is wrong whenever the
    process is held up between the two reads (preempted: on an overloaded machine for many
    milliseconds): the offset grows by the pause, and a stamp put on the monotonic clock with
    it moves earlier by as much, so two packets 20 ms apart could be taken for 4 ms apart.
    Here each :meth:`arrival` brackets its realtime read between two monotonic ones and takes
    the offset from them only when they are less than ``tolerance`` apart; otherwise the last
    offset taken stands in (counted in :attr:`held`).

    Args:
        monotonic: The clock arrivals are put on (the loop's ``time``).
        realtime: The clock of the kernel's stamps (``time.time``).
        tolerance: The widest bracket an offset is taken from.
    """

    def __init__(
        self,
        monotonic: Callable[[], float],
        realtime: Callable[[], float] = time.time,
        *,
        tolerance: float = CLOCK_READ_TOLERANCE,
    ) -> None:
        self._monotonic = monotonic
        self._realtime = realtime
        self._tolerance = tolerance
        #: Arrivals whose clock reads were held up past ``tolerance`` (the last offset served).
        self.held = 0
        #: The longest hold between two reads seen by :meth:`arrival`, seconds.
        self.longest_hold = 0.0
        best = (math.inf, 0.0)
        for _ in range(_FIRST_TRIES):
            _now, hold, offset = self._bracket()
            best = min(best, (hold, offset))
            if hold <= tolerance:
                break
        self._offset = best[1]

    def _bracket(self) -> tuple[float, float, float]:
        """A realtime read between two monotonic ones: the first monotonic read, the time
        between the two (how long this process was held up), and the offset they give."""
        before = self._monotonic()
        real = self._realtime()
        after = self._monotonic()
        return before, after - before, real - (before + after) / 2

    @property
    def offset(self) -> float:
        """The realtime clock's lead over the monotonic one, as last measured."""
        return self._offset

    def arrival(self, stamped: float | None) -> float:
        """``stamped`` (realtime, or None: not stamped) on the monotonic clock, never later than
        now (the datagram has been read by now, so it arrived by then)."""
        now, hold, offset = self._bracket()
        if hold <= self._tolerance:
            self._offset = offset
        else:
            self.held += 1
            self.longest_hold = max(self.longest_hold, hold)
        if stamped is None:
            return now
        return min(now, stamped - self._offset)


class _MediaProtocol(asyncio.DatagramProtocol):
    """The media socket's datagrams, each with the time it reached the socket.

    That time is the kernel's receive stamp (Linux's ``SIOCGSTAMPNS`` of the datagram just
    read), put on the event loop's clock by an :class:`ArrivalClock`: the recordings then show
    when a packet arrived, not when this loop got round to it, so a pause of the sandbox's own
    loop (100 streams are 5,000 datagrams a second) is not mistaken for the sender's. Where the
    kernel does not stamp, the loop's time on reading stands in.
    """

    def __init__(
        self,
        on_datagram: Callable[[bytes, tuple[str, int], float], None],
        clock: ArrivalClock,
    ) -> None:
        self._on_datagram = on_datagram
        self._clock = clock
        self._fd: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is None or _SIOCGSTAMPNS is None:
            return
        self._fd = sock.fileno()
        self._stamp()  # the first ask turns the socket's stamping on (and finds none yet)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        arrival = self._clock.arrival(self._stamp())
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


class MediaPlane:
    """The media socket, the relay, the webrtc peers' shared port and the receiver reports.

    Args:
        options: the server's options (host, relay, RTCP interval, profile).
        table: where an SSRC finds its session.
        stats: the server's counters.
        waiters: woken after each round of receiver reports.
        hear: the DAVE listener's view of a payload (:meth:`DaveHub.hear
            <legato.sandbox.voice_dave.DaveHub.hear>`).
        spawn: runs a task the server owns (and cancels on close).
    """

    def __init__(
        self,
        options: ServerOptions,
        table: SessionTable,
        stats: ServerStats,
        waiters: Waiters,
        hear: Hear,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self._options = options
        self._table = table
        self._stats = stats
        self._waiters = waiters
        self._hear = hear
        self._spawn = spawn
        #: The latest receiver reports sent, in order (bounded: a long run does not grow it).
        self.rtcp_reports: deque[SentReport] = deque(maxlen=_REPORTS_KEPT)
        #: The one DTLS certificate of every WebRTC peer (RSA profiles); None: one each.
        self.dtls_certificate: DtlsCertificate | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._udp_port = 0
        self._relay: LossyRelay | None = None
        #: The webrtc peers' demultiplexer on the media socket, made with the first peer.
        self._webrtc_port: SharedMediaPort | None = None
        self._arrival_clock: ArrivalClock | None = None

    async def start(self) -> None:
        """Bind the media socket (and the relay), start the reports, make the DTLS certificate."""
        host = self._options.host
        loop = asyncio.get_running_loop()
        clock = self._arrival_clock = ArrivalClock(loop.time)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _MediaProtocol(self._on_datagram, clock), local_addr=(host, 0)
        )
        self._udp = transport
        self._udp_port = int(transport.get_extra_info("sockname")[1])
        # One socket takes every client's media: at 100 streams that is 5,000 datagrams a
        # second, and the default receive buffer (about 270 of them) overflows on a 50 ms loop
        # stall, losing IP discovery requests with the audio. A voice server sizes it up.
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
        if self._options.relay is not None:
            self._relay = LossyRelay((host, self._udp_port), self._options.relay, host=host)
            await self._relay.start()
        if self._options.rtcp_interval is not None:
            self._spawn(self._report_loop(self._options.rtcp_interval))
        if self._options.profile.dtls_key_type == "rsa":
            await self._make_dtls_certificate()

    async def _make_dtls_certificate(self) -> None:
        """One RSA certificate for every peer, as a medooze media server holds: made once here
        (RSA 2048 generation is CPU work, off the loop), not on every (re)connect."""
        try:
            module = importlib.import_module("legato.sandbox.webrtc")
        except ImportError:
            return  # no aiortc: webrtc is refused anyway
        loop = asyncio.get_running_loop()
        key_type = self._options.profile.dtls_key_type
        self.dtls_certificate = await loop.run_in_executor(
            None, module.DtlsCertificate.generate, key_type
        )

    async def close(self) -> None:
        """Close the relay and the media socket."""
        if self._relay is not None:
            await self._relay.close()
        if self._udp is not None:
            self._udp.close()
            self._udp = None

    @property
    def udp_port(self) -> int:
        """The media socket's port."""
        return self._udp_port

    @property
    def media_port(self) -> int:
        """The port op2 hands out: the relay's, if there is one, else :attr:`udp_port`."""
        return self._relay.port if self._relay is not None else self._udp_port

    @property
    def relay(self) -> LossyRelay | None:
        """The lossy relay in front of the media socket, if asked for."""
        return self._relay

    @property
    def arrival_clock(self) -> ArrivalClock:
        """What puts the media socket's receive stamps on the loop's clock (its ``held`` and
        ``longest_hold`` say how often this process was held up between its clock reads)."""
        assert self._arrival_clock is not None, "start() first"
        return self._arrival_clock

    # -- webrtc ----------------------------------------------------------------------------------

    def new_peer(self, module: Any, session: Session, *, gated: bool) -> WebRtcServerPeer:
        """A webrtc peer for ``session`` on the shared media port, recording what it receives.

        Args:
            module: :mod:`legato.sandbox.webrtc`, imported by the caller (it may be missing).
            session: whose audio the peer receives.
            gated: record only SSRCs an answered op12 published (the Spacebar profile).
        """

        def on_rtp(ssrc: int, sequence: int, timestamp: int, opus: bytes) -> None:
            if gated and ssrc not in session.published:
                self._stats.unpublished_packets += 1
                return
            self._stats.rtp_packets += 1
            now = asyncio.get_running_loop().time()
            self.record(session, now, ssrc, sequence, timestamp, opus)

        if self._webrtc_port is None:
            assert self._udp is not None, "start() first"
            # op2's port serves webrtc too, as a Discord voice server's one media port does.
            self._webrtc_port = module.SharedMediaPort(self._udp, self.media_port)
        peer: WebRtcServerPeer = module.WebRtcServerPeer(
            self._options.host,
            on_rtp=on_rtp,
            key_type=self._options.profile.dtls_key_type,
            certificate=self.dtls_certificate,
            shared=self._webrtc_port,
        )
        return peer

    # -- udp -------------------------------------------------------------------------------------

    def _on_datagram(self, data: bytes, addr: tuple[str, int], arrival: float) -> None:
        stats = self._stats
        stats.udp_datagrams += 1
        if self._webrtc_port is not None and self._webrtc_port.datagram_received(data, addr):
            return  # a webrtc peer's STUN, DTLS or SRTP
        try:
            if len(data) == DISCOVERY_PACKET_SIZE and data[:2] == b"\x00\x01":
                ssrc = parse_discovery_request(data)
                stats.discovery_requests += 1
                if self._udp is not None:
                    self._udp.sendto(discovery_response(ssrc, addr[0], addr[1]), addr)
                return
            if is_rtcp(data):
                parse_rtcp(data)
                stats.rtcp_packets += 1
                return
            parsed = parse_rtp(data)
        except MalformedPacket:
            stats.malformed_packets += 1
            return
        session = self._table.by_ssrc.get(parsed.header.ssrc)
        if session is None or session.decryptor is None:
            stats.unknown_ssrc_packets += 1
            return
        try:
            rtp, opus = session.decryptor.decrypt(data, parsed)
        except DecryptionFailed:
            stats.undecryptable_packets += 1
            return
        except MalformedPacket:
            stats.malformed_packets += 1
            return
        stats.rtp_packets += 1
        header = rtp.header
        self.record(session, arrival, header.ssrc, header.sequence, header.timestamp, opus)

    def record(
        self,
        session: Session,
        arrival: float,
        ssrc: int,
        sequence: int,
        timestamp: int,
        opus: bytes,
    ) -> None:
        """The one place a media payload becomes what the user is heard saying, or a loss."""
        opened = self._hear(session, opus)
        if opened is None:
            session.recording.add_lost(
                arrival=arrival, ssrc=ssrc, sequence=sequence, timestamp=timestamp
            )
            return
        session.recording.add_packet(
            arrival=arrival, ssrc=ssrc, sequence=sequence, timestamp=timestamp, opus=opened
        )

    # -- RTCP ------------------------------------------------------------------------------------

    async def _report_loop(self, interval: float) -> None:
        # A plain period: reports are sampled, their timing carries no meaning.
        while True:
            await asyncio.sleep(interval)
            self.send_receiver_reports()

    def send_receiver_reports(self) -> None:
        """One RR per udp session heard from since its last one (RFC 3550 6.4.2, A.3)."""
        if self._udp is None:
            return
        for session in list(self._table.sessions.values()):
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
            self._stats.rtcp_reports_sent += 1
            self.rtcp_reports.append(
                SentReport(
                    session.grant.user_id, session.grant.server_id, reception.received, block
                )
            )
        self._waiters.notify()
