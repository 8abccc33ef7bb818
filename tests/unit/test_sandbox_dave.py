"""The sandbox's DAVE server with real davey members: groups form, rekey, recover, downgrade."""

from __future__ import annotations

import pytest

from legato.sandbox.dave import DAVE_MAGIC_MARKER
from legato.sandbox.dave_listener import DaveChannel
from legato.voice.dave import (
    OP_EXECUTE_TRANSITION,
    OP_MLS_ANNOUNCE_COMMIT_TRANSITION,
    OP_MLS_COMMIT_WELCOME,
    OP_MLS_EXTERNAL_SENDER,
    OP_MLS_PROPOSALS,
    OP_MLS_WELCOME,
    OP_PREPARE_EPOCH,
    OP_PREPARE_TRANSITION,
    OPUS_SILENCE,
    DaveClient,
    SendBinary,
    SendJson,
)
from tests.dave_net import BOT_ID, CHANNEL_ID, LISTENER_ID, DaveNet, opus_like

OTHER_ID = 1_100_000_000_000_000_200
THIRD_ID = 1_100_000_000_000_000_300


class Stream:
    """Legato's client sends a frame after every delivered message; the listener decrypts it."""

    def __init__(self, net: DaveNet, sender: DaveClient) -> None:
        self.net = net
        self.sender = sender
        self.sent = 0
        self.heard: list[bytes | None] = []
        self.expected: list[bytes] = []
        net.on_step = self.step

    def step(self) -> None:
        frame = opus_like(self.sent)
        self.sent += 1
        wire = self.sender.encrypt(frame)
        self.expected.append(frame)
        self.heard.append(self.net.channel.listener.decrypt(self.sender.user_id, wire))

    def gaps(self) -> int:
        return sum(1 for got, want in zip(self.heard, self.expected, strict=True) if got != want)


def formed(net: DaveNet, *users: int) -> None:
    epochs = {net.clients[u].session.epoch for u in users}  # type: ignore[union-attr]
    epochs.add(net.listener.session.epoch)  # type: ignore[union-attr]
    assert len(epochs) == 1
    assert epochs == {net.channel.server.epoch}
    codes = {net.clients[u].privacy_code for u in users} | {net.listener.privacy_code}
    assert len(codes) == 1
    code = codes.pop()
    assert code is not None
    assert len(code) == 30
    assert code.isdigit()


def test_group_forms_and_listener_decrypts() -> None:
    net = DaveNet.make()
    bot = net.connect(BOT_ID)
    ops = [op for uid, op in net.log if uid == BOT_ID]
    # op25, then the listener's commit welcomes the bot (op30), and op22 executes it.
    assert ops == [OP_MLS_EXTERNAL_SENDER, OP_MLS_WELCOME, OP_EXECUTE_TRANSITION]
    assert net.channel.server.group_members == (LISTENER_ID, BOT_ID)
    assert net.channel.server.epoch == 1
    assert bot.protocol_version == 1
    assert bot.encrypting
    formed(net, BOT_ID)
    frame = opus_like(1)
    wire = bot.encrypt(frame)
    assert wire != frame
    assert wire.endswith(DAVE_MAGIC_MARKER)
    assert frame[1:] not in wire  # the server's copy does not carry the Opus payload
    assert net.channel.listener.decrypt(BOT_ID, wire) == frame
    assert bot.stats.encrypted_frames == 1
    assert net.channel.server.stats.transitions_executed == 1


def test_legato_commits_when_preferred() -> None:
    net = DaveNet.make(preferred_committer=BOT_ID)
    bot = net.connect(BOT_ID)
    ops = [op for uid, op in net.log if uid == BOT_ID]
    # The bot founds the group: proposals to it, its commit announced back to it.
    assert ops == [
        OP_MLS_EXTERNAL_SENDER,
        OP_MLS_PROPOSALS,
        OP_MLS_ANNOUNCE_COMMIT_TRANSITION,
        OP_EXECUTE_TRANSITION,
    ]
    assert bot.stats.commits_sent == 1
    assert net.channel.server.group_members == (BOT_ID, LISTENER_ID)
    formed(net, BOT_ID)
    frame = opus_like(2)
    assert net.channel.listener.decrypt(BOT_ID, bot.encrypt(frame)) == frame


@pytest.mark.parametrize("committer", [None, BOT_ID])
def test_member_joins_and_leaves_mid_stream_without_a_gap(committer: int | None) -> None:
    net = DaveNet.make(preferred_committer=committer)
    bot = net.connect(BOT_ID)
    stream = Stream(net, bot)
    other = net.connect(OTHER_ID)
    assert set(net.channel.server.group_members) == {LISTENER_ID, BOT_ID, OTHER_ID}
    assert net.channel.server.group_members[-1] == OTHER_ID
    formed(net, BOT_ID, OTHER_ID)
    assert net.channel.server.epoch == 2
    frame = opus_like(99)
    wire = bot.encrypt(frame)
    assert other.session.decrypt(BOT_ID, _audio(), wire) == frame  # type: ignore[union-attr]
    net.disconnect(OTHER_ID)
    assert set(net.channel.server.group_members) == {LISTENER_ID, BOT_ID}
    assert net.channel.server.epoch == 3
    formed(net, BOT_ID)
    assert stream.sent > 5
    assert stream.gaps() == 0
    assert net.channel.listener.stats.plaintext == 0
    assert net.channel.server.stats.transitions_executed == 3
    if committer == BOT_ID:
        assert bot.stats.commits_sent == 3
    # The removed member's keys no longer open the bot's frames.
    assert other.session is not None
    with pytest.raises(ValueError, match="ecrypt"):
        other.session.decrypt(BOT_ID, _audio(), bot.encrypt(opus_like(5)))


def test_leaving_before_commit_is_revoked() -> None:
    net = DaveNet.make(preferred_committer=BOT_ID)
    bot = net.connect(BOT_ID)
    net.hold(BOT_ID)
    net.connect(OTHER_ID)
    assert net.channel.server.group_members == (BOT_ID, LISTENER_ID)
    net.disconnect(OTHER_ID)  # before the bot (the committer) saw the proposals
    assert net.channel.server.stats.revokes_sent == 1
    net.release(BOT_ID)
    # The bot committed the append, then the revoke withdrew it: the commit is stale.
    assert net.channel.server.epoch == 1
    assert net.channel.server.stats.commits_relayed == 1
    assert bot.session is not None
    assert bot.session.epoch == 1
    # Nothing stale is left behind: the next member joins normally.
    net.connect(THIRD_ID)
    assert list(net.channel.server.group_members) == [BOT_ID, LISTENER_ID, THIRD_ID]
    formed(net, BOT_ID, THIRD_ID)


def _corrupt(op: int, target: int) -> object:
    done: list[bool] = []

    def tamper(uid: int, message: SendJson | SendBinary) -> SendJson | SendBinary:
        if uid == target and message.op == op and not done and isinstance(message, SendBinary):
            done.append(True)
            body = bytearray(message.payload)
            body[len(body) // 2] ^= 0xFF
            return SendBinary(message.op, bytes(body))
        return message

    return tamper


def test_invalid_welcome_recovers_through_op31() -> None:
    net = DaveNet.make()
    net.tamper = _corrupt(OP_MLS_WELCOME, BOT_ID)  # type: ignore[assignment]
    bot = net.connect(BOT_ID)
    assert bot.stats.invalid_welcomes == 1
    assert bot.stats.recoveries == 1
    assert net.channel.server.stats.invalid_reports == 1
    # Removed and re-added with the fresh key package.
    assert net.channel.server.group_members == (LISTENER_ID, BOT_ID)
    assert net.channel.server.epoch == 2
    assert bot.encrypting
    formed(net, BOT_ID)
    frame = opus_like(3)
    assert net.channel.listener.decrypt(BOT_ID, bot.encrypt(frame)) == frame


def test_invalid_commit_recovers_through_op31() -> None:
    net = DaveNet.make()
    bot = net.connect(BOT_ID)
    stream = Stream(net, bot)
    net.tamper = _corrupt(OP_MLS_ANNOUNCE_COMMIT_TRANSITION, BOT_ID)  # type: ignore[assignment]
    net.connect(OTHER_ID)
    assert bot.stats.invalid_commits == 1
    assert bot.stats.recoveries == 1
    assert net.channel.server.stats.invalid_reports == 1
    assert set(net.channel.server.group_members) == {LISTENER_ID, BOT_ID, OTHER_ID}
    assert net.channel.server.open_transitions == {}
    formed(net, BOT_ID, OTHER_ID)
    frame = opus_like(4)
    assert net.channel.listener.decrypt(BOT_ID, bot.encrypt(frame)) == frame
    assert stream.sent > 0


def test_downgrade_to_plaintext_and_back() -> None:
    net = DaveNet.make()
    bot = net.connect(BOT_ID)
    stream = Stream(net, bot)
    net.deliver(net.channel.downgrade())
    assert (BOT_ID, OP_PREPARE_TRANSITION) in net.log
    assert net.channel.server.protocol_version == 0
    assert bot.protocol_version == 0
    assert not bot.encrypting
    assert bot.privacy_code is None
    frame = opus_like(7)
    assert bot.encrypt(frame) == frame
    assert net.channel.server.epoch is None

    net.deliver(net.channel.upgrade())
    assert (BOT_ID, OP_PREPARE_EPOCH) in net.log
    assert net.channel.server.protocol_version == 1
    assert bot.protocol_version == 1
    assert bot.encrypting
    assert net.channel.server.epoch == 1
    formed(net, BOT_ID)
    wire = bot.encrypt(frame)
    assert wire != frame
    assert net.channel.listener.decrypt(BOT_ID, wire) == frame
    # Every frame sent through both transitions was heard (plaintext while at protocol 0, and
    # in the upgrade's window: the listener executes it before the bot's op22 arrives).
    assert stream.gaps() == 0
    assert net.channel.listener.stats.plaintext > 0
    assert net.channel.listener.stats.plaintext_dropped == 0


def test_plaintext_from_a_member_whose_group_is_in_force_is_dropped() -> None:
    net = DaveNet.make()
    listener = net.channel.listener
    bot = DaveClient(BOT_ID, CHANNEL_ID)
    net.clients[BOT_ID] = bot
    net.hold(BOT_ID)
    bot_first = bot.start(net.channel.server.session_protocol_version)
    net.deliver(net.channel.join(BOT_ID))
    net.send(BOT_ID, bot_first)
    # No group is in force yet (the listener is alone): plaintext is what the protocol carries.
    assert listener.decrypt(BOT_ID, opus_like(0)) == opus_like(0)
    net.release(BOT_ID)
    assert bot.encrypting
    # The group is in force: plaintext from its member is dropped, as Discord's receivers do...
    assert listener.decrypt(BOT_ID, opus_like(1)) is None
    # ...and from a sender outside the group too (no decryptor for it).
    assert listener.decrypt(OTHER_ID, opus_like(2)) is None
    assert listener.decrypt(BOT_ID, OPUS_SILENCE) == OPUS_SILENCE
    assert listener.decrypt(BOT_ID, bot.encrypt(opus_like(3))) == opus_like(3)
    assert listener.stats.plaintext == 1
    assert listener.stats.plaintext_dropped == 2
    assert listener.stats.failed == 0
    # A downgrade opens the window: from its prepare (op21) plaintext is heard again.
    net.hold(BOT_ID)
    net.deliver(net.channel.downgrade())
    assert net.listener.protocol_version == 1  # prepared, not executed: the bot is not ready
    assert listener.decrypt(BOT_ID, opus_like(4)) == opus_like(4)
    net.release(BOT_ID)
    assert net.listener.protocol_version == 0
    assert listener.decrypt(BOT_ID, opus_like(5)) == opus_like(5)
    assert listener.stats.plaintext_dropped == 2


def test_alone_with_no_dave_member_there_is_no_group() -> None:
    channel = DaveChannel(5, listener_id=LISTENER_ID)
    assert channel.take_held() == []
    assert channel.server.epoch is None
    assert channel.server.group_members == ()
    assert channel.listener.client.privacy_code is None


def test_plaintext_channel_sends_no_dave() -> None:
    net = DaveNet(DaveChannel(6, listener_id=LISTENER_ID, protocol_version=0))
    bot = net.connect(BOT_ID)
    assert net.log == []
    assert bot.protocol_version == 0
    assert net.channel.server.accepts(0)  # protocol 0 accepts anyone
    frame = opus_like(8)
    assert bot.encrypt(frame) == frame


def test_accepts_only_dave_clients_on_a_dave_channel() -> None:
    net = DaveNet.make()
    assert net.channel.server.accepts(1)
    assert not net.channel.server.accepts(0)


def test_server_refuses_forged_key_packages_and_commits() -> None:
    net = DaveNet.make()
    bot = net.connect(BOT_ID)
    server = net.channel.server
    assert bot.session is not None
    package = bot.session.get_serialized_key_package()
    # Someone else's key package (identity mismatch), a tampered one, garbage.
    assert net.channel.receive_binary(OTHER_ID, 26, package) == []  # not a member: ignored
    net.channel.join(OTHER_ID)
    assert net.channel.receive_binary(OTHER_ID, 26, package) == []
    tampered = bytearray(package)
    tampered[-10] ^= 1
    assert net.channel.receive_binary(BOT_ID, 26, bytes(tampered)) == []
    assert net.channel.receive_binary(BOT_ID, 26, b"\x00\x01garbage") == []
    assert server.stats.bad_key_packages == 3
    # A commit when no round is open is dropped; garbage JSON is counted.
    assert net.channel.receive_binary(BOT_ID, OP_MLS_COMMIT_WELCOME, b"\x00") == []
    assert server.stats.ignored_commits == 1
    assert net.channel.receive_json(BOT_ID, 23, {"transition_id": "x"}) == []
    assert net.channel.receive_json(BOT_ID, 23, {"transition_id": 4242}) == []
    assert server.stats.malformed == 1
    assert server.stats.unknown_transition_ready == 1
    assert server.group_members == (LISTENER_ID, BOT_ID)


def _audio() -> object:
    import davey

    return davey.MediaType.audio


def test_identifying_again_replaces_the_old_leaf() -> None:
    net = DaveNet.make()
    net.connect(BOT_ID)
    assert net.channel.server.epoch == 1
    bot = net.connect(BOT_ID)  # a new voice session: a fresh MLS session, same user
    assert net.channel.server.group_members == (LISTENER_ID, BOT_ID)
    assert net.channel.server.epoch == 2  # one commit: Remove the old leaf, Add the new one
    formed(net, BOT_ID)
    frame = opus_like(11)
    assert net.channel.listener.decrypt(BOT_ID, bot.encrypt(frame)) == frame
