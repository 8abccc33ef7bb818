"""The sandbox voice server's part in DAVE, sans-I/O: Discord's side of the MLS group.

:class:`DaveGroupServer` is what Discord's voice server does for one channel's DAVE group. It
never reads media or MLS secrets; it holds the external sender's key, proposes who joins and
leaves, picks one commit per epoch and relays it, and runs the transitions:

- a member that identifies with DAVE gets op25 (the external sender) and answers op26 (its key
  package);
- with no group yet, every waiting member that commits gets op27 with Add proposals for every
  other waiting member at epoch 0, against its pending one-member group, and the first op28
  founds the group: the committer's own commit goes back to it (op29), the others are
  welcomed (op30). A chosen founder (the preferred committer, or the server's ``founder``)
  alone gets them when it is waiting;
- with a group, every member gets op27 with Add proposals for waiting key packages and Remove
  proposals for members who left or asked to be re-added (op31), signed as the external sender;
  the first acceptable op28 wins (or only the preferred committer's, when one is set and in the
  group), the others (and late ones, for an epoch already committed) are counted and dropped;
- members may be non-committing (:meth:`~DaveGroupServer.join`): they get proposals but their
  commits are not taken; when only such members, or a single member, would be left to commit
  a departure, the group is dropped instead (the protocol's *sole member reset*: op24
  ``epoch: 1``, op21 transition 0) and the next arrival founds a new one;
- the winning commit goes to the group's members as op29 and its welcome to the new members as
  op30, under a fresh ``transition_id``; once every participant answered op23, op22 executes it;
- a member whose commit or welcome failed sends op31: it stops counting for that transition and
  is removed and re-added with the fresh key package it sends next;
- a member leaving before its Add was committed is revoked (op27 ``revoke`` with the proposal's
  ``ProposalRef``), and removed with a Remove proposal once it is in the group;
- :meth:`~DaveGroupServer.downgrade` runs op21 to protocol 0 (plaintext) and drops the group;
  :meth:`~DaveGroupServer.upgrade` sends op24 ``epoch: 1`` (and op25 again) so the members start a
  new group, which becomes the protocol at the founding commit's execute.

One change at a time: the next round of proposals waits until every open transition has
executed, because clients apply a commit at its execute.

The sandbox's own member of the group, which decrypts what it hears, is
:mod:`legato.sandbox.dave_listener`'s.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import Final

from legato.sandbox.mls import (
    ExternalSender,
    KeyPackageInfo,
    MLSDecodeError,
    SignedProposal,
    encode_opaque,
    parse_key_package,
    split_commit_welcome,
)
from legato.voice.dave import (
    OP_EXECUTE_TRANSITION,
    OP_MLS_ANNOUNCE_COMMIT_TRANSITION,
    OP_MLS_COMMIT_WELCOME,
    OP_MLS_EXTERNAL_SENDER,
    OP_MLS_INVALID_COMMIT_WELCOME,
    OP_MLS_KEY_PACKAGE,
    OP_MLS_PROPOSALS,
    OP_MLS_WELCOME,
    OP_PREPARE_EPOCH,
    OP_PREPARE_TRANSITION,
    OP_TRANSITION_READY,
    MalformedDaveFrame,
    SendBinary,
    SendJson,
)

_log = logging.getLogger(__name__)

#: DAVE frames end with this marker (https://daveprotocol.com/#magic-marker).
DAVE_MAGIC_MARKER: Final = b"\xfa\xfa"
_OPTYPE_APPEND: Final = 0
_OPTYPE_REVOKE: Final = 1
_MAX_TRANSITION_ID: Final = 0xFFFF


@dataclass(frozen=True, slots=True)
class Deliver:
    """Send ``message`` to ``user_id`` (binary messages get the connection's ``seq``)."""

    user_id: int
    message: SendJson | SendBinary


def pack_server_binary(seq: int, op: int, payload: bytes) -> bytes:
    """Build a server binary frame ``[u16 seq][u8 op][payload]`` (the client parses it with
    :func:`legato.voice.dave.parse_server_binary`)."""
    return struct.pack(">HB", seq & 0xFFFF, op) + payload


def parse_client_binary(data: bytes) -> tuple[int, bytes]:
    """Split a client binary frame ``[u8 op][payload]`` (what
    :func:`legato.voice.dave.pack_client_binary` builds).

    Raises:
        MalformedDaveFrame: empty frame.
    """
    if not data:
        raise MalformedDaveFrame("empty binary frame")
    return data[0], bytes(data[1:])


@dataclass(slots=True)
class DaveServerStats:
    """What the server refused or noticed; tests assert on these."""

    bad_key_packages: int = 0
    bad_commits: int = 0
    #: Valid commits that lost: another commit for the epoch was already chosen.
    ignored_commits: int = 0
    invalid_reports: int = 0
    unknown_transition_ready: int = 0
    malformed: int = 0
    commits_relayed: int = 0
    transitions_executed: int = 0
    proposals_sent: int = 0
    revokes_sent: int = 0


@dataclass(slots=True)
class _Member:
    key_package: KeyPackageInfo | None = None
    #: Reported op31 while in the group: remove its old leaf and add its new key package.
    needs_readd: bool = False
    #: Whether it commits (the protocol allows members that only receive).
    commits: bool = True


@dataclass(slots=True)
class _Round:
    epoch: int
    #: No group yet: each recipient commits to its own pending one-member group.
    founding: bool
    recipients: set[int]
    adds: dict[bytes, int] = field(default_factory=dict)
    add_packages: dict[int, KeyPackageInfo] = field(default_factory=dict)
    removes: dict[bytes, int] = field(default_factory=dict)

    def expected(self, committer: int) -> set[bytes]:
        """The proposal refs ``committer`` was sent, which its commit must cover exactly:
        everything but its own Add (a founding round sends each member the others')."""
        return {ref for ref, uid in self.adds.items() if uid != committer} | set(self.removes)

    def alive(self) -> bool:
        """Whether some recipient has something to commit."""
        return any(self.expected(u) for u in self.recipients)


@dataclass(slots=True)
class _Transition:
    version: int
    awaiting: set[int]
    ready: set[int] = field(default_factory=set)


class DaveGroupServer:
    """One voice channel's DAVE group as the voice server sees it.

    Args:
        channel_id: the channel (the MLS group id is its 8 big-endian bytes).
        protocol_version: 1 for DAVE, 0 for a plaintext channel.
        external_sender: the signing identity; generated when omitted.
        preferred_committer: when set and eligible, only this member's commits are taken (and
            it founds the group); tests use it to choose who commits.
        founder: when set and waiting with a key package, it alone gets the founding
            proposals (it founds every group); otherwise every pending member that commits
            does, and the first commit wins.
    """

    def __init__(
        self,
        channel_id: int,
        *,
        protocol_version: int = 1,
        external_sender: ExternalSender | None = None,
        preferred_committer: int | None = None,
        founder: int | None = None,
    ) -> None:
        self.channel_id = channel_id
        self.group_id = channel_id.to_bytes(8, "big")
        self.external_sender = external_sender or ExternalSender()
        self.preferred_committer = preferred_committer
        self.founder = founder
        self.stats = DaveServerStats()
        self._version = protocol_version
        self._target_version = protocol_version
        self._members: dict[int, _Member] = {}
        #: User id per leaf index once the group exists (None: blank leaf).
        self._leaves: list[int | None] = []
        self._epoch: int | None = None
        self._round: _Round | None = None
        self._transitions: dict[int, _Transition] = {}
        self._next_transition = 1

    # -- views ------------------------------------------------------------------------------

    @property
    def protocol_version(self) -> int:
        """The executed protocol version (what media is expected to be)."""
        return self._version

    @property
    def session_protocol_version(self) -> int:
        """What op4 tells a member joining now (the target during an upgrade)."""
        return self._target_version

    @property
    def epoch(self) -> int | None:
        """The group's epoch; None before the first commit."""
        return self._epoch

    @property
    def group_members(self) -> tuple[int, ...]:
        """User ids in the group, by leaf index."""
        return tuple(u for u in self._leaves if u is not None)

    @property
    def pending_members(self) -> tuple[int, ...]:
        """User ids whose key package waits for a commit to add them, in joining order."""
        return tuple(u for u, m in self._members.items() if m.key_package is not None)

    @property
    def open_transitions(self) -> dict[int, int]:
        """``transition_id -> protocol_version`` not executed yet."""
        return {tid: t.version for tid, t in self._transitions.items()}

    def accepts(self, max_protocol_version: int) -> bool:
        """Whether a client offering ``max_protocol_version`` may join (else close 4017)."""
        return max_protocol_version >= self._target_version

    # -- membership -------------------------------------------------------------------------

    def join(self, user_id: int, *, commits: bool = True) -> list[Deliver]:
        """A member identified (send after op4): op25 when DAVE is on.

        A member identifying again (a new voice session) starts a new MLS session: if its old
        leaf is still in the group, it is removed and re-added with the new key package.

        Args:
            user_id: the member.
            commits: False for a member that never commits (it gets proposals, since it must
                process the commit that carries them, but neither founds a group nor wins a
                round; the DAVE protocol lets a session have such members).
        """
        known = user_id in self._members
        self._members[user_id] = _Member(needs_readd=user_id in self._leaves, commits=commits)
        out = self._withdraw(user_id) if known else []
        if self._target_version > 0:
            package = self.external_sender.package()
            out.append(Deliver(user_id, SendBinary(OP_MLS_EXTERNAL_SENDER, package)))
        return out

    def leave(self, user_id: int) -> list[Deliver]:
        """A member left the channel (or its connection ended for good)."""
        if self._members.pop(user_id, None) is None:
            return []
        return self._withdraw(user_id) + self._propose()

    def _withdraw(self, user_id: int) -> list[Deliver]:
        """Stop waiting for ``user_id`` in transitions and the open round; revoke its Add."""
        out: list[Deliver] = []
        for tid in list(self._transitions):
            out += self._drop_from_transition(tid, user_id)
        round_ = self._round
        if round_ is None:
            return out
        round_.recipients.discard(user_id)
        revoked = [ref for ref, uid in round_.adds.items() if uid == user_id]
        for ref in revoked:
            del round_.adds[ref]
            round_.add_packages.pop(user_id, None)
        if revoked and round_.recipients:
            # Members stored the proposal; unless revoked, their next commit would carry it.
            # Every remaining recipient was sent it (only the leaver is not sent its own Add).
            payload = bytes([_OPTYPE_REVOKE]) + encode_opaque(
                b"".join(encode_opaque(ref) for ref in revoked)
            )
            self.stats.revokes_sent += 1
            out += [
                Deliver(u, SendBinary(OP_MLS_PROPOSALS, payload)) for u in sorted(round_.recipients)
            ]
        if not round_.alive():
            # Nothing left to commit or nobody left to commit it (and nobody holds a proposal
            # not revoked): start the round over.
            self._round = None
        return out

    # -- input ------------------------------------------------------------------------------

    def receive_json(self, user_id: int, op: int, data: object) -> list[Deliver]:
        """Feed a member's JSON DAVE op (23 transition ready, 31 invalid commit/welcome)."""
        if user_id not in self._members:
            return []
        tid = data.get("transition_id") if isinstance(data, dict) else None
        if not isinstance(tid, int) or isinstance(tid, bool) or not 0 <= tid <= 0xFFFF:
            self.stats.malformed += 1
            return []
        if op == OP_TRANSITION_READY:
            transition = self._transitions.get(tid)
            if transition is None or user_id not in transition.awaiting:
                self.stats.unknown_transition_ready += 1
                return []
            transition.awaiting.discard(user_id)
            transition.ready.add(user_id)
            return self._maybe_execute(tid)
        if op == OP_MLS_INVALID_COMMIT_WELCOME:
            self.stats.invalid_reports += 1
            member = self._members[user_id]
            member.key_package = None
            if user_id in self._leaves:
                member.needs_readd = True
            out = self._drop_from_transition(tid, user_id)
            if self._round is not None and user_id in self._round.recipients:
                self._round.recipients.discard(user_id)
                if not self._round.alive():
                    self._round = None
            return out + self._propose()
        return []

    def receive_binary(self, user_id: int, op: int, payload: bytes) -> list[Deliver]:
        """Feed a member's binary DAVE op (26 key package, 28 commit and welcome)."""
        member = self._members.get(user_id)
        if member is None:
            return []
        if op == OP_MLS_KEY_PACKAGE:
            try:
                package = parse_key_package(payload)
            except MLSDecodeError as exc:
                self.stats.bad_key_packages += 1
                _log.info("key package from %d refused: %s", user_id, exc)
                return []
            if not package.signature_valid or package.user_id != user_id:
                self.stats.bad_key_packages += 1
                _log.info("key package from %d has a bad signature or identity", user_id)
                return []
            member.key_package = package
            return self._propose()
        if op == OP_MLS_COMMIT_WELCOME:
            return self._on_commit(user_id, payload)
        self.stats.malformed += 1
        return []

    # -- protocol version -------------------------------------------------------------------

    def downgrade(self) -> list[Deliver]:
        """Prepare a transition to protocol 0 (op21); op22 follows once all are ready."""
        tid = self._new_transition(0, set(self._members))
        self._target_version = 0
        return [
            Deliver(
                u, SendJson(OP_PREPARE_TRANSITION, {"transition_id": tid, "protocol_version": 0})
            )
            for u in sorted(self._members)
        ] + self._maybe_execute(tid)

    def upgrade(self, protocol_version: int = 1) -> list[Deliver]:
        """Start a new group at ``protocol_version`` (op24 epoch 1, then op25)."""
        self._target_version = protocol_version
        self._reset_group()
        for member in self._members.values():
            member.key_package = None
            member.needs_readd = False
        out: list[Deliver] = []
        for u in sorted(self._members):
            out.append(
                Deliver(
                    u,
                    SendJson(OP_PREPARE_EPOCH, {"epoch": 1, "protocol_version": protocol_version}),
                )
            )
            out.append(
                Deliver(u, SendBinary(OP_MLS_EXTERNAL_SENDER, self.external_sender.package()))
            )
        return out

    # -- internals --------------------------------------------------------------------------

    def _reset_group(self) -> None:
        self._leaves = []
        self._epoch = None
        self._round = None

    def _new_transition(self, version: int, participants: set[int]) -> int:
        tid = self._next_transition
        self._next_transition = tid % _MAX_TRANSITION_ID + 1  # 1..65535; 0 means "at once"
        self._transitions[tid] = _Transition(version, set(participants))
        return tid

    def _drop_from_transition(self, tid: int, user_id: int) -> list[Deliver]:
        transition = self._transitions.get(tid)
        if transition is None:
            return []
        transition.awaiting.discard(user_id)
        transition.ready.discard(user_id)
        return self._maybe_execute(tid)

    def _maybe_execute(self, tid: int) -> list[Deliver]:
        transition = self._transitions[tid]
        if transition.awaiting:
            return []
        del self._transitions[tid]
        self.stats.transitions_executed += 1
        self._version = transition.version
        if transition.version == 0:
            self._reset_group()
            for member in self._members.values():
                member.key_package = None
                member.needs_readd = False
        _log.debug("transition %d executed (protocol %d)", tid, transition.version)
        return [
            Deliver(u, SendJson(OP_EXECUTE_TRANSITION, {"transition_id": tid}))
            for u in sorted(transition.ready)
            if u in self._members
        ] + self._propose()

    def _propose(self) -> list[Deliver]:
        if self._round is not None or self._target_version == 0 or self._transitions:
            # One change at a time: members apply a commit at its execute, so proposals for
            # the next epoch wait until every open transition has executed.
            return []
        if self._epoch is None:
            return self._propose_founding()
        recipients = {
            u
            for u in self._leaves
            if u is not None and u in self._members and not self._members[u].needs_readd
        }
        if not recipients:
            self._reset_group()
            return self._propose_founding()
        if not any(self._members[u].commits for u in recipients):
            # Nobody left in the group can commit what comes next: start a new one.
            return self._restart_group(recipients)
        removes = [
            i
            for i, u in enumerate(self._leaves)
            if u is not None
            and (
                u not in self._members
                or (self._members[u].needs_readd and self._members[u].key_package is not None)
            )
        ]
        adds = {
            u: m.key_package
            for u, m in self._members.items()
            if m.key_package is not None and (u not in self._leaves or m.needs_readd)
        }
        if not removes and not adds:
            return []
        if len(recipients) == 1 and not adds:
            # Sole member reset (https://daveprotocol.com/#sole-member-reset): no member keeps
            # an established group to itself; the next to join founds a new one.
            return self._restart_group(recipients)
        round_ = _Round(self._epoch, False, recipients)
        proposals: list[SignedProposal] = []
        for leaf in removes:
            p = self.external_sender.propose_remove(self.group_id, self._epoch, leaf)
            round_.removes[p.ref] = leaf
            proposals.append(p)
        for u, package in adds.items():
            p = self.external_sender.propose_add(self.group_id, self._epoch, package.raw)
            round_.adds[p.ref] = u
            round_.add_packages[u] = package
            proposals.append(p)
        return self._send_round(round_, proposals)

    def _restart_group(self, remaining: set[int]) -> list[Deliver]:
        """Drop the group: its remaining members get op24 ``epoch: 1`` and op21 transition 0
        (executed at once), make a new MLS session and send a fresh key package."""
        self._reset_group()
        version = self._target_version
        out: list[Deliver] = []
        for u in sorted(remaining):
            self._members[u].key_package = None
            self._members[u].needs_readd = False
            epoch = {"epoch": 1, "protocol_version": version}
            out.append(Deliver(u, SendJson(OP_PREPARE_EPOCH, epoch)))
            ready = {"transition_id": 0, "protocol_version": version}
            out.append(Deliver(u, SendJson(OP_PREPARE_TRANSITION, ready)))
        _log.debug("group restarted for %s", sorted(remaining))
        return out + self._propose_founding()

    def _propose_founding(self) -> list[Deliver]:
        candidates = [u for u, m in self._members.items() if m.key_package is not None]
        committers = [u for u in candidates if self._members[u].commits]
        if len(candidates) < 2 or not committers:
            return []  # alone, or nobody who commits: no group yet
        # Every pending member that commits gets the others' Add proposals for its own pending
        # group, and the first commit founds the group (https://daveprotocol.com/#initial-group-
        # creation); unless a founder is chosen, which alone gets them.
        chosen = next(
            (u for u in (self.preferred_committer, self.founder) if u in committers), None
        )
        round_ = _Round(0, True, {chosen} if chosen is not None else set(committers))
        proposals: list[SignedProposal] = []
        for u in candidates:
            if u == chosen:
                continue  # nobody else is sent its Add
            package = self._members[u].key_package
            assert package is not None
            p = self.external_sender.propose_add(self.group_id, 0, package.raw)
            round_.adds[p.ref] = u
            round_.add_packages[u] = package
            proposals.append(p)
        return self._send_round(round_, proposals)

    def _send_round(self, round_: _Round, proposals: list[SignedProposal]) -> list[Deliver]:
        self._round = round_
        self.stats.proposals_sent += len(proposals)
        out: list[Deliver] = []
        for u in sorted(round_.recipients):
            mine = [p.message for p in proposals if round_.adds.get(p.ref) != u]
            payload = bytes([_OPTYPE_APPEND]) + encode_opaque(b"".join(mine))
            out.append(Deliver(u, SendBinary(OP_MLS_PROPOSALS, payload)))
        return out

    def _on_commit(self, user_id: int, payload: bytes) -> list[Deliver]:
        round_ = self._round
        if round_ is None or user_id not in round_.recipients:
            self.stats.ignored_commits += 1
            return []
        preferred = self.preferred_committer
        if (preferred is not None and preferred in round_.recipients and user_id != preferred) or (
            not self._members[user_id].commits
        ):
            self.stats.ignored_commits += 1
            return []
        try:
            commit, welcome = split_commit_welcome(payload)
        except MLSDecodeError as exc:
            self.stats.bad_commits += 1
            _log.info("commit from %d refused: %s", user_id, exc)
            return []
        if commit.group_id == self.group_id and commit.epoch < round_.epoch:
            # For an epoch already committed: it lost the race to the commit relayed then.
            self.stats.ignored_commits += 1
            return []
        expected = round_.expected(user_id)
        problem = None
        if commit.group_id != self.group_id or commit.epoch != round_.epoch:
            problem = f"group/epoch {commit.group_id.hex()}/{commit.epoch}"
        elif commit.inline or set(commit.proposal_refs) != expected:
            # Stale (a revoke crossed it) or not what was proposed.
            problem = "proposals differ from the round's"
        elif any(ref in round_.adds for ref in expected) and welcome is None:
            problem = "adds members without a welcome"
        if problem is not None:
            self.stats.bad_commits += 1
            _log.info("commit from %d refused: %s", user_id, problem)
            return []

        # The committer's own pending group, when it founds one, is the only old member.
        old_members = {user_id} if round_.founding else set(round_.recipients)
        if round_.founding:
            self._leaves = [user_id]
            self._members[user_id].key_package = None
        for ref in commit.proposal_refs:
            if ref in round_.removes:
                self._leaves[round_.removes[ref]] = None
        while self._leaves and self._leaves[-1] is None:
            self._leaves.pop()
        added: list[int] = []
        for ref in commit.proposal_refs:
            uid = round_.adds.get(ref)
            if uid is None:
                continue
            if None in self._leaves:
                self._leaves[self._leaves.index(None)] = uid
            else:
                self._leaves.append(uid)
            added.append(uid)
            member = self._members.get(uid)
            if member is not None and member.key_package is round_.add_packages[uid]:
                member.key_package = None
                member.needs_readd = False
        self._epoch = round_.epoch + 1
        self._round = None
        self.stats.commits_relayed += 1
        joined = [u for u in added if u in self._members]
        tid = self._new_transition(self._target_version, old_members | set(joined))
        prefix = tid.to_bytes(2, "big")
        out = [
            Deliver(u, SendBinary(OP_MLS_ANNOUNCE_COMMIT_TRANSITION, prefix + commit.raw))
            for u in sorted(old_members)
        ]
        if welcome is not None:
            out += [Deliver(u, SendBinary(OP_MLS_WELCOME, prefix + welcome.raw)) for u in joined]
        return out + self._propose()
