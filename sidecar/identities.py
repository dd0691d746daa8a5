"""The daemon's view of its identities: each one's current selection, refreshed from disk."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from sidecar.config import IdentitySpec
from sidecar.credentials import Candidate, Secrets
from sidecar.keystore import Selection, load_anchor_file, read_identity_folder, select

log = logging.getLogger("sidecar.keystore")


def secrets_for(spec: IdentitySpec, environ: Mapping[str, str]) -> Secrets:
    """Passwords for an identity's files, read from the environment variables it names."""

    def password(var: str | None) -> bytes | None:
        if not var:
            return None
        value = environ.get(var)
        return value.encode() if value is not None else None

    return Secrets(
        pkcs12_password=password(spec.pkcs12_password_env),
        key_password=password(spec.key_password_env),
        pkcs12_password_source=f"environment variable {spec.pkcs12_password_env}"
        if spec.pkcs12_password_env
        else "pkcs12_password_env is not set for this identity",
        key_password_source=f"environment variable {spec.key_password_env}"
        if spec.key_password_env
        else "key_password_env is not set for this identity",
    )


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
        return self.keystore / name

    def selection(self, name: str) -> Selection:
        found = self._selections.get(name)
        if found is None:
            return Selection(name, None, (), datetime.now(UTC))
        return found

    def refresh(self, now: datetime | None = None) -> list[SelectionChange]:
        """Re-read every identity folder and apply the keystore rule; report what changed."""
        now = now or datetime.now(UTC)
        changes: list[SelectionChange] = []
        for name, spec in self.specs.items():
            before = self._selections.get(name)
            after = self._evaluate(spec, now)
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
        candidates = read_identity_folder(self.folder(spec.name), secrets_for(spec, os.environ))
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
