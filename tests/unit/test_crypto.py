"""Encryption modes: layouts, interop with discord.py 2.7.1 and `cryptography`, tampering."""

from __future__ import annotations

import contextlib
import struct
from types import SimpleNamespace

import discord
import nacl.bindings
import nacl.secret
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from legato.sandbox.crypto import DecryptionFailed, PacketDecryptor
from legato.voice.crypto import (
    AEAD_AES256_GCM_RTPSIZE,
    AEAD_XCHACHA20_POLY1305_RTPSIZE,
    SUPPORTED_MODES,
    XSALSA20_POLY1305,
    XSALSA20_POLY1305_LITE,
    XSALSA20_POLY1305_SUFFIX,
    PacketEncryptor,
    UnsupportedMode,
    choose_mode,
    overhead,
)
from legato.voice.rtp import MalformedPacket, RtpHeader, pack_rtp_header, parse_rtp

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
HEADER = pack_rtp_header(513, 96000, 0xDEADBEEF)
COUNTER_MODES = (AEAD_AES256_GCM_RTPSIZE, AEAD_XCHACHA20_POLY1305_RTPSIZE, XSALSA20_POLY1305_LITE)
# Modes whose every byte (header included) is authenticated: rtpsize (AAD) and plain xsalsa20
# (the header is the nonce). lite/suffix leave the header unauthenticated, as Discord defined them.
HEADER_AUTHENTICATED = (AEAD_AES256_GCM_RTPSIZE, AEAD_XCHACHA20_POLY1305_RTPSIZE, XSALSA20_POLY1305)


def discord_py_client(mode: str, key: bytes) -> discord.VoiceClient:
    """A bare discord.py VoiceClient, enough to call its own `_encrypt_<mode>` methods."""
    client = discord.VoiceClient.__new__(discord.VoiceClient)
    # `secret_key` and `mode` are properties reading the connection state.
    client._connection = SimpleNamespace(secret_key=list(key), mode=mode)  # type: ignore[assignment]  # a stand-in state
    client._incr_nonce = 0
    return client


def test_choose_mode_preference() -> None:
    assert SUPPORTED_MODES[0] == AEAD_AES256_GCM_RTPSIZE
    # The seed capture's op2 offers GCM rtpsize first.
    seed_offer = [
        "aead_aes256_gcm_rtpsize",
        "aead_aes256_gcm",
        "xsalsa20_poly1305_lite_rtpsize",
        "xsalsa20_poly1305_lite",
        "xsalsa20_poly1305_suffix",
        "xsalsa20_poly1305",
    ]
    assert choose_mode(seed_offer) == AEAD_AES256_GCM_RTPSIZE
    assert choose_mode(["xsalsa20_poly1305", AEAD_XCHACHA20_POLY1305_RTPSIZE]) == (
        AEAD_XCHACHA20_POLY1305_RTPSIZE
    )
    assert choose_mode(["xsalsa20_poly1305", "xsalsa20_poly1305_suffix"]) == (
        XSALSA20_POLY1305_SUFFIX
    )
    assert choose_mode(["xsalsa20_poly1305"]) == XSALSA20_POLY1305
    with pytest.raises(UnsupportedMode, match="no supported"):
        choose_mode(["aead_aes256_gcm", "nope"])
    with pytest.raises(UnsupportedMode):
        choose_mode([])
    assert issubclass(UnsupportedMode, ValueError)


def test_constructor_validation() -> None:
    with pytest.raises(UnsupportedMode):
        PacketEncryptor("rot13", KEY)
    with pytest.raises(ValueError, match="32 bytes"):
        PacketEncryptor(AEAD_AES256_GCM_RTPSIZE, KEY[:16])
    with pytest.raises(ValueError, match="32 bytes"):
        PacketDecryptor(AEAD_XCHACHA20_POLY1305_RTPSIZE, b"")
    # op4 delivers the key as a JSON list of ints.
    enc = PacketEncryptor(AEAD_XCHACHA20_POLY1305_RTPSIZE, list(KEY))
    assert (
        PacketDecryptor(AEAD_XCHACHA20_POLY1305_RTPSIZE, list(KEY)).decrypt(
            enc.encrypt(HEADER, b"x")
        )[1]
        == b"x"
    )


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
def test_sizes_match_overhead(mode: str) -> None:
    packet = PacketEncryptor(mode, KEY).encrypt(HEADER, b"opus!")
    assert len(packet) == 12 + 5 + overhead(mode)
    assert packet[:12] == HEADER


def test_gcm_layout_matches_cryptography() -> None:
    enc = PacketEncryptor(AEAD_AES256_GCM_RTPSIZE, KEY, counter=7)
    packet = enc.encrypt(HEADER, b"\xf8\xff\xfe")
    nonce = struct.pack(">I", 7) + bytes(8)
    expected = HEADER + AESGCM(KEY).encrypt(nonce, b"\xf8\xff\xfe", HEADER) + struct.pack(">I", 7)
    assert packet == expected
    assert enc.counter == 8


def test_xchacha_layout_matches_libsodium() -> None:
    enc = PacketEncryptor(AEAD_XCHACHA20_POLY1305_RTPSIZE, KEY)
    packet = enc.encrypt(HEADER, b"abc")
    nonce = bytes(24)
    sealed = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(b"abc", HEADER, nonce, KEY)
    assert packet == HEADER + sealed + bytes(4)


@pytest.mark.parametrize(
    "mode", [AEAD_XCHACHA20_POLY1305_RTPSIZE, XSALSA20_POLY1305_LITE, XSALSA20_POLY1305]
)
def test_byte_identical_to_discord_py(mode: str) -> None:
    """discord.py 2.7.1's own encryptors produce the very same packets (deterministic modes)."""
    theirs = discord_py_client(mode, KEY)
    ours = PacketEncryptor(mode, KEY)
    their_encrypt = getattr(theirs, f"_encrypt_{mode}")
    for i in range(3):
        header = pack_rtp_header(i, i * 960, 42)
        payload = bytes([i]) * (10 + i)
        assert ours.encrypt(header, payload) == their_encrypt(header, payload)


# discord.py 2.7.1 has no GCM encryptor; GCM is checked against `cryptography` above.
@pytest.mark.parametrize("mode", [m for m in SUPPORTED_MODES if m != AEAD_AES256_GCM_RTPSIZE])
def test_decrypts_discord_py_output(mode: str) -> None:
    theirs = discord_py_client(mode, KEY)
    dec = PacketDecryptor(mode, KEY)
    for i in range(3):
        header = pack_rtp_header(i, i * 960, 42)
        rtp, media = dec.decrypt(getattr(theirs, f"_encrypt_{mode}")(header, b"frame%d" % i))
        assert media == b"frame%d" % i
        assert rtp.header == RtpHeader(i, i * 960, 42)


def test_discord_py_style_decrypt_of_our_xchacha() -> None:
    """Open our packet as a Discord receiver does: AAD = 12-byte header, nonce from the tail."""
    packet = PacketEncryptor(AEAD_XCHACHA20_POLY1305_RTPSIZE, KEY, counter=300).encrypt(
        HEADER, b"hello"
    )
    nonce = packet[-4:] + bytes(20)
    plain = nacl.secret.Aead(KEY).decrypt(packet[12:-4], packet[:12], nonce)
    assert plain == b"hello"
    assert packet[-4:] == struct.pack(">I", 300)


def test_gcm_decrypt_of_reference_packet() -> None:
    nonce = struct.pack(">I", 5) + bytes(8)
    packet = HEADER + AESGCM(KEY).encrypt(nonce, b"ref", HEADER) + struct.pack(">I", 5)
    assert PacketDecryptor(AEAD_AES256_GCM_RTPSIZE, KEY).decrypt(packet)[1] == b"ref"


@pytest.mark.parametrize("mode", COUNTER_MODES)
def test_counter_increments_and_wraps(mode: str) -> None:
    enc = PacketEncryptor(mode, KEY, counter=2**32 - 1)
    first = enc.encrypt(HEADER, b"a")
    second = enc.encrypt(HEADER, b"a")
    assert first[-4:] == b"\xff\xff\xff\xff"
    assert second[-4:] == bytes(4)
    assert enc.counter == 1


def test_suffix_nonce_is_random() -> None:
    enc = PacketEncryptor(XSALSA20_POLY1305_SUFFIX, KEY)
    assert enc.encrypt(HEADER, b"a")[-24:] != enc.encrypt(HEADER, b"a")[-24:]


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
def test_extension_roundtrip(mode: str) -> None:
    """The preamble is AAD (rtpsize) or encrypted (legacy); the body is stripped after decrypt."""
    header = RtpHeader(1, 960, 5, extension=True, csrcs=(77,)).pack() + struct.pack(
        ">HH", 0xBEDE, 2
    )
    ext_body = bytes([0x10, 0x7F]) + bytes(6)
    packet = PacketEncryptor(mode, KEY).encrypt(header, ext_body + b"opus")
    rtp, media = PacketDecryptor(mode, KEY).decrypt(packet)
    assert media == b"opus"
    assert rtp.header_bytes == header
    assert rtp.extension_length == 2
    assert rtp.header.csrcs == (77,)
    if mode in (AEAD_AES256_GCM_RTPSIZE, AEAD_XCHACHA20_POLY1305_RTPSIZE):
        assert packet[: len(header)] == header  # preamble in clear
    else:
        assert packet[:16] == header[:16]
        assert packet[16:20] != header[16:20]


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
@given(
    payload=st.binary(max_size=64),
    pad=st.integers(0, 8),
    extension=st.booleans(),
    csrcs=st.lists(st.integers(0, 0xFFFFFFFF), max_size=3),
)
def test_decrypt_with_the_callers_parse_is_decrypt(
    mode: str, payload: bytes, pad: int, extension: bool, csrcs: list[int]
) -> None:
    """The media plane hands ``decrypt`` the parse it read the SSRC from: same packet, same
    media, same errors as when ``decrypt`` parses it itself (padding, extension, CSRCs)."""
    header = RtpHeader(7, 960, 9, extension=extension, padding=pad > 0, csrcs=tuple(csrcs)).pack()
    body = payload
    if extension:
        header += struct.pack(">HH", 0xBEDE, 1)
        body = bytes([0x10, 0x7F, 0, 0]) + body
    if pad:
        body += bytes(pad - 1) + bytes([pad])
    packet = PacketEncryptor(mode, KEY).encrypt(header, body)
    decryptor = PacketDecryptor(mode, KEY)
    assert decryptor.decrypt(packet, parse_rtp(packet)) == decryptor.decrypt(packet)
    assert decryptor.decrypt(packet, parse_rtp(packet))[1] == payload
    broken = bytearray(packet)
    broken[-6] ^= 1  # inside the sealed part: the tag fails either way
    with pytest.raises(DecryptionFailed):
        decryptor.decrypt(bytes(broken), parse_rtp(bytes(broken)))


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
def test_wrong_key_fails(mode: str) -> None:
    packet = PacketEncryptor(mode, KEY).encrypt(HEADER, b"secret")
    with pytest.raises(DecryptionFailed):
        PacketDecryptor(mode, OTHER_KEY).decrypt(packet)


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
def test_encrypt_rejects_inconsistent_header(mode: str) -> None:
    enc = PacketEncryptor(mode, KEY)
    with pytest.raises(MalformedPacket):
        enc.encrypt(HEADER[:11], b"x")
    with pytest.raises(MalformedPacket):
        enc.encrypt(HEADER + b"\0\0\0\0", b"x")  # CC says 0, header is 16 bytes


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
@given(
    payload=st.binary(max_size=300),
    seq=st.integers(0, 0xFFFF),
    ts=st.integers(0, 0xFFFFFFFF),
    ssrc=st.integers(0, 0xFFFFFFFF),
)
def test_roundtrip_property(mode: str, payload: bytes, seq: int, ts: int, ssrc: int) -> None:
    header = pack_rtp_header(seq, ts, ssrc)
    packet = PacketEncryptor(mode, KEY).encrypt(header, payload)
    rtp, media = PacketDecryptor(mode, KEY).decrypt(packet)
    assert media == payload
    assert rtp.header == RtpHeader(seq, ts, ssrc)


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
@given(payload=st.binary(min_size=1, max_size=64), data=st.data())
def test_single_bit_flip_rejected(mode: str, payload: bytes, data: st.DataObject) -> None:
    packet = PacketEncryptor(mode, KEY).encrypt(HEADER, payload)
    first = 0 if mode in HEADER_AUTHENTICATED else 12
    index = data.draw(st.integers(first, len(packet) - 1), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    flipped = bytearray(packet)
    flipped[index] ^= 1 << bit
    with pytest.raises((MalformedPacket, DecryptionFailed)):
        PacketDecryptor(mode, KEY).decrypt(bytes(flipped))


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
@given(payload=st.binary(max_size=64), data=st.data())
def test_truncation_rejected(mode: str, payload: bytes, data: st.DataObject) -> None:
    packet = PacketEncryptor(mode, KEY).encrypt(HEADER, payload)
    cut = data.draw(st.integers(0, len(packet) - 1), label="cut")
    with pytest.raises((MalformedPacket, DecryptionFailed)) as info:
        PacketDecryptor(mode, KEY).decrypt(packet[:cut])
    if cut < 12 + overhead(mode):
        assert info.type is MalformedPacket


def test_short_packets_are_malformed() -> None:
    for mode in SUPPORTED_MODES:
        dec = PacketDecryptor(mode, KEY)
        with pytest.raises(MalformedPacket):
            dec.decrypt(HEADER + bytes(overhead(mode) - 1))


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
@given(garbage=st.binary(max_size=200))
def test_garbage_never_crashes(mode: str, garbage: bytes) -> None:
    dec = PacketDecryptor(mode, KEY)
    for packet in (garbage, HEADER + garbage):
        with contextlib.suppress(MalformedPacket, DecryptionFailed):
            dec.decrypt(packet)
