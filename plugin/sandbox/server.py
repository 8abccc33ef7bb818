"""`Sandbox`: a whole Discord on loopback (gateway, REST, voice) for an unmodified discord.py bot.

```python
async with Sandbox() as sb:
    bot = commands.Bot(command_prefix="!", intents=discord.Intents.default(),
                       chunk_guilds_at_startup=False)
    sb.configure_bot(bot)            # points discord.py's Route.BASE / DEFAULT_GATEWAY here
    task = asyncio.create_task(bot.start(sb.bot_token))
    await bot.wait_until_ready()
    alice = sb.add_user("alice")
    await alice.join_voice(sb.general)
    reply = await alice.invoke("ping", channel=sb.music)
```
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Final, Protocol, Self, TypeVar

import discord
import discord.gateway
import discord.http
import yarl

from legato.sandbox.events import Signal
from legato.sandbox.gateway import DEFAULT_HEARTBEAT_INTERVAL_MS, GatewayServer
from legato.sandbox.rest import RestServer
from legato.sandbox.users import ScriptedUser
from legato.sandbox.voice import SandboxVoiceServer
from legato.sandbox.world import (
    Channel,
    ChannelType,
    Command,
    Guild,
    Message,
    Role,
    User,
    VoiceState,
    World,
)

_log = logging.getLogger(__name__)

T = TypeVar("T")

# How long scripted users wait for the bot by default: generous, it only guards hangs.
DEFAULT_TIMEOUT: Final = 15.0
# Close code the voice server uses when the gateway takes a member out of voice.
VOICE_CLOSE_DISCONNECTED: Final = 4014


class VoiceBackend(Protocol):
    """What the gateway needs from a voice server (`legato.sandbox.voice.SandboxVoiceServer`)."""

    @property
    def endpoint(self) -> str:
        """`host:port` handed out in VOICE_SERVER_UPDATE."""
        ...

    def register_session(self, *, server_id: int, user_id: int, session_id: str) -> str:
        """Allow a user to identify for a guild; return the VOICE_SERVER_UPDATE token."""
        ...

    async def disconnect_user(
        self, user_id: int, *, server_id: int | None = None, code: int = ...
    ) -> None:
        """Take a user out of voice: revoke the token and close its connection."""
        ...


def point_discord_py_here(*, api_base: str, gateway_url: str) -> Callable[[], None]:
    """Point discord.py (process-wide) at a sandbox; return a function that undoes it.

    `Route.BASE` covers REST, interaction callbacks and webhooks; `DEFAULT_GATEWAY` is where a
    plain `Client` connects (it never asks `/gateway/bot`).

    Args:
        api_base: `http://127.0.0.1:PORT/api/v10`.
        gateway_url: `ws://127.0.0.1:PORT/`.

    Returns:
        A function restoring the previous values.
    """
    old_base = discord.http.Route.BASE
    old_gateway = discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    discord.http.Route.BASE = api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)

    def restore() -> None:
        discord.http.Route.BASE = old_base
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = old_gateway

    return restore


class Sandbox:
    """Gateway + REST + voice server on ephemeral 127.0.0.1 ports, with one guild.

    The guild has a text channel `music`, voice channels `General` and `Lounge`, a `DJ` role,
    an owner (not the bot) and the bot as a member.

    Args:
        voice: A voice server to use (the caller starts and closes it). None makes the sandbox
            start its own `SandboxVoiceServer` unless `with_voice` is False, in which case
            VOICE_SERVER_UPDATE carries `endpoint: null`.
        with_voice: Whether to start an own voice server when `voice` is None.
        voice_options: Keyword arguments for the own `SandboxVoiceServer` (`tls`,
            `heartbeat_interval`, `modes` ...).
        heartbeat_interval_ms: Gateway heartbeat interval announced in HELLO.
        timeout: Default seconds scripted users wait for the bot (hang guard).
        bot_name: The bot user's name.
    """

    def __init__(
        self,
        *,
        voice: VoiceBackend | None = None,
        with_voice: bool = True,
        voice_options: Mapping[str, Any] | None = None,
        heartbeat_interval_ms: int = DEFAULT_HEARTBEAT_INTERVAL_MS,
        timeout: float = DEFAULT_TIMEOUT,
        bot_name: str = "Legato",
    ) -> None:
        self.host = "127.0.0.1"
        self.timeout = timeout
        self.signal = Signal()
        self.world = World(start_ms=int(time.time() * 1000))
        self.owner = self.world.add_user("owner")
        self.bot: User = self.world.add_user(bot_name, bot=True)
        self.application_id: int = self.bot.id
        self.bot_token: str = "c2FuZGJveA." + secrets.token_urlsafe(32)
        self.guild: Guild = self.world.add_guild("Legato Sandbox", owner=self.owner)
        self.dj_role: Role = self.world.add_role(self.guild, "DJ")
        bot_role = self.world.add_role(self.guild, bot_name)
        bot_role.managed = True
        self.world.add_member(self.guild, self.bot, roles=(bot_role,))
        self.music: Channel = self.world.add_channel(self.guild, "music", ChannelType.TEXT)
        self.general: Channel = self.world.add_channel(self.guild, "General", ChannelType.VOICE)
        self.lounge: Channel = self.world.add_channel(self.guild, "Lounge", ChannelType.VOICE)
        self._own_voice: SandboxVoiceServer | None = None
        if voice is None and with_voice:
            self._own_voice = SandboxVoiceServer(self.host, **dict(voice_options or {}))
            voice = self._own_voice
        self.voice: VoiceBackend | None = voice
        self.gateway = GatewayServer(
            self.world,
            bot=self.bot,
            application_id=self.application_id,
            bot_token=self.bot_token,
            signal=self.signal,
            voice=voice,
            heartbeat_interval_ms=heartbeat_interval_ms,
        )
        self.rest = RestServer(
            self.world,
            gateway=self.gateway,
            bot=self.bot,
            application_id=self.application_id,
            bot_token=self.bot_token,
            signal=self.signal,
        )
        self.users: dict[str, ScriptedUser] = {}
        self._restore: Callable[[], None] | None = None
        self._started = False

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the voice server (if owned), the gateway and the REST API."""
        if self._own_voice is not None:
            await self._own_voice.start()
        await self.gateway.start(self.host)
        await self.rest.start(self.host)
        self._started = True

    async def stop(self) -> None:
        """Stop everything and undo `point_discord_py_here`."""
        if self._restore is not None:
            self._restore()
            self._restore = None
        await self.gateway.stop()
        await self.rest.stop()
        if self._own_voice is not None:
            await self._own_voice.close()
        self._started = False

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def voice_server(self) -> SandboxVoiceServer:
        """The voice server this sandbox started (recordings, fault injection).

        Raises:
            RuntimeError: The sandbox was given its voice server, or runs without one.
        """
        if self._own_voice is None:
            raise RuntimeError("this sandbox did not start its own voice server")
        return self._own_voice

    @property
    def api_base(self) -> str:
        """`http://127.0.0.1:PORT/api/v10`."""
        return self.rest.api_base

    @property
    def gateway_url(self) -> str:
        """`ws://127.0.0.1:PORT/`."""
        return self.gateway.url

    def point_discord_py_here(self) -> None:
        """Point discord.py (process-wide) at this sandbox until `stop()`."""
        if not self._started:
            raise RuntimeError("start the sandbox first: its ports are not known yet")
        if self._restore is None:
            self._restore = point_discord_py_here(
                api_base=self.api_base, gateway_url=self.gateway_url
            )

    def configure_bot(self, bot: discord.Client) -> None:
        """Make `bot` talk to this sandbox when started with `sandbox.bot_token`.

        discord.py reads the two URLs from class attributes, so this points the whole process;
        it also warns if the bot would chunk guilds at start-up (slow, and not needed here).
        """
        self.point_discord_py_here()
        if getattr(bot._connection, "_chunk_guilds", False):  # the option has no public getter
            _log.warning("bot has chunk_guilds_at_startup=True; pass False for the sandbox")

    # --- the world ---------------------------------------------------------------------------

    def add_user(self, name: str, *, roles: tuple[str, ...] = ()) -> ScriptedUser:
        """Add a member who can join voice and use the bot's commands.

        Args:
            name: The username (unique in this sandbox).
            roles: Names of roles to give, e.g. `("DJ",)`.

        Returns:
            The scripted user.
        """
        if name in self.users:
            raise ValueError(f"user {name!r} already exists")
        user = self.world.add_user(name)
        member = self.world.add_member(
            self.guild, user, roles=tuple(self.guild.role_named(r) for r in roles)
        )
        self.gateway.dispatch(
            "GUILD_MEMBER_ADD", {**member.payload(), "guild_id": str(self.guild.id)}
        )
        scripted = ScriptedUser(self, user, self.guild)
        self.users[name] = scripted
        self.signal.notify()
        return scripted

    def add_channel(self, name: str, *, voice: bool = False) -> Channel:
        """Create a text or voice channel and dispatch CHANNEL_CREATE."""
        channel = self.world.add_channel(
            self.guild, name, ChannelType.VOICE if voice else ChannelType.TEXT
        )
        self.gateway.dispatch("CHANNEL_CREATE", channel.payload())
        self.signal.notify()
        return channel

    async def delete_channel(self, channel: Channel) -> None:
        """Delete a channel: members in it leave voice (VOICE_STATE_UPDATE), then CHANNEL_DELETE.

        The bot's voice connection, if it was there, is closed by the voice server with 4014.
        """
        emptied = self.world.remove_channel(channel)
        for state in emptied:
            self.gateway.broadcast_voice_state(self.guild, state)
        self.gateway.dispatch("CHANNEL_DELETE", channel.payload())
        self.signal.notify()
        for state in emptied:
            await self._close_voice(state.user_id)

    async def disconnect_member(self, user_id: int) -> None:
        """Take a member out of voice as a moderator would (VOICE_STATE_UPDATE, channel null).

        For the bot, the voice server also closes its connection with 4014.
        """
        if user_id not in self.guild.voice_states:
            raise KeyError(f"user {user_id} is not in voice")
        state = self.world.set_voice(self.guild, user_id, None)
        self.gateway.broadcast_voice_state(self.guild, state)
        self.signal.notify()
        await self._close_voice(user_id)

    async def _close_voice(self, user_id: int) -> None:
        if self.voice is not None and user_id == self.bot.id:
            await self.voice.disconnect_user(
                user_id, server_id=self.guild.id, code=VOICE_CLOSE_DISCONNECTED
            )

    def messages(self, channel: Channel) -> list[Message]:
        """The channel's visible messages, oldest first (ephemeral ones are never listed)."""
        return self.world.channel_messages(channel.id)

    def commands(self, *, guild: bool = True) -> list[Command]:
        """The commands the bot synced to the guild (or globally with `guild=False`)."""
        scope = self.guild.id if guild else None
        return list(self.world.commands.get(scope, {}).values())

    def voice_state(self, user_id: int) -> VoiceState | None:
        """Where a member is in voice, or None."""
        return self.guild.voice_states.get(user_id)

    # --- waiting -----------------------------------------------------------------------------

    async def wait_for(
        self,
        predicate: Callable[[], T | None],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> T:
        """Wait until `predicate()` is truthy after some change in the sandbox; return it.

        Raises:
            TimeoutError: It stayed false for `timeout` (default `self.timeout`) seconds.
        """
        return await self.signal.wait_for(predicate, timeout=timeout or self.timeout)

    async def wait_for_message(
        self,
        channel: Channel,
        predicate: Callable[[Message], bool] = lambda _m: True,
        *,
        after: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Message:
        """Wait for a visible message in `channel` matching `predicate` with an id above `after`.

        Returns:
            The first such message (oldest first).
        """

        def find() -> Message | None:
            return next((m for m in self.messages(channel) if m.id > after and predicate(m)), None)

        return await self.wait_for(find, timeout=timeout)

    async def wait_bot_voice(
        self,
        channel: Channel | None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> None:
        """Wait until the bot is in `channel` (None: out of voice)."""

        def there() -> bool:
            state = self.voice_state(self.bot.id)
            current = None if state is None else state.channel_id
            return current == (None if channel is None else channel.id)

        await self.wait_for(there, timeout=timeout)
