"""`mtls-sidecar identity import|new`: local files only (the keystore and config.toml), no daemon.

Both check everything first and write nothing when something is wrong. Then the credential
goes into `<keystore>/<name>/` and the identity into config.toml (tomlkit: the user's comments
and layout stay). Files first, config last: a running daemon that reloads the config finds the
identity's folder already filled, so it never enrolls into it.
"""

from __future__ import annotations

import argparse
import os
import re
import stat
import sys
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from sidecar import config_edit
from sidecar.config import DEFAULT_LIFETIME, Config, IdentitySpec, load_config, parse_config
from sidecar.credentials import PKCS12_SUFFIXES, Candidate, candidates_from_files, key_is_encrypted
from sidecar.devca import ca_paths, foreign_credentials, from_dev_ca, load_or_create_ca, write_credential
from sidecar.errors import ConfigError, LocalSetupError
from sidecar.files import PRIVATE_FILE_MODE, atomic_write, ensure_private_dir
from sidecar.firstrun import default_config_for
from sidecar.identities import secrets_for
from sidecar.keystore import evaluate, read_identity_folder, select
from sidecar.names import inside
from sidecar.paths import Places
from sidecar.tablereader import toml_key
from sidecar.units import parse_duration

EXIT_OK = 0
EXIT_FAILURE = 1
SOURCE = "command line"

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class ConfigFile:
    """config.toml as read now; `created`: it does not exist yet and `text` is the first-run default."""

    path: Path
    text: str
    config: Config
    created: bool

    def checked(self, text: str) -> str:
        """`text`, once it parses as a config (an edit of ours must never leave a broken file)."""
        parse_config(text, source=str(self.path), base_dir=self.path.absolute().parent)
        return text

    def write(self, text: str) -> None:
        mode = PRIVATE_FILE_MODE
        if self.created:
            ensure_private_dir(self.path.parent)
        else:
            mode = stat.S_IMODE(self.path.stat().st_mode)  # the user's choice stands
        atomic_write(self.path, text.encode(), mode, through_symlink=True)  # a symlinked config.toml stays one


def read_config_file(places: Places) -> ConfigFile:
    path = places.config_file
    if path.exists():
        config = load_config(path)
        return ConfigFile(path, path.read_text(encoding="utf-8"), config, created=False)
    text = default_config_for(places)
    return ConfigFile(path, text, parse_config(text, source=str(path), base_dir=path.absolute().parent), True)


def identity_name(name: str, flag: str) -> str:
    """`name` if config.toml accepts it as an identity (it is also a folder name), else a ConfigError."""
    try:
        parse_config(f'[identities.{toml_key(name)}]\nrenew = "none"\n', source=SOURCE)
    except ConfigError as exc:
        raise ConfigError(exc.message, source=SOURCE, field=flag, value=name) from None
    return name


# --- identity import ---------------------------------------------------------------------


@dataclass(frozen=True)
class PasswordSource:
    """Where the daemon will find the credential's password, as named on the command line."""

    kind: str  # "pkcs12" or "key": which config keys
    env: str | None = None
    keyring: tuple[str, str] | None = None

    def config_fields(self) -> dict[str, Any]:
        """The identity's keys for this kind; the other way of giving the same password is removed."""
        keyring = "/".join(self.keyring) if self.keyring else None
        return {f"{self.kind}_password_env": self.env, f"{self.kind}_password_keyring": keyring}

    def apply(self, spec: IdentitySpec) -> IdentitySpec:
        if self.kind == "pkcs12":
            return replace(spec, pkcs12_password_env=self.env, pkcs12_password_keyring=self.keyring)
        return replace(spec, key_password_env=self.env, key_password_keyring=self.keyring)

    def describe(self) -> str:
        if self.env:
            return f'{self.kind}_password_env = "{self.env}"'
        assert self.keyring is not None
        return f'{self.kind}_password_keyring = "{"/".join(self.keyring)}"'


def cmd_identity_import(places: Places, args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    name = identity_name(args.name, "--name")
    config_file = read_config_file(places)
    existing = config_file.config.identities.get(name)
    source = Path(args.file)
    files = {source.name: _read_file(source, "FILE")}
    if args.key:  # paired by name, as the keystore pairs NAME.crt and NAME.key
        files = {source.stem + ".crt": files[source.name], source.stem + ".key": _read_file(Path(args.key), "--key")}
    kind = _password_kind(files)
    named = _named_password(args, kind)
    notes: list[str] = []
    if (args.password_env or args.password_keyring) and named is None:
        notes.append("its key is not encrypted: the password source given is not needed, and was not saved")
    spec = existing or IdentitySpec(name=name, provider=None)
    if named is not None:
        spec = named.apply(spec)

    def refuse(why: str) -> int:
        print(f"mtls-sidecar: {source} cannot be imported: {why}; nothing was imported", file=sys.stderr)
        return EXIT_FAILURE

    secrets = secrets_for(spec, os.environ)
    ask = "say where it is with --password-env VAR or --password-keyring SERVICE/USER"
    if not _has_source(spec, "pkcs12"):
        secrets = replace(secrets, pkcs12_password_missing=ask)
    if not _has_source(spec, "key"):
        secrets = replace(secrets, key_password_missing=ask)
    found = candidates_from_files(files, secrets)
    if not found:
        return refuse("it holds no certificate (give a .pem or .crt with its key, or a .p12/.pfx)")
    candidate = found[0]
    problem = _problem(candidate, now, notes)
    if problem is not None:
        if problem.startswith("no private key"):
            problem += "; give the key file with --key KEY"
        print(f"mtls-sidecar: {source} cannot be used: {problem}; nothing was imported", file=sys.stderr)
        return EXIT_FAILURE
    cert = candidate.cert
    assert cert is not None
    issuer = cert.issuer.rfc4514_string()
    ca_cert = _dev_ca_cert(places)
    dev = from_dev_ca(cert, candidate.chain, ca_cert)
    folder = inside(config_file.config.keystore_dir or places.keystore, name)
    present = read_identity_folder(folder, secrets)
    if not dev and existing is not None and existing.renew == "local-ca":
        return refuse(
            f'identity {name} is renewed by the dev CA (renew = "local-ca") and this certificate is from another '
            f"issuer ({issuer}): the dev CA's next certificate would replace it. Import it under a name of its own "
            f'(--name {name}-corp, say), or set renew = "none" for identities.{name} first'
        )
    foreign = foreign_credentials(present, ca_cert)
    if dev and foreign:
        return refuse(
            f"it is from the dev CA, and identity {name} holds credentials from another issuer "
            f"({'; '.join(foreign)}): being newer, it would be presented instead of them. Use another --name"
        )
    for file_name in files:
        if (folder / file_name).exists():
            return refuse(f"{folder / file_name} exists already (rename the file to import it beside that one)")

    if existing is None:
        renew = "local-ca" if dev and not foreign else "none"
        fields: dict[str, Any] = {"renew": renew}
        if renew == "local-ca" and cert.subject.rfc4514_string() != f"CN={name}":
            fields["subject"] = cert.subject.rfc4514_string()
        if named is not None:
            fields.update(named.config_fields())
        comment = f"{name}: `mtls-sidecar identity import` of {source.name}, issued by {issuer}"
        new_text = config_edit.add_identity(config_file.text, name, fields, comment)
        settings = ", ".join(f'{key} = "{value}"' for key, value in fields.items() if value is not None)
        change = f"{config_file.path}: added [identities.{name}] with {settings}"
        if renew == "none":
            change += " (its issuer is not the dev CA, which must not renew it: import its successor the same way)"
    elif named is not None and named.apply(existing) != existing:
        new_text = config_edit.set_identity_fields(config_file.text, name, named.config_fields())
        change = f"{config_file.path}: identities.{name} now has {named.describe()} (the password source given)"
        notes += _no_longer_open(read_identity_folder(folder, secrets_for(existing, os.environ)), present)
    else:
        new_text = None
        change = f"{config_file.path}: identities.{name} is there already, unchanged"
    if new_text is not None:
        new_text = config_file.checked(new_text)

    _copy_in(folder, files, config_file, new_text)
    print(
        f"imported {cert.subject.rfc4514_string()} (issued by {issuer}, serial {cert.serial_number:x}, expires "
        f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC) into {folder}"
    )
    if config_file.created and new_text is not None:
        print(f"wrote the first-run default config to {config_file.path}, with this identity added")
    print(change)
    print(_presented(name, folder, present, candidate, now))
    for note in notes:
        print(f"note: {note}")
    if named is not None and named.env:
        print(
            f"note: the daemon reads {named.env} from its own environment, so start it where {named.env} is set. "
            f"A daemon started at login does not have your shell's variables: keep the password in the OS keyring "
            f"instead (keyring set mtls-sidecar {name}) and import with --password-keyring mtls-sidecar/{name}"
        )
    if name != config_file.config.active_identity:
        print(f'use it: mtls-sidecar use {name}, or give a route identity = "{name}" (route add … --identity {name})')
    return EXIT_OK


def _password_kind(files: dict[str, bytes]) -> str | None:
    """Which password the credential needs: "pkcs12", "key" (an encrypted PEM key) or None."""
    if any(Path(name).suffix.lower() in PKCS12_SUFFIXES for name in files):
        return "pkcs12"
    if any(key_is_encrypted(data) for data in files.values()):
        return "key"
    return None


def _named_password(args: argparse.Namespace, kind: str | None) -> PasswordSource | None:
    if args.password_env is not None and not _ENV_NAME.fullmatch(args.password_env):
        # The value is left out: people paste the password itself here.
        raise ConfigError(
            "not an environment variable name (value not shown)",
            source=SOURCE,
            field="--password-env",
            hint="name the variable that holds the password, never the password",
        )
    keyring = None
    if args.password_keyring is not None:
        service, _, username = args.password_keyring.partition("/")
        if not service or not username:
            raise ConfigError(
                "not a keyring entry",
                source=SOURCE,
                field="--password-keyring",
                value=args.password_keyring,
                hint="write SERVICE/USERNAME, e.g. mtls-sidecar/company, after `keyring set mtls-sidecar company`",
            )
        keyring = (service, username)
    if kind is None or (args.password_env is None and keyring is None):
        return None
    return PasswordSource(kind, env=args.password_env, keyring=keyring)


def _has_source(spec: IdentitySpec, kind: str) -> bool:
    if kind == "pkcs12":
        return bool(spec.pkcs12_password_env or spec.pkcs12_password_keyring)
    return bool(spec.key_password_env or spec.key_password_keyring)


def _problem(candidate: Candidate, now: datetime, notes: list[str]) -> str | None:
    """Why the credential cannot be used; a certificate that becomes valid later is fine (noted)."""
    problem = evaluate(candidate, now)
    cert = candidate.cert
    later = cert is not None and now < cert.not_valid_before_utc
    if problem is not None and later and cert is not None and evaluate(candidate, cert.not_valid_before_utc) is None:
        notes.append(f"{problem}: it is presented from then on, if nothing newer is there")
        return None
    return problem


def _dev_ca_cert(places: Places) -> x509.Certificate | None:
    """The dev CA's certificate if there is one (an import never creates the CA)."""
    try:
        return x509.load_pem_x509_certificate(ca_paths(places.ca)[0].read_bytes())
    except (OSError, ValueError):
        return None


def _no_longer_open(before: list[Candidate], after: list[Candidate]) -> list[str]:
    """Files of the folder that open with the identity's password source now, and not with the new one."""
    lost = {c.file for c in before if c.problem is None} - {c.file for c in after if c.problem is None}
    return [f"{Path(file).name} no longer opens with the new password source" for file in sorted(lost)]


def _copy_in(folder: Path, files: dict[str, bytes], config_file: ConfigFile, new_text: str | None) -> None:
    """The credential files (0600), then config.toml; the files go again if the config cannot be written."""
    ensure_private_dir(folder)
    written: list[Path] = []
    try:
        for file_name, data in files.items():
            atomic_write(folder / file_name, data, PRIVATE_FILE_MODE)
            written.append(folder / file_name)
        if new_text is not None:
            config_file.write(new_text)
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        raise LocalSetupError(
            f"cannot write {exc.filename or folder}: {exc.strerror or exc}; nothing was imported"
        ) from exc


def _presented(name: str, folder: Path, present: list[Candidate], imported: Candidate, now: datetime) -> str:
    located = replace(imported, file=str(folder / imported.file))
    winner = select(name, [*present, located], now).selected
    if winner is located:
        return f"new connections as {name} present it"
    if winner is None:
        return f"identity {name} presents it once it is valid"
    return f"identity {name} keeps presenting {winner.file} (newer) until that one expires"


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror}", source=SOURCE, field=what, value=str(path)) from exc


# --- identity new ------------------------------------------------------------------------


def cmd_identity_new(places: Places, args: argparse.Namespace) -> int:
    name = identity_name(args.name, "NAME")
    config_file = read_config_file(places)
    spec = config_file.config.identities.get(name)
    try:
        lifetime = parse_duration(args.lifetime) if args.lifetime else (spec.lifetime if spec else DEFAULT_LIFETIME)
    except ValueError as exc:
        raise ConfigError(str(exc), source=SOURCE, field="--lifetime", value=args.lifetime) from exc
    subject = args.subject or (spec.subject if spec else f"CN={name}")
    now = datetime.now(UTC)
    if spec is not None and spec.renew != "local-ca":
        print(
            f'mtls-sidecar: identity {name} has renew = "{spec.renew}": its certificates come from elsewhere, and a '
            f"dev-CA one beside them would be presented instead (the newest wins). Pick another name; nothing was "
            f"issued",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    ca = load_or_create_ca(places.ca, now)
    folder = inside(config_file.config.keystore_dir or places.keystore, name)
    foreign = foreign_credentials(
        read_identity_folder(folder, secrets_for(spec or IdentitySpec(name), os.environ)), ca.cert
    )
    if foreign:
        print(
            f"mtls-sidecar: {folder} holds credentials from another issuer ({'; '.join(foreign)}): a dev-CA "
            f"certificate beside them would be presented instead. Pick another name; nothing was issued",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    new_text = None
    if spec is None:
        fields = {
            "renew": "local-ca",
            "subject": subject if subject != f"CN={name}" else None,
            "lifetime": args.lifetime,
        }
        comment = f"{name}: added by `mtls-sidecar identity new`"
        new_text = config_file.checked(config_edit.add_identity(config_file.text, name, fields, comment))
    issued = ca.issue_client(subject, timedelta(seconds=lifetime), now)
    path = write_credential(folder, issued, now)
    if new_text is not None:
        config_file.write(new_text)
    print(
        f"issued {subject} serial {issued.cert.serial_number:x}, expires "
        f"{issued.cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
    )
    print(f"wrote {path} (certificate, chain and key; mode 0600)")
    if new_text is not None:
        created = " (the first-run default, with it added)" if config_file.created else ""
        print(f'{config_file.path}{created}: added [identities.{name}] with renew = "local-ca"')
    return EXIT_OK
