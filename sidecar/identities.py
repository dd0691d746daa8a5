"""The daemon's view of its identities: each one's current selection, refreshed from disk."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from sidecar.config import IdentitySpec
from sidecar.credentials import Candidate, Secrets
from sidecar.keystore import Selection, keep_last_good, load_anchor_file, read_identity_folder, select
from sidecar.names import inside
from sidecar.unlock import IN_CHILD

log = logging.getLogger("sidecar.keystore")


def secrets_for(spec: IdentitySpec, environ: Mapping[str, str], keyring_lookup: KeyringLookup | None = None) -> Secrets:
    """Passwords for an identity's files: from the environment variable it names, else from the
    OS keyring entry it names. Each password's *source* is described for error messages; the
    password itself never is."""
    lookup = keyring_lookup or os_keyring_password
    pkcs12, pkcs12_source = _password(environ, spec.pkcs12_password_env, spec.pkcs12_password_keyring, lookup)
    key, key_source = _password(environ, spec.key_password_env, spec.key_password_keyring, lookup)
    return Secrets(
        pkcs12_password=pkcs12,
        key_password=key,
        pkcs12_password_source=pkcs12_source or "neither pkcs12_password_env nor pkcs12_password_keyring is set",
        key_password_source=key_source or "neither key_password_env nor key_password_keyring is set",
        pkcs12_password_missing=_missing(pkcs12, pkcs12_source),
        key_password_missing=_missing(key, key_source),
    )


def _missing(password: bytes | None, source: str | None) -> str | None:
    """Why a named source gave no password ("environment variable CORP_P12 is not set"): a missing
    password then reads differently from a wrong one."""
    if password is not None or source is None:
        return None
    if source.startswith("environment variable "):
        return f"{source} is not set"
    return source


KeyringLookup = Callable[[str, str], "str | None"]


def _password(
    environ: Mapping[str, str], var: str | None, entry: tuple[str, str] | None, lookup: KeyringLookup
) -> tuple[bytes | None, str | None]:
    if var:
        value = environ.get(var)
        if value is not None or entry is None:
            return (value.encode() if value is not None else None), f"environment variable {var}"
    if entry is None:
        return None, None
    service, username = entry
    where = f"OS keyring entry {service}/{username}"
    try:
        value = lookup(service, username)
    except KeyringUnavailable as exc:
        return None, f"{where}: {exc}"
    if value is None:
        return None, f"{where}, which is empty (store it with: keyring set {service} {username})"
    return value.encode(), where


class KeyringUnavailable(Exception):
    pass


def os_keyring_password(service: str, username: str) -> str | None:
    """The OS keyring's password for (service, username), through the optional `keyring` package."""
    try:
        import keyring
        from keyring.errors import KeyringError
    except ImportError:
        raise KeyringUnavailable("the keyring package is not installed (pip install 'mtls-sidecar[keyring]')") from None
    try:
        value = keyring.get_password(service, username)
    except KeyringError as exc:
        raise KeyringUnavailable(f"the OS keyring did not answer ({type(exc).__name__})") from None
    return None if value is None else str(value)


@dataclass(frozen=True)
class SelectionChange:
    identity: str
    before: Candidate | None
    after: Candidate | None


class IdentityBook:
    """Holds every identity's `Selection`; `refresh()` re-reads the keystore folders."""

    def __init__(self, specs: Mapping[str, IdentitySpec], keystore: Path) -> None:
        self.specs = dict(specs)
        self.keystore = keystore
        self._selections: dict[str, Selection] = {}

    def folder(self, name: str) -> Path:
        return inside(self.keystore, name)

    def selection(self, name: str) -> Selection:
        found = self._selections.get(name)
        if found is None:
            return Selection(name, None, (), datetime.now(UTC))
        return found

    def refresh(self, now: datetime | None = None) -> list[SelectionChange]:
        """Re-read every identity folder and apply the keystore rule; report what changed."""
        return self.apply(self.read(now))

    def read(self, now: datetime | None = None) -> dict[str, tuple[IdentitySpec, Selection]]:
        """Read and judge every identity folder, changing nothing: the slow half of `refresh`
        (files, parsing, key derivation), safe to run on a worker thread."""
        now = now or datetime.now(UTC)
        return {name: (spec, self._evaluate(spec, now)) for name, spec in dict(self.specs).items()}

    def apply(self, found: Mapping[str, tuple[IdentitySpec, Selection]]) -> list[SelectionChange]:
        """Take what `read` found, for identities still configured as they were read; report
        what changed."""
        changes: list[SelectionChange] = []
        for name, (spec, after) in found.items():
            if self.specs.get(name) != spec:
                continue  # removed or changed while it was being read: a newer read follows
            before = self._selections.get(name)
            after = keep_last_good(before, after)
            if after.kept is not None and (before is None or before.kept != after.kept):
                log.warning("%s", after.kept.sentence(name))
            self._selections[name] = after
            old = before.selected if before else None
            if _fingerprint(old) != _fingerprint(after.selected):
                changes.append(SelectionChange(name, old, after.selected))
                _log_change(name, old, after)
        return changes

    def next_boundary(self) -> datetime | None:
        """The earliest moment any identity's selection may change with no file touched."""
        moments = [m for s in self._selections.values() if (m := s.next_boundary()) is not None]
        return min(moments, default=None)

    def _evaluate(self, spec: IdentitySpec, now: datetime) -> Selection:
        # Key derivation in a child process: cryptography holds the interpreter lock while it works.
        candidates = read_identity_folder(self.folder(spec.name), secrets_for(spec, os.environ), IN_CHILD)
        anchors: list[x509.Certificate] = []
        if spec.issuer_ca_file is not None:
            try:
                anchors = load_anchor_file(spec.issuer_ca_file)
            except (OSError, ValueError) as exc:
                problem = f"cannot read issuer_ca_file {spec.issuer_ca_file}: {exc}"
                candidates = [replace(c, problem=problem) for c in candidates]
        return select(spec.name, candidates, now, anchors)


def _fingerprint(candidate: Candidate | None) -> str:
    return candidate.fingerprint if candidate is not None else ""


def _log_change(name: str, old: Candidate | None, after: Selection) -> None:
    new = after.selected
    if new is None:
        log.warning(
            "identity %s: no usable certificate; its routes refuse new connections: %s", name, after.why_unusable()
        )
        return
    assert new.cert is not None
    log.info(
        "identity %s now presents %s (serial %x, expires %s) from %s%s",
        name,
        new.cert.subject.rfc4514_string(),
        new.cert.serial_number,
        new.cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC"),
        new.file,
        f", replacing serial {old.cert.serial_number:x}" if old and old.cert else "",
    )
