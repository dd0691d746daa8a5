"""Accepting a newly issued credential into the keystore: validate, write atomically, prune.

Writes never remove the last usable credential; old ones go only after they expired more
than the grace period ago.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509

from sidecar.credentials import Candidate, Secrets, candidates_from_files
from sidecar.errors import SidecarError
from sidecar.files import PRIVATE_FILE_MODE, atomic_write, ensure_private_dir
from sidecar.keystore import Selection, evaluate, select

log = logging.getLogger("sidecar.renewal")

# A fresh certificate may start a little in the future when the CA's clock is ahead of ours;
# it is accepted, and the keystore rule starts presenting it the moment it becomes valid.
ISSUE_SKEW = timedelta(minutes=5)


class CredentialRejected(Exception):
    """What a provider returned is not something we will present; the message says why."""


class CredentialNotWritten(SidecarError):
    """The keystore folder would not take the new credential (disk full, read-only, ...)."""


# Why a write failed, in words, and what to do about it.
_WRITE_PROBLEMS = {
    errno.ENOSPC: ("the disk is full (no space left on device)", "free some space"),
    errno.EDQUOT: ("the disk quota is used up", "free some space"),
    errno.EFBIG: ("the file size limit was reached (file too large; see `ulimit -f`)", "raise the limit"),
    errno.EROFS: ("the file system is read-only", "make it writable"),
    errno.EACCES: ("permission denied (a read-only folder, or another user's?)", "make it writable"),
    errno.EPERM: ("operation not permitted (an immutable folder, or another user's?)", "make it writable"),
}


def validate_new(
    cert_chain_pem: bytes,
    key_pem: bytes,
    current: Candidate | None,
    now: datetime,
    anchors: Sequence[x509.Certificate] = (),
) -> Candidate:
    """Parse, check usable now, and check it would win the keystore rule over `current`."""
    found = candidates_from_files({"issued.pem": cert_chain_pem.strip() + b"\n" + key_pem}, Secrets())
    if len(found) != 1:
        raise CredentialRejected("the issued files hold no certificate and key pair")
    candidate = found[0]
    if candidate.cert is not None and now < candidate.cert.not_valid_before_utc <= now + ISSUE_SKEW:
        now = candidate.cert.not_valid_before_utc  # the CA's clock runs a little ahead: judge it when valid
    problem = evaluate(candidate, now, anchors)
    if problem is not None:
        raise CredentialRejected(f"the issued certificate is not usable: {problem}")
    if current is not None and current.cert is not None and candidate.cert is not None:
        winner = select("check", [current, candidate], now).selected
        if winner is not candidate:
            raise CredentialRejected(
                "the issued certificate is not newer than the one in use "
                f"(notBefore {candidate.cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC)"
            )
    return candidate


def write_credential(
    folder: Path, cert: x509.Certificate, cert_chain_pem: bytes, key_pem: bytes, now: datetime
) -> Path:
    """Write one PEM bundle (chain, then key; mode 0600) into `folder` with a single atomic rename.

    One file per credential means a crash leaves the whole credential or none of it: never a
    certificate without its key, nor a key without its certificate.

    Raises CredentialNotWritten, saying why in words, when the folder will not take it; nothing
    in the folder is changed then.
    """
    path = folder / f"{now.strftime('%Y%m%dT%H%M%SZ')}-{cert.serial_number:x}"[:40]
    path = path.with_name(path.name + ".pem")
    try:
        ensure_private_dir(folder)
        atomic_write(path, cert_chain_pem.strip() + b"\n" + key_pem, PRIVATE_FILE_MODE)
    except OSError as exc:
        why, fix = _WRITE_PROBLEMS.get(exc.errno or 0, (exc.strerror or str(exc), "fix it"))
        raise CredentialNotWritten(f"cannot write the new certificate into {folder}: {why}; {fix}") from exc
    return path


def prune_expired(selection: Selection, now: datetime, grace: timedelta) -> list[Path]:
    """Remove credentials that expired more than `grace` ago; never the selected one."""
    if selection.selected is None:
        return []  # never prune an identity that has nothing usable: the user may need the files
    removed: list[Path] = []
    for rejected in selection.rejected:
        candidate = rejected.candidate
        cert = candidate.cert
        if cert is None or cert.not_valid_after_utc > now - grace:
            continue
        for name in (candidate.file, candidate.key_file):
            if name and os.path.exists(name):
                os.unlink(name)
                removed.append(Path(name))
    if removed:
        log.info(
            "identity %s: pruned %d expired file(s): %s",
            selection.identity,
            len(removed),
            ", ".join(p.name for p in removed),
        )
    return removed
