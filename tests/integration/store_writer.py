"""A child process for tests/integration/test_store_recovery.py: writes guild state until killed.

``python -m tests.integration.store_writer DB stream``: steps 1, 2, ... each save every guild's
``step_snapshot`` (awaited: committed), print ``committed K``, then note five positions per
guild (written by the store's timer). Runs until SIGKILLed (or 60 s, as a bound).

``python -m tests.integration.store_writer DB hold``: steps 1 to 5, close (checkpointed into the
main file); reopen, steps 6 to ``HOLD_LAST``, print ``held``, then wait on stdin without closing,
so the later steps stay in the WAL when the parent kills it.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Final

from legato.store import GuildSnapshot, GuildStore, TrackRecord

GUILDS: Final = (101, 102, 103)
CHECKPOINTED: Final = 5
HOLD_LAST: Final = 30
#: Positions noted after step K's save are 10 K + 1 ... 10 K + POSITIONS.
POSITIONS: Final = 5


def step_track(n: int) -> TrackRecord:
    """The n-th track of the script."""
    return TrackRecord(
        url=f"https://example.com/{n}", title=f"t{n}", duration=600.0, requester_id=n
    )


def step_snapshot(guild_id: int, step: int) -> GuildSnapshot:
    """What a guild's state is at ``step``: every field follows from the step."""
    return GuildSnapshot(
        guild_id=guild_id,
        voice_channel_id=guild_id * 10,
        text_channel_id=guild_id * 10 + 1,
        current=step_track(step),
        position=step * 10.0,
        upcoming=tuple(step_track(step + i) for i in range(1, 1 + step % 7)),
        history=tuple(step_track(i) for i in range(max(1, step - 20), step)),
        loop=("off", "track", "queue")[step % 3],
        volume=step % 201,
        paused=step % 2 == 1,
        updated_at=1_700_000_000.0 + step,
    )


async def _step(store: GuildStore, step: int) -> None:
    await asyncio.gather(*(store.save(step_snapshot(g, step)) for g in GUILDS))


async def stream(db: Path) -> None:
    store = await GuildStore.open(db, save_interval=0.01)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    step = 0
    while loop.time() < deadline:
        step += 1
        await _step(store, step)
        print(f"committed {step}", flush=True)  # noqa: T201 - the parent reads this
        for j in range(1, POSITIONS + 1):
            for g in GUILDS:
                store.save_position(g, step * 10.0 + j)
            await asyncio.sleep(0)
    await store.close()


async def hold(db: Path) -> None:
    store = await GuildStore.open(db)
    for step in range(1, CHECKPOINTED + 1):
        await _step(store, step)
    await store.close()
    store = await GuildStore.open(db)
    for step in range(CHECKPOINTED + 1, HOLD_LAST + 1):
        await _step(store, step)
    print("held", flush=True)  # noqa: T201 - the parent reads this
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await store.close()


def main() -> None:
    db = Path(sys.argv[1])
    asyncio.run(stream(db) if sys.argv[2] == "stream" else hold(db))


if __name__ == "__main__":
    main()
