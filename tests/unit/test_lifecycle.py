"""The generic lifecycle: the table is the only authority, waiters wake on the move."""

from __future__ import annotations

import asyncio
import enum

import pytest

from legato.errors import InvalidTransition
from legato.lifecycle import Lifecycle, table


class _Door(enum.Enum):
    SHUT = "shut"
    OPEN = "open"
    GONE = "gone"


_MOVES = table(
    {
        _Door.SHUT: {_Door.OPEN, _Door.GONE},
        _Door.OPEN: {_Door.SHUT, _Door.GONE},
        _Door.GONE: set(),
    }
)


def test_a_move_the_table_forbids_raises_and_changes_nothing() -> None:
    seen: list[tuple[_Door, _Door, str]] = []
    door = Lifecycle(_Door.SHUT, _MOVES, on_change=lambda o, n, r: seen.append((o, n, r)))
    assert door.move(_Door.OPEN, reason="push") is _Door.SHUT
    door.move(_Door.GONE, reason="burnt")
    with pytest.raises(InvalidTransition):
        door.move(_Door.OPEN, reason="again")
    assert door.state is _Door.GONE
    assert not door.allows(_Door.SHUT)
    assert seen == [(_Door.SHUT, _Door.OPEN, "push"), (_Door.OPEN, _Door.GONE, "burnt")]


def test_a_table_missing_a_state_is_refused() -> None:
    with pytest.raises(ValueError, match="no row for GONE"):
        table({_Door.SHUT: {_Door.OPEN}, _Door.OPEN: set()})


async def test_waiters_wake_on_the_move_that_lands_in_their_state() -> None:
    door = Lifecycle(_Door.SHUT, _MOVES)
    assert await door.wait_for(_Door.SHUT) is _Door.SHUT
    gone = asyncio.ensure_future(door.wait_for(_Door.GONE))
    opened = asyncio.ensure_future(door.wait_for(_Door.OPEN, _Door.GONE))
    await asyncio.sleep(0)
    door.move(_Door.OPEN, reason="push")
    assert await opened is _Door.OPEN
    assert not gone.done()
    door.move(_Door.GONE, reason="burnt")
    assert await gone is _Door.GONE
