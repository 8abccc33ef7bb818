"""The commands that drive what plays: /pause, /resume, /skip, /previous, /stop, /seek, /volume.

Each checks who may do it (``[permissions]``), then calls the guild's player.
"""

from __future__ import annotations

import asyncio
import math
from typing import Final

import discord
from discord import app_commands

from legato.audio.player import PlayerState
from legato.audio.track import Track
from legato.cogs.base import CommandBase, Interaction
from legato.cogs.checks import Denied, NotPlaying, listeners, require_may
from legato.cogs.format import BadInput, format_time, parse_position, track_title
from legato.cogs.session import TITLE, GuildSession

__all__ = ["PlaybackCommands"]

_ALREADY_SKIPPED: Final = "That track was already skipped."
_ENDED: Final = "That track has ended."
_LIVE: Final = "This stream is live; it cannot be seeked."
#: A seek leaving less than this much of the track ends it: it counts as a skip.
_SEEK_END: Final = 1.0


class PlaybackCommands(CommandBase):
    """/pause, /resume, /skip (or a vote to), /previous, /stop, /seek and /volume."""

    @app_commands.guild_only()
    @app_commands.command(name="pause", description="Pause playback.")
    async def pause(self, interaction: Interaction) -> None:
        session, _ = self._playing_session(interaction)
        if not session.player.pause():
            raise NotPlaying("pause while not playing")
        session.arm_idle()  # paused is not playing: the idle timeout applies
        await self._say(interaction, "Paused.")

    @app_commands.guild_only()
    @app_commands.command(name="resume", description="Resume playback.")
    async def resume(self, interaction: Interaction) -> None:
        session, _ = self._playing_session(interaction)
        if not session.player.resume():
            raise NotPlaying("resume while not paused", user_message="I'm not paused.")
        session.cancel_idle()
        await self._say(interaction, "Resumed.")

    @app_commands.guild_only()
    @app_commands.command(name="skip", description="Skip the current track (or vote to).")
    async def skip(self, interaction: Interaction) -> None:
        session, member = self._playing_session(interaction)
        seen = session.player.current
        if seen is None:
            raise NotPlaying("skip with nothing playing")
        await self._skip(interaction, session, member, seen)

    async def _skip(
        self, interaction: Interaction, session: GuildSession, member: discord.Member, seen: Track
    ) -> None:
        """Skip ``seen``, the track the caller saw playing, or vote to; /skip and /seek to the end.

        Raises:
            NotPlaying: ``seen`` is no longer current (two /skip at once: one track goes).
            Denied: The caller may not skip and voting is off.
        """
        # Interactions that arrive together are started one after another in the same loop
        # turn, each running to its first real await. Yield once so that every one of them has
        # taken its view of what plays before the first changes it.
        await asyncio.sleep(0)
        if session.player.current is not seen:
            raise NotPlaying(
                f"skip of track {seen.uid}, no longer current", user_message=_ALREADY_SKIPPED
            )
        perms = self.config.permissions
        try:
            require_may(
                perms.skip,
                member,
                perms,
                action="skip",
                requester_id=seen.requester_id,
                channel=session.channel,
            )
        except Denied:
            if perms.vote_skip_ratio <= 0:
                raise
            session.votes.add(member.id)
            present = {m.id for m in listeners(session.channel)}
            votes = len(session.votes & present)
            needed = max(1, math.ceil(perms.vote_skip_ratio * len(present)))
            if votes < needed:
                await self._say(interaction, f"Vote to skip recorded: {votes}/{needed}.")
                return
        title = track_title(seen, TITLE)
        if not session.player.skip(seen):
            raise NotPlaying(f"skip of track {seen.uid} lost", user_message=_ALREADY_SKIPPED)
        await self._say(interaction, f"Skipped **{title}**.")

    @app_commands.guild_only()
    @app_commands.command(name="previous", description="Go back to the previous track.")
    async def previous(self, interaction: Interaction) -> None:
        session, member = self._playing_session(interaction)
        perms = self.config.permissions
        current = session.player.current
        require_may(
            perms.skip,
            member,
            perms,
            action="go back",
            requester_id=current.requester_id if current else None,
            channel=session.channel,
        )
        track = session.player.previous()
        await self._say(interaction, f"Back to **{track_title(track, TITLE)}**.")

    @app_commands.guild_only()
    @app_commands.command(name="stop", description="Stop playing and empty the queue.")
    async def stop(self, interaction: Interaction) -> None:
        session, member = self._playing_session(interaction)
        perms = self.config.permissions
        require_may(perms.stop, member, perms, action="stop the music", channel=session.channel)
        if session.player.current is None and len(session.queue) == 0:
            raise NotPlaying("stop with nothing playing")
        session.queue.clear()
        session.player.stop()
        session.arm_idle()
        await self._say(interaction, "Stopped and cleared the queue.")

    @app_commands.guild_only()
    @app_commands.command(name="seek", description="Jump to a position in the current track.")
    @app_commands.describe(position="Like 1:23, 83 (seconds), +10 or -5")
    async def seek(self, interaction: Interaction, position: str) -> None:
        session, member = self._playing_session(interaction)
        seen = session.player.current
        if seen is None:
            raise NotPlaying("seek with nothing playing")
        if seen.live:
            raise BadInput("seek on a live stream", user_message=_LIVE)
        if session.duration is None and session.player.state is PlayerState.LOADING:
            # A link's length is known once its source opens: wait for that, so that a seek
            # to the end counts as a skip and a stream with no end is refused.
            await interaction.response.defer(ephemeral=True, thinking=True)
            try:
                async with asyncio.timeout(self.config.playback.resolve_timeout):
                    await session.player.wait_for(PlayerState.PLAYING)
            except TimeoutError:
                session.log.info("seek: the track's length is still unknown")
        duration = session.duration
        if duration is None:
            # No length: a live stream, whose server would stop sending once seeked.
            raise BadInput("seek on a stream with no length", user_message=_LIVE)
        target = parse_position(position, current=session.player.position, duration=None)
        if duration - target < _SEEK_END:
            # That ends the track: a skip, with /skip's permissions and votes.
            await self._skip(interaction, session, member, seen)
            return
        if not interaction.response.is_done():
            await interaction.response.defer(ephemeral=True, thinking=True)
        if session.player.current is not seen:
            raise NotPlaying(f"seek in track {seen.uid}, no longer current", user_message=_ENDED)
        await session.player.seek(target)
        await self._say(interaction, f"Jumped to {format_time(target)}.")

    @app_commands.guild_only()
    @app_commands.command(name="volume", description="Show or set the volume.")
    @app_commands.describe(percent="New volume in percent")
    async def volume(
        self, interaction: Interaction, percent: app_commands.Range[int, 0, 200] | None = None
    ) -> None:
        session, _ = self._playing_session(interaction)
        if percent is None:
            await self._say(interaction, f"Volume: {session.volume_percent}%.")
            return
        top = self.config.playback.max_volume
        if percent > top:
            raise BadInput(f"volume {percent} > {top}", user_message=f"The maximum is {top}%.")
        await interaction.response.defer(ephemeral=True, thinking=True)
        await session.player.set_volume(percent / 100)
        await self._say(interaction, f"Volume set to {percent}%.")
