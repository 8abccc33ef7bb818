"""The voice gateway connection's states and the moves between them (STYLE.md §3).

One websocket session goes ``AWAITING_HELLO -> AWAITING_READY -> SELECTING_PROTOCOL ->
AWAITING_SESSION -> READY`` (or ``AWAITING_HELLO -> RESUMING -> READY`` on a resume). Losing the
socket goes to ``DISCONNECTED``, from which the shell reconnects; a close that ends the
connection for good goes to ``CLOSED``, the only terminal state.
"""

from __future__ import annotations

import enum
import logging
from typing import Final

from legato.errors import InvalidTransition

__all__ = ["ConnState", "ConnStateMachine", "is_allowed"]

_log = logging.getLogger(__name__)


class ConnState(enum.Enum):
    """Where a voice gateway connection is, named for what is true or what we wait for."""

    #: No websocket: before the first connect, and between a close and the reconnect.
    DISCONNECTED = "disconnected"
    #: The websocket is open; waiting for op8 Hello before identifying or resuming.
    AWAITING_HELLO = "awaiting_hello"
    #: op0 Identify sent; waiting for op2 Ready.
    AWAITING_READY = "awaiting_ready"
    #: op2 received; waiting for the transport to produce op1 (IP discovery, SDP offer).
    SELECTING_PROTOCOL = "selecting_protocol"
    #: op1 sent; waiting for op4 Session Description.
    AWAITING_SESSION = "awaiting_session"
    #: op4 (or op9 after a resume) received: media may flow.
    READY = "ready"
    #: op7 Resume sent; waiting for op9 Resumed.
    RESUMING = "resuming"
    #: Ended for good (we left, or a close code that forbids reconnecting).
    CLOSED = "closed"


_S = ConnState
_ALLOWED: Final[dict[ConnState, frozenset[ConnState]]] = {
    _S.DISCONNECTED: frozenset({_S.AWAITING_HELLO, _S.CLOSED}),
    _S.AWAITING_HELLO: frozenset({_S.AWAITING_READY, _S.RESUMING, _S.DISCONNECTED, _S.CLOSED}),
    _S.AWAITING_READY: frozenset({_S.SELECTING_PROTOCOL, _S.DISCONNECTED, _S.CLOSED}),
    _S.SELECTING_PROTOCOL: frozenset({_S.AWAITING_SESSION, _S.DISCONNECTED, _S.CLOSED}),
    _S.AWAITING_SESSION: frozenset({_S.READY, _S.DISCONNECTED, _S.CLOSED}),
    _S.READY: frozenset({_S.DISCONNECTED, _S.CLOSED}),
    _S.RESUMING: frozenset({_S.READY, _S.DISCONNECTED, _S.CLOSED}),
    _S.CLOSED: frozenset(),
}


def is_allowed(current: ConnState, new: ConnState) -> bool:
    """Tell whether the table allows ``current -> new``."""
    return new in _ALLOWED[current]


class ConnStateMachine:
    """Holds a :class:`ConnState`; :meth:`_transition` is the only place that changes it.

    Subclasses override :meth:`_notify` to tell the shell (the sans-I/O core queues an event;
    the asyncio shell wakes its waiters).
    """

    def __init__(self) -> None:
        self._state = ConnState.DISCONNECTED

    @property
    def state(self) -> ConnState:
        """The current state."""
        return self._state

    def _transition(self, new: ConnState, *, reason: str) -> None:
        if new not in _ALLOWED[self._state]:
            raise InvalidTransition(self._state, new)
        _log.debug("%s -> %s (%s)", self._state.name, new.name, reason)
        old = self._state
        self._state = new
        self._notify(old, new, reason)

    def _notify(self, old: ConnState, new: ConnState, reason: str) -> None:
        """Called after every transition; the base class does nothing."""
