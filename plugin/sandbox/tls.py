"""TLS for the sandbox's ``wss://`` voice listeners: a local certificate authority and the server
certificates it issues.

Discord's voice endpoints are TLS whatever their port, and discord.py's stock voice client
hardcodes ``wss://``, so the sandbox serves TLS by default. One CA is made per process, at run time
(never written to the repository): :func:`local_ca` returns it, with its certificate written to a
``.pem`` file (:attr:`LocalCA.ca_file`) that another process trusts through ``SSL_CERT_FILE``.
Each voice server gets a certificate from it for its names (:meth:`LocalCA.issue`).

In this process, :func:`trust_in_process` adds the CA to what aiohttp trusts by default, so an
unmodified client (Legato's, or discord.py's own) reaches the sandbox as it reaches Discord.
"""

from __future__ import annotations

import atexit
import datetime
import ipaddress
import shutil
import ssl
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp.connector
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["LocalCA", "ServerCertificate", "local_ca", "trust_in_process"]

_VALIDITY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class ServerCertificate:
    """A PEM server certificate, its private key, and the CA certificate that signed it."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    def server_context(self) -> ssl.SSLContext:
        """Return a server-side context presenting this certificate."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        # load_cert_chain reads only files; they live just long enough to be loaded.
        with tempfile.TemporaryDirectory(prefix="legato-tls-") as tmp:
            cert_path = Path(tmp) / "cert.pem"
            key_path = Path(tmp) / "key.pem"
            cert_path.write_bytes(self.cert_pem)
            key_path.write_bytes(self.key_pem)
            ctx.load_cert_chain(cert_path, key_path)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """Return a client-side context that trusts the issuing CA (and only it)."""
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=self.ca_pem.decode())


class LocalCA:
    """A certificate authority of this process: ECDSA P-256, valid from a minute ago for a day.

    Args:
        name: The CA's common name.
    """

    def __init__(self, name: str = "Legato sandbox local CA") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        public = self._key.public_key()
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem: bytes = self._cert.public_bytes(serialization.Encoding.PEM)
        self._dir: Path | None = None

    @property
    def ca_file(self) -> Path:
        """The CA certificate as a ``.pem`` file (made on first use, removed at exit)."""
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="legato-sandbox-ca-"))
            atexit.register(shutil.rmtree, self._dir, True)
            (self._dir / "legato-sandbox-ca.pem").write_bytes(self.cert_pem)
        return self._dir / "legato-sandbox-ca.pem"

    def issue(self, hosts: Sequence[str]) -> ServerCertificate:
        """Issue a server certificate for ``hosts`` (IP addresses or DNS names).

        Args:
            hosts: Names for the subject alternative names; the first is also the common name.

        Returns:
            The certificate, its key and this CA's certificate, in PEM.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return ServerCertificate(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            ca_pem=self.cert_pem,
        )


_lock = threading.Lock()
_ca: LocalCA | None = None
_trusted = False


def local_ca() -> LocalCA:
    """The process's CA, made on first use."""
    global _ca
    with _lock:
        if _ca is None:
            _ca = LocalCA()
        return _ca


def trust_in_process() -> None:
    """Make aiohttp in this process trust :func:`local_ca` beside the system's CAs (once).

    aiohttp verifies every ``wss://`` and ``https://`` connection that is not given its own SSL
    context with one default context, made when aiohttp is imported; discord.py's voice
    websocket and Legato's use it. It is not public, hence the private name.
    """
    global _trusted
    ca = local_ca()
    with _lock:
        if _trusted:
            return
        default: ssl.SSLContext = aiohttp.connector._SSL_CONTEXT_VERIFIED  # private: see above
        default.load_verify_locations(cadata=ca.cert_pem.decode())
        _trusted = True
