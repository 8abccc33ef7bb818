"""The sandbox's DAVE group when its listener does not found it: clients found, race and leave."""

from __future__ import annotations

import davey
import pytest

from legato.sandbox.dave_listener import ListenerRole
from legato.voice.dave import (
    OP_EXECUTE_TRANSITION,
    OP_MLS_ANNOUNCE_COMMIT_TRANSITION,
    OP_MLS_EXTERNAL_SENDER,
    OP_MLS_PROPOSALS,
    OP_MLS_WELCOME,
    OP_PREPARE_EPOCH,
    OP_PREPARE_TRANSITION,
)
from tests.dave_net import BOT_ID, LISTENER_ID, DaveNet, opus_like

OTHER_ID = 1_100_000_000_000_000_200
THIRD_ID = 1_100_000_000_000_000_300
FOURTH_ID = 1_100_000_000_000_000_400


def _codes(net: DaveNet, *users: int) -> set[str | None]:
    codes = {net.clients[u].privacy_code for u in users}
    listener = net.channel.joined_listener
    if listener is not None:
        codes.add(listener.client.privacy_code)
    return codes


def _hears(net: DaveNet, receiver: int, sender: int) -> bool:
    frame = opus_like(sender % 97)
    session = net.clients[receiver].session
    assert session is not None
    wire = net.clients[sender].encrypt(frame)
    return bool(session.decrypt(sender, davey.MediaType.audio, wire) == frame)


def _ops(net: DaveNet, user_id: int) -> list[int]:
    return [op for uid, op in net.log if uid == user_id]


@pytest.mark.parametrize("first_commit", ["bot", "other"])
def test_without_a_listener_the_clients_race_to_found_the_group(first_commit: str) -> None:
    net = DaveNet.make(listener_role=ListenerRole.OFF)
    assert net.channel.joined_listener is None
    bot = net.connect(BOT_ID)
    # Alone: its key package waits, there is no group and nothing to commit.
    assert net.channel.server.pending_members == (BOT_ID,)
    assert net.channel.server.epoch is None
    assert _ops(net, BOT_ID) == [OP_MLS_EXTERNAL_SENDER]
    assert not bot.media_allowed
    founder, loser = (BOT_ID, OTHER_ID) if first_commit == "bot" else (OTHER_ID, BOT_ID)
    net.hold_commits(loser)
    other = net.connect(OTHER_ID)
    # Each pending member got the other's Add proposal and committed it to its own pending
    # group; the first commit founded the group, and the other member was welcomed.
    assert _ops(net, founder)[-3:] == [
        OP_MLS_PROPOSALS,
        OP_MLS_ANNOUNCE_COMMIT_TRANSITION,
        OP_EXECUTE_TRANSITION,
    ]
    assert _ops(net, loser)[-3:] == [OP_MLS_PROPOSALS, OP_MLS_WELCOME, OP_EXECUTE_TRANSITION]
    assert net.channel.server.group_members == (founder, loser)
    assert bot.stats.commits_sent == other.stats.commits_sent == 1
    net.release_commits(loser)
    assert net.channel.server.stats.ignored_commits == 1
    assert net.channel.server.stats.bad_commits == 0
    assert bot.stats.invalid_welcomes == other.stats.invalid_welcomes == 0
    assert len(_codes(net, BOT_ID, OTHER_ID)) == 1
    assert _hears(net, OTHER_ID, BOT_ID)
    assert _hears(net, BOT_ID, OTHER_ID)
    with pytest.raises(LookupError):
        _ = net.channel.listener


def test_a_late_listener_is_welcomed_by_the_clients_and_never_commits() -> None:
    net = DaveNet.make(listener_role=ListenerRole.LATE)
    bot = net.connect(BOT_ID)
    assert net.channel.joined_listener is None  # no group yet: the listener waits
    net.connect(OTHER_ID)
    listener = net.channel.listener
    # The clients founded the group (the bot's commit, delivered first, won); then the
    # listener's Add went to both clients and a client's commit (the bot's again) added it.
    assert net.channel.server.group_members == (BOT_ID, OTHER_ID, LISTENER_ID)
    assert net.channel.server.epoch == 2
    assert bot.stats.commits_sent == 2
    assert net.channel.server.stats.ignored_commits == 2  # the other's, for the same epochs
    assert net.channel.server.stats.commits_relayed == 2
    assert len(_codes(net, BOT_ID, OTHER_ID)) == 1
    frame = opus_like(5)
    assert listener.decrypt(BOT_ID, bot.encrypt(frame)) == frame
    # A third client: the listener sees the proposals but its commit is never taken.
    third = net.connect(THIRD_ID)
    assert net.channel.server.epoch == 3
    assert listener.client.stats.commits_sent == 1  # made (for the third), kept to itself
    assert net.channel.server.stats.ignored_commits == 3  # the other's again, not the listener's
    assert len(_codes(net, BOT_ID, OTHER_ID, THIRD_ID)) == 1
    assert _hears(net, THIRD_ID, BOT_ID)
    assert third.stats.commits_sent == 0


def test_a_commit_for_an_epoch_already_committed_lost_the_race() -> None:
    net = DaveNet.make(listener_role=ListenerRole.OFF)
    bot = net.connect(BOT_ID)
    other = net.connect(OTHER_ID)  # the bot's founding commit won (delivered first)
    ignored = net.channel.server.stats.ignored_commits
    net.hold_commits(BOT_ID)
    net.connect(THIRD_ID)
    # The bot committed the third's Add too, but its commit is still on the wire: the other's
    # commit arrived first and won; the bot applied it instead of its own.
    assert len(net.held_commits[BOT_ID]) == 1
    assert other.stats.commits_sent == 2
    assert net.channel.server.epoch == 2
    assert bot.session is not None
    assert bot.session.epoch == 2
    # The next round opens (a fourth member) before the stale commit gets through: the others
    # are slow to see it, and the bot's commit for it waits behind the stale one.
    net.hold(OTHER_ID)
    net.hold(THIRD_ID)
    net.connect(FOURTH_ID)
    assert len(net.held_commits[BOT_ID]) == 2
    net.release_commits(BOT_ID)
    stats = net.channel.server.stats
    # The stale commit lost its race (not a bad one); the bot's next commit won this round.
    assert (stats.ignored_commits - ignored, stats.bad_commits) == (1, 0)
    net.release(OTHER_ID)
    net.release(THIRD_ID)
    assert net.channel.server.epoch == 3
    assert stats.ignored_commits - ignored == 3  # and the other two's for epoch 2
    assert set(net.channel.server.group_members) == {BOT_ID, OTHER_ID, THIRD_ID, FOURTH_ID}
    assert len(_codes(net, BOT_ID, OTHER_ID, THIRD_ID, FOURTH_ID)) == 1
    assert _hears(net, THIRD_ID, BOT_ID)
    assert _hears(net, FOURTH_ID, BOT_ID)
    assert bot.stats.invalid_commits == 0


def test_the_sole_remaining_member_is_reset_and_founds_the_next_group() -> None:
    net = DaveNet.make(listener_role=ListenerRole.OFF)
    bot = net.connect(BOT_ID)
    net.connect(OTHER_ID)
    net.log.clear()
    net.disconnect(OTHER_ID)
    # Alone in an established group: no commit (nobody to encrypt for), the group is dropped.
    assert _ops(net, BOT_ID) == [OP_PREPARE_EPOCH, OP_PREPARE_TRANSITION]
    assert net.channel.server.epoch is None
    assert not net.channel.server.group_members
    assert net.channel.server.pending_members == (BOT_ID,)  # its fresh key package
    assert bot.privacy_code is None
    assert not bot.media_allowed
    net.connect(THIRD_ID)
    assert net.channel.server.group_members == (BOT_ID, THIRD_ID)
    assert net.channel.server.epoch == 1
    assert bot.encrypting
    assert len(_codes(net, BOT_ID, THIRD_ID)) == 1
    assert _hears(net, THIRD_ID, BOT_ID)


def test_a_late_listener_left_with_no_committer_is_reset() -> None:
    net = DaveNet.make(listener_role=ListenerRole.LATE)
    net.connect(BOT_ID)
    net.connect(OTHER_ID)
    net.disconnect(OTHER_ID)
    assert net.channel.server.group_members == (BOT_ID, LISTENER_ID)
    net.disconnect(BOT_ID)
    # Only the listener is left, and it does not commit: the group is dropped, not stuck.
    assert net.channel.server.epoch is None
    assert net.channel.server.open_transitions == {}
    assert net.channel.server.pending_members == (LISTENER_ID,)
    bot = net.connect(BOT_ID)
    net.connect(THIRD_ID)
    # The bot founds (the listener never does) and adds the listener with the third.
    assert set(net.channel.server.group_members) == {BOT_ID, THIRD_ID, LISTENER_ID}
    assert net.channel.server.group_members[0] == BOT_ID
    assert len(_codes(net, BOT_ID, THIRD_ID)) == 1
    frame = opus_like(9)
    assert net.channel.listener.decrypt(BOT_ID, bot.encrypt(frame)) == frame


def test_a_member_leaving_during_a_founding_race_is_revoked() -> None:
    net = DaveNet.make(listener_role=ListenerRole.OFF)
    bot = net.connect(BOT_ID)
    net.hold(BOT_ID)
    net.hold(OTHER_ID)
    net.connect(OTHER_ID)
    net.disconnect(OTHER_ID)  # before anyone saw the founding proposals
    # The bot's Add for the other is revoked; with nothing left for it to commit, the round
    # is over and nobody founds anything.
    assert net.channel.server.stats.revokes_sent == 1
    net.release(BOT_ID)
    assert net.channel.server.epoch is None
    assert net.channel.server.stats.commits_relayed == 0
    assert net.channel.server.stats.bad_commits == 0
    # The next arrival starts a founding race as usual, with nothing stale in it.
    net.connect(THIRD_ID)
    assert net.channel.server.group_members == (BOT_ID, THIRD_ID)
    assert net.channel.server.stats.bad_commits == 0
    assert len(_codes(net, BOT_ID, THIRD_ID)) == 1
    assert _hears(net, THIRD_ID, BOT_ID)
    assert bot.stats.invalid_commits == bot.stats.invalid_welcomes == 0
