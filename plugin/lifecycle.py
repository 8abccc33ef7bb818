"""One enum and one transition table per lifecycle (STYLE.md §3).

Every long-lived object with a lifecycle (the voice client, the voice connection, the guild
player) holds a :class:`Lifecycle`: its current state, the table of moves its enum allows, and
the one method that changes it. The table is data, so it can be printed, tested and read in one
place; a move the table forbids raises :class:`~legato.errors.InvalidTransition` (a bug, never
shown to users).

The machine itself does no I/O. A sans-I/O core observes it (``on_change``) to queue events;
an asyncio shell waits on it with :meth:`Lifecycle.wait_for` instead of a set of
``asyncio.Event``\\ s, so "what state are we in" and "what are we waiting for" cannot disagree.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Final, Generic, TypeVar

from legato.errors import InvalidTransition

__all__ = ["Lifecycle", "Table", "table"]

S = TypeVar("S", bound=enum.Enum)

#: A transition table: for each state, the states it may move to.
Table = Mapping[S, frozenset[S]]

_log: Final = logging.getLogger(__name__)


def table(moves: Mapping[S, Iterable[S]]) -> dict[S, frozenset[S]]:
    """Build a :data:`Table`, insisting that every state of the enum has a row.

    A state with no row would be a state nothing can leave, silently; terminal states say so
    with an empty row.
    """
    rows = {state: frozenset(targets) for state, targets in moves.items()}
    if rows:
        members = set(type(next(iter(rows))))
        missing = members - set(rows)
        if missing:
            names = ", ".join(sorted(m.name for m in missing))
            raise ValueError(f"transition table has no row for {names}")
    return rows


class Lifecycle(Generic[S]):
    """The current state of one object, and the only place it changes.

    ``on_change(old, new, reason)`` is called after every move. Waiters (:meth:`wait_for`) are
    woken by the move that lands in one of the states they wait for.
    """

    __slots__ = ("_log", "_on_change", "_state", "_table", "_waiters")

    def __init__(
        self,
        initial: S,
        moves: Table[S],
        *,
        on_change: Callable[[S, S, str], None] | None = None,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
    ) -> None:
        self._state = initial
        self._table = moves
        self._on_change = on_change
        self._log = log or _log
        self._waiters: list[tuple[frozenset[S], asyncio.Future[S]]] = []

    @property
    def state(self) -> S:
        """The current state."""
        return self._state

    def allows(self, new: S) -> bool:
        """Tell whether the table allows a move from the current state to ``new``."""
        return new in self._table[self._state]

    def move(self, new: S, *, reason: str) -> S:
        """Move to ``new``; raise :class:`InvalidTransition` if the table forbids it.

        Returns the old state.
        """
        old = self._state
        if new not in self._table[old]:
            raise InvalidTransition(old, new)
        self._log.debug("%s -> %s (%s)", old.name, new.name, reason)
        self._state = new
        if self._waiters:
            keep: list[tuple[frozenset[S], asyncio.Future[S]]] = []
            for states, fut in self._waiters:
                if fut.done():
                    continue
                if new in states:
                    fut.set_result(new)
                else:
                    keep.append((states, fut))
            self._waiters = keep
        if self._on_change is not None:
            self._on_change(old, new, reason)
        return old

    async def wait_for(self, *states: S) -> S:
        """Return as soon as the state is one of ``states`` (at once if it already is)."""
        if self._state in states:
            return self._state
        fut: asyncio.Future[S] = asyncio.get_running_loop().create_future()
        self._waiters.append((frozenset(states), fut))
        return await fut

    def __repr__(self) -> str:
        return f"<Lifecycle {self._state.name}>"
