"""The sandbox voice server's websocket side: connections, opcodes and session lifecycles.

:class:`VoiceGateway` accepts each voice websocket, sends op8 Hello, watches its heartbeats and
dispatches the client's ops (identify, select protocol, heartbeat, speaking, resume, video,
backend version, DAVE's JSON replies) to one handler each. It decides what a session is: which
token identifies it, when it resumes (and what a v8 resume replays), when it ends and who is
told (op11, op13). The ops that set up media (op1, op5, op12) are
:class:`~legato.sandbox.voice_negotiation.MediaNegotiation`'s; DAVE members' ops go to the
:class:`~legato.sandbox.voice_dave.DaveHub`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

from aiohttp import WSMsgType, web

from legato.sandbox.voice_dave import DaveHub
from legato.sandbox.voice_media import MediaPlane
from legato.sandbox.voice_negotiation import MediaNegotiation
from legato.sandbox.voice_session import (
    CLOSE_ALREADY_AUTHENTICATED,
    CLOSE_AUTHENTICATION_FAILED,
    CLOSE_BAD_REQUEST,
    CLOSE_DAVE_REQUIRED,
    CLOSE_DECODE_ERROR,
    CLOSE_NORMAL,
    CLOSE_NOT_AUTHENTICATED,
    CLOSE_SESSION_INVALID,
    CLOSE_SESSION_TIMEOUT,
    CLOSE_UNKNOWN_OPCODE,
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
        negotiation = MediaNegotiation(options, table, media, dave, stats, spawn)
        #: Each session as its op1 was answered (version, transport, mode, DAVE), in order.
        self.selections: list[SessionInfo] = negotiation.selections
        #: One handler per client op; the ops that set up media are :class:`MediaNegotiation`'s.
        self._handlers: dict[int, Callable[[Connection, Any], Awaitable[None]]] = {
            0: self._op_identify,
            1: negotiation.select_protocol,
            3: self._op_heartbeat,
            5: negotiation.speaking,
            7: self._op_resume,
            12: negotiation.video,
            16: self._op_backend_version,
            23: self._op_dave_transition_ready,
            31: self._op_dave_invalid_commit_welcome,
        }

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
            await handler(conn, d)
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

    async def _op_dave_transition_ready(self, conn: Connection, d: Any) -> None:
        assert conn.session is not None
        await self._dave.on_json(conn.session, 23, d)

    async def _op_dave_invalid_commit_welcome(self, conn: Connection, d: Any) -> None:
        session = conn.session
        assert session is not None
        if self._dave.is_member(session):
            self._table.event("dave_invalid", session.grant)
        await self._dave.on_json(session, 31, d)

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


class Listeners:
    """Where clients reach the voice websocket: one aiohttp app on one or more listening sockets.

    The first listener is the endpoint VOICE_SERVER_UPDATE names; a move adds another (a second
    "voice server"); :meth:`plain` adds a ``ws://`` one beside a TLS server's.

    Args:
        host: the address to listen on.
        endpoint_host: the host TLS listeners are named by (a plain one is named by ``host``).
        handler: the websocket's aiohttp handler.
    """

    def __init__(
        self,
        host: str,
        endpoint_host: str,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> None:
        self._host = host
        self._endpoint_host = endpoint_host
        self._handler = handler
        self._ssl: Any = None
        self._runner: web.AppRunner | None = None
        self._sites: list[tuple[str, web.SockSite]] = []
        self._plain: tuple[str, web.SockSite] | None = None

    async def start(self, port: int, ssl_context: Any) -> None:
        """Serve the websocket on ``port`` (0: a free one), with TLS when ``ssl_context``."""
        self._ssl = ssl_context
        app = web.Application()
        app.router.add_get("/", self._handler)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        await self.add(port)

    async def add(self, port: int) -> str:
        """Open another listener like the first; return its endpoint."""
        endpoint, site = await self._open(port, self._ssl)
        self._sites.append((endpoint, site))
        return endpoint

    async def _open(self, port: int, ssl_context: Any) -> tuple[str, web.SockSite]:
        assert self._runner is not None, "start() first"
        sock = socket.socket(socket.AF_INET6 if ":" in self._host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, port))
        site = web.SockSite(self._runner, sock, ssl_context=ssl_context)
        await site.start()
        # TLS listeners are named as Discord names its servers; a plain one by its address.
        host = self._endpoint_host if ssl_context is not None else self._host
        return f"{host}:{sock.getsockname()[1]}", site

    async def plain(self) -> str:
        """A ``ws://`` listener's endpoint (made on first use); not one :meth:`other_than`
        returns."""
        if self._plain is None:
            self._plain = await self._open(0, None)
        return self._plain[0]

    async def other_than(self, current: str) -> str:
        """An endpoint other than ``current``: an existing listener, or a new one."""
        target = next((ep for ep, _site in self._sites if ep != current), None)
        return target if target is not None else await self.add(0)

    @property
    def endpoint(self) -> str:
        """The first listener's ``host:port``.

        Raises:
            RuntimeError: not started.
        """
        if not self._sites:
            raise RuntimeError("the voice sandbox is not started")
        return self._sites[0][0]

    async def stop_accepting(self) -> None:
        """Stop the listeners that :meth:`add` opened: new clients are refused."""
        for _endpoint, site in self._sites:
            await site.stop()

    async def cleanup(self) -> None:
        """Shut the app down and forget every listener."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._sites.clear()
        self._plain = None
