"""Throwaway certificates for one benchmark run (ECDSA P-256), made at bench time.

A server CA that signs the backend's certificate (`localhost`, 127.0.0.1), and a client
CA with an intermediate that signs the tunnels' client certificate. Keys are written 0600
into the run's temporary folder only.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The client certificate's CN: the role that PostgreSQL's `cert` authentication logs in as.
CLIENT_CN = "bench-client"


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(
    cn: str, issuer: Issued | None, *, ca: bool, eku: x509.ObjectIdentifier | None = None, names: tuple[str, ...] = ()
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.now(UTC) - timedelta(hours=1)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    if names:
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    signer = issuer.key if issuer else key
    return Issued(builder.sign(signer, hashes.SHA256()), key)


@dataclass(frozen=True)
class BenchPki:
    server_cert: Path  # backend: leaf
    server_key: Path
    server_ca: Path  # what the tunnels trust
    client_ca: Path  # what the backend trusts
    client_cert: Path  # tunnels: leaf + intermediate
    client_key: Path
    client_bundle: Path  # leaf + intermediate + key in one file (haproxy)


def make(folder: Path, server_name: str) -> BenchPki:
    folder.mkdir(parents=True, exist_ok=True)
    server_root = _issue("Bench Server CA", None, ca=True)
    server = _issue(
        server_name, server_root, ca=False, eku=ExtendedKeyUsageOID.SERVER_AUTH, names=(server_name, "127.0.0.1")
    )
    client_root = _issue("Bench Client CA", None, ca=True)
    client_inter = _issue("Bench Client CA Intermediate", client_root, ca=True)
    client = _issue(CLIENT_CN, client_inter, ca=False, eku=ExtendedKeyUsageOID.CLIENT_AUTH)

    def write(name: str, data: bytes, secret: bool = False) -> Path:
        path = folder / name
        if secret:
            path.touch(mode=0o600)
        path.write_bytes(data)
        return path

    chain = _pem(client.cert) + _pem(client_inter.cert)
    return BenchPki(
        server_cert=write("server.crt", _pem(server.cert)),
        server_key=write("server.key", _key_pem(server.key), secret=True),
        server_ca=write("server-ca.pem", _pem(server_root.cert)),
        client_ca=write("client-ca.pem", _pem(client_root.cert)),
        client_cert=write("client.crt", chain),
        client_key=write("client.key", _key_pem(client.key), secret=True),
        client_bundle=write("client-bundle.pem", chain + _key_pem(client.key), secret=True),
    )
