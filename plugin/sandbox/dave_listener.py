"""The sandbox's member of each DAVE group, and the channel that wires it to the group server.

:class:`DaveListener` is a member of the group inside the sandbox, a real ``davey`` session
behind the same client code as Legato's, which decrypts what each sender sends so a recording
proves the frames were end-to-end encrypted. It hears as Discord's receivers do: once a group
is in force, a plaintext frame is heard only where davey's decryptor for that sender passes
plaintext through (a downgrade's window, the seconds after an upgrade), and is dropped
otherwise. :class:`DaveChannel` wires it to the channel's
:class:`~legato.sandbox.dave.DaveGroupServer` and routes the listener's traffic in-process. Its
:class:`ListenerRole` says when it joins and whether it commits: first and founding every group
(the default), late and never committing (so that the clients found and race as they would
among themselves), or not at all.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from dataclasses import dataclass

import davey

from legato.sandbox.dave import (
    DAVE_MAGIC_MARKER,
    DaveGroupServer,
    Deliver,
)
from legato.sandbox.mls import (
    ExternalSender,
)
from legato.voice.dave import (
    OP_MLS_COMMIT_WELCOME,
    OPUS_SILENCE,
    DaveClient,
    DaveOutput,
    SendBinary,
    SendJson,
)

_log = logging.getLogger(__name__)


@dataclass(slots=True)
class ListenerStats:
    """What the listener saw per frame."""

    decrypted: int = 0
    #: Opus silence (``F8 FF FE``), which DAVE never encrypts.
    silence: int = 0
    #: Other frames without DAVE's magic marker, heard as plaintext: no group in force yet, a
    #: downgrade, or a passthrough window.
    plaintext: int = 0
    #: Frames without the marker dropped because the group was in force for their sender
    #: (outside any passthrough window): a Discord receiver drops them too.
    plaintext_dropped: int = 0
    #: Frames with the marker that did not decrypt.
    failed: int = 0


class DaveListener:
    """A group member inside the sandbox that decrypts every sender's frames.

    Args:
        user_id: its user id (a member like any other; choose one no real user has).
        channel_id: the channel.
    """

    def __init__(self, user_id: int, channel_id: int) -> None:
        self.user_id = user_id
        # It only receives: it installs a new epoch's keys on arrival, not at the execute.
        self.client = DaveClient(user_id, channel_id, apply_at_execute=False)
        self.stats = ListenerStats()

    def handle(self, message: SendJson | SendBinary) -> list[DaveOutput]:
        """Process one message the server sent it; returns its answers."""
        if isinstance(message, SendJson):
            return self.client.receive_json(message.op, message.data)
        return self.client.receive_binary(message.op, message.payload)

    def decrypt(self, sender_id: int, frame: bytes) -> bytes | None:
        """Recover a sender's Opus frame.

        Returns:
            The Opus frame; None when it carries DAVE's marker but does not decrypt, or when it
            is plaintext while the group is in force and davey passes no plaintext from that
            sender (not a member, or no passthrough window open).
        """
        session = self.client.session
        if frame == OPUS_SILENCE:
            self.stats.silence += 1
            return frame
        if not frame.endswith(DAVE_MAGIC_MARKER):
            return self._plaintext(sender_id, frame)
        if session is None:
            self.stats.plaintext += 1
            return frame
        try:
            plain = session.decrypt(sender_id, davey.MediaType.audio, frame)
        except ValueError as exc:
            self.stats.failed += 1
            _log.debug("listener could not decrypt %d's frame: %s", sender_id, exc)
            return None
        self.stats.decrypted += 1
        return plain

    def _plaintext(self, sender_id: int, frame: bytes) -> bytes | None:
        session = self.client.session
        if self.client.protocol_version == 0 or session is None:
            # No group in force (none formed yet, or downgraded): plaintext is the protocol.
            self.stats.plaintext += 1
            return frame
        try:
            # davey's decryptor decides, as libdave's does in Discord's clients: plaintext
            # passes only in a passthrough window (UnencryptedWhenPassthroughDisabled, and
            # NoDecryptorForUser for a sender outside the group, otherwise).
            plain = session.decrypt(sender_id, davey.MediaType.audio, frame)
        except ValueError as exc:
            self.stats.plaintext_dropped += 1
            _log.debug("listener dropped %d's plaintext frame: %s", sender_id, exc)
            return None
        self.stats.plaintext += 1
        return plain


class ListenerRole(enum.Enum):
    """What the sandbox's listener is in a channel's DAVE group."""

    #: In the channel before anyone, so it founds every group and, answering in-process,
    #: wins every commit race: the simplest way to prove what a client sends.
    FOUNDER = "founder"
    #: Joins once the remote members have formed the group, welcomed like anyone, and never
    #: commits: it hears everything while the clients found, commit and race as they would
    #: without it.
    LATE = "late"
    #: Not a member: a passive recorder of what arrives (DAVE frames stay encrypted).
    OFF = "off"


class DaveChannel:
    """A channel's DAVE server plus the sandbox listener, with the listener's traffic routed.

    Every method returns only what must go to remote members; messages for the listener are
    handled in-process, in order, and its answers fed back to the server.

    Args:
        channel_id: the channel.
        listener_id: the listener's user id.
        listener_role: what the listener is in the group (see :class:`ListenerRole`).
        protocol_version: 1 for DAVE.
        preferred_committer: see :class:`DaveGroupServer`.
        external_sender: see :class:`DaveGroupServer`.
    """

    def __init__(
        self,
        channel_id: int,
        *,
        listener_id: int,
        listener_role: ListenerRole = ListenerRole.FOUNDER,
        protocol_version: int = 1,
        preferred_committer: int | None = None,
        external_sender: ExternalSender | None = None,
    ) -> None:
        self.server = DaveGroupServer(
            channel_id,
            protocol_version=protocol_version,
            preferred_committer=preferred_committer,
            founder=listener_id if listener_role is ListenerRole.FOUNDER else None,
            external_sender=external_sender,
        )
        self.listener_id = listener_id
        self.listener_role = listener_role
        self._listener: DaveListener | None = None
        self._held: list[Deliver] = []
        if listener_role is ListenerRole.FOUNDER:
            self._held = self._route(self._listener_joins())

    @property
    def listener(self) -> DaveListener:
        """The listener.

        Raises:
            LookupError: it is not a member (:attr:`ListenerRole.OFF`, or a late listener
                before the group formed).
        """
        if self._listener is None:
            raise LookupError(f"no DAVE listener in channel {self.server.channel_id}")
        return self._listener

    @property
    def joined_listener(self) -> DaveListener | None:
        """The listener if it is a member, else None."""
        return self._listener

    def take_held(self) -> list[Deliver]:
        """Deliveries produced at construction (none unless a remote member was added)."""
        out, self._held = self._held, []
        return out

    def join(self, user_id: int) -> list[Deliver]:
        """See :meth:`DaveGroupServer.join`."""
        return self._route(self.server.join(user_id))

    def leave(self, user_id: int) -> list[Deliver]:
        """See :meth:`DaveGroupServer.leave`."""
        return self._route(self.server.leave(user_id))

    def receive_json(self, user_id: int, op: int, data: object) -> list[Deliver]:
        """See :meth:`DaveGroupServer.receive_json`."""
        return self._route(self.server.receive_json(user_id, op, data))

    def receive_binary(self, user_id: int, op: int, payload: bytes) -> list[Deliver]:
        """See :meth:`DaveGroupServer.receive_binary`."""
        return self._route(self.server.receive_binary(user_id, op, payload))

    def downgrade(self) -> list[Deliver]:
        """See :meth:`DaveGroupServer.downgrade`."""
        return self._route(self.server.downgrade())

    def upgrade(self, protocol_version: int = 1) -> list[Deliver]:
        """See :meth:`DaveGroupServer.upgrade`."""
        return self._route(self.server.upgrade(protocol_version))

    def _listener_joins(self) -> list[Deliver]:
        listener = self._listener = DaveListener(self.listener_id, self.server.channel_id)
        answers = listener.client.start(self.server.session_protocol_version)
        commits = self.listener_role is ListenerRole.FOUNDER
        return self.server.join(self.listener_id, commits=commits) + self._from_listener(answers)

    def _from_listener(self, answers: list[DaveOutput]) -> list[Deliver]:
        lid = self.listener_id
        out: list[Deliver] = []
        for answer in answers:
            if isinstance(answer, SendJson):
                out += self.server.receive_json(lid, answer.op, answer.data)
            elif (
                answer.op == OP_MLS_COMMIT_WELCOME
                and self.listener_role is not ListenerRole.FOUNDER
            ):
                continue  # a member that does not commit keeps its commit to itself
            else:
                out += self.server.receive_binary(lid, answer.op, answer.payload)
        return out

    def _route(self, deliveries: list[Deliver]) -> list[Deliver]:
        queue = deque(deliveries)
        remote: list[Deliver] = []
        while True:
            while queue:
                item = queue.popleft()
                if item.user_id != self.listener_id:
                    remote.append(item)
                    continue
                if self._listener is not None:
                    queue.extend(self._from_listener(self._listener.handle(item.message)))
            if not self._late_listener_due():
                return remote
            queue.extend(self._listener_joins())

    def _late_listener_due(self) -> bool:
        """A late listener joins once a group is in force among the remote members."""
        return (
            self.listener_role is ListenerRole.LATE
            and self._listener is None
            and self.server.epoch is not None
            and not self.server.open_transitions
        )
