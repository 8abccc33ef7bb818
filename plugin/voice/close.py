"""The close policy: what a closed voice websocket means, and what to do next (sans-I/O).

Two layers, both pure:

- :func:`close_policy` reads one close code (:data:`CLOSE_TABLE`, :data:`RESUME_REFUSALS`) into a
  :class:`CloseDecision`: resume, identify afresh, wait for a move, or stop.
  :meth:`legato.voice.protocol.VoiceGatewayCore.closed` applies it to the session it holds.
- :class:`ReconnectPolicy` turns that decision, the time and the history of the episode (how
  many sockets in a row failed, since when) into one :data:`Step` for the shell: reconnect (resume
  or not) after a delay, wait so long for a move, or give up with an error. The shell only
  carries the step out (sleeps, reconnects); it decides nothing.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from legato.errors import VoiceClosed, VoiceConnectError, VoiceError

__all__ = [
    "ABNORMAL_CLOSURE",
    "BUG_MESSAGE",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_RECONNECT",
    "CLOSE_TABLE",
    "CLOSE_UNKNOWN_MODE",
    "RESUME_REFUSALS",
    "AwaitMove",
    "CloseAction",
    "CloseDecision",
    "GiveUp",
    "Reconnect",
    "ReconnectPolicy",
    "Step",
    "close_policy",
]

#: What aiohttp reports when the TCP connection went away without a close frame.
ABNORMAL_CLOSURE: Final = 1006

#: The close code we use when *we* end a connection over a protocol violation (RFC 6455 §7.4.1).
CLOSE_PROTOCOL_ERROR: Final = 1002
#: The close code we use to drop a dead link we mean to resume: not 1000/1001, which would end
#: the session server-side (Discord's gateway guidance; discord.py uses 4000 the same way).
CLOSE_RECONNECT: Final = 4000
#: The close code we use when op4 names a mode we did not select (the server's own 4016).
CLOSE_UNKNOWN_MODE: Final = 4016


class CloseAction(enum.Enum):
    """What to do after the voice websocket closed."""

    #: Reconnect and send op7 Resume (keeps the session, and the v8 message buffer).
    RESUME = "resume"
    #: Reconnect and identify afresh: the session is gone.
    NEW_SESSION = "new_session"
    #: Stop, unless a new VOICE_SERVER_UPDATE arrives (moved to another channel or server).
    AWAIT_MOVE = "await_move"
    #: Stop for good and report the error.
    STOP = "stop"


@dataclass(frozen=True, slots=True)
class CloseDecision:
    """The policy's answer to a close: an action and why.

    Attributes:
        action: what the shell does next.
        code: the close code (None when the TCP connection dropped without one).
        reason: an operator-facing sentence (safe to log).
        user_message: a short sentence safe to show in Discord when ``action`` is STOP.
        resume_refused: the server answered op7 as a server without resume does: op7 must not
            be sent to it again (the core's ``resume_supported`` becomes False).
    """

    action: CloseAction
    code: int | None
    reason: str
    user_message: str | None = None
    resume_refused: bool = False

    def error(self) -> VoiceClosed:
        """The exception to raise or report when the connection ends here."""
        return VoiceClosed(
            self.code if self.code is not None else ABNORMAL_CLOSURE,
            self.reason,
            user_message=self.user_message,
        )


_STOP, _RESUME, _NEW, _MOVE = (
    CloseAction.STOP,
    CloseAction.RESUME,
    CloseAction.NEW_SESSION,
    CloseAction.AWAIT_MOVE,
)
BUG_MESSAGE: Final = "The voice connection failed because of a bug; it has been logged."

#: Close codes, their action and meaning. Source: PROTOCOL.md "Close codes" (Discord's voice
#: docs, discord-userdoccers) and discord.py 2.7.1 ``voice_state.py`` (1000 stops, 4014/4022
#: end the call, 4015 resumes, 4021 must not reconnect). 4001-4005, 4011, 4012 and 4020 mean we
#: sent something wrong: reconnecting would only repeat it, so they stop with the reason logged.
CLOSE_TABLE: Final[dict[int, tuple[CloseAction, str, str | None]]] = {
    1000: (_STOP, "normal closure", None),
    # RFC 6455: a message exceeded the receiver's size limit. Sent by aiohttp on our side when the
    # server's message is over legato.voice.gateway.MAX_MESSAGE_SIZE: a resume would be answered
    # with the same message (v8 replays it), so stop.
    1009: (
        _STOP,
        "message too big: a voice gateway message exceeded the size limit",
        "The voice server sent a message too large to accept.",
    ),
    4001: (_STOP, "unknown opcode: we sent an op the server does not know", BUG_MESSAGE),
    4002: (_STOP, "failed to decode payload: the server could not parse what we sent", BUG_MESSAGE),
    4003: (_STOP, "not authenticated: we sent a payload before identifying", BUG_MESSAGE),
    4004: (
        _STOP,
        "authentication failed: the voice token or session was refused",
        "The voice server refused my credentials.",
    ),
    4005: (_STOP, "already authenticated: we identified twice", BUG_MESSAGE),
    4006: (_NEW, "session no longer valid", None),
    4009: (_NEW, "session timed out", None),
    4011: (_STOP, "voice server not found", "The voice server could not be found."),
    4012: (_STOP, "unknown protocol: the server refused our transport", BUG_MESSAGE),
    4014: (
        _MOVE,
        "disconnected: kicked, moved, or the channel was deleted",
        "I was disconnected from the voice channel.",
    ),
    4015: (_RESUME, "voice server crashed", None),
    4016: (
        _STOP,
        "unknown encryption mode: the server refused our mode",
        "The voice server and I share no encryption mode.",
    ),
    4017: (
        _STOP,
        "DAVE (end-to-end encryption) is required by this channel",
        "This channel requires end-to-end encrypted voice, which I cannot do yet.",
    ),
    4020: (_STOP, "bad request: the server rejected a malformed payload", BUG_MESSAGE),
    4021: (_STOP, "rate limited: not reconnecting", "The voice server is rate limiting me."),
    4022: (_STOP, "call terminated", "The call was ended."),
}


#: Closes that answer an op7 Resume (sent, not yet answered with op9) with "identify afresh".
#: 4003: a server without op7 (Spacebar) closes anything before identify with "not
#: authenticated" (PROTOCOL.md, "Facts from running real peers"); it is the server's answer to
#: a resume, not our bug, and every later resume would get it too. 4006: the session expired
#: (Discord's documented answer, and the sandbox's); the server can still resume later sessions.
RESUME_REFUSALS: Final[dict[int, tuple[str, bool]]] = {
    4003: (
        "the server answered op7 Resume with 4003 (not authenticated): it has no resume "
        "(Spacebar); identifying afresh, and not resuming toward it again",
        True,
    ),
    4006: ("the server answered op7 Resume with 4006: session no longer valid", False),
}


def close_policy(
    code: int | None, *, resumable: bool = True, resuming: bool = False
) -> CloseDecision:
    """Decide what a close code means, from :data:`CLOSE_TABLE`.

    Args:
        code: the close code, or None when the TCP connection dropped without a close frame.
        resumable: False when there is no established session to resume (a RESUME becomes
            NEW_SESSION).
        resuming: op7 was sent and not answered yet: a code in :data:`RESUME_REFUSALS` means
            "identify afresh" (NEW_SESSION, at once) rather than what the table says.

    Returns:
        The decision. Abnormal closes (None, 1006, other 1xxx) resume; unknown 4xxx codes stop.
    """
    refusal = RESUME_REFUSALS.get(code) if resuming and code is not None else None
    if refusal is not None:
        reason, refused = refusal
        return CloseDecision(_NEW, code, reason, resume_refused=refused)
    entry = CLOSE_TABLE.get(code) if code is not None else None
    if entry is not None:
        action, reason, user_message = entry
    elif code is None or code == 1006:
        action, reason, user_message = _RESUME, "connection dropped without a close frame", None
    elif 1000 < code < 4000:
        action, reason, user_message = _RESUME, f"websocket closed with {code}", None
    else:
        action, reason = _STOP, f"unknown close code {code}"
        user_message = "The voice server closed the connection."
    if action is _RESUME and not resumable:
        action = _NEW
        reason += " (no session to resume: identifying afresh)"
    return CloseDecision(action, code, reason, user_message)


# --- after the close: the reconnect policy ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Open a new websocket after ``delay`` seconds.

    Attributes:
        resume: send op7 Resume on it (else identify afresh, with a new transport).
        delay: seconds to wait first (0: at once).
    """

    resume: bool
    delay: float


@dataclass(frozen=True, slots=True)
class AwaitMove:
    """Wait up to ``timeout`` seconds for a VOICE_SERVER_UPDATE (a move); else end with ``error``.

    When the move comes, ask :meth:`ReconnectPolicy.after_move`.
    """

    timeout: float
    error: VoiceError


@dataclass(frozen=True, slots=True)
class GiveUp:
    """End the connection with ``error``."""

    error: VoiceError


#: What the shell does after a websocket closed.
Step = Reconnect | AwaitMove | GiveUp


class ReconnectPolicy:
    """Decides, from close decisions and the time, how one connection reconnects.

    An *episode* starts at the first socket that ends after media last flowed; it ends when a
    socket reaches media again. Sockets that end without reaching media count as failures, and
    from the second one on the next connect waits an exponential, jittered backoff. An episode
    longer than ``timeout`` gives up.

    Args:
        enabled: reconnect at all; off means any close that would reconnect ends the connection.
        timeout: seconds an episode may last before giving up.
        move_timeout: after close 4014, seconds to wait for a move.
        backoff_base: first retry delay in seconds; doubles per failure.
        backoff_max: largest retry delay in seconds.
        jitter: returns the factor (0.5 to 1.0 by default) a delay is scaled by, so that many
            guilds do not retry in step; inject a fixed one to test.
    """

    def __init__(
        self,
        *,
        enabled: bool = True,
        timeout: float = 60.0,
        move_timeout: float = 5.0,
        backoff_base: float = 0.25,
        backoff_max: float = 5.0,
        jitter: Callable[[], float] | None = None,
    ) -> None:
        self.enabled = enabled
        self.timeout = timeout
        self.move_timeout = move_timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._jitter = jitter or (lambda: random.uniform(0.5, 1.0))
        #: Sockets in a row that ended without reaching media.
        self.failures = 0
        #: When the current episode started (None: media is flowing, or nothing failed yet).
        self.episode_start: float | None = None

    def socket_ended(self, now: float, *, reached_media: bool) -> None:
        """Record that a websocket ended at ``now`` (whether media flowed on it)."""
        if reached_media:
            self.failures, self.episode_start = 0, None
        else:
            self.failures += 1
        if self.episode_start is None:
            self.episode_start = now

    def backoff(self, failures: int) -> float:
        """The jittered delay before the next connect after ``failures`` failures (>= 1)."""
        delay = min(self.backoff_max, self.backoff_base * 2.0 ** (failures - 1))
        return delay * self._jitter()

    def step(self, decision: CloseDecision, now: float, *, endpoint: str) -> Step:
        """What to do after the close ``decision`` (from the gateway core), at ``now``.

        Args:
            decision: :meth:`VoiceGatewayCore.closed`'s answer for the socket that ended.
            now: the current time (seconds, monotonic).
            endpoint: the voice server, for the error message.
        """
        if decision.action is CloseAction.STOP:
            return GiveUp(decision.error())
        if decision.action is CloseAction.AWAIT_MOVE:
            return AwaitMove(self.move_timeout, decision.error())
        return self._retry(decision, now, endpoint)

    def after_move(
        self, decision: CloseDecision, now: float, *, endpoint: str
    ) -> Reconnect | GiveUp:
        """An :class:`AwaitMove` step was answered by a move at ``now``: start afresh there."""
        return self._retry(decision, now, endpoint)

    def _retry(self, decision: CloseDecision, now: float, endpoint: str) -> Reconnect | GiveUp:
        if not self.enabled:
            code = decision.code if decision.code is not None else ABNORMAL_CLOSURE
            return GiveUp(VoiceClosed(code, f"{decision.reason}; reconnect is off"))
        start = now if self.episode_start is None else self.episode_start
        elapsed = now - start
        if elapsed > self.timeout:
            return GiveUp(
                VoiceConnectError(
                    f"gave up reconnecting to {endpoint} after {elapsed:.0f} s "
                    f"(last close {decision.code}: {decision.reason})"
                )
            )
        delay = self.backoff(self.failures - 1) if self.failures > 1 else 0.0
        return Reconnect(resume=decision.action is CloseAction.RESUME, delay=delay)
