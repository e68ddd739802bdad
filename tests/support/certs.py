"""Throwaway certificates for TLS and mTLS tests: a CA, a server certificate with chosen names, a client one."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LOCALHOST = ("localhost", "127.0.0.1")


def _alt_name(name: str) -> Any:
    """An IP address SAN for an address, a DNS name SAN for anything else."""
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def certificates(tmp: Path, server_names: Sequence[str] = LOCALHOST) -> dict[str, Path]:
    """PEM files in `tmp`: ca.crt/.key, server.crt/.key naming `server_names` (its SANs, the first also its CN;
    nothing else), client.crt/.key. Both leaf certificates are signed by the CA, which mTLS servers trust."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def make(name: str, issuer: tuple | None, ca: bool, names: Sequence[str] = (), usage: Any = None) -> tuple:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject)
                   .issuer_name(issuer[1].subject if issuer else subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName([_alt_name(n) for n in names]), critical=False)
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return key, builder.sign(issuer[0] if issuer else key, hashes.SHA256())

    ca = make("tokenstream test CA", None, True)
    server = make(server_names[0], ca, False, server_names, ExtendedKeyUsageOID.SERVER_AUTH)
    client = make("client", ca, False, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    files = {}
    for label, (key, cert) in {"ca": ca, "server": server, "client": client}.items():
        files[f"{label}.crt"] = tmp / f"{label}.crt"
        files[f"{label}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{label}.key"] = tmp / f"{label}.key"
        files[f"{label}.key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
    return files


def names_in(cert: Path) -> set[str]:
    """The names a certificate's SAN extension holds (DNS names and IP addresses, as text)."""
    from cryptography import x509

    sans = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    return {*sans.get_values_for_type(x509.DNSName), *map(str, sans.get_values_for_type(x509.IPAddress))}
