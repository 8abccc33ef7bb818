"""``LegatoVoiceClient``: Legato's voice stack behind discord.py's ``VoiceProtocol`` seam.

discord.py drives a voice protocol like this (2.7.1, ``abc.Connectable.connect``):
``cls(client, channel)``, register it in the connection state, ``await connect(...)``; then it
feeds ``on_voice_state_update`` / ``on_voice_server_update`` as separate tasks in no fixed order
(their exceptions are only logged), and ``Client.close()`` calls ``disconnect(force=True)``. Only
a timeout makes the library clean up after a failed ``connect``, so ``connect`` cleans up itself.

Everything past the two main-gateway events (the voice websocket, the transport, resume and
reconnect) is :class:`legato.voice.gateway.VoiceConnection`; this class does the discord.py side:
the op4 voice state update, collecting ``session_id``/``token``/``endpoint``, moves and kicks,
and ``cleanup()``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import discord

from legato.errors import VoiceConnectError, VoiceError
from legato.lifecycle import Lifecycle
from legato.voice.gateway import VoiceConnection, VoiceOptions
from legato.voice.state import CLIENT_TRANSITIONS, ClientState
from legato.voice.transport.base import NoMediaPath, TransportStats

if TYPE_CHECKING:
    from discord.types.voice import GuildVoiceState as GuildVoiceStatePayload
    from discord.types.voice import VoiceServerUpdate as VoiceServerUpdatePayload

__all__ = ["DisconnectListener", "LegatoVoiceClient", "VoiceLinkStats", "VoiceOptions"]

_log = logging.getLogger(__name__)

#: Seconds to wait for the VOICE_STATE_UPDATE that confirms we left (see ``_teardown``).
LEAVE_CONFIRM_TIMEOUT: Final = 2.0

#: The two main-gateway events a join or a move waits for.
_VOICE_STATE: Final = "voice state"
_VOICE_SERVER: Final = "voice server"
_BOTH: Final = frozenset({_VOICE_STATE, _VOICE_SERVER})
#: The states that wait for them.
_AWAITING: Final = frozenset({ClientState.JOINING, ClientState.MOVING})
#: The states of a teardown begun or done.
_LEAVING: Final = (ClientState.DISCONNECTING, ClientState.LEFT_CHANNEL, ClientState.CLOSED)

#: Called once when the client is gone for good: ``None`` after ``disconnect()``, else why.
DisconnectListener = Callable[["LegatoVoiceClient", VoiceError | None], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class VoiceLinkStats:
    """A snapshot of one voice connection, for ``/music debug`` and for code.

    Attributes:
        connected: Media can flow now (handshake done, not reconnecting).
        transport: ``"udp"`` or ``"webrtc"`` while a transport is up.
        mode: The negotiated transport encryption mode.
        gateway_version: The voice gateway version in use (None before connecting).
        latency_ms: The last heartbeat round trip (None before the first ACK).
        average_latency_ms: Mean of the recent round trips (None before the first ACK).
        reconnects: Voice websockets opened after the first one (resumes included).
        resumes: Of those, how many resumed the session.
        frames_sent: Frames the transports sent.
        frames_dropped: Frames handed over while no media path was up.
        send_errors: Frames a transport failed to send.
        loss_reports: RTCP reception reports about our stream received (``udp`` only; over
            ``webrtc`` aiortc consumes them).
        fraction_lost: The latest report's share of packets lost since the one before, 0.0-1.0.
        packets_lost: The latest report's cumulative count of packets lost.
        dave_protocol_version: The executed DAVE version (0: not end-to-end encrypted).
        dave_encrypting: Whether frames are end-to-end encrypted right now.
        dave_withheld_frames: Frames replaced by Opus silence because DAVE was negotiated but
            its group not in force (0 while the player holds its track instead, as it does).
        privacy_code: DAVE's voice privacy code while end-to-end encryption is in force.
    """

    connected: bool
    transport: str | None
    mode: str | None
    gateway_version: int | None
    latency_ms: float | None
    average_latency_ms: float | None
    reconnects: int
    resumes: int
    frames_sent: int
    frames_dropped: int
    send_errors: int
    loss_reports: int
    fraction_lost: float
    packets_lost: int
    dave_protocol_version: int
    dave_encrypting: bool
    privacy_code: str | None
    dave_withheld_frames: int = 0


def _ms(seconds: float) -> float | None:
    return seconds * 1e3 if math.isfinite(seconds) else None


class LegatoVoiceClient(discord.VoiceProtocol):
    """A voice connection for one guild, usable as ``await channel.connect(cls=...)``.

    It is a :class:`legato.audio.sink.FrameSink`: the player calls :meth:`set_speaking` and
    :meth:`send_frame`. Use :meth:`configured` to pass options through discord.py's factory call.

    Args:
        client: The discord.py client.
        channel: The voice or stage channel to join.
        options: Transport, gateway version and timeouts; defaults when ``None``.
    """

    def __init__(
        self,
        client: discord.Client,
        channel: discord.abc.Connectable,
        *,
        options: VoiceOptions | None = None,
    ) -> None:
        super().__init__(client, channel)
        self.options = options or VoiceOptions()
        guild = getattr(channel, "guild", None)
        #: Logs with the guild id attached (STYLE.md §5).
        self.log = logging.LoggerAdapter(_log, {"guild_id": getattr(guild, "id", None)})
        self._session_id: str | None = None
        self._token: str | None = None
        self._endpoint: str | None = None
        #: Where this client is: joining, connected, moving, leaving, gone.
        self.lifecycle = Lifecycle(ClientState.JOINING, CLIENT_TRANSITIONS, log=self.log)
        # JOINING's and MOVING's data: which of the two main-gateway events is still awaited.
        self._awaiting: frozenset[str] = _BOTH
        self._conn: VoiceConnection | None = None
        self._listeners: list[DisconnectListener] = []
        self._teardown_task: asyncio.Task[None] | None = None
        self._self_deaf = self.options.self_deaf
        self._self_mute = self.options.self_mute
        #: Counts every frame dropped for want of a media path; shared with each connection.
        self._no_media_path = NoMediaPath()

    @classmethod
    def configured(
        cls, options: VoiceOptions
    ) -> Callable[[discord.Client, discord.abc.Connectable], LegatoVoiceClient]:
        """Return a factory for ``channel.connect(cls=...)`` that carries ``options``.

        ``Connectable.connect`` calls ``cls(client, channel)``, so the options ride in a closure.
        """

        def factory(client: discord.Client, channel: discord.abc.Connectable) -> LegatoVoiceClient:
            return cls(client, channel, options=options)

        return factory

    # -- what the cog and the player read -------------------------------------------------

    @property
    def guild(self) -> discord.Guild:
        """The guild of the channel we are in."""
        guild: discord.Guild = self.channel.guild  # type: ignore[attr-defined]  # Connectable has no .guild but every guild channel does
        return guild

    @property
    def connection(self) -> VoiceConnection | None:
        """The voice session, while one exists."""
        return self._conn

    def is_connected(self) -> bool:
        """True while media can flow (handshake done, not reconnecting)."""
        return self._conn is not None and self._conn.is_connected()

    @property
    def latency(self) -> float:
        """Last heartbeat round trip in seconds (``inf`` before the first ACK)."""
        return self._conn.latency if self._conn is not None else float("inf")

    @property
    def average_latency(self) -> float:
        """Mean of the recent heartbeat round trips in seconds (``inf`` before any)."""
        return self._conn.average_latency if self._conn is not None else float("inf")

    @property
    def transport_name(self) -> str | None:
        """``"udp"`` or ``"webrtc"`` once connected."""
        return self._conn.transport_name if self._conn is not None else None

    @property
    def mode(self) -> str | None:
        """The negotiated encryption mode."""
        return self._conn.mode if self._conn is not None else None

    @property
    def voice_privacy_code(self) -> str | None:
        """DAVE's voice privacy code (as discord.py's ``VoiceClient.voice_privacy_code``)."""
        return self._conn.voice_privacy_code if self._conn is not None else None

    @property
    def stats(self) -> TransportStats:
        """The current transport's counters (zeros before connecting)."""
        return self._conn.stats if self._conn is not None else TransportStats()

    @property
    def reconnects(self) -> int:
        """Voice websockets opened after the first one (resumes included)."""
        return self._conn.reconnects if self._conn is not None else 0

    @property
    def resumes(self) -> int:
        """Voice sessions resumed (op7)."""
        return self._conn.resumes if self._conn is not None else 0

    @property
    def link_stats(self) -> VoiceLinkStats:
        """A snapshot of the connection: transport, gateway, latency, reconnects, loss, DAVE."""
        conn = self._conn
        transport = self.stats
        return VoiceLinkStats(
            connected=self.is_connected(),
            transport=self.transport_name,
            mode=self.mode,
            gateway_version=conn.gateway_version if conn is not None else None,
            latency_ms=_ms(self.latency),
            average_latency_ms=_ms(self.average_latency),
            reconnects=self.reconnects,
            resumes=self.resumes,
            frames_sent=transport.frames_sent,
            frames_dropped=self.frames_dropped,
            send_errors=transport.send_errors,
            loss_reports=transport.loss_reports,
            fraction_lost=transport.fraction_lost,
            packets_lost=transport.packets_lost,
            dave_protocol_version=conn.dave.protocol_version if conn is not None else 0,
            dave_encrypting=conn.dave.encrypting if conn is not None else False,
            privacy_code=self.voice_privacy_code,
            dave_withheld_frames=conn.dave.stats.withheld_frames if conn is not None else 0,
        )

    @property
    def state(self) -> ClientState:
        """Where this client is (see :attr:`lifecycle`)."""
        return self.lifecycle.state

    @property
    def frames_dropped(self) -> int:
        """Frames the player handed over while no media path was up."""
        return self._no_media_path.frames_dropped

    def add_disconnect_listener(self, listener: DisconnectListener) -> None:
        """Call ``listener(self, error)`` once when this client is gone for good.

        ``error`` is ``None`` after :meth:`disconnect`, else the :class:`VoiceError` that ended
        it (kicked, reconnect gave up, a fatal close code). The bot also receives the event
        ``legato_voice_disconnect(voice_client, error)``.
        """
        self._listeners.append(listener)

    # -- SendGate -------------------------------------------------------------------------

    @property
    def can_send(self) -> bool:
        """False while DAVE is negotiated but its group is not in force for us yet: a frame sent
        now would be withheld (see :class:`legato.audio.sink.SendGate`)."""
        return self._conn is None or self._conn.can_send

    async def wait_can_send(self) -> None:
        """Return once :attr:`can_send` holds (or the connection has ended)."""
        if self._conn is not None:
            await self._conn.wait_can_send()

    # -- FrameSink ------------------------------------------------------------------------

    async def set_speaking(self, speaking: bool) -> None:
        """Send op5 (awaited, so it precedes the frames that follow)."""
        if self._conn is not None:
            await self._conn.set_speaking(speaking)

    def send_frame(self, opus: bytes) -> None:
        """Send one Opus frame; dropped and counted while there is no media path."""
        if self._conn is None:
            self._no_media_path.send_frame(opus)
            return
        self._conn.send_frame(opus)

    # -- discord.py's VoiceProtocol -------------------------------------------------------

    async def connect(
        self,
        *,
        timeout: float,  # noqa: ASYNC109 - discord.py's VoiceProtocol signature
        reconnect: bool,
        self_deaf: bool = False,
        self_mute: bool = False,
    ) -> None:
        """Join the channel and bring up the voice session.

        Raises:
            VoiceConnectError: anything failed or ``timeout`` passed; this client has then
                left the channel and unregistered itself.
        """
        self._self_deaf = self_deaf or self.options.self_deaf
        self._self_mute = self_mute or self.options.self_mute
        try:
            async with asyncio.timeout(timeout):
                await self._change_voice_state(self.channel)  # type: ignore[arg-type]  # a channel is a Snowflake
                await self.lifecycle.wait_for(ClientState.CONNECTING, *_LEAVING)
                if self.lifecycle.state is not ClientState.CONNECTING:
                    raise VoiceConnectError("disconnected while connecting")
                conn = self._new_connection(reconnect=reconnect)
                self._conn = conn
                await conn.connect()
        except BaseException as exc:
            await self._teardown(error=None, leave=True, notify=False, confirm=True)
            if isinstance(exc, asyncio.CancelledError):
                raise
            if isinstance(exc, VoiceConnectError):
                raise
            if isinstance(exc, TimeoutError):
                raise VoiceConnectError(f"voice connect timed out after {timeout:g} s") from exc
            if isinstance(exc, VoiceError | discord.DiscordException | OSError):
                raise VoiceConnectError(f"voice connect failed: {exc}") from exc
            raise
        if self.lifecycle.state is ClientState.CONNECTING:
            self.lifecycle.move(ClientState.CONNECTED, reason="voice connected")
        self.log.info(
            "voice connected: guild %s over %s (%s)", self.guild.id, conn.transport_name, conn.mode
        )

    async def on_voice_state_update(self, data: GuildVoiceStatePayload, /) -> None:
        """Take ``session_id``; a ``channel_id`` of ``None`` we did not ask for is a kick."""
        channel_id = data.get("channel_id")
        if channel_id is None:
            state = self.lifecycle.state
            if state is ClientState.DISCONNECTING:
                self.lifecycle.move(ClientState.LEFT_CHANNEL, reason="leave confirmed")
                return
            if state in _LEAVING:
                return  # the confirmation of our own leave
            if state in _AWAITING and _VOICE_STATE in self._awaiting:
                # Before our join was even acknowledged: the tail of an earlier leave in this
                # guild (discord.py hits the same race), not a kick.
                self.log.debug("ignoring a stale leave while joining")
                return
            self.log.info("removed from voice by someone else")
            self._schedule_teardown(VoiceError("removed from the voice channel"), leave=False)
            return
        self._session_id = data["session_id"]
        if int(channel_id) != getattr(self.channel, "id", None):
            moved_to = self.guild.get_channel(int(channel_id))
            if moved_to is not None:
                self.channel = moved_to  # type: ignore[assignment]  # a guild voice channel is Connectable
            if self._conn is not None:
                self._conn.dave.channel_id = int(channel_id)  # the next DAVE group is there
        if self._conn is not None:
            self._conn.update_session(data["session_id"])
        self._arrived(_VOICE_STATE)

    async def on_voice_server_update(self, data: VoiceServerUpdatePayload, /) -> None:
        """Take ``token``/``endpoint``; a new one while connected moves the session there."""
        endpoint = data.get("endpoint")
        if endpoint is None:
            # Discord is allocating a server; another update follows.
            return
        endpoint = endpoint.removeprefix("wss://")
        self._token = data["token"]
        self._endpoint = endpoint
        if self._conn is not None:
            self._conn.update_server(endpoint, data["token"])
        self._arrived(_VOICE_SERVER)

    async def disconnect(self, *, force: bool = False) -> None:
        """Leave the channel and close everything; safe to call twice.

        Args:
            force: Accepted for discord.py's signature; teardown is the same either way.
        """
        await self._teardown(error=None, leave=True, notify=True, confirm=not force)

    async def move_to(
        self,
        channel: discord.abc.Snowflake | None,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 - bounds the wait for the new voice server
    ) -> None:
        """Move to another channel of the same guild (``None`` disconnects).

        Raises:
            VoiceConnectError: the new voice server was not reached within ``timeout``.
        """
        if channel is None:
            await self.disconnect()
            return
        if channel.id == getattr(self.channel, "id", None):
            return
        if self.lifecycle.state not in (ClientState.CONNECTED, ClientState.MOVING):
            raise VoiceConnectError(f"cannot move while {self.lifecycle.state.name}")
        # Discord answers a move with a VOICE_STATE_UPDATE and a VOICE_SERVER_UPDATE again.
        self._awaiting = _BOTH
        self.lifecycle.move(ClientState.MOVING, reason=f"moving to channel {channel.id}")
        await self._change_voice_state(channel)
        try:
            async with asyncio.timeout(timeout):
                await self.lifecycle.wait_for(ClientState.CONNECTED, *_LEAVING)
                if self._conn is not None:
                    await self._conn.wait_connected()
        except (TimeoutError, VoiceError) as exc:
            if self.lifecycle.state is ClientState.MOVING:
                self.lifecycle.move(ClientState.CONNECTED, reason="move failed")
            raise VoiceConnectError(f"moving to channel {channel.id} failed: {exc!r}") from exc

    def cleanup(self) -> None:
        """Unregister from discord.py's state, unless another client has taken the slot."""
        key_id, _ = self.channel._get_voice_client_key()
        state = self.client._connection
        if state._get_voice_client(key_id) is self:
            state._remove_voice_client(key_id)

    # -- internals ------------------------------------------------------------------------

    def _new_connection(self, *, reconnect: bool) -> VoiceConnection:
        if not (self._session_id and self._token and self._endpoint):
            raise VoiceConnectError("the main gateway sent no voice session or server")
        user = self.client.user
        if user is None:
            raise VoiceConnectError("the client is not logged in")
        return VoiceConnection(
            endpoint=self._endpoint,
            token=self._token,
            session_id=self._session_id,
            user_id=user.id,
            server_id=self.guild.id,
            options=self.options if reconnect else self.options.without_reconnect(),
            on_close=self._connection_closed,
            channel_id=getattr(self.channel, "id", None),
            no_media_path=self._no_media_path,
        )

    async def _change_voice_state(self, channel: discord.abc.Snowflake | None) -> None:
        await self.guild.change_voice_state(
            channel=channel, self_mute=self._self_mute, self_deaf=self._self_deaf
        )

    def _arrived(self, update: str) -> None:
        """One of the two main-gateway events a join or a move waits for arrived."""
        state = self.lifecycle.state
        if state not in _AWAITING:
            return
        self._awaiting -= {update}
        if not self._awaiting:
            # A move is carried out by the connection itself (update_server/update_session).
            after = (
                ClientState.CONNECTING if state is ClientState.JOINING else ClientState.CONNECTED
            )
            self.lifecycle.move(after, reason="voice state and server received")

    def _connection_closed(self, error: VoiceError | None) -> None:
        """The session ended on its own (fatal close, kicked, reconnect gave up)."""
        # Until connect() returns, a failure is connect()'s to report, not the listeners'.
        if self.lifecycle.state in (ClientState.CONNECTED, ClientState.MOVING):
            self._schedule_teardown(error, leave=True)

    def _schedule_teardown(self, error: VoiceError | None, *, leave: bool) -> None:
        if self._teardown_task is None:
            self._teardown_task = asyncio.get_running_loop().create_task(
                self._teardown(error=error, leave=leave, notify=True),
                name=f"legato-voice-teardown-{self.guild.id}",
            )

    async def _teardown(
        self, *, error: VoiceError | None, leave: bool, notify: bool, confirm: bool = False
    ) -> None:
        """Close the session, leave the channel, unregister, then tell the listeners.

        Args:
            confirm: Wait (briefly) for the VOICE_STATE_UPDATE that confirms the leave before
                unregistering, so it cannot reach a client created right after this one.
        """
        if self.lifecycle.state in _LEAVING:
            # A second caller (disconnect twice, Client.close during a kick) waits for the first.
            await self.lifecycle.wait_for(ClientState.CLOSED)
            return
        self.lifecycle.move(ClientState.DISCONNECTING, reason=str(error) if error else "leaving")
        try:
            if self._conn is not None:
                await self._conn.close()
            if leave:
                try:
                    await self._change_voice_state(None)
                except (discord.DiscordException, OSError, AttributeError) as exc:
                    # The main gateway may already be gone (Client.close): leaving is best effort.
                    self.log.debug("leaving voice failed: %r", exc)
                else:
                    if confirm:
                        try:
                            async with asyncio.timeout(LEAVE_CONFIRM_TIMEOUT):
                                await self.lifecycle.wait_for(ClientState.LEFT_CHANNEL)
                        except TimeoutError:
                            self.log.debug("no confirmation of the leave")
        finally:
            self.cleanup()
            self.lifecycle.move(ClientState.CLOSED, reason="torn down")
        if notify:
            await self._notify(error)

    async def _notify(self, error: VoiceError | None) -> None:
        self.client.dispatch("legato_voice_disconnect", self, error)
        for listener in self._listeners:
            try:
                result = listener(self, error)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                # One broken listener must not keep the others from hearing about it.
                self.log.exception("voice disconnect listener %r failed", listener)

    def __repr__(self) -> str:
        return (
            f"<LegatoVoiceClient guild={getattr(self.guild, 'id', None)} "
            f"connected={self.is_connected()} transport={self.transport_name}>"
        )
