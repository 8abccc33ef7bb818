"""The ``webrtc`` transport: an aiortc peer connection carrying our pre-encoded Opus frames.

The browser's path (and the only one self-hosted Spacebar servers speak). op1 carries a
fragment of our offer, op4 a fragment of the server's answer from which we build the full
answer (:mod:`legato.voice.sdp`). We are ICE controlling and the DTLS client; the server is the
DTLS server.

Frames are never decoded or re-encoded: the track hands aiortc ``av.Packet`` objects, which its
RTP sender packs as they are (``RTCRtpSender._next_encoded_frame`` only runs the encoder on
``av.Frame``). aiortc's own quirks are worked around in :mod:`.aiortc_compat`, and its Opus
payload type 96 (reserved on Discord's servers) is rewritten in the offer before it is applied.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from fractions import Fraction
from typing import Any, Final

import av
from aiortc import (
    MediaStreamTrack,
    RTCPeerConnection,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription

from legato.errors import TransportError
from legato.voice import sdp
from legato.voice.transport.aiortc_compat import DtlsCertificate, host_addresses, use_certificate
from legato.voice.transport.base import TransportStats

_log = logging.getLogger(__name__)

#: Samples per 20 ms Opus frame at the 48 kHz RTP clock (RFC 7587).
FRAME_SAMPLES: Final = 960
_TIME_BASE: Final = Fraction(1, 48_000)
#: Frames the track holds for aiortc; more means aiortc stalled, so the oldest goes.
QUEUE_FRAMES: Final = 10
LOOPBACK: Final = "127.0.0.1"


def remap_opus_payload_type(offer_sdp: str, payload_type: int) -> str:
    """Move Opus in an aiortc offer from its payload type 96 to ``payload_type``.

    aiortc offers from its codec table, where Opus is 96, and has no API to change that. The
    rewritten offer is what we apply with ``setLocalDescription``; aiortc takes the payload
    type it then sends with from the answer, which echoes ours.
    """
    description = SessionDescription.parse(offer_sdp)
    for media in description.media:
        if media.kind != "audio":
            continue
        for codec in media.rtp.codecs:
            if codec.mimeType.lower() == "audio/opus":
                codec.payloadType = payload_type
        media.fmt = [c.payloadType for c in media.rtp.codecs]
    return str(description)


class OpusPacketTrack(MediaStreamTrack):
    """An audio track whose ``recv()`` returns the Opus frames pushed into it, as packets.

    aiortc's sender awaits ``recv()`` in a loop; when nothing is pending it waits on the queue
    rather than spinning. Timestamps advance by 960 per frame.
    """

    kind = "audio"

    def __init__(self, stats: TransportStats, maxsize: int = QUEUE_FRAMES) -> None:
        super().__init__()
        self._stats = stats
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize)
        self._pts = 0

    def push(self, opus: bytes) -> None:
        """Queue one frame; if aiortc has fallen behind, drop the oldest to bound latency."""
        if self.readyState != "live":
            self._stats.send_errors += 1
            return
        if self._queue.full():
            self._queue.get_nowait()
            self._stats.send_errors += 1
        self._queue.put_nowait(opus)

    async def recv(self) -> av.Packet[Any]:
        """The next frame as an ``av.Packet`` (aiortc sends it without encoding).

        Raises:
            MediaStreamError: the track was stopped.
        """
        if self.readyState != "live":
            raise MediaStreamError
        opus = await self._queue.get()
        if opus is None:
            raise MediaStreamError
        packet = av.Packet(opus)
        packet.pts = self._pts
        packet.time_base = _TIME_BASE
        self._pts += FRAME_SAMPLES
        self._stats.frames_sent += 1
        self._stats.bytes_sent += len(opus)
        return packet

    def stop(self) -> None:
        """End the track and wake a pending ``recv()``."""
        if self.readyState == "live":
            if self._queue.full():
                self._queue.get_nowait()
            self._queue.put_nowait(None)
        super().stop()


class WebRtcTransport:
    """The voice client's ``webrtc`` media path (see :class:`~.base.Transport`).

    Args:
        host_candidates_allow_loopback: Also gather a host candidate on 127.0.0.1 (aioice skips
            it); needed for a server on this machine when there is no other interface.
        payload_type: The Opus payload type to offer (never 96).
        connect_timeout: Seconds :meth:`start` waits for ICE and DTLS.
    """

    def __init__(
        self,
        *,
        host_candidates_allow_loopback: bool = False,
        payload_type: int = sdp.DEFAULT_OPUS_PAYLOAD_TYPE,
        connect_timeout: float = 15.0,
    ) -> None:
        self._codec = sdp.opus_codec(payload_type)
        self._allow_loopback = host_candidates_allow_loopback
        self._connect_timeout = connect_timeout
        self._stats = TransportStats()
        self._pc: RTCPeerConnection | None = None
        self._track: OpusPacketTrack | None = None
        self._offer_sdp: str | None = None
        self._ssrc = 0
        self._connected = asyncio.Event()
        self._failed: str | None = None
        self._closed = False

    @property
    def name(self) -> str:
        """``"webrtc"``."""
        return "webrtc"

    @property
    def ssrc(self) -> int:
        """The SSRC of our RTP sender (op2's ``ssrc``), 0 before :meth:`prepare`."""
        return self._ssrc

    @property
    def mode(self) -> str | None:
        """``"dtls-srtp"``: WebRTC always encrypts with keys from the DTLS handshake."""
        return "dtls-srtp"

    @property
    def stats(self) -> TransportStats:
        """Frames handed to aiortc (``frames_sent``) and frames dropped (``send_errors``)."""
        return self._stats

    @property
    def payload_type(self) -> int:
        """The Opus payload type we offer."""
        return self._codec["payload_type"]

    async def prepare(self, ready: dict[str, Any]) -> dict[str, Any]:
        """Create the peer connection and offer; return op1's ``d``.

        Args:
            ready: op2's ``d``; its ``ssrc`` becomes our sender's SSRC.

        Raises:
            TransportError: the peer connection could not be set up or gathered nothing.
        """
        if self._closed or self._pc is not None:
            raise TransportError("prepare() called twice or after close()")
        pc = RTCPeerConnection()
        use_certificate(pc, DtlsCertificate.generate())
        self._pc = pc
        pc.on("connectionstatechange", self._on_state)
        self._track = OpusPacketTrack(self._stats)
        transceiver: RTCRtpTransceiver = pc.addTransceiver(self._track, direction="sendonly")
        opus = [c for c in RTCRtpSender.getCapabilities("audio").codecs if c.name == "opus"]
        transceiver.setCodecPreferences(opus)
        ssrc = ready.get("ssrc")
        if isinstance(ssrc, int) and 0 < ssrc < 1 << 32:
            # aiortc picks a random SSRC and has no setter; the sender reads this attribute
            # for every packet, and the offer below announces it.
            transceiver.sender._ssrc = ssrc
        self._ssrc = int(transceiver.sender._ssrc)
        try:
            offer = await pc.createOffer()
            offer_sdp = remap_opus_payload_type(offer.sdp, self.payload_type)
            if self._allow_loopback:
                with host_addresses(lambda found: [*found, LOOPBACK]):
                    await pc.setLocalDescription(RTCSessionDescription(offer_sdp, "offer"))
            else:
                await pc.setLocalDescription(RTCSessionDescription(offer_sdp, "offer"))
        except (ValueError, OSError) as exc:
            raise TransportError(f"WebRTC offer failed: {exc}") from exc
        local = pc.localDescription
        self._offer_sdp = local.sdp
        if "a=candidate:" not in local.sdp:
            raise TransportError("ICE gathered no host candidate")
        try:
            fragment = sdp.OfferFragment.from_offer(local.sdp, [self.payload_type]).render()
        except sdp.SdpError as exc:
            raise TransportError(f"unusable local offer: {exc}") from exc
        return {
            "protocol": "webrtc",
            "data": fragment,
            "sdp": fragment,
            "codecs": [dict(self._codec)],
            "rtc_connection_id": str(uuid.uuid4()),
        }

    async def start(self, session: dict[str, Any]) -> None:
        """Build the full answer from op4's ``sdp``, apply it, wait for DTLS.

        Raises:
            TransportError: no usable ``sdp`` in op4, or ICE/DTLS failed or timed out.
        """
        if self._pc is None or self._offer_sdp is None or self._closed:
            raise TransportError("start() before prepare() or after close()")
        fragment = session.get("sdp")
        if not isinstance(fragment, str):
            raise TransportError("op4 carries no webrtc sdp")
        try:
            server = sdp.ServerFragment.parse(fragment)
            answer = sdp.build_answer(self._offer_sdp, server, opus_payload_type=self.payload_type)
            await self._pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        except (sdp.SdpError, ValueError) as exc:
            raise TransportError(f"cannot apply the server's answer: {exc}") from exc
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self._connected.wait()
        except TimeoutError:
            raise TransportError(
                f"WebRTC did not connect within {self._connect_timeout:g} s "
                f"(ICE {self._pc.iceConnectionState}, connection {self._pc.connectionState})"
            ) from None
        if self._failed is not None:
            raise TransportError(f"WebRTC connection {self._failed}")
        _log.debug("webrtc connected, ssrc %d, pt %d", self._ssrc, self.payload_type)

    def _on_state(self) -> None:
        if self._pc is None:
            return
        state = self._pc.connectionState
        _log.debug("webrtc connection state %s", state)
        if state in ("failed", "closed"):
            self._failed = state
            self._connected.set()
        elif state == "connected":
            self._connected.set()

    def send_frame(self, opus: bytes) -> None:
        """Queue one 20 ms Opus frame for the RTP sender; drops (never raises) when closed."""
        if self._track is None or self._closed:
            self._stats.send_errors += 1
            return
        self._track.push(opus)

    async def close(self) -> None:
        """Stop the track and close the peer connection; safe twice and before prepare()."""
        if self._closed:
            return
        self._closed = True
        self._connected.set()
        if self._failed is None:
            self._failed = "closed"
        if self._track is not None:
            self._track.stop()
        if self._pc is not None:
            await self._pc.close()
