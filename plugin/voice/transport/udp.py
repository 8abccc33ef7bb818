"""Transport ``udp``: Discord's bot path, RTP over a plain datagram socket.

IP discovery, then per frame: RTP header (payload type 120, sequence +1, timestamp +960),
AEAD encryption in the mode op4 confirmed, one non-blocking ``sendto`` from the event loop.
A frame that cannot be sent right away is dropped and counted: late audio is worse than lost
audio, so nothing is buffered. Every 250 frames (5 s of audio) an RTCP sender report follows.
RTCP reports from the server about our SSRC feed the loss figures of :class:`TransportStats`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Sequence
from typing import Any, Final

from legato.errors import TransportError
from legato.voice.crypto import PacketEncryptor, UnsupportedMode, choose_mode
from legato.voice.rtp import (
    NTP_UNIX_OFFSET,
    OPUS_PAYLOAD_TYPE,
    MalformedPacket,
    ReceiverReport,
    RtcpPacket,
    RtpSequencer,
    SenderReport,
    discovery_request,
    is_rtcp,
    pack_sender_report,
    parse_discovery_response,
    parse_rtcp,
)
from legato.voice.transport.base import TransportStats

_log = logging.getLogger(__name__)

#: A sender report every 250 frames: 5 s of audio, Discord's clients report about as often.
SENDER_REPORT_FRAMES: Final = 250
#: Bytes of an IP discovery reply: type, length, ssrc, 64-byte address, port.
_DISCOVERY_REPLY_LEN: Final = 74


class _DatagramProtocol(asyncio.DatagramProtocol):
    """Routes received datagrams: the discovery reply to a waiter, anything else is counted."""

    def __init__(self, owner: UdpTransport) -> None:
        self._owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._owner._datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends: the next frame may well get through.
        self._owner.stats.send_errors += 1
        _log.debug("udp error received: %s", exc)


class UdpTransport:
    """RTP over UDP to a voice server; one instance per voice session.

    Args:
        modes: The encryption modes we support, best first; ``None`` means every mode
            ``legato.voice.crypto`` implements.
        discovery_timeout: Seconds to wait for each IP discovery reply.
        discovery_attempts: How many discovery requests to send before giving up.
    """

    def __init__(
        self,
        *,
        modes: Sequence[str] | None = None,
        discovery_timeout: float = 2.0,
        discovery_attempts: int = 5,
    ) -> None:
        self._modes = tuple(modes) if modes is not None else None
        self._discovery_timeout = discovery_timeout
        self._discovery_attempts = max(1, discovery_attempts)
        self._stats = TransportStats()
        self._ssrc = 0
        self._mode: str | None = None
        self._server: tuple[str, int] | None = None
        self._sock: socket.socket | None = None
        self._dgram: asyncio.DatagramTransport | None = None
        self._discovery: asyncio.Future[bytes] | None = None
        self._encryptor: PacketEncryptor | None = None
        self._sequencer: RtpSequencer | None = None
        self._frames_since_report = 0
        self._payload_octets = 0
        self._closed = False
        #: Well-formed packets from the server (RTCP reports, others' audio); not decoded.
        self.packets_received = 0
        self._report_waiters: list[tuple[int, asyncio.Future[None]]] = []

    # -- Transport protocol --------------------------------------------------------------

    @property
    def name(self) -> str:
        return "udp"

    @property
    def ssrc(self) -> int:
        return self._ssrc

    @property
    def mode(self) -> str | None:
        return self._mode

    @property
    def stats(self) -> TransportStats:
        return self._stats

    @property
    def local_address(self) -> tuple[str, int] | None:
        """The socket's bound ``(host, port)``, once prepared."""
        if self._sock is None:
            return None
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    async def prepare(self, ready: dict[str, Any]) -> dict[str, Any]:
        """Open the socket, run IP discovery against op2's address and pick a mode.

        Args:
            ready: op2's ``d``: ``ssrc``, ``ip``, ``port``, ``modes``.

        Returns:
            op1's ``d`` for ``udp``.

        Raises:
            TransportError: no mode in common, the socket failed, or discovery went unanswered.
        """
        if self._closed:
            raise TransportError("udp transport is closed")
        try:
            self._ssrc = int(ready["ssrc"])
            server = (str(ready["ip"]), int(ready["port"]))
            offered = [str(m) for m in ready.get("modes", [])]
        except (KeyError, TypeError, ValueError) as exc:
            raise TransportError(f"op2 is missing ssrc/ip/port: {exc!r}") from exc
        if self._modes is not None:
            offered = [m for m in offered if m in self._modes]
        try:
            mode = choose_mode(offered)
        except UnsupportedMode as exc:
            raise TransportError(f"no encryption mode in common: {exc}") from exc
        self._mode = mode
        await self._open(server)
        address, port = await self._discover()
        self._sequencer = RtpSequencer(self._ssrc)
        return {
            "protocol": "udp",
            "data": {"address": address, "port": port, "mode": mode},
            "codecs": [
                {
                    "name": "opus",
                    "type": "audio",
                    "priority": 1000,
                    "payload_type": OPUS_PAYLOAD_TYPE,
                }
            ],
        }

    async def start(self, session: dict[str, Any]) -> None:
        """Apply op4: check the mode and install the secret key.

        Raises:
            TransportError: op4 names a mode we did not select, or its key is not 32 bytes.
        """
        if self._sock is None or self._closed:
            raise TransportError("udp transport is not prepared")
        mode = session.get("mode")
        if self._mode is None or mode != self._mode:
            raise TransportError(f"op4 mode {mode!r} is not the selected {self._mode!r}")
        try:
            key = bytes(session["secret_key"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TransportError("op4 carries no usable secret_key") from exc
        if len(key) != 32:
            raise TransportError(f"op4 secret_key has {len(key)} bytes, expected 32")
        self._encryptor = PacketEncryptor(self._mode, key)

    def send_frame(self, opus: bytes) -> None:
        """Packetize, encrypt and send one frame; a frame that cannot go out now is dropped."""
        encryptor = self._encryptor
        sequencer = self._sequencer
        sock = self._sock
        server = self._server
        if encryptor is None or sequencer is None or sock is None or server is None:
            self._stats.send_errors += 1
            return
        packet = encryptor.encrypt(sequencer.next_header(), opus)
        try:
            sock.sendto(packet, server)
        except OSError:  # BlockingIOError included: drop rather than queue stale audio
            self._stats.send_errors += 1
            return
        stats = self._stats
        stats.frames_sent += 1
        stats.bytes_sent += len(packet)
        self._payload_octets += len(opus)
        since = self._frames_since_report + 1
        if since >= SENDER_REPORT_FRAMES:
            self._frames_since_report = 0
            self._send_report(sock, server, sequencer.timestamp)
        else:
            self._frames_since_report = since

    async def wait_loss_reports(self, count: int) -> None:
        """Return once ``count`` reception reports about our SSRC have arrived in all.

        No timeout of its own: wrap it in ``asyncio.timeout``. Closing the transport cancels it.
        """
        if self._stats.loss_reports >= count:
            return
        if self._closed:
            raise TransportError("udp transport is closed")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (count, waiter)
        self._report_waiters.append(entry)
        try:
            await waiter
        finally:
            self._report_waiters.remove(entry)

    async def close(self) -> None:
        """Close the socket; safe to call twice and before ``prepare``."""
        self._closed = True
        for _count, waiter in self._report_waiters:
            waiter.cancel()
        self._encryptor = None
        if self._discovery is not None and not self._discovery.done():
            self._discovery.cancel()
        if self._dgram is not None:
            self._dgram.close()
            self._dgram = None
        self._sock = None

    # -- internals -----------------------------------------------------------------------

    async def _open(self, server: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(
                server[0], server[1], family=socket.AF_INET, type=socket.SOCK_DGRAM
            )
            self._server = (str(infos[0][4][0]), int(infos[0][4][1]))
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.bind(("0.0.0.0", 0))
            dgram, _ = await loop.create_datagram_endpoint(
                lambda: _DatagramProtocol(self), sock=sock
            )
        except OSError as exc:
            raise TransportError(f"udp socket to {server[0]}:{server[1]} failed: {exc}") from exc
        self._sock = sock
        self._dgram = dgram

    async def _discover(self) -> tuple[str, int]:
        assert self._sock is not None
        assert self._server is not None
        loop = asyncio.get_running_loop()
        request = discovery_request(self._ssrc)
        for attempt in range(1, self._discovery_attempts + 1):
            self._discovery = loop.create_future()
            try:
                self._sock.sendto(request, self._server)
            except OSError as exc:
                raise TransportError(f"udp ip discovery send failed: {exc}") from exc
            try:
                async with asyncio.timeout(self._discovery_timeout):
                    reply = await self._discovery
            except TimeoutError:
                _log.debug("ip discovery attempt %d timed out", attempt)
                continue
            finally:
                self._discovery = None
            try:
                address, port = parse_discovery_response(reply)
            except MalformedPacket as exc:
                raise TransportError(f"bad ip discovery reply: {exc}") from exc
            return address, port
        raise TransportError(
            f"ip discovery with {self._server[0]}:{self._server[1]} went unanswered "
            f"{self._discovery_attempts} times"
        )

    def _datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if self._server is None or (str(addr[0]), int(addr[1])) != self._server:
            self._stats.malformed_received += 1  # not from our voice server: spoofed or stray
            return
        waiter = self._discovery
        if (
            waiter is not None
            and len(data) == _DISCOVERY_REPLY_LEN
            and data[:2] == b"\x00\x02"
            and not waiter.done()
        ):
            waiter.set_result(data)
            return
        if is_rtcp(data):
            try:
                packets = parse_rtcp(data)
            except MalformedPacket:
                self._stats.malformed_received += 1
                return
            self.packets_received += 1
            self._note_reports(packets)
            return
        # RTP version 2 and room for a header; anything else is garbage.
        if len(data) >= 8 and data[0] & 0xC0 == 0x80:
            self.packets_received += 1
        else:
            self._stats.malformed_received += 1

    def _note_reports(self, packets: Sequence[RtcpPacket]) -> None:
        stats = self._stats
        for packet in packets:
            if not isinstance(packet, ReceiverReport | SenderReport):
                continue
            for block in packet.reports:
                if block.ssrc != self._ssrc:
                    continue  # about another sender (or a stale SSRC of ours)
                stats.loss_reports += 1
                stats.fraction_lost = block.fraction_lost / 256
                stats.packets_lost = block.cumulative_lost
        for count, waiter in self._report_waiters:
            if stats.loss_reports >= count and not waiter.done():
                waiter.set_result(None)

    def _send_report(
        self, sock: socket.socket, server: tuple[str, int], rtp_timestamp: int
    ) -> None:
        # The SR maps wallclock (NTP) to the RTP timestamp of the next frame: wall time is
        # what the field means, so time.time() here is not pacing.
        report = pack_sender_report(
            self._ssrc,
            ntp_time=time.time() + NTP_UNIX_OFFSET,
            rtp_timestamp=rtp_timestamp,
            packet_count=self._stats.frames_sent,
            octet_count=self._payload_octets,
        )
        try:
            sock.sendto(report, server)
        except OSError:
            self._stats.send_errors += 1
