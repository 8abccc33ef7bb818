"""The sandbox voice server's DAVE glue: channels' groups on the websockets, and DAVE faults.

:mod:`legato.sandbox.dave` and :mod:`legato.sandbox.dave_listener` do the protocol
(:class:`~legato.sandbox.dave_listener.DaveChannel`, one per voice channel, sans-I/O).
:class:`DaveHub` moves its messages: it makes a channel's group when its first DAVE member
selects a protocol, hands the group each member's DAVE ops (JSON 23/31, binary 26/28), sends
what the group answers to the sessions it names (binary frames sequenced with the session's
other messages), and gives the media plane the listener's view of each payload. The faults
tests use (:meth:`~DaveHub.hold`, :meth:`~DaveHub.hold_commits`, :meth:`~DaveHub.corrupt_next`)
sit on that path.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from legato.sandbox.dave import Deliver, pack_server_binary, parse_client_binary
from legato.sandbox.dave_listener import DaveChannel
from legato.sandbox.recording import Waiters
from legato.sandbox.voice_session import ServerOptions, ServerStats, Session, SessionTable
from legato.voice.dave import OP_MLS_COMMIT_WELCOME, MalformedDaveFrame, SendJson

_log = logging.getLogger(__name__)

#: The sandbox's DAVE listener (a group member that decrypts every sender), as a user id.
DAVE_LISTENER_ID: Final = 1_000_000_000_000_000_001
_DAVE_WIRE_FRAMES: Final = 500


class DaveHub:
    """Every voice channel's DAVE group, wired to the sessions of its members.

    Args:
        options: the server's options (protocol version, listener role, preferred committer).
        table: the sessions messages go to, and the event log (``dave_execute``).
        stats: the server's counters.
        waiters: woken after every DAVE message the hub handles or sends.
    """

    def __init__(
        self, options: ServerOptions, table: SessionTable, stats: ServerStats, waiters: Waiters
    ) -> None:
        self._options = options
        self._table = table
        self._stats = stats
        self._waiters = waiters
        self._channel_ids: dict[tuple[int, int], int] = {}
        self.channels: dict[tuple[int, int], DaveChannel] = {}
        self._wire: dict[tuple[int, int], deque[bytes]] = {}
        self._corrupt: dict[int, int] = {}
        #: DAVE messages kept from a user by :meth:`hold`: ``user_id -> (server_id, item)``.
        self._held: dict[int, list[tuple[int, Deliver]]] = {}
        #: op28 commits kept by :meth:`hold_commits`: ``user_id -> [(session, payload)]``.
        self._commits_held: dict[int, list[tuple[Session, bytes]]] = {}

    @property
    def enabled(self) -> bool:
        """Whether the server runs DAVE at all."""
        return self._options.dave_protocol_version > 0

    def name_channel(self, key: tuple[int, int], channel_id: int) -> None:
        """Say which channel (MLS group) ``(server_id, user_id)`` joins."""
        self._channel_ids[key] = channel_id

    def key(self, session: Session) -> tuple[int, int]:
        """``(server_id, channel_id)`` of the session's group."""
        server_id = session.grant.server_id
        return (server_id, self._channel_ids.get(session.key, server_id))

    def version(self, session: Session) -> int:
        """The DAVE protocol version op4 tells the session (its group's, once there is one)."""
        channel = self.channels.get(self.key(session))
        if channel is not None:
            return channel.server.session_protocol_version
        return self._options.dave_protocol_version

    def wire_frames(self, user_id: int, server_id: int | None) -> list[bytes]:
        """The last media payloads of ``user_id`` as the server received them (pre-listener).

        Raises:
            KeyError: the user sent no DAVE media.
        """
        session = self._table.find(user_id, server_id, required=False)
        if session is not None:
            return list(self._wire.get(session.key, ()))
        for (sid, uid), frames in self._wire.items():
            if uid == user_id and server_id in (None, sid):
                return list(frames)
        raise KeyError(f"no DAVE frames for user {user_id}")

    def is_member(self, session: Session) -> bool:
        """Whether the session joined a DAVE group."""
        return session.key in self._wire

    # -- members ---------------------------------------------------------------------------------

    async def join(self, session: Session) -> None:
        """Put a session that selected its protocol into its channel's group (made on first use)."""
        if not self.enabled:
            return
        key = self.key(session)
        channel = self.channels.get(key)
        if channel is None:
            channel = self.channels[key] = DaveChannel(
                key[1],
                listener_id=DAVE_LISTENER_ID,
                listener_role=self._options.dave_listener,
                protocol_version=self._options.dave_protocol_version,
                preferred_committer=self._options.dave_preferred_committer,
            )
        self._wire[session.key] = deque(maxlen=_DAVE_WIRE_FRAMES)
        await self.deliver(session.grant.server_id, channel.join(session.grant.user_id))

    async def leave(self, session: Session) -> None:
        """Take an ended session out of its group."""
        channel = self.channels.get(self.key(session))
        if channel is not None:
            await self.deliver(session.grant.server_id, channel.leave(session.grant.user_id))

    async def on_json(self, session: Session, op: int, d: Any) -> None:
        """A member's JSON DAVE op (23, 31); ignored without a group, as with DAVE off."""
        channel = self.channels.get(self.key(session))
        if channel is None:
            return
        deliveries = channel.receive_json(session.grant.user_id, op, d)
        await self.deliver(session.grant.server_id, deliveries)

    async def on_binary(self, session: Session, data: bytes) -> None:
        """A member's binary DAVE frame (op26 key package, op28 commit)."""
        try:
            op, payload = parse_client_binary(data)
        except MalformedDaveFrame:
            self._stats.dave_bad_binary += 1
            return
        channel = self.channels.get(self.key(session))
        if channel is None:
            return
        held = self._commits_held.get(session.grant.user_id)
        if held is not None and op == OP_MLS_COMMIT_WELCOME:
            held.append((session, payload))
            self._waiters.notify()
            return
        deliveries = channel.receive_binary(session.grant.user_id, op, payload)
        await self.deliver(session.grant.server_id, deliveries)

    async def deliver(self, server_id: int, deliveries: list[Deliver]) -> None:
        """Send a group's messages to the sessions they name, then wake the waiters."""
        try:
            await self._send(server_id, deliveries)
        finally:
            self._waiters.notify()

    async def _send(self, server_id: int, deliveries: list[Deliver]) -> None:
        for item in deliveries:
            held = self._held.get(item.user_id)
            if held is not None:
                held.append((server_id, item))
                continue
            session = self._table.sessions.get((server_id, item.user_id))
            if session is None or session.ended:
                continue
            message = item.message
            if isinstance(message, SendJson):
                await session.send(message.op, message.data)
                if message.op == 22:
                    self._table.event("dave_execute", session.grant)
            else:
                payload = message.payload
                if self._corrupt.get(item.user_id) == message.op:
                    del self._corrupt[item.user_id]
                    damaged = bytearray(payload)
                    damaged[len(damaged) // 2] ^= 0xFF
                    payload = bytes(damaged)
                session.seq += 1
                await session.send_frame(pack_server_binary(session.seq, message.op, payload))

    # -- media -----------------------------------------------------------------------------------

    def hear(self, session: Session, payload: bytes) -> bytes | None:
        """The listener's view of a media payload: the Opus it hears, or None when a Discord
        receiver would drop it (a DAVE frame that does not decrypt, or plaintext while the
        group is in force for the sender outside a passthrough window)."""
        wire = self._wire.get(session.key)
        if wire is None:
            return payload
        wire.append(payload)
        channel = self.channels.get(self.key(session))
        listener = channel.joined_listener if channel is not None else None
        if listener is None:
            return payload  # no listener (yet): recorded as it arrived
        dropped = listener.stats.plaintext_dropped
        opened = listener.decrypt(session.grant.user_id, payload)
        if opened is None:
            if listener.stats.plaintext_dropped > dropped:
                self._stats.dave_plaintext_dropped += 1
            else:
                self._stats.dave_undecryptable += 1
        return opened

    # -- faults ----------------------------------------------------------------------------------

    def corrupt_next(self, user_id: int, op: int) -> None:
        """Flip a byte in the middle of the next binary DAVE ``op`` sent to ``user_id``."""
        self._corrupt[user_id] = op

    def hold(self, user_id: int) -> None:
        """Keep every DAVE message for ``user_id`` until :meth:`release`."""
        self._held.setdefault(user_id, [])

    async def release(self, user_id: int) -> None:
        """Send the messages :meth:`hold` kept, in order, and stop holding them."""
        for server_id, item in self._held.pop(user_id, []):
            await self.deliver(server_id, [item])

    def hold_commits(self, user_id: int) -> None:
        """Keep ``user_id``'s op28 commits from the group until :meth:`release_commits`."""
        self._commits_held.setdefault(user_id, [])

    def commits_held(self, user_id: int) -> int:
        """How many of ``user_id``'s commits :meth:`hold_commits` keeps."""
        return len(self._commits_held.get(user_id, ()))

    async def release_commits(self, user_id: int) -> None:
        """Deliver the commits :meth:`hold_commits` kept, in order, and stop holding."""
        for session, payload in self._commits_held.pop(user_id, []):
            channel = self.channels.get(self.key(session))
            if channel is None or session.ended:
                continue
            deliveries = channel.receive_binary(user_id, OP_MLS_COMMIT_WELCOME, payload)
            await self.deliver(session.grant.server_id, deliveries)

    def group_holds(self, key: tuple[int, int], predicate: Callable[[DaveChannel], bool]) -> bool:
        """Whether channel ``key`` has a group and ``predicate`` holds for it."""
        channel = self.channels.get(key)
        return channel is not None and predicate(channel)
