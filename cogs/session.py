"""A guild's music session and the registry that makes and ends them.

Each guild with the bot in voice has one :class:`GuildSession`: the voice client, the player
and queue it owns, the text channel for announcements, skip votes and the idle/alone timers.
:class:`Sessions` joins a voice channel (one join at a time per guild), ends sessions (leaving,
or on a lost connection, keeping the queue for the next /join or /play when configured), and is
where persistence hears that a session ended for good.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

import discord

from legato.audio.player import (
    GuildPlayer,
    PlayerEvent,
    PlayerState,
    PlayerStats,
    QueueEnded,
    SourceOpener,
    TrackFailed,
    TrackStarted,
)
from legato.audio.queue import LoopMode, TrackQueue
from legato.audio.track import Track
from legato.cogs.checks import VoiceLike, listeners
from legato.cogs.format import announce_embed, format_time, over_limit, track_title
from legato.config import Config
from legato.errors import LegatoError, VoiceConnectError
from legato.log import guild_logger
from legato.voice.client import LegatoVoiceClient, VoiceLinkStats, VoiceOptions

if TYPE_CHECKING:
    from legato.cogs.persist import Persistence
    from legato.errors import VoiceError

__all__ = [
    "DISCONNECTED",
    "NO_MENTIONS",
    "POST_GRACE",
    "TITLE",
    "GuildSession",
    "SessionStats",
    "Sessions",
    "restored_note",
    "span",
    "tracks_word",
]

_log = logging.getLogger(__name__)

NO_MENTIONS: Final = discord.AllowedMentions.none()
TITLE: Final = 100  # title length in one-line replies
POST_GRACE: Final = 10.0  # seconds a closing session waits for its messages to go out
DISCONNECTED: Final = "I was disconnected from the voice channel; the queue is cleared."
_UNLOADING: Final = "The music player is shutting down; try again in a moment."
_DISCONNECTED_KEPT: Final = (
    "I was disconnected from the voice channel; the queue ({count}) is kept: /join or /play "
    "to pick it up again."
)


@dataclass(frozen=True, slots=True)
class SessionStats:
    """One guild's figures: its player's counters and its voice link (``/music debug``)."""

    guild_id: int
    state: PlayerState
    track: Track | None
    player: PlayerStats
    voice: VoiceLinkStats


class GuildSession:
    """Everything Legato holds for one guild while it is in voice there.

    Owns its tasks (announcements, the idle and alone timers); :meth:`close` cancels them, closes
    the player and, when asked, leaves the channel.
    """

    def __init__(
        self,
        owner: Sessions,
        guild: discord.Guild,
        voice: LegatoVoiceClient,
        text_channel: discord.abc.Messageable | None,
    ) -> None:
        config = owner.config.playback
        self.owner = owner
        self.guild_id = guild.id
        self.voice = voice
        self.text_channel = text_channel
        self.log = guild_logger(__name__, guild.id)
        self.queue = TrackQueue(max_length=config.max_queue_length)
        self.player = GuildPlayer(
            voice,
            owner.opener,
            queue=self.queue,
            executor=owner.executor,
            on_event=self._on_event,
            volume=config.default_volume / 100,
            guild_id=guild.id,
            max_reopens=config.max_reopens,
            stall_timeout=config.stall_timeout,
            starve_window=config.starve_window,
            starve_limit=config.starve_limit,
        )
        self.votes: set[int] = set()
        self.closed = False
        self._posts: set[asyncio.Task[Any]] = set()
        self._timers: set[asyncio.Task[Any]] = set()
        self._idle: asyncio.Task[None] | None = None
        self._alone: asyncio.Task[None] | None = None
        self._announced = 0  # uid of the track last announced (a looped track is told once)
        #: Lengths the player learned on opening tracks whose metadata had none, by track uid.
        self._lengths: dict[int, float] = {}
        #: Tracks kept from a lost connection, put back when it was made (told once, then 0).
        self.restored = 0

    @property
    def channel(self) -> VoiceLike:
        """The voice channel the bot is in."""
        channel = self.voice.channel
        assert isinstance(channel, (discord.VoiceChannel, discord.StageChannel))
        return channel

    @property
    def duration(self) -> float | None:
        """Length of the current track: the metadata's, else what the decoder reports."""
        current = self.player.current
        if current is None:
            return None
        known = self.shown(current).duration
        return known if known is not None else self.player.duration

    def shown(self, track: Track) -> Track:
        """``track`` as users see it: with the length the player learned when it opened it
        (yt-dlp gives none for a direct media link), when its metadata had none."""
        if track.duration is not None or track.live:
            return track
        length = self._lengths.get(track.uid)
        return track if length is None else replace(track, duration=length)

    def _learn_length(self, track: Track) -> None:
        length = self.player.duration
        if track.duration is not None or track.live or length is None or length <= 0:
            return
        self._lengths[track.uid] = length
        # Only tracks still in the queue (or its history) can be shown again.
        queue = self.queue
        keep = {t.uid for t in (queue.current, *queue.upcoming, *queue.history) if t is not None}
        self._lengths = {uid: s for uid, s in self._lengths.items() if uid in keep}

    @property
    def volume_percent(self) -> int:
        """The player's volume in percent."""
        return round(self.player.volume * 100)

    @property
    def stats(self) -> SessionStats:
        """A snapshot of the player's counters and the voice link's."""
        return SessionStats(
            guild_id=self.guild_id,
            state=self.player.state,
            track=self.player.current,
            player=self.player.stats,
            voice=self.voice.link_stats,
        )

    def _own(self, coro: Coroutine[Any, Any, Any], name: str, into: set[asyncio.Task[Any]]) -> Any:
        task = asyncio.get_running_loop().create_task(coro, name=f"legato-{name}-{self.guild_id}")
        into.add(task)
        task.add_done_callback(into.discard)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.error("task %s failed", task.get_name(), exc_info=task.exception())

    # -- player events -------------------------------------------------------------------------

    def _on_event(self, event: PlayerEvent) -> None:
        if isinstance(event, TrackStarted):
            self.votes.clear()
            self.cancel_idle()
            self.log.info("playing %r", event.track.title)
            self._learn_length(event.track)
            if self._too_long(event.track):
                return
            repeat = event.track.uid == self._announced
            self._announced = event.track.uid
            if self.owner.config.playback.announce_now_playing and not repeat:
                self.post(embed=announce_embed(self.shown(event.track)))
        elif isinstance(event, TrackFailed):
            self.votes.clear()
            self.log.warning("track %r failed: %s", event.track.title, event.error)
            title = track_title(event.track, TITLE)
            self.post(content=f"Skipped **{title}**: {event.error.user_message}")
        elif isinstance(event, QueueEnded):
            self.arm_idle()

    def _too_long(self, track: Track) -> bool:
        """Skip a track whose length only the decoder knew (links without metadata)."""
        limit = self.owner.config.playback.max_track_duration
        length = self.player.duration
        if limit <= 0 or track.duration is not None or length is None:
            return False
        if not over_limit(length, limit):
            return False
        self.log.info("skipping %r: %.0f s is over the %.0f s limit", track.title, length, limit)
        # Not from inside the player's own callback: on the next loop turn.
        asyncio.get_running_loop().call_soon(self._skip_if_current, track)
        self.post(
            content=(
                f"Skipped **{track_title(track, TITLE)}**: it is {format_time(length)} long; "
                f"the limit is {format_time(limit)}."
            )
        )
        return True

    def _skip_if_current(self, track: Track) -> None:
        if not self.closed:
            self.player.skip(track)

    def post(self, *, content: str | None = None, embed: discord.Embed | None = None) -> None:
        """Send a message to the channel where /play was last used (if any), in the background."""
        channel = self.text_channel
        if channel is None or self.closed:
            return

        async def send() -> None:
            try:
                if embed is not None:
                    await channel.send(content=content, embed=embed, allowed_mentions=NO_MENTIONS)
                else:
                    await channel.send(content=content, allowed_mentions=NO_MENTIONS)
            except discord.HTTPException as exc:
                # Missing permissions or a deleted channel must not stop the music.
                self.log.warning("could not post to channel %s: %s", channel, exc)

        self._own(send(), "post", self._posts)

    # -- timers --------------------------------------------------------------------------------

    def arm_idle(self) -> None:
        """Leave after ``idle_timeout`` seconds unless something starts playing."""
        delay = self.owner.config.playback.idle_timeout
        if delay <= 0 or self.closed or self._idle is not None:
            return
        self._idle = self._timer(delay, "idle", f"Nothing played for {span(delay)}.")

    def cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def check_alone(self) -> None:
        """Start or stop the "left alone" timer from who is in the channel now."""
        delay = self.owner.config.playback.leave_when_alone_after
        if delay <= 0 or self.closed:
            return
        alone = not listeners(self.channel)
        if alone and self._alone is None:
            self._alone = self._timer(delay, "alone", "Everyone left the voice channel.")
        elif not alone and self._alone is not None:
            self._alone.cancel()
            self._alone = None

    def _timer(self, delay: float, kind: str, why: str) -> asyncio.Task[None]:
        async def fire() -> None:
            await asyncio.sleep(delay)
            self.log.info("leaving: %s timer fired after %.1f s", kind, delay)
            await self.owner.end(self.guild_id, leave=True, notice=f"{why} Leaving.")

        task: asyncio.Task[None] = self._own(fire(), kind, self._timers)
        return task

    # -- shutdown ------------------------------------------------------------------------------

    async def close(self, *, leave: bool) -> None:
        """Stop the timers, close the player, (when ``leave``) disconnect, let posts finish.

        Idempotent.
        """
        if self.closed:
            return
        self.closed = True
        me = asyncio.current_task()
        timers = [t for t in self._timers if t is not me]
        for task in timers:
            task.cancel()
        await asyncio.gather(*timers, return_exceptions=True)
        await self.player.close()
        if leave:
            await self.voice.disconnect(force=True)
        # Posts are let finish, not cancelled: discord.py's rate limiter loses its token when a
        # request is cancelled between the response and its bookkeeping, and the channel's next
        # message then waits 30 s.
        if self._posts:
            _, late = await asyncio.wait(set(self._posts), timeout=POST_GRACE)
            for task in late:
                task.cancel()


class Sessions:
    """The live sessions, by guild: joins one at a time per guild, ends them, keeps the queues of
    lost connections for the next /join or /play (``playback.keep_queue_on_disconnect``).

    Args:
        config: Legato's configuration.
        opener: Opens a track's source for a player.
        executor: The threads a player's blocking work runs in.
        voice_options: How Legato's voice client connects.
    """

    def __init__(
        self,
        config: Config,
        *,
        opener: SourceOpener,
        executor: Executor,
        voice_options: VoiceOptions,
    ) -> None:
        self.config = config
        self.opener = opener
        self.executor = executor
        self.voice_options = voice_options
        #: Every session by guild, closing ones included until they are ended.
        self.live: dict[int, GuildSession] = {}
        #: Told when a session ends for good (its saved state goes); None when not kept.
        self.persistence: Persistence | None = None
        self._locks: dict[int, asyncio.Lock] = {}
        self._ending: set[asyncio.Task[None]] = set()
        #: Queues kept from a lost voice connection: the tracks, the one playing first; loop mode.
        self._kept: dict[int, tuple[list[Track], LoopMode]] = {}
        #: Set first thing on unload: no session may be made after it (see :meth:`connect`).
        self.unloading = False

    def get(self, guild_id: int) -> GuildSession | None:
        """The live session of a guild, if the bot is in voice there."""
        session = self.live.get(guild_id)
        return session if session is not None and not session.closed else None

    def unloading_error(self) -> LegatoError:
        """What a command is told when the cog unloads under it."""
        return LegatoError("the music cog is unloading", user_message=_UNLOADING)

    async def connect(
        self, guild: discord.Guild, channel: VoiceLike, text: discord.abc.Messageable | None
    ) -> GuildSession:
        """Join ``channel`` with Legato's voice client and make the guild's session (or return
        the one already there)."""
        async with self._locks.setdefault(guild.id, asyncio.Lock()):
            if self.unloading:
                raise self.unloading_error()
            existing = self.get(guild.id)
            if existing is not None:
                return existing
            stale = guild.voice_client
            if stale is not None:
                # Not ours (or left over from a crash): Legato's client must be the only one.
                await stale.disconnect(force=True)
            try:
                voice = await channel.connect(
                    cls=LegatoVoiceClient.configured(self.voice_options),
                    timeout=self.config.voice.connect_timeout,
                    self_deaf=self.config.voice.self_deaf,
                )
            except discord.ClientException as exc:
                raise VoiceConnectError(f"connect to {channel.id}: {exc}") from exc
            assert isinstance(voice, LegatoVoiceClient)
            if self.unloading:  # unloaded while connecting: nothing may outlive the cog
                await voice.disconnect(force=True)
                raise self.unloading_error()
            session = GuildSession(self, guild, voice, text)
            self.live[guild.id] = session
            voice.add_disconnect_listener(self._voice_gone)
            self._put_back_kept(session)
            session.arm_idle()
            session.check_alone()
            session.log.info("joined voice channel %s", channel.id)
            return session

    def _voice_gone(self, voice: LegatoVoiceClient, error: VoiceError | None) -> None:
        guild_id = voice.guild.id
        session = self.live.get(guild_id)
        if session is None or session.voice is not voice or session.closed:
            return
        session.log.info("voice connection ended: %s", error or "disconnected")
        lost = error is not None
        self.end_soon(guild_id, leave=False, notice=DISCONNECTED if lost else None, keep=lost)

    def own(self, coro: Coroutine[Any, Any, None], name: str, guild_id: int | None = None) -> None:
        """Run ``coro`` as a task that :meth:`close` waits for (a session ending, a restore)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._ending.add(task)
        task.add_done_callback(lambda t: self._ended(t, guild_id))

    def end_soon(
        self, guild_id: int, *, leave: bool, notice: str | None = None, keep: bool = False
    ) -> None:
        """:meth:`end` in a task of its own (from a listener or a callback)."""
        self.own(
            self.end(guild_id, leave=leave, notice=notice, keep=keep),
            f"legato-end-{guild_id}",
            guild_id,
        )

    def _ended(self, task: asyncio.Task[None], guild_id: int | None) -> None:
        self._ending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log = _log if guild_id is None else guild_logger(__name__, guild_id)
            log.error("ending a session failed", exc_info=task.exception())

    async def end(
        self, guild_id: int, *, leave: bool, notice: str | None = None, keep: bool = False
    ) -> None:
        """Close a guild's session (player, timers) and, when ``leave``, its voice connection.

        Args:
            guild_id: The guild.
            leave: Disconnect from voice too.
            notice: Posted where /play was last used once the session is closed.
            keep: The connection was lost (kicked, channel deleted): keep the queue for the next
                /join or /play when ``playback.keep_queue_on_disconnect`` says so.
        """
        session = self.live.pop(guild_id, None)
        if session is None:
            return
        if keep and self.config.playback.keep_queue_on_disconnect:
            # Before any await: a /play arriving while this session closes finds the queue kept.
            notice = self._keep_queue(session) or notice
        await session.close(leave=leave)
        session.log.info("session ended (leave=%s)", leave)
        if self.persistence is not None:
            await self.persistence.forget(guild_id)
        text = session.text_channel
        if notice and text is not None:
            try:
                await text.send(notice, allowed_mentions=NO_MENTIONS)
            except discord.HTTPException as exc:
                session.log.warning("could not post the leave notice: %s", exc)

    def drop_kept(self, guild_id: int) -> None:
        """Forget the queue kept for ``guild_id`` (the bot left the guild)."""
        self._kept.pop(guild_id, None)

    async def close(self) -> None:
        """End every session (leaving voice) once the joins under way are done; let the ones
        ending on their own post their notice. Call after setting :attr:`unloading`."""
        for lock in list(self._locks.values()):
            async with lock:  # a join in progress ends (and leaves again) before this goes on
                pass
        guilds = list(self.live)
        ended = await asyncio.gather(
            *(self.end(gid, leave=True) for gid in guilds), return_exceptions=True
        )
        for guild_id, outcome in zip(guilds, ended, strict=True):
            if isinstance(outcome, Exception):  # one failing must not keep the others open
                guild_logger(__name__, guild_id).error(
                    "ending the session on unload failed", exc_info=outcome
                )
        if self._ending:
            # Sessions ending on their own may be posting a notice: let it go out (see close()).
            _, late = await asyncio.wait(set(self._ending), timeout=POST_GRACE)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    # -- a queue kept across a lost connection -------------------------------------------------

    def _keep_queue(self, session: GuildSession) -> str | None:
        """Keep a lost session's queue, the track that was playing first; the notice to post."""
        queue = session.queue
        tracks = [t for t in (queue.current,) if t is not None] + list(queue.upcoming)
        if not tracks:
            return None
        self._kept[session.guild_id] = (tracks, queue.loop)
        session.log.info("keeping %d track(s) for the next /join or /play", len(tracks))
        return _DISCONNECTED_KEPT.format(count=tracks_word(len(tracks)))

    def _put_back_kept(self, session: GuildSession) -> None:
        """Queue what :meth:`_keep_queue` kept for this guild and start playing it."""
        kept = self._kept.pop(session.guild_id, None)
        if kept is None:
            return
        tracks, loop = kept
        room = session.queue.max_length
        rest = tracks[1:] if room is None else tracks[1 : room + 1]
        session.queue.add(tracks[:1])
        session.queue.loop = loop
        session.player.start()  # the first becomes current: the rest fit as they did before
        session.queue.add(rest)
        session.restored = 1 + len(rest)
        session.log.info("put back %d kept track(s)", session.restored)


def restored_note(session: GuildSession) -> str:
    """Say (once) that the kept queue was put back, or nothing."""
    count, session.restored = session.restored, 0
    current = session.queue.current
    if not count or current is None:
        return ""
    return (
        f" The queue kept from before is back ({tracks_word(count)}), starting again with "
        f"**{track_title(current, TITLE)}**."
    )


def span(seconds: float) -> str:
    """``90 seconds``, ``5 minutes``, ``1:30:00``: a timeout as a person says it."""
    if seconds < 120:
        return f"{seconds:g} second" + ("" if seconds == 1 else "s")
    if seconds % 60 == 0 and seconds < 7200:
        return f"{seconds / 60:g} minutes"
    return format_time(seconds)


def tracks_word(count: int) -> str:
    """``1 track``, ``3 tracks``."""
    return f"{count} track" + ("" if count == 1 else "s")
