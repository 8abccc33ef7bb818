"""DAVE (Discord's audio and video end-to-end encryption), client side, sans-I/O.

:class:`DaveClient` drives a ``davey.DaveSession`` from the voice gateway's DAVE ops and says what
to send back; it never touches a socket or a clock. The shell feeds it the JSON ops 21, 22, 24
(:meth:`~DaveClient.receive_json`) and the binary ops 25-30 (:meth:`~DaveClient.receive_binary`),
sends the :class:`SendJson` / :class:`SendBinary` items they return, and passes every outgoing
Opus frame through :meth:`~DaveClient.encrypt` before RTP, on either transport.

The protocol (https://daveprotocol.com, discord.py 2.7.1 ``gateway.py``/``voice_state.py``):

- op0 identify carries ``max_dave_protocol_version``; op4 answers ``dave_protocol_version``
  (:meth:`~DaveClient.start`). Above 0 the client makes an MLS session and sends its key package
  (op26). op25 names the server's external sender. op27 carries proposals (append or revoke);
  if they leave something to commit the client answers op28 (commit, then welcome if any).
- op29 announces the commit the server chose, op30 welcomes a new member; both carry a
  ``transition_id``. The client answers op23 "transition ready"; the server's op22 executes
  it. ``transition_id`` 0 means "applies at once" and is not acknowledged.
- op21 prepares a transition to another protocol version (0: downgrade to plaintext), op24
  ``epoch: 1`` starts a new group (the upgrade back, or a fresh group after a reset).
- A commit or welcome that cannot be processed is reported with op31 and the session starts
  over with a fresh key package.

When frames are encrypted: only while the *executed* protocol version is above 0, which changes
exactly when op22 executes a transition (or at once for transition 0); an upgrade starts
encrypting and a downgrade stops at the server's execute, not before. Plaintext goes out only
where the protocol has receivers accept it: with DAVE off (op4 said 0), and in a downgrade's
window (from its execute until the upgrade's). A new session that negotiated DAVE sends no media
until the first transition into the group executes: :attr:`~DaveClient.media_allowed` says when
a frame may go out, and the sender (the player) holds its track until then.

Keys switch at the execute too: davey installs the new epoch's sender key the moment it
processes a commit or welcome, so the client keeps an op29/op30 until its op22 and processes it
then (op23 is answered on arrival). Receivers install the new key when they process the commit
and keep the previous ratchet for ten seconds (``transition_expiry``), so frames on either side
of a rekey decrypt: a member joining or leaving is not an audible gap. A commit or welcome that
fails at the execute is answered with op31 then.

A frame handed to :meth:`~DaveClient.encrypt` while media is not allowed (negotiated but not in
the group yet, or rejoining after op31 or op24) is replaced by Opus silence (``F8 FF FE``, which
DAVE passes in the clear) and counted as withheld, never sent as plaintext; so are frames davey
fails to encrypt.

Malformed input (short frames, bad JSON fields, MLS bytes davey rejects) is counted in
:attr:`DaveClient.stats`; nothing raises out of the receive methods. An op22 that overtakes its
op29/op30/op21 is remembered and executed as soon as the transition is prepared.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

import davey

_log = logging.getLogger(__name__)

OP_PREPARE_TRANSITION: Final = 21
OP_EXECUTE_TRANSITION: Final = 22
OP_TRANSITION_READY: Final = 23
OP_PREPARE_EPOCH: Final = 24
OP_MLS_EXTERNAL_SENDER: Final = 25
OP_MLS_KEY_PACKAGE: Final = 26
OP_MLS_PROPOSALS: Final = 27
OP_MLS_COMMIT_WELCOME: Final = 28
OP_MLS_ANNOUNCE_COMMIT_TRANSITION: Final = 29
OP_MLS_WELCOME: Final = 30
OP_MLS_INVALID_COMMIT_WELCOME: Final = 31

#: The highest DAVE protocol version davey speaks (1), for op0's ``max_dave_protocol_version``.
MAX_PROTOCOL_VERSION: Final[int] = int(davey.DAVE_PROTOCOL_VERSION)
#: Opus silence; DAVE sends it unencrypted (https://daveprotocol.com/#silence-packets).
OPUS_SILENCE: Final = b"\xf8\xff\xfe"
#: Receivers accept plaintext this long after an upgrade executes (libdave's default).
PASSTHROUGH_EXPIRY_UPGRADE: Final = 10
#: ...and this long when a downgrade is only prepared (discord.py 2.7.1 uses 120 s).
PASSTHROUGH_EXPIRY_DOWNGRADE: Final = 120
_U16: Final = 0xFFFF
#: How many out-of-order executes are remembered.
_EARLY_EXECUTES: Final = 16


class MalformedDaveFrame(ValueError):
    """A binary DAVE frame too short for its header."""


def parse_server_binary(data: bytes) -> tuple[int, int, bytes]:
    """Split a server binary frame ``[u16 seq][u8 op][payload]``.

    Args:
        data: the websocket message.

    Returns:
        ``(seq, op, payload)``.

    Raises:
        MalformedDaveFrame: fewer than three bytes.
    """
    if len(data) < 3:
        raise MalformedDaveFrame(f"binary frame of {len(data)} bytes")
    return int.from_bytes(data[:2], "big"), data[2], bytes(data[3:])


def pack_client_binary(op: int, payload: bytes) -> bytes:
    """Build a client binary frame ``[u8 op][payload]`` (clients send no sequence number)."""
    return bytes([op]) + payload


@dataclass(frozen=True, slots=True)
class SendJson:
    """Send ``{"op": op, "d": data}`` on the voice websocket."""

    op: int
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SendBinary:
    """Send a binary frame ``[u8 op][payload]`` (see :func:`pack_client_binary`)."""

    op: int
    payload: bytes

    def frame(self) -> bytes:
        """The bytes on the wire."""
        return pack_client_binary(self.op, self.payload)


DaveOutput = SendJson | SendBinary


@dataclass(slots=True)
class DaveStats:
    """Counters; every failure the receive methods swallow lands in one of them."""

    #: Binary/JSON payloads too short or with missing or mistyped fields.
    malformed: int = 0
    #: External sender packages davey refused.
    bad_external_sender: int = 0
    #: Proposal batches davey refused (op27).
    bad_proposals: int = 0
    #: Commits (op29) and welcomes (op30) davey refused; each is answered with op31.
    invalid_commits: int = 0
    invalid_welcomes: int = 0
    #: op22 for a transition not prepared yet (out of order): executed once it is.
    unknown_transitions: int = 0
    #: op31 sent followed by a fresh key package.
    recoveries: int = 0
    commits_sent: int = 0
    transitions_executed: int = 0
    encrypted_frames: int = 0
    #: Frames sent as they are: DAVE off, or in a downgrade's window (protocol version 0).
    passthrough_frames: int = 0
    #: Frames replaced by silence because media was not allowed: DAVE negotiated but the group
    #: not in force yet, or no group key (rejoining). A sender that waits for
    #: :attr:`DaveClient.media_allowed` never causes one.
    withheld_frames: int = 0
    #: Frames davey failed to encrypt, replaced by silence.
    encrypt_failures: int = 0


class DaveSessionLike(Protocol):
    """The part of ``davey.DaveSession`` this module uses (a seam for tests and benches)."""

    @property
    def ready(self) -> bool: ...

    @property
    def voice_privacy_code(self) -> str | None: ...

    @property
    def epoch(self) -> int | None: ...

    def reinit(self, protocol_version: int, user_id: int, channel_id: int) -> None: ...

    def reset(self) -> None: ...

    def set_external_sender(self, external_sender_data: bytes) -> None: ...

    def get_serialized_key_package(self) -> bytes: ...

    def process_proposals(self, operation_type: Any, proposals: bytes) -> Any: ...

    def process_commit(self, commit: bytes) -> None: ...

    def process_welcome(self, welcome: bytes) -> None: ...

    def encrypt_opus(self, packet: bytes) -> bytes: ...

    def decrypt(self, user_id: int, media_type: Any, packet: bytes) -> bytes: ...

    def set_passthrough_mode(
        self, passthrough_mode: bool, transition_expiry: int | None = None
    ) -> None: ...


SessionFactory = Callable[[int, int, int], DaveSessionLike]


def _davey_session(protocol_version: int, user_id: int, channel_id: int) -> DaveSessionLike:
    session: DaveSessionLike = davey.DaveSession(protocol_version, user_id, channel_id)
    return session


class _BadPayload(ValueError):
    pass


def _field(data: object, key: str, *, hi: int = _U16) -> int:
    if not isinstance(data, Mapping):
        raise _BadPayload(f"payload is {type(data).__name__}, expected an object")
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= hi:
        raise _BadPayload(f"{key} is {value!r}")
    return value


class DaveClient:
    """One voice connection's DAVE state: the MLS session, pending transitions, encryption.

    Args:
        user_id: the bot's user id (the MLS credential).
        channel_id: the voice channel id (the MLS group id).
        max_protocol_version: what op0 offers; 0 turns DAVE off.
        session_factory: builds the session; ``davey.DaveSession`` by default.
        apply_at_execute: keep op29/op30 until op22 (a sender switches keys at the execute).
            A member that only receives (the sandbox's listener) applies them on arrival, so
            it can decrypt senders that switch early (discord.py 2.7.1 does).
    """

    def __init__(
        self,
        user_id: int,
        channel_id: int,
        *,
        max_protocol_version: int = MAX_PROTOCOL_VERSION,
        session_factory: SessionFactory = _davey_session,
        apply_at_execute: bool = True,
    ) -> None:
        self.user_id = user_id
        self.channel_id = channel_id
        self.max_protocol_version = max_protocol_version
        self.stats = DaveStats()
        self._factory = session_factory
        self._apply_at_execute = apply_at_execute
        self._session: DaveSessionLike | None = None
        #: The version the MLS session was made for (op4, op24).
        self._session_version = 0
        #: The version frames are sent with; changes only when a transition executes.
        self._version = 0
        self._pending: dict[int, int] = {}
        self._executed_early: list[int] = []
        #: Commits/welcomes (op, body) waiting for their transition's execute.
        self._deferred: dict[int, tuple[int, bytes]] = {}
        self._downgraded = False

    # -- state ------------------------------------------------------------------------------

    @property
    def protocol_version(self) -> int:
        """The executed DAVE protocol version (0: frames go out as they are)."""
        return self._version

    @property
    def session(self) -> DaveSessionLike | None:
        """The MLS session, once op4 or op24 asked for one."""
        return self._session

    @property
    def encrypting(self) -> bool:
        """Whether :meth:`encrypt` encrypts right now."""
        return self._version > 0 and self._session is not None and self._session.ready

    @property
    def media_allowed(self) -> bool:
        """Whether a media frame may go out now without breaking end-to-end encryption.

        True with DAVE off, while frames are encrypted, and in a downgrade's plaintext window
        (executed version 0 after a downgrade, until the upgrade executes). False while DAVE is
        negotiated but the group is not in force for us: a new session before its first
        transition executes, or between groups (after op31 or op24 at a version above 0).
        """
        if self._version > 0:
            return self._session is not None and self._session.ready
        return self._session_version == 0 or self._downgraded

    @property
    def privacy_code(self) -> str | None:
        """The voice privacy code users compare (30 digits), or None without an active group."""
        if self._version == 0 or self._session is None:
            return None
        return self._session.voice_privacy_code

    @property
    def pending_transitions(self) -> dict[int, int]:
        """Prepared transitions: ``transition_id -> protocol_version`` (a copy)."""
        return dict(self._pending)

    # -- inputs -----------------------------------------------------------------------------

    def start(self, protocol_version: int) -> list[DaveOutput]:
        """Apply op4's ``dave_protocol_version`` (a new voice session, not a resume).

        Args:
            protocol_version: what the server chose; 0 means no DAVE.

        Returns:
            The key package (op26) when DAVE is on.
        """
        self._pending.clear()
        self._executed_early.clear()
        self._deferred.clear()
        # Plaintext until the server executes the first transition into the group.
        self._version = 0
        self._downgraded = False
        return self._prepare_session(protocol_version)

    def receive_json(self, op: int, data: object) -> list[DaveOutput]:
        """Feed a JSON DAVE op (21, 22, 24; anything else is ignored). Never raises."""
        try:
            if op == OP_PREPARE_TRANSITION:
                return self._on_prepare_transition(
                    _field(data, "transition_id"), _field(data, "protocol_version")
                )
            if op == OP_EXECUTE_TRANSITION:
                return self._on_execute_transition(_field(data, "transition_id"))
            if op == OP_PREPARE_EPOCH:
                return self._on_prepare_epoch(
                    _field(data, "epoch", hi=2**64 - 1), _field(data, "protocol_version")
                )
        except _BadPayload as exc:
            self.stats.malformed += 1
            _log.warning("DAVE op%d malformed: %s", op, exc)
            return []
        _log.debug("DAVE op%d ignored", op)
        return []

    def receive_binary(self, op: int, payload: bytes) -> list[DaveOutput]:
        """Feed a binary DAVE op (25, 27, 29, 30) without its ``[seq][op]`` header.

        Never raises: MLS failures are counted, and a failed commit or welcome is answered
        with op31 and a fresh key package.
        """
        session = self._session
        if session is None:
            _log.debug("DAVE op%d without a session", op)
            return []
        if op == OP_MLS_EXTERNAL_SENDER:
            try:
                session.set_external_sender(payload)
            except ValueError as exc:
                self.stats.bad_external_sender += 1
                _log.warning("DAVE external sender refused: %s", exc)
            return []
        if op == OP_MLS_PROPOSALS:
            return self._on_proposals(session, payload)
        if op in (OP_MLS_ANNOUNCE_COMMIT_TRANSITION, OP_MLS_WELCOME):
            if len(payload) < 2:
                self.stats.malformed += 1
                return []
            transition_id = int.from_bytes(payload[:2], "big")
            return self._on_commit_or_welcome(session, op, transition_id, payload[2:])
        _log.debug("DAVE binary op%d ignored", op)
        return []

    # -- media ------------------------------------------------------------------------------

    def encrypt(self, opus: bytes) -> bytes:
        """Encrypt one Opus frame for RTP, or pass it through when DAVE is not in force.

        Args:
            opus: one Opus packet (also pre-encoded passthrough frames).

        Returns:
            The DAVE frame; the frame itself where plaintext is allowed (DAVE off, a
            downgrade's window; and Opus silence, which DAVE never encrypts); Opus silence
            when media is not allowed (see :attr:`media_allowed`) or encryption failed: never
            the plaintext while DAVE is negotiated and its group not in force.
        """
        # media_allowed, inlined: this runs for every frame.
        session = self._session
        if self._version == 0:
            if self._session_version == 0 or self._downgraded:
                self.stats.passthrough_frames += 1
                return opus
            return self._withhold(opus)
        if session is None or not session.ready:
            return self._withhold(opus)
        try:
            out = session.encrypt_opus(opus)
        except ValueError as exc:
            self.stats.encrypt_failures += 1
            _log.debug("DAVE encrypt failed: %s", exc)
            return OPUS_SILENCE
        self.stats.encrypted_frames += 1
        return out

    def _withhold(self, opus: bytes) -> bytes:
        # DAVE is negotiated but we are not in its group (yet, or between groups): Discord's
        # receivers drop plaintext here, and it would leak the audio.
        if opus != OPUS_SILENCE:
            self.stats.withheld_frames += 1
        return OPUS_SILENCE

    # -- handlers ---------------------------------------------------------------------------

    def _prepare_session(self, protocol_version: int) -> list[DaveOutput]:
        self._session_version = protocol_version
        if protocol_version == 0:
            if self._session is not None:
                self._session.reset()
                self._session.set_passthrough_mode(True, PASSTHROUGH_EXPIRY_UPGRADE)
            return []
        if self._session is None:
            self._session = self._factory(protocol_version, self.user_id, self.channel_id)
        else:
            self._session.reinit(protocol_version, self.user_id, self.channel_id)
        return [SendBinary(OP_MLS_KEY_PACKAGE, self._session.get_serialized_key_package())]

    def _on_prepare_transition(self, transition_id: int, protocol_version: int) -> list[DaveOutput]:
        if protocol_version == 0 and transition_id != 0 and self._session is not None:
            # Others may start sending plaintext before the execute reaches us.
            self._session.set_passthrough_mode(True, PASSTHROUGH_EXPIRY_DOWNGRADE)
        return self._prepared(transition_id, protocol_version)

    def _on_execute_transition(self, transition_id: int) -> list[DaveOutput]:
        if transition_id not in self._pending:
            # Out of order: the execute overtook its prepare/commit. Remember it and execute
            # as soon as the transition is prepared, instead of waiting for an op22 that
            # already came.
            self.stats.unknown_transitions += 1
            _log.warning("DAVE execute for unprepared transition %d", transition_id)
            self._executed_early.append(transition_id)
            del self._executed_early[:-_EARLY_EXECUTES]
            return []
        return self._execute(transition_id)

    def _prepared(self, transition_id: int, protocol_version: int) -> list[DaveOutput]:
        self._pending[transition_id] = protocol_version
        if transition_id == 0:
            return self._execute(0)
        out: list[DaveOutput] = [SendJson(OP_TRANSITION_READY, {"transition_id": transition_id})]
        if transition_id in self._executed_early:
            self._executed_early.remove(transition_id)
            out += self._execute(transition_id)
        return out

    def _execute(self, transition_id: int) -> list[DaveOutput]:
        deferred = self._deferred.pop(transition_id, None)
        version = self._pending.pop(transition_id)
        if deferred is not None and self._session is not None:
            failure = self._apply(self._session, *deferred, transition_id)
            if failure is not None:
                return failure
        old = self._version
        self._version = version
        self.stats.transitions_executed += 1
        if version == 0 and old != 0:
            self._downgraded = True
            _log.info("DAVE downgraded to plaintext (transition %d)", transition_id)
        elif version > 0 and self._downgraded:
            self._downgraded = False
            if self._session is not None:
                # Plaintext still in flight from others is accepted for a few more seconds.
                # The new group's decryptors start with passthrough off, and turning it off
                # only ever shortens a window: open it, then let it expire.
                self._session.set_passthrough_mode(True)
                self._session.set_passthrough_mode(False, PASSTHROUGH_EXPIRY_UPGRADE)
            _log.info("DAVE upgraded to protocol %d (transition %d)", version, transition_id)
        else:
            _log.debug("DAVE transition %d executed (protocol %d)", transition_id, version)
        return []

    def _on_prepare_epoch(self, epoch: int, protocol_version: int) -> list[DaveOutput]:
        if epoch != 1:
            return []
        # epoch 1: a new group for protocol_version (the upgrade path, or a group restart).
        self._deferred.clear()
        return self._prepare_session(protocol_version)

    def _on_proposals(self, session: DaveSessionLike, payload: bytes) -> list[DaveOutput]:
        if not payload or payload[0] not in (0, 1):
            self.stats.malformed += 1
            return []
        kind = (
            davey.ProposalsOperationType.append
            if payload[0] == 0
            else davey.ProposalsOperationType.revoke
        )
        try:
            result = session.process_proposals(kind, payload[1:])
        except ValueError as exc:
            self.stats.bad_proposals += 1
            _log.warning("DAVE proposals refused: %s", exc)
            return []
        if result is None:
            return []
        self.stats.commits_sent += 1
        commit: bytes = result.commit
        welcome: bytes | None = result.welcome
        return [SendBinary(OP_MLS_COMMIT_WELCOME, commit + (welcome or b""))]

    def _on_commit_or_welcome(
        self, session: DaveSessionLike, op: int, transition_id: int, body: bytes
    ) -> list[DaveOutput]:
        if transition_id == 0 or not self._apply_at_execute:
            failure = self._apply(session, op, body, transition_id)
            if failure is not None:
                return failure
        else:
            # Applied when op22 executes it: davey installs the new sender key the moment it
            # processes a commit or welcome, and the others switch at the execute.
            self._deferred[transition_id] = (op, body)
        return self._prepared(transition_id, self._session_version)

    def _apply(
        self, session: DaveSessionLike, op: int, body: bytes, transition_id: int
    ) -> list[DaveOutput] | None:
        """Process a commit or welcome; on failure the op31 recovery to send."""
        try:
            if op == OP_MLS_ANNOUNCE_COMMIT_TRANSITION:
                session.process_commit(body)
            else:
                session.process_welcome(body)
        except ValueError as exc:
            if op == OP_MLS_ANNOUNCE_COMMIT_TRANSITION:
                self.stats.invalid_commits += 1
            else:
                self.stats.invalid_welcomes += 1
            _log.warning("DAVE op%d for transition %d refused: %s", op, transition_id, exc)
            return self._recover(transition_id)
        return None

    def _recover(self, transition_id: int) -> list[DaveOutput]:
        self.stats.recoveries += 1
        self._pending.pop(transition_id, None)
        self._deferred.clear()
        out: list[DaveOutput] = [
            SendJson(OP_MLS_INVALID_COMMIT_WELCOME, {"transition_id": transition_id})
        ]
        out.extend(self._prepare_session(self._session_version))
        return out
