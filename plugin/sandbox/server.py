"""`Sandbox`: a whole Discord on loopback (gateway, REST, voice) for an unmodified discord.py bot.

```python
async with Sandbox() as sb:
    bot = commands.Bot(command_prefix="!", intents=discord.Intents.default(),
                       chunk_guilds_at_startup=False)
    async with sb.running(bot):      # points discord.py here, starts it, waits until ready
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        reply = await alice.invoke("ping", channel=sb.music)
```
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Protocol, Self, TypeVar

import discord
import discord.gateway
import discord.http
import yarl

from legato.sandbox import names
from legato.sandbox.events import Signal
from legato.sandbox.gateway import DEFAULT_HEARTBEAT_INTERVAL_MS, GatewayServer
from legato.sandbox.models import (
    Channel,
    ChannelType,
    Command,
    Guild,
    Message,
    Role,
    User,
    VoiceState,
)
from legato.sandbox.rest import INTERACTION_DEADLINE, RestServer
from legato.sandbox.users import ScriptedUser
from legato.sandbox.voice import SandboxVoiceServer
from legato.sandbox.world import World

_log = logging.getLogger(__name__)

T = TypeVar("T")
BotT = TypeVar("BotT", bound=discord.Client)

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
    plain `Client` connects (it never asks `/gateway/bot`). In a child process started with
    `Sandbox.child_environ()`, it also makes the voice server's name resolve here.

    Args:
        api_base: `http://127.0.0.1:PORT/api/v10`.
        gateway_url: `ws://127.0.0.1:PORT/`.

    Returns:
        A function restoring the previous values.
    """
    names.register_from_environ()
    old_base = discord.http.Route.BASE
    old_gateway = discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    discord.http.Route.BASE = api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)

    def restore() -> None:
        discord.http.Route.BASE = old_base
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = old_gateway

    return restore


@dataclass(frozen=True)
class GuildHandle:
    """One guild of the sandbox with the channels and roles `Sandbox.add_guild` made for it.

    Attributes:
        guild: The guild in the world.
        text_channels: Text channels by name, in creation order.
        voice_channels: Voice channels by name, in creation order.
        dj_role: The guild's `DJ` role.
    """

    guild: Guild
    text_channels: Mapping[str, Channel]
    voice_channels: Mapping[str, Channel]
    dj_role: Role

    @property
    def id(self) -> int:
        """The guild id."""
        return self.guild.id

    @property
    def name(self) -> str:
        """The guild name."""
        return self.guild.name

    @property
    def text(self) -> Channel:
        """The first text channel (where scripted users run commands by default)."""
        return next(iter(self.text_channels.values()))

    @property
    def voice(self) -> Channel:
        """The first voice channel."""
        return next(iter(self.voice_channels.values()))

    def channel(self, name: str) -> Channel:
        """Return the guild's channel called `name` (made later ones included).

        Raises:
            KeyError: No channel has that name.
        """
        return self.guild.channel_named(name)


class Sandbox:
    """Gateway + REST + voice server on ephemeral 127.0.0.1 ports, with one guild or more.

    The first guild has a text channel `music`, voice channels `General` and `Lounge`, a `DJ`
    role, an owner (not the bot) and the bot as a member; `guild`, `music`, `general`, `lounge`
    and `dj_role` name its parts. `add_guild` makes more guilds of the same shape.

    Args:
        voice: A voice server to use (the caller starts and closes it). None makes the sandbox
            start its own `SandboxVoiceServer` unless `with_voice` is False, in which case
            VOICE_SERVER_UPDATE carries `endpoint: null`.
        with_voice: Whether to start an own voice server when `voice` is None.
        voice_options: Keyword arguments for the own `SandboxVoiceServer` (`tls`,
            `dave_protocol_version`, `heartbeat_interval`, `modes` ...). Without them it is
            Discord's: a `*.discord.media` endpoint over TLS, DAVE required; `{"tls": False,
            "dave_protocol_version": 0}` asks for a self-hosted server's `ws://` path.
        heartbeat_interval_ms: Gateway heartbeat interval announced in HELLO.
        timeout: Default seconds scripted users wait for the bot (hang guard).
        bot_name: The bot user's name.
        interaction_deadline: Seconds the bot has to answer an interaction (Discord's 3 s);
            a later callback gets 404 "Unknown interaction". None: no limit.
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
        interaction_deadline: float | None = INTERACTION_DEADLINE,
    ) -> None:
        self.host = "127.0.0.1"
        self.timeout = timeout
        self.signal = Signal()
        self.world = World(start_ms=int(time.time() * 1000))
        self.owner = self.world.add_user("owner")
        self.bot: User = self.world.add_user(bot_name, bot=True)
        self.application_id: int = self.bot.id
        self.bot_token: str = "c2FuZGJveA." + secrets.token_urlsafe(32)
        self.guilds: list[GuildHandle] = []
        first = self._make_guild(
            "Legato Sandbox", text_channels=("music",), voice_channels=("General", "Lounge")
        )
        self.guild: Guild = first.guild
        self.dj_role: Role = first.dj_role
        self.music: Channel = first.text_channels["music"]
        self.general: Channel = first.voice_channels["General"]
        self.lounge: Channel = first.voice_channels["Lounge"]
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
            interaction_deadline=interaction_deadline,
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

    def child_environ(self) -> dict[str, str]:
        """Environment for a bot process pointed at this sandbox: to reach its voice server.

        ``SSL_CERT_FILE`` names the CA that signed the voice server's certificate, and
        ``SANDBOX_VOICE_HOSTS`` its ``*.discord.media`` name, which the child's
        `point_discord_py_here` resolves. Empty for a voice server on the lenient path.
        """
        voice = self._own_voice
        if voice is None or not voice.tls:
            return {}
        return {"SSL_CERT_FILE": str(voice.ca_file), names.ENV: names.environ_value()}

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

    @contextlib.asynccontextmanager
    async def running(
        self,
        bot: BotT,
        timeout: float | None = None,  # noqa: ASYNC109 - a guard for start-up and shutdown
    ) -> AsyncIterator[BotT]:
        """Start `bot` against this sandbox, yield it once ready, close it on the way out.

        Raises:
            RuntimeError: The bot stopped before it was ready (its own error is raised first).
            TimeoutError: It was not ready, or did not stop, within `timeout` (default
                `self.timeout`).
        """
        guard = self.timeout if timeout is None else timeout
        self.configure_bot(bot)
        task = asyncio.create_task(bot.start(self.bot_token), name="sandbox-bot")
        ready = asyncio.create_task(bot.wait_until_ready(), name="sandbox-bot-ready")
        try:
            async with asyncio.timeout(guard):
                done, _ = await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                task.result()
                raise RuntimeError("the bot stopped before it was ready")
            yield bot
        finally:
            ready.cancel()
            await bot.close()
            with contextlib.suppress(asyncio.CancelledError):
                async with asyncio.timeout(guard):
                    await task

    # --- the world ---------------------------------------------------------------------------

    def _make_guild(
        self, name: str, *, text_channels: Iterable[str], voice_channels: Iterable[str]
    ) -> GuildHandle:
        guild = self.world.add_guild(name, owner=self.owner)
        dj_role = self.world.add_role(guild, "DJ")
        bot_role = self.world.add_role(guild, self.bot.name)
        bot_role.managed = True
        self.world.add_member(guild, self.bot, roles=(bot_role,))
        texts = {n: self.world.add_channel(guild, n, ChannelType.TEXT) for n in text_channels}
        voices = {n: self.world.add_channel(guild, n, ChannelType.VOICE) for n in voice_channels}
        if not texts:
            raise ValueError("a sandbox guild needs at least one text channel")
        handle = GuildHandle(
            guild=guild, text_channels=texts, voice_channels=voices, dj_role=dj_role
        )
        self.guilds.append(handle)
        return handle

    def add_guild(
        self,
        name: str,
        *,
        text_channels: Iterable[str] = ("music",),
        voice_channels: Iterable[str] = ("General", "Lounge"),
    ) -> GuildHandle:
        """Create a guild like the first one: channels, a `DJ` role, the owner and the bot.

        A connected bot gets GUILD_CREATE at once; a bot that identifies later finds the guild
        in READY. Scripted users join it with `add_user(..., guilds=...)` or `add_member`.

        Args:
            name: The guild name.
            text_channels: Names of its text channels (at least one; the first is the default
                channel of its scripted users).
            voice_channels: Names of its voice channels.

        Returns:
            The guild with its channels and DJ role.

        Raises:
            ValueError: No text channel was named.
        """
        handle = self._make_guild(name, text_channels=text_channels, voice_channels=voice_channels)
        # A guild the bot joins comes without `unavailable` (discord.py: on_guild_join); with
        # `unavailable: false` it would be an outage ending (on_guild_available).
        payload = handle.guild.payload()
        del payload["unavailable"]
        self.gateway.dispatch("GUILD_CREATE", payload)
        self.signal.notify()
        return handle

    def guild_handle(self, guild: Guild | GuildHandle | int) -> GuildHandle:
        """Return the handle of a guild given as a `Guild`, a handle or an id.

        Raises:
            KeyError: The sandbox has no such guild.
        """
        guild_id = guild if isinstance(guild, int) else guild.id
        for handle in self.guilds:
            if handle.id == guild_id:
                return handle
        raise KeyError(f"no sandbox guild {guild_id}")

    def _guild(self, guild: Guild | GuildHandle | None) -> Guild:
        if guild is None:
            return self.guild
        if isinstance(guild, GuildHandle):
            return guild.guild
        return guild

    def _guild_of(self, channel: Channel) -> Guild:
        return self.world.guilds[channel.guild_id]

    def add_user(
        self,
        name: str,
        *,
        roles: tuple[str, ...] = (),
        guilds: Iterable[Guild | GuildHandle] | None = None,
    ) -> ScriptedUser:
        """Add a member who can join voice and use the bot's commands.

        Args:
            name: The username (unique in this sandbox).
            roles: Names of roles to give in each of their guilds, e.g. `("DJ",)`.
            guilds: The guilds they join (default: the first guild). The first one listed is
                their home guild: where `invoke` runs by default.

        Returns:
            The scripted user.

        Raises:
            ValueError: The name is taken, or `guilds` is empty.
        """
        if name in self.users:
            raise ValueError(f"user {name!r} already exists")
        targets = [self._guild(g) for g in guilds] if guilds is not None else [self.guild]
        if not targets:
            raise ValueError("a scripted user needs at least one guild")
        user = self.world.add_user(name)
        scripted = ScriptedUser(self, user, targets[0])
        self.users[name] = scripted
        for guild in targets:
            self.add_member(scripted, guild, roles=roles)
        return scripted

    def add_member(
        self, user: ScriptedUser, guild: Guild | GuildHandle, *, roles: tuple[str, ...] = ()
    ) -> None:
        """Make a scripted user a member of one more guild (GUILD_MEMBER_ADD).

        Args:
            user: The scripted user.
            guild: The guild to join.
            roles: Names of roles to give there.
        """
        target = self._guild(guild)
        member = self.world.add_member(
            target, user.user, roles=tuple(target.role_named(r) for r in roles)
        )
        self.gateway.dispatch("GUILD_MEMBER_ADD", {**member.payload(), "guild_id": str(target.id)})
        self.signal.notify()

    def add_channel(
        self, name: str, *, voice: bool = False, guild: Guild | GuildHandle | None = None
    ) -> Channel:
        """Create a text or voice channel (in the first guild by default); CHANNEL_CREATE."""
        channel = self.world.add_channel(
            self._guild(guild), name, ChannelType.VOICE if voice else ChannelType.TEXT
        )
        self.gateway.dispatch("CHANNEL_CREATE", channel.payload())
        self.signal.notify()
        return channel

    async def delete_channel(self, channel: Channel) -> None:
        """Delete a channel: members in it leave voice (VOICE_STATE_UPDATE), then CHANNEL_DELETE.

        The bot's voice connection, if it was there, is closed by the voice server with 4014.
        """
        guild = self._guild_of(channel)
        emptied = self.world.remove_channel(channel)
        for state in emptied:
            self.gateway.broadcast_voice_state(guild, state)
        self.gateway.dispatch("CHANNEL_DELETE", channel.payload())
        self.signal.notify()
        for state in emptied:
            await self._close_voice(guild, state.user_id)

    async def disconnect_member(
        self, user_id: int, *, guild: Guild | GuildHandle | None = None
    ) -> None:
        """Take a member out of voice as a moderator would (VOICE_STATE_UPDATE, channel null).

        For the bot, the voice server also closes its connection with 4014.

        Args:
            user_id: The member.
            guild: Where (default: the first guild).

        Raises:
            KeyError: The member is not in voice there.
        """
        target = self._guild(guild)
        if user_id not in target.voice_states:
            raise KeyError(f"user {user_id} is not in voice")
        state = self.world.set_voice(target, user_id, None)
        self.gateway.broadcast_voice_state(target, state)
        self.signal.notify()
        await self._close_voice(target, user_id)

    async def _close_voice(self, guild: Guild, user_id: int) -> None:
        if self.voice is not None and user_id == self.bot.id:
            await self.voice.disconnect_user(
                user_id, server_id=guild.id, code=VOICE_CLOSE_DISCONNECTED
            )

    def messages(self, channel: Channel) -> list[Message]:
        """The channel's visible messages, oldest first (ephemeral ones are never listed)."""
        return self.world.channel_messages(channel.id)

    def commands(self, *, guild: bool | Guild | GuildHandle = True) -> list[Command]:
        """The commands the bot synced to a guild (True: the first) or globally (False)."""
        scope = None if guild is False else self._guild(None if guild is True else guild).id
        return list(self.world.commands.get(scope, {}).values())

    def voice_state(
        self, user_id: int, *, guild: Guild | GuildHandle | None = None
    ) -> VoiceState | None:
        """Where a member is in voice in `guild` (default: the first guild), or None."""
        return self._guild(guild).voice_states.get(user_id)

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
        guild: Guild | GuildHandle | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> None:
        """Wait until the bot is in `channel` (None: out of voice in `guild`, default the first).

        A channel names its guild; `guild` is only needed with None.
        """
        target = self._guild_of(channel) if channel is not None else self._guild(guild)

        def there() -> bool:
            state = target.voice_states.get(self.bot.id)
            current = None if state is None else state.channel_id
            return current == (None if channel is None else channel.id)

        await self.wait_for(there, timeout=timeout)
