"""What aiortc 1.16 / aioice 0.13 need to talk to voice servers and browsers.

Three gaps, each closed here so the client (:mod:`legato.voice.transport.webrtc`) and the
sandbox's server peer (:mod:`legato.sandbox.webrtc`) share one fix:

* DTLS cipher suites. aiortc's certificate builds an SSL context offering ECDSA suites only, so
  a server holding an RSA certificate (medooze-based ones do) fails with "no shared cipher".
  :class:`DtlsCertificate` offers ECDHE with both ECDSA and RSA authentication, as browsers do,
  and can hold an RSA key (the sandbox uses that to prove the point).
* Host candidates. aioice never gathers 127.0.0.1, so two peers on a machine with only a
  loopback interface cannot meet. :func:`host_addresses` overrides the gathered addresses for
  the peer connections set up inside it (a context variable, so other peers are unaffected).
* The certificate of a peer connection is private to it; :func:`use_certificate` swaps it
  before any transport is created.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import os
from collections.abc import Callable, Iterator
from typing import Any, Final, Literal

import aioice.ice
from aiortc import RTCPeerConnection
from aiortc.rtcdtlstransport import RTCCertificate
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from OpenSSL import SSL

KeyType = Literal["ecdsa", "rsa"]

#: ECDHE suites with ECDSA and RSA authentication, in Chrome's order of preference.
BROWSER_DTLS_CIPHERS: Final = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    b"ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:"
    b"ECDHE-ECDSA-AES256-SHA:ECDHE-RSA-AES256-SHA"
)

AddressFilter = Callable[[list[str]], list[str]]
_address_filter: contextvars.ContextVar[AddressFilter | None] = contextvars.ContextVar(
    "legato_host_addresses", default=None
)
_stock_get_host_addresses: Final = aioice.ice.get_host_addresses


def _get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    addresses: list[str] = _stock_get_host_addresses(use_ipv4=use_ipv4, use_ipv6=use_ipv6)
    override = _address_filter.get()
    return addresses if override is None else override(addresses)


# aioice looks the function up in its module at gather time; the replacement behaves exactly
# like the original unless `host_addresses` is active in the calling context.
aioice.ice.get_host_addresses = _get_host_addresses


@contextlib.contextmanager
def host_addresses(choose: AddressFilter) -> Iterator[None]:
    """Gather host candidates on ``choose(stock_addresses)`` inside this block.

    Gathering happens in ``setLocalDescription``; await it inside the block. Example:
    ``with host_addresses(lambda found: [*found, "127.0.0.1"]): await pc.setLocalDescription()``.
    """
    token = _address_filter.set(choose)
    try:
        yield
    finally:
        _address_filter.reset(token)


class DtlsCertificate(RTCCertificate):
    """An aiortc certificate whose DTLS context offers browser cipher suites (ECDSA and RSA)."""

    def _create_ssl_context(self, srtp_profiles: list[Any]) -> SSL.Context:
        ctx: SSL.Context = super()._create_ssl_context(srtp_profiles)
        ctx.set_cipher_list(BROWSER_DTLS_CIPHERS)
        return ctx

    @property
    def key_type(self) -> KeyType:
        """``"rsa"`` or ``"ecdsa"``: the kind of key the certificate holds."""
        return "rsa" if isinstance(self._cert.public_key(), rsa.RSAPublicKey) else "ecdsa"

    @classmethod
    def generate(cls, key_type: KeyType = "ecdsa") -> DtlsCertificate:
        """A fresh self-signed certificate with an ECDSA P-256 or RSA 2048 key."""
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
        if key_type == "rsa":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, os.urandom(16).hex())])
        now = datetime.datetime.now(tz=datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256())
        )
        # aiortc annotates EC keys only; pyOpenSSL's use_privatekey takes RSA keys too.
        return cls(key=key, cert=cert)  # type: ignore[arg-type]


def use_certificate(pc: RTCPeerConnection, certificate: RTCCertificate) -> None:
    """Make ``pc`` use ``certificate`` for DTLS.

    Call it right after creating ``pc``: transports created earlier keep the old one. aiortc
    has no public way to pass a certificate (its ``RTCConfiguration`` lacks ``certificates``),
    so this sets the name-mangled private list it reads when it creates a DTLS transport.
    """
    pc._RTCPeerConnection__certificates = [certificate]  # type: ignore[attr-defined]  # see above
