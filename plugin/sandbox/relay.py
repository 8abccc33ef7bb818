"""A lossy UDP relay in front of the sandbox voice server's media port: loss and reordering.

The relay behaves like a NAT between the clients and the media socket. Each client address that
sends to the relay gets its own upstream socket, so the voice server sees the relay's upstream
address: IP discovery answers with that address (as Discord's answers with a NAT's public one),
the client hands it back in op1, and whatever the server sends there (discovery replies, RTCP
receiver reports) the relay passes back to the client from the port the client sends to.

Only the client's RTP is impaired, and only on its way to the server: IP discovery and RTCP go
through untouched, so a test's set-up never depends on retries and the relay's counts compare
one to one with what the server's recording counts (``gaps`` and ``out_of_order``). Decisions
come from a seeded :class:`random.Random`, two draws a packet, so a run with the same packets and
seed drops and reorders the same ones.

Reordering swaps a packet with the next one forwarded: it is held back and sent right after its
successor. A held packet whose successor does not come within ``hold`` seconds (the end of a
stream) is sent anyway and counted as ``released``, not as reordered.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from legato.sandbox.recording import Waiters
from legato.voice.rtp import DISCOVERY_PACKET_SIZE, MalformedPacket, is_rtcp, parse_rtp

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelayOptions:
    """How the relay impairs the clients' RTP.

    Attributes:
        loss: Fraction of RTP packets dropped, in ``[0, 1)``.
        reorder: Fraction of the RTP packets not dropped that are held back and sent after the
            next one, in ``[0, 1)``.
        seed: Seed of the relay's random generator.
        hold: Seconds a held packet waits for a successor before it is sent anyway.

    Raises:
        ValueError: a fraction outside ``[0, 1)`` or a hold that is not positive.
    """

    loss: float = 0.0
    reorder: float = 0.0
    seed: int = 0
    hold: float = 0.5

    def __post_init__(self) -> None:
        for name in ("loss", "reorder"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"relay {name} must be in [0, 1), not {value!r}")
        if not self.hold > 0:
            raise ValueError(f"relay hold must be positive, not {self.hold!r}")


@dataclass
class RelayStats:
    """What the relay did.

    Attributes:
        clients: Client addresses seen (one upstream socket each).
        from_clients: Datagrams received from clients.
        from_server: Datagrams received from the server and passed back to a client.
        rtp_packets: Client datagrams that parsed as RTP (the ones that may be impaired).
        dropped: RTP packets dropped.
        reordered: RTP packets sent after a later one of their client.
        released: Held packets sent on their own because no successor came in time.
        send_errors: Datagrams a socket refused.
        dropped_packets: ``(ssrc, sequence)`` of every dropped packet, in order.
        reordered_packets: ``(ssrc, sequence)`` of every reordered packet, in order.
    """

    clients: int = 0
    from_clients: int = 0
    from_server: int = 0
    rtp_packets: int = 0
    dropped: int = 0
    reordered: int = 0
    released: int = 0
    send_errors: int = 0
    dropped_packets: list[tuple[int, int]] = field(default_factory=list)
    reordered_packets: list[tuple[int, int]] = field(default_factory=list)

    @property
    def forwarded_rtp(self) -> int:
        """RTP packets sent on to the server (not dropped, held ones once sent)."""
        return self.rtp_packets - self.dropped


@dataclass(eq=False)
class _Held:
    packet: bytes
    ssrc: int
    sequence: int
    timer: asyncio.TimerHandle


@dataclass(eq=False)
class _Client:
    address: tuple[str, int]
    upstream: socket.socket
    held: _Held | None = None


class _ListenProtocol(asyncio.DatagramProtocol):
    def __init__(self, relay: LossyRelay) -> None:
        self._relay = relay

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._relay._from_client(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a client that went away: nothing to do but note it.
        _log.debug("relay socket error: %s", exc)


class LossyRelay:
    """Forwards UDP between clients and ``target``, dropping and reordering the clients' RTP.

    Args:
        target: The media socket's ``(host, port)``.
        options: Loss, reordering, seed.
        host: Address the relay listens on (and binds its upstream sockets to).
    """

    def __init__(
        self, target: tuple[str, int], options: RelayOptions, *, host: str = "127.0.0.1"
    ) -> None:
        self.target = target
        self.options = options
        self.host = host
        self.stats = RelayStats()
        self._rng = random.Random(options.seed)
        self._listen: asyncio.DatagramTransport | None = None
        self._port = 0
        self._clients: dict[tuple[str, int], _Client] = {}
        self._waiters = Waiters()

    async def start(self) -> None:
        """Bind the socket clients send to."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _ListenProtocol(self), local_addr=(self.host, 0)
        )
        self._listen = transport
        self._port = int(transport.get_extra_info("sockname")[1])
        _log.info(
            "lossy relay %s:%d -> %s:%d (loss %g, reorder %g, seed %d)",
            self.host,
            self._port,
            *self.target,
            self.options.loss,
            self.options.reorder,
            self.options.seed,
        )

    async def close(self) -> None:
        """Send what is held, close every socket."""
        for client in list(self._clients.values()):
            self._release(client)
        loop = asyncio.get_running_loop()
        for client in self._clients.values():
            loop.remove_reader(client.upstream.fileno())
            client.upstream.close()
        self._clients.clear()
        if self._listen is not None:
            self._listen.close()
            self._listen = None

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
    def port(self) -> int:
        """The port clients send to (op2's ``port`` when the server runs behind the relay)."""
        return self._port

    @property
    def holding(self) -> int:
        """Packets held back right now."""
        return sum(1 for c in self._clients.values() if c.held is not None)

    async def wait_idle(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Return once no packet is held back (every one not dropped has been sent on).

        Raises:
            TimeoutError: a packet was still held after ``timeout`` seconds.
        """
        await self._waiters.wait_for(lambda: self.holding == 0, timeout, "the relay to be idle")

    async def wait_rtp_packets(self, count: int, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Return once ``count`` RTP packets from clients have been read (dropped ones included).

        Raises:
            TimeoutError: fewer had arrived after ``timeout`` seconds.
        """
        await self._waiters.wait_for(
            lambda: self.stats.rtp_packets >= count, timeout, f"{count} RTP packets at the relay"
        )

    # -- forwarding ------------------------------------------------------------------------------

    def _from_client(self, data: bytes, addr: tuple[str, int]) -> None:
        self.stats.from_clients += 1
        client = self._clients.get(addr) or self._new_client(addr)
        if client is None:
            return
        if (len(data) == DISCOVERY_PACKET_SIZE and data[:2] == b"\x00\x01") or is_rtcp(data):
            self._send_up(client, data)
            return
        try:
            header = parse_rtp(data).header
        except MalformedPacket:
            self._send_up(client, data)  # the server counts it
            return
        self.stats.rtp_packets += 1
        self._impair(client, data, (header.ssrc, header.sequence))
        self._waiters.notify()

    def _impair(self, client: _Client, data: bytes, packet: tuple[int, int]) -> None:
        # Two draws every packet, whatever the first decides, so one packet's fate does not
        # shift the stream of numbers the next ones get.
        drop = self._rng.random() < self.options.loss
        hold = self._rng.random() < self.options.reorder
        if drop:
            self.stats.dropped += 1
            self.stats.dropped_packets.append(packet)
            return
        held = client.held
        if held is None and hold:
            loop = asyncio.get_running_loop()
            timer = loop.call_later(self.options.hold, self._release, client)
            client.held = _Held(data, *packet, timer)
            return
        self._send_up(client, data)
        if held is not None:
            held.timer.cancel()
            client.held = None
            self._send_up(client, held.packet)
            self.stats.reordered += 1
            self.stats.reordered_packets.append((held.ssrc, held.sequence))

    def _release(self, client: _Client) -> None:
        held, client.held = client.held, None
        if held is None:
            return
        held.timer.cancel()
        self.stats.released += 1
        self._send_up(client, held.packet)
        self._waiters.notify()

    def _new_client(self, addr: tuple[str, int]) -> _Client | None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        upstream = socket.socket(family, socket.SOCK_DGRAM)
        try:
            upstream.setblocking(False)
            upstream.bind((self.host, 0))
        except OSError as exc:
            upstream.close()
            self.stats.send_errors += 1
            _log.warning("relay: no upstream socket for %s:%d: %s", *addr, exc)
            return None
        client = _Client(addr, upstream)
        self._clients[addr] = client
        self.stats.clients += 1
        asyncio.get_running_loop().add_reader(upstream.fileno(), self._from_server, client)
        return client

    def _send_up(self, client: _Client, data: bytes) -> None:
        try:
            client.upstream.sendto(data, self.target)
        except OSError:
            self.stats.send_errors += 1

    def _from_server(self, client: _Client) -> None:
        while True:
            try:
                data, _addr = client.upstream.recvfrom(65536)
            except BlockingIOError:
                return
            except OSError as exc:  # ICMP unreachable reported on the socket: skip it
                _log.debug("relay upstream error: %s", exc)
                return
            self.stats.from_server += 1
            if self._listen is None:
                return
            self._listen.sendto(data, client.address)
