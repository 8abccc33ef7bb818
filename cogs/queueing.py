"""The commands that arrange and show the queue: /loop, /shuffle, /remove, /move, /clear, /queue,
/nowplaying, and the /music group (player stats, the voice privacy code).
"""

from __future__ import annotations

from typing import Final, Literal

import discord
from discord import app_commands

from legato.audio.player import PlayerState
from legato.audio.queue import LoopMode
from legato.cogs.base import CommandBase, Interaction
from legato.cogs.checks import Denied, NotPlaying, require_may
from legato.cogs.format import (
    NOT_E2EE,
    debug_embed,
    format_privacy_code,
    now_playing_embed,
    queue_embed,
    queue_pages,
    track_title,
)
from legato.cogs.session import NO_MENTIONS, TITLE
from legato.cogs.views import QueuePager
from legato.errors import QueueEmpty, QueueError

__all__ = ["QueueCommands"]

#: What /nowplaying says the player waits for, by its state (see ``now_playing_embed``).
_WAITING: Final[dict[PlayerState, Literal["loading", "buffering"]]] = {
    PlayerState.LOADING: "loading",
    PlayerState.BUFFERING: "buffering",
}


class QueueCommands(CommandBase):
    """/loop, /shuffle, /remove, /move, /clear, /queue, /nowplaying, /music debug and privacy."""

    @app_commands.guild_only()
    @app_commands.command(name="loop", description="Loop nothing, the current track or the queue.")
    @app_commands.describe(mode="off, track or queue (default: the next one in that order)")
    async def loop(
        self, interaction: Interaction, mode: Literal["off", "track", "queue"] | None = None
    ) -> None:
        session, _ = self._playing_session(interaction)
        order = [LoopMode.OFF, LoopMode.TRACK, LoopMode.QUEUE]
        if mode is None:
            new = order[(order.index(session.queue.loop) + 1) % len(order)]
        else:
            new = LoopMode(mode)
        session.queue.loop = new
        await self._say(interaction, f"Loop: {new.value}.")

    @app_commands.guild_only()
    @app_commands.command(name="shuffle", description="Shuffle the upcoming tracks.")
    async def shuffle(self, interaction: Interaction) -> None:
        session, _ = self._playing_session(interaction)
        if len(session.queue) < 2:
            raise QueueError("shuffle < 2", user_message="There is nothing to shuffle.")
        session.queue.shuffle()
        await self._say(interaction, f"Shuffled {len(session.queue)} tracks.")

    @app_commands.guild_only()
    @app_commands.command(name="remove", description="Remove a track from the queue.")
    @app_commands.describe(position="Its number in /queue")
    async def remove(
        self, interaction: Interaction, position: app_commands.Range[int, 1, 100_000]
    ) -> None:
        session, member = self._playing_session(interaction)
        upcoming = session.queue.upcoming
        if not 1 <= position <= len(upcoming):
            raise QueueError(
                f"remove {position} of {len(upcoming)}",
                user_message=f"There is no track {position} in the queue ({len(upcoming)} queued).",
            )
        track = upcoming[position - 1]
        if track.requester_id != member.id:
            perms = self.config.permissions
            require_may(
                perms.clear,
                member,
                perms,
                action="remove other people's tracks",
                channel=session.channel,
            )
        session.queue.remove(position - 1)
        await self._say(interaction, f"Removed **{track_title(track, TITLE)}**.")

    @app_commands.guild_only()
    @app_commands.command(name="move", description="Move a track to another place in the queue.")
    @app_commands.describe(position="Its number in /queue", to="The number it should have")
    async def move(
        self,
        interaction: Interaction,
        position: app_commands.Range[int, 1, 100_000],
        to: app_commands.Range[int, 1, 100_000],
    ) -> None:
        session, member = self._playing_session(interaction)
        perms = self.config.permissions
        require_may(perms.clear, member, perms, action="reorder the queue", channel=session.channel)
        count = len(session.queue)
        for n in (position, to):
            if not 1 <= n <= count:
                raise QueueError(
                    f"move {position}->{to} of {count}",
                    user_message=f"There is no track {n} in the queue ({count} queued).",
                )
        track = session.queue.move(position - 1, to - 1)
        await self._say(interaction, f"Moved **{track_title(track, TITLE)}** to position {to}.")

    @app_commands.guild_only()
    @app_commands.command(name="clear", description="Remove every upcoming track.")
    async def clear(self, interaction: Interaction) -> None:
        session, member = self._playing_session(interaction)
        perms = self.config.permissions
        require_may(perms.clear, member, perms, action="clear the queue", channel=session.channel)
        if len(session.queue) == 0:
            raise QueueEmpty("clear empty", user_message="The queue is already empty.")
        removed = session.queue.clear()
        await self._say(interaction, f"Cleared {len(removed)} tracks from the queue.")

    @app_commands.guild_only()
    @app_commands.command(name="queue", description="Show the queue.")
    async def queue(self, interaction: Interaction) -> None:
        session, member = self._any_session(interaction)

        def render(page: int) -> tuple[discord.Embed, int]:
            upcoming = [session.shown(t) for t in session.queue.upcoming]
            current = session.player.current
            embed = queue_embed(
                None if current is None else session.shown(current),
                upcoming,
                page=page,
                loop=session.queue.loop.value,
            )
            return embed, queue_pages(len(upcoming))

        embed, pages = render(0)
        if pages <= 1:
            await self._say(interaction, embed=embed)
            return
        pager = QueuePager(member.id, render, pages)
        self._pagers.add(pager)
        await interaction.response.send_message(
            embed=embed, view=pager, allowed_mentions=NO_MENTIONS
        )
        pager.message = await interaction.original_response()

    @app_commands.guild_only()
    @app_commands.command(name="nowplaying", description="Show what is playing.")
    async def nowplaying(self, interaction: Interaction) -> None:
        member = self._member(interaction)
        session = self.session(member.guild.id)
        current = session.player.current if session is not None else None
        if session is None or current is None:
            raise NotPlaying("nowplaying with nothing playing")
        state = session.player.state
        embed = now_playing_embed(
            session.shown(current),
            position=session.player.position,
            volume=session.volume_percent,
            loop=session.queue.loop.value,
            paused=state is PlayerState.PAUSED,
            duration=session.duration,
            privacy_code=session.voice.voice_privacy_code,
            waiting=_WAITING.get(state),
        )
        await self._say(interaction, embed=embed)

    # -- commands: /music (diagnostics) --------------------------------------------------------

    # Discord applies default_member_permissions to a whole top-level command, so /music cannot
    # hide only `debug` from members: `debug` checks Manage Server itself, `privacy` is for all.
    music_group = app_commands.Group(
        name="music", description="Player diagnostics and the voice privacy code.", guild_only=True
    )

    @music_group.command(name="debug", description="Player and voice stats (server admins).")
    async def music_debug(self, interaction: Interaction) -> None:
        member = self._member(interaction)
        if not interaction.permissions.manage_guild:
            raise Denied(
                f"user {member.id} lacks manage_guild",
                user_message="Only server admins (Manage Server) can see the player stats.",
            )
        session, _ = self._any_session(interaction)
        stats = session.stats
        embed = debug_embed(stats.player, stats.voice, state=stats.state.value, track=stats.track)
        await self._say(interaction, embed=embed, ephemeral=True)

    @music_group.command(name="privacy", description="Show the voice privacy code (DAVE).")
    async def music_privacy(self, interaction: Interaction) -> None:
        session, _ = self._any_session(interaction)
        code = session.voice.voice_privacy_code
        if code is None:
            await self._say(interaction, NOT_E2EE, ephemeral=True)
            return
        await self._say(
            interaction,
            f"Voice privacy code for {session.channel.mention}: `{format_privacy_code(code)}`\n"
            "Compare it with the voice privacy code your Discord client shows for this call: "
            "when they match, the audio is end-to-end encrypted between us.",
            ephemeral=True,
        )
