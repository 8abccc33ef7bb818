"""The sandbox's MLS external sender and parsers, checked against real davey sessions."""

from __future__ import annotations

import contextlib
import struct

import davey
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from legato.sandbox.mls import (
    CIPHERSUITE_P256,
    CONTENT_PROPOSAL,
    MLS10,
    PROPOSAL_ADD,
    PROPOSAL_REMOVE,
    SENDER_EXTERNAL,
    SENDER_MEMBER,
    WIRE_PUBLIC_MESSAGE,
    ExternalSender,
    MLSDecodeError,
    encode_opaque,
    encode_varint,
    parse_commit,
    parse_key_package,
    parse_welcome,
    split_commit_welcome,
    verify_with_label,
)

CHANNEL = 424242
GROUP_ID = CHANNEL.to_bytes(8, "big")


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (63, b"\x3f"),
        (64, b"\x40\x40"),
        (16383, b"\x7f\xff"),
        (16384, b"\x80\x00\x40\x00"),
        (2**30 - 1, b"\xbf\xff\xff\xff"),
    ],
)
def test_varint(value: int, encoded: bytes) -> None:
    assert encode_varint(value) == encoded


def test_varint_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        encode_varint(2**30)
    with pytest.raises(ValueError, match="out of range"):
        encode_varint(-1)


def test_external_sender_package_layout_and_davey_accepts_it() -> None:
    sender = ExternalSender(identity=b"sandbox")
    package = sender.package()
    assert package[:2] == b"\x40\x41"  # varint 65: the uncompressed P-256 point's length
    assert package[2] == 0x04
    assert package[2:67] == sender.public_key
    assert package[67:] == struct.pack(">H", 1) + b"\x07sandbox"  # basic credential
    session = davey.DaveSession(1, 5, CHANNEL)
    session.set_external_sender(package)
    assert session.status == davey.SessionStatus.pending


def _pending(user_id: int, sender: ExternalSender) -> tuple[davey.DaveSession, bytes]:
    session = davey.DaveSession(1, user_id, CHANNEL)
    package = session.get_serialized_key_package()
    session.set_external_sender(sender.package())
    return session, package


def test_key_package_parsed_and_self_signature_checked() -> None:
    sender = ExternalSender()
    _, package = _pending(7_000_000_000_000_000_001, sender)
    info = parse_key_package(package)
    assert info.user_id == 7_000_000_000_000_000_001
    assert info.cipher_suite == CIPHERSUITE_P256
    assert info.signature_valid
    assert len(info.ref) == 32
    tampered = bytearray(package)
    tampered[20] ^= 0x01  # inside init_key: the signature no longer matches
    assert not parse_key_package(bytes(tampered)).signature_valid
    with pytest.raises(MLSDecodeError, match="trailing"):
        parse_key_package(package + b"\x00")


def test_add_proposal_is_signed_over_framed_content_tbs() -> None:
    sender = ExternalSender()
    _, package = _pending(2, sender)
    proposal = sender.propose_add(GROUP_ID, 3, package)
    message = proposal.message
    head = struct.pack(">HH", MLS10, WIRE_PUBLIC_MESSAGE)
    assert message.startswith(head + encode_opaque(GROUP_ID) + struct.pack(">Q", 3))
    content_start = len(head)
    sender_at = content_start + 1 + 8 + 8
    assert message[sender_at] == SENDER_EXTERNAL
    assert message[sender_at + 1 : sender_at + 5] == b"\x00\x00\x00\x00"  # sender_index 0
    assert message[sender_at + 5] == 0  # empty authenticated_data
    assert message[sender_at + 6] == CONTENT_PROPOSAL
    assert message[sender_at + 7 : sender_at + 9] == struct.pack(">H", PROPOSAL_ADD)
    content_end = sender_at + 9 + len(package)
    assert message[sender_at + 9 : content_end] == package
    signature = message[content_end + 2 :]  # a DER signature is 70-72 bytes: 2-byte varint
    assert message[content_end : content_end + 2] == encode_varint(len(signature))
    # FramedContentTBS for an external sender: version, wire format, content; no GroupContext.
    assert verify_with_label(
        sender.public_key, "FramedContentTBS", message[:content_end], signature
    )
    assert not verify_with_label(
        sender.public_key, "FramedContentTBS", message[: content_end - 1], signature
    )


def test_davey_commits_our_proposals_and_we_parse_its_commit_and_welcome() -> None:
    sender = ExternalSender()
    alice, _ = _pending(1, sender)
    bob, bob_package = _pending(2, sender)
    add = sender.propose_add(GROUP_ID, 0, bob_package)
    result = alice.process_proposals(
        davey.ProposalsOperationType.append, encode_opaque(add.message)
    )
    assert result is not None
    assert result.welcome is not None
    commit, welcome = split_commit_welcome(result.commit + result.welcome)
    assert commit.raw == result.commit
    assert commit.group_id == GROUP_ID
    assert commit.epoch == 0
    assert commit.sender_type == SENDER_MEMBER
    assert commit.sender_index == 0
    assert commit.proposal_refs == (add.ref,)  # our ProposalRef is the one MLS computes
    assert commit.inline == ()
    assert welcome is not None
    assert welcome.raw == result.welcome
    assert welcome.cipher_suite == CIPHERSUITE_P256
    assert welcome.new_members == (parse_key_package(bob_package).ref,)
    assert parse_commit(result.commit) == commit
    assert parse_welcome(result.welcome) == welcome
    alice.process_commit(result.commit)
    bob.process_welcome(result.welcome)
    assert alice.epoch == bob.epoch == 1

    # Remove: a commit with no welcome, and davey applies our Remove proposal.
    remove = sender.propose_remove(GROUP_ID, 1, 1)
    assert remove.kind == PROPOSAL_REMOVE
    result = alice.process_proposals(
        davey.ProposalsOperationType.append, encode_opaque(remove.message)
    )
    assert result is not None
    assert result.welcome is None
    commit, welcome = split_commit_welcome(result.commit)
    assert welcome is None
    assert commit.proposal_refs == (remove.ref,)
    assert commit.epoch == 1
    alice.process_commit(result.commit)
    assert [int(u) for u in alice.get_user_ids()] == [1]


def test_revoke_by_proposal_ref() -> None:
    sender = ExternalSender()
    alice, _ = _pending(1, sender)
    _, bob_package = _pending(2, sender)
    _, carol_package = _pending(3, sender)
    add_bob = sender.propose_add(GROUP_ID, 0, bob_package)
    add_carol = sender.propose_add(GROUP_ID, 0, carol_package)
    first = alice.process_proposals(
        davey.ProposalsOperationType.append, encode_opaque(add_bob.message + add_carol.message)
    )
    assert first is not None
    assert set(parse_commit(first.commit).proposal_refs) == {add_bob.ref, add_carol.ref}
    again = alice.process_proposals(
        davey.ProposalsOperationType.revoke, encode_opaque(encode_opaque(add_carol.ref))
    )
    assert again is not None
    assert parse_commit(again.commit).proposal_refs == (add_bob.ref,)


def test_proposals_from_another_external_sender_are_refused() -> None:
    sender = ExternalSender()
    alice, _ = _pending(1, sender)
    _, bob_package = _pending(2, sender)
    forged = ExternalSender().propose_add(GROUP_ID, 0, bob_package)
    with pytest.raises(ValueError, match="proposals"):
        alice.process_proposals(davey.ProposalsOperationType.append, encode_opaque(forged.message))


def test_parsers_reject_wrong_structures() -> None:
    sender = ExternalSender()
    _, package = _pending(2, sender)
    proposal = sender.propose_add(GROUP_ID, 0, package)
    with pytest.raises(MLSDecodeError, match="not a commit"):
        parse_commit(proposal.message)
    with pytest.raises(MLSDecodeError, match="PublicMessage"):
        parse_commit(struct.pack(">HH", 1, 2) + b"\x00" * 20)
    with pytest.raises(MLSDecodeError, match="prefix 0b11"):
        parse_welcome(b"\x00\x02\xc0")
    with pytest.raises(MLSDecodeError, match="minimally"):
        parse_welcome(b"\x00\x02\x40\x01\x00")
    with pytest.raises(MLSDecodeError, match="no new member"):
        parse_welcome(b"\x00\x02\x00\x00")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_parsers_raise_only_decode_errors(data: bytes) -> None:
    for parse in (parse_key_package, parse_commit, parse_welcome, split_commit_welcome):
        with contextlib.suppress(MLSDecodeError):
            parse(data)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 255), st.integers(0, 100))
def test_fuzz_mutated_key_package_never_crashes(xor: int, where: int) -> None:
    if "package" not in _CACHE:
        _CACHE["package"] = _pending(9, ExternalSender())[1]
    package = bytearray(_CACHE["package"])
    package[where % len(package)] ^= xor
    try:
        info = parse_key_package(bytes(package))
    except MLSDecodeError:
        return
    if xor and where % len(package) > 4:
        # Any change past the header breaks the signature or the identity.
        assert not info.signature_valid or info.user_id != 9


_CACHE: dict[str, bytes] = {}
