"""The music cog's memory across restarts: sessions saved to a GuildStore, restored on READY.

:class:`Persistence` looks at every live session each ``tick`` seconds. A session whose queue,
track, loop mode, volume, pause state or channels changed is saved whole (``GuildStore.save``,
committed before the next look); otherwise only its position is noted
(``GuildStore.save_position``, written every ``storage.save_interval`` seconds). Looking instead
of hooking every command keeps the cog's command code free of persistence calls, and costs a
tuple comparison per guild per tick.

After a restart (a crash included), each guild that was playing is rejoined with Legato's
voice client, its queue, loop mode and volume put back, and its track opened at the saved
position (paused while it seeks, so nothing from the start of the track is heard), then resumed
unless it was paused. The saved states are read when the store opens, before the bot logs in;
each guild is restored as soon as discord.py has it (``on_guild_available``/``on_guild_join``,
which come right after READY), all guilds at once. discord.py's own ``on_ready`` comes
``guild_ready_timeout`` (2 s by default) after the last guild, too late for the issue's
"resumed within 2 s of READY"; :meth:`Persistence.restore`, called there, only picks up what
the guild events did not (a cog loaded into a running bot). While a guild is being restored its
half-built session is not saved, so a second crash then still finds the state of the first.
yt-dlp's extractors are warmed up while the bot logs in, so that the first resolve after READY
does not spend half a second compiling their URL patterns.

A session that ends for good (``/leave``, ``/stop``, the idle or alone timer, a kick) is
forgotten with :meth:`Persistence.forget`; one that ends because the bot shuts down is not
(:meth:`Persistence.close` runs first and writes the last state).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sqlite3
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, Protocol

import discord
import yt_dlp.extractor
from discord.ext import commands

from legato.audio.player import GuildPlayer, PlayerState
from legato.audio.queue import LoopMode, TrackQueue
from legato.audio.track import Track
from legato.cogs.checks import VoiceLike
from legato.errors import LegatoError
from legato.log import guild_logger
from legato.store import GuildSnapshot, GuildStore, TrackRecord

if TYPE_CHECKING:
    from legato.audio.workers import DecodePool
    from legato.config import StorageConfig
    from legato.log import GuildLogger
    from legato.voice.client import LegatoVoiceClient

__all__ = ["Persistence", "record_of", "snapshot_of", "track_of"]

_log = logging.getLogger(__name__)

#: Seconds between looks at the sessions.
DEFAULT_TICK: Final = 0.5

_Fingerprint = tuple[object, ...]


class GuildSession(Protocol):
    """What is read of a :class:`legato.cogs.session.GuildSession` (structural, so that this
    module does not import the cog's)."""

    @property
    def guild_id(self) -> int: ...
    @property
    def voice(self) -> LegatoVoiceClient: ...
    @property
    def text_channel(self) -> discord.abc.Messageable | None: ...
    @property
    def queue(self) -> TrackQueue: ...
    @property
    def player(self) -> GuildPlayer: ...
    @property
    def closed(self) -> bool: ...
    @property
    def volume_percent(self) -> int: ...
    @property
    def log(self) -> GuildLogger: ...


class MusicCog(Protocol):
    """What is used of :class:`legato.cogs.music.MusicCog`."""

    @property
    def bot(self) -> commands.Bot: ...
    @property
    def sessions(self) -> Mapping[int, GuildSession]: ...
    @property
    def decode_pool(self) -> DecodePool | None: ...

    async def connect(
        self,
        guild: discord.Guild,
        channel: VoiceLike,
        text: discord.abc.Messageable | None,
    ) -> GuildSession: ...


#: The fields of a track the store keeps: every field of :class:`TrackRecord`, named as on
#: :class:`Track`.
_STORED: Final = tuple(f.name for f in dataclasses.fields(TrackRecord))


def record_of(track: Track) -> TrackRecord:
    """``track`` as the store keeps it (its uid is a per-process identity and is not kept)."""
    return TrackRecord(**{name: getattr(track, name) for name in _STORED})


def track_of(record: TrackRecord) -> Track:
    """A stored track as a new :class:`Track` (with a new uid)."""
    return Track(**{name: getattr(record, name) for name in _STORED})


def snapshot_of(session: GuildSession) -> GuildSnapshot:
    """The state of ``session`` now, as the store keeps it."""
    queue = session.queue
    player = session.player
    current = queue.current
    return GuildSnapshot(
        guild_id=session.guild_id,
        voice_channel_id=_id_of(session.voice.channel),
        text_channel_id=_id_of(session.text_channel),
        current=record_of(current) if current is not None else None,
        position=player.position if current is not None else 0.0,
        upcoming=tuple(record_of(t) for t in queue.upcoming),
        history=tuple(record_of(t) for t in queue.history),
        loop=queue.loop.value,
        volume=session.volume_percent,
        paused=player.state is PlayerState.PAUSED,
        updated_at=time.time(),
    )


def _warm_up(url: str, pool: DecodePool | None) -> None:
    """Get ready to restore while the bot logs in, in a worker thread: start the decode worker
    processes (a second or more, otherwise spent on the first restored track) and compile every
    yt-dlp extractor's URL pattern (a process's first resolve spends about half a second
    matching the URL against every extractor, each compiling its pattern on first use)."""
    if pool is not None:
        try:
            pool.start()
        except RuntimeError:  # closed meanwhile: the cog is unloading
            return
    for extractor in yt_dlp.extractor.gen_extractor_classes():
        extractor.suitable(url)


def _warmed_up(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        # Only the first restore is slower for it.
        _log.warning("warming up yt-dlp failed", exc_info=task.exception())


def _readable(snap: GuildSnapshot, store: GuildStore) -> bool:
    """Whether the cog can put ``snap`` back (the store does not check its loop mode)."""
    if snap.loop in {m.value for m in LoopMode}:
        return True
    _log.error(
        "guild state database %s: the row of guild %s has loop mode %r; it is left in place"
        " and not restored",
        store.path,
        snap.guild_id,
        snap.loop,
    )
    return False


def _id_of(channel: object) -> int | None:
    ident = getattr(channel, "id", None)
    return ident if isinstance(ident, int) else None


def _fingerprint(session: GuildSession) -> _Fingerprint:
    queue = session.queue
    history = queue.history
    return (
        _id_of(session.voice.channel),
        _id_of(session.text_channel),
        queue.current.uid if queue.current is not None else None,
        tuple(t.uid for t in queue.upcoming),
        history[-1].uid if history else None,
        len(history),
        queue.loop,
        session.volume_percent,
        session.player.state is PlayerState.PAUSED,
    )


class Persistence:
    """Saves a :class:`~legato.cogs.music.MusicCog`'s sessions and restores them.

    Args:
        cog: The cog whose sessions are kept.
        store: An open store; closed by :meth:`close`.
        tick: Seconds between looks at the sessions.
    """

    def __init__(self, cog: MusicCog, store: GuildStore, *, tick: float = DEFAULT_TICK) -> None:
        self.cog = cog
        self.store = store
        self.tick = tick
        self._seen: dict[int, _Fingerprint] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        #: Saved states still to restore, by guild (None until read from the store).
        self._pending: dict[int, GuildSnapshot] | None = None
        self._loading = asyncio.Lock()
        self._restoring: set[int] = set()
        self._restores: set[asyncio.Task[bool]] = set()
        self._listening = False
        self._warming: asyncio.Task[None] | None = None
        #: Guild ids resumed by :meth:`restore` (for logs and tests).
        self.resumed: list[int] = []

    @classmethod
    async def open(cls, cog: MusicCog, config: StorageConfig) -> Persistence:
        """Open the store ``config`` names and start watching ``cog``'s sessions."""
        store = await GuildStore.open(config.path, save_interval=config.save_interval)
        persistence = cls(cog, store)
        try:
            pending = await persistence._load_pending()  # before login: READY finds it read
        except BaseException:
            await store.close()
            raise
        persistence.start()
        first = next((s.current for s in pending.values() if s.current is not None), None)
        if first is not None:
            persistence._warming = asyncio.get_running_loop().create_task(
                asyncio.to_thread(_warm_up, first.url, cog.decode_pool), name="legato-warm-up"
            )
            persistence._warming.add_done_callback(_warmed_up)
        _log.info("guild state is kept in %s", store.path)
        return persistence

    def start(self) -> None:
        """Start the task that watches the sessions, and restore each guild as it arrives."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._watch(), name="legato-persistence"
            )
        if not self._listening:
            self._listening = True
            bot = self.cog.bot
            bot.add_listener(self._on_guild, "on_guild_available")
            bot.add_listener(self._on_guild, "on_guild_join")

    async def forget(self, guild_id: int) -> None:
        """Drop ``guild_id``'s saved state: its session ended for good. No-op after close."""
        if self._closed:
            return
        self._seen.pop(guild_id, None)
        await self.store.forget(guild_id)

    async def close(self) -> None:
        """Stop watching, write every live session's state as it is now, close the store."""
        if self._closed:
            return
        self._closed = True
        if self._listening:
            self._listening = False
            self.cog.bot.remove_listener(self._on_guild, "on_guild_available")
            self.cog.bot.remove_listener(self._on_guild, "on_guild_join")
        if self._warming is not None:
            self._warming.cancel()
        restores = list(self._restores)
        for task in restores:
            task.cancel()
        await asyncio.gather(*restores, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            for session in list(self.cog.sessions.values()):
                if not session.closed:
                    await self.store.save(snapshot_of(session))
        finally:
            await self.store.close()

    # -- watching -----------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            try:
                await self.save_changes()
            except (sqlite3.Error, OSError):
                _log.exception("saving guild state failed; trying again")
            await asyncio.sleep(self.tick)

    async def save_changes(self) -> None:
        """Save every session whose state changed; note every other one's position."""
        for guild_id, session in list(self.cog.sessions.items()):
            if session.closed or guild_id in self._restoring:
                continue
            mark = _fingerprint(session)
            if self._seen.get(guild_id) != mark:
                await self.store.save(snapshot_of(session))
                self._seen[guild_id] = mark
            elif session.queue.current is not None:
                self.store.save_position(guild_id, session.player.position)

    # -- restoring ----------------------------------------------------------------------------

    async def restore(self) -> list[int]:
        """Rejoin and resume every guild that was playing and is not resumed yet, all at once.

        Waits for the restores the guild events started, too. Safe to call on every READY:
        each saved state is restored once per process.

        Returns:
            The guild ids resumed so far.
        """
        if self._closed:
            return []
        pending = await self._load_pending()
        for guild_id in list(pending):
            self._restore_soon(guild_id)
        while self._restores:
            await asyncio.gather(*list(self._restores), return_exceptions=True)
        if self.resumed:
            _log.info("resumed %d guild(s) after a restart", len(self.resumed))
        return list(self.resumed)

    async def restore_guild(self, guild_id: int) -> bool:
        """Rejoin and resume ``guild_id`` if it was playing and is not resumed yet.

        Returns:
            Whether it was resumed (False: nothing saved, already done, or it failed; a
            failure is logged and its saved state kept for the next start).
        """
        if self._closed:
            return False
        pending = await self._load_pending()
        snap = pending.pop(guild_id, None)
        if snap is None:
            return False
        self._restoring.add(guild_id)
        try:
            done = await self._restore_one(snap)
        except (LegatoError, discord.DiscordException, TimeoutError) as exc:
            guild_logger(__name__, guild_id).warning("could not resume after the restart: %s", exc)
            return False
        finally:
            self._restoring.discard(guild_id)
        if done:
            self.resumed.append(guild_id)
        return done

    async def _on_guild(self, guild: discord.Guild) -> None:
        if self._pending is not None and guild.id in self._pending:
            self._restore_soon(guild.id)

    def _restore_soon(self, guild_id: int) -> None:
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(
            self.restore_guild(guild_id), name=f"legato-restore-{guild_id}"
        )
        self._restores.add(task)
        task.add_done_callback(self._restored)

    def _restored(self, task: asyncio.Task[bool]) -> None:
        self._restores.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("restoring a guild failed", exc_info=task.exception())

    async def _load_pending(self) -> dict[int, GuildSnapshot]:
        async with self._loading:
            if self._pending is None:
                snapshots = await self.store.load_all()
                self._pending = {
                    s.guild_id: s for s in snapshots if s.was_playing and _readable(s, self.store)
                }
            return self._pending

    async def _restore_one(self, snap: GuildSnapshot) -> bool:
        bot = self.cog.bot
        log = guild_logger(__name__, snap.guild_id)
        guild = bot.get_guild(snap.guild_id)
        if guild is None:
            # Kept for its on_guild_available (an outage at start-up), and in the store.
            log.warning("saved state kept: the guild is not available")
            if self._pending is not None:
                self._pending.setdefault(snap.guild_id, snap)
            return False
        channel = guild.get_channel(snap.voice_channel_id or 0)
        if not isinstance(channel, (discord.VoiceChannel, discord.StageChannel)):
            log.warning("saved state dropped: voice channel %s is gone", snap.voice_channel_id)
            await self.forget(snap.guild_id)
            return False
        text = guild.get_channel(snap.text_channel_id or 0)
        messageable = text if isinstance(text, discord.abc.Messageable) else None
        session = await self.cog.connect(guild, channel, messageable)
        if session.queue.current is not None or len(session.queue):
            return False  # someone started something meanwhile: theirs wins
        assert snap.current is not None
        room = session.queue.max_length
        tracks = [track_of(r) for r in (snap.current, *snap.upcoming)]
        if room is not None:
            tracks = tracks[: room + 1]
        session.queue.restore_history([track_of(r) for r in snap.history])
        session.queue.add(tracks[:1])
        session.queue.loop = LoopMode(snap.loop)
        await session.player.set_volume(snap.volume / 100)
        # Paused while the track opens and seeks: nothing from its start is sent.
        session.player.start()
        session.player.pause()
        session.queue.add(tracks[1:])
        if snap.position > 0:
            try:
                await session.player.seek(snap.position)
            except LegatoError as exc:
                session.log.warning("could not seek to %.1f s: %s", snap.position, exc)
        if not snap.paused:
            session.player.resume()
        session.log.info(
            "resumed %r at %.1f s after a restart (%d queued)",
            tracks[0].title,
            snap.position,
            len(tracks) - 1,
        )
        return True
