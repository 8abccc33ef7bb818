"""Discord's objects as the sandbox models them: users, guilds, channels, members, voice states,
messages, interactions and commands.

Pure data: no sockets, no asyncio. Every object renders itself as the JSON payload Discord would
send (shapes from discord-api-docs and what discord.py 2.7.1 reads).
:class:`~legato.sandbox.world.World` holds them; the servers in `gateway.py` and `rest.py`
mutate the world and broadcast what changed.
"""

from __future__ import annotations

import enum
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
