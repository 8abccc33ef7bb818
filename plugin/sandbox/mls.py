"""The MLS that a DAVE voice server needs: an external sender and enough parsing to relay.

Discord's voice server is not a member of a DAVE group. It is the group's *external sender*
(RFC 9420 §12.1.8.1): every member's group carries its signature key in the ``external_senders``
extension, and it proposes who joins (Add) and who leaves (Remove) as ``PublicMessage``\\ s signed
with that key. Members commit those proposals; the server only relays commits and welcomes it
cannot read. This module is that server-side half, in pure Python over ``cryptography``:

- :class:`ExternalSender`: the P-256 signing key (DAVE protocol version 1 uses ciphersuite 2,
  ``MLS_128_DHKEMP256_AES128GCM_SHA256_P256``: ECDSA over P-256 with SHA-256), the op25 payload
  (an ``ExternalSender`` struct) and signed Add/Remove proposals with their ``ProposalRef``.
- :func:`parse_key_package` (op26), :func:`split_commit_welcome` (op28), :func:`parse_commit`
  and :func:`parse_welcome`: bounds-checked readers that raise :class:`MLSDecodeError` on any
  malformed input.

Encoding is RFC 9420's TLS presentation language: big-endian integers, ``<V>`` vectors prefixed
with the variable-length integer of §2.1.2 (1, 2 or 4 bytes, minimal encoding required).

Signing a proposal from an external sender: ``FramedContentTBS`` carries the ``GroupContext``
only for ``member`` and ``new_member_commit`` senders (RFC 9420 §6.1), so an external proposal
signs ``version || wire_format || FramedContent`` and needs only the group id and epoch. It has no
``membership_tag`` either (§6.2: only member senders carry one).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

#: RFC 9420 §6: ProtocolVersion mls10.
MLS10: Final = 1
#: DAVE protocol version 1 (https://daveprotocol.com/#protocol-version).
CIPHERSUITE_P256: Final = 2

WIRE_PUBLIC_MESSAGE: Final = 1
WIRE_PRIVATE_MESSAGE: Final = 2
WIRE_WELCOME: Final = 3
WIRE_GROUP_INFO: Final = 4
WIRE_KEY_PACKAGE: Final = 5

CONTENT_APPLICATION: Final = 1
CONTENT_PROPOSAL: Final = 2
CONTENT_COMMIT: Final = 3

SENDER_MEMBER: Final = 1
SENDER_EXTERNAL: Final = 2
SENDER_NEW_MEMBER_PROPOSAL: Final = 3
SENDER_NEW_MEMBER_COMMIT: Final = 4

PROPOSAL_ADD: Final = 1
PROPOSAL_UPDATE: Final = 2
PROPOSAL_REMOVE: Final = 3

CREDENTIAL_BASIC: Final = 1
CREDENTIAL_X509: Final = 2

_LEAF_SOURCE_KEY_PACKAGE: Final = 1
_LEAF_SOURCE_UPDATE: Final = 2
_LEAF_SOURCE_COMMIT: Final = 3

_PROPOSAL_OR_REF_PROPOSAL: Final = 1
_PROPOSAL_OR_REF_REFERENCE: Final = 2

_LABEL_PREFIX: Final = b"MLS 1.0 "
_VARINT_MAX: Final = (1 << 30) - 1


class MLSDecodeError(ValueError):
    """Bytes that are not the MLS structure they were read as."""


# --- encoding -------------------------------------------------------------------------------


def encode_varint(value: int) -> bytes:
    """Encode an RFC 9420 §2.1.2 variable-length integer (minimal length).

    Args:
        value: 0 to 2**30 - 1.

    Returns:
        One, two or four bytes.

    Raises:
        ValueError: ``value`` is out of range.
    """
    if value < 0 or value > _VARINT_MAX:
        raise ValueError(f"varint out of range: {value}")
    if value < 1 << 6:
        return bytes([value])
    if value < 1 << 14:
        return struct.pack(">H", 0x4000 | value)
    return struct.pack(">I", 0x8000_0000 | value)


def encode_opaque(data: bytes) -> bytes:
    """Encode ``opaque data<V>``: the varint length, then the bytes."""
    return encode_varint(len(data)) + data


def ref_hash(label: bytes, value: bytes) -> bytes:
    """RFC 9420 §5.2 ``RefHash(label, value)`` with SHA-256 (ciphersuite 2).

    Args:
        label: e.g. ``b"MLS 1.0 Proposal Reference"``.
        value: the encoded structure being referenced.

    Returns:
        The 32-byte reference.
    """
    return hashlib.sha256(encode_opaque(label) + encode_opaque(value)).digest()


def _sign_content(label: str, content: bytes) -> bytes:
    # RFC 9420 §5.1.2 SignContent: struct { opaque label<V>; opaque content<V>; }.
    return encode_opaque(_LABEL_PREFIX + label.encode()) + encode_opaque(content)


def verify_with_label(public_key: bytes, label: str, content: bytes, signature: bytes) -> bool:
    """Check an RFC 9420 ``SignWithLabel`` ECDSA P-256 signature.

    Args:
        public_key: the uncompressed SEC1 point (65 bytes).
        label: the label without the ``"MLS 1.0 "`` prefix.
        content: the signed structure.
        signature: the DER-encoded ECDSA signature.

    Returns:
        Whether the signature is valid (a malformed key or signature is simply invalid).
    """
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_key)
        key.verify(signature, _sign_content(label, content), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


# --- decoding -------------------------------------------------------------------------------


class _Reader:
    """A cursor over bytes whose every read is bounds-checked."""

    __slots__ = ("_data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self._data = data
        self.pos = pos

    @property
    def remaining(self) -> int:
        return len(self._data) - self.pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self._data):
            raise MLSDecodeError(f"truncated: need {n} bytes at {self.pos}, have {self.remaining}")
        chunk = self._data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = struct.unpack(">H", self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = struct.unpack(">I", self.take(4))[0]
        return value

    def u64(self) -> int:
        value: int = struct.unpack(">Q", self.take(8))[0]
        return value

    def varint(self) -> int:
        first = self.take(1)[0]
        prefix = first >> 6
        if prefix == 0:
            return first
        if prefix == 1:
            value = ((first & 0x3F) << 8) | self.take(1)[0]
            minimum = 1 << 6
        elif prefix == 2:
            rest = self.take(3)
            value = ((first & 0x3F) << 24) | int.from_bytes(rest, "big")
            minimum = 1 << 14
        else:
            raise MLSDecodeError("varint with prefix 0b11")
        if value < minimum:
            raise MLSDecodeError("varint not minimally encoded")
        return value

    def opaque(self) -> bytes:
        return self.take(self.varint())

    def sub(self) -> _Reader:
        """A reader over the next ``<V>`` vector's body (the cursor moves past it)."""
        return _Reader(self.opaque())

    def end(self, what: str) -> None:
        if self.remaining:
            raise MLSDecodeError(f"{self.remaining} trailing bytes after {what}")


@dataclass(frozen=True, slots=True)
class LeafNodeInfo:
    """What the server reads from a ``LeafNode``."""

    signature_key: bytes
    credential_type: int
    identity: bytes
    source: int

    @property
    def user_id(self) -> int | None:
        """DAVE's basic credential is the user id as 8 big-endian bytes; None otherwise."""
        if self.credential_type != CREDENTIAL_BASIC or len(self.identity) != 8:
            return None
        return int.from_bytes(self.identity, "big")


def _read_credential(r: _Reader) -> tuple[int, bytes]:
    kind = r.u16()
    if kind == CREDENTIAL_BASIC:
        return kind, r.opaque()
    if kind == CREDENTIAL_X509:
        return kind, r.opaque()  # the certificate chain, kept as one blob
    raise MLSDecodeError(f"unknown credential type {kind}")


def _read_leaf_node(r: _Reader) -> LeafNodeInfo:
    r.opaque()  # encryption_key
    signature_key = r.opaque()
    kind, identity = _read_credential(r)
    for _ in range(5):  # Capabilities: versions, cipher_suites, extensions, proposals, credentials
        r.opaque()
    source = r.u8()
    if source == _LEAF_SOURCE_KEY_PACKAGE:
        r.take(16)  # lifetime: not_before, not_after
    elif source == _LEAF_SOURCE_COMMIT:
        r.opaque()  # parent_hash
    elif source != _LEAF_SOURCE_UPDATE:
        raise MLSDecodeError(f"unknown leaf node source {source}")
    r.opaque()  # extensions
    r.opaque()  # signature
    return LeafNodeInfo(signature_key, kind, identity, source)


@dataclass(frozen=True, slots=True)
class KeyPackageInfo:
    """A parsed op26 ``KeyPackage``."""

    raw: bytes
    cipher_suite: int
    leaf: LeafNodeInfo
    signature_valid: bool

    @property
    def ref(self) -> bytes:
        """``KeyPackageRef`` (RFC 9420 §5.2), which a Welcome names its new members by."""
        return ref_hash(b"MLS 1.0 KeyPackage Reference", self.raw)

    @property
    def user_id(self) -> int | None:
        """The user id in the key package's basic credential."""
        return self.leaf.user_id


def _read_key_package(r: _Reader) -> KeyPackageInfo:
    start = r.pos
    version = r.u16()
    if version != MLS10:
        raise MLSDecodeError(f"key package version {version}")
    suite = r.u16()
    r.opaque()  # init_key
    leaf = _read_leaf_node(r)
    r.opaque()  # extensions
    tbs_end = r.pos
    signature = r.opaque()
    raw = r._data[start : r.pos]
    tbs = raw[: tbs_end - start]
    valid = suite == CIPHERSUITE_P256 and verify_with_label(
        leaf.signature_key, "KeyPackageTBS", tbs, signature
    )
    return KeyPackageInfo(raw, suite, leaf, valid)


def parse_key_package(data: bytes) -> KeyPackageInfo:
    """Parse an op26 payload: a bare TLS-encoded ``KeyPackage`` (no ``MLSMessage`` wrapper).

    Args:
        data: the payload after the opcode byte.

    Returns:
        The key package; ``signature_valid`` says whether its self-signature checks out.

    Raises:
        MLSDecodeError: the bytes are not exactly one key package.
    """
    r = _Reader(bytes(data))
    info = _read_key_package(r)
    r.end("key package")
    return info


@dataclass(frozen=True, slots=True)
class CommitInfo:
    """A parsed commit ``MLSMessage`` (a ``PublicMessage``: DAVE uses plaintext handshakes)."""

    raw: bytes
    group_id: bytes
    epoch: int
    sender_type: int
    sender_index: int
    #: ``ProposalRef``\\ s the commit covers, in order.
    proposal_refs: tuple[bytes, ...]
    #: Inline proposals as ``(proposal_type, removed leaf or added user id or None)``.
    inline: tuple[tuple[int, int | None], ...]
    has_path: bool


def _read_proposal(r: _Reader) -> tuple[int, int | None]:
    kind = r.u16()
    if kind == PROPOSAL_ADD:
        return kind, _read_key_package(r).user_id
    if kind == PROPOSAL_UPDATE:
        _read_leaf_node(r)
        return kind, None
    if kind == PROPOSAL_REMOVE:
        return kind, r.u32()
    raise MLSDecodeError(f"unsupported inline proposal type {kind}")


def _read_public_message_head(r: _Reader) -> tuple[bytes, int, int, int, int]:
    version = r.u16()
    if version != MLS10:
        raise MLSDecodeError(f"message version {version}")
    wire = r.u16()
    if wire != WIRE_PUBLIC_MESSAGE:
        raise MLSDecodeError(f"wire format {wire} is not a PublicMessage")
    group_id = r.opaque()
    epoch = r.u64()
    sender_type = r.u8()
    if sender_type in (SENDER_MEMBER, SENDER_EXTERNAL):
        sender_index = r.u32()
    elif sender_type in (SENDER_NEW_MEMBER_PROPOSAL, SENDER_NEW_MEMBER_COMMIT):
        sender_index = 0
    else:
        raise MLSDecodeError(f"unknown sender type {sender_type}")
    r.opaque()  # authenticated_data
    return group_id, epoch, sender_type, sender_index, r.u8()


def _read_commit(r: _Reader) -> CommitInfo:
    start = r.pos
    group_id, epoch, sender_type, sender_index, content_type = _read_public_message_head(r)
    if content_type != CONTENT_COMMIT:
        raise MLSDecodeError(f"content type {content_type} is not a commit")
    refs: list[bytes] = []
    inline: list[tuple[int, int | None]] = []
    proposals = r.sub()
    while proposals.remaining:
        kind = proposals.u8()
        if kind == _PROPOSAL_OR_REF_REFERENCE:
            refs.append(proposals.opaque())
        elif kind == _PROPOSAL_OR_REF_PROPOSAL:
            inline.append(_read_proposal(proposals))
        else:
            raise MLSDecodeError(f"unknown ProposalOrRef type {kind}")
    present = r.u8()
    if present not in (0, 1):
        raise MLSDecodeError(f"optional<UpdatePath> flag {present}")
    if present:
        _read_leaf_node(r)
        r.opaque()  # nodes
    r.opaque()  # signature
    r.opaque()  # confirmation_tag
    if sender_type == SENDER_MEMBER:
        r.opaque()  # membership_tag
    raw = r._data[start : r.pos]
    return CommitInfo(
        raw, group_id, epoch, sender_type, sender_index, tuple(refs), tuple(inline), bool(present)
    )


def parse_commit(data: bytes) -> CommitInfo:
    """Parse a commit ``MLSMessage`` (the body of op29).

    Raises:
        MLSDecodeError: the bytes are not exactly one PublicMessage commit.
    """
    r = _Reader(bytes(data))
    info = _read_commit(r)
    r.end("commit")
    return info


@dataclass(frozen=True, slots=True)
class WelcomeInfo:
    """A parsed ``Welcome`` (not wrapped in ``MLSMessage``, as DAVE sends it)."""

    raw: bytes
    cipher_suite: int
    #: The ``KeyPackageRef`` of every new member it welcomes.
    new_members: tuple[bytes, ...]


def parse_welcome(data: bytes) -> WelcomeInfo:
    """Parse a DAVE welcome (op28's tail, op30's body).

    Raises:
        MLSDecodeError: the bytes are not exactly one Welcome.
    """
    r = _Reader(bytes(data))
    suite = r.u16()
    secrets = r.sub()
    members: list[bytes] = []
    while secrets.remaining:
        members.append(secrets.opaque())
        secrets.opaque()  # kem_output
        secrets.opaque()  # ciphertext
    r.opaque()  # encrypted_group_info
    r.end("welcome")
    if not members:
        raise MLSDecodeError("welcome names no new member")
    return WelcomeInfo(bytes(data), suite, tuple(members))


def split_commit_welcome(data: bytes) -> tuple[CommitInfo, WelcomeInfo | None]:
    """Split an op28 payload: a commit ``MLSMessage`` optionally followed by a ``Welcome``.

    Args:
        data: the payload after the opcode byte.

    Returns:
        The commit and, if the commit adds members, the welcome.

    Raises:
        MLSDecodeError: malformed commit or welcome.
    """
    r = _Reader(bytes(data))
    commit = _read_commit(r)
    if not r.remaining:
        return commit, None
    return commit, parse_welcome(r.take(r.remaining))


# --- the external sender --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignedProposal:
    """An external proposal ready for op27: the ``MLSMessage`` and its ``ProposalRef``."""

    message: bytes
    ref: bytes
    kind: int


class ExternalSender:
    """The voice server's MLS identity: a P-256 key that signs Add and Remove proposals.

    Args:
        private_key: an existing key; a fresh one is generated when omitted.
        identity: the basic credential's identity bytes.
    """

    def __init__(
        self,
        private_key: ec.EllipticCurvePrivateKey | None = None,
        *,
        identity: bytes = b"legato-sandbox-voice",
    ) -> None:
        self._key = private_key or ec.generate_private_key(ec.SECP256R1())
        self.identity = identity
        self.public_key: bytes = self._key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )

    def package(self) -> bytes:
        """The op25 payload, an ``ExternalSender``: signature public key, then credential."""
        return (
            encode_opaque(self.public_key)
            + struct.pack(">H", CREDENTIAL_BASIC)
            + encode_opaque(self.identity)
        )

    def propose_add(self, group_id: bytes, epoch: int, key_package: bytes) -> SignedProposal:
        """Sign an Add proposal for a member's key package.

        Args:
            group_id: the MLS group id (DAVE: the channel id, 8 bytes big-endian).
            epoch: the group's current epoch.
            key_package: the op26 payload, verbatim.

        Returns:
            The proposal message and its reference.
        """
        body = struct.pack(">H", PROPOSAL_ADD) + key_package
        return self._sign_proposal(group_id, epoch, body, PROPOSAL_ADD)

    def propose_remove(self, group_id: bytes, epoch: int, leaf_index: int) -> SignedProposal:
        """Sign a Remove proposal for the member at ``leaf_index``."""
        body = struct.pack(">HI", PROPOSAL_REMOVE, leaf_index)
        return self._sign_proposal(group_id, epoch, body, PROPOSAL_REMOVE)

    def _sign_proposal(
        self, group_id: bytes, epoch: int, proposal: bytes, kind: int
    ) -> SignedProposal:
        content = (
            encode_opaque(group_id)
            + struct.pack(">QBI", epoch, SENDER_EXTERNAL, 0)  # sender_index 0: our one sender
            + encode_opaque(b"")  # authenticated_data
            + bytes([CONTENT_PROPOSAL])
            + proposal
        )
        wire = struct.pack(">HH", MLS10, WIRE_PUBLIC_MESSAGE)
        tbs = wire + content  # FramedContentTBS: no GroupContext for an external sender
        signature = self._key.sign(
            _sign_content("FramedContentTBS", tbs), ec.ECDSA(hashes.SHA256())
        )
        auth = encode_opaque(signature)  # a proposal has no confirmation_tag
        # AuthenticatedContent = wire_format || content || auth (RFC 9420 §6.1).
        authenticated = struct.pack(">H", WIRE_PUBLIC_MESSAGE) + content + auth
        return SignedProposal(
            message=wire + content + auth,  # no membership_tag for an external sender
            ref=ref_hash(b"MLS 1.0 Proposal Reference", authenticated),
            kind=kind,
        )
