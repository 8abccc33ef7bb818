"""The sandbox voice server's side of the ``webrtc`` transport: one aiortc peer per client.

:meth:`WebRtcServerPeer.accept` turns op1's offer fragment into a full offer, answers it with
aiortc and returns op4's ``sdp`` fragment. The peer is ICE controlled and the DTLS server; its
one host candidate is on ``host``. The client's op1 carries no candidates, so the client's
connectivity checks introduce its address (aioice learns a peer-reflexive candidate from the
first authenticated check and answers with a triggered check, RFC 8445 section 7.3.1.3; with no
remote candidates and no end-of-candidates it keeps waiting for them instead of failing).

Received audio is reported at the RTP level, undecoded: ``on_rtp(ssrc, sequence, timestamp,
opus)`` for every packet. aiortc has no public hook for that and builds its receivers itself,
so the peer replaces the ``_handle_rtp_packet`` coroutine of its one receiver *instance* (the
DTLS transport's RTP router calls it after SRTP decryption). aiortc's own depacketizing,
jitter buffer and decoder never run: nobody would read their output, and the sandbox records
the exact bytes the client sent.

An op1 without a fingerprint is accepted, as Discord accepted the seed capture's (Firefox writes
its fingerprint at session level, so the browser's fragment carried none, and the call went on):
the client's DTLS certificate is then taken unverified. A fingerprint that is given must match.
aiortc insists on one, so the offer carries a placeholder and the peer's DTLS transport skips the
check for that connection only (:attr:`WebRtcServerPeer.client_verified` says which it was).

op4 is answered in the capture's shape: the fingerprint line twice, Discord's candidate line
(``1 1 UDP 4261412862 IP PORT typ host``) and, given a :class:`SharedMediaPort`, the media port
of op2. A Discord voice server has one media port for every user and transport; so does the
sandbox: each peer's ICE agent gathers as aiortc does, then sends through the voice server's
media socket instead of its own, and :meth:`SharedMediaPort.datagram_received` hands the
socket's STUN, DTLS and SRTP datagrams to the peer they belong to (RFC 7983's demultiplexing: a
STUN request names its peer by ICE username, and its source address is that peer's from then on).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any, Final, Protocol

from aioice import stun
from aioice.ice import StunProtocol
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.rtp import RtpPacket

from legato.errors import TransportError
from legato.sandbox.sdp import build_remote_offer
from legato.voice import sdp
from legato.voice.transport.aiortc_compat import (
    DtlsCertificate,
    KeyType,
    host_addresses,
    use_certificate,
)

_log = logging.getLogger(__name__)

RtpCallback = Callable[[int, int, int, bytes], None]

#: Stands in for the fingerprint an op1 did not carry; never matches a certificate (all zero).
_NO_FINGERPRINT: Final = ":".join(["00"] * 32)
#: op4's candidate as the seed capture's Discord server wrote it (foundation 1, ``UDP``).
CANDIDATE_PRIORITY: Final = 4261412862
#: RFC 5389: every STUN message carries this cookie at bytes 4..8; IP discovery does not.
_STUN_COOKIE: Final = b"\x21\x12\xa4\x42"


def discord_candidate(address: str, port: int) -> str:
    """op4's one host candidate in the capture's format (the value after ``a=candidate:``)."""
    return f"1 1 UDP {CANDIDATE_PRIORITY} {address} {port} typ host"


def is_stun(data: bytes) -> bool:
    """A STUN message (RFC 7983: first byte 0-3, then the magic cookie)."""
    return len(data) >= 20 and data[0] < 4 and data[4:8] == _STUN_COOKIE


class MediaSocket(Protocol):
    """The voice server's media socket, as a peer sends through it."""

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        """Send one datagram to ``addr``."""


class _SharedTransport(asyncio.DatagramTransport):
    """What an aioice protocol sends through once it is moved onto the shared socket."""

    def __init__(self, media: MediaSocket) -> None:
        super().__init__()
        self._media: MediaSocket | None = media

    def sendto(self, data: bytes | bytearray | memoryview, addr: Any = None) -> None:
        if self._media is not None and addr is not None:
            self._media.sendto(bytes(data), (str(addr[0]), int(addr[1])))

    def close(self) -> None:
        self._media = None  # the socket is the server's: closing a peer leaves it open

    def is_closing(self) -> bool:
        return self._media is None


class SharedMediaPort:
    """op2's media port, shared by every ``webrtc`` peer of a voice server.

    Args:
        media: The server's media socket; peers send their STUN, DTLS and SRTP through it.
        port: The port clients reach it on (op2's ``port``: a relay's, if one is in front).
    """

    def __init__(self, media: MediaSocket, port: int) -> None:
        self._media = media
        self.port = port
        self._by_ufrag: dict[str, WebRtcServerPeer] = {}
        self._by_addr: dict[tuple[str, int], WebRtcServerPeer] = {}

    @property
    def media(self) -> MediaSocket:
        """The socket peers send through."""
        return self._media

    def attach(self, ufrag: str, peer: WebRtcServerPeer) -> None:
        """Route STUN requests for the ICE username fragment ``ufrag`` to ``peer``."""
        self._by_ufrag[ufrag] = peer

    def detach(self, peer: WebRtcServerPeer) -> None:
        """Forget ``peer``'s username fragment and addresses."""
        for ufrag in [u for u, p in self._by_ufrag.items() if p is peer]:
            del self._by_ufrag[ufrag]
        for addr in [a for a, p in self._by_addr.items() if p is peer]:
            del self._by_addr[addr]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> bool:
        """Hand a datagram to its peer; False when it belongs to none (``udp`` media, noise)."""
        if is_stun(data):
            try:
                message = stun.parse_message(data)
            except ValueError:
                return False
            username = message.attributes.get("USERNAME")
            if message.message_class == stun.Class.REQUEST and isinstance(username, str):
                # RFC 8445 7.2.2: USERNAME is "<receiver's ufrag>:<sender's ufrag>".
                peer = self._by_ufrag.get(username.partition(":")[0])
                if peer is not None:
                    self._by_addr[addr] = peer
        peer = self._by_addr.get(addr)
        if peer is None:
            return False
        peer.datagram_received(data, addr)
        return True


def _take_any_certificate(_remote: object) -> None:
    """Stands in for aiortc's fingerprint check when op1 carried no fingerprint."""


class WebRtcServerPeer:
    """The server end of one client's WebRTC connection.

    Args:
        host: The address to gather the one host candidate on (``127.0.0.1`` in tests).
        on_rtp: Called with ``(ssrc, sequence, timestamp, opus_payload)`` for every audio RTP
            packet received, in arrival order. Exceptions it raises are logged, not propagated
            into aiortc.
        key_type: The DTLS certificate's key: ``"ecdsa"`` (browsers, aiortc) or ``"rsa"``
            (medooze-based servers; only clients offering RSA suites can connect).
        certificate: Use this certificate (a server's one, shared by its peers) instead of
            generating one of ``key_type``.
        shared: The server's media port: ICE, DTLS and SRTP go through it and op4 names its
            port. None: the peer keeps the port aiortc bound for it (standalone tests).
    """

    def __init__(
        self,
        host: str,
        on_rtp: RtpCallback,
        *,
        key_type: KeyType = "ecdsa",
        certificate: DtlsCertificate | None = None,
        shared: SharedMediaPort | None = None,
    ) -> None:
        self._host = host
        self._shared = shared
        self._ice: list[StunProtocol] = []
        self._on_rtp = on_rtp
        self._key_type: KeyType = key_type
        self._certificate = certificate
        self._pc: RTCPeerConnection | None = None
        self._payload_type: int | None = None
        self._connected = asyncio.Event()
        self._state = "new"
        self._closed = False
        self._client_verified = True

    @property
    def client_verified(self) -> bool:
        """False once :meth:`accept` took an op1 without a fingerprint (DTLS left unverified)."""
        return self._client_verified

    @property
    def connection_state(self) -> str:
        """aiortc's connection state: ``new``, ``connecting``, ``connected``, ``failed``..."""
        return self._state

    @property
    def payload_type(self) -> int | None:
        """The client's Opus payload type, once :meth:`accept` has run."""
        return self._payload_type

    async def accept(self, offer_fragment: str, codecs: list[dict[str, Any]]) -> str:
        """Answer op1: return the ``sdp`` fragment for op4.

        Args:
            offer_fragment: op1's ``sdp`` (or ``data``).
            codecs: op1's ``codecs``; the Opus entry's payload type is used. When empty, the
                fragment's ``opus`` rtpmap decides.

        Raises:
            TransportError: the fragment is unusable, or aiortc refused the offer.
        """
        if self._pc is not None or self._closed:
            raise TransportError("accept() called twice or after close()")
        try:
            fragment = sdp.OfferFragment.parse(offer_fragment)
            pt = self._opus_payload_type(fragment, codecs)
            if fragment.fingerprint is None:
                self._client_verified = False
                fragment = dataclasses.replace(fragment, fingerprint=_NO_FINGERPRINT)
            offer = build_remote_offer(fragment, opus_payload_type=pt)
        except sdp.SdpError as exc:
            raise TransportError(f"bad webrtc offer fragment: {exc}") from exc
        self._payload_type = pt
        loop = asyncio.get_running_loop()
        # Key generation (RSA especially) is CPU work: keep it off the event loop.
        certificate = self._certificate
        if certificate is None:
            certificate = await loop.run_in_executor(None, DtlsCertificate.generate, self._key_type)
        pc = RTCPeerConnection()
        use_certificate(pc, certificate)
        self._pc = pc
        pc.on("connectionstatechange", self._on_state)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
            (transceiver,) = pc.getTransceivers()
            # See the module docstring: raw payloads straight from the RTP router.
            transceiver.receiver._handle_rtp_packet = self._handle_rtp_packet  # type: ignore[method-assign]  # deliberate, see module docstring
            if not self._client_verified:
                # See the module docstring: no fingerprint in op1, no check of the client's.
                dtls = transceiver.receiver.transport
                dtls._validate_peer_identity = _take_any_certificate  # type: ignore[method-assign,assignment]  # deliberate, see module docstring
            answer = await pc.createAnswer()
            with host_addresses(lambda _found: [self._host]):
                await pc.setLocalDescription(answer)
            found = sdp.ServerFragment.from_answer(pc.localDescription.sdp)
            port = found.port if self._shared is None else self._share(transceiver)
            answer_fragment = dataclasses.replace(
                found, port=port, candidates=(discord_candidate(found.address, port),)
            )
            return answer_fragment.render()
        except (ValueError, OSError, sdp.SdpError) as exc:
            raise TransportError(f"cannot answer the webrtc offer: {exc}") from exc

    def _share(self, transceiver: Any) -> int:
        """Move this peer's ICE onto the shared media socket; return its port."""
        shared = self._shared
        assert shared is not None
        # aiortc exposes no socket: its gatherer's aioice connection holds one protocol per
        # host candidate, each with the transport it sends through.
        connection = transceiver.receiver.transport.transport.iceGatherer._connection
        for protocol in connection._protocols:
            own = protocol.transport
            protocol.transport = _SharedTransport(shared.media)
            protocol.local_candidate.port = shared.port
            own.close()
            self._ice.append(protocol)
        shared.attach(connection.local_username, self)
        return shared.port

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        """A datagram for this peer from the shared media socket (see :class:`SharedMediaPort`)."""
        if self._ice and not self._closed:
            self._ice[0].datagram_received(data, addr)

    @staticmethod
    def _opus_payload_type(fragment: sdp.OfferFragment, codecs: list[dict[str, Any]]) -> int:
        if codecs:
            return sdp.opus_payload_type(codecs)
        for pt, encoding in fragment.rtpmaps:
            if encoding.lower().startswith("opus/") and pt != sdp.RESERVED_PAYLOAD_TYPE:
                return pt
        raise sdp.SdpError("no opus codec offered")

    async def _handle_rtp_packet(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        if packet.payload_type != self._payload_type:
            return
        try:
            self._on_rtp(packet.ssrc, packet.sequence_number, packet.timestamp, packet.payload)
        except Exception:  # noqa: BLE001 - a callback bug must not stop aiortc's receive loop
            _log.exception("on_rtp failed for ssrc %d seq %d", packet.ssrc, packet.sequence_number)

    def _on_state(self) -> None:
        if self._pc is None:
            return
        self._state = self._pc.connectionState
        _log.debug("server peer connection state %s", self._state)
        if self._state in ("connected", "failed", "closed"):
            self._connected.set()

    async def wait_connected(self) -> None:
        """Return once ICE and DTLS are up (callers bound it with ``asyncio.timeout``).

        Raises:
            TransportError: the connection failed or was closed instead.
        """
        await self._connected.wait()
        if self._state != "connected":
            raise TransportError(f"webrtc connection {self._state}")

    async def close(self) -> None:
        """Close the peer connection; safe twice and before :meth:`accept`."""
        if self._closed:
            return
        self._closed = True
        self._state = "closed"
        self._connected.set()
        if self._shared is not None:
            self._shared.detach(self)
        if self._pc is not None:
            await self._pc.close()
