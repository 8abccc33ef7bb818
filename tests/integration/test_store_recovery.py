"""GuildStore after a SIGKILL: a child process writes guild state and is killed mid-stream.

The child is ``tests/integration/store_writer.py``; every field of a guild's state at step K
follows from K (``step_snapshot``), so a torn write would show as a field from another step.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from legato.store import GuildSnapshot, GuildStore
from tests.integration.store_writer import (
    CHECKPOINTED,
    GUILDS,
    HOLD_LAST,
    POSITIONS,
    step_snapshot,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _start(db: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.store_writer", str(db), mode],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read_until(proc: subprocess.Popen[str], wanted: str) -> list[str]:
    """Lines the child printed up to and including ``wanted``."""
    assert proc.stdout is not None
    lines: list[str] = []
    while True:
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=30)
            err = proc.stderr.read() if proc.stderr else ""
            pytest.fail(f"the writer ended ({proc.returncode}) before {wanted!r}: {err}")
        lines.append(line.strip())
        if line.strip() == wanted:
            return lines


def _kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _step_of(snap: GuildSnapshot) -> int:
    """The step a loaded snapshot claims to be, after checking every field agrees with it."""
    assert snap.current is not None
    step = int(snap.current.title[1:])
    expected = step_snapshot(snap.guild_id, step)

    def plain(s: GuildSnapshot) -> tuple[object, ...]:
        tracks = [(t.url, t.title, t.duration, t.requester_id) for t in s.upcoming + s.history]
        return (s.voice_channel_id, s.text_channel_id, tracks, s.loop, s.volume, s.paused)

    assert plain(snap) == plain(expected), f"guild {snap.guild_id}: torn state at step {step}"
    assert expected.current is not None
    assert snap.current.url == expected.current.url
    return step


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _integrity(db: Path) -> list[str]:
    raw = sqlite3.connect(db)
    try:
        return [row[0] for row in raw.execute("PRAGMA integrity_check")]
    finally:
        raw.close()


async def test_sigkill_mid_stream_keeps_every_committed_step(tmp_path: Path) -> None:
    db = tmp_path / "legato.db"
    proc = _start(db, "stream")
    try:
        lines = _read_until(proc, "committed 40")
    finally:
        _kill(proc)
    assert lines[-1] == "committed 40"

    assert _integrity(db) == ["ok"]
    store = await GuildStore.open(db)
    try:
        assert store.moved_aside == []
        loaded = await store.load_all()
    finally:
        await store.close()
    assert [s.guild_id for s in loaded] == list(GUILDS)
    for snap in loaded:
        step = _step_of(snap)
        # Nothing the child was told was committed is lost ...
        assert step >= 40
        # ... and the position belongs to that step: its save, or a position noted after it
        # and written by the timer (at most one batching window's worth of noting).
        assert step * 10.0 <= snap.position <= step * 10.0 + POSITIONS


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
async def test_damaged_wal_tail_rolls_back_to_an_intact_commit(tmp_path: Path, damage: str) -> None:
    db = tmp_path / "legato.db"
    proc = _start(db, "hold")
    try:
        _read_until(proc, "held")
    finally:
        _kill(proc)
    wal = db.with_name(db.name + "-wal")
    data = bytearray(_read(wal))
    page = int.from_bytes(data[8:12], "big")
    frame = 24 + page
    frames = (len(data) - 32) // frame
    assert frames >= 10  # steps 6..30 are in the WAL, not yet checkpointed
    cut = 32 + (frames // 2) * frame + frame // 3  # in the middle of a frame
    if damage == "truncated":
        del data[cut:]
    else:
        data[cut : cut + 64] = bytes(64 - i for i in range(64))
    _write(wal, bytes(data))

    store = await GuildStore.open(db)
    try:
        # SQLite's WAL checksums end the log at the damaged frame: the file is not corrupt,
        # the transactions after the damage are simply not there.
        assert store.moved_aside == []
        loaded = await store.load_all()
    finally:
        await store.close()
    assert _integrity(db) == ["ok"]
    assert [s.guild_id for s in loaded] == list(GUILDS)
    for snap in loaded:
        step = _step_of(snap)
        assert CHECKPOINTED <= step < HOLD_LAST
        assert snap.position == step * 10.0
