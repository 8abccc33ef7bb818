"""GuildStore on real SQLite files: round trip, batching, damaged and newer files, migration."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from legato.store import HISTORY_LIMIT, SCHEMA_VERSION, GuildSnapshot, GuildStore, TrackRecord


def track(n: int, **kw: object) -> TrackRecord:
    fields: dict[str, object] = {
        "url": f"https://example.com/watch?v={n}",
        "title": f"Track {n} \u266b \U0001f3b5",
        "duration": 180.0 + n,
        "page_url": f"https://example.com/p/{n}",
        "thumbnail": f"https://example.com/t/{n}.jpg",
        "requester_id": 1000 + n,
    }
    fields.update(kw)
    return TrackRecord(**fields)  # type: ignore[arg-type]  # test helper: keys are the fields


def plain(t: TrackRecord | None) -> tuple[object, ...] | None:
    """A record as a tuple of its fields."""
    if t is None:
        return None
    return (t.url, t.title, t.duration, t.page_url, t.thumbnail, t.requester_id, t.live)


def plain_snapshot(s: GuildSnapshot) -> tuple[object, ...]:
    return (
        s.guild_id,
        s.voice_channel_id,
        s.text_channel_id,
        plain(s.current),
        s.position,
        tuple(plain(t) for t in s.upcoming),
        tuple(plain(t) for t in s.history),
        s.loop,
        s.volume,
        s.paused,
        s.updated_at,
    )


def snapshot(guild_id: int, step: int = 1, **kw: object) -> GuildSnapshot:
    fields: dict[str, object] = {
        "guild_id": guild_id,
        "voice_channel_id": guild_id * 10 + 1,
        "text_channel_id": guild_id * 10 + 2,
        "current": track(step),
        "position": 12.5 + step,
        "upcoming": tuple(track(step + i) for i in range(1, 4)),
        "history": tuple(track(i) for i in range(max(0, step - 3), step)),
        "loop": "queue",
        "volume": 80 + step % 20,
        "paused": step % 2 == 0,
        "updated_at": 1_700_000_000.0 + step,
    }
    fields.update(kw)
    return GuildSnapshot(**fields)  # type: ignore[arg-type]  # test helper


class Trace:
    """Statements the writer thread ran, and an event set when a matching one runs."""

    def __init__(self) -> None:
        self.statements: list[str] = []
        self._waiters: list[tuple[str, asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._lock = threading.Lock()

    def __call__(self, sql: str) -> None:
        with self._lock:
            self.statements.append(sql)
            for prefix, loop, event in self._waiters:
                if sql.lstrip().upper().startswith(prefix):
                    loop.call_soon_threadsafe(event.set)

    def waiter(self, prefix: str) -> asyncio.Event:
        event = asyncio.Event()
        with self._lock:
            self._waiters.append((prefix.upper(), asyncio.get_running_loop(), event))
        return event

    def count(self, prefix: str) -> int:
        with self._lock:
            return sum(1 for s in self.statements if s.lstrip().upper().startswith(prefix.upper()))

    def clear(self) -> None:
        with self._lock:
            self.statements.clear()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "legato.db"


@pytest.fixture
async def store(db: Path) -> AsyncIterator[GuildStore]:
    s = await GuildStore.open(db)
    try:
        yield s
    finally:
        await s.close()


# --- round trip -----------------------------------------------------------------------------


async def test_round_trip_survives_reopen(db: Path) -> None:
    first = snapshot(1, 3)
    second = snapshot(
        2,
        7,
        voice_channel_id=None,
        text_channel_id=None,
        current=None,
        upcoming=(),
        history=(),
        loop="off",
        paused=False,
        position=0.0,
    )
    odd = snapshot(3, 4, current=track(9, duration=None, page_url=None, thumbnail=None, live=True))
    store = await GuildStore.open(db)
    for s in (first, second, odd):
        await store.save(s)
    await store.close()

    store = await GuildStore.open(db)
    try:
        loaded = await store.load_all()
    finally:
        await store.close()
    assert [plain_snapshot(s) for s in loaded] == [plain_snapshot(s) for s in (first, second, odd)]
    assert loaded[0].was_playing
    assert not loaded[1].was_playing
    assert store.moved_aside == []


async def test_save_replaces_and_forget_deletes(store: GuildStore) -> None:
    await store.save(snapshot(1, 1))
    await store.save(snapshot(1, 2, loop="track", volume=5))
    await store.save(snapshot(2, 1))
    store.save_position(2, 99.0)
    await store.forget(2)
    loaded = await store.load_all()
    assert [plain_snapshot(s) for s in loaded] == [
        plain_snapshot(snapshot(1, 2, loop="track", volume=5))
    ]


async def test_history_is_bounded_to_the_most_recent(store: GuildStore) -> None:
    history = tuple(track(i) for i in range(HISTORY_LIMIT + 30))
    await store.save(snapshot(1, history=history))
    (loaded,) = await store.load_all()
    assert [plain(t) for t in loaded.history] == [plain(t) for t in history[-HISTORY_LIMIT:]]


async def test_closed_store_refuses_calls(db: Path) -> None:
    store = await GuildStore.open(db)
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        await store.save(snapshot(1))
    with pytest.raises(RuntimeError, match="closed"):
        store.save_position(1, 1.0)


async def test_database_is_in_wal_mode(store: GuildStore, db: Path) -> None:
    await store.save(snapshot(1))
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    raw.close()


# --- batching -------------------------------------------------------------------------------


async def test_many_position_saves_become_one_update(db: Path) -> None:
    trace = Trace()
    # A long interval: only flush() writes, so the count is exact.
    store = await GuildStore.open(db, save_interval=3600, trace=trace)
    try:
        await store.save(snapshot(1))
        await store.save(snapshot(2))
        trace.clear()
        for i in range(1000):
            store.save_position(1, i / 10)
            store.save_position(2, i / 5)
        await store.flush()
        assert trace.count("BEGIN") == 1
        assert trace.count("UPDATE guild_state") == 2  # one per guild, not 2000
        assert trace.count("INSERT") == 0
        loaded = {s.guild_id: s.position for s in await store.load_all()}
        assert loaded == {1: 99.9, 2: 199.8}
    finally:
        await store.close()


async def test_concurrent_saves_share_transactions(db: Path) -> None:
    trace = Trace()
    store = await GuildStore.open(db, trace=trace)
    try:
        trace.clear()
        saves = [snapshot(g, step) for step in range(1, 11) for g in range(1, 6)]
        await asyncio.gather(*(store.save(s) for s in saves))
        # The first save commits alone; the other 49 wait for it and go in one transaction,
        # where each guild's latest snapshot is written once.
        assert trace.count("BEGIN") <= 2
        assert trace.count("INSERT INTO guild_state") <= 1 + 5
        loaded = await store.load_all()
        assert [plain_snapshot(s) for s in loaded] == [
            plain_snapshot(snapshot(g, 10)) for g in range(1, 6)
        ]
    finally:
        await store.close()


async def test_positions_are_written_by_the_timer(db: Path) -> None:
    trace = Trace()
    store = await GuildStore.open(db, save_interval=0.05, trace=trace)
    try:
        await store.save(snapshot(1))
        written = trace.waiter("UPDATE guild_state SET position")
        for i in range(100):
            store.save_position(1, 40.0 + i)
        async with asyncio.timeout(30):
            await written.wait()
        # The timer's transaction holds the store's lock until it commits; nothing else is
        # pending, so this writes nothing and only waits for that commit.
        await store.flush()
        assert trace.count("UPDATE guild_state") == 1
        with sqlite3.connect(db) as raw:
            assert raw.execute("SELECT position FROM guild_state").fetchall() == [(139.0,)]
        raw.close()
    finally:
        await store.close()


async def test_position_noted_after_a_pending_snapshot_goes_with_it(db: Path) -> None:
    trace = Trace()
    store = await GuildStore.open(db, save_interval=3600, trace=trace)
    try:
        blocked = asyncio.ensure_future(store.save(snapshot(1, 1)))
        pending = asyncio.ensure_future(store.save(snapshot(1, 2)))  # waits for the first
        await asyncio.sleep(0)
        store.save_position(1, 77.0)
        await asyncio.gather(blocked, pending)
        (loaded,) = await store.load_all()
        assert plain(loaded.current) == plain(track(2))
        assert loaded.position == 77.0
    finally:
        await store.close()


async def test_close_writes_pending_positions(db: Path) -> None:
    store = await GuildStore.open(db, save_interval=3600)
    await store.save(snapshot(1))
    store.save_position(1, 321.5)
    await store.close()
    with sqlite3.connect(db) as raw:
        assert raw.execute("SELECT position FROM guild_state").fetchall() == [(321.5,)]
    raw.close()


# --- damaged, foreign and newer files -------------------------------------------------------


def read_file(path: Path) -> bytes:
    """Small test files: reading them on the loop blocks for microseconds."""
    return path.read_bytes()


def write_file(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _assert_moved(
    store: GuildStore,
    db: Path,
    kind: str,
    original: bytes | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (moved,) = store.moved_aside
    assert moved.parent == db.parent
    assert moved.name.startswith(f"{db.name}.{kind}-")
    if original is not None:
        assert moved.read_bytes() == original
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "legato.store"]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert str(db) in message
    assert str(moved) in message
    assert "fresh" in message


async def _fresh_and_usable(store: GuildStore) -> None:
    assert await store.load_all() == []
    await store.save(snapshot(5))
    assert [s.guild_id for s in await store.load_all()] == [5]


async def _filled_database(db: Path, guilds: int = 40) -> None:
    store = await GuildStore.open(db)
    long_queue = tuple(track(i, title="x" * 200) for i in range(30))
    for g in range(1, guilds + 1):
        await store.save(snapshot(g, upcoming=long_queue))
    await store.close()


async def test_random_bytes_file_is_moved_aside(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    db.parent.mkdir(parents=True)
    original = random.Random(1).randbytes(3 * 4096)
    write_file(db, original)
    caplog.set_level(logging.ERROR, logger="legato.store")
    store = await GuildStore.open(db)
    try:
        _assert_moved(store, db, "corrupt", original, caplog)
        assert "not a usable SQLite database" in caplog.records[-1].getMessage()
        await _fresh_and_usable(store)
    finally:
        await store.close()


@pytest.mark.parametrize("damage", ["garbled-pages", "truncated"])
async def test_damaged_database_is_moved_aside(
    db: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    await _filled_database(db)
    data = bytearray(read_file(db))
    page = int.from_bytes(data[16:18], "big")
    assert len(data) >= 8 * page  # enough pages to damage some
    if damage == "garbled-pages":
        rng = random.Random(2)
        for n in (2, 4, 6):  # pages are numbered from 1; page 1 holds the header
            data[(n - 1) * page : n * page] = rng.randbytes(page)
    else:
        del data[len(data) // 2 :]
    original = bytes(data)
    write_file(db, original)
    caplog.set_level(logging.ERROR, logger="legato.store")
    store = await GuildStore.open(db)
    try:
        _assert_moved(store, db, "corrupt", original, caplog)
        await _fresh_and_usable(store)
    finally:
        await store.close()


async def test_foreign_database_is_moved_aside(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    db.parent.mkdir(parents=True)
    with sqlite3.connect(db) as raw:
        raw.execute("CREATE TABLE playlists (name TEXT)")
    raw.close()
    original = read_file(db)
    caplog.set_level(logging.ERROR, logger="legato.store")
    store = await GuildStore.open(db)
    try:
        _assert_moved(store, db, "corrupt", original, caplog)
        assert "not a Legato database (tables: playlists)" in caplog.records[-1].getMessage()
        await _fresh_and_usable(store)
    finally:
        await store.close()


async def test_newer_schema_is_moved_aside(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = await GuildStore.open(db)
    await store.save(snapshot(1))
    await store.close()
    with sqlite3.connect(db) as raw:
        raw.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 7,))
    raw.close()
    original = read_file(db)
    caplog.set_level(logging.ERROR, logger="legato.store")
    store = await GuildStore.open(db)
    try:
        _assert_moved(store, db, "newer", original, caplog)
        assert f"schema version {SCHEMA_VERSION + 7} is newer" in caplog.records[-1].getMessage()
        await _fresh_and_usable(store)
        # What was moved aside still holds the guild, for a newer Legato to pick up.
        with sqlite3.connect(store.moved_aside[0]) as raw:
            assert raw.execute("SELECT guild_id FROM guild_state").fetchall() == [(1,)]
        raw.close()
    finally:
        await store.close()


async def test_unreadable_row_is_reported_and_kept(
    store: GuildStore, db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await store.save(snapshot(1))
    await store.save(snapshot(2))
    with sqlite3.connect(db) as raw:
        raw.execute("UPDATE guild_state SET upcoming = '{not json' WHERE guild_id = 2")
    raw.close()
    caplog.set_level(logging.ERROR, logger="legato.store")
    loaded = await store.load_all()
    assert [s.guild_id for s in loaded] == [1]
    assert any("guild 2" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    with sqlite3.connect(db) as raw:
        assert raw.execute("SELECT count(*) FROM guild_state").fetchone() == (2,)
    raw.close()


# --- migration ------------------------------------------------------------------------------


def make_v1(raw: sqlite3.Connection) -> None:
    """Create a database as version 1 of the schema wrote it (literal: it must not follow the
    code)."""
    raw.executescript(
        """
        CREATE TABLE schema_version (version INTEGER NOT NULL);
        INSERT INTO schema_version VALUES (1);
        CREATE TABLE guilds (
            guild_id INTEGER PRIMARY KEY,
            voice_channel_id INTEGER,
            text_channel_id INTEGER,
            tracks TEXT NOT NULL DEFAULT '[]',
            position REAL NOT NULL DEFAULT 0,
            loop_mode TEXT NOT NULL DEFAULT 'off',
            volume INTEGER NOT NULL DEFAULT 100);
        """
    )


async def test_version_1_database_is_migrated(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    db.parent.mkdir(parents=True)
    queue = [
        {"url": "https://a.example/1", "title": "One", "duration": 60, "requester_id": 7},
        {"url": "https://a.example/2", "title": "Two"},
        {"url": "https://a.example/3", "title": "Three", "thumbnail": "https://a.example/3.png"},
    ]
    with sqlite3.connect(db) as raw:
        make_v1(raw)
        raw.execute(
            "INSERT INTO guilds VALUES (?, ?, ?, ?, ?, ?, ?)",
            (11, 111, 112, json.dumps(queue), 42.5, "queue", 70),
        )
        raw.execute("INSERT INTO guilds VALUES (12, NULL, NULL, '[]', 0, 'OFF', 100)")
    raw.close()
    caplog.set_level(logging.INFO, logger="legato.store")
    store = await GuildStore.open(db)
    try:
        assert store.moved_aside == []
        one, two = await store.load_all()
    finally:
        await store.close()
    assert plain(one.current) == ("https://a.example/1", "One", 60.0, None, None, 7, False)
    assert [plain(t) for t in one.upcoming] == [
        ("https://a.example/2", "Two", None, None, None, 0, False),
        ("https://a.example/3", "Three", None, None, "https://a.example/3.png", 0, False),
    ]
    assert (one.voice_channel_id, one.text_channel_id, one.position) == (111, 112, 42.5)
    assert (one.loop, one.volume, one.paused, one.history) == ("queue", 70, False, ())
    assert one.was_playing
    assert (two.current, two.upcoming, two.loop, two.was_playing) == (None, (), "off", False)
    assert any("migrated schema 1 to 2" in r.getMessage() for r in caplog.records)
    with sqlite3.connect(db) as raw:
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = raw.execute("SELECT version FROM schema_version").fetchall()
    raw.close()
    assert tables == {"schema_version", "guild_state"}
    assert version == [(SCHEMA_VERSION,)]


async def test_new_database_is_not_reported_as_migrated(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="legato.store")
    store = await GuildStore.open(db)
    await store.close()
    assert not any("migrated" in r.getMessage() for r in caplog.records)
    with sqlite3.connect(db) as raw:
        version = raw.execute("SELECT version FROM schema_version").fetchall()
    raw.close()
    assert version == [(SCHEMA_VERSION,)]


async def test_failed_migration_moves_the_file_aside(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db.parent.mkdir(parents=True)
    with sqlite3.connect(db) as raw:
        make_v1(raw)
        raw.execute("INSERT INTO guilds VALUES (11, 1, 2, '{\"not\": \"a list\"}', 0, 'off', 1)")
    raw.close()
    caplog.set_level(logging.ERROR, logger="legato.store")
    store = await GuildStore.open(db)
    try:
        # The failed step was rolled back: the file moved aside still holds the version 1 data.
        _assert_moved(store, db, "corrupt", None, caplog)
        assert "migrating schema 1 to 2 failed" in caplog.records[-1].getMessage()
        with sqlite3.connect(store.moved_aside[0]) as raw:
            assert raw.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
            assert raw.execute("SELECT guild_id FROM guilds").fetchall() == [(11,)]
        raw.close()
        await _fresh_and_usable(store)
    finally:
        await store.close()
