"""The keystore rule: which of an identity's certificates to present.

Among the candidates of one identity, a candidate is usable when the certificate parses,
the key matches it, `notBefore <= now < notAfter`, its key usage and extended key usage
allow TLS client authentication, and (when the identity names an issuer) it chains to that
issuer. Among the usable ones the latest `notBefore` wins; ties go to the later `notAfter`,
then the higher serial. Everything here but `read_identity_folder` is pure and takes `now`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from sidecar.credentials import IN_PROCESS, Candidate, Secrets, Unlockers, candidates_from_files
from sidecar.files import loose_key_problem
from sidecar.units import human_duration

log = logging.getLogger("sidecar.keystore")

_MAX_FILE_BYTES = 1 << 20  # credential files are a few KiB; refuse to slurp anything huge
_MAX_CHAIN_DEPTH = 8


@dataclass(frozen=True)
class Rejected:
    candidate: Candidate
    reason: str
    timed: bool = False  # the reason is the validity window ("expired 3 days ago"): it ages

    def reason_at(self, now: datetime) -> str:
        """The reason worded at `now` (when it is shown), not when the folder was read."""
        cert = self.candidate.cert
        if self.timed and cert is not None:
            return validity_problem(cert, now) or self.reason
        return self.reason


@dataclass(frozen=True)
class Kept:
    """A credential still presented from memory: the file it was read from is broken now."""

    file: str
    reason: str  # what is wrong with the file as it is now

    def sentence(self, identity: str) -> str:
        return (
            f"identity {identity!r}: {Path(self.file).name} is broken now ({self.reason}); "
            "still presenting the certificate last read from it until a good file arrives"
        )


@dataclass(frozen=True)
class Selection:
    """The outcome of the keystore rule for one identity at one moment."""

    identity: str
    selected: Candidate | None
    rejected: tuple[Rejected, ...]
    evaluated_at: datetime
    kept: Kept | None = None  # `selected` is the last good credential of a file that is broken now

    @property
    def usable(self) -> bool:
        return self.selected is not None

    def next_boundary(self) -> datetime | None:
        """The next moment the clock alone may change this selection (a notBefore or notAfter)."""
        moments = [
            moment
            for candidate in (self.selected, *(r.candidate for r in self.rejected))
            if candidate is not None and candidate.cert is not None
            for moment in (candidate.cert.not_valid_before_utc, candidate.cert.not_valid_after_utc)
            if moment > self.evaluated_at
        ]
        return min(moments, default=None)

    def why_unusable(self, now: datetime | None = None) -> str:
        """One line for logs and refusals when nothing can be presented; `now`: word the reasons
        that age ("expired 3 days ago") as of then, rather than as of the keystore's reading."""
        if self.selected is not None:
            return ""
        if not self.rejected:
            return f"identity {self.identity!r} has no certificates in its keystore folder"
        reasons = "; ".join(
            f"{Path(r.candidate.file).name}: {r.reason if now is None else r.reason_at(now)}" for r in self.rejected
        )
        return f"identity {self.identity!r} has no usable certificate ({reasons})"


def evaluate(candidate: Candidate, now: datetime, anchors: Sequence[x509.Certificate] = ()) -> str | None:
    """Return why `candidate` is not usable at `now`, or None when it is."""
    if candidate.problem is not None:
        return candidate.problem
    cert, key = candidate.cert, candidate.key
    if cert is None or key is None:
        return "incomplete credential"
    if not _key_matches(cert, key):
        return "key does not match certificate"
    timing = validity_problem(cert, now)
    if timing:
        return timing
    usage_problem = _client_auth_problem(cert)
    if usage_problem:
        return usage_problem
    if anchors and not chains_to(cert, candidate.chain, anchors):
        names = ", ".join(a.subject.rfc4514_string() for a in anchors)
        return f"does not chain to the identity's issuer ({names})"
    return None


def validity_problem(cert: x509.Certificate, now: datetime) -> str | None:
    """Why `cert` is not valid at `now` ("expired 3 days ago (…)"), or None while it is."""
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < not_before:
        return f"not valid until {_when(not_before)} (in {human_duration(not_before - now)})"
    if now >= not_after:
        return f"expired {human_duration(now - not_after)} ago ({_when(not_after)})"
    return None


def select(
    identity: str,
    candidates: Sequence[Candidate],
    now: datetime,
    anchors: Sequence[x509.Certificate] = (),
) -> Selection:
    """Apply the keystore rule: the usable candidate with the latest notBefore wins."""
    usable: list[Candidate] = []
    rejected: list[Rejected] = []
    for candidate in candidates:
        reason = evaluate(candidate, now, anchors)
        if reason is None:
            usable.append(candidate)
        else:
            cert = candidate.cert
            timed = cert is not None and reason == validity_problem(cert, now)
            rejected.append(Rejected(candidate, reason, timed))
    winner = max(usable, key=_newest_first_key, default=None)
    return Selection(identity, winner, tuple(rejected), now)


def keep_last_good(before: Selection | None, after: Selection) -> Selection:
    """Keep presenting the credential `before` selected when the file it came from is broken now
    (a half-written or mistyped replacement), as long as it is itself still valid and nothing newer
    is usable: a bad copy into the keystore must not cut every new connection. A file that is gone
    (removed on purpose) or readable (its own verdict stands) keeps nothing."""
    old = before.selected if before is not None else None
    if old is None or old.cert is None:
        return after
    broken = next((r for r in after.rejected if r.candidate.file == old.file and r.candidate.problem is not None), None)
    if broken is None or validity_problem(old.cert, after.evaluated_at) is not None:
        return after
    if after.selected is not None and _newest_first_key(after.selected) >= _newest_first_key(old):
        return after
    return replace(after, selected=old, kept=Kept(old.file, broken.reason))


def _newest_first_key(candidate: Candidate) -> tuple[datetime, datetime, int]:
    assert candidate.cert is not None
    cert = candidate.cert
    return (cert.not_valid_before_utc, cert.not_valid_after_utc, cert.serial_number)


def _key_matches(cert: x509.Certificate, key: object) -> bool:
    public_key = getattr(key, "public_key", None)
    if public_key is None:
        return False
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        return bool(public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki))
    except Exception:  # an exotic certificate key type we cannot even serialise
        return False


def _client_auth_problem(cert: x509.Certificate) -> str | None:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and not (
        ExtendedKeyUsageOID.CLIENT_AUTH in eku or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku
    ):
        return "no clientAuth in extendedKeyUsage"
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if not ku.digital_signature:
        return "keyUsage does not allow digitalSignature (needed to sign the TLS handshake)"
    return None


def chains_to(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
) -> bool:
    """True when signatures lead from `leaf` through `intermediates` to one of `anchors`."""
    current = leaf
    pool = list(intermediates)
    for _ in range(_MAX_CHAIN_DEPTH):
        for anchor in anchors:
            if _issued_by(current, anchor):
                return True
        parent = next((c for c in pool if _issued_by(current, c)), None)
        if parent is None:
            return False
        pool.remove(parent)
        current = parent
    return False


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:
        return False
    return True


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


# I/O: the only part of this module that touches the disk.


def read_identity_folder(folder: Path, secrets: Secrets, unlockers: Unlockers = IN_PROCESS) -> list[Candidate]:
    """Read every credential-looking file of one identity folder into candidates.

    A missing folder is an identity with no certificates, not an error.
    """
    files: dict[str, bytes] = {}
    modes: dict[str, int] = {}
    unreadable: list[Candidate] = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    for entry in entries:
        if not entry.is_file(follow_symlinks=True):
            continue
        try:
            if entry.stat().st_size > _MAX_FILE_BYTES:
                unreadable.append(Candidate(file=entry.path, problem="file is too large to be a credential"))
                continue
            with open(entry.path, "rb") as fh:
                files[entry.name] = fh.read()
                modes[entry.name] = os.fstat(fh.fileno()).st_mode
        except OSError as exc:
            unreadable.append(Candidate(file=entry.path, problem=f"cannot read file: {exc.strerror}"))
    parsed = [_refuse_loose_key(c, folder, modes) for c in candidates_from_files(files, secrets, unlockers)]
    located = [
        replace(c, file=str(folder / c.file), key_file=str(folder / c.key_file) if c.key_file else None) for c in parsed
    ]
    return located + unreadable


def _refuse_loose_key(candidate: Candidate, folder: Path, modes: dict[str, int]) -> Candidate:
    key_file = candidate.key_file or candidate.file
    return refuse_loose_key(candidate, folder / key_file, modes.get(key_file, 0))


def refuse_loose_key(candidate: Candidate, key_path: Path, mode: int) -> Candidate:
    """A candidate whose private key sits in a file others can read (`mode`) becomes unusable."""
    problem = loose_key_problem(key_path, mode) if candidate.key is not None else None
    return candidate if problem is None else replace(candidate, problem=problem)


def load_anchor_file(path: Path) -> list[x509.Certificate]:
    """Certificates from a PEM bundle (an identity's issuer_ca_file)."""
    return x509.load_pem_x509_certificates(path.read_bytes())
