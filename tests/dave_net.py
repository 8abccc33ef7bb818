"""A wire without sockets between a sandbox :class:`DaveChannel` and Legato's DAVE clients.

Every message crosses real DAVE framing: server binary ops are packed ``[u16 seq][u8 op][...]``
and parsed by :func:`parse_server_binary`, client binary ops go through
:meth:`SendBinary.frame` and :func:`parse_client_binary`. Delivery is breadth-first in send
order, like one ordered websocket per member. A member can be *held* (its messages queue up
until :meth:`DaveNet.release`), so can a member's commits on their way to the server
(:meth:`DaveNet.hold_commits`, so that another member's commit wins the race), and ``tamper``
can rewrite a message on its way to a member.
After every delivered message the ``on_step`` hook runs, which the rekey tests use to send
media continuously through every step of a transition.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from legato.sandbox.dave import Deliver, pack_server_binary, parse_client_binary
from legato.sandbox.dave_listener import DaveChannel, ListenerRole
from legato.voice.dave import DaveClient, DaveOutput, SendBinary, SendJson, parse_server_binary

CHANNEL_ID = 1_100_000_000_000_000_001
LISTENER_ID = 1_100_000_000_000_000_900
BOT_ID = 1_100_000_000_000_000_100

Tamper = Callable[[int, SendJson | SendBinary], SendJson | SendBinary]


@dataclass
class DaveNet:
    """The channel, its remote members and the messages between them."""

    channel: DaveChannel
    clients: dict[int, DaveClient] = field(default_factory=dict)
    held: dict[int, deque[Deliver]] = field(default_factory=dict)
    #: Every message delivered to a remote member, in order: ``(user_id, op)``.
    log: list[tuple[int, int]] = field(default_factory=list)
    #: op28 commits kept on their way to the server, per member.
    held_commits: dict[int, list[SendBinary]] = field(default_factory=dict)
    tamper: Tamper | None = None
    on_step: Callable[[], None] | None = None
    _seq: dict[int, int] = field(default_factory=dict)

    @classmethod
    def make(
        cls,
        *,
        preferred_committer: int | None = None,
        listener_role: ListenerRole = ListenerRole.FOUNDER,
    ) -> DaveNet:
        """A DAVE channel (protocol 1) with the sandbox listener in the given role."""
        return cls(
            DaveChannel(
                CHANNEL_ID,
                listener_id=LISTENER_ID,
                listener_role=listener_role,
                preferred_committer=preferred_committer,
            )
        )

    @property
    def listener(self) -> DaveClient:
        return self.channel.listener.client

    def connect(self, user_id: int) -> DaveClient:
        """Identify ``user_id``: op4's version, then op25, then its op26 goes out."""
        client = DaveClient(user_id, CHANNEL_ID)
        self.clients[user_id] = client
        first = client.start(self.channel.server.session_protocol_version)
        self.deliver(self.channel.join(user_id))
        self.send(user_id, first)
        return client

    def disconnect(self, user_id: int) -> None:
        del self.clients[user_id]
        self.held.pop(user_id, None)
        self.deliver(self.channel.leave(user_id))

    def hold(self, user_id: int) -> None:
        self.held.setdefault(user_id, deque())

    def release(self, user_id: int) -> None:
        queue = self.held.pop(user_id)
        self.deliver(list(queue))

    def hold_commits(self, user_id: int) -> None:
        self.held_commits.setdefault(user_id, [])

    def release_commits(self, user_id: int) -> None:
        self.send(user_id, list(self.held_commits.pop(user_id)))

    def send(self, user_id: int, outputs: list[DaveOutput]) -> None:
        """A member's messages reach the server in order."""
        for out in outputs:
            if isinstance(out, SendBinary):
                op, payload = parse_client_binary(out.frame())
                self.deliver(self.channel.receive_binary(user_id, op, payload))
            else:
                self.deliver(self.channel.receive_json(user_id, out.op, out.data))

    def deliver(self, deliveries: list[Deliver]) -> None:
        queue = deque(deliveries)
        while queue:
            item = queue.popleft()
            uid = item.user_id
            if uid in self.held:
                self.held[uid].append(item)
                continue
            client = self.clients.get(uid)
            if client is None:
                continue
            message = item.message
            if self.tamper is not None:
                message = self.tamper(uid, message)
            self.log.append((uid, message.op))
            if isinstance(message, SendBinary):
                seq = self._seq.get(uid, 0) + 1
                self._seq[uid] = seq
                got_seq, op, payload = parse_server_binary(
                    pack_server_binary(seq, message.op, message.payload)
                )
                assert got_seq == seq
                outputs = client.receive_binary(op, payload)
            else:
                outputs = client.receive_json(message.op, message.data)
            for out in outputs:
                if isinstance(out, SendBinary) and out.op == 28 and uid in self.held_commits:
                    self.held_commits[uid].append(out)
                elif isinstance(out, SendBinary):
                    op, payload = parse_client_binary(out.frame())
                    queue.extend(self.channel.receive_binary(uid, op, payload))
                else:
                    queue.extend(self.channel.receive_json(uid, out.op, out.data))
            if self.on_step is not None:
                self.on_step()


def opus_like(i: int) -> bytes:
    """A distinct 60-byte stand-in for an Opus frame (TOC byte 0xFC: CELT, 20 ms, stereo)."""
    return bytes([0xFC]) + bytes((i * 7 + k) % 251 for k in range(59))
