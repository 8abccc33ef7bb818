"""Each guild's player state kept in SQLite, so a killed bot comes back where it was.

One database file (WAL journal, ``synchronous=NORMAL``) holds one row per guild: queue, current
track and position, loop mode, volume, channels, pause flag. The store keeps plain records
(:class:`TrackRecord`, the loop mode as its name): it knows nothing of the player's types, and
the cog maps its tracks to records and back (:mod:`legato.cogs.persist`). Every database call
runs on one writer thread (a single-thread executor that owns the connection), never on the
event loop.

Writes are batched. :meth:`GuildStore.save` puts a whole snapshot in a pending map and waits for
a group commit: while one transaction is on the writer thread, every snapshot saved meanwhile
waits and goes into the next one, and a guild saved many times before that lands is written
once. :meth:`GuildStore.save_position` is synchronous and cheap: it only notes the position, and
a timer writes every noted position each ``save_interval`` seconds (one ``UPDATE`` per guild,
however many positions were noted). A SIGKILL therefore loses at most ``save_interval`` seconds
of position and nothing that a ``save`` call returned from.

At open the file is checked (``PRAGMA quick_check``) and its ``schema_version`` read. A file that
is not a database, fails the check, or is not Legato's is moved aside to
``<name>.corrupt-<UTC timestamp>``; one written by a newer Legato to ``<name>.newer-<timestamp>``
(``-wal``/``-shm`` side files go with it). Either way an ERROR names both files and a fresh
database is created: state is never dropped silently. Older schemas are migrated in order, each
step in its own transaction.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

__all__ = [
    "DEFAULT_SAVE_INTERVAL",
    "HISTORY_LIMIT",
    "SCHEMA_VERSION",
    "GuildSnapshot",
    "GuildStore",
    "TrackRecord",
]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: The schema this code writes. Bump it and append to ``_MIGRATIONS`` together.
SCHEMA_VERSION: Final = 2
#: Seconds between writes of noted positions.
DEFAULT_SAVE_INTERVAL: Final = 1.0
#: Most history entries kept per guild; the oldest are dropped first.
HISTORY_LIMIT: Final = 50


@dataclass(frozen=True, slots=True)
class TrackRecord:
    """One track as stored: what is needed to resolve and show it again (no per-process uid).

    Attributes:
        url: What to resolve again.
        title: Display title.
        duration: Length in seconds, or ``None``.
        page_url: The page a user can open, or ``None``.
        thumbnail: Image URL or ``None``.
        requester_id: Discord user id of whoever asked for it (0 when not from a user).
        live: A live stream.
    """

    url: str
    title: str
    duration: float | None = None
    page_url: str | None = None
    thumbnail: str | None = None
    requester_id: int = 0
    live: bool = False


@dataclass(frozen=True, slots=True)
class GuildSnapshot:
    """Everything needed to put a guild's player back as it was.

    Attributes:
        guild_id: The guild.
        voice_channel_id: Channel the bot was in, ``None`` when not connected.
        text_channel_id: Channel announcements go to, or ``None``.
        current: Track playing (or paused), ``None`` when idle.
        position: Seconds into ``current``.
        upcoming: Queued tracks, next first.
        history: Finished tracks, most recent last (at most ``HISTORY_LIMIT`` are stored).
        loop: Loop mode, by name (``off``, ``track``, ``queue``; the store does not check it).
        volume: Volume in percent.
        paused: ``current`` is paused rather than playing.
        updated_at: Unix time the state was taken (``time.time()``).
    """

    guild_id: int
    voice_channel_id: int | None = None
    text_channel_id: int | None = None
    current: TrackRecord | None = None
    position: float = 0.0
    upcoming: tuple[TrackRecord, ...] = ()
    history: tuple[TrackRecord, ...] = ()
    loop: str = "off"
    volume: int = 100
    paused: bool = False
    updated_at: float = field(default_factory=time.time)

    @property
    def was_playing(self) -> bool:
        """Whether a restart should rejoin and resume: connected with a current track."""
        return self.voice_channel_id is not None and self.current is not None


# --- encoding -------------------------------------------------------------------------------


def _track_to_json(track: TrackRecord) -> dict[str, Any]:
    return {
        "url": track.url,
        "title": track.title,
        "duration": track.duration,
        "page_url": track.page_url,
        "thumbnail": track.thumbnail,
        "requester_id": track.requester_id,
        "live": track.live,
    }


def _track_from_json(data: object) -> TrackRecord:
    if not isinstance(data, dict) or not isinstance(data.get("url"), str):
        raise ValueError(f"not a track: {data!r:.200}")
    duration = data.get("duration")
    requester = data.get("requester_id", 0)
    return TrackRecord(
        url=data["url"],
        title=str(data.get("title") or data["url"]),
        duration=float(duration) if isinstance(duration, int | float) else None,
        page_url=data["page_url"] if isinstance(data.get("page_url"), str) else None,
        thumbnail=data["thumbnail"] if isinstance(data.get("thumbnail"), str) else None,
        requester_id=requester if isinstance(requester, int) else 0,
        live=data.get("live") is True,
    )


def _tracks_to_json(tracks: Sequence[TrackRecord]) -> str:
    return json.dumps([_track_to_json(t) for t in tracks], ensure_ascii=False)


def _tracks_from_json(text: str) -> tuple[TrackRecord, ...]:
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"not a track list: {text[:200]!r}")
    return tuple(_track_from_json(item) for item in data)


# --- schema ---------------------------------------------------------------------------------

_COLUMNS: Final = (
    "guild_id, voice_channel_id, text_channel_id, current, position, upcoming, history, "
    "loop_mode, volume, paused, updated_at"
)


def _migrate_0_to_1(conn: sqlite3.Connection) -> None:
    # Version 1: the whole queue (current first) in one JSON column, no history or pause flag.
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version (version) VALUES (0)")
    conn.execute(
        "CREATE TABLE guilds ("
        " guild_id INTEGER PRIMARY KEY,"
        " voice_channel_id INTEGER,"
        " text_channel_id INTEGER,"
        " tracks TEXT NOT NULL DEFAULT '[]',"
        " position REAL NOT NULL DEFAULT 0,"
        " loop_mode TEXT NOT NULL DEFAULT 'off',"
        " volume INTEGER NOT NULL DEFAULT 100)"
    )


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    # Version 2: current, upcoming and history apart; pause flag; time of the snapshot.
    conn.execute(
        "CREATE TABLE guild_state ("
        " guild_id INTEGER PRIMARY KEY,"
        " voice_channel_id INTEGER,"
        " text_channel_id INTEGER,"
        " current TEXT,"
        " position REAL NOT NULL DEFAULT 0,"
        " upcoming TEXT NOT NULL DEFAULT '[]',"
        " history TEXT NOT NULL DEFAULT '[]',"
        " loop_mode TEXT NOT NULL DEFAULT 'off',"
        " volume INTEGER NOT NULL DEFAULT 100,"
        " paused INTEGER NOT NULL DEFAULT 0,"
        " updated_at REAL NOT NULL DEFAULT 0)"
    )
    rows = conn.execute(
        "SELECT guild_id, voice_channel_id, text_channel_id, tracks, position, loop_mode, volume"
        " FROM guilds"
    ).fetchall()
    now = time.time()
    for gid, voice, text, tracks, position, loop, volume in rows:
        items = json.loads(tracks)
        if not isinstance(items, list):
            raise ValueError(f"guild {gid}: tracks is not a list")
        current = json.dumps(items[0], ensure_ascii=False) if items else None
        conn.execute(
            f"INSERT INTO guild_state ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, '[]', ?, ?, 0, ?)",
            (
                gid,
                voice,
                text,
                current,
                position,
                json.dumps(items[1:], ensure_ascii=False),
                str(loop).lower(),
                volume,
                now,
            ),
        )
    conn.execute("DROP TABLE guilds")


#: ``_MIGRATIONS[n]`` takes a database from version ``n`` to ``n + 1``; an empty file is 0.
_MIGRATIONS: Final[tuple[Callable[[sqlite3.Connection], None], ...]] = (
    _migrate_0_to_1,
    _migrate_1_to_2,
)
assert len(_MIGRATIONS) == SCHEMA_VERSION


#: SQLite's primary result codes for a damaged file and for a file that is not a database.
_SQLITE_CORRUPT: Final = 11
_SQLITE_NOTADB: Final = 26


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    """Whether ``exc`` says the file is damaged (not merely busy, locked or read-only)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    return type(exc) is sqlite3.DatabaseError


class _Unusable(Exception):
    """The file cannot be used as it is: ``kind`` is ``corrupt`` or ``newer``."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


# --- the store ------------------------------------------------------------------------------


class GuildStore:
    """Asynchronous, batched persistence of :class:`GuildSnapshot` s in one SQLite file.

    Create with :meth:`open`; close with :meth:`close`, which writes everything still pending.

    Args:
        path: The database file (its directory is created when missing).
        save_interval: Seconds between writes of positions noted by :meth:`save_position`.
        trace: Called on the writer thread with every SQL statement run (for tests and
            debugging: ``sqlite3.Connection.set_trace_callback``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        save_interval: float = DEFAULT_SAVE_INTERVAL,
        trace: Callable[[str], None] | None = None,
    ) -> None:
        if not save_interval > 0:
            raise ValueError(f"save_interval must be positive, got {save_interval}")
        self.path = Path(path)
        self.save_interval = save_interval
        self._trace = trace
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="legato-store"
        )
        self._conn: sqlite3.Connection | None = None
        self._snapshots: dict[int, GuildSnapshot] = {}
        self._positions: dict[int, tuple[float, float]] = {}
        self._lock = asyncio.Lock()
        self._generation = 0
        self._committed = 0
        self._timer: asyncio.Task[None] | None = None
        self._closed = False
        #: Files moved aside by :meth:`open` (for the operator and for tests).
        self.moved_aside: list[Path] = []

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        save_interval: float = DEFAULT_SAVE_INTERVAL,
        trace: Callable[[str], None] | None = None,
    ) -> GuildStore:
        """Open (creating, checking and migrating as needed) the database at ``path``.

        A corrupt, foreign or newer-schema file is moved aside with an ERROR log and replaced by
        a fresh database.

        Raises:
            OSError: The file or its directory cannot be created or moved.
            sqlite3.Error: Even a fresh database cannot be created there.
        """
        store = cls(path, save_interval=save_interval, trace=trace)
        try:
            await store._run(store._open_blocking)
        except BaseException:
            store._executor.shutdown(wait=False)
            raise
        return store

    # -- public API ---------------------------------------------------------------------------

    async def save(self, snapshot: GuildSnapshot) -> None:
        """Store ``snapshot`` as its guild's state; return once it is committed.

        Concurrent calls share transactions (group commit). A position noted earlier for the
        guild is superseded.
        """
        self._check_open()
        self._snapshots[snapshot.guild_id] = snapshot
        self._positions.pop(snapshot.guild_id, None)
        self._generation += 1
        await self._commit(self._generation)

    def save_position(self, guild_id: int, position: float) -> None:
        """Note ``guild_id``'s playback position; it is written within ``save_interval``.

        Cheap and synchronous: call it as often as you like. Only the latest position per guild
        is written. A position for a guild with no stored row changes nothing.
        """
        self._check_open()
        now = time.time()
        pending = self._snapshots.get(guild_id)
        if pending is not None:
            self._snapshots[guild_id] = dataclasses.replace(
                pending, position=position, updated_at=now
            )
        else:
            self._positions[guild_id] = (position, now)
        self._generation += 1
        if self._timer is None or self._timer.done():
            self._timer = asyncio.get_running_loop().create_task(
                self._flush_later(), name="legato-store-flush"
            )

    async def flush(self) -> None:
        """Write everything pending now."""
        self._check_open()
        await self._commit(self._generation)

    async def load_all(self) -> list[GuildSnapshot]:
        """Every stored guild's snapshot, pending changes included, in guild id order.

        A row that cannot be read is logged at ERROR and left in the database.
        """
        self._check_open()
        await self._commit(self._generation)
        return await self._run(self._load_blocking)

    async def forget(self, guild_id: int) -> None:
        """Delete ``guild_id``'s state (it left the guild, or was stopped for good)."""
        self._check_open()
        self._snapshots.pop(guild_id, None)
        self._positions.pop(guild_id, None)
        async with self._lock:
            await self._run(self._delete_blocking, guild_id)

    async def close(self) -> None:
        """Write everything pending, stop the timer and close the database. Idempotent."""
        if self._closed:
            return
        try:
            await self._commit(self._generation)
        finally:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._timer
                self._timer = None
            async with self._lock:
                await self._run(self._close_blocking)
            self._executor.shutdown(wait=True)

    # -- batching -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the guild store is closed")

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.save_interval)
        try:
            await self._commit(self._generation)
        except sqlite3.Error:
            _log.exception(
                "saving positions to %s failed; they are kept for the next try", self.path
            )

    async def _commit(self, generation: int) -> None:
        """Return once everything pending at ``generation`` is committed."""
        async with self._lock:
            if self._committed >= generation:
                return
            target = self._generation
            snapshots = self._snapshots
            positions = self._positions
            self._snapshots = {}
            self._positions = {}
            if not snapshots and not positions:
                self._committed = target
                return
            try:
                await self._run(self._write_blocking, list(snapshots.values()), positions)
            except BaseException:
                # Put back what is not superseded, so that a later commit writes it.
                for gid, snap in snapshots.items():
                    self._snapshots.setdefault(gid, snap)
                for gid, pos in positions.items():
                    if gid not in self._snapshots:
                        self._positions.setdefault(gid, pos)
                raise
            self._committed = target

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    # -- writer thread ------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        if self._trace is not None:
            conn.set_trace_callback(self._trace)
        return conn

    def _open_blocking(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = self._prepare()
        except _Unusable as bad:
            self._move_aside(bad)
            self._conn = self._prepare()

    def _prepare(self) -> sqlite3.Connection:
        conn = self._connect()
        try:
            self._check_and_migrate(conn)
        except _Unusable:
            conn.close()
            raise
        except sqlite3.DatabaseError as exc:
            conn.close()
            if not _is_corruption(exc):
                raise
            raise _Unusable("corrupt", f"not a usable SQLite database: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_and_migrate(self, conn: sqlite3.Connection) -> None:
        # Checked before anything is written, so that a file moved aside is as it was found.
        check = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
        if check != ["ok"]:
            raise _Unusable("corrupt", "integrity check failed: " + "; ".join(check[:5]))
        version = self._version(conn)
        if version > SCHEMA_VERSION:
            raise _Unusable(
                "newer",
                f"schema version {version} is newer than this Legato's ({SCHEMA_VERSION})",
            )
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            _log.warning("%s: journal mode is %s, not WAL", self.path, mode)
        conn.execute("PRAGMA synchronous=NORMAL")
        fresh = version == 0  # a new file is built by the same steps; that is no migration
        while version < SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            try:
                _MIGRATIONS[version](conn)
                conn.execute("UPDATE schema_version SET version = ?", (version + 1,))
                conn.execute("COMMIT")
            except (sqlite3.DatabaseError, ValueError, TypeError) as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.DatabaseError) and not _is_corruption(exc):
                    raise
                raise _Unusable(
                    "corrupt", f"migrating schema {version} to {version + 1} failed: {exc}"
                ) from exc
            if not fresh:
                _log.info("%s: migrated schema %d to %d", self.path, version, version + 1)
            version += 1

    def _version(self, conn: sqlite3.Connection) -> int:
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if "schema_version" not in tables:
            if tables:
                raise _Unusable(
                    "corrupt", f"not a Legato database (tables: {', '.join(sorted(tables))})"
                )
            return 0
        rows = conn.execute("SELECT version FROM schema_version").fetchall()
        if len(rows) != 1 or not isinstance(rows[0][0], int) or rows[0][0] < 0:
            raise _Unusable("corrupt", f"schema_version holds {rows!r:.100}")
        version: int = rows[0][0]
        return version

    def _move_aside(self, bad: _Unusable) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.{bad.kind}-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.{bad.kind}-{stamp}-{n}")
        os.replace(self.path, target)
        for suffix in ("-wal", "-shm"):
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                os.replace(side, target.with_name(target.name + suffix))
        self.moved_aside.append(target)
        _log.error(
            "guild state database %s is unusable (%s): moved it to %s and started a fresh one;"
            " saved queues in it were not restored",
            self.path,
            bad.detail,
            target,
        )

    def _write_blocking(
        self, snapshots: list[GuildSnapshot], positions: dict[int, tuple[float, float]]
    ) -> None:
        conn = self._need_conn()
        conn.execute("BEGIN")
        try:
            if snapshots:
                conn.executemany(
                    f"INSERT INTO guild_state ({_COLUMNS})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (guild_id) DO UPDATE SET"
                    " voice_channel_id = excluded.voice_channel_id,"
                    " text_channel_id = excluded.text_channel_id,"
                    " current = excluded.current, position = excluded.position,"
                    " upcoming = excluded.upcoming, history = excluded.history,"
                    " loop_mode = excluded.loop_mode, volume = excluded.volume,"
                    " paused = excluded.paused, updated_at = excluded.updated_at",
                    [_row(s) for s in snapshots],
                )
            if positions:
                conn.executemany(
                    "UPDATE guild_state SET position = ?, updated_at = ? WHERE guild_id = ?",
                    [(pos, at, gid) for gid, (pos, at) in positions.items()],
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _load_blocking(self) -> list[GuildSnapshot]:
        conn = self._need_conn()
        rows = conn.execute(f"SELECT {_COLUMNS} FROM guild_state ORDER BY guild_id").fetchall()
        out: list[GuildSnapshot] = []
        for row in rows:
            try:
                out.append(_snapshot(row))
            except (ValueError, TypeError, KeyError) as exc:
                _log.error(
                    "guild state database %s: the row of guild %s cannot be read (%s); it is"
                    " left in place and not restored",
                    self.path,
                    row[0],
                    exc,
                )
        return out

    def _delete_blocking(self, guild_id: int) -> None:
        self._need_conn().execute("DELETE FROM guild_state WHERE guild_id = ?", (guild_id,))

    def _close_blocking(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _need_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the guild store is closed")
        return self._conn


def _row(s: GuildSnapshot) -> tuple[object, ...]:
    return (
        s.guild_id,
        s.voice_channel_id,
        s.text_channel_id,
        json.dumps(_track_to_json(s.current), ensure_ascii=False) if s.current else None,
        float(s.position),
        _tracks_to_json(s.upcoming),
        _tracks_to_json(s.history[-HISTORY_LIMIT:]),
        str(s.loop),
        int(s.volume),
        1 if s.paused else 0,
        float(s.updated_at),
    )


def _snapshot(row: Sequence[Any]) -> GuildSnapshot:
    gid, voice, text, current, position, upcoming, history, loop, volume, paused, at = row
    return GuildSnapshot(
        guild_id=int(gid),
        voice_channel_id=int(voice) if voice is not None else None,
        text_channel_id=int(text) if text is not None else None,
        current=_track_from_json(json.loads(current)) if current is not None else None,
        position=float(position),
        upcoming=_tracks_from_json(upcoming),
        history=_tracks_from_json(history),
        loop=str(loop),
        volume=int(volume),
        paused=bool(paused),
        updated_at=float(at),
    )
