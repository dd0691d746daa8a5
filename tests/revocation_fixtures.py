"""Revocation in tests: server certificates with AIA/CRL distribution points, CRLs, a real
`openssl ocsp` responder and a CRL server, all on 127.0.0.1.

The responder is OpenSSL's own (`openssl ocsp -index … -rsigner … -CA …`), fed one request
at a time through a small HTTP front bound to 127.0.0.1: OpenSSL 3.0's `-port` takes a bare
port number and binds [::] (every interface), which these tests must not do.
"""

from __future__ import annotations

import subprocess
import tempfile
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from tests.pki import CA, Key, Leaf, key_pem, pem


def issue(
    ca: CA,
    cn: str,
    *,
    dns: Sequence[str] = ("localhost",),
    uris: Sequence[str] = (),
    ocsp_url: str | None = None,
    crl_url: str | None = None,
    eku: x509.ObjectIdentifier = ExtendedKeyUsageOID.SERVER_AUTH,
    key: Key | None = None,
) -> Leaf:
    """A leaf from `ca`'s signing certificate with optional AIA OCSP URL and CRL distribution point."""
    leaf_key = key or ec.generate_private_key(ec.SECP256R1())
    start = datetime.now(UTC) - timedelta(minutes=5)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.signing_cert.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if ocsp_url:
        access = x509.AccessDescription(AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url))
        builder = builder.add_extension(x509.AuthorityInformationAccess([access]), critical=False)
    if crl_url:
        point = x509.DistributionPoint([x509.UniformResourceIdentifier(crl_url)], None, None, None)
        builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
    cert = builder.sign(ca.signing_key, hashes.SHA256())
    chain = [ca.intermediate] if ca.intermediate is not None else []
    return Leaf(cert, leaf_key, chain)


def responder_leaf(ca: CA) -> Leaf:
    """A delegated OCSP responder: issued by the CA, extendedKeyUsage OCSPSigning."""
    return issue(ca, "Test OCSP Responder", dns=(), eku=ExtendedKeyUsageOID.OCSP_SIGNING)


def make_crl(
    ca: CA,
    revoked: Sequence[x509.Certificate] = (),
    *,
    next_update: timedelta | None = timedelta(days=1),
    signer: Key | None = None,
    encoding: serialization.Encoding = serialization.Encoding.PEM,
) -> bytes:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.signing_cert.subject)
        .last_update(now - timedelta(minutes=1))
        .next_update(now + (next_update or timedelta(days=1)))
    )
    for cert in revoked:
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(now - timedelta(minutes=1))
            .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
            .build()
        )
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(signer or ca.signing_key, hashes.SHA256()).public_bytes(encoding)


def _asn1_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%y%m%d%H%M%SZ")


def index_line(cert: x509.Certificate, *, revoked: bool = False) -> str:
    """A line of OpenSSL's CA database (index.txt), which `openssl ocsp -index` answers from."""
    serial = cert.serial_number.to_bytes((cert.serial_number.bit_length() + 8) // 8, "big").hex().upper()
    expires = _asn1_time(cert.not_valid_after_utc)
    when = f"{_asn1_time(datetime.now(UTC) - timedelta(minutes=1))},keyCompromise" if revoked else ""
    dn = "".join(f"/{a.rfc4514_attribute_name}={a.value}" for a in cert.subject)
    return "\t".join(["R" if revoked else "V", expires, when, serial, "unknown", dn]) + "\n"


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 in a thread, as a context manager."""

    def __init__(self) -> None:
        self.requests = 0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        raise NotImplementedError

    def __enter__(self) -> Self:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with owner._lock:
                    owner.requests += 1
                status, kind, data = owner.answer(method, self.path, body)
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return int(self._httpd.server_address[1])

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self._httpd is not None and self._thread is not None
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


class OpenSSLResponder(_Server):
    """`openssl ocsp` answering from an index of good and revoked certificates, signed by a
    delegated responder certificate, with nextUpdate one day ahead."""

    def __init__(self, folder: Path, ca: CA, responder: Leaf) -> None:
        super().__init__()
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.index = folder / "index.txt"
        self.index.write_text("")
        self.ca_file = folder / "issuer.pem"
        self.ca_file.write_bytes(pem(ca.signing_cert))
        self.rsigner = folder / "responder.pem"
        self.rsigner.write_bytes(pem(responder.cert))
        self.rkey = folder / "responder.key"
        self.rkey.write_bytes(key_pem(responder.key))
        self.rkey.chmod(0o600)
        self.errors: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ocsp"

    def publish(self, *, good: Sequence[Leaf] = (), revoked: Sequence[Leaf] = ()) -> None:
        """What the responder knows (certificates it is not told about are "unknown")."""
        self.index.write_text(
            "".join(index_line(leaf.cert) for leaf in good)
            + "".join(index_line(leaf.cert, revoked=True) for leaf in revoked)
        )

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        with tempfile.TemporaryDirectory(dir=self.folder) as scratch:
            request, response = Path(scratch, "req.der"), Path(scratch, "resp.der")
            request.write_bytes(body)
            done = subprocess.run(
                ["openssl", "ocsp", "-index", str(self.index), "-CA", str(self.ca_file),
                 "-rsigner", str(self.rsigner), "-rkey", str(self.rkey), "-ndays", "1",
                 "-reqin", str(request), "-respout", str(response)],
                capture_output=True, text=True, timeout=10,
            )  # fmt: skip
            if done.returncode != 0 or not response.exists():
                self.errors.append(done.stderr)
                return 500, "text/plain", b"responder failed\n"
            return 200, "application/ocsp-response", response.read_bytes()


class StaticServer(_Server):
    """Serves fixed bytes at fixed paths (a CRL distribution point)."""

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        super().__init__()
        self.files = dict(files or {})

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        data = self.files.get(path)
        if data is None:
            return 404, "text/plain", b"not found\n"
        return 200, "application/pkix-crl", data
