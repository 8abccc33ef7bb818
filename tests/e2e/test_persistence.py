"""``[storage]`` in a running bot: what the cog's Persistence writes, forgets and puts back.

A real discord.py bot loads Legato with storage on; the database is read from the test with a
separate read-only SQLite connection, as another process would see it. Waits are on audio
frames arriving (each one re-checks the database), never on the clock.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from legato.config import Config, PlaybackConfig, StorageConfig, VoiceConfig
from legato.sandbox.recording import Recording
from legato.sandbox.server import Sandbox
from tests.e2e.test_music_cog import MusicBot, answer, running
from tests.media import MediaServer, write_tone

pytestmark = pytest.mark.e2e

GUARD: Final = 30.0
SAVE_INTERVAL: Final = 0.2


@dataclasses.dataclass(frozen=True)
class Row:
    """One guild's row as stored."""

    current: str | None
    position: float
    upcoming: list[str]
    loop: str
    volume: int
    voice_channel_id: int | None
    paused: bool


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MediaServer]:
    root = tmp_path_factory.mktemp("persistence")
    write_tone(root / "long.ogg", container="ogg", codec="libopus", freq=440.0, seconds=60)
    write_tone(root / "next.ogg", container="ogg", codec="libopus", freq=660.0, seconds=5)
    with MediaServer(root) as server:
        yield server


def make_config(media: MediaServer, db: Path) -> Config:
    return Config(
        voice=VoiceConfig(transport="udp"),
        playback=PlaybackConfig(
            idle_timeout=0,
            leave_when_alone_after=0,
            allowed_hosts=(f"127.0.0.1:{media.port}",),
        ),
        storage=StorageConfig(enabled=True, path=str(db), save_interval=SAVE_INTERVAL),
    )


def stored(db: Path, guild_id: int) -> Row | None:
    """The guild's row now, read as another process would (read-only, committed data only)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        found = conn.execute(
            "SELECT current, position, upcoming, loop_mode, volume, voice_channel_id, paused"
            " FROM guild_state WHERE guild_id = ?",
            (guild_id,),
        ).fetchone()
    if found is None:
        return None
    current, position, upcoming, loop, volume, channel, paused = found
    return Row(
        current=json.loads(current)["url"] if current is not None else None,
        position=float(position),
        upcoming=[t["url"] for t in json.loads(upcoming)],
        loop=str(loop),
        volume=int(volume),
        voice_channel_id=channel,
        paused=bool(paused),
    )


async def until_stored(
    rec: Recording, db: Path, guild_id: int, predicate: Callable[[Row], bool]
) -> Row:
    """Wait, a frame at a time, until the guild's row satisfies ``predicate``."""
    while True:
        row = stored(db, guild_id)
        if row is not None and predicate(row):
            return row
        await rec.wait_frames(rec.frames + 1, timeout=GUARD)


def music(bot: MusicBot) -> Any:
    return bot.music


async def test_changes_are_saved_and_positions_written_as_it_plays(
    media: MediaServer, tmp_path: Path
) -> None:
    db = tmp_path / "state.db"
    config = make_config(media, db)
    long, nxt = media.url("long.ogg"), media.url("next.ogg")
    async with Sandbox(timeout=GUARD) as sb:
        gid = sb.guild.id
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        async with running(sb, config, MusicBot(config, gid)) as bot:
            assert (await answer(await alice.invoke("play", query=long))).startswith("Playing")
            rec = sb.voice_server.recording(sb.bot.id, server_id=gid)
            row = await until_stored(rec, db, gid, lambda r: r.current == long)
            assert row.voice_channel_id == sb.general.id
            assert (row.upcoming, row.loop, row.volume) == ([], "off", 100)

            # Each change is saved by the watcher on its own, no command needed to flush it.
            await answer(await alice.invoke("play", query=nxt))
            await until_stored(rec, db, gid, lambda r: r.upcoming == [nxt])
            await answer(await alice.invoke("volume", percent=70))
            await until_stored(rec, db, gid, lambda r: r.volume == 70)
            await answer(await alice.invoke("loop", mode="queue"))
            row = await until_stored(rec, db, gid, lambda r: r.loop == "queue")

            # The position moves on as it plays, written by the store's timer (no command), and
            # is never ahead of what was played.
            later = await until_stored(rec, db, gid, lambda r: r.position >= row.position + 1.0)
            player = music(bot).session(gid).player
            assert later.position <= player.position

            # A pause is a change: the watcher's next step saves the state whole, at the exact
            # position the player stopped at. (No audio while paused to wake on: the step is
            # awaited instead.)
            await answer(await alice.invoke("pause"))
            await music(bot).persistence.save_changes()
            paused = stored(db, gid)
            assert paused is not None
            assert paused.paused
            assert paused.position == player.position
            await answer(await alice.invoke("resume"))

            # /stop keeps the session (still in voice) but nothing is playing: nothing to resume.
            # (No audio after it to wake on: the watcher's own step is awaited instead.)
            await answer(await alice.invoke("stop"))
            await music(bot).persistence.save_changes()
            stopped = stored(db, gid)
            assert stopped is not None
            assert (stopped.current, stopped.upcoming) == (None, [])


async def test_ending_forgets_and_shutdown_keeps_then_restores(
    media: MediaServer, tmp_path: Path
) -> None:
    db = tmp_path / "state.db"
    config = make_config(media, db)
    long, nxt = media.url("long.ogg"), media.url("next.ogg")
    async with Sandbox(timeout=GUARD) as sb:
        gid = sb.guild.id
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        async with running(sb, config, MusicBot(config, gid)) as bot:
            await answer(await alice.invoke("play", query=long))
            rec = sb.voice_server.recording(sb.bot.id, server_id=gid)
            await until_stored(rec, db, gid, lambda r: r.current == long)
            # A session that ends for good (/leave, a timer, a kick all end it this way).
            await music(bot).end_session(gid, leave=True)
            assert stored(db, gid) is None

            # A history to restore: nxt played (skipped), then long, with nxt queued again.
            await answer(await alice.invoke("play", query=nxt))
            await answer(await alice.invoke("play", query=long))
            await answer(await alice.invoke("skip"))
            await answer(await alice.invoke("play", query=nxt))
            await answer(await alice.invoke("volume", percent=60))
            await until_stored(rec, db, gid, lambda r: r.position >= 1.0 and r.volume == 60)
        # Shutting down leaves voice but is no end for good: the last state is written.
        await sb.wait_bot_voice(None)
        kept = stored(db, gid)
        assert kept is not None
        assert (kept.current, kept.upcoming, kept.volume) == (long, [nxt], 60)
        assert kept.voice_channel_id == sb.general.id
        assert kept.position >= 1.0

        async with running(sb, config, MusicBot(config, gid)) as bot:
            assert await music(bot).persistence.restore() == [gid]
            await sb.wait_bot_voice(sb.general)
            session = music(bot).session(gid)
            assert session.player.current.url == long
            assert [t.url for t in session.queue.upcoming] == [nxt]
            assert [t.url for t in session.queue.history] == [nxt]
            assert session.volume_percent == 60
            # Opened at the saved position (a seek lands on a frame, at most 20 ms before).
            assert session.player.position >= kept.position - 0.02
            # Nothing restored twice: a later READY finds it done.
            assert await music(bot).persistence.restore() == [gid]
            assert music(bot).session(gid) is session
