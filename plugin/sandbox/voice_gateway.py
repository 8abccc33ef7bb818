"""The sandbox voice server's websocket side: connections, opcodes and session lifecycles.

:class:`VoiceGateway` accepts each voice websocket, sends op8 Hello, watches its heartbeats and
dispatches the client's ops (identify, select protocol, heartbeat, speaking, resume, video,
backend version, DAVE's JSON replies) to one handler each. It decides what a session is: which
token identifies it, when it resumes (and what a v8 resume replays), when it ends and who is
told (op11, op13). Media and DAVE are the other rooms': op1 gives the session its key or its
WebRTC peer from the :class:`~legato.sandbox.voice_media.MediaPlane`, and DAVE members are
handed to the :class:`~legato.sandbox.voice_dave.DaveHub`.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import secrets
from collections.abc import Callable, Coroutine
from typing import Any, Final

from aiohttp import WSMsgType, web

from legato.errors import TransportError
from legato.sandbox.crypto import PacketDecryptor
from legato.sandbox.voice_dave import DaveHub
from legato.sandbox.voice_media import MediaPlane
from legato.sandbox.voice_session import (
    CLOSE_ALREADY_AUTHENTICATED,
    CLOSE_AUTHENTICATION_FAILED,
    CLOSE_BAD_REQUEST,
    CLOSE_DAVE_REQUIRED,
    CLOSE_DECODE_ERROR,
    CLOSE_INTERNAL_ERROR,
    CLOSE_NORMAL,
    CLOSE_NOT_AUTHENTICATED,
    CLOSE_SESSION_INVALID,
    CLOSE_SESSION_TIMEOUT,
    CLOSE_UNKNOWN_MODE,
    CLOSE_UNKNOWN_OPCODE,
    CLOSE_UNKNOWN_PROTOCOL,
    MAX_VERSION,
    MIN_VERSION,
    Connection,
    Grant,
    ServerOptions,
    ServerStats,
    Session,
    SessionInfo,
    SessionTable,
)
from legato.voice.crypto import KEY_SIZE

_log = logging.getLogger(__name__)

BACKEND_VERSION: Final = {"voice": "legato-sandbox-0.1.0", "rtc_worker": "legato-sandbox-0.1.0"}
_CLOSE_TIMEOUT: Final = 2.0
#: Client ops the sandbox accepts and ignores: session update, media sink wants, DAVE replies
#: (when DAVE is off).
_IGNORED_OPS: Final = frozenset({14, 15, 17, 23, 31})


def parse_version(raw: str | None) -> int | None:
    """``?v=`` as an int in 4..8; absent means 4 (Discord's oldest still accepted); else None."""
    if raw is None:
        return MIN_VERSION
    try:
        version = int(raw)
    except ValueError:
        return None
    return version if MIN_VERSION <= version <= MAX_VERSION else None


class VoiceGateway:
    """The voice websocket: one handler per client op, and the sessions' lifecycles.

    Args:
        options: the server's options.
        table: tokens, sessions, recordings and the event log.
        media: the media plane (op2's port, op1's key or WebRTC peer).
        dave: the DAVE groups.
        stats: the server's counters.
        spawn: runs a task the server owns (and cancels on close).
        endpoint: the server's first endpoint (for a connection whose socket has no name).
    """

    def __init__(
        self,
        options: ServerOptions,
        table: SessionTable,
        media: MediaPlane,
        dave: DaveHub,
        stats: ServerStats,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        endpoint: Callable[[], str],
    ) -> None:
        self._options = options
        self._table = table
        self._media = media
        self._dave = dave
        self._stats = stats
        self._spawn = spawn
        self._endpoint = endpoint
        self.connections: set[Connection] = set()
        #: Users whose heartbeats go unanswered (``stop_heartbeat_acks``).
        self.silenced: set[int] = set()
        #: Each session as its op1 was answered (version, transport, mode, DAVE), in order.
        self.selections: list[SessionInfo] = []

    def info(self, s: Session) -> SessionInfo:
        """A snapshot of ``s``."""
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
            dave_protocol_version=self._options.dave_protocol_version,
        )

    async def close_all(self, code: int, reason: str) -> None:
        """Close every connection with ``code``, then every session's WebRTC peer."""
        await asyncio.gather(*(c.close(code, reason) for c in self.connections))
        for session in list(self._table.sessions.values()):
            await session.close_peer()

    # -- connections -----------------------------------------------------------------------------

    async def handle_ws(self, request: web.Request) -> web.StreamResponse:
        """The aiohttp handler of the voice websocket: one connection, from Hello to close."""
        # timeout: how long a close waits for the client's answering close frame (aiohttp: 10 s).
        ws = web.WebSocketResponse(
            timeout=_CLOSE_TIMEOUT, autoping=True, heartbeat=None, max_msg_size=1 << 20
        )
        await ws.prepare(request)
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        options = self._options
        endpoint = f"{options.endpoint_host}:{sockname[1]}" if sockname else self._endpoint()
        version = parse_version(request.query.get("v"))
        if version is not None and options.profile.version is not None:
            version = options.profile.version  # Spacebar speaks v6 whatever ?v= asks for
        conn = Connection(ws, request.transport, version or 0, endpoint)
        self.connections.add(conn)
        self._stats.connections += 1
        try:
            if version is None:
                await conn.close(CLOSE_BAD_REQUEST, "unsupported gateway version")
                return ws
            # An integer of milliseconds, as Discord sends it (13750).
            hello: dict[str, Any] = {"heartbeat_interval": round(options.heartbeat_interval * 1e3)}
            if options.profile.hello_version:
                hello = {"v": version, **hello}
            await conn.send_raw({"op": 8, "d": hello})
            self._arm_watchdog(conn)
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    await self._on_text(conn, msg.data)
                elif msg.type is WSMsgType.BINARY:
                    await self._on_binary(conn, msg.data)
                if conn.server_close_code is not None or conn.dropped:
                    break
        finally:
            await self._connection_ended(conn)
        return ws

    async def _connection_ended(self, conn: Connection) -> None:
        self.connections.discard(conn)
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
        self._table.event(
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
                await self.end_session(session)

    def drop(self, conn: Connection) -> None:
        """Abort ``conn``'s TCP connection without a close frame; its session stays resumable."""
        conn.dropped = True
        conn.detach()
        if conn.transport is not None:
            conn.transport.abort()

    def _arm_watchdog(self, conn: Connection) -> None:
        if conn.watchdog is not None:
            conn.watchdog.cancel()
        timeout = self._options.heartbeat_timeout
        if timeout == float("inf"):
            return
        loop = asyncio.get_running_loop()
        conn.watchdog = loop.call_later(timeout, self._heartbeat_missed, conn)

    def _heartbeat_missed(self, conn: Connection) -> None:
        self._spawn(conn.close(CLOSE_SESSION_TIMEOUT, "no heartbeat"))

    async def _on_binary(self, conn: Connection, data: bytes) -> None:
        self._stats.binary_frames += 1
        if not self._dave.enabled:
            await conn.close(CLOSE_DECODE_ERROR, "binary frame without DAVE")
        elif conn.session is None:
            await conn.close(CLOSE_NOT_AUTHENTICATED, "binary frame before identify")
        else:
            await self._dave.on_binary(conn.session, data)

    async def _on_text(self, conn: Connection, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            msg = None
        if not isinstance(msg, dict) or type(msg.get("op")) is not int:
            self._stats.bad_json += 1
            await conn.close(CLOSE_DECODE_ERROR, "undecodable payload")
            return
        op: int = msg["op"]
        d = msg.get("d")
        if self._options.profile.identify_first and op != 0 and conn.session is None:
            if op == 7:
                grant = self._table.grant_of(d)
                self._table.event("resume_refused", grant, endpoint=conn.endpoint)
            await conn.close(CLOSE_NOT_AUTHENTICATED, f"op {op} before identify")
            return
        handler = self._handlers.get(op)
        if handler is None:
            if op in _IGNORED_OPS and conn.session is not None:
                _log.debug("ignoring client op %d", op)
                return
            self._stats.unknown_opcodes += 1
            await conn.close(CLOSE_UNKNOWN_OPCODE, f"unknown opcode {op}")
            return
        if op not in (0, 3, 7, 16) and conn.session is None:
            await conn.close(CLOSE_NOT_AUTHENTICATED, f"op {op} before identify")
            return
        try:
            await handler(self, conn, d)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            # A payload of the wrong shape (d missing, a list for a dict, "abc" for an id).
            self._stats.bad_payloads += 1
            _log.info("bad op %d payload: %s", op, type(exc).__name__)
            await conn.close(CLOSE_DECODE_ERROR, f"invalid op {op} payload")

    # -- ops -------------------------------------------------------------------------------------

    async def _op_identify(self, conn: Connection, d: Any) -> None:
        if conn.session is not None:
            await conn.close(CLOSE_ALREADY_AUTHENTICATED, "already identified")
            return
        server_id, user_id = int(d["server_id"]), int(d["user_id"])
        session_id, token = str(d["session_id"]), str(d["token"])
        table = self._table
        grant = table.grants.get(token)
        if grant is None or grant != Grant(server_id, user_id, session_id):
            await conn.close(CLOSE_AUTHENTICATION_FAILED, "authentication failed")
            return
        offered = d.get("max_dave_protocol_version") or 0
        if self._dave.enabled and (type(offered) is not int or offered < 1):
            # Discord since 2026-03-01: no E2EE, no voice in ordinary channels.
            await conn.close(CLOSE_DAVE_REQUIRED, "DAVE required")
            return
        key = (server_id, user_id)
        previous = table.sessions.get(key)
        if previous is not None:
            await self._retire(previous)
        recording = table.recording(key)
        session = Session(grant, table.next_ssrc(), recording, conn, version=conn.version)
        recording.note_ssrc(session.ssrc)
        table.sessions[key] = session
        table.by_ssrc[session.ssrc] = session
        conn.session = session
        streams = []
        for stream in d.get("streams") or []:
            if isinstance(stream, dict):
                ssrc = table.next_ssrc()
                streams.append({**stream, "ssrc": ssrc, "rtx_ssrc": ssrc + 1, "active": False})
                table.next_ssrc()
        await session.send(
            2,
            {
                "ssrc": session.ssrc,
                "ip": self._options.host,
                "port": self._media.media_port,
                "modes": list(self._options.modes),
                "experiments": [],
                "streams": streams,
            },
        )
        others = table.members(server_id, exclude=session)
        if self._options.profile.clients_connect_object:
            # Spacebar's op11: an object where Discord has a list, sent even to a lone user.
            await session.send(11, {"user_ids": {}})
            if previous is None:
                for other in others:
                    await other.send(11, {"user_ids": {}})
        else:
            if others:
                await session.send(11, {"user_ids": [str(o.grant.user_id) for o in others]})
            if previous is None:
                for other in others:
                    await other.send(11, {"user_ids": [str(user_id)]})
        table.event("identify", grant, endpoint=conn.endpoint)

    async def _op_resume(self, conn: Connection, d: Any) -> None:
        if conn.session is not None:
            await conn.close(CLOSE_ALREADY_AUTHENTICATED, "already identified")
            return
        server_id, session_id, token = int(d["server_id"]), str(d["session_id"]), str(d["token"])
        raw_ack = d.get("seq_ack", -1)
        seq_ack = raw_ack if type(raw_ack) is int else -1
        grant = self._table.grants.get(token)
        session = self._table.sessions.get((grant.server_id, grant.user_id)) if grant else None
        if (
            grant is None
            or session is None
            or grant.server_id != server_id
            or grant.session_id != session_id
            or not session.resumable
        ):
            await conn.close(CLOSE_SESSION_INVALID, "session no longer valid")
            return
        old = session.conn
        if old is not None:
            # The client gave up on that connection; it gets no close frame, as after a drop.
            self.drop(old)
        session.conn = conn
        session.version = conn.version
        conn.session = session
        if conn.version >= 8:
            for seq, msg in list(session.outbox):
                if seq > seq_ack:
                    await conn.send_raw(msg)
        await session.send(9, None)
        self._table.event("resume", grant, endpoint=conn.endpoint)

    async def _op_heartbeat(self, conn: Connection, d: Any) -> None:
        self._stats.heartbeats += 1
        if isinstance(d, dict):
            if conn.version < 8 and self._options.strict_v6:
                await conn.close(CLOSE_DECODE_ERROR, "heartbeat object before v8")
                return
            ack: Any = {"t": d["t"]}
        elif type(d) is int:
            ack = d
        else:
            raise TypeError("heartbeat nonce")
        self._arm_watchdog(conn)
        session = conn.session
        if session is not None and session.grant.user_id in self.silenced:
            self._stats.heartbeat_acks_withheld += 1
            return
        await conn.send_raw({"op": 6, "d": ack})

    async def _op_backend_version(self, conn: Connection, d: Any) -> None:
        if conn.session is not None:
            await conn.session.send(16, dict(BACKEND_VERSION))
        else:
            await conn.send_raw({"op": 16, "d": dict(BACKEND_VERSION)})

    async def _op_select_protocol(self, conn: Connection, d: Any) -> None:
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
        self.selections.append(self.info(session))
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

    async def _op_speaking(self, conn: Connection, d: Any) -> None:
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

    async def _op_video(self, conn: Connection, d: Any) -> None:
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

    async def _op_dave_transition_ready(self, conn: Connection, d: Any) -> None:
        assert conn.session is not None
        await self._dave.on_json(conn.session, 23, d)

    async def _op_dave_invalid_commit_welcome(self, conn: Connection, d: Any) -> None:
        session = conn.session
        assert session is not None
        if self._dave.is_member(session):
            self._table.event("dave_invalid", session.grant)
        await self._dave.on_json(session, 31, d)

    _handlers: Final[dict[int, Callable[[VoiceGateway, Connection, Any], Any]]] = {
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

    async def _retire(self, session: Session) -> None:
        """A fresh identify replaced this session: forget it without telling the others."""
        session.ended = True
        session.resumable = False
        self._table.forget(session)
        await session.close_peer()
        if session.conn is not None:
            conn = session.conn
            conn.detach()
            await conn.close(CLOSE_SESSION_INVALID, "replaced by a new session")

    async def end_session(self, session: Session) -> None:
        """The user left the channel: forget the session, tell the others (op13), leave DAVE."""
        if session.ended:
            return
        session.ended = True
        self._table.forget(session)
        await session.close_peer()
        for other in self._table.members(session.grant.server_id, exclude=session):
            await other.send(13, {"user_id": str(session.grant.user_id)})
        await self._dave.leave(session)
        self._table.event("left", session.grant)
