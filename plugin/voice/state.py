"""The voice stack's lifecycles: one enum and one transition table each (STYLE.md §3).

- :class:`ConnState`: one voice gateway websocket's handshake (the sans-I/O core's).
- :class:`LinkState`: a whole voice connection (the shell's), across websockets and servers.
- :class:`ClientState`: the discord.py voice client around it (join, move, leave).

One websocket session goes ``AWAITING_HELLO -> AWAITING_READY -> SELECTING_PROTOCOL ->
AWAITING_SESSION -> READY`` (or ``AWAITING_HELLO -> RESUMING -> READY`` on a resume). Losing the
socket goes to ``DISCONNECTED``, from which the shell reconnects; a close that ends the
connection for good goes to ``CLOSED``, the only terminal state.

The sans-I/O core (:class:`legato.voice.protocol.VoiceGatewayCore`) holds one
:class:`legato.lifecycle.Lifecycle` over :data:`TRANSITIONS`. The shell's
:class:`legato.voice.gateway.VoiceConnection` outlives websockets and cores; it holds one over
:class:`LinkState` (:data:`LINK_TRANSITIONS`); the voice client one over :class:`ClientState`
(:data:`CLIENT_TRANSITIONS`).
"""

from __future__ import annotations

import enum
from typing import Final

from legato.lifecycle import table

__all__ = [
    "CLIENT_TRANSITIONS",
    "LINK_TRANSITIONS",
    "TRANSITIONS",
    "ClientState",
    "ConnState",
    "LinkState",
]


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
#: The moves :class:`ConnState` allows.
TRANSITIONS: Final = table(
    {
        _S.DISCONNECTED: {_S.AWAITING_HELLO, _S.CLOSED},
        _S.AWAITING_HELLO: {_S.AWAITING_READY, _S.RESUMING, _S.DISCONNECTED, _S.CLOSED},
        _S.AWAITING_READY: {_S.SELECTING_PROTOCOL, _S.DISCONNECTED, _S.CLOSED},
        _S.SELECTING_PROTOCOL: {_S.AWAITING_SESSION, _S.DISCONNECTED, _S.CLOSED},
        _S.AWAITING_SESSION: {_S.READY, _S.DISCONNECTED, _S.CLOSED},
        _S.READY: {_S.DISCONNECTED, _S.CLOSED},
        _S.RESUMING: {_S.READY, _S.DISCONNECTED, _S.CLOSED},
        _S.CLOSED: set(),
    }
)


class LinkState(enum.Enum):
    """Where a whole voice connection is, across websockets, transports and voice servers.

    :class:`ConnState` follows one websocket's handshake inside the sans-I/O core;
    :class:`LinkState` is what the shell (:class:`legato.voice.gateway.VoiceConnection`) and its
    callers wait on: can media flow, is it waiting for a move, has it ended.
    """

    #: Created; ``connect()`` not called yet.
    IDLE = "idle"
    #: A websocket session is being brought up (first connect, resume, or a new session): frames
    #: handed over now are dropped and counted.
    CONNECTING = "connecting"
    #: Media flows: op4 applied to the transport, or op9 after a resume.
    CONNECTED = "connected"
    #: Closed with 4014: waiting (``move_timeout``) for a VOICE_SERVER_UPDATE to follow.
    AWAITING_MOVE = "awaiting_move"
    #: ``close()`` was called: the tasks are stopping.
    CLOSING = "closing"
    #: Ended, by ``close()`` or on its own (``VoiceConnection.error`` says why).
    CLOSED = "closed"


_L = LinkState
#: The moves :class:`LinkState` allows.
LINK_TRANSITIONS: Final = table(
    {
        _L.IDLE: {_L.CONNECTING, _L.CLOSING, _L.CLOSED},
        _L.CONNECTING: {_L.CONNECTED, _L.AWAITING_MOVE, _L.CLOSING, _L.CLOSED},
        _L.CONNECTED: {_L.CONNECTING, _L.CLOSING, _L.CLOSED},
        _L.AWAITING_MOVE: {_L.CONNECTING, _L.CLOSING, _L.CLOSED},
        _L.CLOSING: {_L.CLOSED},
        _L.CLOSED: set(),
    }
)


class ClientState(enum.Enum):
    """Where a :class:`legato.voice.client.LegatoVoiceClient` is, on discord.py's side.

    discord.py feeds the two main-gateway events in no fixed order; which of them the join (or
    move) still waits for is the per-state data of ``JOINING`` and ``MOVING``.
    """

    #: The join's op4 is (being) sent: waiting for VOICE_STATE_UPDATE and VOICE_SERVER_UPDATE.
    JOINING = "joining"
    #: Both arrived: the voice connection is being brought up (inside ``connect()``).
    CONNECTING = "connecting"
    #: ``connect()`` returned. The connection may be reconnecting underneath.
    CONNECTED = "connected"
    #: ``move_to()`` sent op4: waiting for both events again (the connection then moves itself).
    MOVING = "moving"
    #: Teardown started: closing the connection, leaving the channel.
    DISCONNECTING = "disconnecting"
    #: Teardown in progress, and Discord confirmed we are out of the channel.
    LEFT_CHANNEL = "left_channel"
    #: Torn down and unregistered from discord.py.
    CLOSED = "closed"


_C = ClientState
#: The moves :class:`ClientState` allows.
CLIENT_TRANSITIONS: Final = table(
    {
        _C.JOINING: {_C.CONNECTING, _C.DISCONNECTING},
        _C.CONNECTING: {_C.CONNECTED, _C.DISCONNECTING},
        _C.CONNECTED: {_C.MOVING, _C.DISCONNECTING},
        _C.MOVING: {_C.CONNECTED, _C.MOVING, _C.DISCONNECTING},
        _C.DISCONNECTING: {_C.LEFT_CHANNEL, _C.CLOSED},
        _C.LEFT_CHANNEL: {_C.CLOSED},
        _C.CLOSED: set(),
    }
)
