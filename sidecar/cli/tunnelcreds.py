"""The client credential behind `tunnel --cert/--key` or `--keystore`, re-read on request.

A keystore folder is read as the daemon reads an identity folder (loose keys refused there);
a single file (a PEM bundle or a PKCS#12 file) or a `--cert`/`--key` pair is read again on each
`reload()`, so SIGHUP, `--timed-reload` and the folder watch all see a replaced file. A
replacement that is broken keeps the last good credential presented (`Selection.kept`), as
ghostunnel does, until a good one arrives.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from sidecar.credentials import Candidate, Secrets, candidates_from_files
from sidecar.errors import ConfigError
from sidecar.keystore import Selection, keep_last_good, read_identity_folder, refuse_loose_key, select

log = logging.getLogger("sidecar.tunnel")

SOURCE = "command line"


class FlagCredentials:
    """`reload()` re-reads the files; `current` is what new connections present."""

    def __init__(
        self,
        *,
        keystore: str | None,
        cert: str | None,
        key: str | None,
        password: str | None,
        password_source: str,
    ) -> None:
        secret = password.encode() if password is not None else None
        self.secrets = Secrets(secret, secret, password_source, password_source)
        self.folder: Path | None = None
        self.bundle: Path | None = None  # one file holding certificate and key (PEM or PKCS#12)
        self.pair: tuple[Path, Path] | None = None  # --cert, --key
        self._parsed: tuple[bytes, list[Candidate]] | None = None  # the bytes last read, and what they held
        self.flag, self.value = ("--keystore", keystore) if keystore else ("--cert", cert)
        if keystore:
            path = Path(keystore).expanduser()
            if path.is_dir():
                self.folder = path
            else:
                self.bundle = path
        elif cert and key:
            self.pair = (Path(cert).expanduser(), Path(key).expanduser())
        elif cert or key:
            missing, given = ("--key", "--cert") if cert else ("--cert", "--key")
            raise ConfigError(f"{given} needs {missing} too", source=SOURCE, field=missing)
        else:
            raise ConfigError(
                "a client certificate is required",
                source=SOURCE,
                field="--cert",
                hint="give --cert FILE --key FILE, or --keystore PATH (or --disable-authentication for a server "
                "that asks for none)",
            )
        self.current = self._read(strict=True)
        if self.current.selected is None:  # nothing to present at all: a usage error, not a tunnel that refuses
            reasons = "; ".join(f"{Path(r.candidate.file).name}: {r.reason}" for r in self.current.rejected)
            raise ConfigError(
                f"no usable client certificate ({reasons or 'no credential files found'})",
                source=SOURCE,
                field=self.flag,
                value=self.value,
            )

    @property
    def watched_folder(self) -> Path | None:
        """The folder whose changes mean a new read: the keystore folder, or the file's folder."""
        if self.folder is not None:
            return self.folder
        if self.bundle is not None:
            return self.bundle.parent
        return None if self.pair is None else self.pair[0].parent

    def reload(self) -> Selection:
        """Read the files again; a broken replacement keeps the last good credential presented."""
        before = self.current
        after = keep_last_good(before, self._read(strict=False))
        self.current = after
        old, new = before.selected, after.selected
        if after.kept is not None and before.kept != after.kept:
            log.warning("%s", after.kept.sentence("tunnel"))
        elif new is None and old is not None:
            log.warning("no usable client certificate now: %s", after.why_unusable())
        elif new is not None and new.cert is not None and (old is None or old.fingerprint != new.fingerprint):
            log.info(
                "now presenting serial %x, expires %s UTC (from %s)",
                new.cert.serial_number,
                f"{new.cert.not_valid_after_utc:%Y-%m-%d %H:%M}",
                Path(new.file).name,
            )
        return after

    def _read(self, *, strict: bool) -> Selection:
        now = datetime.now(UTC)
        if self.folder is not None:
            return select("tunnel", read_identity_folder(self.folder, self.secrets), now)
        # One bundle: candidates_from_files pairs a certificate with a key in the same file.
        name = self.bundle.name if self.bundle is not None else f"{self.pair[0].stem}.pem" if self.pair else ""
        try:
            if self.bundle is not None:
                data, mode = _read(self.bundle, "--keystore")
                key_file = (self.bundle, mode)
            else:
                assert self.pair is not None
                cert, key = self.pair
                cert_data, _ = _read(cert, "--cert")
                key_data, key_mode = _read(key, "--key")
                data, key_file = cert_data + b"\n" + key_data, (key, key_mode)
        except ConfigError as exc:
            if strict:
                raise
            # Gone for a moment (a replacement on its way) or unreadable: broken, so the last good stays.
            return select("tunnel", [Candidate(file=name, problem=exc.message)], now)
        # Parsed again only when the bytes changed: a timed reload or a watch event for another file in
        # the folder must not run a PKCS#12 key derivation on the event loop each time.
        if self._parsed is None or self._parsed[0] != data:
            self._parsed = (data, candidates_from_files({name: data}, self.secrets))
        # As the daemon does: a key others can read is refused (its mode is looked at every time).
        return select("tunnel", [refuse_loose_key(c, *key_file) for c in self._parsed[1]], now)


def _read(path: Path, flag: str) -> tuple[bytes, int]:
    """The file's bytes and its mode (a private key others can read is refused)."""
    try:
        with path.open("rb") as fh:
            return fh.read(), os.fstat(fh.fileno()).st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror}", source=SOURCE, field=flag, value=str(path)) from exc
