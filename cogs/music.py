"""The Music cog: slash commands mapped onto a per-guild player, queue and voice client.

The cog is thin. Each guild with the bot in voice has one
:class:`~legato.cogs.session.GuildSession` (voice client, player, queue, announcements, votes,
timers), made and ended by :class:`~legato.cogs.session.Sessions`; the commands check who may do
what, then call the player or the queue. This module wires the parts (resolver, opener, decode
workers, persistence), listens to Discord's events, and holds /join, /leave, /play and /playnext;
the other commands are in :mod:`legato.cogs.playback` and :mod:`legato.cogs.queueing`, search
suggestions in :mod:`legato.cogs.suggestions`. The cog is the only place that writes replies:
failures are :class:`~legato.errors.LegatoError` raised from anywhere below and answered,
ephemerally, with their ``user_message`` (:meth:`MusicCog.cog_app_command_error`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import discord
from discord import app_commands
from discord.ext import commands

from legato.audio.encode import OpusSettings
from legato.audio.player import PlayerState, make_opener
from legato.audio.queue import TrackQueue
from legato.audio.resolve import Resolver, ResolverSettings
from legato.audio.track import Track
from legato.audio.workers import DecodePool
from legato.cogs.base import Interaction, interaction_log
from legato.cogs.build import source_settings, url_policy
from legato.cogs.checks import (
    CommandRate,
    VoiceLike,
    check_query,
    check_tracks,
    is_search,
    require_may,
    require_same_channel,
    require_voice,
)
from legato.cogs.format import format_time, track_title
from legato.cogs.persist import Persistence
from legato.cogs.playback import PlaybackCommands
from legato.cogs.queueing import QueueCommands
from legato.cogs.session import (
    DISCONNECTED,
    TITLE,
    GuildSession,
    Sessions,
    restored_note,
    span,
)
from legato.cogs.suggestions import Suggestions
from legato.config import Config
from legato.errors import LegatoError, QueueFull
from legato.voice.client import VoiceOptions

__all__ = ["MusicCog"]

_log = logging.getLogger(__name__)
#: Discord's error code for an interaction it no longer knows (not answered within 3 s).
_UNKNOWN_INTERACTION: Final = 10062
_PROVIDERS: Final = {"youtube": "ytsearch", "soundcloud": "scsearch", "none": "ytsearch"}


class MusicCog(PlaybackCommands, QueueCommands, name="Music"):
    """Play audio in voice channels: /join, /play, /queue and friends.

    Args:
        bot: The bot.
        config: Legato's configuration.
        resolver: Resolves queries to tracks (default: yt-dlp with ``config``'s settings); the
            cog closes it on unload.
    """

    def __init__(
        self, bot: commands.Bot, config: Config, *, resolver: Resolver | None = None
    ) -> None:
        self.bot = bot
        pb = config.playback
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="legato")
        self.resolver = resolver or _resolver(config, self.executor)
        voice = config.voice
        self.opus = OpusSettings(
            bitrate=voice.bitrate,
            complexity=voice.opus_complexity,
            fec=voice.fec,
            expected_loss=voice.expected_packet_loss,
        )
        # Decoding in worker processes keeps transcoding off this process's GIL (see
        # legato.audio.workers); 0 decodes in the executor's threads.
        self.decode_pool = DecodePool(pb.decode_processes) if pb.decode_processes else None
        self.opener = make_opener(
            self.resolver,
            opus=self.opus,
            executor=self.executor,
            timeout=pb.stream_timeout,
            pool=self.decode_pool,
            threads_first=pb.decode_threads_first,
        )
        self.voice_options = VoiceOptions.from_config(voice)
        super().__init__(
            config,
            Sessions(
                config,
                opener=self.opener,
                executor=self.executor,
                voice_options=self.voice_options,
            ),
        )
        self._suggestions = Suggestions(self._search)
        perms = config.permissions
        self._rate = CommandRate(perms.cooldown_commands, perms.cooldown_seconds)
        #: Saves sessions and resumes them after a restart ([storage]); None when off.
        self.persistence: Persistence | None = None
        #: (the interpreter's switch interval before cog_load, the one it set), when it set one.
        self._switch_interval: tuple[float, float] | None = None

    @property
    def sessions(self) -> dict[int, GuildSession]:
        """Every session by guild (closing ones included until they are ended)."""
        return self.registry.live

    async def cog_load(self) -> None:
        """Set the interpreter's thread switch interval (``playback.thread_switch_interval_ms``)
        and open the guild state store when ``[storage]`` is enabled (resumed on READY)."""
        wanted = self.config.playback.thread_switch_interval_ms
        if wanted > 0:
            self._switch_interval = (sys.getswitchinterval(), wanted / 1000)
            sys.setswitchinterval(wanted / 1000)
            _log.info(
                "thread switch interval set to %g ms (was %g ms)",
                wanted,
                self._switch_interval[0] * 1000,
            )
        storage = self.config.storage
        if not storage.enabled:
            return
        try:
            self.persistence = await Persistence.open(self, storage)
            self.registry.persistence = self.persistence
        except (OSError, sqlite3.Error) as exc:
            # Playing without memory beats not playing: say so loudly and go on.
            _log.error("guild state store %s cannot be opened (%s); not kept", storage.path, exc)
            return
        if self.bot.is_ready():  # loaded into a running bot: no READY is coming
            # Owned like a session ending: waited for on unload.
            self.registry.own(self.on_ready(), "legato-restore")

    async def cog_unload(self) -> None:
        """Leave every voice channel and stop every task this cog started.

        A command still running (a /play resolving, a /join connecting) or a restore cannot
        make a session afterwards: ``Sessions.connect`` refuses once unloading, and the joins
        already connecting are waited for (each leaves again) before the sessions are ended.
        """
        self.registry.unloading = True
        if self.persistence is not None:
            # First: the sessions are kept as they are, to resume after the restart.
            await self.persistence.close()
        for pager in list(self._pagers):
            pager.stop()
        self._pagers.clear()
        await self._suggestions.close()
        await self.registry.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.resolver.close()  # its worker processes, if any
        if self._switch_interval is not None:
            before, ours = self._switch_interval
            # Put back only what is still ours: someone may have set it since.
            if abs(sys.getswitchinterval() - ours) < 1e-9:
                sys.setswitchinterval(before)
        if self.decode_pool is not None:
            # Blocks until its processes exit (quick: they are told to, and killed after 2 s).
            await asyncio.to_thread(self.decode_pool.close)

    # -- sessions ------------------------------------------------------------------------------

    async def connect(
        self, guild: discord.Guild, channel: VoiceLike, text: discord.abc.Messageable | None
    ) -> GuildSession:
        """Join ``channel`` and make the guild's session (see :meth:`Sessions.connect`)."""
        return await self.registry.connect(guild, channel, text)

    async def end_session(
        self, guild_id: int, *, leave: bool, notice: str | None = None, keep: bool = False
    ) -> None:
        """Close a guild's session and, when ``leave``, its voice connection (see
        :meth:`Sessions.end`)."""
        await self.registry.end(guild_id, leave=leave, notice=notice, keep=keep)

    # -- listeners -----------------------------------------------------------------------------

    @commands.Cog.listener()
    async def on_ready(self) -> None:
        if self.persistence is not None:
            await self.persistence.restore()  # once per process; later READYs find it done

    @commands.Cog.listener()
    async def on_socket_event_type(self, event: str) -> None:
        if event != "READY":
            return
        # A new gateway session (not a resume): discord.py's READY handling forgot every voice
        # client (ConnectionState.clear), yet Legato's connections play on. Without this, the
        # next VOICE_STATE/SERVER_UPDATE (a move, a kick) would not reach them. discord.py has
        # no public way to register a voice client; this listener runs after READY is parsed.
        state = self.bot._connection
        for guild_id, session in self.sessions.items():
            if not session.closed and state._get_voice_client(guild_id) is None:
                state._add_voice_client(guild_id, session.voice)
                session.log.info("voice connection kept across a new gateway session")

    @commands.Cog.listener()
    async def on_voice_state_update(
        self, member: discord.Member, before: discord.VoiceState, after: discord.VoiceState
    ) -> None:
        session = self.session(member.guild.id)
        if session is None:
            return
        if self.bot.user is not None and member.id == self.bot.user.id and after.channel is None:
            # Kicked, or the channel was deleted (whichever of this and the voice client's own
            # notice comes first ends the session; the other finds nothing to do).
            self.registry.end_soon(member.guild.id, leave=False, notice=DISCONNECTED, keep=True)
            return
        ours = session.channel.id
        if (before.channel and before.channel.id == ours) or (
            after.channel and after.channel.id == ours
        ):
            session.check_alone()
            if before.channel and before.channel.id == ours and after.channel != before.channel:
                session.votes.discard(member.id)

    @commands.Cog.listener()
    async def on_guild_channel_delete(self, channel: discord.abc.GuildChannel) -> None:
        session = self.session(channel.guild.id)
        if session is None:
            return
        if channel.id == session.channel.id:
            self.registry.end_soon(channel.guild.id, leave=True, notice=DISCONNECTED, keep=True)
        elif session.text_channel is not None and getattr(session.text_channel, "id", 0) == (
            channel.id
        ):
            session.text_channel = None

    @commands.Cog.listener()
    async def on_guild_remove(self, guild: discord.Guild) -> None:
        self.registry.drop_kept(guild.id)
        await self.end_session(guild.id, leave=False)

    # -- errors --------------------------------------------------------------------------------

    async def cog_app_command_error(
        self, interaction: Interaction, error: app_commands.AppCommandError
    ) -> None:
        original: BaseException = error
        if isinstance(error, app_commands.CommandInvokeError):
            original = error.original
        log = interaction_log(interaction)
        if isinstance(original, discord.NotFound) and original.code == _UNKNOWN_INTERACTION:
            # Discord forgets an interaction not answered within 3 s: nobody is left to tell.
            log.warning(
                "/%s: the interaction expired before it was answered (over 3 s: is the bot "
                "overloaded?)",
                interaction.command.qualified_name if interaction.command else "?",
            )
            return
        if isinstance(original, LegatoError):
            message = original.user_message
            log.info(
                "/%s refused: %s",
                interaction.command.qualified_name if interaction.command else "?",
                original,
            )
        elif isinstance(original, app_commands.TransformerError):
            log.info("option not understood: %s", original)
            message = "I couldn't understand one of the options; check it and try again."
        elif isinstance(original, app_commands.CommandOnCooldown):
            log.info("user %s over the command rate", interaction.user.id)
            message = (
                f"You're sending commands too fast; try again in {_wait(original.retry_after)}."
            )
        elif isinstance(original, app_commands.NoPrivateMessage):
            message = "Music commands work in servers only."
        elif isinstance(original, app_commands.CheckFailure):
            message = "You can't use that command here."
        else:
            log.error(
                "/%s failed",
                interaction.command.qualified_name if interaction.command else "?",
                exc_info=original,
            )
            message = "Something went wrong on my side; the error has been logged."
        await self._say(interaction, message, ephemeral=True)

    async def interaction_check(self, interaction: Interaction, /) -> bool:
        """Count the command against its user's rate (``[permissions] cooldown_*``).

        discord.py runs this before every app command of the cog, not before autocomplete.

        Raises:
            app_commands.CommandOnCooldown: The user is over the rate; nothing runs.
        """
        rate = self._rate
        wait = rate.take(interaction.user.id, time.monotonic())
        if wait > 0:
            raise app_commands.CommandOnCooldown(
                app_commands.Cooldown(rate.limit, rate.window), wait
            )
        return True

    # -- resolving -----------------------------------------------------------------------------

    async def _search(self, query: str) -> list[Track]:
        return await self.resolver.resolve(query)

    async def _resolve(self, query: str, requester_id: int) -> list[Track]:
        """Resolve for a command; "shutting down" when the cog unloads under it.

        Unloading shuts the executor down: a resolve waiting for a worker is cancelled, one
        that still had to start is refused (RuntimeError). The command's own task being
        cancelled is not that, and goes on as a cancel.
        """
        if self.registry.unloading:
            raise self.registry.unloading_error()
        try:
            return await self.resolver.resolve(query, requester_id=requester_id)
        except (RuntimeError, asyncio.CancelledError):
            task = asyncio.current_task()
            if not self.registry.unloading or (task is not None and task.cancelling()):
                raise
            raise self.registry.unloading_error() from None

    # -- commands: joining and leaving ---------------------------------------------------------

    @app_commands.guild_only()
    @app_commands.command(name="join", description="Join your voice channel (or the one given).")
    @app_commands.describe(channel="The voice channel to join (default: yours)")
    async def join(self, interaction: Interaction, channel: VoiceLike | None = None) -> None:
        member = self._member(interaction)
        target = channel or require_voice(member)
        session = self.session(member.guild.id)
        if session is not None:
            if session.channel.id == target.id:
                await self._say(interaction, f"I'm already in {target.mention}.", ephemeral=True)
                return
            require_may(
                self.config.permissions.stop,
                member,
                self.config.permissions,
                action="move me to another channel",
                channel=session.channel,
            )
        await interaction.response.defer(ephemeral=True, thinking=True)
        if session is not None:
            await session.voice.move_to(target, timeout=self.config.voice.connect_timeout)
            session.check_alone()
            note = ""
        else:
            joined = await self.registry.connect(member.guild, target, _text_channel(interaction))
            note = restored_note(joined)
        await self._say(interaction, f"Joined {target.mention}.{note}")

    @app_commands.guild_only()
    @app_commands.command(name="leave", description="Stop playing and leave the voice channel.")
    async def leave(self, interaction: Interaction) -> None:
        session, member = self._playing_session(interaction)
        require_may(
            self.config.permissions.stop,
            member,
            self.config.permissions,
            action="make me leave",
            channel=session.channel,
        )
        channel = session.channel
        # Answer first: leaving waits for Discord's confirmation, and cannot fail in a way the
        # user could act on.
        await self._say(interaction, f"Left {channel.mention}.")
        await self.end_session(member.guild.id, leave=True)

    # -- commands: adding ----------------------------------------------------------------------

    @app_commands.guild_only()
    @app_commands.command(name="play", description="Play a link or search, or queue it.")
    @app_commands.describe(query="A link (video, audio file, playlist) or words to search for")
    async def play(self, interaction: Interaction, query: str) -> None:
        await self._enqueue(interaction, query, next_up=False)

    @app_commands.guild_only()
    @app_commands.command(name="playnext", description="Queue a link or search to play next.")
    @app_commands.describe(query="A link (video, audio file, playlist) or words to search for")
    async def playnext(self, interaction: Interaction, query: str) -> None:
        await self._enqueue(interaction, query, next_up=True)

    @play.autocomplete("query")
    @playnext.autocomplete("query")
    async def _query_autocomplete(
        self, interaction: Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return await self.suggest(current, started=time.monotonic())

    async def suggest(self, current: str, *, started: float) -> list[app_commands.Choice[str]]:
        """Search suggestions for what the user typed, answered within the 3 s budget."""
        return await self._suggestions.choices(current, self.config.playback, started=started)

    async def _enqueue(self, interaction: Interaction, query: str, *, next_up: bool) -> None:
        member = self._member(interaction)
        channel = require_voice(member)
        session = self.session(member.guild.id)
        if session is not None:
            require_same_channel(member, session.channel)
            room = _room(session.queue)
            if room == 0:
                raise QueueFull("queue full", user_message=_full_message(session.queue))
        check_query(query, self.config.playback)
        await interaction.response.defer(ephemeral=True, thinking=True)
        search = is_search(query)
        tracks = await self._resolve(query, member.id)
        tracks, too_long = check_tracks(tracks, self.config.playback, search=search)
        # While resolving, the session may have ended, or another /play may have made one.
        session = self.session(member.guild.id)
        if session is None:
            session = await self.registry.connect(member.guild, channel, _text_channel(interaction))
        require_same_channel(member, session.channel)
        note = restored_note(session)
        if len(tracks) > _room(session.queue):
            raise QueueFull(
                f"{len(tracks)} tracks, room {_room(session.queue)}",
                user_message=_full_message(session.queue, adding=len(tracks)),
            )
        positions = session.queue.add_next(tracks) if next_up else session.queue.add(tracks)
        text = _text_channel(interaction)
        if text is not None:
            session.text_channel = text
        started = session.player.state is PlayerState.IDLE and session.player.start()
        first = track_title(tracks[0], TITLE)
        if len(tracks) > 1:
            message = f"Queued {len(tracks)} tracks, starting with **{first}**."
        elif started:
            message = f"Playing **{first}**."
        else:
            message = f"Queued **{first}** at position {positions[0] + 1}."
        if too_long:
            limit = format_time(self.config.playback.max_track_duration)
            message += f" {too_long} longer than {limit} left out."
        message += note
        session.log.info("queued %d track(s) for user %s", len(tracks), member.id)
        await self._say(interaction, message)


def _resolver(config: Config, executor: ThreadPoolExecutor) -> Resolver:
    """yt-dlp resolving with ``config``'s settings, its URL guard built from ``[playback]``
    (:func:`~legato.cogs.build.url_policy`)."""
    pb = config.playback
    provider = pb.search_provider
    return Resolver(
        ResolverSettings(
            max_playlist=pb.max_playlist_size,
            search_provider=_PROVIDERS.get(provider, provider),
            search_results=pb.search_results,
            allow_local_files=pb.allow_local_files,
            timeout=pb.resolve_timeout,
            sources=source_settings(config.sources),
            url_policy=url_policy(pb),
        ),
        executor=executor,
        processes=pb.resolve_processes,
    )


def _wait(seconds: float) -> str:
    """``3 seconds``, ``5 minutes``: how long until a retry, rounded up (to minutes past two)."""
    whole = math.ceil(seconds)
    return span(whole if whole < 120 else 60 * math.ceil(whole / 60))


def _text_channel(interaction: Interaction) -> discord.abc.Messageable | None:
    channel = interaction.channel
    if isinstance(channel, discord.abc.Messageable):
        return channel
    return None


def _room(queue: TrackQueue) -> int:
    limit = queue.max_length
    return 1 << 30 if limit is None else max(0, limit - len(queue))


def _full_message(queue: TrackQueue, *, adding: int | None = None) -> str:
    limit = queue.max_length
    room = _room(queue)
    if adding is None or room == 0:
        return f"The queue is full ({limit} tracks)."
    return f"That adds {adding} tracks but the queue has room for {room} more (limit {limit})."
