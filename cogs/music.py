"""The Music cog: slash commands mapped onto a per-guild player, queue and voice client.

The cog is thin. Each guild with the bot in voice has one :class:`GuildSession` (voice client,
player, queue, the text channel for announcements, skip votes and the idle/alone timers); the
commands check who may do what, then call the player or the queue. The cog is the only place that
writes replies: failures are :class:`~legato.errors.LegatoError` raised from anywhere below and
answered here, ephemerally, with their ``user_message``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import sqlite3
import sys
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final, Literal

import discord
from discord import app_commands
from discord.ext import commands

from legato.audio.encode import OpusSettings
from legato.audio.player import (
    GuildPlayer,
    PlayerEvent,
    PlayerState,
    PlayerStats,
    QueueEnded,
    TrackFailed,
    TrackStarted,
    make_opener,
)
from legato.audio.queue import LoopMode, TrackQueue
from legato.audio.resolve import Resolver, ResolverSettings, split_url
from legato.audio.track import Track
from legato.audio.urlguard import UrlPolicy
from legato.audio.workers import DecodePool
from legato.cogs.checks import (
    CommandRate,
    Denied,
    NotPlaying,
    VoiceLike,
    listeners,
    require_may,
    require_same_channel,
    require_voice,
)
from legato.cogs.format import (
    NOT_E2EE,
    BadInput,
    announce_embed,
    debug_embed,
    format_privacy_code,
    format_time,
    is_blank,
    now_playing_embed,
    over_limit,
    parse_position,
    queue_embed,
    queue_pages,
    safe_text,
    track_title,
)
from legato.cogs.persist import Persistence
from legato.cogs.views import QueuePager
from legato.config import Config
from legato.errors import LegatoError, QueueEmpty, QueueError, QueueFull, VoiceConnectError
from legato.log import GuildLogger, guild_logger
from legato.voice.client import LegatoVoiceClient, VoiceLinkStats, VoiceOptions

if TYPE_CHECKING:
    from legato.errors import VoiceError

__all__ = ["AUTOCOMPLETE_BUDGET", "GuildSession", "MusicCog", "SessionStats"]

_log = logging.getLogger(__name__)
#: Discord's error code for an interaction it no longer knows (not answered within 3 s).
_UNKNOWN_INTERACTION: Final = 10062

#: Discord drops an autocomplete answer after 3 s; answer with what is ready by then.
AUTOCOMPLETE_BUDGET: Final = 2.5
_SUGGESTION_TTL: Final = 600.0
_SUGGESTION_CACHE: Final = 256
_MAX_SEARCHES: Final = 3  # autocomplete searches running at once
# As legato.audio.resolve decides: a URL is the whole query; words around one are a search.
_URL: Final = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://\S+$")


def _is_url(query: str) -> bool:
    return _URL.match(query.strip()) is not None


def _is_search(query: str) -> bool:
    q = query.strip()
    return not _is_url(q) and not os.path.isabs(q) and not q.startswith(("./", "../", "~"))


_PROVIDERS: Final = {"youtube": "ytsearch", "soundcloud": "scsearch", "none": "ytsearch"}
_NO_MENTIONS: Final = discord.AllowedMentions.none()
_TITLE: Final = 100  # title length in one-line replies
_POST_GRACE: Final = 10.0  # seconds a closing session waits for its messages to go out
_DISCONNECTED: Final = "I was disconnected from the voice channel; the queue is cleared."
_ALREADY_SKIPPED: Final = "That track was already skipped."
_ENDED: Final = "That track has ended."
_LIVE: Final = "This stream is live; it cannot be seeked."
#: A seek leaving less than this much of the track ends it: it counts as a skip.
_SEEK_END: Final = 1.0
_UNLOADING: Final = "The music player is shutting down; try again in a moment."
_DISCONNECTED_KEPT: Final = (
    "I was disconnected from the voice channel; the queue ({count}) is kept: /join or /play "
    "to pick it up again."
)

Interaction = discord.Interaction[Any]

#: What /nowplaying says the player waits for, by its state (see ``now_playing_embed``).
_WAITING: Final[dict[PlayerState, Literal["loading", "buffering"]]] = {
    PlayerState.LOADING: "loading",
    PlayerState.BUFFERING: "buffering",
}


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
        cog: MusicCog,
        guild: discord.Guild,
        voice: LegatoVoiceClient,
        text_channel: discord.abc.Messageable | None,
    ) -> None:
        config = cog.config.playback
        self.cog = cog
        self.guild_id = guild.id
        self.voice = voice
        self.text_channel = text_channel
        self.log = guild_logger(__name__, guild.id)
        self.queue = TrackQueue(max_length=config.max_queue_length)
        self.player = GuildPlayer(
            voice,
            cog.opener,
            queue=self.queue,
            executor=cog.executor,
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
        #: Tracks kept from a lost connection put back by ``_connect`` (told once, then 0).
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
            if self.cog.config.playback.announce_now_playing and not repeat:
                self.post(embed=announce_embed(self.shown(event.track)))
        elif isinstance(event, TrackFailed):
            self.votes.clear()
            self.log.warning("track %r failed: %s", event.track.title, event.error)
            title = track_title(event.track, _TITLE)
            self.post(content=f"Skipped **{title}**: {event.error.user_message}")
        elif isinstance(event, QueueEnded):
            self.arm_idle()

    def _too_long(self, track: Track) -> bool:
        """Skip a track whose length only the decoder knew (links without metadata)."""
        limit = self.cog.config.playback.max_track_duration
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
                f"Skipped **{track_title(track, _TITLE)}**: it is {format_time(length)} long; "
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
                    await channel.send(content=content, embed=embed, allowed_mentions=_NO_MENTIONS)
                else:
                    await channel.send(content=content, allowed_mentions=_NO_MENTIONS)
            except discord.HTTPException as exc:
                # Missing permissions or a deleted channel must not stop the music.
                self.log.warning("could not post to channel %s: %s", channel, exc)

        self._own(send(), "post", self._posts)

    # -- timers --------------------------------------------------------------------------------

    def arm_idle(self) -> None:
        """Leave after ``idle_timeout`` seconds unless something starts playing."""
        delay = self.cog.config.playback.idle_timeout
        if delay <= 0 or self.closed or self._idle is not None:
            return
        self._idle = self._timer(delay, "idle", f"Nothing played for {_span(delay)}.")

    def cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def check_alone(self) -> None:
        """Start or stop the "left alone" timer from who is in the channel now."""
        delay = self.cog.config.playback.leave_when_alone_after
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
            await self.cog.end_session(self.guild_id, leave=True, notice=f"{why} Leaving.")

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
            _, late = await asyncio.wait(set(self._posts), timeout=_POST_GRACE)
            for task in late:
                task.cancel()


class _Suggestions:
    """Autocomplete results by query: answered from cache, shared while a search runs."""

    def __init__(self, search: Callable[[str], Coroutine[Any, Any, list[Track]]]) -> None:
        self._search = search
        self._done: OrderedDict[str, tuple[float, list[Track]]] = OrderedDict()
        self._running: dict[str, asyncio.Task[list[Track]]] = {}

    def cached(self, query: str) -> list[Track] | None:
        hit = self._done.get(query)
        if hit is None or time.monotonic() - hit[0] > _SUGGESTION_TTL:
            return None
        self._done.move_to_end(query)
        return hit[1]

    def nearest(self, query: str) -> list[Track]:
        """Results of the longest cached prefix of ``query`` (what is ready while typing)."""
        best: list[Track] = []
        best_len = 0
        for key, (_, tracks) in self._done.items():
            if query.startswith(key) and len(key) > best_len:
                best, best_len = tracks, len(key)
        return best

    async def get(self, query: str, budget: float) -> list[Track]:
        hit = self.cached(query)
        if hit is not None:
            return hit
        task = self._running.get(query)
        if task is None:
            if len(self._running) >= _MAX_SEARCHES:
                # Typing fast: earlier keystrokes' searches still run; answer from the cache.
                return self.nearest(query)
            task = asyncio.get_running_loop().create_task(
                self._search(query), name="legato-autocomplete"
            )
            self._running[query] = task
            task.add_done_callback(lambda t: self._store(query, t))
        done, _ = await asyncio.wait({task}, timeout=max(0.0, budget))
        if task in done and not task.cancelled() and task.exception() is None:
            return task.result()
        return self.nearest(query)

    def _store(self, query: str, task: asyncio.Task[list[Track]]) -> None:
        self._running.pop(query, None)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            if not isinstance(error, LegatoError):
                _log.warning("autocomplete search failed", exc_info=error)
            return
        self._done[query] = (time.monotonic(), task.result())
        while len(self._done) > _SUGGESTION_CACHE:
            self._done.popitem(last=False)

    async def close(self) -> None:
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class MusicCog(commands.Cog, name="Music"):
    """Play audio in voice channels: /join, /play, /queue and friends.

    Args:
        bot: The bot.
        config: Legato's configuration.
    """

    def __init__(self, bot: commands.Bot, config: Config) -> None:
        self.bot = bot
        self.config = config
        pb = config.playback
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="legato")
        provider = pb.search_provider
        self.resolver = Resolver(
            ResolverSettings(
                max_playlist=pb.max_playlist_size,
                search_provider=_PROVIDERS.get(provider, provider),
                search_results=pb.search_results,
                allow_local_files=pb.allow_local_files,
                timeout=pb.resolve_timeout,
                sources=config.sources.settings(),
                # Users' links make the bot fetch things: no internal addresses, and only the
                # allowed domains when some are configured (legato.audio.urlguard).
                url_policy=UrlPolicy(
                    allowed_domains=pb.allowed_domains or None,
                    allow_private=pb.allow_private_addresses,
                    allow_local_files=pb.allow_local_files,
                    allowed_hosts=pb.allowed_hosts,
                    timeout=pb.resolve_timeout,
                ),
            ),
            executor=self.executor,
            processes=pb.resolve_processes,
        )
        self._resolver = self.resolver  # closed on unload, whatever stands in for it meanwhile
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
        self.sessions: dict[int, GuildSession] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._suggestions = _Suggestions(self._search)
        # Weak: discord.py holds a pager until its timeout; after that it may go.
        self._pagers: weakref.WeakSet[QueuePager] = weakref.WeakSet()
        self._ending: set[asyncio.Task[None]] = set()
        perms = config.permissions
        self._rate = CommandRate(perms.cooldown_commands, perms.cooldown_seconds)
        #: Queues kept from a lost voice connection for the next /join or /play
        #: (``playback.keep_queue_on_disconnect``): the tracks, the one playing first; loop mode.
        self._kept: dict[int, tuple[list[Track], LoopMode]] = {}
        #: Saves sessions and resumes them after a restart ([storage]); None when off.
        self.persistence: Persistence | None = None
        #: Set first thing on unload: no session may be made after it (see ``_connect``).
        self._unloading = False
        #: (the interpreter's switch interval before cog_load, the one it set), when it set one.
        self._switch_interval: tuple[float, float] | None = None

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
        except (OSError, sqlite3.Error) as exc:
            # Playing without memory beats not playing: say so loudly and go on.
            _log.error("guild state store %s cannot be opened (%s); not kept", storage.path, exc)
            return
        if self.bot.is_ready():  # loaded into a running bot: no READY is coming
            task = asyncio.get_running_loop().create_task(self.on_ready(), name="legato-restore")
            self._ending.add(task)  # owned like a session ending: waited for on unload
            task.add_done_callback(self._ended)

    async def cog_unload(self) -> None:
        """Leave every voice channel and stop every task this cog started.

        A command still running (a /play resolving, a /join connecting) or a restore cannot
        make a session afterwards: ``_connect`` refuses once unloading, and the joins already
        connecting are waited for (each leaves again) before the sessions are ended.
        """
        self._unloading = True
        if self.persistence is not None:
            # First: the sessions are kept as they are, to resume after the restart.
            await self.persistence.close()
        for pager in list(self._pagers):
            pager.stop()
        self._pagers.clear()
        await self._suggestions.close()
        for lock in list(self._locks.values()):
            async with lock:  # a join in progress ends (and leaves again) before this goes on
                pass
        guilds = list(self.sessions)
        ended = await asyncio.gather(
            *(self.end_session(gid, leave=True) for gid in guilds), return_exceptions=True
        )
        for guild_id, outcome in zip(guilds, ended, strict=True):
            if isinstance(outcome, Exception):  # one failing must not keep the others open
                guild_logger(__name__, guild_id).error(
                    "ending the session on unload failed", exc_info=outcome
                )
        if self._ending:
            # Sessions ending on their own may be posting a notice: let it go out (see close()).
            _, late = await asyncio.wait(set(self._ending), timeout=_POST_GRACE)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._resolver.close()  # its worker processes, if any
        if self._switch_interval is not None:
            before, ours = self._switch_interval
            # Put back only what is still ours: someone may have set it since.
            if abs(sys.getswitchinterval() - ours) < 1e-9:
                sys.setswitchinterval(before)
        if self.decode_pool is not None:
            # Blocks until its processes exit (quick: they are told to, and killed after 2 s).
            await asyncio.to_thread(self.decode_pool.close)

    # -- sessions ------------------------------------------------------------------------------

    def session(self, guild_id: int) -> GuildSession | None:
        """The live session of a guild, if the bot is in voice there."""
        session = self.sessions.get(guild_id)
        return session if session is not None and not session.closed else None

    def _lock(self, guild_id: int) -> asyncio.Lock:
        return self._locks.setdefault(guild_id, asyncio.Lock())

    async def _connect(
        self, guild: discord.Guild, channel: VoiceLike, text: discord.abc.Messageable | None
    ) -> GuildSession:
        """Join ``channel`` with Legato's voice client and make the guild's session."""
        async with self._lock(guild.id):
            if self._unloading:
                raise _unloading()
            existing = self.session(guild.id)
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
            if self._unloading:  # unloaded while connecting: nothing may outlive the cog
                await voice.disconnect(force=True)
                raise _unloading()
            session = GuildSession(self, guild, voice, text)
            self.sessions[guild.id] = session
            voice.add_disconnect_listener(self._voice_gone)
            self._put_back_kept(session)
            session.arm_idle()
            session.check_alone()
            session.log.info("joined voice channel %s", channel.id)
            return session

    def _voice_gone(self, voice: LegatoVoiceClient, error: VoiceError | None) -> None:
        guild_id = voice.guild.id
        session = self.sessions.get(guild_id)
        if session is None or session.voice is not voice or session.closed:
            return
        session.log.info("voice connection ended: %s", error or "disconnected")
        lost = error is not None
        self._end_soon(guild_id, leave=False, notice=_DISCONNECTED if lost else None, keep=lost)

    def _end_soon(
        self, guild_id: int, *, leave: bool, notice: str | None = None, keep: bool = False
    ) -> None:
        task = asyncio.get_running_loop().create_task(
            self.end_session(guild_id, leave=leave, notice=notice, keep=keep),
            name=f"legato-end-{guild_id}",
        )
        self._ending.add(task)
        task.add_done_callback(lambda t: self._ended(t, guild_id))

    def _ended(self, task: asyncio.Task[None], guild_id: int | None = None) -> None:
        self._ending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log = _log if guild_id is None else guild_logger(__name__, guild_id)
            log.error("ending a session failed", exc_info=task.exception())

    async def end_session(
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
        session = self.sessions.pop(guild_id, None)
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
                await text.send(notice, allowed_mentions=_NO_MENTIONS)
            except discord.HTTPException as exc:
                session.log.warning("could not post the leave notice: %s", exc)

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
            self._end_soon(member.guild.id, leave=False, notice=_DISCONNECTED, keep=True)
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
            self._end_soon(channel.guild.id, leave=True, notice=_DISCONNECTED, keep=True)
        elif session.text_channel is not None and getattr(session.text_channel, "id", 0) == (
            channel.id
        ):
            session.text_channel = None

    @commands.Cog.listener()
    async def on_guild_remove(self, guild: discord.Guild) -> None:
        self._kept.pop(guild.id, None)
        await self.end_session(guild.id, leave=False)

    # -- errors --------------------------------------------------------------------------------

    async def cog_app_command_error(
        self, interaction: Interaction, error: app_commands.AppCommandError
    ) -> None:
        original: BaseException = error
        if isinstance(error, app_commands.CommandInvokeError):
            original = error.original
        log = _interaction_log(interaction)
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

    async def _say(
        self,
        interaction: Interaction,
        content: str | None = None,
        *,
        embed: discord.Embed | None = None,
        ephemeral: bool = False,
    ) -> None:
        """Answer, or follow up a deferred answer (whose visibility the deferral chose)."""
        kwargs: dict[str, Any] = {"allowed_mentions": _NO_MENTIONS, "ephemeral": ephemeral}
        if embed is not None:
            kwargs["embed"] = embed
        try:
            if interaction.response.is_done():
                await interaction.followup.send(content or "", **kwargs)
            else:
                await interaction.response.send_message(content, **kwargs)
        except discord.HTTPException as exc:
            _interaction_log(interaction).warning(
                "could not answer interaction %s: %s", interaction.id, exc
            )

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

    # -- helpers -------------------------------------------------------------------------------

    def _keep_queue(self, session: GuildSession) -> str | None:
        """Keep a lost session's queue, the track that was playing first; the notice to post."""
        queue = session.queue
        tracks = [t for t in (queue.current,) if t is not None] + list(queue.upcoming)
        if not tracks:
            return None
        self._kept[session.guild_id] = (tracks, queue.loop)
        session.log.info("keeping %d track(s) for the next /join or /play", len(tracks))
        return _DISCONNECTED_KEPT.format(count=_tracks(len(tracks)))

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

    def _restored_note(self, session: GuildSession) -> str:
        """Say (once) that the kept queue was put back, or nothing."""
        count, session.restored = session.restored, 0
        current = session.queue.current
        if not count or current is None:
            return ""
        return (
            f" The queue kept from before is back ({_tracks(count)}), starting again with "
            f"**{track_title(current, _TITLE)}**."
        )

    @staticmethod
    def _member(interaction: Interaction) -> discord.Member:
        user = interaction.user
        if not isinstance(user, discord.Member):
            raise Denied("not a member", user_message="Music commands work in servers only.")
        return user

    def _playing_session(self, interaction: Interaction) -> tuple[GuildSession, discord.Member]:
        """The session the caller may control: bot in voice, caller in the same channel."""
        member = self._member(interaction)
        session = self.session(member.guild.id)
        if session is None:
            raise NotPlaying("no session", user_message="I'm not in a voice channel.")
        require_same_channel(member, session.channel)
        return session, member

    def _check_query(self, query: str) -> None:
        pb = self.config.playback
        query = query.strip()
        if is_blank(query):
            # Not only "": NUL, ESC or U+3000 alone would be searched for as if they were words.
            raise BadInput(f"blank query {query!r}", user_message="Tell me what to play.")
        if _is_url(query):
            host = (split_url(query).hostname or "").lower().rstrip(".")
            allowed = pb.allowed_domains
            if allowed and not any(host == d or host.endswith("." + d) for d in allowed):
                raise BadInput(
                    f"host {host!r} not allowed",
                    user_message=(
                        "Links from that site are not allowed here. Allowed: "
                        + ", ".join(allowed[:10])
                        + "."
                    ),
                )
        elif pb.search_provider == "none" and _is_search(query):
            raise BadInput("search is off", user_message="Searching is turned off; give me a link.")

    def _check_tracks(self, tracks: list[Track], *, search: bool) -> tuple[list[Track], int]:
        """Apply the length limit; a search keeps its first result.

        Returns:
            The tracks to queue and how many were left out for being too long.
        """
        limit = self.config.playback.max_track_duration
        if search:
            tracks = tracks[:1]
        if limit <= 0:
            return tracks, 0
        fitting = [t for t in tracks if t.duration is None or not over_limit(t.duration, limit)]
        if not fitting:
            longest = max(t.duration or 0.0 for t in tracks)
            raise BadInput(
                f"track {longest}s over limit {limit}s",
                user_message=(
                    f"That is {format_time(longest)} long; the limit is {format_time(limit)}."
                ),
            )
        return fitting, len(tracks) - len(fitting)

    async def _search(self, query: str) -> list[Track]:
        return await self.resolver.resolve(query)

    async def _resolve(self, query: str, requester_id: int) -> list[Track]:
        """Resolve for a command; "shutting down" when the cog unloads under it.

        Unloading shuts the executor down: a resolve waiting for a worker is cancelled, one
        that still had to start is refused (RuntimeError). The command's own task being
        cancelled is not that, and goes on as a cancel.
        """
        if self._unloading:
            raise _unloading()
        try:
            return await self.resolver.resolve(query, requester_id=requester_id)
        except (RuntimeError, asyncio.CancelledError):
            task = asyncio.current_task()
            if not self._unloading or (task is not None and task.cancelling()):
                raise
            raise _unloading() from None

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
            joined = await self._connect(member.guild, target, _text_channel(interaction))
            note = self._restored_note(joined)
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
        query = current.strip()
        pb = self.config.playback
        if (
            len(query) < 2
            or is_blank(query)
            or not _is_search(query)
            or pb.search_provider == "none"
        ):
            return []
        budget = AUTOCOMPLETE_BUDGET - (time.monotonic() - started)
        tracks = await self._suggestions.get(query, budget)
        choices: list[app_commands.Choice[str]] = []
        for track in tracks[: pb.search_results]:
            # The value is what /play resolves again; Discord caps it at 100 characters.
            value = next(
                (v for v in (track.url, track.page_url) if v and len(v) <= 100), query[:100]
            )
            length = "live" if track.live else format_time(track.duration)
            name = safe_text(f"{track.title} · {length}", 100, markdown=False)
            choices.append(app_commands.Choice(name=name or value[:100], value=value))
        return choices

    async def _enqueue(self, interaction: Interaction, query: str, *, next_up: bool) -> None:
        member = self._member(interaction)
        channel = require_voice(member)
        session = self.session(member.guild.id)
        if session is not None:
            require_same_channel(member, session.channel)
            room = _room(session.queue)
            if room == 0:
                raise QueueFull("queue full", user_message=_full_message(session.queue))
        self._check_query(query)
        await interaction.response.defer(ephemeral=True, thinking=True)
        is_search = _is_search(query)
        tracks = await self._resolve(query, member.id)
        tracks, too_long = self._check_tracks(tracks, search=is_search)
        # While resolving, the session may have ended, or another /play may have made one.
        session = self.session(member.guild.id)
        if session is None:
            session = await self._connect(member.guild, channel, _text_channel(interaction))
        require_same_channel(member, session.channel)
        note = self._restored_note(session)
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
        first = track_title(tracks[0], _TITLE)
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

    # -- commands: transport -------------------------------------------------------------------

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
        title = track_title(seen, _TITLE)
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
        await self._say(interaction, f"Back to **{track_title(track, _TITLE)}**.")

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

    # -- commands: the queue -------------------------------------------------------------------

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
        await self._say(interaction, f"Removed **{track_title(track, _TITLE)}**.")

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
        await self._say(interaction, f"Moved **{track_title(track, _TITLE)}** to position {to}.")

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
        member = self._member(interaction)
        session = self.session(member.guild.id)
        if session is None:
            raise NotPlaying("no session", user_message="I'm not in a voice channel.")

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
            embed=embed, view=pager, allowed_mentions=_NO_MENTIONS
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
        session = self.session(member.guild.id)
        if session is None:
            raise NotPlaying("no session", user_message="I'm not in a voice channel.")
        stats = session.stats
        embed = debug_embed(stats.player, stats.voice, state=stats.state.value, track=stats.track)
        await self._say(interaction, embed=embed, ephemeral=True)

    @music_group.command(name="privacy", description="Show the voice privacy code (DAVE).")
    async def music_privacy(self, interaction: Interaction) -> None:
        member = self._member(interaction)
        session = self.session(member.guild.id)
        if session is None:
            raise NotPlaying("no session", user_message="I'm not in a voice channel.")
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


def _unloading() -> LegatoError:
    return LegatoError("the music cog is unloading", user_message=_UNLOADING)


def _span(seconds: float) -> str:
    """``90 seconds``, ``5 minutes``, ``1:30:00``: a timeout as a person says it."""
    if seconds < 120:
        return f"{seconds:g} second" + ("" if seconds == 1 else "s")
    if seconds % 60 == 0 and seconds < 7200:
        return f"{seconds / 60:g} minutes"
    return format_time(seconds)


def _interaction_log(interaction: Interaction) -> logging.Logger | GuildLogger:
    """The module's logger, with the guild in every record when the interaction has one."""
    guild_id = interaction.guild_id
    return _log if guild_id is None else guild_logger(__name__, guild_id)


def _wait(seconds: float) -> str:
    """``3 seconds``, ``5 minutes``: how long until a retry, rounded up (to minutes past two)."""
    whole = math.ceil(seconds)
    return _span(whole if whole < 120 else 60 * math.ceil(whole / 60))


def _tracks(count: int) -> str:
    return f"{count} track" + ("" if count == 1 else "s")


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
