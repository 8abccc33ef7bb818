"""The sandbox's Discord: everything it knows, and the mutations its servers make.

:class:`World` holds the objects of :mod:`legato.sandbox.models` (users, guilds, channels,
members, voice states, messages, interactions, commands) and hands out their snowflakes. Pure
data: no sockets, no asyncio, no clock. The servers in `gateway.py` and `rest.py` mutate the
world and broadcast what changed.
"""

from __future__ import annotations

import secrets

from legato.sandbox.models import (
    ATTACHMENT_SIZE_LIMIT,
    DEFAULT_EVERYONE_PERMISSIONS,
    JSON,
    Channel,
    ChannelType,
    Command,
    Guild,
    Interaction,
    InteractionType,
    Member,
    Message,
    MessageType,
    Role,
    Snowflakes,
    User,
    VoiceState,
    snowflake_time,
)


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
