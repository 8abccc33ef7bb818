"""How a voice session's media is set up: op1 (select protocol), op5 (speaking), op12 (video).

:class:`MediaNegotiation` answers the ops that decide where a session's audio goes and how it is
read: op1 gives a ``udp`` session its mode and key, or a ``webrtc`` session a peer on the media
plane and op4's SDP fragment, and puts the session in its DAVE group; op5 and op12 bind SSRCs to
the session and are relayed to the channel's other members. The Spacebar profile's op12 waits
for DTLS before it publishes anything.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import secrets
from collections.abc import Callable, Coroutine
from typing import Any

from legato.errors import TransportError
from legato.sandbox.crypto import PacketDecryptor
from legato.sandbox.voice_dave import DaveHub
from legato.sandbox.voice_media import MediaPlane
from legato.sandbox.voice_session import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_UNKNOWN_MODE,
    CLOSE_UNKNOWN_PROTOCOL,
    Connection,
    ServerOptions,
    ServerStats,
    Session,
    SessionInfo,
    SessionTable,
)
from legato.voice.crypto import KEY_SIZE

_log = logging.getLogger(__name__)


class MediaNegotiation:
    """The handlers of op1, op5 and op12 (the gateway dispatches to them).

    Args:
        options: the server's options (modes, profile).
        table: the sessions, the SSRC index and the event log.
        media: where WebRTC peers are made.
        dave: where a session joins its DAVE group once its protocol is selected.
        stats: the server's counters.
        spawn: runs a task the server owns (and cancels on close).
    """

    def __init__(
        self,
        options: ServerOptions,
        table: SessionTable,
        media: MediaPlane,
        dave: DaveHub,
        stats: ServerStats,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self._options = options
        self._table = table
        self._media = media
        self._dave = dave
        self._stats = stats
        self._spawn = spawn
        #: Each session as its op1 was answered (version, transport, mode, DAVE), in order.
        self.selections: list[SessionInfo] = []

    async def select_protocol(self, conn: Connection, d: Any) -> None:
        """op1: the udp key and mode, or a WebRTC peer's answer (op4); then DAVE."""
        session = conn.session
        assert session is not None
        protocol = d["protocol"]
        profile = self._options.profile
        if protocol == "udp" and not profile.udp:
            await conn.close(profile.udp_close_code, "only webrtc protocol supported currently")
            return
        if protocol == "udp":
            data = d["data"]
            mode = data.get("mode") or d.get("mode")
            if mode not in self._options.modes:
                await conn.close(CLOSE_UNKNOWN_MODE, "unknown encryption mode")
                return
            address, port = str(data["address"]), int(data["port"])
            key = secrets.token_bytes(KEY_SIZE)
            session.protocol, session.mode = "udp", mode
            session.decryptor = PacketDecryptor(mode, key)
            session.client_address = (address, port)
            session.media_session_id = secrets.token_hex(16)
            await session.send(
                4,
                {
                    "mode": mode,
                    "secret_key": list(key),
                    "audio_codec": "opus",
                    "media_session_id": session.media_session_id,
                    "dave_protocol_version": self._dave.version(session),
                },
            )
            await self._dave.join(session)
        elif protocol == "webrtc":
            if not await self._select_webrtc(conn, session, d):
                return
        else:
            await conn.close(CLOSE_UNKNOWN_PROTOCOL, "unknown protocol")
            return
        self.selections.append(session.info(self._options.dave_protocol_version))
        self._table.event("select_protocol", session.grant, endpoint=conn.endpoint)

    async def _select_webrtc(self, conn: Connection, session: Session, d: Any) -> bool:
        profile = self._options.profile
        if profile.op1_reads_sdp_only:
            fragment = d.get("sdp")
            if not isinstance(fragment, str):
                # Spacebar's schema check throws; the error is logged and nothing answers.
                self._stats.ignored_payloads += 1
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
            await conn.close(CLOSE_UNKNOWN_PROTOCOL, "webrtc unavailable")
            return False
        await session.close_peer()
        gated = profile.streams_after_dtls is not None
        peer = self._media.new_peer(module, session, gated=gated)
        session.peer = peer
        if not gated:
            await session.send(15, {"any": 100})
        try:
            sdp = await peer.accept(fragment, list(codecs))
        except Exception:  # noqa: BLE001 - any failure of the peer ends this connection, logged
            _log.exception("the WebRTC peer refused the offer")
            await conn.close(CLOSE_INTERNAL_ERROR, "webrtc negotiation failed")
            return False
        session.protocol, session.mode = "webrtc", None
        session.media_session_id = secrets.token_hex(16)
        op4: dict[str, Any] = {
            "sdp": sdp,
            "audio_codec": "opus",
            "video_codec": "H264",
            "media_session_id": session.media_session_id,
        }
        if profile.session_description_dave:
            op4["dave_protocol_version"] = self._dave.version(session)
        await session.send(4, op4)
        self._spawn(self._watch_dtls(session, peer))
        await self._dave.join(session)
        return True

    async def _watch_dtls(self, session: Session, peer: Any) -> None:
        try:
            await peer.wait_connected()
        except TransportError:
            return  # failed or closed (a new session replaced it): nothing is published
        if session.peer is peer and not session.ended:
            session.dtls_connected.set()
            self._table.event("dtls_connected", session.grant)

    async def speaking(self, conn: Connection, d: Any) -> None:
        """op5: note it in the recording (and any new SSRC), relay it to the others."""
        session = conn.session
        assert session is not None
        speaking = int(d["speaking"])
        ssrc = d.get("ssrc")
        ssrc = int(ssrc) if ssrc is not None else None
        if ssrc is not None and ssrc != session.ssrc:
            self._table.by_ssrc.setdefault(ssrc, session)
        session.recording.add_speaking(
            arrival=asyncio.get_running_loop().time(), speaking=speaking, ssrc=ssrc
        )
        relay = {"user_id": str(session.grant.user_id), "ssrc": ssrc or session.ssrc}
        relay["speaking"] = speaking
        for other in self._table.members(session.grant.server_id, exclude=session):
            await other.send(5, relay)

    async def video(self, conn: Connection, d: Any) -> None:
        """op12: the client's streams (its audio SSRC); relayed, or published after DTLS."""
        session = conn.session
        assert session is not None
        audio_ssrc = int(d.get("audio_ssrc") or 0)
        window = self._options.profile.streams_after_dtls
        if window is not None:
            # Held, not awaited: the connection's other messages (heartbeats) go on meanwhile.
            self._spawn(self._publish_after_dtls(session, audio_ssrc, dict(d), window))
            return
        if audio_ssrc:
            session.recording.note_ssrc(audio_ssrc)
            if audio_ssrc != session.ssrc:
                self._table.by_ssrc.setdefault(audio_ssrc, session)
        relay = {**d, "user_id": str(session.grant.user_id)}
        for other in self._table.members(session.grant.server_id, exclude=session):
            await other.send(12, relay)

    async def _publish_after_dtls(
        self, session: Session, audio_ssrc: int, d: dict[str, Any], window: float
    ) -> None:
        """Spacebar publishes a client's audio on op12, and only once DTLS is connected."""
        try:
            async with asyncio.timeout(window):
                await session.dtls_connected.wait()
        except TimeoutError:
            if session.ended:
                return  # a new identify replaced the session: nothing to drop
            self._stats.streams_dropped += 1
            _log.info("op12 %.1f s before DTLS: dropped (Spacebar profile)", window)
            self._table.event("streams_dropped", session.grant)
            return
        if session.ended:
            return
        if audio_ssrc:
            session.published.add(audio_ssrc)
            session.recording.note_ssrc(audio_ssrc)
        await session.send(15, {"any": 100})
        relay = {**d, "user_id": str(session.grant.user_id)}
        for other in self._table.members(session.grant.server_id, exclude=session):
            await other.send(12, relay)
        self._table.event("streams_published", session.grant)
