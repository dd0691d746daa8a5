# ruff: noqa: E501  (the message tables read best one message a line)
"""Renewal settings are parsed and checked when the config is loaded: every provider's keys
(and the timing keys every identity has) give one-line errors with the file, the line, the
dotted field and the value, the field named once."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.config import RENEW_PROVIDERS, parse_config
from sidecar.errors import ConfigError
from sidecar.renewal.settings import (
    PROVIDER_KEYS,
    PROVIDERS,
    TIMING_KEYS,
    AcmeSettings,
    CommandSettings,
    LocalCASettings,
    StepCASettings,
)
from sidecar.renewal.timing import RenewalPolicy

ACME = 'acme_directory = "https://acme.example/dir"'
STEP = 'step_ca_url = "https://ca.example.test:9000"'
NOT_A_DURATION = (
    'is not a duration; write a number and a unit (ms, s, m, h, d, w), for example "10s", "2m", "1h30m" or "7d"'
)
PORT = "must be a port number 1-65535"
ARGV = "must be a non-empty list of strings (argv, no shell)"
REKEY = "must be true or false (rekey = true asks for a new key each time)"


def identity(renew: str | None, *lines: str) -> str:
    """`[identities.dev]` on line 1, `renew` on line 2, then `lines` from line 3."""
    head = ["[identities.dev]"] + ([f'renew = "{renew}"'] if renew is not None else [])
    return "\n".join([*head, *lines]) + "\n"


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="config.toml")
    return caught.value


# --- every bad value: the whole message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # acme
        (
            identity("acme", ACME, "acme_http_port = 99999"),
            f"config.toml:4: identities.dev.acme_http_port = 99999: {PORT}",
        ),
        (identity("acme", ACME, "acme_http_port = 0"), f"config.toml:4: identities.dev.acme_http_port = 0: {PORT}"),
        (
            identity("acme", ACME, 'acme_http_port = "5002"'),
            f"config.toml:4: identities.dev.acme_http_port = '5002': {PORT}",
        ),
        (
            identity("acme", ACME, "acme_http_port = true"),
            f"config.toml:4: identities.dev.acme_http_port = True: {PORT}",
        ),
        (
            identity("acme"),
            'config.toml:1: identities.dev.acme_directory: required with renew = "acme" '
            '(add acme_directory = "https://acme-v02.api.letsencrypt.org/directory")',
        ),
        (
            identity("acme", 'acme_directory = "http://acme.example/dir"'),
            "config.toml:3: identities.dev.acme_directory = 'http://acme.example/dir': must be an https:// URL "
            '(for example "https://acme-v02.api.letsencrypt.org/directory")',
        ),
        (
            identity("acme", 'acme_directory = "https://[::1/dir"'),
            "config.toml:3: identities.dev.acme_directory = 'https://[::1/dir': must be an https:// URL "
            '(for example "https://acme-v02.api.letsencrypt.org/directory")',
        ),
        (
            identity("acme", "acme_directory = 42"),
            "config.toml:3: identities.dev.acme_directory = 42: expected a string, got an integer",
        ),
        (
            identity("acme", ACME, 'acme_challenge = "dns-01"'),
            "config.toml:4: identities.dev.acme_challenge = 'dns-01': not supported: only \"http-01\" is",
        ),
        (
            identity("acme", ACME, 'acme_identifiers = "dev.example.test"'),
            "config.toml:4: identities.dev.acme_identifiers = 'dev.example.test': must be a non-empty list of DNS names "
            '(e.g. ["dev.example.com"])',
        ),
        (
            identity("acme", ACME, "acme_identifiers = []"),
            'config.toml:4: identities.dev.acme_identifiers = []: must be a non-empty list of DNS names (e.g. ["dev.example.com"])',
        ),
        (
            identity("acme", ACME, 'acme_identifiers = ["ok.example.test", "*.example.test"]'),
            "config.toml:4: identities.dev.acme_identifiers = '*.example.test': wildcard names cannot be validated with http-01",
        ),
        (
            identity("acme", ACME, 'acme_identifiers = ["not a name"]'),
            "config.toml:4: identities.dev.acme_identifiers = 'not a name': not a DNS name",
        ),
        (
            identity("acme", ACME, "acme_identifiers = [7]"),
            "config.toml:4: identities.dev.acme_identifiers = 7: expected DNS names as strings",
        ),
        (
            identity("acme", ACME, 'acme_email = "nobody"'),
            "config.toml:4: identities.dev.acme_email = 'nobody': must be an e-mail address such as \"dev@example.com\"",
        ),
        (
            identity("acme", ACME, 'acme_timeout = "soon"'),
            f"config.toml:4: identities.dev.acme_timeout = 'soon': 'soon' {NOT_A_DURATION}",
        ),
        (
            identity("acme", ACME, 'acme_timeout = "0s"'),
            "config.toml:4: identities.dev.acme_timeout = '0s': duration must be longer than zero",
        ),
        (identity("acme", ACME, 'rekey = "yes"'), f"config.toml:4: identities.dev.rekey = 'yes': {REKEY}"),
        (
            identity("acme", ACME, 'acme_ca_file = ""'),
            "config.toml:4: identities.dev.acme_ca_file = '': expected a file path",
        ),
        # command
        (
            identity("command"),
            'config.toml:1: identities.dev.renew_command: required with renew = "command" '
            '(add renew_command = ["step", "ca", "renew", "--force", "cert.pem", "key.pem"])',
        ),
        (
            identity("command", 'renew_command = "step ca renew"'),
            f"config.toml:3: identities.dev.renew_command = 'step ca renew': {ARGV} "
            '(e.g. ["step", "ca", "renew", "--force", "cert.pem", "key.pem"])',
        ),
        (
            identity("command", 'renew_command = ["step", ""]'),
            f"config.toml:3: identities.dev.renew_command = ['step', '']: {ARGV} "
            '(e.g. ["step", "ca", "renew", "--force", "cert.pem", "key.pem"])',
        ),
        (
            identity("command", 'renew_command = ["x"]', 'renew_timeout = "later"'),
            f"config.toml:4: identities.dev.renew_timeout = 'later': 'later' {NOT_A_DURATION}",
        ),
        (
            identity("command", 'renew_command = ["x"]', 'renew_timeout = "0s"'),
            "config.toml:4: identities.dev.renew_timeout = '0s': duration must be longer than zero",
        ),
        # step-ca
        (
            identity("step-ca"),
            'config.toml:1: identities.dev.step_ca_url: required with renew = "step-ca" '
            '(add step_ca_url = "https://ca.example:9000")',
        ),
        (
            identity("step-ca", 'step_ca_url = "http://ca:9000"'),
            "config.toml:3: identities.dev.step_ca_url = 'http://ca:9000': must be an https:// URL "
            '(for example "https://ca.example:9000")',
        ),
        (
            identity("step-ca", 'step_ca_url = "https://ca:9000/?x=1"'),
            "config.toml:3: identities.dev.step_ca_url = 'https://ca:9000/?x=1': must be an https:// URL "
            '(for example "https://ca.example:9000")',
        ),
        (
            identity("step-ca", 'step_ca_url = "https://ca:99999"'),
            "config.toml:3: identities.dev.step_ca_url = 'https://ca:99999': bad port (for example \"https://ca.example:9000\")",
        ),
        (
            identity("step-ca", STEP, 'step_ca_provisioner = "admin"'),
            "config.toml:4: identities.dev.step_ca_provisioner = 'admin': needs step_ca_provisioner_key too "
            "(a JWK provisioner's name and its private key)",
        ),
        (
            identity("step-ca", STEP, 'step_ca_provisioner_key = "p.json"'),
            "config.toml:4: identities.dev.step_ca_provisioner_key = 'p.json': needs step_ca_provisioner too "
            "(a JWK provisioner's name and its private key)",
        ),
        (
            identity("step-ca", STEP, 'step_ca_provisioner = ""'),
            "config.toml:4: identities.dev.step_ca_provisioner = '': must be the provisioner's name",
        ),
        (
            identity("step-ca", STEP, 'step_ca_token_command = "step ca token x"'),
            f"config.toml:4: identities.dev.step_ca_token_command = 'step ca token x': {ARGV} "
            '(e.g. ["step", "ca", "token", "laptop.example.test"])',
        ),
        (
            identity(
                "step-ca",
                STEP,
                'step_ca_provisioner = "admin"',
                'step_ca_provisioner_key = "p.json"',
                'step_ca_token_command = ["x"]',
            ),
            "config.toml:6: identities.dev.step_ca_token_command: set step_ca_provisioner_key or step_ca_token_command, "
            "not both (both make enrollment tokens)",
        ),
        (identity("step-ca", STEP, 'rekey = "yes"'), f"config.toml:4: identities.dev.rekey = 'yes': {REKEY}"),
        (
            identity("step-ca", STEP, 'renew_timeout = "soon"'),
            f"config.toml:4: identities.dev.renew_timeout = 'soon': 'soon' {NOT_A_DURATION}",
        ),
        (
            identity("step-ca", STEP, 'subject = "O=Example"'),
            "config.toml:4: identities.dev.subject = 'O=Example': needs a CN: the name step-ca certifies "
            '(for example "CN=laptop.example.test")',
        ),
        # local-ca
        (identity("local-ca", 'rekey = "yes"'), f"config.toml:3: identities.dev.rekey = 'yes': {REKEY}"),
        # timing, on any identity
        (
            identity("local-ca", "renew_at = 1.5"),
            "config.toml:3: identities.dev.renew_at = 1.5: write a fraction of the lifetime between 0 and 1, e.g. 0.66",
        ),
        (
            identity("none", "renew_at = true"),
            "config.toml:3: identities.dev.renew_at = True: write a fraction of the lifetime between 0 and 1, e.g. 0.66",
        ),
        (
            identity("command", 'renew_command = ["x"]', 'renew_before = "soon"'),
            f"config.toml:4: identities.dev.renew_before = 'soon': 'soon' {NOT_A_DURATION}",
        ),
        (
            identity("acme", ACME, 'prune_after = "-"'),
            f"config.toml:4: identities.dev.prune_after = '-': '-' {NOT_A_DURATION}",
        ),
        (
            identity("local-ca", "renew_at = 0.5", 'renew_before = "8h"'),
            "config.toml:4: identities.dev.renew_before = '8h': set renew_at or renew_before, not both",
        ),
    ],
)
def test_a_bad_value_is_one_line_with_its_line_field_and_value(text: str, message: str) -> None:
    assert str(error(text)) == message


def test_the_error_carries_its_parts_as_data() -> None:
    err = error(identity("acme", ACME, "acme_http_port = 99999"))
    assert (err.source, err.line, err.field, err.value) == ("config.toml", 4, "identities.dev.acme_http_port", 99999)
    assert (err.message, err.hint) == (PORT, None)


# --- a key another provider reads


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            identity("command", 'renew_command = ["x"]', 'acme_directory = "https://acme.example/dir"'),
            "config.toml:4: identities.dev.acme_directory = 'https://acme.example/dir': only read with "
            'renew = "acme", and this identity has renew = "command" (remove it, or set renew = "acme")',
        ),
        (
            identity("acme", ACME, 'renew_timeout = "1m"'),
            'config.toml:4: identities.dev.renew_timeout = \'1m\': only read with renew = "command" or "step-ca", '
            'and this identity has renew = "acme" (did you mean "acme_timeout"?)',
        ),
        (
            identity("none", "rekey = false"),
            'config.toml:3: identities.dev.rekey = False: only read with renew = "local-ca", "acme" or "step-ca", '
            'and this identity has renew = "none" (remove it)',
        ),
        (
            identity(None, 'acme_email = "dev@example.com"'),
            "config.toml:2: identities.dev.acme_email = 'dev@example.com': only read with renew = \"acme\", "
            'and this identity has renew = "local-ca", the default (remove it, or set renew = "acme")',
        ),
        (
            identity("command", 'renew_command = ["x"]', "rekey = true"),
            'config.toml:4: identities.dev.rekey = True: only read with renew = "local-ca", "acme" or "step-ca", '
            'and this identity has renew = "command" (remove it)',
        ),
    ],
)
def test_a_key_of_another_provider_says_whose_it_is(text: str, message: str) -> None:
    assert str(error(text)) == message


def test_a_misspelt_key_is_still_unknown_first() -> None:
    err = error(identity("command", 'renew_command = ["x"]', 'acme_emial = "a@b"'))
    assert (err.field, err.line, err.message, err.hint) == (
        "identities.dev.acme_emial",
        4,
        "unknown key",
        'did you mean "acme_email"?',
    )


def test_timing_keys_are_read_with_every_provider() -> None:
    for renew, extra in [("local-ca", ""), ("acme", ACME), ("command", 'renew_command = ["x"]'), ("step-ca", STEP),
                         ("none", "")]:  # fmt: skip
        text = identity(renew, extra, 'renew_before = "8h"', 'prune_after = "1d"')
        timing = parse_config(text).identities["dev"].timing
        assert timing == RenewalPolicy(before=timedelta(hours=8), prune_after=timedelta(days=1)), renew


# --- what is accepted, typed


def test_timing_values_and_defaults() -> None:
    def timing(*lines: str) -> RenewalPolicy:
        return parse_config(identity("local-ca", *lines)).identities["dev"].timing

    assert timing("renew_at = 0.66").fraction == 0.66
    assert timing('renew_before = "8h"').before == timedelta(hours=8)
    assert timing("renew_before = 3600").before == timedelta(hours=1)
    assert timing('prune_after = "1d"').prune_after == timedelta(days=1)
    assert timing() == RenewalPolicy()


def test_defaults_of_each_provider() -> None:
    def provider(renew: str, *lines: str) -> object:
        return parse_config(identity(renew, *lines)).identities["dev"].provider

    assert provider("local-ca") == LocalCASettings(rekey=True)
    assert provider("local-ca", "rekey = false") == LocalCASettings(rekey=False)
    assert provider("acme", ACME) == AcmeSettings(
        directory="https://acme.example/dir",
        ca_file=None,
        email=None,
        identifiers=None,
        challenge="http-01",
        http_port=5002,
        rekey=True,
        timeout=90.0,
    )
    assert provider("command", 'renew_command = ["renew.sh"]') == CommandSettings(argv=("renew.sh",), timeout=60.0)
    step = provider("step-ca", 'step_ca_url = "https://ca.example.test:9000/"')
    assert step == StepCASettings(url="https://ca.example.test:9000", common_name="dev", rekey=False, timeout=30.0)
    assert isinstance(step, StepCASettings) and not step.can_enroll
    assert provider("none") is None


def test_every_acme_key_typed() -> None:
    text = identity(
        "acme",
        ACME,
        'acme_ca_file = "~/acme-ca.pem"',
        'acme_email = "dev@example.com"',
        'acme_identifiers = ["Dev.Example.Test.", "127.0.0.1"]',
        'acme_challenge = "http-01"',
        "acme_http_port = 8080",
        'acme_timeout = "2m"',
        "rekey = false",
    )
    assert parse_config(text).identities["dev"].provider == AcmeSettings(
        directory="https://acme.example/dir",
        ca_file=Path("~/acme-ca.pem").expanduser(),
        email="dev@example.com",
        identifiers=("dev.example.test", "127.0.0.1"),
        http_port=8080,
        rekey=False,
        timeout=120.0,
    )


def test_every_step_ca_key_typed(tmp_path: Path) -> None:
    jwk = identity(
        "step-ca",
        STEP,
        'subject = "CN=laptop.example.test,O=Example"',
        'step_ca_root = "root.crt"',
        'step_ca_provisioner = "laptops"',
        'step_ca_provisioner_key = "/keys/laptops.json"',
        "rekey = true",
        'renew_timeout = "10s"',
    )
    assert parse_config(jwk, base_dir=tmp_path).identities["dev"].provider == StepCASettings(
        url="https://ca.example.test:9000",
        common_name="laptop.example.test",
        root=tmp_path / "root.crt",
        provisioner="laptops",
        provisioner_key=Path("/keys/laptops.json"),
        rekey=True,
        timeout=10.0,
    )
    command = identity("step-ca", STEP, 'step_ca_token_command = ["step", "ca", "token", "dev"]')
    settings = parse_config(command).identities["dev"].provider
    assert isinstance(settings, StepCASettings)
    assert settings.token_command == ("step", "ca", "token", "dev") and settings.can_enroll


# --- the registry, and what loading the config imports


def test_every_renew_name_is_registered_and_every_key_has_a_provider() -> None:
    assert RENEW_PROVIDERS == ("local-ca", "acme", "command", "step-ca", "none")
    assert tuple(PROVIDERS) == RENEW_PROVIDERS
    for name, kind in PROVIDERS.items():
        assert kind is None or kind.name == name
    owned = {key for kind in PROVIDERS.values() if kind is not None for key in kind.keys}
    assert set(PROVIDER_KEYS) == owned and not owned & set(TIMING_KEYS)


def test_loading_the_config_imports_no_provider_and_no_io_library() -> None:
    code = (
        "import sys, sidecar.config\n"
        "heavy = ('acme', 'josepy', 'requests', 'asyncio', 'sidecar.renewal.providers')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- random values never escape as anything but ConfigError


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["https://ca.example.test:9000", "https://[::1", "http://x", "5m", "0s", "CN=x", "O=x", "*.a.b"]),
    st.lists(st.one_of(st.text(max_size=12), st.integers(), st.booleans()), max_size=3),
)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + "".join(c if c.isalnum() or c in " .:/-_*=[]@~" else "" for c in value) + '"'
    assert isinstance(value, list)
    return "[" + ", ".join(_toml(v) for v in value) + "]"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(RENEW_PROVIDERS), st.data())
def test_random_provider_values_raise_only_config_error(renew: str, data: st.DataObject) -> None:
    kind = PROVIDERS[renew]
    own = [*(kind.keys if kind is not None else ()), *TIMING_KEYS, "subject"]
    keys = data.draw(st.dictionaries(st.sampled_from(own), _VALUES, max_size=5))
    if data.draw(st.booleans()):  # now and then a key another provider reads
        keys[data.draw(st.sampled_from(PROVIDER_KEYS))] = data.draw(_VALUES)
    lines = [f"{key} = {_toml(value)}" for key, value in keys.items() if value is not None]
    try:
        parse_config(identity(renew, *lines), source="config.toml")
    except ConfigError as exc:
        assert exc.source == "config.toml" and exc.line is not None and "\n" not in str(exc)
