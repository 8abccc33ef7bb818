"""The voice gateway shell: an aiohttp websocket driving the sans-I/O core, plus one transport.

:class:`VoiceConnection` is the reusable part of the voice client: given what the two main
gateway events carry (endpoint, token, session id) it opens ``ws(s)://{endpoint}/?v=N``, feeds
every text frame to :class:`~legato.voice.protocol.VoiceGatewayCore`, sleeps until the core's
next deadline (heartbeats, ACK timeouts) on the loop clock, sends what the core queues, and runs
the transport the handshake asks for. It makes no protocol decisions: the close policy is the
core's ``closed(code)``, and what follows (resume, new session, wait how long, wait for a move,
give up) is :class:`~legato.voice.close.ReconnectPolicy`'s ``step``; this module only carries
it out. Its own state is one :class:`~legato.lifecycle.Lifecycle` over
:class:`~legato.voice.state.LinkState`.

Tasks: one supervisor per connection, and per websocket one reader (the supervisor itself) and
one timer. All of them are cancelled and awaited by :meth:`VoiceConnection.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final, Literal

import aiohttp

from legato.errors import TransportError, VoiceConnectError, VoiceError
from legato.lifecycle import Lifecycle
from legato.voice.close import (
    ABNORMAL_CLOSURE,
    CLOSE_RECONNECT,
    AwaitMove,
    GiveUp,
    ReconnectPolicy,
)
from legato.voice.dave import MAX_PROTOCOL_VERSION, DaveClient, DaveOutput, SendJson
from legato.voice.endpoint import (
    auto_gateway_version,
    auto_transports,
    is_loopback,
    split_host_port,
    websocket_url,
)
from legato.voice.events import (
    CloseRequested,
    DaveBinary,
    DaveMessage,
    Event,
    HeartbeatAck,
    HeartbeatTimeout,
    ProtocolError,
    Ready,
    Resumed,
    SessionDescription,
)
from legato.voice.protocol import GatewayStats, VoiceGatewayCore
from legato.voice.state import LINK_TRANSITIONS, ConnState, LinkState
from legato.voice.transport.base import NoMediaPath, Transport, TransportStats

if TYPE_CHECKING:
    from legato.config import VoiceConfig

__all__ = [
    "VoiceConnection",
    "VoiceOptions",
]

_log = logging.getLogger(__name__)

#: Largest voice gateway message accepted (1 MiB); a larger one closes the websocket with 1009,
#: which ends the session (CLOSE_TABLE). The largest legitimate messages are DAVE's op30 welcome
#: and op29 commit (MLS, a few hundred bytes per group member: tens of KB in a full 99-member
#: channel); anything near a megabyte is a broken or hostile server, and must not make us buffer
#: without bound (aiohttp refuses the frame from its header, before reading it).
MAX_MESSAGE_SIZE: Final = 1 << 20

TransportName = Literal["udp", "webrtc", "auto"]


@dataclass(frozen=True, slots=True)
class VoiceOptions:
    """How a voice connection is made and kept.

    Attributes:
        transport: ``"udp"``, ``"webrtc"`` or ``"auto"``: chosen from the endpoint by
            :func:`auto_transports` (udp first toward Discord, webrtc first toward anything else;
            the other if the first fails).
        gateway_version: Voice gateway version (4 to 8), or ``"auto"``: chosen from the
            endpoint by :func:`auto_gateway_version` (8 toward Discord, 6 toward anything else),
            again at every move to a new endpoint.
        self_deaf: Join deafened (Legato never listens).
        self_mute: Join muted.
        connect_timeout: Seconds for the whole first connect (main gateway events included).
        reconnect: Resume/reconnect after a dropped link; off means any drop ends the session.
        reconnect_timeout: Seconds a reconnect episode may last before giving up.
        move_timeout: After close 4014, seconds to wait for a VOICE_SERVER_UPDATE (a move).
        secure: ``wss://`` (True) or ``ws://`` (False); ``None`` decides from the endpoint:
            Discord's hosts always get ``wss://``; other loopback hosts and ports other than
            443 get ``ws://``.
        discovery_timeout: Seconds per UDP IP discovery attempt.
        backoff_base: First retry delay in seconds; doubles per failed attempt, with jitter.
        backoff_max: Largest retry delay in seconds.
        dave: Offer DAVE end-to-end encryption (``max_dave_protocol_version``); Discord closes
            voice without it with 4017 since 2026-03-01.
    """

    transport: TransportName = "udp"
    gateway_version: int | Literal["auto"] = "auto"
    self_deaf: bool = True
    self_mute: bool = False
    connect_timeout: float = 30.0
    reconnect: bool = True
    reconnect_timeout: float = 60.0
    move_timeout: float = 5.0
    secure: bool | None = None
    discovery_timeout: float = 2.0
    backoff_base: float = 0.25
    backoff_max: float = 5.0
    dave: bool = True

    def __post_init__(self) -> None:
        if self.transport not in ("udp", "webrtc", "auto"):
            raise ValueError(f"transport must be udp, webrtc or auto, got {self.transport!r}")
        if self.gateway_version != "auto" and self.gateway_version not in (4, 5, 6, 7, 8):
            raise ValueError(f"voice gateway version must be 4..8, got {self.gateway_version!r}")

    def without_reconnect(self) -> VoiceOptions:
        """A copy with ``reconnect=False``."""
        return replace(self, reconnect=False)

    @classmethod
    def from_config(cls, config: VoiceConfig) -> VoiceOptions:
        """Build options from the ``[voice]`` section of the bot's configuration."""
        return cls(
            transport=config.transport,
            gateway_version=config.gateway_version,
            self_deaf=config.self_deaf,
            connect_timeout=config.connect_timeout,
        )


def _make_transport(name: str, endpoint_host: str, options: VoiceOptions) -> Transport:
    if name == "udp":
        from legato.voice.transport.udp import UdpTransport

        return UdpTransport(discovery_timeout=options.discovery_timeout)
    # Imported lazily: aiortc is heavy and only the webrtc path needs it.
    from legato.voice.transport.webrtc import WebRtcTransport

    return WebRtcTransport(host_candidates_allow_loopback=is_loopback(endpoint_host))


class _FellBack(TransportError):
    """The first of ``"auto"``'s transports failed; the supervisor identifies with the next."""


class VoiceConnection:
    """One voice session: websocket, heartbeats, transport, and the reconnect policy.

    Implements :class:`legato.audio.sink.FrameSink`. Create it, ``await connect()``, play, and
    ``await close()``. A session that ends on its own (fatal close code, 4014 without a move,
    reconnect gave up) calls ``on_close(error)`` once.

    Args:
        endpoint: VOICE_SERVER_UPDATE's ``endpoint``.
        token: VOICE_SERVER_UPDATE's ``token``.
        session_id: VOICE_STATE_UPDATE's ``session_id``.
        user_id: Our user id.
        server_id: The guild id (or the channel id for calls).
        options: See :class:`VoiceOptions`.
        on_close: Called (on the loop) when the session ends by itself, with the reason.
        channel_id: The voice channel (DAVE's MLS group id); the server id stands in without it.
        no_media_path: Counts the frames dropped while no media path is up; the voice client
            shares its own so that a drop is counted in one place.
    """

    def __init__(
        self,
        *,
        endpoint: str,
        token: str,
        session_id: str,
        user_id: int,
        server_id: int,
        options: VoiceOptions | None = None,
        on_close: Callable[[VoiceError | None], None] | None = None,
        channel_id: int | None = None,
        no_media_path: NoMediaPath | None = None,
    ) -> None:
        self.options = options or VoiceOptions()
        #: End-to-end encryption of every frame (both transports); outlives resumes.
        self.dave = DaveClient(
            user_id,
            channel_id or server_id,
            max_protocol_version=MAX_PROTOCOL_VERSION if self.options.dave else 0,
        )
        # A pure wake-up signal, not state: "DAVE may have changed, check your predicate again"
        # (replaced by a fresh Event each time it fires; see _dave_notify).
        self._dave_changed = asyncio.Event()
        #: Logs with the guild id attached (STYLE.md §5); tokens and keys are never logged.
        self.log = logging.LoggerAdapter(_log, {"guild_id": server_id})
        self._endpoint = endpoint.removeprefix("wss://")
        self._token = token
        self._session_id = session_id
        self._user_id = user_id
        self._server_id = server_id
        self._on_close = on_close
        self._version = self._pick_version(self._endpoint)
        self._transports: list[str] = self._pick_transports(self._endpoint)
        #: Websocket connects and resumes of the cores replaced so far (see ``_renew_core``).
        self._retired_connects = 0
        self._retired_resumes = 0
        #: The endpoint the current core was made for, and whether it resumes (op7): a 4003
        #: answering op7 clears that for as long as we talk to that endpoint.
        self._core_endpoint = self._endpoint
        self._resume_supported = True
        self._core = self._new_core()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._http: aiohttp.ClientSession | None = None
        self._transport: Transport | None = None
        self._old_stats = TransportStats()
        self._runner: asyncio.Task[None] | None = None
        self._timer: asyncio.Task[None] | None = None
        # A pure wake-up signal for the timer task, not state: "the core may have a new
        # deadline" (set after every pump).
        self._wake = asyncio.Event()
        self._send_lock = asyncio.Lock()
        #: Where this connection is (media flowing, reconnecting, awaiting a move, ended).
        self.lifecycle = Lifecycle(LinkState.IDLE, LINK_TRANSITIONS, log=self.log)
        #: What to do after each close (resume, new session, backoff, give up): pure, timed.
        self.reconnect_policy = ReconnectPolicy(
            enabled=self.options.reconnect,
            timeout=self.options.reconnect_timeout,
            move_timeout=self.options.move_timeout,
            backoff_base=self.options.backoff_base,
            backoff_max=self.options.backoff_max,
        )
        # A VOICE_SERVER_UPDATE not acted on yet: the next websocket opens at the new endpoint
        # with a new session. A request that may arrive in any state, so not a state itself.
        self._move_pending = False
        self._close_request: CloseRequested | None = None
        self._closer: asyncio.Task[None] | None = None
        #: Why the connection ended; set with the move to CLOSED (see :meth:`_end`).
        self._error: VoiceError | None = None
        self._speaking = False
        self._rtts: deque[float] = deque(maxlen=20)
        self._no_media_path = no_media_path or NoMediaPath()

    # -- what callers read ----------------------------------------------------------------

    def is_connected(self) -> bool:
        """True while frames reach the server (handshake done, not reconnecting)."""
        return self.lifecycle.state is LinkState.CONNECTED

    @property
    def state(self) -> ConnState:
        """The gateway core's state (the current websocket's handshake)."""
        state: ConnState = self._core.state
        return state

    @property
    def link_state(self) -> LinkState:
        """The whole connection's state (see :attr:`lifecycle`)."""
        return self.lifecycle.state

    @property
    def frames_dropped(self) -> int:
        """Frames handed to :meth:`send_frame` while no media path was up."""
        return self._no_media_path.frames_dropped

    @property
    def gateway_stats(self) -> GatewayStats:
        """The gateway core's counters (heartbeats, resumes, bad input)."""
        return self._core.stats

    @property
    def reconnects(self) -> int:
        """Websockets opened after the first one (resumes and new sessions), over every session."""
        return max(0, self._retired_connects + self._core.stats.connects - 1)

    @property
    def resumes(self) -> int:
        """Resumes sent (op7), over every session of this connection."""
        return self._retired_resumes + self._core.stats.resumes

    @property
    def gateway_version(self) -> int:
        """The voice gateway version in use (``"auto"`` settles on 8 or 6)."""
        return self._version

    @property
    def latency(self) -> float:
        """The last heartbeat round trip in seconds (``inf`` before the first ACK)."""
        return self._rtts[-1] if self._rtts else float("inf")

    @property
    def average_latency(self) -> float:
        """Mean of the last 20 heartbeat round trips in seconds (``inf`` before any)."""
        return sum(self._rtts) / len(self._rtts) if self._rtts else float("inf")

    @property
    def transport_name(self) -> str | None:
        """``"udp"`` or ``"webrtc"`` while a transport is up."""
        return self._transport.name if self._transport is not None else None

    @property
    def mode(self) -> str | None:
        """The transport's encryption mode."""
        return self._transport.mode if self._transport is not None else None

    @property
    def ssrc(self) -> int | None:
        """Our audio SSRC while a transport is up."""
        return self._transport.ssrc if self._transport is not None else None

    @property
    def transport(self) -> Transport | None:
        """The current media transport (replaced on a new session)."""
        return self._transport

    @property
    def voice_privacy_code(self) -> str | None:
        """DAVE's voice privacy code (30 digits) while end-to-end encryption is in force."""
        return self.dave.privacy_code

    @property
    def stats(self) -> TransportStats:
        """Counters summed over every transport this connection has used."""
        now = self._transport.stats if self._transport is not None else TransportStats()
        old = self._old_stats
        return TransportStats(
            frames_sent=old.frames_sent + now.frames_sent,
            bytes_sent=old.bytes_sent + now.bytes_sent,
            send_errors=old.send_errors + now.send_errors,
            malformed_received=old.malformed_received + now.malformed_received,
            loss_reports=old.loss_reports + now.loss_reports,
            # The latest report's fraction; each transport's SSRC counts its own losses.
            fraction_lost=now.fraction_lost if now.loss_reports else old.fraction_lost,
            packets_lost=old.packets_lost + now.packets_lost,
        )

    @property
    def error(self) -> VoiceError | None:
        """Why the connection ended, once it has (``None`` after a clean close)."""
        return self._error

    @property
    def endpoint(self) -> str:
        """The voice server endpoint in use."""
        return self._endpoint

    # -- life cycle -----------------------------------------------------------------------

    async def connect(self) -> None:
        """Run the handshake and bring the transport up; return once frames can flow.

        Raises:
            VoiceConnectError: it failed or took longer than ``options.connect_timeout``.
        """
        if self._runner is not None:
            raise VoiceConnectError("connect() was already called")
        if self.lifecycle.state is not LinkState.IDLE:
            raise VoiceConnectError("the connection was closed before connect()")
        self.lifecycle.move(LinkState.CONNECTING, reason="connect")
        self._runner = asyncio.get_running_loop().create_task(
            self._supervise(), name=f"legato-voice-{self._server_id}"
        )
        try:
            await self.wait_connected(timeout=self.options.connect_timeout)
        except BaseException:
            await self.close()
            raise

    async def wait_connected(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until frames can flow.

        Raises:
            VoiceConnectError: the connection ended first, or ``timeout`` passed.
        """
        try:
            async with asyncio.timeout(timeout):
                await self.lifecycle.wait_for(LinkState.CONNECTED, LinkState.CLOSED)
        except TimeoutError:
            raise VoiceConnectError(
                f"voice connection to {self._endpoint} timed out ({timeout} s)"
            ) from None
        if self.lifecycle.state is LinkState.CLOSED:
            raise VoiceConnectError(
                f"voice connection to {self._endpoint} ended: {self._error}",
                user_message=self._error.user_message if self._error else None,
            ) from self._error

    async def wait_closed(self) -> VoiceError | None:
        """Wait until the connection has ended; return why (``None`` if closed cleanly)."""
        await self.lifecycle.wait_for(LinkState.CLOSED)
        return self._error

    async def close(self) -> None:
        """End the session (close code 1000), stop every task, close the transport. Idempotent."""
        if self.lifecycle.state not in (LinkState.CLOSING, LinkState.CLOSED):
            self.lifecycle.move(LinkState.CLOSING, reason="close()")
            self._core.close("leaving")
            ws = self._ws
            if ws is not None and not ws.closed:
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with asyncio.timeout(2.0):
                        await ws.close(code=aiohttp.WSCloseCode.OK)
        runner = self._runner
        if runner is not None and runner is not asyncio.current_task():
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        await self._release()
        self._end(None)

    def _end(self, error: VoiceError | None) -> None:
        """Move to CLOSED with why (once), and wake the DAVE waiters a last time."""
        if self.lifecycle.state is not LinkState.CLOSED:
            self._error = error
            self.lifecycle.move(LinkState.CLOSED, reason=str(error) if error else "closed")
        self._dave_notify()

    def _media_lost(self, reason: str) -> None:
        """Back to CONNECTING (socket lost, or a move answered): frames are dropped from here."""
        if self.lifecycle.state in (LinkState.CONNECTED, LinkState.AWAITING_MOVE):
            self.lifecycle.move(LinkState.CONNECTING, reason=reason)

    def update_server(self, endpoint: str, token: str) -> None:
        """A new VOICE_SERVER_UPDATE: reconnect to ``endpoint`` with a new session.

        The same endpoint and token again is ignored, unless the connection is waiting for a
        move (after close 4014), which it then completes.
        """
        endpoint = endpoint.removeprefix("wss://")
        waiting = self._core.state in (ConnState.DISCONNECTED, ConnState.CLOSED)
        if endpoint == self._endpoint and token == self._token and not waiting:
            return  # Discord repeats itself; nothing moved
        self.log.info("voice server %s -> %s", self._endpoint, endpoint)
        self._endpoint = endpoint
        self._token = token
        self._version = self._pick_version(endpoint)
        self._transports = self._pick_transports(endpoint)
        self._move_pending = True
        # The old server is being left (or a 4014 is answered): frames are dropped from here.
        self._media_lost(f"moving to {endpoint}")
        ws = self._ws
        if ws is not None and not ws.closed and self._closer is None:
            # Closing wakes the reader, which then reconnects to the new endpoint.
            self._closer = asyncio.get_running_loop().create_task(
                self._close_for_move(ws), name="legato-voice-move-close"
            )

    async def _close_for_move(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            await ws.close(code=CLOSE_RECONNECT)
        except (aiohttp.ClientError, OSError) as exc:
            self.log.info("closing the voice websocket for a move failed: %r", exc)
        finally:
            self._closer = None

    def update_session(self, session_id: str) -> None:
        """A new VOICE_STATE_UPDATE ``session_id``: used by the next identify."""
        self._session_id = session_id

    async def wait_dave(
        self,
        predicate: Callable[[DaveClient], bool],
        timeout: float = 10.0,  # noqa: ASYNC109 - a bounded wait is the point
    ) -> None:
        """Wait until ``predicate(self.dave)`` holds; checked after every DAVE message.

        Raises:
            TimeoutError: it did not hold in time.
        """
        async with asyncio.timeout(timeout):
            while not predicate(self.dave):
                await self._dave_changed.wait()

    # -- SendGate -------------------------------------------------------------------------

    @property
    def can_send(self) -> bool:
        """False while DAVE is negotiated but its group is not in force for us (a frame would
        be withheld as silence); see :attr:`DaveClient.media_allowed`."""
        return self.dave.media_allowed

    async def wait_can_send(self) -> None:
        """Return once :attr:`can_send` holds (rechecked after every DAVE message), or once the
        connection has ended: its frames are then dropped and counted, not sent."""
        while not self.dave.media_allowed and self.lifecycle.state is not LinkState.CLOSED:
            await self._dave_changed.wait()

    # -- FrameSink ------------------------------------------------------------------------

    async def set_speaking(self, speaking: bool) -> None:
        """Send op5 and wait until it is written, so it precedes the frames that follow."""
        self._speaking = speaking
        transport = self._transport
        if self.is_connected() and transport is not None:
            self._core.speaking(speaking, transport.ssrc)
            await self._pump()

    def send_frame(self, opus: bytes) -> None:
        """Send one Opus frame now; while reconnecting it is dropped and counted."""
        transport = self._transport
        if transport is None or self.lifecycle.state is not LinkState.CONNECTED:
            self._no_media_path.send_frame(opus)
            return
        transport.send_frame(self.dave.encrypt(opus))

    # -- supervisor -----------------------------------------------------------------------

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        policy = self.reconnect_policy
        error: VoiceError | None = None
        resume = False
        try:
            while True:
                if self._move_pending:
                    # Moved (or a 4014 was followed by a new server): a fresh session there.
                    self._move_pending = False
                    await self._drop_transport()
                    self._renew_core()
                    resume = False
                try:
                    code, reason, reached_media = await self._run_websocket(resume=resume)
                except _FellBack:
                    # "auto": identify again with the next transport.
                    await self._drop_transport()
                    self._renew_core()
                    resume = False
                    continue
                self._media_lost("websocket closed")
                if self.lifecycle.state in (LinkState.CLOSING, LinkState.CLOSED):
                    return
                policy.socket_ended(loop.time(), reached_media=reached_media)
                if self._move_pending:
                    continue
                decision = self._core.closed(code, reason)
                step = policy.step(decision, loop.time(), endpoint=self._endpoint)
                if isinstance(step, AwaitMove):
                    # Moved to AWAITING_MOVE before any await, so update_server() cannot slip
                    # between the decision and the wait.
                    self.lifecycle.move(LinkState.AWAITING_MOVE, reason=decision.reason)
                    await self._drop_transport()
                    try:
                        async with asyncio.timeout(step.timeout):
                            await self.lifecycle.wait_for(LinkState.CONNECTING)
                    except TimeoutError:
                        raise step.error from None
                    step = policy.after_move(decision, loop.time(), endpoint=self._endpoint)
                if isinstance(step, GiveUp):
                    raise step.error
                if not step.resume:
                    await self._drop_transport()
                resume = step.resume
                if step.delay > 0:
                    await asyncio.sleep(step.delay)
        except VoiceError as exc:
            error = exc
            self.log.warning("voice connection ended: %s", exc)
        except Exception as exc:
            # A bug in the shell or a transport: end the connection loudly, never silently.
            self.log.exception("voice connection crashed")
            error = VoiceError(f"voice connection crashed: {exc!r}")
        finally:
            await self._release()
            by_us = self.lifecycle.state in (LinkState.CLOSING, LinkState.CLOSED)
            self._end(error)
            if not by_us and self._on_close is not None:
                self._on_close(error)

    def _pick_transports(self, endpoint: str) -> list[str]:
        name = self.options.transport
        return auto_transports(endpoint) if name == "auto" else [name]

    def _pick_version(self, endpoint: str) -> int:
        version = self.options.gateway_version
        return auto_gateway_version(endpoint) if version == "auto" else version

    # -- one websocket --------------------------------------------------------------------

    async def _run_websocket(self, *, resume: bool) -> tuple[int | None, str, bool]:
        """Open the websocket and run it to its end.

        Returns:
            ``(close code or None for a drop, close reason, whether media flowed)``.
        """
        loop = asyncio.get_running_loop()
        if self._http is None:
            self._http = aiohttp.ClientSession()
        url = websocket_url(self._endpoint, self._version, self.options.secure)
        self._close_request = None
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                ws = await self._http.ws_connect(
                    url,
                    autoping=True,
                    heartbeat=None,
                    max_msg_size=MAX_MESSAGE_SIZE,
                    timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
                )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.log.info("voice websocket %s failed to open: %r", url, exc)
            self._core.connected(loop.time(), resume=resume)
            return None, f"connect failed: {exc!r}", False
        self._ws = ws
        self._core.connected(loop.time(), resume=resume)
        self._timer = loop.create_task(self._run_timer(), name="legato-voice-timer")
        reached_ready = False
        try:
            await self._pump()
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    self._core.receive_text(msg.data, loop.time())
                elif msg.type is aiohttp.WSMsgType.BINARY:
                    self._core.receive_binary(msg.data, loop.time())
                else:
                    if msg.type is aiohttp.WSMsgType.ERROR:
                        # aiohttp has closed the websocket already (1009 for a message over
                        # MAX_MESSAGE_SIZE); the close code decides what follows.
                        self.log.warning("voice websocket %s error: %s", self._endpoint, msg.data)
                    break
                await self._pump()
                reached_ready = reached_ready or self.is_connected()
        except (aiohttp.ClientError, OSError) as exc:
            self.log.info("voice websocket read failed: %r", exc)
        finally:
            self._media_lost("websocket closed")
            await self._stop_timer()
            self._ws = None
            if not ws.closed:
                code = self._close_request.code if self._close_request else CLOSE_RECONNECT
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with asyncio.timeout(2.0):
                        await ws.close(code=code)
        request = self._close_request
        if request is not None:
            return request.code, request.reason, reached_ready
        closed_with: int | None = ws.close_code
        if closed_with == ABNORMAL_CLOSURE:
            closed_with = None
        self.log.info("voice websocket %s closed with %s", self._endpoint, closed_with)
        return closed_with, "", reached_ready

    async def _run_timer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            deadline = self._core.next_deadline()
            if deadline is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(deadline):
                        await self._wake.wait()
            self._core.tick(loop.time())
            await self._pump()

    async def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer

    def _renew_core(self) -> None:
        """Start a fresh gateway core, keeping the old one's reconnect counts.

        Whether the server resumes is kept too, unless :meth:`update_server` moved us to
        another endpoint (which starts out trusted again).
        """
        self._retired_connects += self._core.stats.connects
        self._retired_resumes += self._core.stats.resumes
        # A refusal from the old server says nothing of a new one.
        same_server = self._core_endpoint == self._endpoint
        self._resume_supported = self._core.resume_supported if same_server else True
        self._core = self._new_core()

    def _new_core(self) -> VoiceGatewayCore:
        name = self._transports[0]
        self._core_endpoint = self._endpoint
        return VoiceGatewayCore(
            str(self._server_id),
            str(self._user_id),
            self._session_id,
            self._token,
            version=self._version,
            transport_name=name,
            # A bot on udp identifies as discord.py does; on webrtc as the capture's browser.
            browser_like=name == "webrtc",
            max_dave_protocol_version=self.dave.max_protocol_version,
            resume_supported=self._resume_supported,
        )

    async def _pump(self) -> None:
        """Send what the core queued, then act on its events (which may queue more)."""
        while True:
            await self._flush()
            events = self._core.events()
            if not events:
                break
            for event in events:
                await self._handle(event)
        self._wake.set()

    async def _flush(self) -> None:
        async with self._send_lock:
            texts = self._core.outgoing_text()
            binaries = self._core.outgoing_binary()
            ws = self._ws
            if ws is None or ws.closed:
                return
            try:
                for text in texts:
                    await ws.send_str(text)
                for data in binaries:
                    await ws.send_bytes(data)
            except (aiohttp.ClientError, ConnectionError) as exc:
                self.log.info("voice websocket send failed: %r", exc)

    async def _handle(self, event: Event) -> None:
        if isinstance(event, Ready):
            await self._on_ready(event)
        elif isinstance(event, SessionDescription):
            self._send_dave(self.dave.start(event.dave_protocol_version))
            await self._on_session_description(event)
        elif isinstance(event, DaveMessage):
            self._send_dave(self.dave.receive_json(event.op, event.data))
        elif isinstance(event, DaveBinary):
            self._send_dave(self.dave.receive_binary(event.op, event.payload))
        elif isinstance(event, Resumed):
            self._media_flows("resumed")
            self._resend_speaking()
        elif isinstance(event, HeartbeatAck):
            if event.rtt is not None:
                self._rtts.append(event.rtt)
        elif isinstance(event, CloseRequested):
            self._close_request = event
            ws = self._ws
            if ws is not None and not ws.closed:
                # From the timer task this wakes the reader, which then ends the session.
                await ws.close(code=event.code)
        elif isinstance(event, HeartbeatTimeout | ProtocolError):
            self.log.info("voice gateway: %s", event)

    async def _on_ready(self, event: Ready) -> None:
        await self._drop_transport()
        name = self._transports[0]
        transport = _make_transport(name, split_host_port(self._endpoint)[0], self.options)
        self._transport = transport
        try:
            op1 = await transport.prepare(dict(event.data))
        except TransportError as exc:
            if len(self._transports) > 1:
                # "auto": the first choice failed; the next connect identifies with the next one.
                self.log.warning("voice transport %s failed; falling back to %s", *self._transports)
                self._transports.pop(0)
                raise _FellBack(str(exc)) from exc
            raise
        if name == "webrtc":
            self._core.request_backend_version()
            self._core.announce_streams(transport.ssrc)
        self._core.select_protocol(op1)

    async def _on_session_description(self, event: SessionDescription) -> None:
        transport = self._transport
        if transport is None:
            raise TransportError("op4 arrived before op2")
        await transport.start(dict(event.data))
        if transport.name == "webrtc":
            # Spacebar drops an op12 sent long before DTLS is up: announce again now.
            self._core.announce_streams(transport.ssrc)
        self._media_flows("session description applied")
        self._resend_speaking()

    def _media_flows(self, reason: str) -> None:
        if self.lifecycle.state is LinkState.CONNECTING:
            self.lifecycle.move(LinkState.CONNECTED, reason=reason)

    def _send_dave(self, outputs: list[DaveOutput]) -> None:
        for out in outputs:
            if isinstance(out, SendJson):
                self._core.send(out.op, out.data)
            else:
                self._core.send_binary(out.op, out.payload)
        self._dave_notify()

    def _dave_notify(self) -> None:
        """Wake ``wait_dave``/``wait_can_send`` (after a DAVE message, and once at the end)."""
        changed, self._dave_changed = self._dave_changed, asyncio.Event()
        changed.set()

    def _resend_speaking(self) -> None:
        """After op4 or op9 the server's idea of our speaking state is reset: restate it."""
        if self._speaking and self._transport is not None:
            self._core.speaking(True, self._transport.ssrc)

    async def _drop_transport(self) -> None:
        transport = self._transport
        if transport is None:
            return
        self._transport = None
        old = self._old_stats
        old.frames_sent += transport.stats.frames_sent
        old.bytes_sent += transport.stats.bytes_sent
        old.send_errors += transport.stats.send_errors
        old.malformed_received += transport.stats.malformed_received
        old.loss_reports += transport.stats.loss_reports
        if transport.stats.loss_reports:
            old.fraction_lost = transport.stats.fraction_lost
        old.packets_lost += transport.stats.packets_lost
        await transport.close()

    async def _release(self) -> None:
        self._media_lost("released")
        await self._stop_timer()
        closer = self._closer
        if closer is not None and closer is not asyncio.current_task():
            closer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await closer
        await self._drop_transport()
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()
