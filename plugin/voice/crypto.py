"""Discord's RTP encryption modes, as pure objects over PyNaCl and ``cryptography``.

Layouts (PROTOCOL.md "Transport udp", discord.py 2.7.1 ``voice_client.py``):

``aead_aes256_gcm_rtpsize`` / ``aead_xchacha20_poly1305_rtpsize``
    ``header | ciphertext | tag(16) | counter u32 BE``. The header (fixed 12 bytes, CSRCs and,
    when X is set, the 4-byte extension preamble) is sent in clear and authenticated as AAD;
    the extension body is encrypted with the media. The nonce is the counter padded with zeros
    to 12 bytes (GCM) or 24 bytes (XChaCha20).
``xsalsa20_poly1305_lite``
    ``header | secretbox | counter u32 BE``; nonce = counter padded to 24 bytes.
``xsalsa20_poly1305_suffix``
    ``header | secretbox | nonce(24)``; a random nonce per packet.
``xsalsa20_poly1305``
    ``header | secretbox``; nonce = the 12-byte header padded to 24 bytes.

In the three legacy modes everything after the fixed header and CSRCs is encrypted, the
extension preamble included (discord.py encrypted the whole payload after 12 bytes); their
header is not authenticated except as the nonce of plain ``xsalsa20_poly1305``.

This is the sender's side; the receiver's (:class:`~legato.sandbox.crypto.PacketDecryptor`, the
sandbox voice server's) is :mod:`legato.sandbox.crypto`, over the layout constants and helpers
exported here.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from typing import Final

import nacl.bindings
import nacl.secret
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from legato.voice.rtp import (
    RTP_HEADER_SIZE,
    MalformedPacket,
    parse_rtp_header,
)

__all__ = [
    "AEAD_AES256_GCM_RTPSIZE",
    "AEAD_XCHACHA20_POLY1305_RTPSIZE",
    "COUNTER_SIZE",
    "KEY_SIZE",
    "NONCE24_SIZE",
    "RTPSIZE_MODES",
    "SUPPORTED_MODES",
    "TAG_SIZE",
    "XSALSA20_POLY1305",
    "XSALSA20_POLY1305_LITE",
    "XSALSA20_POLY1305_SUFFIX",
    "PacketEncryptor",
    "UnsupportedMode",
    "checked_key",
    "choose_mode",
    "clear_size",
    "overhead",
]

AEAD_AES256_GCM_RTPSIZE: Final = "aead_aes256_gcm_rtpsize"
AEAD_XCHACHA20_POLY1305_RTPSIZE: Final = "aead_xchacha20_poly1305_rtpsize"
XSALSA20_POLY1305_LITE: Final = "xsalsa20_poly1305_lite"
XSALSA20_POLY1305_SUFFIX: Final = "xsalsa20_poly1305_suffix"
XSALSA20_POLY1305: Final = "xsalsa20_poly1305"

# Preference order. AES-GCM first: Discord offers it only on AES hardware and prefers it there;
# XChaCha20 is always offered. The xsalsa20 family was removed by Discord on 2024-11-18 and is
# only picked when a server (an old or self-hosted one) offers nothing better.
SUPPORTED_MODES: Final[tuple[str, ...]] = (
    AEAD_AES256_GCM_RTPSIZE,
    AEAD_XCHACHA20_POLY1305_RTPSIZE,
    XSALSA20_POLY1305_LITE,
    XSALSA20_POLY1305_SUFFIX,
    XSALSA20_POLY1305,
)
RTPSIZE_MODES: Final = frozenset({AEAD_AES256_GCM_RTPSIZE, AEAD_XCHACHA20_POLY1305_RTPSIZE})

KEY_SIZE: Final = 32
TAG_SIZE: Final = 16
#: The 32-bit counter the ``*_rtpsize`` and ``_lite`` modes append as their nonce.
COUNTER_SIZE: Final = 4
#: XSalsa20's and XChaCha20's nonce size.
NONCE24_SIZE: Final = 24
_COUNTER_MODULO: Final = 1 << 32
_xchacha_encrypt = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt
#: The ``*_rtpsize`` nonces: the counter, then zeros to 12 (GCM) or 24 (XChaCha20) bytes.
_NONCE12 = struct.Struct(">I8x")
_NONCE24 = struct.Struct(">I20x")


class UnsupportedMode(ValueError):
    """No encryption mode the server offers is one we implement."""


def choose_mode(offered: Sequence[str]) -> str:
    """Pick our most preferred mode among ``offered`` (op2's ``modes``).

    Raises:
        UnsupportedMode: none of the offered modes is in :data:`SUPPORTED_MODES`.
    """
    offered_set = {mode for mode in offered if isinstance(mode, str)}
    for mode in SUPPORTED_MODES:
        if mode in offered_set:
            return mode
    raise UnsupportedMode(f"no supported encryption mode among {list(offered)!r}")


def overhead(mode: str) -> int:
    """Bytes a mode adds to each packet on top of the header and payload.

    Raises:
        UnsupportedMode: unknown mode.
    """
    if mode in RTPSIZE_MODES or mode == XSALSA20_POLY1305_LITE:
        return TAG_SIZE + COUNTER_SIZE
    if mode == XSALSA20_POLY1305_SUFFIX:
        return TAG_SIZE + NONCE24_SIZE
    if mode == XSALSA20_POLY1305:
        return TAG_SIZE
    raise UnsupportedMode(f"unknown encryption mode {mode!r}")


def checked_key(mode: str, secret_key: bytes) -> bytes:
    """``secret_key`` as bytes, once ``mode`` is known and the key is 32 bytes.

    Raises:
        UnsupportedMode: unknown mode.
        ValueError: the key is not 32 bytes.
    """
    if mode not in SUPPORTED_MODES:
        raise UnsupportedMode(f"unknown encryption mode {mode!r}")
    key = bytes(secret_key)
    if len(key) != KEY_SIZE:
        raise ValueError(f"secret key must be {KEY_SIZE} bytes, got {len(key)}")
    return key


def clear_size(header: bytes) -> int:
    """Length of the part a legacy mode leaves in clear: fixed header and CSRCs."""
    return RTP_HEADER_SIZE + 4 * (header[0] & 0x0F)


class PacketEncryptor:
    """Encrypts outgoing RTP packets for one session key and mode.

    Args:
        mode: one of :data:`SUPPORTED_MODES` (op4's ``mode``).
        secret_key: op4's ``secret_key`` (32 bytes; a list of ints is accepted too).
        counter: the first nonce counter of the counter-based modes.

    Raises:
        UnsupportedMode: unknown mode.
        ValueError: the key is not 32 bytes.
    """

    __slots__ = ("_aes", "_aes_encrypt", "_box", "_encrypt", "_key", "counter", "mode")

    def __init__(self, mode: str, secret_key: bytes | Sequence[int], *, counter: int = 0) -> None:
        self.mode = mode
        self._key = checked_key(mode, bytes(secret_key))
        self.counter = counter % _COUNTER_MODULO
        self._aes = AESGCM(self._key) if mode == AEAD_AES256_GCM_RTPSIZE else None
        self._aes_encrypt = self._aes.encrypt if self._aes is not None else None
        self._box = nacl.secret.SecretBox(self._key)
        encrypt: dict[str, Callable[[bytes, bytes], bytes]] = {
            AEAD_AES256_GCM_RTPSIZE: self._gcm,
            AEAD_XCHACHA20_POLY1305_RTPSIZE: self._xchacha,
            XSALSA20_POLY1305_LITE: self._lite,
            XSALSA20_POLY1305_SUFFIX: self._suffix,
            XSALSA20_POLY1305: self._plain,
        }
        self._encrypt = encrypt[mode]

    def encrypt(self, header: bytes, payload: bytes) -> bytes:
        """Return the whole packet to send.

        Args:
            header: the RTP header: 12 bytes, plus CSRCs and the extension preamble if its
                CC/X fields say so (``RtpPacket.header_bytes``).
            payload: the media (preceded by the extension body when X is set).

        Raises:
            MalformedPacket: the header is not a valid RTP header of the length its fields
                announce.
        """
        # Per frame for every stream: no copies of what already is ``bytes``.
        if type(header) is not bytes:
            header = bytes(header)
        # Fast path: Discord's plain 12-byte header (0x80: v2, no padding/extension/CSRC).
        if len(header) != RTP_HEADER_SIZE or header[0] != 0x80:
            _parsed, size = parse_rtp_header(header)
            if size != len(header):
                raise MalformedPacket(f"header of {len(header)} bytes, its fields say {size}")
        if type(payload) is not bytes:
            payload = bytes(payload)
        return self._encrypt(header, payload)

    def _next_counter(self) -> int:
        """The nonce counter for this packet; the next packet's is one more."""
        counter = self.counter
        # Wraps like discord.py's checked_add: 2**32 packets is 2.7 years at 50 packets/s.
        self.counter = (counter + 1) % _COUNTER_MODULO
        return counter

    # The two modes Discord offers today run once per frame for every stream: their nonce is
    # packed whole (counter and zero padding in one call).

    def _gcm(self, header: bytes, payload: bytes) -> bytes:
        seal = self._aes_encrypt
        assert seal is not None  # built in __init__ for this mode
        nonce = _NONCE12.pack(self._next_counter())
        return header + seal(nonce, payload, header) + nonce[:COUNTER_SIZE]

    def _xchacha(self, header: bytes, payload: bytes) -> bytes:
        nonce = _NONCE24.pack(self._next_counter())
        sealed = _xchacha_encrypt(payload, header, nonce, self._key)
        return header + sealed + nonce[:COUNTER_SIZE]

    def _legacy_split(self, header: bytes, payload: bytes) -> tuple[bytes, bytes]:
        clear = clear_size(header)
        return header[:clear], header[clear:] + payload

    def _lite(self, header: bytes, payload: bytes) -> bytes:
        clear, plain = self._legacy_split(header, payload)
        nonce = _NONCE24.pack(self._next_counter())
        return clear + self._box.encrypt(plain, nonce).ciphertext + nonce[:COUNTER_SIZE]

    def _suffix(self, header: bytes, payload: bytes) -> bytes:
        clear, plain = self._legacy_split(header, payload)
        nonce = os.urandom(NONCE24_SIZE)
        return clear + self._box.encrypt(plain, nonce).ciphertext + nonce

    def _plain(self, header: bytes, payload: bytes) -> bytes:
        clear, plain = self._legacy_split(header, payload)
        nonce = header[:RTP_HEADER_SIZE] + bytes(NONCE24_SIZE - RTP_HEADER_SIZE)
        return clear + self._box.encrypt(plain, nonce).ciphertext
