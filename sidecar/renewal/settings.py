"""What an identity's renewal reads from its table, parsed and checked when the config is loaded.

Each renewal provider owns a frozen settings class, registered by its `renew` name in
`PROVIDERS`, that reads its own keys through the config's table reader: a bad value is a
`ConfigError` with the line, the dotted field and the value, before anything runs. The timing
keys (`renew_at`, `renew_before`, `prune_after`) apply to every identity and become a
`RenewalPolicy`. A key that belongs to another provider is refused, saying whose it is.

Pure: paths are resolved, never opened. What needs the file system (a file exists, a key file
is private to its owner) is checked by the provider when the daemon sets it up.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar
from urllib.parse import SplitResult, urlsplit

from sidecar.errors import ConfigError
from sidecar.renewal.timing import DEFAULT_FRACTION, DEFAULT_PRUNE_AFTER, RenewalPolicy
from sidecar.tablereader import Table

TIMING_KEYS = ("renew_at", "renew_before", "prune_after")

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_ACME_EXAMPLE = "https://acme-v02.api.letsencrypt.org/directory"
_STEP_CA_EXAMPLE = "https://ca.example:9000"
_RENEW_COMMAND_EXAMPLE = '["step", "ca", "renew", "--force", "cert.pem", "key.pem"]'
_TOKEN_COMMAND_EXAMPLE = '["step", "ca", "token", "laptop.example.test"]'


# --- when: every identity


def parse_timing(t: Table) -> RenewalPolicy:
    """`renew_at` (a fraction of the lifetime) or `renew_before` (a duration), and `prune_after`."""
    if "renew_at" in t.data and "renew_before" in t.data:
        raise t.error("renew_before", "set renew_at or renew_before, not both", t.data["renew_before"])
    fraction = DEFAULT_FRACTION
    renew_at = t.data.get("renew_at")
    if renew_at is not None:
        if isinstance(renew_at, bool) or not isinstance(renew_at, int | float) or not 0 < renew_at < 1:
            raise t.error("renew_at", "write a fraction of the lifetime between 0 and 1, e.g. 0.66", renew_at)
        fraction = float(renew_at)
    before = None
    if "renew_before" in t.data:
        before = timedelta(seconds=t.duration("renew_before", 0.0, positive=False))
    prune_after = timedelta(seconds=t.duration("prune_after", DEFAULT_PRUNE_AFTER.total_seconds(), positive=False))
    return RenewalPolicy(fraction=fraction, before=before, prune_after=prune_after)


# --- who: one settings class per provider


@dataclass(frozen=True)
class LocalCASettings:
    """`renew = "local-ca"`: the embedded dev CA issues; a new key each time unless `rekey = false`."""

    name: ClassVar[str] = "local-ca"
    keys: ClassVar[tuple[str, ...]] = ("rekey",)

    rekey: bool = True

    @classmethod
    def from_table(cls, t: Table, subject: str) -> LocalCASettings:
        return cls(rekey=_rekey(t, default=True))


@dataclass(frozen=True)
class AcmeSettings:
    """`renew = "acme"`: an ACME server (RFC 8555), http-01 answered on 127.0.0.1:`http_port`.

    `identifiers` None: the DNS SANs of the certificate in use, else the subject's CN.
    """

    name: ClassVar[str] = "acme"
    keys: ClassVar[tuple[str, ...]] = (
        "acme_directory", "acme_ca_file", "acme_email", "acme_identifiers", "acme_challenge",
        "acme_http_port", "acme_timeout", "rekey",
    )  # fmt: skip
    DEFAULT_HTTP_PORT: ClassVar[int] = 5002
    DEFAULT_TIMEOUT: ClassVar[float] = 90.0
    CHALLENGES: ClassVar[tuple[str, ...]] = ("http-01",)

    directory: str
    ca_file: Path | None = None
    email: str | None = None
    identifiers: tuple[str, ...] | None = None
    challenge: str = "http-01"
    http_port: int = DEFAULT_HTTP_PORT
    rekey: bool = True
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_table(cls, t: Table, subject: str) -> AcmeSettings:
        directory = t.string("acme_directory")
        if directory is None:
            raise _required(t, "acme_directory", cls.name, f'"{_ACME_EXAMPLE}"')
        parts = _url(directory)
        if parts is None or parts.scheme != "https" or not parts.hostname:
            raise t.error("acme_directory", "must be an https:// URL", directory, hint=f'for example "{_ACME_EXAMPLE}"')
        email = t.string("acme_email")
        if email is not None and ("@" not in email or any(c.isspace() for c in email)):
            raise t.error("acme_email", 'must be an e-mail address such as "dev@example.com"', email)
        challenge = t.string("acme_challenge")
        if challenge is not None and challenge not in cls.CHALLENGES:
            raise t.error("acme_challenge", 'not supported: only "http-01" is', challenge)
        return cls(
            directory=directory,
            ca_file=t.file("acme_ca_file"),
            email=email,
            identifiers=_acme_identifiers(t),
            http_port=t.port("acme_http_port", cls.DEFAULT_HTTP_PORT),
            rekey=_rekey(t, default=True),
            timeout=t.duration("acme_timeout", cls.DEFAULT_TIMEOUT, positive=True),
        )


@dataclass(frozen=True)
class CommandSettings:
    """`renew = "command"`: run `argv` (no shell), bounded by `timeout` seconds."""

    name: ClassVar[str] = "command"
    keys: ClassVar[tuple[str, ...]] = ("renew_command", "renew_timeout", "renew_env")
    DEFAULT_TIMEOUT: ClassVar[float] = 60.0

    argv: tuple[str, ...]
    timeout: float = DEFAULT_TIMEOUT
    # environment variables the program gets besides the basics (PATH, HOME, LANG, …) and its
    # own identity's password variables: nothing else of the daemon's environment reaches it
    env: tuple[str, ...] = ()

    @classmethod
    def from_table(cls, t: Table, subject: str) -> CommandSettings:
        if "renew_command" not in t.data:
            raise _required(t, "renew_command", cls.name, _RENEW_COMMAND_EXAMPLE)
        return cls(
            argv=_argv(t, "renew_command", _RENEW_COMMAND_EXAMPLE),
            timeout=t.duration("renew_timeout", cls.DEFAULT_TIMEOUT, positive=True),
            env=_env_names(t, "renew_env"),
        )


@dataclass(frozen=True)
class StepCASettings:
    """`renew = "step-ca"`: smallstep's step-ca at `url`; `common_name` is the subject's CN, the
    name it certifies. Enrollment needs a JWK provisioner (name and key file) or a token command."""

    name: ClassVar[str] = "step-ca"
    keys: ClassVar[tuple[str, ...]] = (
        "step_ca_url", "step_ca_root", "step_ca_provisioner", "step_ca_provisioner_key",
        "step_ca_token_command", "rekey", "renew_timeout",
    )  # fmt: skip
    DEFAULT_TIMEOUT: ClassVar[float] = 30.0

    url: str  # no trailing slash
    common_name: str
    root: Path | None = None
    provisioner: str | None = None
    provisioner_key: Path | None = None
    token_command: tuple[str, ...] | None = None
    rekey: bool = False
    timeout: float = DEFAULT_TIMEOUT

    @property
    def can_enroll(self) -> bool:
        return self.provisioner_key is not None or self.token_command is not None

    @classmethod
    def from_table(cls, t: Table, subject: str) -> StepCASettings:
        url = t.string("step_ca_url")
        if url is None:
            raise _required(t, "step_ca_url", cls.name, f'"{_STEP_CA_EXAMPLE}"')
        parts = _url(url)
        if parts is None or parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
            raise t.error("step_ca_url", "must be an https:// URL", url, hint=f'for example "{_STEP_CA_EXAMPLE}"')
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise t.error("step_ca_url", "bad port", url, hint=f'for example "{_STEP_CA_EXAMPLE}"') from None
        provisioner = t.string("step_ca_provisioner")
        if provisioner == "":
            raise t.error("step_ca_provisioner", "must be the provisioner's name", provisioner)
        key_file = t.file("step_ca_provisioner_key")
        if (provisioner is None) != (key_file is None):
            given, missing = (
                ("step_ca_provisioner", "step_ca_provisioner_key")
                if key_file is None
                else ("step_ca_provisioner_key", "step_ca_provisioner")
            )
            raise t.error(
                given, f"needs {missing} too", t.data[given], hint="a JWK provisioner's name and its private key"
            )
        token_command = None
        if "step_ca_token_command" in t.data:
            token_command = _argv(t, "step_ca_token_command", _TOKEN_COMMAND_EXAMPLE)
            if key_file is not None:
                raise t.error(
                    "step_ca_token_command",
                    "set step_ca_provisioner_key or step_ca_token_command, not both",
                    hint="both make enrollment tokens",
                )
        return cls(
            url=url.rstrip("/"),
            common_name=_common_name(t, subject),
            root=t.file("step_ca_root"),
            provisioner=provisioner,
            provisioner_key=key_file,
            token_command=token_command,
            rekey=_rekey(t, default=False),
            timeout=t.duration("renew_timeout", cls.DEFAULT_TIMEOUT, positive=True),
        )


ProviderSettings = LocalCASettings | AcmeSettings | CommandSettings | StepCASettings
_SettingsClass = type[LocalCASettings] | type[AcmeSettings] | type[CommandSettings] | type[StepCASettings]

# Every `renew` name and its settings class; "none" renews nothing and reads no provider key.
PROVIDERS: Mapping[str, _SettingsClass | None] = MappingProxyType(
    {
        "local-ca": LocalCASettings,
        "acme": AcmeSettings,
        "command": CommandSettings,
        "step-ca": StepCASettings,
        "none": None,
    }
)
PROVIDER_KEYS = tuple(dict.fromkeys(key for kind in PROVIDERS.values() if kind is not None for key in kind.keys))


def parse_provider(t: Table, renew: str, subject: str) -> ProviderSettings | None:
    """The settings of provider `renew` from identity table `t`; None for `renew = "none"`.

    A key another provider reads is refused rather than ignored: it is a mistake either way
    (a key from before `renew` changed, or one meant for this provider but misspelt).
    """
    kind = PROVIDERS[renew]
    own = kind.keys if kind is not None else ()
    for key in t.data:
        if key in PROVIDER_KEYS and key not in own:
            raise _not_ours(t, key, renew, own)
    return kind.from_table(t, subject) if kind is not None else None


def acme_identifier(value: object) -> str:
    """A DNS name (lower case, no trailing dot) or an IP address literal; ValueError says why not."""
    if not isinstance(value, str) or not value:
        raise ValueError("expected DNS names as strings")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    name = value.lower().rstrip(".")
    if name.startswith("*."):
        raise ValueError("wildcard names cannot be validated with http-01")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError("not a DNS name")
    return name


# --- helpers


def _not_ours(t: Table, key: str, renew: str, own: tuple[str, ...]) -> ConfigError:
    users = [name for name, kind in PROVIDERS.items() if kind is not None and key in kind.keys]
    quoted = [f'"{name}"' for name in users]
    whose = "renew = " + (f"{', '.join(quoted[:-1])} or {quoted[-1]}" if len(quoted) > 1 else quoted[0])
    default = "" if "renew" in t.data else ", the default"
    close = difflib.get_close_matches(key, own, n=1)
    if close:
        hint = f'did you mean "{close[0]}"?'
    elif len(users) == 1:
        hint = f'remove it, or set renew = "{users[0]}"'
    else:
        hint = "remove it"
    return t.error(
        key, f'only read with {whose}, and this identity has renew = "{renew}"{default}', t.data[key], hint=hint
    )


def _required(t: Table, key: str, renew: str, example: str) -> ConfigError:
    return t.error(key, f'required with renew = "{renew}"', hint=f"add {key} = {example}")


def _rekey(t: Table, *, default: bool) -> bool:
    value = t.data.get("rekey", default)
    if not isinstance(value, bool):
        raise t.error("rekey", "must be true or false", value, hint="rekey = true asks for a new key each time")
    return value


def _url(text: str) -> SplitResult | None:
    try:
        return urlsplit(text)
    except ValueError:  # an unclosed [ for an IPv6 host, for one
        return None


def _argv(t: Table, key: str, example: str) -> tuple[str, ...]:
    value = t.data[key]
    if not isinstance(value, list) or not value or not all(isinstance(a, str) and a for a in value):
        raise t.error(key, "must be a non-empty list of strings (argv, no shell)", value, hint=f"e.g. {example}")
    return tuple(value)


def _env_names(t: Table, key: str) -> tuple[str, ...]:
    names = t.strings(key, '["AWS_PROFILE", "VAULT_ADDR"]')
    for name in names:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise t.error(key, "not an environment variable name", name, hint='e.g. ["VAULT_ADDR"]')
    return tuple(names)


def _acme_identifiers(t: Table) -> tuple[str, ...] | None:
    raw = t.data.get("acme_identifiers")
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        raise t.error("acme_identifiers", "must be a non-empty list of DNS names", raw, hint='e.g. ["dev.example.com"]')
    checked = []
    for item in raw:
        try:
            checked.append(acme_identifier(item))
        except ValueError as exc:
            raise t.error("acme_identifiers", str(exc), item) from None
    return tuple(checked)


def _common_name(t: Table, subject: str) -> str:
    from cryptography import x509  # here: reading config.toml should not load cryptography
    from cryptography.x509.oid import NameOID

    try:
        names = x509.Name.from_rfc4514_string(subject).get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        names = []
    if not names or not isinstance(names[0].value, str) or not names[0].value:
        raise t.error(
            "subject",
            "needs a CN: the name step-ca certifies",
            subject,
            hint='for example "CN=laptop.example.test"',
        )
    return names[0].value
