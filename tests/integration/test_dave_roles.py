"""DAVE with realistic roles (issue #12, section 4): Legato among discord.py clients.

The sandbox's listener is not the group's founder here: it is either not a member at all
(``"off"``: the server only relays and records) or joins late and never commits (``"late"``),
so Legato and discord.py's stock clients (through ``davey``) found the group, commit, race and
leave as they do on Discord. In every scenario every other member decrypts what Legato sent,
with its own DAVE session, and every member shows the same voice privacy code.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack

import discord.http
import pytest

from legato.sandbox.dave import DAVE_MAGIC_MARKER
from legato.sandbox.dave_listener import DaveChannel
from legato.sandbox.voice import DAVE_LISTENER_ID, SandboxVoiceServer
from legato.voice.dave import OPUS_SILENCE
from legato.voice.gateway import VoiceConnection
from tests.integration.dave_members import (
    CHANNEL,
    GUARD,
    GUILD,
    LEGATO,
    DpyMember,
    legato_in_epoch,
    legato_member,
    legato_plays,
    settled,
)
from tests.integration.dpy_voice import dpy_http
from tests.integration.voice_support import Player, tone_frames, voice_server

pytestmark = pytest.mark.integration

ALICE = 7201
BOB = 7202
CAROL = 7203


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as stack:
        yield stack


async def _server(stack: AsyncExitStack, listener: str) -> SandboxVoiceServer:
    return await stack.enter_async_context(
        voice_server(tls=True, dave_protocol_version=1, dave_listener=listener)
    )


async def _dpy(
    stack: AsyncExitStack, server: SandboxVoiceServer, http: discord.http.HTTPClient, user_id: int
) -> DpyMember:
    member = DpyMember(server, http, user_id)
    await member.connect()
    stack.push_async_callback(member.disconnect)
    return member


def _codes(
    conn: VoiceConnection, members: Iterable[DpyMember], dave: DaveChannel
) -> set[str | None]:
    codes = {conn.voice_privacy_code} | {m.privacy_code for m in members}
    listener = dave.joined_listener
    if listener is not None:
        codes.add(listener.client.privacy_code)
    return codes


def _assert_agree(conn: VoiceConnection, members: Iterable[DpyMember], dave: DaveChannel) -> None:
    codes = _codes(conn, members, dave)
    assert len(codes) == 1, codes
    code = codes.pop()
    assert code is not None
    assert len(code) == 30


async def _everyone_hears_legato(
    server: SandboxVoiceServer, conn: VoiceConnection, members: Iterable[DpyMember]
) -> None:
    """Legato plays a short tone; every discord.py member decrypts each frame to what was sent,
    and so does the listener when it is a member."""
    frames = tone_frames(0.4)
    wire = await legato_plays(server, conn, frames)
    assert len(wire) == len(frames)
    assert all(f.endswith(DAVE_MAGIC_MARKER) for f in wire)
    for member in members:
        assert member.hears(LEGATO, wire) == frames, member.user_id
    if server.dave_channel(GUILD, CHANNEL).joined_listener is not None:
        # The listener decrypted each frame on arrival (a frame decrypts once: davey refuses
        # a replayed nonce); its recording holds what it heard.
        heard = server.recording(LEGATO, GUILD).opus_frames()
        assert [f for f in heard if f != OPUS_SILENCE][-len(frames) :] == frames
        assert server.stats.dave_undecryptable == 0


@pytest.mark.parametrize("listener", ["off", "late"])
async def test_legato_first_and_alone_founds_the_group(
    stack: AsyncExitStack, listener: str
) -> None:
    server = await _server(stack, listener)
    http = await stack.enter_async_context(dpy_http(server))
    conn = await stack.enter_async_context(legato_member(server))
    # Alone: op25 and its key package, and no group until someone else arrives.
    await server.wait_dave_group(GUILD, CHANNEL, lambda ch: LEGATO in ch.server.pending_members)
    assert not conn.can_send
    assert conn.voice_privacy_code is None
    # alice arrives: the external sender proposes alice to Legato's pending group and Legato
    # to alice's; both commit, and the first commit the server gets founds the group. alice's
    # is slow on the wire here, so Legato's founds it and alice is welcomed.
    server.hold_dave_commits(ALICE)
    alice = await _dpy(stack, server, http, ALICE)
    await server.wait_dave_commit_held(ALICE, timeout=GUARD)
    expected = {LEGATO, ALICE} | ({DAVE_LISTENER_ID} if listener == "late" else set())
    epoch = 1 if listener == "off" else 2
    dave = await settled(server, expected, epoch=epoch)
    await legato_in_epoch(conn, epoch)
    assert dave.server.group_members[0] == LEGATO
    assert conn.dave.stats.commits_sent >= 1
    await server.release_dave_commits(ALICE)
    assert dave.server.stats.ignored_commits >= 1  # alice's founding commit lost
    assert dave.server.stats.bad_commits == 0
    _assert_agree(conn, [alice], dave)
    await _everyone_hears_legato(server, conn, [alice])


async def test_a_founding_race_won_by_a_discord_py_client(stack: AsyncExitStack) -> None:
    server = await _server(stack, "off")
    http = await stack.enter_async_context(dpy_http(server))
    conn = await stack.enter_async_context(legato_member(server))
    await server.wait_dave_group(GUILD, CHANNEL, lambda ch: LEGATO in ch.server.pending_members)
    # Legato's founding commit is the slow one: alice's founds the group, and Legato, with a
    # commit of its own pending, joins through alice's welcome instead.
    server.hold_dave_commits(LEGATO)
    alice = await _dpy(stack, server, http, ALICE)
    await server.wait_dave_commit_held(LEGATO, timeout=GUARD)
    dave = await settled(server, {ALICE, LEGATO}, epoch=1)
    await legato_in_epoch(conn, 1)
    assert dave.server.group_members == (ALICE, LEGATO)
    await server.release_dave_commits(LEGATO)
    stats = dave.server.stats
    assert (stats.commits_relayed, stats.ignored_commits, stats.bad_commits) == (1, 1, 0)
    assert conn.dave.stats.commits_sent == 1
    assert conn.dave.stats.invalid_welcomes == 0
    assert conn.dave.stats.recoveries == 0
    _assert_agree(conn, [alice], dave)
    await _everyone_hears_legato(server, conn, [alice])


async def test_legato_joins_the_group_discord_py_clients_formed(stack: AsyncExitStack) -> None:
    server = await _server(stack, "late")
    http = await stack.enter_async_context(dpy_http(server))
    alice = await _dpy(stack, server, http, ALICE)
    bob = await _dpy(stack, server, http, BOB)
    # alice and bob raced to found it, then added the late listener.
    dave = await settled(server, {ALICE, BOB, DAVE_LISTENER_ID})
    assert set(dave.server.group_members[:2]) == {ALICE, BOB}
    epoch = dave.server.epoch
    assert epoch is not None
    conn = await stack.enter_async_context(legato_member(server))
    # Legato is added by a discord.py client's commit and joins through its welcome (op30).
    dave = await settled(server, {ALICE, BOB, DAVE_LISTENER_ID, LEGATO}, epoch=epoch + 1)
    await legato_in_epoch(conn, epoch + 1)
    assert conn.dave.stats.commits_sent == 0
    assert conn.dave.stats.transitions_executed == 1
    assert conn.dave.stats.invalid_welcomes == 0
    assert dave.server.stats.bad_commits == 0
    _assert_agree(conn, [alice, bob], dave)
    await _everyone_hears_legato(server, conn, [alice, bob])


async def test_a_commit_race_won_by_a_discord_py_client(stack: AsyncExitStack) -> None:
    server = await _server(stack, "off")
    http = await stack.enter_async_context(dpy_http(server))
    conn = await stack.enter_async_context(legato_member(server))
    server.hold_dave_commits(ALICE)  # Legato founds the group (see the first test)
    alice = await _dpy(stack, server, http, ALICE)
    await settled(server, {LEGATO, ALICE}, epoch=1)
    await legato_in_epoch(conn, 1)
    await server.release_dave_commits(ALICE)
    # bob's Add goes to Legato and alice; both commit it. Legato's commit is slow on the wire:
    # alice's arrives first, and the server relays hers as epoch 2's.
    server.hold_dave_commits(LEGATO)
    bob = await _dpy(stack, server, http, BOB)
    await server.wait_dave_commit_held(LEGATO, timeout=GUARD)
    dave = await settled(server, {LEGATO, ALICE, BOB}, epoch=2)
    await legato_in_epoch(conn, 2)
    assert conn.dave.stats.commits_sent == 2  # the founding commit and the one that lost
    await server.release_dave_commits(LEGATO)
    stats = dave.server.stats
    assert (stats.commits_relayed, stats.ignored_commits, stats.bad_commits) == (2, 2, 0)
    # Legato dropped its own pending commit and applied alice's.
    assert conn.dave.stats.invalid_commits == 0
    assert conn.dave.stats.recoveries == 0
    assert dave.server.epoch == 2
    _assert_agree(conn, [alice, bob], dave)
    await _everyone_hears_legato(server, conn, [alice, bob])


async def test_audio_flows_through_a_lost_race_and_a_departure(stack: AsyncExitStack) -> None:
    """Legato keeps playing while bob joins (a race alice wins) and leaves again: alice hears
    every frame, bob every frame from his welcome to his removal and nothing outside it."""
    server = await _server(stack, "off")
    http = await stack.enter_async_context(dpy_http(server))
    conn = await stack.enter_async_context(legato_member(server))
    server.hold_dave_commits(ALICE)
    alice = await _dpy(stack, server, http, ALICE)
    await settled(server, {LEGATO, ALICE}, epoch=1)
    await legato_in_epoch(conn, 1)
    await server.release_dave_commits(ALICE)
    frames = tone_frames(30.0)  # longer than the test: stopped once the steps are done
    recording = server.recording(LEGATO, GUILD)
    before = recording.frames + recording.dropped
    player = Player(conn, frames)
    playing = asyncio.create_task(player.play())
    await player.wait_sent(25)
    joining = player.sent  # everything before this went out before bob was there
    server.hold_dave_commits(LEGATO)
    bob = DpyMember(server, http, BOB)
    await bob.connect()
    await settled(server, {LEGATO, ALICE, BOB}, epoch=2)
    await legato_in_epoch(conn, 2)
    joined = player.sent  # from here on, epoch 2's keys, which bob has
    await server.release_dave_commits(LEGATO)
    await player.wait_sent(player.sent + 25)
    leaving = player.sent
    await bob.disconnect()
    dave = await settled(server, {LEGATO, ALICE}, epoch=3)
    await legato_in_epoch(conn, 3)
    removed = player.sent  # from here on, epoch 3's keys, which bob never gets
    await player.wait_sent(player.sent + 25)
    playing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await playing
    sent = player.sent
    await recording.wait_arrivals(before + sent, timeout=GUARD)
    wire = server.dave_wire_frames(LEGATO, GUILD)[-sent:]
    assert conn.dave.stats.withheld_frames == 0
    assert alice.hears(LEGATO, wire) == frames[:sent]
    heard = bob.hears(LEGATO, wire)
    first = next(i for i, f in enumerate(heard) if f is not None)
    last = max(i for i, f in enumerate(heard) if f is not None)
    assert heard[first : last + 1] == frames[first : last + 1]
    # bob opens nothing from before he was there, everything while he was (the marks are taken
    # after the events, so they bound the switching frame from one side each), and nothing of
    # the epoch that removed him.
    assert joining <= first <= joined
    assert leaving - 1 <= last < removed
    assert dave.server.stats.bad_commits == 0
    _assert_agree(conn, [alice], dave)


async def test_members_leaving_are_removed_then_a_sole_legato_starts_over(
    stack: AsyncExitStack,
) -> None:
    server = await _server(stack, "off")
    http = await stack.enter_async_context(dpy_http(server))
    conn = await stack.enter_async_context(legato_member(server))
    alice = DpyMember(server, http, ALICE)
    await alice.connect()
    bob = await _dpy(stack, server, http, BOB)
    await settled(server, {LEGATO, ALICE, BOB}, epoch=2)
    await legato_in_epoch(conn, 2)
    await _everyone_hears_legato(server, conn, [alice, bob])
    # alice leaves: the external sender proposes her Remove, Legato or bob commits it.
    await alice.disconnect()
    dave = await settled(server, {LEGATO, BOB}, epoch=3)
    await legato_in_epoch(conn, 3)
    _assert_agree(conn, [bob], dave)
    frames = tone_frames(0.4)
    wire = await legato_plays(server, conn, frames)
    assert bob.hears(LEGATO, wire) == frames
    # alice's session stopped at epoch 2: the frames of epoch 3 do not open for her.
    assert alice.hears(LEGATO, wire) == [None] * len(frames)
    # bob leaves too: Legato is alone in an established group, which is reset (op24, op21 0)
    # instead of being committed by Legato for nobody.
    await bob.disconnect()
    await server.wait_dave_group(GUILD, CHANNEL, lambda ch: ch.server.pending_members == (LEGATO,))
    await conn.wait_dave(lambda d: d.privacy_code is None and not d.media_allowed, GUARD)
    assert dave.server.epoch is None
    # The next member to arrive races Legato's new pending group (held back here): Legato
    # founds again.
    server.hold_dave_commits(CAROL)
    carol = await _dpy(stack, server, http, CAROL)
    dave = await settled(server, {LEGATO, CAROL}, epoch=1)
    await legato_in_epoch(conn, 1)
    await server.release_dave_commits(CAROL)
    assert dave.server.group_members[0] == LEGATO
    assert dave.server.stats.bad_commits == 0
    assert conn.dave.stats.recoveries == 0
    _assert_agree(conn, [carol], dave)
    await _everyone_hears_legato(server, conn, [carol])


async def test_downgrade_to_protocol_0_and_upgrade_back(stack: AsyncExitStack) -> None:
    server = await _server(stack, "late")
    http = await stack.enter_async_context(dpy_http(server))
    conn = await stack.enter_async_context(legato_member(server))
    alice = await _dpy(stack, server, http, ALICE)
    bob = await _dpy(stack, server, http, BOB)
    members = {LEGATO, ALICE, BOB, DAVE_LISTENER_ID}
    dave = await settled(server, members)
    epoch = dave.server.epoch
    assert epoch is not None
    await legato_in_epoch(conn, epoch)
    # Downgrade: op21 to protocol 0, everyone ready (op23), op22 executes it.
    await server.dave_downgrade(GUILD, CHANNEL)
    await server.wait_dave_group(
        GUILD,
        CHANNEL,
        lambda ch: ch.server.protocol_version == 0 and not ch.server.open_transitions,
    )
    await conn.wait_dave(lambda d: d.protocol_version == 0 and not d.pending_transitions, GUARD)
    assert conn.voice_privacy_code is None
    assert conn.can_send
    frames = tone_frames(0.4)
    wire = await legato_plays(server, conn, frames)
    assert wire == frames  # plaintext on the wire, as the protocol now is
    # davey passes it through: each discord.py client opened its passthrough window at op21,
    # before answering op23, so before the server could execute the downgrade.
    for member in (alice, bob):
        assert member.hears(LEGATO, wire) == frames
    # Upgrade: op24 epoch 1 (a new group for protocol 1); the members race to found it, and
    # the founding commit's execute switches everyone back to DAVE.
    await server.dave_upgrade(GUILD, CHANNEL)
    dave = await settled(server, members)
    assert dave.server.protocol_version == 1
    epoch = dave.server.epoch
    assert epoch is not None
    await legato_in_epoch(conn, epoch)
    assert conn.dave.protocol_version == 1
    for member in (alice, bob):
        # Set by op24, which came before the key package that let the group form.
        assert member.vc._connection.dave_protocol_version == 1
    assert dave.server.stats.bad_commits == 0
    assert conn.dave.stats.withheld_frames == 0
    _assert_agree(conn, [alice, bob], dave)
    await _everyone_hears_legato(server, conn, [alice, bob])


async def test_legato_resume_keeps_its_group_and_a_new_session_rejoins(
    stack: AsyncExitStack,
) -> None:
    server = await _server(stack, "off")
    http = await stack.enter_async_context(dpy_http(server))
    conn = await stack.enter_async_context(legato_member(server))
    alice = await _dpy(stack, server, http, ALICE)
    bob = await _dpy(stack, server, http, BOB)
    dave = await settled(server, {LEGATO, ALICE, BOB}, epoch=2)
    await legato_in_epoch(conn, 2)
    code = conn.voice_privacy_code
    # A dropped connection that resumes (op7) is the same voice session: same leaf, same
    # epoch, same keys; nobody commits anything.
    await server.inject_drop(LEGATO, server_id=GUILD)
    await server.wait_resumed(LEGATO, timeout=GUARD)
    await conn.wait_connected(timeout=GUARD)
    assert conn.gateway_stats.resumes == 1
    assert dave.server.epoch == 2
    assert dave.server.stats.commits_relayed == 2
    assert conn.voice_privacy_code == code
    _assert_agree(conn, [alice, bob], dave)
    await _everyone_hears_legato(server, conn, [alice, bob])
    # A session the server no longer knows (4006) identifies anew: a new MLS session, so its
    # old leaf is removed and its new key package added, in one commit by a discord.py
    # client (Legato, not in the group with its new session, cannot commit it).
    await server.inject_close(LEGATO, 4006, server_id=GUILD)
    await server.wait_identified(LEGATO, count=2, timeout=GUARD)
    await conn.wait_connected(timeout=GUARD)
    dave = await settled(server, {LEGATO, ALICE, BOB}, epoch=3)
    await legato_in_epoch(conn, 3)
    assert conn.dave.stats.invalid_welcomes == 0
    assert dave.server.stats.bad_commits == 0
    assert conn.voice_privacy_code != code
    _assert_agree(conn, [alice, bob], dave)
    await _everyone_hears_legato(server, conn, [alice, bob])
