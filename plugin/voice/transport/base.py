"""The media transport seam: what the voice client needs from `udp` and `webrtc` alike.

The gateway core decides *what* to send; a transport supplies the transport-specific halves of
op1 (select protocol) and consumes op4 (session description), then carries Opus frames.

Lifecycle, driven by the client:
1. ``await prepare(ready)`` after op2; returns the ``d`` of op1 (``protocol``, ``data``...).
2. ``await start(session)`` with op4's ``d``; returns once media can flow (keys set, DTLS up).
3. ``send_frame(opus)`` for every 20 ms frame; never blocks, never raises for a lost packet.
4. ``await close()``; safe to call at any point and twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(slots=True)
class TransportStats:
    """Counters a transport keeps; read by the player's stats and the benchmarks.

    Loss is what the voice server reports about our stream in RTCP reception report blocks
    (RFC 3550 6.4.1): nothing until the first report arrives, and only on ``udp`` (over
    ``webrtc`` aiortc consumes the reports).

    Attributes:
        frames_sent: Frames handed to the socket.
        bytes_sent: Bytes of those packets.
        send_errors: Frames the socket refused (dropped, not queued).
        malformed_received: Datagrams from the server that were not RTP/RTCP (or not from it).
        loss_reports: Reception report blocks about our SSRC received.
        fraction_lost: The latest report's fraction of packets lost since the report before it,
            0.0 to 1.0 (an 8-bit fraction on the wire).
        packets_lost: The latest report's cumulative number of packets lost.
    """

    frames_sent: int = 0
    bytes_sent: int = 0
    send_errors: int = 0
    malformed_received: int = 0
    loss_reports: int = 0
    fraction_lost: float = 0.0
    packets_lost: int = 0


class NoMediaPath:
    """Where frames go while no transport can carry them: each is dropped and counted, here only.

    A voice client makes one and hands it to every :class:`~legato.voice.gateway.VoiceConnection`
    it creates; a frame that finds no media path (before the first connect, while reconnecting,
    after the end) is sent here, and everyone reads :attr:`frames_dropped` from it. Frames a
    transport's socket refuses are that transport's ``send_errors``.
    """

    __slots__ = ("frames_dropped",)

    def __init__(self) -> None:
        #: Frames handed over while no media path was up.
        self.frames_dropped = 0

    def send_frame(self, opus: bytes) -> None:
        """Drop ``opus`` and count it."""
        self.frames_dropped += 1


class Transport(Protocol):
    """One media path to the voice server."""

    @property
    def name(self) -> str:
        """``"udp"`` or ``"webrtc"``: the op1 ``protocol`` value."""

    @property
    def ssrc(self) -> int:
        """The audio SSRC we send with (op2's ``ssrc``)."""

    @property
    def mode(self) -> str | None:
        """The negotiated encryption mode (``udp``) or ``"dtls-srtp"`` (``webrtc``)."""

    @property
    def stats(self) -> TransportStats: ...

    async def prepare(self, ready: dict[str, Any]) -> dict[str, Any]:
        """Set up from op2's ``d`` and return op1's ``d``.

        Raises:
            TransportError: IP discovery or peer set-up failed.
        """

    async def start(self, session: dict[str, Any]) -> None:
        """Apply op4's ``d``; return when frames can be sent.

        Raises:
            TransportError: the mode is not the one asked for, or DTLS/ICE failed.
        """

    def send_frame(self, opus: bytes) -> None:
        """Packetize, encrypt and send one 20 ms Opus frame."""

    async def close(self) -> None: ...
