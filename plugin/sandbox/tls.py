"""A throwaway self-signed certificate for the sandbox's ``wss://`` listener.

discord.py's stock voice client hardcodes ``wss://``, so a sandbox that it can reach has to speak
TLS. The certificate is made at run time for ``127.0.0.1``/``localhost`` (never written to the
repository) and is trusted by whoever takes :meth:`SelfSignedCert.client_context`.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class SelfSignedCert:
    """A PEM certificate and its private key, valid for the loopback names."""

    cert_pem: bytes
    key_pem: bytes

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
        """Return a client-side context that trusts this certificate (and only it)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=self.cert_pem.decode())
        return ctx


def make_self_signed_cert(hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> SelfSignedCert:
    """Generate an ECDSA P-256 certificate for ``hosts``, valid from a minute ago for a day.

    Args:
        hosts: IP addresses or DNS names to put in the subject alternative names; the first one
            is also the common name.

    Returns:
        The certificate and key in PEM.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return SelfSignedCert(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
