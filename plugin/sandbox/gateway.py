"""The sandbox's main Discord gateway: a WebSocket server speaking gateway v10 JSON to real bots.

Implements what discord.py 2.7.1 needs: HELLO, IDENTIFY -> READY + GUILD_CREATE, heartbeats,
RESUME with replay of missed dispatches by sequence number, RECONNECT and INVALID_SESSION for
fault tests, op4 voice state updates (answered with VOICE_STATE_UPDATE to everyone and
VOICE_SERVER_UPDATE to the bot), op8 member requests. Frames are uncompressed JSON text, which
discord.py accepts even though it asks for `compress=zlib-stream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypedDict, cast

from aiohttp import WSMsgType, web

from legato.sandbox.events import Signal
from legato.sandbox.models import JSON, Guild, User, VoiceState
from legato.sandbox.world import World

if TYPE_CHECKING:
    from legato.sandbox.server import VoiceBackend

_log = logging.getLogger(__name__)

DISPATCH: Final = 0
HEARTBEAT: Final = 1
IDENTIFY: Final = 2
PRESENCE_UPDATE: Final = 3
VOICE_STATE_UPDATE: Final = 4
RESUME: Final = 6
RECONNECT: Final = 7
REQUEST_GUILD_MEMBERS: Final = 8
INVALID_SESSION: Final = 9
HELLO: Final = 10
HEARTBEAT_ACK: Final = 11

# Gateway close codes (discord-api-docs, "Gateway Close Event Codes").
CLOSE_UNKNOWN_ERROR: Final = 4000
CLOSE_UNKNOWN_OPCODE: Final = 4001
CLOSE_DECODE_ERROR: Final = 4002
CLOSE_NOT_AUTHENTICATED: Final = 4003
CLOSE_AUTHENTICATION_FAILED: Final = 4004
CLOSE_ALREADY_AUTHENTICATED: Final = 4005

# Discord's own interval; discord.py sends one heartbeat at once and then every interval.
DEFAULT_HEARTBEAT_INTERVAL_MS: Final = 41_250
# Dispatches kept per session for RESUME; Discord keeps a bounded window too.
REPLAY_WINDOW: Final = 2_000


class IdentifyData(TypedDict, total=False):
    """op2's `d` as discord.py 2.7.1 sends it."""

    token: str
    properties: dict[str, str]
    intents: int
    shard: list[int]
    compress: bool
    large_threshold: int
    presence: JSON


class ResumeData(TypedDict):
    """op6's `d`."""

    token: str
    session_id: str
    seq: int | None


class VoiceStateRequest(TypedDict, total=False):
    """op4's `d`: join, move (a channel id) or leave (null)."""

    guild_id: str
    channel_id: str | None
    self_mute: bool
    self_deaf: bool


class MemberRequest(TypedDict, total=False):
    """op8's `d`."""

    guild_id: str
    query: str
    limit: int
    user_ids: list[str]
    presences: bool
    nonce: str


@dataclass
class ResumeRecord:
    """One successful RESUME: from which sequence the client resumed and what was replayed."""

    session_id: str
    from_seq: int
    replayed: list[str]


@dataclass
class GatewaySession:
    """A resumable gateway session; survives its WebSocket until the client closes it cleanly."""

    session_id: str
    user_id: int
    shard: list[int] | None
    seq: int = 0
    buffer: deque[tuple[int, str, str]] = field(default_factory=lambda: deque(maxlen=REPLAY_WINDOW))
    connection: _Connection | None = None
    dispatched: list[str] = field(default_factory=list)

    def frame(self, event: str, data: Any) -> str:
        """Number a dispatch, remember it for replay, and return its JSON text."""
        self.seq += 1
        text = json.dumps({"op": DISPATCH, "t": event, "s": self.seq, "d": data})
        self.buffer.append((self.seq, event, text))
        self.dispatched.append(event)
        return text


class _Connection:
    """One WebSocket; frames go out in order through a queue drained by a writer task."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.session: GatewaySession | None = None

    def send(self, text: str) -> None:
        self.queue.put_nowait(text)

    def send_op(self, op: int, data: Any) -> None:
        self.send(json.dumps({"op": op, "d": data}))


class GatewayServer:
    """The main gateway on 127.0.0.1.

    Args:
        world: The shared model.
        bot: The bot's user.
        application_id: The bot's application id.
        bot_token: The only token IDENTIFY accepts.
        signal: Notified after every change waiters may care about.
        voice: Issues voice tokens and the endpoint for VOICE_SERVER_UPDATE; None sends
            `endpoint: null` (Discord's "no voice server allocated yet").
        heartbeat_interval_ms: The interval announced in HELLO.
    """

    def __init__(
        self,
        world: World,
        *,
        bot: User,
        application_id: int,
        bot_token: str,
        signal: Signal,
        voice: VoiceBackend | None = None,
        heartbeat_interval_ms: int = DEFAULT_HEARTBEAT_INTERVAL_MS,
    ) -> None:
        self.world = world
        self.bot = bot
        self.application_id = application_id
        self._token = bot_token
        self._signal = signal
        self.voice = voice
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.sessions: dict[str, GatewaySession] = {}
        self.identifies = 0
        self.resumes: list[ResumeRecord] = []
        self.heartbeats = 0
        self.voice_requests: list[VoiceStateRequest] = []
        self.member_requests: list[MemberRequest] = []
        self._connections: set[_Connection] = set()
        self._resume_gate = asyncio.Event()
        self._resume_gate.set()
        self._runner: web.AppRunner | None = None
        self._host = "127.0.0.1"
        self._port = 0

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1") -> None:
        """Listen on an ephemeral port of `host`."""
        app = web.Application()
        app.router.add_get("/", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        self._host = host
        self._port = self._runner.addresses[0][1]
        _log.info("sandbox gateway listening on %s", self.url)

    async def stop(self) -> None:
        """Close every connection (1001, going away) and stop listening."""
        for conn in list(self._connections):
            await conn.ws.close(code=1001, message=b"sandbox stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        """The `ws://` URL for `DiscordWebSocket.DEFAULT_GATEWAY` and `resume_gateway_url`."""
        return f"ws://{self._host}:{self._port}/"

    # --- state for tests ---------------------------------------------------------------------

    @property
    def connected_sessions(self) -> list[GatewaySession]:
        """Sessions that currently have an authenticated WebSocket."""
        return [s for s in self.sessions.values() if s.connection is not None]

    def bot_session(self) -> GatewaySession | None:
        """The most recent live session of the bot, connected or waiting to resume."""
        sessions = [s for s in self.sessions.values() if s.user_id == self.bot.id]
        return sessions[-1] if sessions else None

    # --- sending -----------------------------------------------------------------------------

    def dispatch(self, event: str, data: Any) -> None:
        """Send a dispatch to every live session (a disconnected one gets it on RESUME)."""
        for session in self.sessions.values():
            self._dispatch_to(session, event, data)

    def _dispatch_to(self, session: GatewaySession, event: str, data: Any) -> None:
        text = session.frame(event, data)
        if session.connection is not None:
            session.connection.send(text)

    def broadcast_voice_state(self, guild: Guild, state: VoiceState) -> None:
        """Dispatch VOICE_STATE_UPDATE for `state` to everyone in the guild."""
        self.dispatch("VOICE_STATE_UPDATE", state.payload(guild.members.get(state.user_id)))

    # --- fault injection ---------------------------------------------------------------------

    async def force_reconnect(self, *, code: int = CLOSE_UNKNOWN_ERROR) -> None:
        """Drop every connected session's WebSocket with a resumable close code.

        Returns once the sockets are closed; the sessions stay resumable and buffer what is
        dispatched until the client resumes.
        """
        for session in self.connected_sessions:
            conn = session.connection
            assert conn is not None
            session.connection = None
            await conn.ws.close(code=code, message=b"sandbox forced reconnect")
        self._signal.notify()

    @contextlib.asynccontextmanager
    async def offline(self) -> AsyncIterator[None]:
        """Drop every session's socket and hold RESUMEs until the block ends.

        Whatever is dispatched inside the block is missed by the client and must come back
        by replay when it resumes, which it can only do after the block.
        """
        self._resume_gate.clear()
        try:
            await self.force_reconnect()
            yield
        finally:
            self._resume_gate.set()

    def send_reconnect(self) -> None:
        """Send op7 RECONNECT to every connected session (the client closes and resumes)."""
        for session in self.connected_sessions:
            assert session.connection is not None
            session.connection.send_op(RECONNECT, None)

    def invalidate_session(self, *, resumable: bool = False) -> None:
        """Send op9 INVALID_SESSION to every connected session.

        Args:
            resumable: The `d` flag. False forgets the sessions, so the client identifies anew.
        """
        for session in self.connected_sessions:
            assert session.connection is not None
            session.connection.send_op(INVALID_SESSION, resumable)
            if not resumable:
                session.connection.session = None
                session.connection = None
                del self.sessions[session.session_id]
        self._signal.notify()

    # --- receiving ---------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        conn = _Connection(ws)
        self._connections.add(conn)
        writer = asyncio.create_task(self._writer(conn), name="sandbox-gateway-writer")
        conn.send_op(HELLO, {"heartbeat_interval": self.heartbeat_interval_ms})
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    await self._receive(conn, msg.data)
                else:
                    _log.warning("gateway: unexpected %s frame; closing", msg.type.name)
                    await ws.close(code=CLOSE_DECODE_ERROR)
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            self._connections.discard(conn)
            session = conn.session
            if session is not None and session.connection is conn:
                session.connection = None
                # A clean client close (1000/1001) ends the session; anything else may resume.
                if ws.close_code in (1000, 1001):
                    self.sessions.pop(session.session_id, None)
            _log.debug("gateway connection closed with %s", ws.close_code)
            self._signal.notify()
        return ws

    async def _writer(self, conn: _Connection) -> None:
        while True:
            text = await conn.queue.get()
            try:
                await conn.ws.send_str(text)
            except ConnectionResetError:
                _log.debug("gateway: peer went away with frames queued")
                return

    async def _receive(self, conn: _Connection, text: str) -> None:
        try:
            msg = json.loads(text)
            op = msg["op"]
            data = msg.get("d")
        except (ValueError, KeyError, TypeError):
            await conn.ws.close(code=CLOSE_DECODE_ERROR)
            return
        try:
            await self._handle_op(conn, op, data)
        except (KeyError, ValueError, TypeError):
            # A payload missing fields or with bad ids: Discord closes with 4002 too.
            _log.warning("gateway: malformed op %s payload; closing 4002", op, exc_info=True)
            await conn.ws.close(code=CLOSE_DECODE_ERROR)

    async def _handle_op(self, conn: _Connection, op: int, data: Any) -> None:
        if op == HEARTBEAT:
            self.heartbeats += 1
            conn.send_op(HEARTBEAT_ACK, None)
        elif op == IDENTIFY:
            await self._identify(conn, cast(IdentifyData, data))
        elif op == RESUME:
            await self._resume(conn, cast(ResumeData, data))
        elif conn.session is None:
            await conn.ws.close(code=CLOSE_NOT_AUTHENTICATED)
        elif op == VOICE_STATE_UPDATE:
            self._voice_state_update(conn.session, cast(VoiceStateRequest, data))
        elif op == REQUEST_GUILD_MEMBERS:
            self._request_members(conn.session, cast(MemberRequest, data))
        elif op == PRESENCE_UPDATE:
            _log.debug("gateway: presence update ignored")
        else:
            _log.warning("gateway: unknown opcode %s", op)
            await conn.ws.close(code=CLOSE_UNKNOWN_OPCODE)

    async def _identify(self, conn: _Connection, data: IdentifyData) -> None:
        if conn.session is not None:
            await conn.ws.close(code=CLOSE_ALREADY_AUTHENTICATED)
            return
        if data.get("token") != self._token:
            _log.warning("gateway: IDENTIFY with a wrong token")
            await conn.ws.close(code=CLOSE_AUTHENTICATION_FAILED)
            return
        self.identifies += 1
        # A fresh IDENTIFY replaces the bot's sessions that are waiting to resume.
        for old in [s for s in self.sessions.values() if s.connection is None]:
            del self.sessions[old.session_id]
        session = GatewaySession(
            session_id=secrets.token_hex(16), user_id=self.bot.id, shard=data.get("shard")
        )
        self.sessions[session.session_id] = session
        conn.session = session
        session.connection = conn
        guilds = [g for g in self.world.guilds.values() if self.bot.id in g.members]
        ready: JSON = {
            "v": 10,
            "user": {**self.bot.payload(), "verified": True, "mfa_enabled": False, "flags": 0},
            "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
            "session_id": session.session_id,
            "session_type": "normal",
            "resume_gateway_url": self.url,
            "application": {"id": str(self.application_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "geo_ordered_rtc_regions": ["sandbox"],
            "_trace": ["legato-sandbox"],
        }
        if session.shard is not None:
            ready["shard"] = session.shard
        self._dispatch_to(session, "READY", ready)
        for guild in guilds:
            self._dispatch_to(session, "GUILD_CREATE", guild.payload())
        self._signal.notify()

    async def _resume(self, conn: _Connection, data: ResumeData) -> None:
        await self._resume_gate.wait()
        session = self.sessions.get(str(data.get("session_id")))
        if data.get("token") != self._token:
            await conn.ws.close(code=CLOSE_AUTHENTICATION_FAILED)
            return
        seq = data.get("seq")
        if session is None or not isinstance(seq, int):
            _log.info("gateway: RESUME of an unknown session; invalid session")
            conn.send_op(INVALID_SESSION, False)
            return
        if session.buffer and seq < session.buffer[0][0] - 1:
            _log.info("gateway: RESUME from %s is older than the replay window", seq)
            conn.send_op(INVALID_SESSION, False)
            return
        old = session.connection
        session.connection = conn
        conn.session = session
        if old is not None:
            old.session = None
            await old.ws.close(code=CLOSE_UNKNOWN_ERROR)
        replayed = [event for s, event, _ in session.buffer if s > seq]
        for s, _, text in session.buffer:
            if s > seq:
                conn.send(text)
        self._dispatch_to(session, "RESUMED", {"_trace": ["legato-sandbox"]})
        self.resumes.append(
            ResumeRecord(session_id=session.session_id, from_seq=seq, replayed=replayed)
        )
        _log.info("gateway: session resumed from seq %d, %d replayed", seq, len(replayed))
        self._signal.notify()

    def _voice_state_update(self, session: GatewaySession, data: VoiceStateRequest) -> None:
        self.voice_requests.append(data)
        guild = self.world.guilds.get(int(data["guild_id"]))
        if guild is None:
            _log.warning("gateway: op4 for unknown guild %s", data.get("guild_id"))
            return
        raw_channel = data.get("channel_id")
        channel_id = None if raw_channel is None else int(raw_channel)
        if channel_id is not None and (
            channel_id not in guild.channels or not guild.channels[channel_id].is_voice
        ):
            _log.warning("gateway: op4 to %s, which is not a voice channel", channel_id)
            return
        state = self.world.set_voice(
            guild,
            session.user_id,
            channel_id,
            session_id=session.session_id,
            self_mute=bool(data.get("self_mute")),
            self_deaf=bool(data.get("self_deaf")),
        )
        self.broadcast_voice_state(guild, state)
        if channel_id is not None:
            if self.voice is not None:
                token = self.voice.register_session(
                    server_id=guild.id, user_id=session.user_id, session_id=session.session_id
                )
                endpoint: str | None = self.voice.endpoint
            else:
                token, endpoint = secrets.token_hex(8), None
            server_update = {"token": token, "guild_id": str(guild.id), "endpoint": endpoint}
            self._dispatch_to(session, "VOICE_SERVER_UPDATE", server_update)
        self._signal.notify()

    def _request_members(self, session: GatewaySession, data: MemberRequest) -> None:
        self.member_requests.append(data)
        guild = self.world.guilds.get(int(data["guild_id"]))
        if guild is None:
            return
        query = str(data.get("query") or "").lower()
        wanted = {int(u) for u in data.get("user_ids") or []}
        members = [
            m
            for m in guild.members.values()
            if (not wanted or m.user.id in wanted) and m.user.name.lower().startswith(query)
        ]
        limit = int(data.get("limit") or 0)
        if limit:
            members = members[:limit]
        chunk: JSON = {
            "guild_id": str(guild.id),
            "members": [m.payload() for m in members],
            "chunk_index": 0,
            "chunk_count": 1,
        }
        if data.get("nonce") is not None:
            chunk["nonce"] = data["nonce"]
        self._dispatch_to(session, "GUILD_MEMBERS_CHUNK", chunk)
