"""The music cog's memory across restarts: sessions saved to a GuildStore, restored on READY.

:class:`Persistence` looks at every live session each ``tick`` seconds. A session whose queue,
track, loop mode, volume, pause state or channels changed is saved whole (``GuildStore.save``,
committed before the next look); otherwise only its position is noted
(``GuildStore.save_position``, written every ``storage.save_interval`` seconds). Looking instead
of hooking every command keeps the cog's command code free of persistence calls, and costs a
tuple comparison per guild per tick.

After a restart (a crash included), :meth:`Persistence.restore` runs once on the first READY:
each guild that was playing is rejoined with Legato's voice client, its queue, loop mode and
volume put back, and its track opened at the saved position (paused while it seeks, so nothing
from the start of the track is heard), then resumed unless it was paused.

A session that ends for good (``/leave``, ``/stop``, the idle or alone timer, a kick) is
forgotten with :meth:`Persistence.forget`; one that ends because the bot shuts down is not
(:meth:`Persistence.close` runs first and writes the last state).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, Protocol

import discord
from discord.ext import commands

from legato.audio.player import GuildPlayer, PlayerState
from legato.audio.queue import TrackQueue
from legato.cogs.checks import VoiceLike
from legato.errors import LegatoError
from legato.log import guild_logger
from legato.store import GuildSnapshot, GuildStore

if TYPE_CHECKING:
    from legato.config import StorageConfig
    from legato.log import GuildLogger
    from legato.voice.client import LegatoVoiceClient

__all__ = ["Persistence", "snapshot_of"]

_log = logging.getLogger(__name__)

#: Seconds between looks at the sessions.
DEFAULT_TICK: Final = 0.5

_Fingerprint = tuple[object, ...]


class GuildSession(Protocol):
    """What is read of a :class:`legato.cogs.music.GuildSession` (structural, so that this
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

    async def _connect(
        self,
        guild: discord.Guild,
        channel: VoiceLike,
        text: discord.abc.Messageable | None,
    ) -> GuildSession: ...


def snapshot_of(session: GuildSession) -> GuildSnapshot:
    """The state of ``session`` now, as the store keeps it."""
    queue = session.queue
    player = session.player
    return GuildSnapshot(
        guild_id=session.guild_id,
        voice_channel_id=_id_of(session.voice.channel),
        text_channel_id=_id_of(session.text_channel),
        current=queue.current,
        position=player.position if queue.current is not None else 0.0,
        upcoming=tuple(queue.upcoming),
        history=tuple(queue.history),
        loop=queue.loop,
        volume=session.volume_percent,
        paused=player.state is PlayerState.PAUSED,
        updated_at=time.time(),
    )


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
        self._restored = False
        self._closed = False
        #: Guild ids resumed by :meth:`restore` (for logs and tests).
        self.resumed: list[int] = []

    @classmethod
    async def open(cls, cog: MusicCog, config: StorageConfig) -> Persistence:
        """Open the store ``config`` names and start watching ``cog``'s sessions."""
        store = await GuildStore.open(config.path, save_interval=config.save_interval)
        persistence = cls(cog, store)
        persistence.start()
        _log.info("guild state is kept in %s", store.path)
        return persistence

    def start(self) -> None:
        """Start the task that watches the sessions."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._watch(), name="legato-persistence"
            )

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
            if session.closed:
                continue
            mark = _fingerprint(session)
            if self._seen.get(guild_id) != mark:
                await self.store.save(snapshot_of(session))
                self._seen[guild_id] = mark
            elif session.queue.current is not None:
                self.store.save_position(guild_id, session.player.position)

    # -- restoring ----------------------------------------------------------------------------

    async def restore(self) -> list[int]:
        """Rejoin and resume every guild that was playing; runs once per process.

        Returns:
            The guild ids resumed.
        """
        if self._restored or self._closed:
            return []
        self._restored = True
        snapshots = await self.store.load_all()
        for snap in snapshots:
            if not snap.was_playing:
                continue
            try:
                if await self._restore_one(snap):
                    self.resumed.append(snap.guild_id)
            except (LegatoError, discord.DiscordException, TimeoutError) as exc:
                guild_logger(__name__, snap.guild_id).warning(
                    "could not resume after the restart: %s", exc
                )
        if self.resumed:
            _log.info("resumed %d guild(s) after a restart", len(self.resumed))
        return list(self.resumed)

    async def _restore_one(self, snap: GuildSnapshot) -> bool:
        bot = self.cog.bot
        log = guild_logger(__name__, snap.guild_id)
        guild = bot.get_guild(snap.guild_id)
        if guild is None:
            log.warning("saved state kept: the guild is not available")
            return False
        channel = guild.get_channel(snap.voice_channel_id or 0)
        if not isinstance(channel, (discord.VoiceChannel, discord.StageChannel)):
            log.warning("saved state dropped: voice channel %s is gone", snap.voice_channel_id)
            await self.forget(snap.guild_id)
            return False
        text = guild.get_channel(snap.text_channel_id or 0)
        messageable = text if isinstance(text, discord.abc.Messageable) else None
        session = await self.cog._connect(guild, channel, messageable)
        if session.queue.current is not None or len(session.queue):
            return False  # someone started something meanwhile: theirs wins
        assert snap.current is not None
        room = session.queue.max_length
        tracks = [snap.current, *snap.upcoming]
        if room is not None:
            tracks = tracks[: room + 1]
        session.queue.add(tracks[:1])
        session.queue.loop = snap.loop
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
            snap.current.title,
            snap.position,
            len(tracks) - 1,
        )
        return True
