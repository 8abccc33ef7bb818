"""What every Music command stands on: who is calling, which session, and how to answer.

:class:`CommandBase` is the base of the cog's command groups (:mod:`legato.cogs.playback`,
:mod:`legato.cogs.queueing`) and of :class:`~legato.cogs.music.MusicCog`, which joins them.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Final

import discord
from discord.ext import commands

from legato.cogs.checks import Denied, NotPlaying, require_same_channel
from legato.cogs.session import NO_MENTIONS, GuildSession, Sessions
from legato.cogs.views import QueuePager
from legato.config import Config
from legato.log import GuildLogger, guild_logger

__all__ = ["CommandBase", "Interaction", "interaction_log"]

#: The cog's logger: a command's records keep the name they had before the commands were split
#: out of ``legato.cogs.music`` (what operators filter on).
_LOGGER: Final = "legato.cogs.music"
_log = logging.getLogger(_LOGGER)

Interaction = discord.Interaction[Any]


class CommandBase(commands.Cog):
    """The state the commands share and the helpers they answer with.

    Args:
        config: Legato's configuration.
        registry: The guilds' sessions.
    """

    def __init__(self, config: Config, registry: Sessions) -> None:
        self.config = config
        self.registry = registry
        # Weak: discord.py holds a pager until its timeout; after that it may go.
        self._pagers: weakref.WeakSet[QueuePager] = weakref.WeakSet()

    def session(self, guild_id: int) -> GuildSession | None:
        """The live session of a guild, if the bot is in voice there."""
        return self.registry.get(guild_id)

    async def _say(
        self,
        interaction: Interaction,
        content: str | None = None,
        *,
        embed: discord.Embed | None = None,
        ephemeral: bool = False,
    ) -> None:
        """Answer, or follow up a deferred answer (whose visibility the deferral chose)."""
        kwargs: dict[str, Any] = {"allowed_mentions": NO_MENTIONS, "ephemeral": ephemeral}
        if embed is not None:
            kwargs["embed"] = embed
        try:
            if interaction.response.is_done():
                await interaction.followup.send(content or "", **kwargs)
            else:
                await interaction.response.send_message(content, **kwargs)
        except discord.HTTPException as exc:
            interaction_log(interaction).warning(
                "could not answer interaction %s: %s", interaction.id, exc
            )

    @staticmethod
    def _member(interaction: Interaction) -> discord.Member:
        user = interaction.user
        if not isinstance(user, discord.Member):
            raise Denied("not a member", user_message="Music commands work in servers only.")
        return user

    def _any_session(self, interaction: Interaction) -> tuple[GuildSession, discord.Member]:
        """The caller's guild's session, wherever the caller is."""
        member = self._member(interaction)
        session = self.session(member.guild.id)
        if session is None:
            raise NotPlaying("no session", user_message="I'm not in a voice channel.")
        return session, member

    def _playing_session(self, interaction: Interaction) -> tuple[GuildSession, discord.Member]:
        """The session the caller may control: bot in voice, caller in the same channel."""
        session, member = self._any_session(interaction)
        require_same_channel(member, session.channel)
        return session, member


def interaction_log(interaction: Interaction) -> logging.Logger | GuildLogger:
    """The cog's logger, with the guild in every record when the interaction has one."""
    guild_id = interaction.guild_id
    return _log if guild_id is None else guild_logger(_LOGGER, guild_id)
