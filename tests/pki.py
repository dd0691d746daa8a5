"""A flexible test PKI: CAs and leaves with any dates, names and usages, made at test time."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def now() -> datetime:
    return datetime.now(UTC)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: Key, password: bytes | None = None, traditional: bool = False) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    fmt = serialization.PrivateFormat.TraditionalOpenSSL if traditional else serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, fmt, encryption)


@dataclass
class Leaf:
    cert: x509.Certificate
    key: Key
    chain: list[x509.Certificate] = field(default_factory=list)

    @property
    def serial_hex(self) -> str:
        """The serial as OpenSSL (and nginx's $ssl_client_serial) prints it: DER bytes in hex."""
        n = self.cert.serial_number
        return n.to_bytes((n.bit_length() + 7) // 8, "big").hex().upper()

    def chain_pem(self) -> bytes:
        return b"".join(pem(c) for c in [self.cert, *self.chain])

    def write_pair(self, folder: Path, stem: str, *, cert_suffix: str = ".crt") -> tuple[Path, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = folder / f"{stem}{cert_suffix}", folder / f"{stem}.key"
        key_path.write_bytes(key_pem(self.key))
        key_path.chmod(0o600)
        cert_path.write_bytes(self.chain_pem())
        return cert_path, key_path

    def write_bundle(self, folder: Path, name: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.write_bytes(self.chain_pem() + key_pem(self.key))
        path.chmod(0o600)
        return path

    def write_p12(self, folder: Path, name: str, password: bytes) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        data = pkcs12.serialize_key_and_certificates(
            b"test",
            self.key,
            self.cert,
            self.chain or None,
            serialization.BestAvailableEncryption(password),
        )
        path = folder / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path


class CA:
    """A root CA (optionally with an intermediate) that issues leaves on demand."""

    def __init__(self, name: str = "Test Root CA", *, with_intermediate: bool = False) -> None:
        self.root_key: Key = ec.generate_private_key(ec.SECP256R1())
        start = now() - timedelta(days=1)
        self.root = self._ca_cert(name, self.root_key, self.root_key, None, start)
        self.intermediate: x509.Certificate | None = None
        self.signing_key: Key = self.root_key
        self.signing_cert = self.root
        if with_intermediate:
            inter_key = ec.generate_private_key(ec.SECP256R1())
            self.intermediate = self._ca_cert(f"{name} Intermediate", inter_key, self.root_key, self.root, start)
            self.signing_key, self.signing_cert = inter_key, self.intermediate

    @staticmethod
    def _ca_cert(
        name: str, key: Key, signer: Key, issuer: x509.Certificate | None, start: datetime
    ) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.subject if issuer else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(signer, hashes.SHA256())
        )

    def root_pem(self) -> bytes:
        return pem(self.root)

    def write_root(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.root_pem())
        return path

    def issue(
        self,
        cn: str,
        *,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        uris: Sequence[str] = (),
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        lifetime: timedelta = timedelta(days=7),
        eku: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
        key: Key | None = None,
        rsa_key: bool = False,
        serial: int | None = None,
        digital_signature: bool = True,
        ou: str | None = None,
    ) -> Leaf:
        leaf_key: Key = key or (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            if rsa_key
            else ec.generate_private_key(ec.SECP256R1())
        )
        start = not_before or now() - timedelta(minutes=5)
        end = not_after or start + lifetime
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
                    + ([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou)] if ou else [])
                )
            )
            .issuer_name(self.signing_cert.subject)
            .public_key(leaf_key.public_key())
            .serial_number(serial or x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature, False, not digital_signature, False, False, False, False, False, False
                ),
                critical=True,
            )
        )
        if eku is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.signing_key, hashes.SHA256())
        chain = [self.intermediate] if self.intermediate is not None else []
        return Leaf(cert, leaf_key, chain)

    def server(self, *names: str, **kwargs: object) -> Leaf:
        """A server leaf for DNS names and IP addresses (serverAuth)."""
        dns = [n for n in names if not _is_ip(n)]
        ips = [n for n in names if _is_ip(n)]
        return self.issue(
            names[0] if names else "server", dns=dns, ips=ips, eku=(ExtendedKeyUsageOID.SERVER_AUTH,), **kwargs
        )  # type: ignore[arg-type]

    def client(self, cn: str, **kwargs: object) -> Leaf:
        return self.issue(cn, **kwargs)  # type: ignore[arg-type]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
