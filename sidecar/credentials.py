"""Credential files → candidates. Pure: takes file names and bytes, reads nothing itself.

An identity folder holds any number of credentials, in any of these shapes:

- one PEM file with the certificate, its chain and the private key;
- `NAME.crt` or `NAME.pem` (certificate and chain) beside `NAME.key`;
- a PKCS#12 file (`.p12`, `.pfx`), password from an environment variable;
- keys as plain or encrypted PKCS#8, or traditional (PKCS#1 / SEC1) PEM.

Every file that looks like a credential becomes exactly one `Candidate`; a file that cannot
be used still becomes a candidate, carrying the plain-words reason, so status can list it.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import hashlib
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import PurePath

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.utils import CryptographyDeprecationWarning

from sidecar.kdf import kdf_refusal

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey

CERT_SUFFIXES = (".crt", ".pem", ".cer")
KEY_SUFFIXES = (".key",)
PKCS12_SUFFIXES = (".p12", ".pfx")

_PEM_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n")
_PEM_END = re.compile(rb"-----END ([A-Z0-9 ]+)-----")
_KEY_LABELS = {b"PRIVATE KEY", b"ENCRYPTED PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY"}


@dataclass(frozen=True)
class Secrets:
    """Passwords for one identity's files. Never logged: the repr hides them."""

    pkcs12_password: bytes | None = field(default=None, repr=False)
    key_password: bytes | None = field(default=None, repr=False)
    pkcs12_password_source: str = "pkcs12_password_env"
    key_password_source: str = "key_password_env"
    # Why there is no password although the identity names where it comes from, in words
    # ("environment variable CORP_P12 is not set"); None when nothing names a source.
    pkcs12_password_missing: str | None = None
    key_password_missing: str | None = None


Pkcs12Contents = tuple[object, x509.Certificate | None, list[x509.Certificate]]
Pkcs12Loader = Callable[[bytes, bytes | None], Pkcs12Contents]
KeyLoader = Callable[[bytes, bytes | None], object]


def _load_pkcs12_here(data: bytes, password: bytes | None) -> Pkcs12Contents:
    key, cert, extra = pkcs12.load_key_and_certificates(data, password)
    return key, cert, extra


def _load_key_here(data: bytes, password: bytes | None) -> object:
    return serialization.load_pem_private_key(data, password=password)


@dataclass(frozen=True)
class Unlockers:
    """What derives keys from passwords: in this process by default. The daemon passes loaders
    that run in a child process with a time bound, since cryptography holds the interpreter
    lock while it derives (a worker thread alone would still stall the event loop)."""

    pkcs12: Pkcs12Loader = _load_pkcs12_here
    key: KeyLoader = _load_key_here


IN_PROCESS = Unlockers()


@dataclass(frozen=True, eq=False)
class Candidate:
    """One credential found in a keystore folder, usable or not.

    `problem` is set when the files themselves could not be read into a certificate and a
    key; time, usage and chain checks happen later, in `keystore.evaluate`.
    """

    file: str
    cert: x509.Certificate | None = None
    chain: tuple[x509.Certificate, ...] = ()
    key: PrivateKey | None = field(default=None, repr=False)
    key_file: str | None = None
    problem: str | None = None

    @cached_property  # every new connection looks its context up by it: serialised once, not each time
    def fingerprint(self) -> str:
        """SHA-256 of the certificate (DER), hex; stable identity for caches and logs."""
        if self.cert is None:
            return ""
        der = self.cert.public_bytes(serialization.Encoding.DER)
        return hashlib.sha256(der).hexdigest()


def candidates_from_files(
    files: Mapping[str, bytes], secrets: Secrets, unlockers: Unlockers = IN_PROCESS
) -> list[Candidate]:
    """Group a folder's files into credentials and parse each one.

    `files` maps file names (no folders) to their content. Files whose names do not look
    like credentials (README, hidden and temporary files) are ignored.
    """
    names = sorted(name for name in files if _is_credential_name(name))
    keys_by_stem = {PurePath(n).stem: n for n in names if PurePath(n).suffix.lower() in KEY_SUFFIXES}
    used_keys: set[str] = set()
    candidates: list[Candidate] = []
    for name in names:
        suffix = PurePath(name).suffix.lower()
        if suffix in PKCS12_SUFFIXES:
            candidates.append(_from_pkcs12(name, files[name], secrets, unlockers))
        elif suffix in CERT_SUFFIXES:
            key_name = keys_by_stem.get(PurePath(name).stem)
            candidate = _from_pem(name, files[name], key_name, files.get(key_name or ""), secrets, unlockers)
            if candidate is None:
                continue  # a .pem holding only a key: it is some certificate's key file
            if candidate.key_file:
                used_keys.add(candidate.key_file)
            candidates.append(candidate)
    for stem, key_name in keys_by_stem.items():
        if key_name not in used_keys and not _has_cert_sibling(stem, names):
            candidates.append(
                Candidate(
                    file=key_name,
                    problem=f"private key with no certificate (expected {stem}.crt or {stem}.pem beside it)",
                )
            )
    return candidates


def _is_credential_name(name: str) -> bool:
    if name.startswith(".") or name.endswith((".tmp", "~")):
        return False
    return PurePath(name).suffix.lower() in CERT_SUFFIXES + KEY_SUFFIXES + PKCS12_SUFFIXES


def _has_cert_sibling(stem: str, names: list[str]) -> bool:
    return any(PurePath(n).stem == stem and PurePath(n).suffix.lower() in CERT_SUFFIXES for n in names)


def _pem_blocks(data: bytes) -> list[tuple[bytes, bytes]]:
    """Each `-----BEGIN L-----` line up to the first `-----END L-----` after it, in O(n log n).

    One pass finds every END line (by label), then each BEGIN looks up its END by bisection;
    a BEGIN with no END after it is skipped. (A regex with a back-reference did the same
    match but rescanned the rest of the file for every unterminated BEGIN: quadratic.)"""
    ends: dict[bytes, list[int]] = {}
    for m in _PEM_END.finditer(data):
        ends.setdefault(m.group(1), []).append(m.start())
    blocks: list[tuple[bytes, bytes]] = []
    pos = 0
    while (begin := _PEM_BEGIN.search(data, pos)) is not None:
        label = begin.group(1)
        starts = ends.get(label, [])
        i = bisect.bisect_left(starts, begin.end())
        if i == len(starts):
            pos = begin.end()
            continue
        stop = starts[i] + len(b"-----END -----") + len(label)
        blocks.append((label, data[begin.start() : stop]))
        pos = stop
    return blocks


@contextlib.contextmanager
def _strict_parsing() -> Iterator[None]:
    """What cryptography only warns about today (a serial number that is not positive, which RFC
    5280 forbids and a later release will refuse) makes the certificate malformed now: a
    warning would otherwise reach the log, or stop the daemon where warnings are errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CryptographyDeprecationWarning)
        try:
            yield
        except CryptographyDeprecationWarning as exc:
            raise ValueError(str(exc).split(", which is disallowed")[0]) from None


def _from_pem(
    name: str, data: bytes, key_name: str | None, key_data: bytes | None, secrets: Secrets, unlockers: Unlockers
) -> Candidate | None:
    blocks = _pem_blocks(data)
    if not blocks:
        return Candidate(file=name, problem="not a PEM file (no -----BEGIN ...----- block found)")
    cert_blocks = [b for label, b in blocks if label in (b"CERTIFICATE", b"TRUSTED CERTIFICATE")]
    key_blocks = [b for label, b in blocks if label in _KEY_LABELS]
    if not cert_blocks:
        if key_blocks:
            return None
        labels = ", ".join(sorted({label.decode() for label, _ in blocks}))
        return Candidate(file=name, problem=f"no certificate in this PEM file (found {labels})")
    try:
        with _strict_parsing():
            certs = [x509.load_pem_x509_certificate(b) for b in cert_blocks]
    except ValueError as exc:
        return Candidate(file=name, problem=f"malformed certificate PEM: {_short(exc)}")
    broken = next((problem for c in certs if (problem := _malformed_fields(c))), None)
    if broken is not None:
        return Candidate(file=name, problem=broken)
    leaf, chain = certs[0], tuple(certs[1:])
    if key_blocks:
        key_source, key_bytes = name, key_blocks[0]
    elif key_name is not None and key_data is not None:
        key_source, key_bytes = key_name, key_data
    else:
        stem = PurePath(name).stem
        return Candidate(
            file=name,
            cert=leaf,
            chain=chain,
            problem=f"no private key (expected one in this file or in {stem}.key beside it)",
        )
    key, problem = _load_pem_key(key_bytes, secrets, unlockers)
    return Candidate(
        file=name,
        cert=leaf,
        chain=chain,
        key=key,
        key_file=key_source if key_source != name else None,
        problem=None if problem is None else f"{problem} ({key_source})",
    )


def _load_pem_key(
    data: bytes, secrets: Secrets, unlockers: Unlockers = IN_PROCESS
) -> tuple[PrivateKey | None, str | None]:
    blocks = [b for label, b in _pem_blocks(data) if label in _KEY_LABELS]
    if not blocks:
        return None, "not a PEM private key"
    block = blocks[0]
    encrypted = _encrypted(block)
    if encrypted and secrets.key_password is None:
        if secrets.key_password_missing:
            return None, f"private key is encrypted and needs a password: {secrets.key_password_missing}"
        return None, f"private key is encrypted and no password is set ({secrets.key_password_source})"
    if encrypted and (too_costly := kdf_refusal(_pem_body(block))) is not None:
        return None, f"encrypted private key refused: {too_costly}"
    try:
        key = (
            unlockers.key(block, secrets.key_password)
            if encrypted
            else serialization.load_pem_private_key(block, password=None)
        )
    except (ValueError, TypeError) as exc:
        if encrypted:
            return None, f"wrong key password (from {secrets.key_password_source})"
        return None, f"malformed private key: {_short(exc)}"
    except Exception as exc:  # cryptography raises UnsupportedAlgorithm and others for odd keys
        return None, f"unsupported private key: {_short(exc)}"
    if not isinstance(key, PrivateKey):
        return None, f"unsupported private key type {type(key).__name__}"
    return key, None


def _pem_body(block: bytes) -> bytes:
    """The DER inside one PEM block (b"" when it is not base64)."""
    lines = block.splitlines()[1:-1]
    try:
        return base64.b64decode(b"".join(line.strip() for line in lines if b":" not in line), validate=True)
    except ValueError:
        return b""


def _encrypted(block: bytes) -> bool:
    return b"ENCRYPTED" in block.split(b"\n", 1)[0] or b"Proc-Type: 4,ENCRYPTED" in block


def key_is_encrypted(data: bytes) -> bool:
    """Whether the private key in PEM `data` (the first, as the keystore reads it) needs a password."""
    keys = [block for label, block in _pem_blocks(data) if label in _KEY_LABELS]
    return bool(keys) and _encrypted(keys[0])


def _from_pkcs12(name: str, data: bytes, secrets: Secrets, unlockers: Unlockers) -> Candidate:
    password = secrets.pkcs12_password
    if (too_costly := kdf_refusal(data)) is not None:
        return Candidate(file=name, problem=f"PKCS#12 file refused: {too_costly}")
    try:
        with _strict_parsing():
            key, cert, extra = unlockers.pkcs12(data, password)
    except ValueError as exc:
        text = str(exc).lower()
        if "password" in text or "mac" in text:
            if password is None:
                missing = secrets.pkcs12_password_missing
                return Candidate(
                    file=name,
                    problem=f"PKCS#12 file needs a password: {missing}"
                    if missing
                    else f"PKCS#12 file needs a password and none is set ({secrets.pkcs12_password_source})",
                )
            return Candidate(file=name, problem=f"wrong PKCS#12 password (from {secrets.pkcs12_password_source})")
        return Candidate(file=name, problem=f"malformed PKCS#12 file: {_short(exc)}")
    except Exception as exc:
        return Candidate(file=name, problem=f"unreadable PKCS#12 file: {_short(exc)}")
    if cert is None:
        return Candidate(file=name, problem="PKCS#12 file holds no certificate")
    broken = next((problem for c in (cert, *extra) if (problem := _malformed_fields(c))), None)
    if broken is not None:
        return Candidate(file=name, problem=broken)
    if key is None:
        return Candidate(file=name, cert=cert, chain=tuple(extra), problem="PKCS#12 file holds no private key")
    if not isinstance(key, PrivateKey):
        return Candidate(file=name, cert=cert, problem=f"unsupported private key type {type(key).__name__}")
    return Candidate(file=name, cert=cert, chain=tuple(extra), key=key)


def _malformed_fields(cert: x509.Certificate) -> str | None:
    """cryptography parses a certificate's fields lazily: a damaged extension only raises when
    first read. Read them all now, so a broken file is a named problem, not a later crash."""
    try:
        _ = (cert.extensions, cert.subject, cert.issuer, cert.not_valid_before_utc, cert.not_valid_after_utc)
        cert.public_key()
    except Exception as exc:
        return f"malformed certificate: {_short(exc)}"
    return None


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:160]
