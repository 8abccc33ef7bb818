"""The sandbox's model of Discord: guilds, channels, members, voice states, messages, interactions.

Pure data: no sockets, no asyncio, no clock. Every object renders itself as the JSON payload
Discord would send (shapes from discord-api-docs and what discord.py 2.7.1 reads). The servers
in `gateway.py` and `rest.py` mutate the world and broadcast what changed.
"""

from __future__ import annotations

import enum
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

JSON = dict[str, Any]

DISCORD_EPOCH_MS: Final = 1_420_070_400_000

# Discord's default @everyone permissions (view, send, connect, speak, use app commands ...).
DEFAULT_EVERYONE_PERMISSIONS: Final = 2_248_473_465_835_073
ADMINISTRATOR: Final = 1 << 3
EPHEMERAL: Final = 1 << 6
LOADING: Final = 1 << 7
# Discord's default upload limit for a guild without boosts (10 MiB since 2024).
ATTACHMENT_SIZE_LIMIT: Final = 10 * 1024 * 1024


class ChannelType(enum.IntEnum):
    """The channel types the sandbox models (Discord's numbering)."""

    TEXT = 0
    VOICE = 2
    CATEGORY = 4
    STAGE = 13


class InteractionType(enum.IntEnum):
    """Discord's interaction types."""

    PING = 1
    APPLICATION_COMMAND = 2
    MESSAGE_COMPONENT = 3
    AUTOCOMPLETE = 4
    MODAL_SUBMIT = 5


class CallbackType(enum.IntEnum):
    """Discord's interaction callback types."""

    PONG = 1
    CHANNEL_MESSAGE = 4
    DEFERRED_CHANNEL_MESSAGE = 5
    DEFERRED_UPDATE_MESSAGE = 6
    UPDATE_MESSAGE = 7
    AUTOCOMPLETE_RESULT = 8
    MODAL = 9


class MessageType(enum.IntEnum):
    """The message types the sandbox creates."""

    DEFAULT = 0
    REPLY = 19
    CHAT_INPUT_COMMAND = 20


def snowflake_time(snowflake: int) -> str:
    """Return the ISO 8601 timestamp embedded in a snowflake.

    Args:
        snowflake: A Discord id.

    Returns:
        The creation time as Discord formats it.
    """
    ms = (snowflake >> 22) + DISCORD_EPOCH_MS
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat()


class Snowflakes:
    """Hands out increasing snowflakes starting at a given Unix time.

    Args:
        start_ms: Unix time in milliseconds for the first id (the caller reads the clock).
    """

    def __init__(self, start_ms: int) -> None:
        self._next = (start_ms - DISCORD_EPOCH_MS) << 22

    def __call__(self) -> int:
        """Return a new, strictly larger id."""
        self._next += 1
        return self._next


@dataclass
class User:
    """A Discord user (a scripted person or the bot)."""

    id: int
    name: str
    bot: bool = False

    def payload(self) -> JSON:
        """Return the user object."""
        return {
            "id": str(self.id),
            "username": self.name,
            "global_name": None if self.bot else self.name.capitalize(),
            "discriminator": "0",
            "avatar": None,
            "bot": self.bot,
            "public_flags": 0,
        }


@dataclass
class Role:
    """A guild role."""

    id: int
    name: str
    permissions: int = 0
    position: int = 0
    managed: bool = False

    def payload(self) -> JSON:
        """Return the role object."""
        return {
            "id": str(self.id),
            "name": self.name,
            "permissions": str(self.permissions),
            "position": self.position,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "managed": self.managed,
            "mentionable": False,
            "flags": 0,
        }


@dataclass
class Channel:
    """A guild channel: text, voice or category."""

    id: int
    guild_id: int
    name: str
    type: ChannelType
    position: int = 0
    bitrate: int = 64_000
    user_limit: int = 0
    parent_id: int | None = None

    @property
    def is_voice(self) -> bool:
        """Whether members can join this channel's voice."""
        return self.type in (ChannelType.VOICE, ChannelType.STAGE)

    def payload(self) -> JSON:
        """Return the channel object (with `guild_id`)."""
        data: JSON = {
            "id": str(self.id),
            "guild_id": str(self.guild_id),
            "name": self.name,
            "type": int(self.type),
            "position": self.position,
            "permission_overwrites": [],
            "parent_id": None if self.parent_id is None else str(self.parent_id),
            "nsfw": False,
        }
        if self.is_voice:
            data.update(
                bitrate=self.bitrate,
                user_limit=self.user_limit,
                rtc_region=None,
                video_quality_mode=1,
                last_message_id=None,
                rate_limit_per_user=0,
            )
        elif self.type is ChannelType.TEXT:
            data.update(topic=None, last_message_id=None, rate_limit_per_user=0)
        return data


@dataclass
class Member:
    """A user's membership of a guild."""

    user: User
    guild_id: int
    role_ids: list[int] = field(default_factory=list)
    joined_at: str = ""

    def payload(self, *, permissions: int | None = None) -> JSON:
        """Return the guild member object, with `permissions` for interactions."""
        data: JSON = {
            "user": self.user.payload(),
            "nick": None,
            "avatar": None,
            "roles": [str(r) for r in self.role_ids],
            "joined_at": self.joined_at,
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "pending": False,
            "flags": 0,
            "communication_disabled_until": None,
        }
        if permissions is not None:
            data["permissions"] = str(permissions)
        return data


@dataclass
class VoiceState:
    """Where a member is in voice."""

    user_id: int
    guild_id: int
    channel_id: int | None
    session_id: str
    self_mute: bool = False
    self_deaf: bool = False

    def payload(self, member: Member | None) -> JSON:
        """Return the voice state object as VOICE_STATE_UPDATE carries it."""
        data: JSON = {
            "guild_id": str(self.guild_id),
            "channel_id": None if self.channel_id is None else str(self.channel_id),
            "user_id": str(self.user_id),
            "session_id": self.session_id,
            "deaf": False,
            "mute": False,
            "self_deaf": self.self_deaf,
            "self_mute": self.self_mute,
            "self_video": False,
            "self_stream": False,
            "suppress": False,
            "request_to_speak_timestamp": None,
        }
        if member is not None:
            data["member"] = member.payload()
        return data


@dataclass
class Message:
    """A message in a channel (or an ephemeral interaction message, which no channel lists)."""

    id: int
    channel_id: int
    guild_id: int
    author: User
    content: str = ""
    embeds: list[JSON] = field(default_factory=list)
    components: list[JSON] = field(default_factory=list)
    flags: int = 0
    type: MessageType = MessageType.DEFAULT
    webhook_id: int | None = None
    application_id: int | None = None
    interaction_id: int | None = None
    edits: int = 0
    edited_timestamp: str | None = None
    deleted: bool = False

    @property
    def ephemeral(self) -> bool:
        """Whether only the invoking user can see this message."""
        return bool(self.flags & EPHEMERAL)

    def payload(self) -> JSON:
        """Return the message object."""
        data: JSON = {
            "id": str(self.id),
            "channel_id": str(self.channel_id),
            "guild_id": str(self.guild_id),
            "author": self.author.payload(),
            "content": self.content,
            "timestamp": snowflake_time(self.id),
            "edited_timestamp": self.edited_timestamp,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": self.embeds,
            "components": self.components,
            "pinned": False,
            "type": int(self.type),
            "flags": self.flags,
        }
        if self.webhook_id is not None:
            data["webhook_id"] = str(self.webhook_id)
        if self.application_id is not None:
            data["application_id"] = str(self.application_id)
        return data

    def apply_edit(self, body: JSON, *, edited_at: str) -> None:
        """Apply a message-edit body (only the fields present change).

        Args:
            body: The JSON body of an edit (content, embeds, components, flags).
            edited_at: Timestamp to record as `edited_timestamp`.
        """
        if "content" in body:
            self.content = body["content"] or ""
        if "embeds" in body:
            self.embeds = list(body["embeds"] or [])
        if "components" in body:
            self.components = list(body["components"] or [])
        if "flags" in body and body["flags"] is not None:
            # Only SUPPRESS_EMBEDS can be changed by an edit; EPHEMERAL stays as created.
            self.flags = (self.flags & EPHEMERAL) | (int(body["flags"]) & ~EPHEMERAL)
        self.flags &= ~LOADING
        self.edits += 1
        self.edited_timestamp = edited_at


@dataclass
class Guild:
    """A guild with its channels, roles, members and voice states."""

    id: int
    name: str
    owner_id: int
    channels: dict[int, Channel] = field(default_factory=dict)
    roles: dict[int, Role] = field(default_factory=dict)
    members: dict[int, Member] = field(default_factory=dict)
    voice_states: dict[int, VoiceState] = field(default_factory=dict)

    def channel_named(self, name: str) -> Channel:
        """Return the channel called `name`.

        Raises:
            KeyError: No channel has that name.
        """
        for channel in self.channels.values():
            if channel.name == name:
                return channel
        raise KeyError(name)

    def role_named(self, name: str) -> Role:
        """Return the role called `name`.

        Raises:
            KeyError: No role has that name.
        """
        for role in self.roles.values():
            if role.name == name:
                return role
        raise KeyError(name)

    def permissions_of(self, user_id: int) -> int:
        """Return a member's guild-level permissions (owner and administrators get all)."""
        if user_id == self.owner_id:
            return (1 << 53) - 1
        member = self.members[user_id]
        perms = self.roles[self.id].permissions
        for role_id in member.role_ids:
            perms |= self.roles[role_id].permissions
        if perms & ADMINISTRATOR:
            return (1 << 53) - 1
        return perms

    def payload(self) -> JSON:
        """Return the full GUILD_CREATE payload."""
        return {
            "id": str(self.id),
            "name": self.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "owner_id": str(self.owner_id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "features": [],
            "mfa_level": 0,
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "vanity_url_code": None,
            "description": None,
            "banner": None,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "preferred_locale": "en-US",
            "public_updates_channel_id": None,
            "nsfw_level": 0,
            "premium_progress_bar_enabled": False,
            "roles": [r.payload() for r in self.roles.values()],
            "emojis": [],
            "stickers": [],
            "joined_at": snowflake_time(self.id),
            "large": False,
            "unavailable": False,
            "member_count": len(self.members),
            "voice_states": [
                {k: v for k, v in vs.payload(None).items() if k != "guild_id"}
                for vs in self.voice_states.values()
                if vs.channel_id is not None
            ],
            "members": [m.payload() for m in self.members.values()],
            "channels": [c.payload() for c in self.channels.values()],
            "threads": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }


@dataclass
class Interaction:
    """An interaction a scripted user started, and everything the bot answered to it."""

    id: int
    token: str
    type: InteractionType
    guild_id: int
    channel_id: int
    user_id: int
    data: JSON
    message_id: int | None = None
    callback_type: CallbackType | None = None
    callback_data: JSON | None = None
    original_message_id: int | None = None
    followup_ids: list[int] = field(default_factory=list)
    choices: list[JSON] | None = None
    # Edits the shown message had right after the callback (a reply's wait_edit counts from here).
    callback_edits: int = 0
    # When the user started it (monotonic): Discord forgets an interaction not answered in 3 s.
    created: float = field(default_factory=time.monotonic)


@dataclass
class Command:
    """An application command as synced by the bot."""

    id: int
    application_id: int
    guild_id: int | None
    version: int
    definition: JSON

    @property
    def name(self) -> str:
        """The command's name."""
        return str(self.definition["name"])

    @property
    def options(self) -> list[JSON]:
        """The command's option definitions."""
        return list(self.definition.get("options") or [])

    def payload(self) -> JSON:
        """Return the application command object with its server-assigned fields."""
        data = dict(self.definition)
        data.setdefault("type", 1)
        data.setdefault("description", "")
        data.setdefault("options", [])
        data.update(
            id=str(self.id),
            application_id=str(self.application_id),
            version=str(self.version),
            default_member_permissions=data.get("default_member_permissions"),
            nsfw=bool(data.get("nsfw", False)),
        )
        if self.guild_id is not None:
            data["guild_id"] = str(self.guild_id)
        return data


class World:
    """Everything the sandbox Discord knows.

    Args:
        start_ms: Unix time in milliseconds for the first snowflake.
    """

    def __init__(self, start_ms: int) -> None:
        self.new_id = Snowflakes(start_ms)
        self.users: dict[int, User] = {}
        self.guilds: dict[int, Guild] = {}
        self.messages: dict[int, Message] = {}
        self.interactions: dict[int, Interaction] = {}
        self.interactions_by_token: dict[str, Interaction] = {}
        # None is the global scope; otherwise a guild id.
        self.commands: dict[int | None, dict[str, Command]] = {}
        self._command_versions = 0

    # --- users, guilds, channels -------------------------------------------------------------

    def add_user(self, name: str, *, bot: bool = False) -> User:
        """Create a user."""
        user = User(id=self.new_id(), name=name, bot=bot)
        self.users[user.id] = user
        return user

    def add_guild(self, name: str, *, owner: User) -> Guild:
        """Create a guild owned by `owner`, with its @everyone role and the owner as member."""
        guild = Guild(id=self.new_id(), name=name, owner_id=owner.id)
        guild.roles[guild.id] = Role(
            id=guild.id, name="@everyone", permissions=DEFAULT_EVERYONE_PERMISSIONS
        )
        self.guilds[guild.id] = guild
        self.add_member(guild, owner)
        return guild

    def add_role(self, guild: Guild, name: str, *, permissions: int = 0) -> Role:
        """Create a role in `guild`."""
        role = Role(id=self.new_id(), name=name, permissions=permissions, position=len(guild.roles))
        guild.roles[role.id] = role
        return role

    def add_channel(
        self,
        guild: Guild,
        name: str,
        type: ChannelType,
        *,
        bitrate: int = 64_000,
        user_limit: int = 0,
    ) -> Channel:
        """Create a channel in `guild`."""
        channel = Channel(
            id=self.new_id(),
            guild_id=guild.id,
            name=name,
            type=type,
            position=len(guild.channels),
            bitrate=bitrate,
            user_limit=user_limit,
        )
        guild.channels[channel.id] = channel
        return channel

    def remove_channel(self, channel: Channel) -> list[VoiceState]:
        """Delete a channel; return the voice states it emptied (now with `channel_id` None)."""
        guild = self.guilds[channel.guild_id]
        del guild.channels[channel.id]
        emptied = []
        for state in list(guild.voice_states.values()):
            if state.channel_id == channel.id:
                state.channel_id = None
                del guild.voice_states[state.user_id]
                emptied.append(state)
        return emptied

    def add_member(self, guild: Guild, user: User, *, roles: tuple[Role, ...] = ()) -> Member:
        """Make `user` a member of `guild`."""
        member = Member(
            user=user,
            guild_id=guild.id,
            role_ids=[r.id for r in roles],
            joined_at=snowflake_time(self.new_id()),
        )
        guild.members[user.id] = member
        return member

    def find_channel(self, channel_id: int) -> Channel | None:
        """Return the channel with this id in any guild."""
        for guild in self.guilds.values():
            channel = guild.channels.get(channel_id)
            if channel is not None:
                return channel
        return None

    # --- voice -------------------------------------------------------------------------------

    def set_voice(
        self,
        guild: Guild,
        user_id: int,
        channel_id: int | None,
        *,
        session_id: str | None = None,
        self_mute: bool = False,
        self_deaf: bool = False,
    ) -> VoiceState:
        """Move a member into a voice channel, or out of voice with `channel_id` None.

        Returns:
            The new voice state (kept in the guild unless `channel_id` is None).

        Raises:
            KeyError: The user is not a member or the channel is not a voice channel here.
        """
        if user_id not in guild.members:
            raise KeyError(f"user {user_id} is not a member of guild {guild.id}")
        if channel_id is not None and not guild.channels[channel_id].is_voice:
            raise KeyError(f"channel {channel_id} is not a voice channel")
        old = guild.voice_states.get(user_id)
        sid = session_id or (old.session_id if old is not None else secrets.token_hex(16))
        state = VoiceState(
            user_id=user_id,
            guild_id=guild.id,
            channel_id=channel_id,
            session_id=sid,
            self_mute=self_mute,
            self_deaf=self_deaf,
        )
        if channel_id is None:
            guild.voice_states.pop(user_id, None)
        else:
            guild.voice_states[user_id] = state
        return state

    # --- messages ----------------------------------------------------------------------------

    def add_message(
        self,
        *,
        channel_id: int,
        guild_id: int,
        author: User,
        body: JSON,
        type: MessageType = MessageType.DEFAULT,
        webhook_id: int | None = None,
        interaction_id: int | None = None,
        extra_flags: int = 0,
    ) -> Message:
        """Create a message from a create-message body (content, embeds, components, flags)."""
        message = Message(
            id=self.new_id(),
            channel_id=channel_id,
            guild_id=guild_id,
            author=author,
            content=body.get("content") or "",
            embeds=list(body.get("embeds") or []),
            components=list(body.get("components") or []),
            flags=(int(body.get("flags") or 0) | extra_flags),
            type=type,
            webhook_id=webhook_id,
            application_id=webhook_id,
            interaction_id=interaction_id,
        )
        self.messages[message.id] = message
        return message

    def channel_messages(self, channel_id: int) -> list[Message]:
        """Return the visible (not ephemeral, not deleted) messages of a channel, oldest first."""
        return [
            m
            for m in self.messages.values()
            if m.channel_id == channel_id and not m.ephemeral and not m.deleted
        ]

    # --- commands ----------------------------------------------------------------------------

    def replace_commands(
        self, application_id: int, guild_id: int | None, definitions: list[JSON]
    ) -> list[Command]:
        """Replace the command set of a scope (bulk overwrite), keeping ids of same-named ones."""
        old = self.commands.get(guild_id, {})
        self._command_versions += 1
        new: dict[str, Command] = {}
        for definition in definitions:
            name = str(definition["name"])
            previous = old.get(name)
            new[name] = Command(
                id=previous.id if previous is not None else self.new_id(),
                application_id=application_id,
                guild_id=guild_id,
                version=self._command_versions,
                definition=dict(definition),
            )
        self.commands[guild_id] = new
        return list(new.values())

    def find_command(self, guild_id: int, name: str) -> Command:
        """Return the command a user in `guild_id` sees under `name` (guild scope first).

        Raises:
            KeyError: No synced command has that name.
        """
        for scope in (guild_id, None):
            command = self.commands.get(scope, {}).get(name)
            if command is not None:
                return command
        raise KeyError(f"no synced command named {name!r}")

    # --- interactions ------------------------------------------------------------------------

    def add_interaction(
        self,
        *,
        type: InteractionType,
        guild_id: int,
        channel_id: int,
        user_id: int,
        data: JSON,
        message_id: int | None = None,
    ) -> Interaction:
        """Record a new interaction with a fresh id and token."""
        interaction = Interaction(
            id=self.new_id(),
            token="aW50ZXJhY3Rpb24" + secrets.token_urlsafe(48),
            type=type,
            guild_id=guild_id,
            channel_id=channel_id,
            user_id=user_id,
            data=data,
            message_id=message_id,
        )
        self.interactions[interaction.id] = interaction
        self.interactions_by_token[interaction.token] = interaction
        return interaction

    def interaction_payload(
        self, interaction: Interaction, *, application_id: int, bot_id: int
    ) -> JSON:
        """Return the INTERACTION_CREATE payload for `interaction`.

        Args:
            interaction: The recorded interaction.
            application_id: The bot's application id.
            bot_id: The bot's user id (for `app_permissions`).

        Returns:
            The payload with every field discord.py 2.7.1 reads.
        """
        guild = self.guilds[interaction.guild_id]
        channel = guild.channels[interaction.channel_id]
        member = guild.members[interaction.user_id]
        data: JSON = {
            "id": str(interaction.id),
            "application_id": str(application_id),
            "type": int(interaction.type),
            "data": interaction.data,
            "guild_id": str(guild.id),
            "guild": {"id": str(guild.id), "locale": "en-US", "features": []},
            "channel_id": str(channel.id),
            "channel": channel.payload(),
            "member": member.payload(permissions=guild.permissions_of(member.user.id)),
            "token": interaction.token,
            "version": 1,
            "app_permissions": str(guild.permissions_of(bot_id)),
            "locale": "en-US",
            "guild_locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(guild.id)},
            "context": 0,
            "attachment_size_limit": ATTACHMENT_SIZE_LIMIT,
        }
        if interaction.message_id is not None:
            data["message"] = self.messages[interaction.message_id].payload()
        return data
