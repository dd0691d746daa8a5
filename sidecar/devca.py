"""The embedded development CA: created on first use, issues client and server certificates.

Its key lives in `<home>/ca/ca.key`, readable by the owner only. `ca.crt` is what the
developer's test servers trust (`mtls-sidecar ca export`).
"""

from __future__ import annotations

import getpass
import ipaddress
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.credentials import PKCS12_SUFFIXES, Candidate, PrivateKey
from sidecar.errors import KeystoreError
from sidecar.files import PRIVATE_FILE_MODE, atomic_write, ensure_private_dir, loose_key_problem
from sidecar.keystore import chains_to

log = logging.getLogger("sidecar.devca")

CA_LIFETIME = timedelta(days=3650)
# Backdating notBefore a little tolerates small clock differences between client and server.
BACKDATE = timedelta(minutes=1)
# The organization of every dev CA's name: an earlier dev CA (its folder moved away) is still ours.
DEV_CA_ORGANIZATION = "mtls-sidecar development"


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: PrivateKey = field(repr=False)
    chain: tuple[x509.Certificate, ...] = ()

    def cert_pem(self) -> bytes:
        """Leaf then chain, PEM."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.cert, *self.chain))

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


@dataclass(frozen=True)
class DevCA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue_client(self, subject: str, lifetime: timedelta, now: datetime, key: PrivateKey | None = None) -> Issued:
        """A client certificate (clientAuth) for `subject`, an RFC 4514 string like "CN=dev"."""
        name = parse_subject(subject)
        leaf_key = key_or_new(key)
        builder = _leaf_builder(self, name, leaf_key, lifetime, now).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        return self._sign(builder, leaf_key)

    def issue_server(
        self, names: Sequence[str], lifetime: timedelta, now: datetime, key: PrivateKey | None = None
    ) -> Issued:
        """A server certificate (serverAuth) with DNS and IP SANs for `names`."""
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        leaf_key = key_or_new(key)
        builder = (
            _leaf_builder(self, subject, leaf_key, lifetime, now)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        )
        return self._sign(builder, leaf_key)

    def _sign(self, builder: x509.CertificateBuilder, leaf_key: PrivateKey) -> Issued:
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert=cert, key=leaf_key, chain=(self.cert,))


def key_or_new(key: PrivateKey | None) -> PrivateKey:
    return key if key is not None else ec.generate_private_key(ec.SECP256R1())


def _leaf_builder(
    ca: DevCA, subject: x509.Name, key: PrivateKey, lifetime: timedelta, now: datetime
) -> x509.CertificateBuilder:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return builder


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """digitalSignature always (TLS handshakes); keyCertSign and cRLSign for the CA only."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def parse_subject(subject: str) -> x509.Name:
    try:
        name = x509.Name.from_rfc4514_string(subject)
    except ValueError as exc:
        raise KeystoreError(
            f'subject {subject!r} is not an RFC 4514 name ({exc}); write for example "CN=dev" or "CN=dev,O=Example"'
        ) from exc
    if not list(name):
        raise KeystoreError(f'subject {subject!r} is empty; write for example "CN=dev"')
    return name


def create_ca(now: datetime) -> DevCA:
    key = ec.generate_private_key(ec.SECP256R1())
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"mtls-sidecar dev CA ({who})"[:64]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEV_CA_ORGANIZATION),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return DevCA(cert=cert, key=key)


def from_dev_ca(cert: x509.Certificate, chain: Sequence[x509.Certificate], ca_cert: x509.Certificate | None) -> bool:
    """Whether a dev CA issued `cert`: this one (checked by signature), or an earlier one of this
    tool, as after `ca/` was moved away to start a new CA (its issuer name says so)."""
    if ca_cert is not None and chains_to(cert, chain, [ca_cert]):
        return True
    organizations = cert.issuer.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return any(attribute.value == DEV_CA_ORGANIZATION for attribute in organizations)


def foreign_credentials(candidates: Sequence[Candidate], ca_cert: x509.Certificate | None) -> list[str]:
    """The credentials of an identity folder that no dev CA issued, one phrase each
    ("corp.p12 (issued by CN=Example Corp CA)"). A PKCS#12 file that cannot be opened counts:
    the dev CA never writes one. Files too broken to hold a certificate are no one's."""
    foreign = []
    for candidate in candidates:
        name = Path(candidate.file).name
        if candidate.cert is not None:
            if not from_dev_ca(candidate.cert, candidate.chain, ca_cert):
                foreign.append(f"{name} (issued by {candidate.cert.issuer.rfc4514_string()})")
        elif Path(candidate.file).suffix.lower() in PKCS12_SUFFIXES:
            foreign.append(f"{name} (a PKCS#12 file, which the dev CA never writes)")
    return foreign


# I/O


def ca_paths(ca_dir: Path) -> tuple[Path, Path]:
    return ca_dir / "ca.crt", ca_dir / "ca.key"


def load_or_create_ca(ca_dir: Path, now: datetime) -> DevCA:
    """Load the dev CA from `ca_dir`, creating it there on first use."""
    cert_path, key_path = ca_paths(ca_dir)
    if cert_path.exists() and key_path.exists():
        return load_ca(ca_dir)
    ensure_private_dir(ca_dir)
    ca = create_ca(now)
    key_pem = ca.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write(key_path, key_pem, PRIVATE_FILE_MODE)
    atomic_write(cert_path, ca.cert_pem, 0o644)
    log.info("created the dev CA in %s (%s)", ca_dir, ca.cert.subject.rfc4514_string())
    return ca


def load_ca(ca_dir: Path) -> DevCA:
    cert_path, key_path = ca_paths(ca_dir)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        loose = loose_key_problem(key_path, key_path.stat().st_mode)
        if loose is not None:
            raise KeystoreError(f"the dev CA key is not private: {loose}")
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise KeystoreError(f"the dev CA is missing {exc.filename}; run `mtls-sidecar run` once to create it") from exc
    except ValueError as exc:
        raise KeystoreError(
            f"the dev CA in {ca_dir} is unreadable ({exc}); move the folder away to start a new CA"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeystoreError(f"{key_path}: the dev CA key must be an EC key")
    return DevCA(cert=cert, key=key)


def write_credential(folder: Path, issued: Issued, now: datetime) -> Path:
    """Write `issued` into an identity folder as one PEM bundle (0600); returns its path."""
    from sidecar.renewal.store import write_credential as write_files

    return write_files(folder, issued.cert, issued.cert_pem(), issued.key_pem(), now)
