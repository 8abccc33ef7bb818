"""Legato's client-side DAVE component: framing, transitions, encryption rules, bad input."""

from __future__ import annotations

import davey
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from legato.sandbox.dave import pack_server_binary, parse_client_binary
from legato.voice.dave import (
    MAX_PROTOCOL_VERSION,
    OP_EXECUTE_TRANSITION,
    OP_MLS_ANNOUNCE_COMMIT_TRANSITION,
    OP_MLS_EXTERNAL_SENDER,
    OP_MLS_INVALID_COMMIT_WELCOME,
    OP_MLS_KEY_PACKAGE,
    OP_MLS_PROPOSALS,
    OP_MLS_WELCOME,
    OP_PREPARE_EPOCH,
    OP_PREPARE_TRANSITION,
    OP_TRANSITION_READY,
    OPUS_SILENCE,
    DaveClient,
    MalformedDaveFrame,
    SendBinary,
    SendJson,
    pack_client_binary,
    parse_server_binary,
)
from tests.dave_net import BOT_ID, CHANNEL_ID, LISTENER_ID, DaveNet, opus_like
from tests.unit.test_layering import FORBIDDEN, ROOT, imported_roots


def test_binary_framing() -> None:
    assert parse_server_binary(b"\x01\x02\x1b\x00abc") == (0x0102, 27, b"\x00abc")
    assert parse_server_binary(b"\xff\xff\x19") == (0xFFFF, 25, b"")
    assert pack_server_binary(0x10002, 29, b"xy") == b"\x00\x02\x1dxy"  # seq is 16 bits
    assert pack_client_binary(26, b"kp") == b"\x1akp"
    assert parse_client_binary(b"\x1ckp") == (28, b"kp")
    assert SendBinary(28, b"c").frame() == b"\x1cc"
    with pytest.raises(MalformedDaveFrame):
        parse_server_binary(b"\x00\x01")
    with pytest.raises(MalformedDaveFrame):
        parse_client_binary(b"")


def test_start_sends_a_key_package_and_allows_no_media_until_executed() -> None:
    client = DaveClient(BOT_ID, CHANNEL_ID)
    assert client.max_protocol_version == MAX_PROTOCOL_VERSION == 1
    out = client.start(1)
    assert len(out) == 1
    assert isinstance(out[0], SendBinary)
    assert out[0].op == OP_MLS_KEY_PACKAGE
    assert len(out[0].payload) > 100
    assert client.protocol_version == 0
    assert not client.encrypting
    assert client.privacy_code is None
    # DAVE is negotiated: before the group is in force no plaintext goes out (issue #12).
    assert not client.media_allowed
    frame = opus_like(1)
    assert client.encrypt(frame) == OPUS_SILENCE
    assert client.encrypt(OPUS_SILENCE) == OPUS_SILENCE
    assert client.stats.withheld_frames == 1
    assert client.stats.passthrough_frames == 0


def test_media_is_allowed_once_the_first_transition_executes() -> None:
    net = DaveNet.make()
    bot = DaveClient(BOT_ID, CHANNEL_ID)
    net.clients[BOT_ID] = bot
    net.hold(BOT_ID)  # op25 and the welcome wait, as on a slow link
    first = bot.start(net.channel.server.session_protocol_version)
    net.deliver(net.channel.join(BOT_ID))
    net.send(BOT_ID, first)
    assert not bot.media_allowed
    assert bot.encrypt(opus_like(1)) == OPUS_SILENCE
    net.release(BOT_ID)
    assert bot.protocol_version == 1
    assert bot.media_allowed
    wire = bot.encrypt(opus_like(2))
    assert net.channel.listener.decrypt(BOT_ID, wire) == opus_like(2)
    assert bot.stats.withheld_frames == 1
    assert bot.stats.passthrough_frames == 0


def test_protocol_zero_makes_no_session() -> None:
    client = DaveClient(BOT_ID, CHANNEL_ID)
    assert client.start(0) == []
    assert client.session is None
    assert client.media_allowed
    # Binary DAVE ops without a session are ignored, not errors.
    assert client.receive_binary(OP_MLS_EXTERNAL_SENDER, b"\x00") == []
    assert client.encrypt(b"\xfc\x01") == b"\xfc\x01"


def test_downgrade_transition_is_acknowledged_then_executed() -> None:
    net = DaveNet.make()
    bot = net.connect(BOT_ID)
    assert bot.encrypting
    out = bot.receive_json(OP_PREPARE_TRANSITION, {"transition_id": 77, "protocol_version": 0})
    assert out == [SendJson(OP_TRANSITION_READY, {"transition_id": 77})]
    assert bot.pending_transitions == {77: 0}
    # Still encrypting until the execute.
    assert bot.encrypt(opus_like(2)) != opus_like(2)
    assert bot.receive_json(OP_EXECUTE_TRANSITION, {"transition_id": 77}) == []
    assert bot.protocol_version == 0
    # The downgrade's window: plaintext is what the protocol expects now.
    assert bot.media_allowed
    assert bot.encrypt(opus_like(2)) == opus_like(2)
    assert bot.privacy_code is None
    # The upgrade back announces a new group: plaintext goes on until it executes.
    bot.receive_json(OP_PREPARE_EPOCH, {"epoch": 1, "protocol_version": 1})
    assert bot.media_allowed
    assert bot.encrypt(opus_like(3)) == opus_like(3)


def test_execute_before_prepare_is_applied_when_prepared() -> None:
    net = DaveNet.make()
    bot = net.connect(BOT_ID)
    assert bot.receive_json(OP_EXECUTE_TRANSITION, {"transition_id": 9}) == []
    assert bot.stats.unknown_transitions == 1
    assert bot.protocol_version == 1
    out = bot.receive_json(OP_PREPARE_TRANSITION, {"transition_id": 9, "protocol_version": 0})
    assert out == [SendJson(OP_TRANSITION_READY, {"transition_id": 9})]
    assert bot.protocol_version == 0
    assert bot.pending_transitions == {}


def test_transition_zero_executes_at_once() -> None:
    net = DaveNet.make()
    bot = net.connect(BOT_ID)
    assert (
        bot.receive_json(OP_PREPARE_TRANSITION, {"transition_id": 0, "protocol_version": 0}) == []
    )
    assert bot.protocol_version == 0


def test_privacy_code_matches_the_listener() -> None:
    net = DaveNet.make()
    bot = net.connect(BOT_ID)
    assert bot.privacy_code is not None
    assert bot.privacy_code == net.listener.privacy_code
    assert bot.session is not None
    assert bot.session.voice_privacy_code == bot.privacy_code


def test_silence_is_not_encrypted_and_rejoining_withholds_plaintext() -> None:
    net = DaveNet.make()
    bot = net.connect(BOT_ID)
    assert bot.encrypt(OPUS_SILENCE) == OPUS_SILENCE
    # A fresh group is announced (op24 epoch 1): until it is formed, no plaintext goes out.
    out = bot.receive_json(OP_PREPARE_EPOCH, {"epoch": 1, "protocol_version": 1})
    assert [o.op for o in out] == [OP_MLS_KEY_PACKAGE]
    assert not bot.encrypting
    assert not bot.media_allowed
    assert bot.encrypt(opus_like(3)) == OPUS_SILENCE
    assert bot.stats.withheld_frames == 1


def test_garbage_commit_at_execute_sends_op31_and_a_fresh_key_package() -> None:
    net = DaveNet.make()
    bot = net.connect(BOT_ID)
    out = bot.receive_binary(OP_MLS_ANNOUNCE_COMMIT_TRANSITION, b"\x00\x05garbage")
    assert out == [SendJson(OP_TRANSITION_READY, {"transition_id": 5})]
    out = bot.receive_json(OP_EXECUTE_TRANSITION, {"transition_id": 5})
    assert out[0] == SendJson(OP_MLS_INVALID_COMMIT_WELCOME, {"transition_id": 5})
    assert isinstance(out[1], SendBinary)
    assert out[1].op == OP_MLS_KEY_PACKAGE
    assert bot.stats.invalid_commits == 1
    assert bot.stats.recoveries == 1
    # transition 0 is processed at once, so the failure answers immediately.
    out = bot.receive_binary(OP_MLS_WELCOME, b"\x00\x00\x00\x02zz")
    assert out[0] == SendJson(OP_MLS_INVALID_COMMIT_WELCOME, {"transition_id": 0})
    assert bot.stats.invalid_welcomes == 1


def test_malformed_ops_are_counted() -> None:
    net = DaveNet.make()
    bot = net.connect(BOT_ID)
    before = bot.stats.malformed
    assert bot.receive_json(OP_PREPARE_TRANSITION, {"transition_id": "1"}) == []
    assert bot.receive_json(OP_EXECUTE_TRANSITION, None) == []
    assert bot.receive_json(OP_PREPARE_EPOCH, {"epoch": -1, "protocol_version": 1}) == []
    assert bot.receive_binary(OP_MLS_PROPOSALS, b"") == []
    assert bot.receive_binary(OP_MLS_PROPOSALS, b"\x07") == []
    assert bot.receive_binary(OP_MLS_WELCOME, b"\x01") == []
    assert bot.stats.malformed == before + 6
    assert bot.receive_binary(OP_MLS_PROPOSALS, b"\x00\x05\x00\x01\x00\x01\x00") == []
    assert bot.stats.bad_proposals == 1
    assert bot.receive_binary(OP_MLS_EXTERNAL_SENDER, b"\x01") == []
    assert bot.stats.bad_external_sender == 1
    # Still in the group and encrypting for the listener.
    frame = opus_like(4)
    assert net.channel.listener.decrypt(BOT_ID, bot.encrypt(frame)) == frame


_json_values = st.none() | st.booleans() | st.integers(-(2**66), 2**66) | st.text(max_size=5)


@settings(max_examples=200, deadline=None)
@given(
    op=st.sampled_from([21, 22, 24, 31, 99]),
    data=st.none()
    | st.dictionaries(
        st.sampled_from(["transition_id", "protocol_version", "epoch"]), _json_values
    ),
)
def test_fuzz_json_never_raises(op: int, data: object) -> None:
    client = DaveClient(BOT_ID, CHANNEL_ID)
    client.start(1)
    for out in client.receive_json(op, data):
        assert out.op in (OP_TRANSITION_READY, OP_MLS_KEY_PACKAGE, OP_MLS_INVALID_COMMIT_WELCOME)


_SHARED: dict[str, DaveClient] = {}


def _group_member() -> DaveClient:
    # One formed group for all examples: fuzzing must not crash a member that is in one.
    if "bot" not in _SHARED:
        _SHARED["bot"] = DaveNet.make().connect(BOT_ID)
    return _SHARED["bot"]


@settings(max_examples=300, deadline=None)
@given(op=st.integers(25, 30), payload=st.binary(max_size=300))
def test_fuzz_binary_never_raises(op: int, payload: bytes) -> None:
    client = _group_member()
    for out in client.receive_binary(op, payload):
        assert out.op in (OP_TRANSITION_READY, 26, 28, OP_MLS_INVALID_COMMIT_WELCOME)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64))
def test_fuzz_frame_parser(data: bytes) -> None:
    try:
        seq, op, payload = parse_server_binary(data)
    except MalformedDaveFrame:
        assert len(data) < 3
    else:
        assert pack_server_binary(seq, op, payload) == data


def test_listener_decrypt_with_davey_directly() -> None:
    """The bot's frames open with a bare davey session in the group (not our wrapper)."""
    net = DaveNet.make()
    bot = net.connect(BOT_ID)
    other_session = net.listener.session
    assert other_session is not None
    frame = opus_like(5)
    assert other_session.decrypt(BOT_ID, davey.MediaType.audio, bot.encrypt(frame)) == frame
    assert LISTENER_ID in {int(u) for u in bot.session.get_user_ids()}  # type: ignore[union-attr]


@pytest.mark.parametrize("relative", ["plugin/voice/dave.py", "plugin/sandbox/dave.py"])
def test_dave_cores_are_sans_io(relative: str) -> None:
    path = ROOT / relative
    assert not imported_roots(path) & FORBIDDEN
