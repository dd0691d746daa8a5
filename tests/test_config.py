"""sidecar.config: TOML text → frozen specs, and errors that point at the file, line and field."""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_LIFETIME,
    DEFAULT_SHUTDOWN_GRACE,
    Config,
    DemoServiceSpec,
    IdentitySpec,
    ListenAddress,
    RouteSpec,
    default_config_text,
    load_config,
    parse_config,
    parse_listen,
    parse_target,
)
from sidecar.errors import ConfigError
from sidecar.renewal.settings import AcmeSettings, CommandSettings, LocalCASettings, StepCASettings
from sidecar.renewal.timing import RenewalPolicy

MINIMAL = """\
[identities.dev]

[routes.api]
listen = "127.0.0.1:8443"
target = "api.example.test:443"
"""


def config_error(text: str, base_dir: Path | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="config.toml", base_dir=base_dir)
    assert info.value.source == "config.toml"
    return info.value


def route(body: str, *, extra: str = "") -> str:
    """A config with identity dev and route api (header on line 3) whose body is given."""
    return f"[identities.dev]\n\n[routes.api]\n{body}\n{extra}"


# --- valid configurations ----------------------------------------------------------------


FULL = """\
active_identity = "ci"
log_level = "debug"
shutdown_grace = "2s"
keystore_dir = "/var/lib/sidecar/keys"

[demo_service]
enabled = true
listen = "127.0.0.1:19443"

[identities.dev]
renew = "local-ca"
subject = "CN=dev,O=Example"
lifetime = "1d"
pkcs12_password_env = "DEV_P12_PASSWORD"
key_password_env = "DEV_KEY_PASSWORD"
issuer_ca_file = "/etc/ca/dev-ca.pem"

[identities.ci]
renew = "acme"
acme_directory = "https://acme.example.test/directory"
acme_identifiers = ["ci.example.test"]
renew_before = "8h"
acme_http_port = 8080

[routes.api]
listen = "127.0.0.1:8443"
target = "api.example.test:443"
server_name = "api.internal.test"
ca_file = "/etc/ca/api.pem"
ca_dir = "/etc/ca/certs"
identity = "dev"
alpn = ["h2", "http/1.1"]
connect_timeout = "3s"
unsafe_listen = false
unsafe_skip_verify = true

[routes.db]
listen = "unix:/run/user/1000/db.sock"
target = "[2001:db8::5]:5432"
"""


def test_full_config_parses_to_the_expected_specs() -> None:
    config = parse_config(FULL, source="config.toml")

    assert config.source == "config.toml"
    assert config.active_identity == "ci"
    assert config.log_level == "debug"
    assert config.shutdown_grace == 2.0
    assert config.keystore_dir == Path("/var/lib/sidecar/keys")
    assert config.demo_service == DemoServiceSpec(True, ListenAddress("tcp", "127.0.0.1", 19443))

    assert list(config.identities) == ["dev", "ci"]
    assert config.identities["dev"] == IdentitySpec(
        name="dev",
        subject="CN=dev,O=Example",
        lifetime=86400.0,
        pkcs12_password_env="DEV_P12_PASSWORD",
        key_password_env="DEV_KEY_PASSWORD",
        issuer_ca_file=Path("/etc/ca/dev-ca.pem"),
        timing=RenewalPolicy(),
        provider=LocalCASettings(rekey=True),
    )
    assert config.identities["dev"].renew == "local-ca"
    ci = config.identities["ci"]
    assert ci.renew == "acme"
    assert ci.subject == "CN=ci"
    assert ci.provider == AcmeSettings(
        directory="https://acme.example.test/directory", identifiers=("ci.example.test",), http_port=8080
    )
    assert ci.timing == RenewalPolicy(before=timedelta(hours=8))

    assert list(config.routes) == ["api", "db"]
    assert config.routes["api"] == RouteSpec(
        name="api",
        listen=ListenAddress("tcp", "127.0.0.1", 8443),
        target_host="api.example.test",
        target_port=443,
        server_name="api.internal.test",
        ca_file=Path("/etc/ca/api.pem"),
        ca_dir=Path("/etc/ca/certs"),
        identity="dev",
        alpn=("h2", "http/1.1"),
        connect_timeout=3.0,
        unsafe_listen=False,
        unsafe_skip_verify=True,
    )
    db = config.routes["db"]
    assert db.listen == ListenAddress("unix", path="/run/user/1000/db.sock")
    assert (db.target_host, db.target_port, db.server_name) == ("2001:db8::5", 5432, "2001:db8::5")
    assert db.identity is None


def test_defaults() -> None:
    config = parse_config(MINIMAL)

    assert config.source == "<string>"
    assert config.active_identity == "dev"
    assert config.log_level == "info"
    assert config.shutdown_grace == DEFAULT_SHUTDOWN_GRACE
    assert config.keystore_dir is None
    assert config.demo_service == DemoServiceSpec(False, ListenAddress("tcp", "127.0.0.1", 18443))
    assert config.identities["dev"] == IdentitySpec(name="dev", subject="CN=dev")
    assert config.identities["dev"].lifetime == DEFAULT_LIFETIME
    api = config.routes["api"]
    assert api.server_name == "api.example.test"
    assert (api.ca_file, api.ca_dir, api.identity, api.alpn) == (None, None, None, ())
    assert api.connect_timeout == DEFAULT_CONNECT_TIMEOUT
    assert not api.unsafe_listen and not api.unsafe_skip_verify


def test_an_empty_config_is_valid() -> None:
    config = parse_config("")
    assert config.active_identity == ""
    assert dict(config.identities) == {} and dict(config.routes) == {}


def test_specs_are_frozen() -> None:
    config = parse_config(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.active_identity = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.routes["new"] = config.routes["api"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.identities["dev"].provider.rekey = False  # type: ignore[union-attr,misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.identities["dev"].timing.fraction = 0.5  # type: ignore[misc]
    assert parse_config(MINIMAL) == config
    assert hash(config.routes["api"]) == hash(parse_config(MINIMAL).routes["api"])


def test_a_demo_service_table_without_enabled_stays_off() -> None:
    config = parse_config('[demo_service]\nlisten = "[::1]:0"\n')
    assert config.demo_service == DemoServiceSpec(False, ListenAddress("tcp", "::1", 0))


def test_provider_settings_are_typed() -> None:
    config = parse_config(
        '[identities.dev]\nrenew = "command"\nrenew_command = ["renew.sh", "dev"]\nrenew_timeout = "2m"\n'
        'renew_before = "8h"\nprune_after = "1d"\n'
    )
    dev = config.identities["dev"]
    assert dev.provider == CommandSettings(argv=("renew.sh", "dev"), timeout=120.0)
    assert dev.timing == RenewalPolicy(before=timedelta(hours=8), prune_after=timedelta(days=1))
    none = parse_config('[identities.dev]\nrenew = "none"\nrenew_at = 0.5\n').identities["dev"]
    assert (none.provider, none.renew, none.timing) == (None, "none", RenewalPolicy(fraction=0.5))


def test_provider_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    text = (
        '[identities.dev]\nrenew = "step-ca"\nstep_ca_url = "https://ca.test:9000"\nstep_ca_root = "root.crt"\n'
        'step_ca_provisioner = "admin"\nstep_ca_provisioner_key = "keys/prov.json"\n'
        '[identities.ci]\nrenew = "acme"\nacme_directory = "https://acme.test/dir"\nacme_ca_file = "/etc/acme.pem"\n'
    )
    config = parse_config('active_identity = "dev"\n' + text, base_dir=tmp_path)
    assert config.identities["dev"].provider == StepCASettings(
        url="https://ca.test:9000",
        common_name="dev",
        root=tmp_path / "root.crt",
        provisioner="admin",
        provisioner_key=tmp_path / "keys" / "prov.json",
    )
    ci = config.identities["ci"].provider
    assert isinstance(ci, AcmeSettings) and ci.ca_file == Path("/etc/acme.pem")


@pytest.mark.parametrize(
    ("line", "field", "where"),
    [
        ("renew_at = 1.5", "identities.dev.renew_at = 1.5", "c.toml:3:"),
        ("renew_at = 0", "identities.dev.renew_at = 0", "c.toml:3:"),
        ('renew_before = "soon"', "identities.dev.renew_before = 'soon'", "c.toml:3:"),
        ('prune_after = "-"', "identities.dev.prune_after = '-'", "c.toml:3:"),
        ('renew_at = 0.5\nrenew_before = "8h"', "set renew_at or renew_before, not both", "c.toml:4:"),
    ],
)
def test_renewal_timing_is_checked_with_its_line(line: str, field: str, where: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f'[identities.dev]\nrenew = "local-ca"\n{line}\n', source="c.toml")
    assert field in str(caught.value) and str(caught.value).startswith(where)


# --- addresses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "shown", "loopback"),
    [
        ("127.0.0.1:8443", ListenAddress("tcp", "127.0.0.1", 8443), "127.0.0.1:8443", True),
        ("127.9.8.7:1", ListenAddress("tcp", "127.9.8.7", 1), "127.9.8.7:1", True),
        ("localhost:0", ListenAddress("tcp", "localhost", 0), "localhost:0", True),
        ("[::1]:8443", ListenAddress("tcp", "::1", 8443), "[::1]:8443", True),
        ("[::ffff:127.0.0.1]:80", ListenAddress("tcp", "::ffff:127.0.0.1", 80), "[::ffff:127.0.0.1]:80", True),
        ("unix:/run/x.sock", ListenAddress("unix", path="/run/x.sock"), "unix:/run/x.sock", True),
        ("0.0.0.0:8443", ListenAddress("tcp", "0.0.0.0", 8443), "0.0.0.0:8443", False),
        ("[::]:65535", ListenAddress("tcp", "::", 65535), "[::]:65535", False),
        ("10.1.2.3:80", ListenAddress("tcp", "10.1.2.3", 80), "10.1.2.3:80", False),
        ("myhost.example:80", ListenAddress("tcp", "myhost.example", 80), "myhost.example:80", False),
    ],
)
def test_parse_listen(text: str, expected: ListenAddress, shown: str, loopback: bool) -> None:
    listen = parse_listen(text, field="routes.x.listen", source="s")
    assert listen == expected
    assert str(listen) == shown
    assert listen.is_loopback is loopback


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1", "missing port"),
        ("127.0.0.1:", "missing port"),
        (":8443", "missing host"),
        ("127.0.0.1:65536", "port must be a number from 0 to 65535"),
        ("127.0.0.1:-1", "port must be a number from 0 to 65535"),
        ("127.0.0.1:+80", "port must be a number from 0 to 65535"),
        ("::1:8443", "an IPv6 address needs brackets"),
        ("[127.0.0.1]:80", "brackets hold an IPv6 address only"),
        ("[::1]", "missing port"),
        ("999.0.0.1:80", "999.0.0.1 is not a valid IPv4 address"),
        ("bad host:80", "is not a valid host name"),
        ("unix:", "missing socket path"),
        ("unix:run/x.sock", "a Unix socket path must be absolute"),
        ("unix:/" + "x" * 200, "a Unix socket path may be at most"),
    ],
)
def test_parse_listen_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_listen(text, field="routes.x.listen", source="cfg", line=3)
    err = info.value
    assert message in err.message
    assert (err.source, err.line, err.field, err.value) == ("cfg", 3, "routes.x.listen", text)


def test_parse_listen_expands_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/tester")
    listen = parse_listen("unix:~/s.sock", field="f", source="s")
    assert listen.path == "/home/tester/s.sock"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("api.example.test:443", ("api.example.test", 443)),
        ("10.0.0.1:1", ("10.0.0.1", 1)),
        ("[2001:db8::1]:65535", ("2001:db8::1", 65535)),
        ("svc_1.internal.:8443", ("svc_1.internal.", 8443)),
    ],
)
def test_parse_target(text: str, expected: tuple[str, int]) -> None:
    assert parse_target(text, field="routes.x.target", source="s") == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("api.example.test", "missing port"),
        ("api.example.test:0", "port must be a number from 1 to 65535"),
        ("api.example.test:70000", "port must be a number from 1 to 65535"),
        ("2001:db8::1:443", "an IPv6 address needs brackets"),
        ("-bad-.example:443", "is not a valid host name"),
        ("https://api.example.test:443", "an address has no scheme"),
    ],
)
def test_parse_target_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_target(text, field="--target", source="command line")
    assert message in info.value.message
    assert (info.value.field, info.value.value) == ("--target", text)


# --- errors carry source, line, field and value ------------------------------------------


def test_syntax_error_reports_its_line() -> None:
    text = "\n".join(
        ["# 1", "# 2", "[identities.dev]", "", "[routes.api]", 'listen = "127.0.0.1:1"', 'target = "x:1" y', ""]
    )
    err = config_error(text)
    assert err.line == 7
    assert err.message.startswith("invalid TOML:")
    assert "column" in err.message
    assert str(err).startswith("config.toml:7: invalid TOML")


def test_syntax_error_at_end_of_document_reports_the_last_line() -> None:
    err = config_error("[identities.dev]\nlisten = [\n\n")
    assert err.line == 2
    assert "at end of document" not in err.message


def test_deeply_nested_toml_is_a_config_error() -> None:
    err = config_error("x = " + "[" * 5000)
    assert "nested too deeply" in err.message


def test_bad_listen_reports_its_line_field_and_value() -> None:
    text = "\n".join(
        [
            "# line 1",
            "",
            "[identities.dev]",
            'subject = "CN=dev"',
            "",
            "[routes.ok]",
            'listen = "127.0.0.1:1"',
            'target = "a:1"',
            "",
            "[routes.api]",
            'target = "api.example.test:443"',
            'listen = "127.0.0.1:99999"',
            "",
        ]
    )
    err = config_error(text)
    assert err.line == 12
    assert err.field == "routes.api.listen"
    assert err.value == "127.0.0.1:99999"
    assert "port must be a number from 0 to 65535" in err.message
    assert str(err).startswith("config.toml:12: routes.api.listen = '127.0.0.1:99999': port")


def test_unknown_key_suggests_the_nearest() -> None:
    text = "\n".join(
        ["# 1"] * 10 + ["[identities.dev]", "", "[routes.api]", 'lisen = "127.0.0.1:8443"', 'target = "a:1"', ""]
    )
    err = config_error(text)
    assert str(err) == 'config.toml:14: routes.api.lisen: unknown key (did you mean "listen"?)'
    assert (err.field, err.line, err.hint) == ("routes.api.lisen", 14, 'did you mean "listen"?')


@pytest.mark.parametrize(
    ("text", "field", "line", "hint"),
    [
        ('log_levl = "info"\n', "log_levl", 1, 'did you mean "log_level"?'),
        ("[demo_service]\nenable = true\n", "demo_service.enable", 2, 'did you mean "enabled"?'),
        ('[identities.dev]\nlifetme = "1d"\n', "identities.dev.lifetme", 2, 'did you mean "lifetime"?'),
        ('[identities.dev]\nacme_emial = "a@b"\n', "identities.dev.acme_emial", 2, 'did you mean "acme_email"?'),
    ],
)
def test_unknown_keys_everywhere(text: str, field: str, line: int, hint: str) -> None:
    err = config_error(text)
    assert (err.message, err.field, err.line, err.hint) == ("unknown key", field, line, hint)


def test_unknown_key_without_a_near_match_lists_the_known_keys() -> None:
    err = config_error(route('listen = "127.0.0.1:1"\ntarget = "a:1"\nzzzzzz = 1'))
    assert err.hint is not None
    assert err.hint.startswith("known keys: listen, target,")


def test_lines_are_found_in_loosely_written_headers() -> None:
    text = '[identities.dev]\n\n[ routes . "api" ]\nlisten = "10.0.0.1:80"\ntarget = "a:1"\n'
    assert config_error(text).line == 4


def test_missing_required_keys_point_at_the_table() -> None:
    err = config_error(route('target = "a:1"'))
    assert (err.field, err.line, err.message) == ("routes.api.listen", 3, "required key is missing")
    assert err.hint == 'add listen = "127.0.0.1:8443"'
    err = config_error(route('listen = "127.0.0.1:1"'))
    assert (err.field, err.line) == ("routes.api.target", 3)


@pytest.mark.parametrize(
    ("body", "field", "value", "message"),
    [
        ("server_name = 8443", "routes.api.server_name", 8443, "expected a string, got an integer"),
        ('unsafe_listen = "yes"', "routes.api.unsafe_listen", "yes", "expected true or false, got a string"),
        ('alpn = "h2"', "routes.api.alpn", "h2", "expected an array of strings"),
        ('alpn = ["h2", ""]', "routes.api.alpn", "", "non-empty string"),
        ("alpn = [2]", "routes.api.alpn", 2, "non-empty string"),
        ("connect_timeout = true", "routes.api.connect_timeout", True, "expected a duration"),
        ('connect_timeout = "soon"', "routes.api.connect_timeout", "soon", "is not a duration"),
        ('connect_timeout = "0s"', "routes.api.connect_timeout", "0s", "longer than zero"),
        ("connect_timeout = nan", "routes.api.connect_timeout", None, "too long"),
        ('connect_timeout = "200000000w"', "routes.api.connect_timeout", "200000000w", "too long"),
        ("ca_file = 1979-05-27", "routes.api.ca_file", None, "expected a string, got a date"),
        ('ca_file = ""', "routes.api.ca_file", "", "expected a file path"),
        ('server_name = "not a name"', "routes.api.server_name", "not a name", "not a valid host name"),
    ],
)
def test_wrong_values_in_a_route(body: str, field: str, value: object, message: str) -> None:
    err = config_error(route(f'listen = "127.0.0.1:1"\ntarget = "a:1"\n{body}'))
    assert err.field == field
    assert err.line == 6
    if value is not None:
        assert err.value == value
    assert message in err.message


@pytest.mark.parametrize(
    ("text", "field", "line", "message"),
    [
        ("routes = 1\n", "routes", 1, "expected tables written as [routes.NAME], got an integer"),
        ("[[routes]]\nlisten = 1\n", "routes", 1, "got an array"),
        ('[identities]\ndev = "x"\n', "identities.dev", 2, "expected a table [identities.dev]"),
        ('[routes."bad name"]\n', 'routes."bad name"', 1, "invalid name"),
        ('[identities.".."]\n', 'identities.".."', 1, "invalid name"),
        ("\ndemo_service = 1\n", "demo_service", 2, "expected a table [demo_service]"),
        ('log_level = "loud"\n', "log_level", 1, "unknown log level"),
        ("\n\nshutdown_grace = -1\n", "shutdown_grace", 3, "cannot be negative"),
        ("keystore_dir = '~nosuchuser-xyz/keys'\n", "keystore_dir", 1, "cannot expand ~"),
    ],
)
def test_wrong_values_at_the_top(text: str, field: str, line: int, message: str) -> None:
    err = config_error(text)
    assert (err.field, err.line) == (field, line)
    assert message in err.message


@pytest.mark.parametrize(
    ("body", "field", "message", "value"),
    [
        ('renew = "vault"', "renew", "unknown renewal provider", "vault"),
        ('subject = "XX=dev"', "subject", "not an RFC 4514 distinguished name", "XX=dev"),
        ('subject = ""', "subject", "empty subject", ""),
        ('lifetime = "0s"', "lifetime", "longer than zero", "0s"),
        ('key_password_env = "hunter2!"', "key_password_env", "not an environment variable", None),
    ],
)
def test_wrong_values_in_an_identity(body: str, field: str, message: str, value: object) -> None:
    err = config_error(f"# 1\n[identities.dev]\n{body}\n")
    assert (err.field, err.line, err.value) == (f"identities.dev.{field}", 3, value)
    assert message in err.message


def test_password_like_env_values_are_never_echoed() -> None:
    err = config_error('[identities.dev]\npkcs12_password_env = "s3cr3t pass"\n')
    assert "s3cr3t" not in str(err)


def test_renew_provider_error_lists_the_valid_ones() -> None:
    err = config_error('[identities.dev]\nrenew = "vault"\n')
    assert err.hint == "use one of: local-ca, acme, command, step-ca, none"


# --- loopback, identities, clashes -------------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:8443", "192.168.1.10:8443", "[::]:80", "h.test:1"])
def test_non_loopback_listen_is_refused(listen: str) -> None:
    err = config_error(route(f'listen = "{listen}"\ntarget = "a:1"'))
    assert (err.field, err.value, err.line) == ("routes.api.listen", listen, 4)
    assert "not a loopback address" in err.message
    assert err.hint is not None
    for advice in ("127.0.0.1:PORT", "[::1]:PORT", "unix:/path", "unsafe_listen = true"):
        assert advice in err.hint


def test_non_loopback_listen_is_allowed_with_unsafe_listen() -> None:
    config = parse_config(route('listen = "0.0.0.0:8443"\ntarget = "a:1"\nunsafe_listen = true'))
    assert config.routes["api"].listen == ListenAddress("tcp", "0.0.0.0", 8443)
    assert config.routes["api"].unsafe_listen


def test_route_identity_must_be_configured() -> None:
    text = (
        'active_identity = "dev"\n[identities.dev]\n[identities.ci]\n\n[routes.api]\n'
        'listen = "127.0.0.1:1"\ntarget = "a:1"\nidentity = "prod"\n'
    )
    err = config_error(text)
    assert (err.field, err.value, err.line) == ("routes.api.identity", "prod", 8)
    assert err.message == "unknown identity"
    assert err.hint == "known: dev, ci"


def test_active_identity_must_be_configured() -> None:
    err = config_error('active_identity = "prod"\n[identities.dev]\n')
    assert (err.field, err.value, err.line, err.hint) == ("active_identity", "prod", 1, "known: dev")
    err = config_error('active_identity = "prod"\n')
    assert err.hint == "known: none configured"


def test_active_identity_is_required_with_several_identities() -> None:
    err = config_error("[identities.dev]\n[identities.ci]\n")
    assert err.field == "active_identity"
    assert "required when more than one identity" in err.message
    assert err.hint == "set it to one of: dev, ci"


def test_routes_without_identities_are_an_error() -> None:
    err = config_error('[routes.api]\nlisten = "127.0.0.1:1"\ntarget = "a:1"\n')
    assert (err.field, err.line) == ("routes.api", 1)
    assert "none is configured" in err.message


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("127.0.0.1:8443", "127.0.0.1:8443"),
        ("localhost:8443", "127.0.0.1:8443"),
        ("[::1]:8443", "localhost:8443"),
        ("[::1]:8443", "[0:0:0:0:0:0:0:1]:8443"),
        ("0.0.0.0:8443", "127.0.0.1:8443"),
        ("unix:/run/a.sock", "unix:/run//a.sock"),
    ],
)
def test_route_clash(first: str, second: str) -> None:
    text = (
        f'[identities.dev]\n[routes.one]\nlisten = "{first}"\ntarget = "a:1"\n'
        f'unsafe_listen = true\n\n[routes.two]\nlisten = "{second}"\ntarget = "b:2"\n'
        "unsafe_listen = true\n"
    )
    err = config_error(text)
    assert err.message.startswith("route clash: route two and route one both listen on")
    assert (err.field, err.line) == ("routes.two.listen", 8)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("127.0.0.1:0", "127.0.0.1:0"),
        ("127.0.0.1:8443", "127.0.0.2:8443"),
        ("127.0.0.1:8443", "[::1]:8443"),
        ("[::]:8443", "127.0.0.1:8443"),
        ("127.0.0.1:8443", "127.0.0.1:8444"),
        ("unix:/run/a.sock", "unix:/run/b.sock"),
    ],
)
def test_distinct_listeners_do_not_clash(first: str, second: str) -> None:
    text = (
        f'[identities.dev]\n[routes.one]\nlisten = "{first}"\ntarget = "a:1"\n'
        f'unsafe_listen = true\n[routes.two]\nlisten = "{second}"\ntarget = "b:2"\n'
        "unsafe_listen = true\n"
    )
    assert list(parse_config(text).routes) == ["one", "two"]


def test_route_clash_with_the_demo_service() -> None:
    body = 'listen = "127.0.0.1:18443"\ntarget = "a:1"'
    text = route(body, extra="[demo_service]\nenabled = true\n")
    err = config_error(text)
    assert "route api and the demo service both listen on 127.0.0.1:18443" in err.message
    text = route(body, extra="[demo_service]\n")
    assert parse_config(text).routes["api"].listen.port == 18443


@pytest.mark.parametrize("listen", ["10.0.0.1:80", "unix:/run/demo.sock"])
def test_demo_service_listens_on_loopback_tcp_only(listen: str) -> None:
    err = config_error(f'[demo_service]\nenabled = true\nlisten = "{listen}"\n')
    assert (err.field, err.value, err.line) == ("demo_service.listen", listen, 3)


# --- paths -------------------------------------------------------------------------------


def test_relative_paths_resolve_against_base_dir(tmp_path: Path) -> None:
    text = (
        'keystore_dir = "keys"\n[identities.dev]\nissuer_ca_file = "ca/issuer.pem"\n'
        '[routes.api]\nlisten = "unix:/run/a.sock"\ntarget = "a:1"\nca_file = "../ca.pem"\n'
        'ca_dir = "/abs/certs"\n'
    )
    config = parse_config(text, base_dir=tmp_path)
    assert config.keystore_dir == tmp_path / "keys"
    assert config.identities["dev"].issuer_ca_file == tmp_path / "ca" / "issuer.pem"
    assert config.routes["api"].ca_file == tmp_path / "../ca.pem"
    assert config.routes["api"].ca_dir == Path("/abs/certs")
    assert parse_config(text).keystore_dir == Path("keys")


def test_home_is_expanded_in_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", "/home/tester")
    config = parse_config('keystore_dir = "~/keys"\n', base_dir=tmp_path)
    assert config.keystore_dir == Path("/home/tester/keys")


def test_relative_unix_listen_is_refused_even_with_base_dir(tmp_path: Path) -> None:
    err = config_error(route('listen = "unix:run/a.sock"\ntarget = "a:1"'), base_dir=tmp_path)
    assert "must be absolute" in err.message
    assert err.line == 4


def test_load_config_reads_the_file_and_resolves_against_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(route('listen = "127.0.0.1:1"\ntarget = "a:1"\nca_file = "ca.pem"'), encoding="utf-8")
    config = load_config(path)
    assert config.source == str(path)
    assert config.routes["api"].ca_file == tmp_path / "ca.pem"


def test_load_config_names_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert str(path) in str(info.value)
    assert "cannot read the config file" in info.value.message


def test_load_config_reports_non_utf8_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b'log_level = "info"\n# caf\xe9\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.line, info.value.source) == (2, str(path))


# --- first run ---------------------------------------------------------------------------


def test_default_config_text_parses_and_yields_the_demo_route() -> None:
    ca = Path("/home/ann/.local/share/mtls-sidecar/ca/ca.pem")
    text = default_config_text(user="ann", ca_file=ca, route_port=8080, demo_port=18443)
    config = parse_config(text)

    assert config.active_identity == "ann"
    assert config.identities["ann"] == IdentitySpec(name="ann", subject="CN=ann")
    assert config.identities["ann"].renew == "local-ca"
    assert config.demo_service == DemoServiceSpec(True, ListenAddress("tcp", "127.0.0.1", 18443))
    assert list(config.routes) == ["demo"]
    demo = config.routes["demo"]
    assert demo.listen == ListenAddress("tcp", "127.0.0.1", 8080)
    assert (demo.target_host, demo.target_port, demo.ca_file) == ("127.0.0.1", 18443, ca)
    assert "# [routes.api]" in text
    assert text.count("\n#") > 10


@pytest.mark.parametrize(
    ("user", "name"),
    [
        ("john.doe", "john.doe"),
        ("CORP\\Jane Doe", "CORP-Jane-Doe"),
        ("", "dev"),
        ("..", "dev"),
        ("josé", "jos"),
        ("Zoë Ann", "Zo-Ann"),
    ],
)
def test_default_config_text_sanitizes_the_user_name(user: str, name: str) -> None:
    text = default_config_text(user=user, ca_file=Path("/ca.pem"), route_port=1, demo_port=2)
    config = parse_config(text)
    assert config.active_identity == name
    assert config.identities[name].subject == f"CN={name}"


def test_default_config_text_escapes_the_ca_path() -> None:
    ca = Path('/tmp/we"ird\\dir\tx/ca.pem')
    text = default_config_text(user="a", ca_file=ca, route_port=1, demo_port=2)
    assert parse_config(text).routes["demo"].ca_file == ca


# --- fuzzing -----------------------------------------------------------------------------


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_random_text_raises_only_config_error(text: str) -> None:
    try:
        assert isinstance(parse_config(text), Config)
    except ConfigError as exc:
        assert exc.source == "<string>"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


_SCALARS = st.one_of(
    st.text(max_size=30),
    st.integers(),
    st.booleans(),
    st.floats(),
    st.sampled_from(
        ["127.0.0.1:8443", "[::1]:0", "unix:/r.sock", "a.test:443", "10s", "7d", "dev", "CN=x", "~/x", "0.0.0.0:1"]
    ),
)
_VALUES = st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3))
_ROUTE_KEYS = st.sampled_from(
    [
        "listen",
        "target",
        "server_name",
        "ca_file",
        "ca_dir",
        "identity",
        "alpn",
        "connect_timeout",
        "unsafe_listen",
        "unsafe_skip_verify",
        "pin_sha256",
        "allowed_uri_sans",
        "revocation",
        "crl_file",
        "lisen",
    ]
)
_IDENTITY_KEYS = st.sampled_from(
    [
        "renew",
        "subject",
        "lifetime",
        "pkcs12_password_env",
        "key_password_env",
        "pkcs12_password_keyring",
        "key_password_keyring",
        "issuer_ca_file",
        "renew_at",
        "renew_before",
        "prune_after",
    ]
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(_IDENTITY_KEYS, _VALUES, max_size=4),
    st.dictionaries(_ROUTE_KEYS, _VALUES, max_size=6),
    st.dictionaries(
        st.sampled_from(["log_level", "shutdown_grace", "keystore_dir", "active_identity"]), _VALUES, max_size=2
    ),
)
def test_random_values_raise_only_config_error(
    identity: dict[str, object], route_keys: dict[str, object], top: dict[str, object]
) -> None:
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    lines += ["[identities.dev]"] + [f"{k} = {_toml_value(v)}" for k, v in identity.items()]
    lines += ["[routes.api]"] + [f"{k} = {_toml_value(v)}" for k, v in route_keys.items()]
    try:
        parse_config("\n".join(lines), base_dir=Path("/etc/sidecar"))
    except ConfigError as exc:
        assert exc.field is None or exc.line is not None


# --- [proxy] and [[proxy.rules]] -------------------------------------------------------------

# [proxy] on line 5, its listen on line 6
PROXY_HEAD = 'active_identity = "dev"\n[identities.dev]\n[identities.ops]\n\n[proxy]\nlisten = "127.0.0.1:3128"\n'


def proxy_rules(*bodies: str, head: str = PROXY_HEAD) -> str:
    """The [proxy] head, then one [[proxy.rules]] per body, each after a blank line."""
    return head + "".join(f"\n[[proxy.rules]]\n{body}\n" for body in bodies)


def test_proxy_defaults_off_without_rules() -> None:
    for text in (
        "[identities.dev]\n",
        "[identities.dev]\n[proxy]\n",
        '[identities.dev]\n[proxy]\nlisten = "127.0.0.1:3128"\n',
    ):
        proxy = parse_config(text, source="config.toml").proxy
        assert proxy.rules == () and proxy.enabled is False
    proxy = parse_config("[identities.dev]\n", source="config.toml").proxy
    assert proxy.listen == ListenAddress("tcp", "127.0.0.1", 18888)
    assert (proxy.unsafe_listen, proxy.max_connections) == (False, 1000)


def test_proxy_rules_parse_with_their_defaults() -> None:
    text = proxy_rules(
        'hosts = ["*.corp.example", "db.example.net", "10.20.0.0/16", "[::1]"]',
        'name = "db"\nhosts = ["db.example.net"]\nports = [5432, 443]\nidentity = "ops"\nprotocol = "postgres"\n'
        'tls_port = 8443\nconnect = "127.0.0.1:15432"\nca_file = "ca.pem"\nconnect_timeout = "2s"\n'
        'max_connections = 5\nidle_timeout = "1m"\npostgres_negotiation = "direct"',
        'hosts = ["legacy.example"]\npassthrough = true',
    )
    proxy = parse_config(text, source="config.toml", base_dir=Path("/cfg")).proxy
    assert proxy.enabled and proxy.listen == ListenAddress("tcp", "127.0.0.1", 3128)
    first, db, legacy = proxy.rules
    assert first.name == "*.corp.example"  # an unnamed rule is called after its first host
    assert [p.text for p in first.hosts] == ["*.corp.example", "db.example.net", "10.20.0.0/16", "[::1]"]
    assert (first.ports, first.identity, first.protocol, first.tls_port, first.connect) == ((), None, None, 443, None)
    assert (first.passthrough, first.ca_file, first.connect_timeout) == (False, None, DEFAULT_CONNECT_TIMEOUT)
    assert db.name == "db" and db.ports == (5432, 443) and db.identity == "ops"
    assert (db.protocol, db.tls_port, db.connect) == ("postgres", 8443, ("127.0.0.1", 15432))
    assert db.ca_file == Path("/cfg/ca.pem")
    assert (db.connect_timeout, db.max_connections, db.idle_timeout) == (2.0, 5, 60.0)
    assert (db.postgres_negotiation, db.alpn) == ("direct", ("postgresql",))
    assert legacy.passthrough is True


def test_proxy_listen_may_leave_loopback_only_with_unsafe_listen() -> None:
    text = proxy_rules('hosts = ["a.example"]', head='[identities.dev]\n\n[proxy]\nlisten = "0.0.0.0:3128"\n')
    err = config_error(text)
    assert (err.field, err.line, err.value, err.message) == (
        "proxy.listen",
        4,
        "0.0.0.0:3128",
        "not a loopback address",
    )
    assert err.hint is not None and "unsafe_listen = true in [proxy]" in err.hint
    assert "unix:" not in err.hint  # the proxy listens on TCP only: no hint that it could do otherwise
    allowed = parse_config(text.replace("[proxy]\n", "[proxy]\nunsafe_listen = true\n"), source="config.toml")
    assert allowed.proxy.listen == ListenAddress("tcp", "0.0.0.0", 3128) and allowed.proxy.unsafe_listen


def test_proxy_listens_on_tcp_only() -> None:
    err = config_error(proxy_rules('hosts = ["a.example"]').replace("127.0.0.1:3128", "unix:/run/p.sock"))
    assert (err.field, err.line, err.message) == ("proxy.listen", 6, "the proxy listens on TCP only")
    assert err.hint == 'for example "127.0.0.1:18888"'


@pytest.mark.parametrize(
    ("bodies", "field", "line", "value", "message"),
    [
        # errors in the second [[proxy.rules]] name it and point at its own lines
        (('hosts = ["a.example"]', 'hosts = ["*.com"]'), "proxy.rules[1].hosts", 12,
         "*.com", "a wildcard is '*.' before a name of two labels or more"),
        (('hosts = ["a.example"]', 'hosts = ["a.example", "bad name"]'), "proxy.rules[1].hosts", 12,
         "bad name", "not a valid host name"),
        (('hosts = ["10.0.0.0/33"]',), "proxy.rules[0].hosts", 9, "10.0.0.0/33", "not a CIDR block"),
        (('hosts = ["a.example"]', "hosts = []"), "proxy.rules[1].hosts", 12, None, "a rule needs at least one host"),
        (('hosts = ["a.example"]', 'name = "n"'), "proxy.rules[1].hosts", 11, None, "a rule needs at least one host"),
        (('hosts = "a.example"',), "proxy.rules[0].hosts", 9, "a.example", "expected an array of strings"),
        (('hosts = ["a.example"]\nports = [0]',), "proxy.rules[0].ports", 10, 0, "each port must be a number 1-65535"),
        (('hosts = ["a.example"]\nports = [443, 70000]',), "proxy.rules[0].ports", 10, 70000, "1-65535"),
        (('hosts = ["a.example"]\nports = ["443"]',), "proxy.rules[0].ports", 10, "443", "1-65535"),
        (('hosts = ["a.example"]\nports = [true]',), "proxy.rules[0].ports", 10, True, "1-65535"),
        (('hosts = ["a.example"]\nports = 443',), "proxy.rules[0].ports", 10, 443, "expected an array of port numbers"),
        (('hosts = ["a.example"]\ntls_port = 0',), "proxy.rules[0].tls_port", 10, 0, "port number 1-65535"),
        (('hosts = ["a.example"]\nidentity = "prod"',), "proxy.rules[0].identity", 10, "prod", "unknown identity"),
        (('hosts = ["a.example"]\nprotocol = "ftp"',), "proxy.rules[0].protocol", 10, "ftp", "unknown protocol"),
        (('hosts = ["a.example"]\nconnect = "nohost"',), "proxy.rules[0].connect", 10, "nohost", "missing port"),
        (('hosts = ["a.example"]\npostgres_negotiation = "direct"',), "proxy.rules[0].postgres_negotiation", 10,
         "direct", 'only used with protocol = "postgres"'),
        (('hosts = ["a.example"]\ncrl_file = "x.crl"',), "proxy.rules[0].crl_file", 10, "x.crl",
         "only read when revocation checking is on"),
        (('hosts = ["a.example"]\npassthrough = "yes"',), "proxy.rules[0].passthrough", 10, "yes", "true or false"),
    ],
)  # fmt: skip
def test_wrong_values_in_proxy_rules(
    bodies: tuple[str, ...], field: str, line: int, value: object, message: str
) -> None:
    err = config_error(proxy_rules(*bodies))
    assert (err.field, err.line) == (field, line)
    if value is not None:
        assert err.value == value
    assert message in err.message
    assert str(err).startswith(f"config.toml:{line}: {field}")


def test_a_bad_host_pattern_says_what_a_host_may_be() -> None:
    err = config_error(proxy_rules('hosts = ["a.*.example"]'))
    assert err.hint is not None and err.hint.startswith('each entry is a DNS name ("db.example.net"), a wildcard')
    assert "known: dev, ops" in config_error(proxy_rules('hosts = ["a"]\nidentity = "x"')).hint  # type: ignore[operator]


@pytest.mark.parametrize(
    ("text", "field", "line", "hint"),
    [
        (PROXY_HEAD + "listn = 1\n", "proxy.listn", 7, 'did you mean "listen"?'),
        (proxy_rules('hosts = ["a.example"]\nport = [443]'), "proxy.rules[0].port", 10, 'did you mean "ports"?'),
        (proxy_rules('hosts = ["a"]', 'hosts = ["b"]\nhost = "x"'), "proxy.rules[1].host", 13, 'did you mean "hosts"?'),
    ],
)
def test_unknown_keys_in_the_proxy(text: str, field: str, line: int, hint: str) -> None:
    err = config_error(text)
    assert (err.message, err.field, err.line, err.hint) == ("unknown key", field, line, hint)


@pytest.mark.parametrize("key", ['listen = "127.0.0.1:1"', 'target = "a:1"', 'host_header = "x"', "local_tls = true"])
def test_route_keys_a_rule_has_not(key: str) -> None:
    err = config_error(proxy_rules(f'hosts = ["a.example"]\n{key}'))
    assert err.message == "unknown key" and err.line == 10
    assert err.hint is not None and err.hint.startswith("known keys: name, hosts, ports,")


@pytest.mark.parametrize(
    ("text", "field", "line", "message"),
    [
        ("[identities.dev]\nproxy = 1\n", "identities.dev.proxy", 2, "unknown key"),
        ("proxy = 1\n", "proxy", 1, "expected a table [proxy], got an integer"),
        ("[proxy]\nrules = 1\n", "proxy.rules", 2, "expected tables written as [[proxy.rules]], got an integer"),
        ("[proxy]\nmax_connections = 0\n", "proxy.max_connections", 2, "whole number from 1 to 1000000"),
    ],
)
def test_wrong_shapes_of_the_proxy(text: str, field: str, line: int, message: str) -> None:
    err = config_error(text)
    assert (err.field, err.line) == (field, line)
    assert message in err.message


def test_two_rules_with_one_name_are_refused_at_the_second() -> None:
    err = config_error(proxy_rules('name = "corp"\nhosts = ["a.example"]', 'name = "corp"\nhosts = ["b.example"]'))
    assert (err.field, err.line, err.value) == ("proxy.rules[1].name", 13, "corp")
    assert err.message == "two rules are named corp"
    assert err.hint == "give each rule its own name"


def test_unnamed_rules_with_one_first_host_are_numbered() -> None:
    text = proxy_rules('hosts = ["a.example"]', 'hosts = ["a.example", "b.example"]', 'hosts = ["c.example"]')
    names = [rule.name for rule in parse_config(text, source="config.toml").proxy.rules]
    assert names == ["a.example", "a.example (2)", "c.example"]
    text = proxy_rules('hosts = ["a.example"]', 'hosts = ["b.example"]', 'hosts = ["a.example"]')
    assert [r.name for r in parse_config(text, source="config.toml").proxy.rules][2] == "a.example (3)"


@pytest.mark.parametrize(
    ("head", "connect", "extra", "owner"),
    [
        (PROXY_HEAD, "127.0.0.1:3128", "", "the proxy's listen address (127.0.0.1:3128)"),
        (PROXY_HEAD, "localhost:3128", "", "the proxy's listen address (127.0.0.1:3128)"),
        (PROXY_HEAD.replace("127.0.0.1:3128", "[::1]:3128"), "[::1]:3128", "",
         "the proxy's listen address ([::1]:3128)"),
        ('active_identity = "dev"\n[identities.dev]\n[identities.ops]\n\n[proxy]\n\n', "127.0.0.1:18888", "",
         "the proxy's listen address (127.0.0.1:18888)"),
        (PROXY_HEAD, "127.0.0.1:8443", '[routes.api]\nlisten = "127.0.0.1:8443"\ntarget = "a.example:443"\n',
         "route api's listen address (127.0.0.1:8443)"),
    ],
)  # fmt: skip
def test_connect_to_one_of_our_own_listeners_is_refused(head: str, connect: str, extra: str, owner: str) -> None:
    text = proxy_rules('hosts = ["a.example"]', f'hosts = ["b.example"]\nconnect = "{connect}"', head=head) + extra
    err = config_error(text)
    assert (err.field, err.line, err.value) == ("proxy.rules[1].connect", 13, connect)
    assert err.message == f"connect is {owner}: the sidecar would tunnel into itself"
    assert err.hint == "point connect at the remote service's TLS address"


def test_connect_to_another_port_or_the_demo_service_is_fine() -> None:
    text = proxy_rules(
        'hosts = ["a.example"]\nconnect = "127.0.0.1:18443"', 'hosts = ["b"]\nconnect = "127.0.0.1:18888"'
    )
    config = parse_config(text + "\n[demo_service]\nenabled = true\n", source="config.toml")
    assert [rule.connect for rule in config.proxy.rules] == [("127.0.0.1", 18443), ("127.0.0.1", 18888)]


def test_an_ipv6_target_on_our_own_listener_is_shown_as_written() -> None:
    text = '[identities.dev]\n[routes.api]\nlisten = "[::1]:8443"\ntarget = "[::1]:8443"\n'
    assert config_error(text).value == "[::1]:8443"


def test_a_routes_target_on_the_proxys_listen_address_is_refused() -> None:
    text = proxy_rules('hosts = ["a.example"]') + '\n[routes.api]\nlisten = "127.0.0.1:1"\ntarget = "127.0.0.1:3128"\n'
    err = config_error(text)
    assert (err.field, err.line) == ("routes.api.target", 13)
    assert "the proxy's listen address (127.0.0.1:3128): the sidecar would tunnel into itself" in err.message


def test_the_proxys_listen_clashing_with_a_route() -> None:
    text = proxy_rules('hosts = ["a.example"]') + '\n[routes.api]\nlisten = "127.0.0.1:3128"\ntarget = "a:1"\n'
    err = config_error(text)
    assert (err.field, err.line, err.value) == ("routes.api.listen", 12, "127.0.0.1:3128")
    assert err.message == "route clash: route api and the proxy both listen on 127.0.0.1:3128"


def test_the_proxys_listen_clashing_with_the_demo_service() -> None:
    demo = '\n[demo_service]\nenabled = true\nlisten = "127.0.0.1:3128"\n'
    err = config_error(proxy_rules('hosts = ["a.example"]') + demo)
    assert (err.field, err.line, err.value) == ("proxy.listen", 6, "127.0.0.1:3128")
    assert err.message == "the proxy and the demo service both listen on 127.0.0.1:3128"
    assert err.hint == "give each its own port"
    # the proxy's listen not written: the demo's is, and the error points there
    text = '[identities.dev]\n\n[[proxy.rules]]\nhosts = ["a.example"]\n' + demo.replace("3128", "18888")
    err = config_error(text)
    assert (err.field, err.line, err.value) == ("demo_service.listen", 8, "127.0.0.1:18888")


def test_a_proxy_without_rules_takes_no_port() -> None:
    """Off, it clashes with nothing: a route may use the address the proxy would have."""
    text = PROXY_HEAD + '\n[routes.api]\nlisten = "127.0.0.1:3128"\ntarget = "a:1"\n'
    assert parse_config(text, source="config.toml").routes["api"].listen.port == 3128
