"""The receiver's half of Discord's RTP encryption modes: what the sandbox voice server decrypts.

The layouts and the sender's side are :mod:`legato.voice.crypto`'s. A decryptor faces untrusted
datagrams: it raises :class:`~legato.voice.rtp.MalformedPacket` or :class:`DecryptionFailed` (both
``ValueError``) and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

import nacl.bindings
import nacl.exceptions
import nacl.secret
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from legato.voice.crypto import (
    AEAD_AES256_GCM_RTPSIZE,
    COUNTER_SIZE,
    NONCE24_SIZE,
    RTPSIZE_MODES,
    TAG_SIZE,
    XSALSA20_POLY1305_LITE,
    XSALSA20_POLY1305_SUFFIX,
    checked_key,
    clear_size,
)
from legato.voice.rtp import RTP_HEADER_SIZE, MalformedPacket, RtpPacket, parse_rtp

__all__ = ["DecryptionFailed", "PacketDecryptor"]


class DecryptionFailed(ValueError):
    """A packet's authentication tag did not verify (wrong key, tampering, corruption)."""


class PacketDecryptor:
    """Decrypts incoming RTP packets (the sandbox server's side).

    Args:
        mode: one of :data:`SUPPORTED_MODES`.
        secret_key: the 32-byte session key.

    Raises:
        UnsupportedMode: unknown mode.
        ValueError: the key is not 32 bytes.
    """

    __slots__ = ("_aes", "_box", "_key", "mode")

    def __init__(self, mode: str, secret_key: bytes | Sequence[int]) -> None:
        self.mode = mode
        self._key = checked_key(mode, bytes(secret_key))
        self._aes = AESGCM(self._key) if mode == AEAD_AES256_GCM_RTPSIZE else None
        self._box = nacl.secret.SecretBox(self._key)

    def decrypt(self, packet: bytes, parsed: RtpPacket | None = None) -> tuple[RtpPacket, bytes]:
        """Authenticate and decrypt one packet.

        Args:
            packet: the datagram.
            parsed: ``parse_rtp(packet)``, when the caller has it already (the media plane,
                which read the SSRC from it): the packet is parsed once.

        Returns:
            ``(rtp, media)``: ``rtp`` is the packet as if it had been sent in clear (its
            ``payload`` is the plaintext after the header and extension preamble); ``media`` is
            the Opus payload, without the extension body and RTP padding.

        Raises:
            MalformedPacket: not RTP, truncated, or a plaintext whose extension/padding does
                not fit.
            DecryptionFailed: the tag does not verify.
        """
        data = bytes(packet)
        outer = parse_rtp(data) if parsed is None else parsed
        if self.mode in RTPSIZE_MODES:
            body = outer.payload
            if len(body) < TAG_SIZE + COUNTER_SIZE:
                raise MalformedPacket(f"{len(body)} bytes cannot hold a tag and a nonce")
            plain = self._open_aead(outer.header_bytes, body[:-COUNTER_SIZE], body[-COUNTER_SIZE:])
            # The header, CSRCs and extension preamble are sent in clear: the packet in clear
            # is the same header with the plaintext after it.
            rtp = RtpPacket(
                outer.header,
                outer.header_bytes,
                plain,
                outer.extension_profile,
                outer.extension_length,
            )
        else:
            clear = clear_size(data)
            plain = self._open_legacy(data, clear)
            rtp = parse_rtp(data[:clear] + plain)
        return rtp, rtp.media()

    def _open_aead(self, header: bytes, sealed: bytes, counter: bytes) -> bytes:
        try:
            if self._aes is not None:
                return self._aes.decrypt(counter + bytes(8), sealed, header)
            result: bytes = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                sealed, header, counter + bytes(NONCE24_SIZE - COUNTER_SIZE), self._key
            )
            return result
        except (InvalidTag, nacl.exceptions.CryptoError) as exc:
            raise DecryptionFailed(f"{self.mode}: authentication failed") from exc

    def _open_legacy(self, data: bytes, clear: int) -> bytes:
        body = data[clear:]
        if self.mode == XSALSA20_POLY1305_LITE:
            if len(body) < TAG_SIZE + COUNTER_SIZE:
                raise MalformedPacket(f"{len(body)} bytes cannot hold a tag and a nonce")
            nonce = body[-COUNTER_SIZE:] + bytes(NONCE24_SIZE - COUNTER_SIZE)
            sealed = body[:-COUNTER_SIZE]
        elif self.mode == XSALSA20_POLY1305_SUFFIX:
            if len(body) < TAG_SIZE + NONCE24_SIZE:
                raise MalformedPacket(f"{len(body)} bytes cannot hold a tag and a nonce")
            nonce = body[-NONCE24_SIZE:]
            sealed = body[:-NONCE24_SIZE]
        else:
            if len(body) < TAG_SIZE:
                raise MalformedPacket(f"{len(body)} bytes cannot hold a tag")
            nonce = data[:RTP_HEADER_SIZE] + bytes(NONCE24_SIZE - RTP_HEADER_SIZE)
            sealed = body
        try:
            return self._box.decrypt(sealed, nonce)
        except nacl.exceptions.CryptoError as exc:
            raise DecryptionFailed(f"{self.mode}: authentication failed") from exc
