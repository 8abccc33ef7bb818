"""Scripted users: members who join voice, run slash commands, press buttons, and read replies.

Every wait is event-driven (the sandbox's `Signal`) with a timeout that only guards hangs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from legato.sandbox.events import Signal
from legato.sandbox.gateway import GatewayServer
from legato.sandbox.models import (
    JSON,
    CallbackType,
    Channel,
    ChannelType,
    Guild,
    Interaction,
    InteractionType,
    Message,
    Role,
    User,
)
from legato.sandbox.world import World

T = TypeVar("T")


class Sandbox(Protocol):
    """What scripted users need from `legato.sandbox.server.Sandbox`."""

    world: World
    gateway: GatewayServer
    signal: Signal
    music: Channel
    bot: User
    application_id: int

    async def wait_for(
        self,
        predicate: Callable[[], T | None],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> T:
        """Wait until `predicate()` is truthy after a change; return it."""
        ...


# Option types (discord-api-docs, "Application Command Option Type").
SUB_COMMAND = 1
SUB_COMMAND_GROUP = 2
STRING = 3
INTEGER = 4
BOOLEAN = 5
USER = 6
CHANNEL = 7
ROLE = 8
NUMBER = 10


@dataclass(frozen=True)
class Choice:
    """One autocomplete suggestion the bot returned."""

    name: str
    value: str | int | float


def _walk_components(components: list[JSON]) -> list[JSON]:
    found: list[JSON] = []
    for component in components:
        found.append(component)
        found.extend(_walk_components(list(component.get("components") or [])))
        accessory = component.get("accessory")
        if isinstance(accessory, dict):
            found.append(accessory)
    return found


class Reply:
    """What the bot answered to one interaction, kept live as the bot edits and follows up.

    Args:
        sandbox: The sandbox holding the messages.
        interaction: The answered interaction.
    """

    def __init__(self, sandbox: Sandbox, interaction: Interaction) -> None:
        self._sandbox = sandbox
        self.interaction = interaction
        self._seen_edits = interaction.callback_edits

    def __repr__(self) -> str:
        return (
            f"<Reply callback={self.callback_type!r} ephemeral={self.ephemeral} "
            f"content={self.content!r}>"
        )

    @property
    def callback_type(self) -> CallbackType | None:
        """How the bot answered (message, deferred, update ...)."""
        return self.interaction.callback_type

    @property
    def deferred(self) -> bool:
        """Whether the bot deferred (type 5 or 6) instead of answering at once."""
        return self.callback_type in (
            CallbackType.DEFERRED_CHANNEL_MESSAGE,
            CallbackType.DEFERRED_UPDATE_MESSAGE,
        )

    @property
    def message(self) -> Message | None:
        """The message this reply shows: the interaction's own, or the one a component was on."""
        world = self._sandbox.world
        message_id = self.interaction.original_message_id or self.interaction.message_id
        return None if message_id is None else world.messages.get(message_id)

    @property
    def content(self) -> str:
        """The visible content of `message` ("" while deferred)."""
        message = self.message
        return "" if message is None else message.content

    @property
    def embeds(self) -> list[JSON]:
        """The embeds of `message`."""
        message = self.message
        return [] if message is None else message.embeds

    @property
    def components(self) -> list[JSON]:
        """The component rows of `message`."""
        message = self.message
        return [] if message is None else message.components

    @property
    def custom_ids(self) -> list[str]:
        """Every `custom_id` in `message`'s components, in order."""
        return [str(c["custom_id"]) for c in _walk_components(self.components) if "custom_id" in c]

    @property
    def ephemeral(self) -> bool:
        """Whether only the invoking user sees `message`."""
        message = self.message
        return message is not None and message.ephemeral

    @property
    def deleted(self) -> bool:
        """Whether the bot deleted `message`."""
        message = self.message
        return message is not None and message.deleted

    @property
    def followups(self) -> list[Message]:
        """Followup messages, oldest first."""
        world = self._sandbox.world
        return [world.messages[i] for i in self.interaction.followup_ids]

    def text(self) -> str:
        """Content plus every embed's author, title, description, fields and footer.

        That is what a person reads; component labels are left out.
        """
        parts = [self.content]
        for embed in self.embeds:
            author = embed.get("author")
            if isinstance(author, dict):
                parts.append(str(author.get("name", "")))
            parts.extend(str(embed.get(k, "")) for k in ("title", "description"))
            for f in embed.get("fields") or []:
                parts.extend((str(f.get("name", "")), str(f.get("value", ""))))
            footer = embed.get("footer")
            if isinstance(footer, dict):
                parts.append(str(footer.get("text", "")))
        return "\n".join(p for p in parts if p)

    async def wait_edit(self, *, timeout: float | None = None) -> Message:  # noqa: ASYNC109
        """Wait until `message` is edited after the last edit this reply saw.

        After a defer, the first edit (or the followup that replaces the loading message)
        counts. Returns the edited message.
        """

        def edited() -> Message | None:
            message = self.message
            if message is not None and message.edits > self._seen_edits:
                return message
            return None

        message = await self._sandbox.wait_for(edited, timeout=timeout)
        self._seen_edits = message.edits
        return message

    async def wait_followup(self, count: int = 1, *, timeout: float | None = None) -> Message:  # noqa: ASYNC109
        """Wait until there are `count` followups; return the `count`-th."""

        def arrived() -> Message | None:
            ids = self.interaction.followup_ids
            return self._sandbox.world.messages[ids[count - 1]] if len(ids) >= count else None

        return await self._sandbox.wait_for(arrived, timeout=timeout)


class ScriptedUser:
    """A member of one guild or more, driven by a test.

    Like a person, they are in at most one voice channel at a time: joining one in another
    guild leaves the first. Commands run where their channel is, in that channel's guild.

    Args:
        sandbox: The sandbox.
        user: The user in the world.
        guild: Their home guild: where `invoke` runs when no channel is given.
    """

    def __init__(self, sandbox: Sandbox, user: User, guild: Guild) -> None:
        self._sandbox = sandbox
        self.user = user
        self.guild = guild

    def __repr__(self) -> str:
        return f"<ScriptedUser {self.name} id={self.id}>"

    @property
    def id(self) -> int:
        """The user id."""
        return self.user.id

    @property
    def name(self) -> str:
        """The username."""
        return self.user.name

    @property
    def voice_channel(self) -> Channel | None:
        """The voice channel they are in (in any guild), or None."""
        guild = self._voice_guild()
        if guild is None:
            return None
        channel_id = guild.voice_states[self.id].channel_id
        return None if channel_id is None else guild.channels[channel_id]

    def _voice_guild(self) -> Guild | None:
        for guild in self._sandbox.world.guilds.values():
            state = guild.voice_states.get(self.id)
            if state is not None and state.channel_id is not None:
                return guild
        return None

    def _guild_of(self, channel: Channel) -> Guild:
        guild = self._sandbox.world.guilds[channel.guild_id]
        if self.id not in guild.members:
            raise KeyError(f"{self.name} is not a member of guild {guild.name!r}")
        return guild

    # --- voice -------------------------------------------------------------------------------

    async def join_voice(self, channel: Channel, *, self_deaf: bool = False) -> None:
        """Join (or move to) a voice channel; the bot sees VOICE_STATE_UPDATE.

        Being in voice in another guild, they leave it first (one more VOICE_STATE_UPDATE).

        Raises:
            KeyError: `channel` is not a voice channel of a guild they are a member of.
        """
        guild = self._guild_of(channel)
        current = self._voice_guild()
        if current is not None and current is not guild:
            await self.leave_voice()
        state = self._sandbox.world.set_voice(guild, self.id, channel.id, self_deaf=self_deaf)
        self._sandbox.gateway.broadcast_voice_state(guild, state)
        self._sandbox.signal.notify()

    async def leave_voice(self) -> None:
        """Leave voice; the bot sees VOICE_STATE_UPDATE with `channel_id` null.

        Out of voice already, they send it anyway for their home guild (as before).
        """
        guild = self._voice_guild() or self.guild
        state = self._sandbox.world.set_voice(guild, self.id, None)
        self._sandbox.gateway.broadcast_voice_state(guild, state)
        self._sandbox.signal.notify()

    # --- messages ----------------------------------------------------------------------------

    async def say(self, channel: Channel, content: str) -> Message:
        """Post a plain message in a text channel (MESSAGE_CREATE)."""
        world = self._sandbox.world
        guild = self._guild_of(channel)
        message = world.add_message(
            channel_id=channel.id,
            guild_id=guild.id,
            author=self.user,
            body={"content": content},
        )
        payload = message.payload()
        payload["member"] = guild.members[self.id].payload()
        self._sandbox.gateway.dispatch("MESSAGE_CREATE", payload)
        self._sandbox.signal.notify()
        return message

    # --- interactions ------------------------------------------------------------------------

    async def invoke(
        self,
        command: str,
        /,
        *,
        channel: Channel | None = None,
        options: dict[str, Any] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
        **kwargs: Any,
    ) -> Reply:
        """Run a synced slash command and wait for the bot's first answer.

        Args:
            command: The command name; subcommands separated by spaces (`"queue remove"`).
            channel: Where it is run, in its guild (default: the home guild's first text
                channel, `music`).
            options: Option values, for option names that clash with these parameters.
            timeout: Seconds to wait for the bot (default: the sandbox's).
            **kwargs: Option values by name. Channels, users, roles may be passed as objects.

        Returns:
            The live reply (content, ephemeral flag, later edits and followups).

        Raises:
            KeyError: No such synced command or option.
            TimeoutError: The bot did not answer in time.
        """
        values = {**kwargs, **(options or {})}
        channel = channel or self._default_channel()
        data = self._command_data(command, values, focused=None, guild=self._guild_of(channel))
        interaction = self._start(InteractionType.APPLICATION_COMMAND, data, channel, None)
        await self._answered(interaction, timeout)
        return Reply(self._sandbox, interaction)

    async def autocomplete(
        self,
        command: str,
        option: str,
        value: str,
        /,
        *,
        channel: Channel | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
        **kwargs: Any,
    ) -> list[Choice]:
        """Type `value` into `option` of `command` and return the bot's suggestions.

        Raises:
            KeyError: No such synced command or option.
            TimeoutError: The bot did not answer in time.
            AssertionError: The bot answered with something other than choices.
        """
        values = {**kwargs, option: value}
        channel = channel or self._default_channel()
        data = self._command_data(command, values, focused=option, guild=self._guild_of(channel))
        interaction = self._start(InteractionType.AUTOCOMPLETE, data, channel, None)
        await self._answered(interaction, timeout)
        if interaction.callback_type is not CallbackType.AUTOCOMPLETE_RESULT:
            raise AssertionError(f"autocomplete answered with {interaction.callback_type!r}")
        return [Choice(name=str(c["name"]), value=c["value"]) for c in interaction.choices or []]

    async def press(
        self,
        target: Reply | Message,
        custom_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Reply:
        """Press the button `custom_id` on a message and wait for the bot's answer.

        Raises:
            KeyError: The message has no component with that `custom_id`.
            TimeoutError: The bot did not answer in time.
        """
        return await self._component(target, custom_id, None, timeout)

    async def select(
        self,
        target: Reply | Message,
        custom_id: str,
        values: list[str],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Reply:
        """Choose `values` in the select menu `custom_id` and wait for the bot's answer."""
        return await self._component(target, custom_id, values, timeout)

    async def _component(
        self,
        target: Reply | Message,
        custom_id: str,
        values: list[str] | None,
        timeout: float | None,  # noqa: ASYNC109
    ) -> Reply:
        message = target.message if isinstance(target, Reply) else target
        if message is None:
            raise KeyError("the reply has no message to interact with")
        component = next(
            (c for c in _walk_components(message.components) if c.get("custom_id") == custom_id),
            None,
        )
        if component is None:
            raise KeyError(f"no component {custom_id!r} on message {message.id}")
        data: JSON = {"custom_id": custom_id, "component_type": int(component["type"])}
        if values is not None:
            data["values"] = list(values)
        channel = self._sandbox.world.find_channel(message.channel_id)
        if channel is None:
            raise KeyError(f"message {message.id} is in a deleted channel")
        interaction = self._start(InteractionType.MESSAGE_COMPONENT, data, channel, message.id)
        await self._answered(interaction, timeout)
        return Reply(self._sandbox, interaction)

    def _default_channel(self) -> Channel:
        sandbox = self._sandbox
        if sandbox.music.guild_id == self.guild.id:
            return sandbox.music
        return next(c for c in self.guild.channels.values() if c.type is ChannelType.TEXT)

    def _start(
        self,
        type: InteractionType,
        data: JSON,
        channel: Channel,
        message_id: int | None,
    ) -> Interaction:
        sandbox = self._sandbox
        if sandbox.gateway.bot_session() is None:
            raise RuntimeError("the bot has no gateway session: start it and wait until ready")
        interaction = sandbox.world.add_interaction(
            type=type,
            guild_id=self._guild_of(channel).id,
            channel_id=channel.id,
            user_id=self.id,
            data=data,
            message_id=message_id,
        )
        payload = sandbox.world.interaction_payload(
            interaction, application_id=sandbox.application_id, bot_id=sandbox.bot.id
        )
        sandbox.gateway.dispatch("INTERACTION_CREATE", payload)
        return interaction

    async def _answered(self, interaction: Interaction, timeout: float | None) -> None:  # noqa: ASYNC109
        await self._sandbox.wait_for(lambda: interaction.callback_type is not None, timeout=timeout)

    def _command_data(
        self, command: str, values: dict[str, Any], *, focused: str | None, guild: Guild
    ) -> JSON:
        name, *path = command.split()
        cmd = self._sandbox.world.find_command(guild.id, name)
        resolved: JSON = {}
        definitions = cmd.options
        chain: list[JSON] = []
        for part in path:
            sub = next(
                (
                    o
                    for o in definitions
                    if o["name"] == part and o.get("type") in (SUB_COMMAND, SUB_COMMAND_GROUP)
                ),
                None,
            )
            if sub is None:
                raise KeyError(f"/{name} has no subcommand {part!r}")
            chain.append({"name": part, "type": sub["type"]})
            definitions = list(sub.get("options") or [])
        options = [
            self._option(definitions, key, value, focused == key, resolved, guild)
            for key, value in values.items()
        ]
        if focused is None:
            missing = [
                o["name"] for o in definitions if o.get("required") and o["name"] not in values
            ]
            if missing:
                raise KeyError(f"/{command} needs options {missing}")
        for link in reversed(chain):
            options = [{**link, "options": options}]
        data: JSON = {"id": str(cmd.id), "name": cmd.name, "type": 1, "options": options}
        if cmd.guild_id is not None:
            data["guild_id"] = str(cmd.guild_id)
        if resolved:
            data["resolved"] = resolved
        return data

    def _option(
        self,
        definitions: list[JSON],
        name: str,
        value: Any,
        focused: bool,
        resolved: JSON,
        guild: Guild,
    ) -> JSON:
        definition = next((o for o in definitions if o["name"] == name), None)
        if definition is None:
            raise KeyError(f"no option {name!r}")
        kind = int(definition["type"])
        option: JSON = {"name": name, "type": kind}
        if focused:
            option.update(value=str(value), focused=True)
            return option
        if kind == INTEGER:
            option["value"] = int(value)
        elif kind == NUMBER:
            option["value"] = float(value)
        elif kind == BOOLEAN:
            option["value"] = bool(value)
        elif kind == CHANNEL:
            channel = value if isinstance(value, Channel) else guild.channels[int(value)]
            option["value"] = str(channel.id)
            resolved.setdefault("channels", {})[str(channel.id)] = {
                **channel.payload(),
                "permissions": str(guild.permissions_of(self.id)),
            }
        elif kind == USER:
            user = value.user if isinstance(value, ScriptedUser) else value
            if not isinstance(user, User):
                user = self._sandbox.world.users[int(value)]
            option["value"] = str(user.id)
            resolved.setdefault("users", {})[str(user.id)] = user.payload()
            member = guild.members.get(user.id)
            if member is not None:
                member_data = member.payload(permissions=guild.permissions_of(user.id))
                member_data.pop("user")
                resolved.setdefault("members", {})[str(user.id)] = member_data
        elif kind == ROLE:
            role = value if isinstance(value, Role) else guild.roles[int(value)]
            option["value"] = str(role.id)
            resolved.setdefault("roles", {})[str(role.id)] = role.payload()
        else:
            option["value"] = str(value)
        return option
