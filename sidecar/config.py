"""TOML text → frozen specs (identities, routes, settings).

Pure apart from expanding `~` in paths: no files, sockets or clocks. Every error is a
`ConfigError` that names the source, the line when it can be found, the dotted field, the bad
value and what would be valid.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sidecar.errors import ConfigError
from sidecar.hostport import host_port
from sidecar.policyspec import (
    PIN_HINT,
    REVOCATION_MODES,
    ServerAllowList,
    check_name_value,
    check_uri_pattern,
    parse_dns_san,
    parse_ip_san,
    parse_pin,
)
from sidecar.proxy.hosts import PATTERN_RULE, HostPattern, parse_host_pattern
from sidecar.renewal.settings import (
    PROVIDER_KEYS,
    PROVIDERS,
    TIMING_KEYS,
    LocalCASettings,
    ProviderSettings,
    parse_provider,
    parse_timing,
)
from sidecar.renewal.timing import RenewalPolicy
from sidecar.tablereader import Document, Table, toml_key, toml_string
from sidecar.upstreamproxy import ProxyURLError, parse_proxy_url

DEFAULT_LIFETIME = 7 * 86400.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_SHUTDOWN_GRACE = 5.0
# A warm connection is dropped after this long unused: below servers' idle timeouts (PostgreSQL
# ends a connection with no startup packet after 60 s, nginx's keepalive is 75 s).
DEFAULT_PRECONNECT_MAX_IDLE = 20.0
# How long before expiry a certificate that will not be renewed in time is warned about
# (never more than a third of its lifetime: sidecar/expiry.py).
DEFAULT_EXPIRY_WARNING = 7 * 86400.0
RENEW_PROVIDERS = tuple(PROVIDERS)  # local-ca, acme, command, step-ca, none
LOG_LEVELS = ("debug", "info", "warning", "error")
# How the control API is reached: a 0600 Unix socket, or a loopback port with a token in control.json.
CONTROL_TRANSPORTS = ("unix", "tcp")
DEFAULT_CONTROL = "tcp" if sys.platform == "win32" else "unix"  # asyncio has no Unix sockets on Windows
# Open tunnels at most, per route and over all routes: far above a laptop's normal use, low
# enough that a runaway client (or a loop) meets them before the process runs out of descriptors.
DEFAULT_ROUTE_MAX_CONNECTIONS = 1000
DEFAULT_MAX_CONNECTIONS = 4096

_TOP_KEYS = ("active_identity", "log_level", "shutdown_grace", "keystore_dir", "expiry_warning",
             "max_connections", "control", "metrics_listen", "metrics_unsafe_listen",
             "demo_service", "identities", "routes", "proxy")  # fmt: skip
_IDENTITY_KEYS = ("renew", "subject", "lifetime", "pkcs12_password_env", "key_password_env",
                  "pkcs12_password_keyring", "key_password_keyring",
                  "issuer_ca_file", *TIMING_KEYS, *PROVIDER_KEYS)  # fmt: skip
ROUTE_KEYS = ("listen", "target", "server_name", "ca_file", "ca_dir", "identity", "alpn",
               "connect_timeout", "unsafe_listen", "unsafe_skip_verify",
               "pin_sha256", "allowed_uri_sans", "allowed_common_names", "allowed_ous",
               "allowed_dns_sans", "allowed_ip_sans", "revocation", "crl_file",
               "protocol", "postgres_negotiation", "local_tls", "host_header",
               "max_connections", "idle_timeout", "preconnect", "preconnect_max_idle",
               "upstream_proxy", "upstream_proxy_auth_env")  # fmt: skip
# What a route's local client speaks (sidecar/protocols/): how its bytes become an mTLS conversation.
PROTOCOLS = ("tcp", "postgres", "mysql", "http")
POSTGRES_NEGOTIATIONS = ("sslrequest", "direct")
_DEMO_KEYS = ("enabled", "listen")
_PROXY_KEYS = ("listen", "unsafe_listen", "max_connections", "rules")
# A proxy rule takes every server-verification key of a route; it has no listen or target of its
# own (the client names the destination) and no local_tls or host_header (the destination decides).
PROXY_RULE_KEYS = ("name", "hosts", "ports", "identity", "protocol", "tls_port", "connect", "passthrough",
                   "ca_file", "ca_dir", "alpn", "connect_timeout", "unsafe_skip_verify", "pin_sha256",
                   "allowed_uri_sans", "allowed_common_names", "allowed_ous", "allowed_dns_sans",
                   "allowed_ip_sans", "revocation", "crl_file", "postgres_negotiation",
                   "max_connections", "idle_timeout", "preconnect", "preconnect_max_idle",
                   "upstream_proxy", "upstream_proxy_auth_env")  # fmt: skip
DEFAULT_PROXY_LISTEN = "127.0.0.1:18888"

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_TOML_WHERE = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_LOOPBACK_HINT = "use 127.0.0.1:PORT, [::1]:PORT or unix:/path, or set unsafe_listen = true on this route"


@dataclass(frozen=True)
class ListenAddress:
    """Where a route listens: a TCP host and port, or a Unix socket path."""

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return host_port(self.host, self.port)

    @property
    def is_loopback(self) -> bool:
        if self.kind == "unix" or self.host.lower() == "localhost":
            return True
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return ip.ipv4_mapped.is_loopback
        return ip.is_loopback


@dataclass(frozen=True)
class IdentitySpec:
    """One identity as configured: how its credentials are read, and when and by whom it is renewed."""

    name: str
    subject: str = ""
    lifetime: float = DEFAULT_LIFETIME
    pkcs12_password_env: str | None = None
    key_password_env: str | None = None
    # (service, username) in the OS keyring, for the optional `keyring` extra
    pkcs12_password_keyring: tuple[str, str] | None = None
    key_password_keyring: tuple[str, str] | None = None
    issuer_ca_file: Path | None = None
    timing: RenewalPolicy = field(default_factory=RenewalPolicy)  # renew_at / renew_before, prune_after
    provider: ProviderSettings | None = field(default_factory=LocalCASettings)  # None: renew = "none"

    @property
    def renew(self) -> str:
        """The provider's name as written in `renew`: local-ca, acme, command, step-ca or none."""
        return self.provider.name if self.provider is not None else "none"


@dataclass(frozen=True)
class RouteSpec:
    name: str
    listen: ListenAddress
    target_host: str
    target_port: int
    server_name: str
    ca_file: Path | None = None
    ca_dir: Path | None = None
    identity: str | None = None
    alpn: tuple[str, ...] = ()
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    unsafe_listen: bool = False
    unsafe_skip_verify: bool = False
    pin_sha256: tuple[str, ...] = ()
    allowed_uri_sans: tuple[str, ...] = ()
    # the rest of the server allow-list (sidecar/policy.py): any one entry of any list lets the server in
    allowed_common_names: tuple[str, ...] = ()
    allowed_ous: tuple[str, ...] = ()
    allowed_dns_sans: tuple[str, ...] = ()
    allowed_ip_sans: tuple[str, ...] = ()
    revocation: str = "off"
    crl_file: Path | None = None
    protocol: str = "tcp"
    # postgres: "sslrequest" (SSLRequest, then TLS) or "direct" (PostgreSQL 17+: TLS at once, ALPN postgresql)
    postgres_negotiation: str = "sslrequest"
    # postgres, mysql: speak TLS to the local client too, with a dev-CA certificate for localhost
    local_tls: bool = False
    # http: the Host every request gets (default: server_name, with :port unless it is 443)
    host_header: str | None = None
    # open tunnels at most; the next one is refused (cause too_many_connections)
    max_connections: int = DEFAULT_ROUTE_MAX_CONNECTIONS
    # seconds with no byte either way before a tunnel is closed; 0: never
    idle_timeout: float = 0.0
    # proxy rules only (`passthrough = true`): no TLS of ours, the client's bytes pass as they are
    passthrough: bool = False
    # `preconnect`: warm connections kept ready (a number, or "auto"), each used within this many seconds
    preconnect: int | str = 0
    preconnect_max_idle: float = DEFAULT_PRECONNECT_MAX_IDLE
    # reach the target through this HTTP CONNECT or SOCKS5 proxy (sidecar/upstreamproxy.py), with
    # "user:password" from the environment variable named by upstream_proxy_auth_env
    upstream_proxy: str | None = None
    upstream_proxy_auth_env: str | None = None
    # once one side has finished sending, close the tunnel this many seconds later if the other has
    # not finished too (ghostunnel's --close-timeout; `tunnel` only); None: a half-close may last
    close_timeout: float | None = None
    # present no client certificate (`tunnel --disable-authentication`): TLS for a server that needs none
    client_auth: bool = True

    @property
    def target(self) -> str:
        """The target as people write it: host:port, [v6]:port."""
        return host_port(self.target_host, self.target_port)

    @property
    def server_allow_list(self) -> ServerAllowList:
        """The allow-list's five keys as one (empty: any server the handshake accepted)."""
        return ServerAllowList(
            common_names=self.allowed_common_names,
            ous=self.allowed_ous,
            dns_sans=self.allowed_dns_sans,
            ip_sans=self.allowed_ip_sans,
            uri_sans=self.allowed_uri_sans,
        )

    @property
    def checks_after_handshake(self) -> bool:
        """Pins, the allow-list or revocation: checks the tunnel runs before it forwards a byte."""
        allow_list = (self.allowed_uri_sans, self.allowed_common_names, self.allowed_ous, self.allowed_dns_sans,
                      self.allowed_ip_sans)  # fmt: skip
        return bool(self.pin_sha256 or any(allow_list) or self.revocation != "off")


@dataclass(frozen=True)
class ProxyRuleSpec:
    """One `[[proxy.rules]]`: which destinations it covers and how they are reached.

    `protocol` None: `http` for the HTTP proxy's requests, `tcp` for CONNECT and SOCKS.
    """

    name: str
    hosts: tuple[HostPattern, ...]
    ports: tuple[int, ...] = ()  # empty: any port
    identity: str | None = None
    protocol: str | None = None
    tls_port: int = 443  # where TLS goes for a plain http:// request with no port
    connect: tuple[str, int] | None = None  # dial this instead of the destination
    passthrough: bool = False  # bytes pass untouched: the client does its own TLS, we add no certificate
    ca_file: Path | None = None
    ca_dir: Path | None = None
    alpn: tuple[str, ...] = ()
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    unsafe_skip_verify: bool = False
    pin_sha256: tuple[str, ...] = ()
    allowed_uri_sans: tuple[str, ...] = ()
    allowed_common_names: tuple[str, ...] = ()
    allowed_ous: tuple[str, ...] = ()
    allowed_dns_sans: tuple[str, ...] = ()
    allowed_ip_sans: tuple[str, ...] = ()
    revocation: str = "off"
    crl_file: Path | None = None
    postgres_negotiation: str = "sslrequest"
    max_connections: int = DEFAULT_ROUTE_MAX_CONNECTIONS
    idle_timeout: float = 0.0
    # warm connections per destination reached (a number, or "auto")
    preconnect: int | str = 0
    preconnect_max_idle: float = DEFAULT_PRECONNECT_MAX_IDLE
    # the destinations of this rule are reached through an upstream proxy, as a route's are
    upstream_proxy: str | None = None
    upstream_proxy_auth_env: str | None = None


@dataclass(frozen=True)
class ProxySpec:
    """`[proxy]`: one local port for every destination a rule names. Off until a rule exists."""

    listen: ListenAddress = ListenAddress("tcp", "127.0.0.1", 18888)
    unsafe_listen: bool = False
    max_connections: int = DEFAULT_ROUTE_MAX_CONNECTIONS
    rules: tuple[ProxyRuleSpec, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.rules)


@dataclass(frozen=True)
class DemoServiceSpec:
    enabled: bool = False
    listen: ListenAddress = ListenAddress("tcp", "127.0.0.1", 18443)


@dataclass(frozen=True)
class Config:
    source: str
    active_identity: str
    identities: Mapping[str, IdentitySpec]
    routes: Mapping[str, RouteSpec]
    demo_service: DemoServiceSpec
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    log_level: str = "info"
    keystore_dir: Path | None = None
    expiry_warning: float = DEFAULT_EXPIRY_WARNING  # seconds
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # open tunnels over all routes
    proxy: ProxySpec = field(default_factory=ProxySpec)
    control: str = DEFAULT_CONTROL  # "unix" or "tcp"
    # Prometheus text over plain HTTP (GET /metrics) for a local scraper; None: not served.
    metrics_listen: ListenAddress | None = None
    metrics_unsafe_listen: bool = False  # metrics_listen may be a non-loopback address


# --- addresses -------------------------------------------------------------------------


class _Invalid(ValueError):
    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


def parse_listen(value: str, *, field: str, source: str, line: int | None = None) -> ListenAddress:
    """Parse "127.0.0.1:8443", "[::1]:8443", "localhost:0" or "unix:/abs/path.sock"."""
    try:
        if value.startswith("unix:"):
            if sys.platform == "win32":  # Python has no AF_UNIX there
                raise _Invalid("unix sockets are not available on Windows", "listen on 127.0.0.1:PORT instead")
            return ListenAddress("unix", path=_unix_path(value[len("unix:") :]))
        host, port = _split_host_port(value, "127.0.0.1:PORT, [::1]:PORT or unix:/path")
        return ListenAddress("tcp", host, _port(port, low=0))
    except _Invalid as exc:
        raise ConfigError(str(exc), source=source, line=line, field=field, value=value, hint=exc.hint) from None


def parse_target(value: str, *, field: str, source: str, line: int | None = None) -> tuple[str, int]:
    """Parse "host:port" or "[v6]:port" (port required, 1..65535) into (host, port)."""
    try:
        host, port = _split_host_port(value, "host:port, for example api.example.test:443")
        return host, _port(port, low=1)
    except _Invalid as exc:
        raise ConfigError(str(exc), source=source, line=line, field=field, value=value, hint=exc.hint) from None


def _split_host_port(value: str, example: str) -> tuple[str, str]:
    if "://" in value:
        raise _Invalid("an address has no scheme", f"write {example}")
    bracketed = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", value)
    if bracketed:
        host, port = bracketed.group(1), bracketed.group(2)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid("brackets hold an IPv6 address only", f"write {example}") from None
    elif value.count(":") > 1:
        raise _Invalid("an IPv6 address needs brackets", "write it as [::1]:PORT")
    else:
        host, sep, port = value.partition(":")
        if not host:
            raise _Invalid("missing host", f"write {example}")
        _check_host(host)
        port = port if sep else None
    if not port:
        raise _Invalid("missing port", f"write {example}")
    return host, port


def _check_host(host: str) -> None:
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", host):
        raise _Invalid(f"{host} is not a valid IPv4 address")
    if len(host) > 253 or not _HOSTNAME.fullmatch(host):
        raise _Invalid(f"{host!r} is not a valid host name or IP address")


def _port(text: str, *, low: int) -> int:
    if re.fullmatch(r"[0-9]{1,5}", text) and low <= int(text) <= 65535:
        return int(text)
    raise _Invalid(f"port must be a number from {low} to 65535")


def _unix_path(text: str) -> str:
    example = "write unix:/run/user/1000/mtls-sidecar/NAME.sock"
    if not text:
        raise _Invalid("missing socket path", example)
    path = os.path.expanduser(text)
    if not os.path.isabs(path) or "\0" in path:
        raise _Invalid("a Unix socket path must be absolute", example)
    limit = 107 if sys.platform.startswith("linux") else 103  # sun_path minus the NUL
    if len(os.fsencode(path)) > limit:
        raise _Invalid(f"a Unix socket path may be at most {limit} bytes long", "choose a shorter path")
    return path


def _bind_addresses(host: str) -> set[object]:
    if host.lower() == "localhost":
        return {ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")}
    try:
        return {ipaddress.ip_address(host)}
    except ValueError:
        return {host.lower().rstrip(".")}


def _clash(a: ListenAddress, b: ListenAddress) -> bool:
    if a.kind != b.kind:
        return False
    if a.kind == "unix":
        return os.path.normpath(a.path) == os.path.normpath(b.path)
    if a.port == 0 or a.port != b.port:
        return False
    ours, theirs = _bind_addresses(a.host), _bind_addresses(b.host)
    return bool(ours & theirs) or _wildcard_covers(ours, theirs) or _wildcard_covers(theirs, ours)


def _wildcard_covers(wild: set[object], other: set[object]) -> bool:
    return any(
        isinstance(w, ipaddress.IPv4Address | ipaddress.IPv6Address)
        and w.is_unspecified
        and any(type(o) is type(w) for o in other)
        for w in wild
    )


# --- the schema --------------------------------------------------------------------------


def load_config(path: Path) -> Config:
    """Read a UTF-8 config file and parse it; relative paths resolve against its folder."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the config file: {exc.strerror or exc}",
            source=str(path),
            hint="check the path, or set MTLS_SIDECAR_CONFIG",
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            "the config file is not UTF-8 text", source=str(path), line=data.count(b"\n", 0, exc.start) + 1
        ) from None
    return parse_config(text, source=str(path), base_dir=path.absolute().parent)


def parse_config(text: str, *, source: str = "<string>", base_dir: Path | None = None) -> Config:
    """Parse TOML text into a frozen `Config`; relative paths resolve against `base_dir`."""
    doc = Document(text, source, base_dir)
    top = Table(doc, _load_toml(text, source), ())
    top.check_keys(_TOP_KEYS)
    identities = {name: _parse_identity(t) for name, t in top.tables("identities").items()}
    active = _active_identity(top, identities)
    routes = {name: _parse_route(t, identities) for name, t in top.tables("routes").items()}
    if routes and not identities:
        raise doc.error(
            ("routes", next(iter(routes))),
            "routes need an identity, but none is configured",
            hint='add for example [identities.dev] with renew = "local-ca"',
        )
    demo = _parse_demo(top)
    proxy = _parse_proxy(top, identities)
    metrics_listen = _metrics_listen(top)
    _check_clashes(doc, routes, demo, proxy)
    if metrics_listen is not None:
        _check_metrics_clash(doc, metrics_listen, routes, demo, proxy)
    _check_self_targets(doc, routes, demo, proxy)
    return Config(
        source=source,
        active_identity=active,
        identities=MappingProxyType(identities),
        routes=MappingProxyType(routes),
        demo_service=demo,
        shutdown_grace=top.duration("shutdown_grace", DEFAULT_SHUTDOWN_GRACE, positive=False),
        log_level=top.choice("log_level", LOG_LEVELS, "log level", "info"),
        keystore_dir=top.file("keystore_dir"),
        expiry_warning=top.duration("expiry_warning", DEFAULT_EXPIRY_WARNING, positive=False),
        max_connections=_count(top, "max_connections", DEFAULT_MAX_CONNECTIONS),
        proxy=proxy,
        control=top.choice("control", CONTROL_TRANSPORTS, "control transport", DEFAULT_CONTROL),
        metrics_listen=metrics_listen,
        metrics_unsafe_listen=top.boolean("metrics_unsafe_listen"),
    )


def _load_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message, line = str(exc), None
        where = _TOML_WHERE.search(message)
        if where:
            line = int(where.group(1))
            message = f"{message[: where.start()]} (column {where.group(2)})"
        elif message.endswith("(at end of document)"):
            line = text.rstrip().count("\n") + 1
            message = message.removesuffix("(at end of document)").rstrip()
        raise ConfigError(f"invalid TOML: {message}", source=source, line=line) from None
    except RecursionError:
        raise ConfigError("invalid TOML: arrays or tables nested too deeply", source=source) from None


def _parse_identity(t: Table) -> IdentitySpec:
    t.check_keys(_IDENTITY_KEYS)
    renew = t.choice("renew", RENEW_PROVIDERS, "renewal provider", "local-ca")
    subject = _subject(t)
    return IdentitySpec(
        name=t.name,
        subject=subject,
        lifetime=t.duration("lifetime", DEFAULT_LIFETIME, positive=True),
        pkcs12_password_env=_env_name(t, "pkcs12_password_env"),
        key_password_env=_env_name(t, "key_password_env"),
        pkcs12_password_keyring=_keyring_entry(t, "pkcs12_password_keyring"),
        key_password_keyring=_keyring_entry(t, "key_password_keyring"),
        issuer_ca_file=t.file("issuer_ca_file"),
        timing=parse_timing(t),
        provider=parse_provider(t, renew, subject),
    )


def _keyring_entry(t: Table, key: str) -> tuple[str, str] | None:
    value = t.string(key)
    if value is None:
        return None
    service, _, username = value.partition("/")
    if not service or not username:
        raise t.error(
            key,
            "not a keyring entry",
            value,
            hint='write "SERVICE/USERNAME", e.g. "mtls-sidecar/dev", after `keyring set mtls-sidecar dev`',
        )
    return (service, username)


def _subject(t: Table) -> str:
    subject = t.string("subject")
    if subject is None:
        return f"CN={t.path[-1]}"
    from cryptography import x509  # here: reading config.toml should not load cryptography

    hint = 'write for example "CN=dev,O=Example"'
    try:
        parsed = x509.Name.from_rfc4514_string(subject)
    except ValueError as exc:
        detail = f": {exc}" if str(exc) else ""
        raise t.error("subject", f"not an RFC 4514 distinguished name{detail}", subject, hint=hint) from None
    if len(parsed) == 0:
        raise t.error("subject", "empty subject", subject, hint=hint)
    return subject


def _upstream_proxy(t: Table) -> tuple[str | None, str | None]:
    """`upstream_proxy` (checked as sidecar/upstreamproxy.py reads it) and `upstream_proxy_auth_env`."""
    url = t.string("upstream_proxy")
    auth_env = _env_name(t, "upstream_proxy_auth_env", what="the proxy's user:password")
    if url is not None:
        try:
            parse_proxy_url(url)
        except ProxyURLError as exc:
            # A URL with credentials in it is not shown: they are what must not be in a file.
            shown = url if "@" not in url else None
            raise t.error("upstream_proxy", exc.message, shown, hint=exc.hint) from None
    elif auth_env is not None:
        raise t.error(
            "upstream_proxy_auth_env", "only used with upstream_proxy", hint="set upstream_proxy too, or remove it"
        )
    return url, auth_env


def _env_name(t: Table, key: str, *, what: str = "the password") -> str | None:
    value = t.string(key)
    if value is not None and not _ENV_NAME.fullmatch(value):
        # The value is left out of the error: people paste the password itself here.
        raise t.error(
            key,
            "not an environment variable name (value not shown)",
            hint=f"name the variable that holds {what}, never {what}",
        )
    return value


def _active_identity(top: Table, identities: Mapping[str, IdentitySpec]) -> str:
    known = ", ".join(identities) or "none configured"
    name = top.string("active_identity")
    if name is None and len(identities) > 1:
        raise top.error(
            "active_identity", "required when more than one identity is configured", hint=f"set it to one of: {known}"
        )
    if name is None:
        return next(iter(identities), "")
    if name not in identities:
        raise top.error("active_identity", "unknown identity", name, hint=f"known: {known}")
    return name


def _parse_route(t: Table, identities: Mapping[str, IdentitySpec]) -> RouteSpec:
    t.check_keys(ROUTE_KEYS)
    unsafe_listen = t.boolean("unsafe_listen")
    listen = t.address("listen", parse_listen, "127.0.0.1:8443")
    if not listen.is_loopback and not unsafe_listen:
        raise t.error("listen", "not a loopback address", t.data["listen"], hint=_LOOPBACK_HINT)
    target_host, target_port = t.address("target", parse_target, "api.example.test:443")
    identity = _known_identity(t, identities)
    _crl_needs_revocation(t, "route")
    protocol = t.choice("protocol", PROTOCOLS, "protocol", "tcp")
    _only_for(t, protocol, "postgres_negotiation", ("postgres",))
    _only_for(t, protocol, "local_tls", ("postgres", "mysql"))
    _only_for(t, protocol, "host_header", ("http",))
    negotiation = t.choice("postgres_negotiation", POSTGRES_NEGOTIATIONS, "PostgreSQL negotiation", "sslrequest")
    alpn = _alpn(t)
    if protocol == "http" and set(alpn) - {"http/1.1"}:
        raise t.error("alpn", "an http route speaks HTTP/1.1 only", list(alpn), hint='use ["http/1.1"] or leave it out')
    if negotiation == "direct" and not alpn:
        alpn = ("postgresql",)  # PostgreSQL 17 accepts TLS at once only with this ALPN
    host_header = t.string("host_header")
    if host_header is not None and (not host_header.strip() or any(c in host_header for c in "\r\n\0 ")):
        raise t.error("host_header", "not a host name", host_header, hint='for example "api.example.test"')
    upstream = _upstream_proxy(t)
    return RouteSpec(
        name=t.path[-1],
        listen=listen,
        target_host=target_host,
        target_port=target_port,
        server_name=_server_name(t) or target_host,
        ca_file=t.file("ca_file"),
        ca_dir=t.file("ca_dir"),
        identity=identity,
        alpn=alpn,
        connect_timeout=t.duration("connect_timeout", DEFAULT_CONNECT_TIMEOUT, positive=True),
        unsafe_listen=unsafe_listen,
        unsafe_skip_verify=t.boolean("unsafe_skip_verify"),
        pin_sha256=_pins(t),
        allowed_uri_sans=_uri_patterns(t),
        allowed_common_names=_names(t, "allowed_common_names", '["api.example.test"]'),
        allowed_ous=_names(t, "allowed_ous", '["Payments"]'),
        allowed_dns_sans=_dns_names(t),
        allowed_ip_sans=_ip_addresses(t),
        revocation=t.choice("revocation", REVOCATION_MODES, "revocation mode", "off"),
        crl_file=t.file("crl_file"),
        protocol=protocol,
        postgres_negotiation=negotiation,
        local_tls=t.boolean("local_tls"),
        host_header=host_header,
        max_connections=_count(t, "max_connections", DEFAULT_ROUTE_MAX_CONNECTIONS),
        idle_timeout=t.duration("idle_timeout", 0.0, positive=False),
        preconnect=_preconnect(t, protocol),
        preconnect_max_idle=t.duration("preconnect_max_idle", DEFAULT_PRECONNECT_MAX_IDLE, positive=True),
        upstream_proxy=upstream[0],
        upstream_proxy_auth_env=upstream[1],
    )


def _preconnect(t: Table, protocol: str, *, passthrough: bool = False) -> int | str:
    """`preconnect = N` (0 to 64) or "auto"; not for mysql (why: below)."""
    value: object = t.data.get("preconnect", 0)
    if value == "auto":
        pass
    elif isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 64:
        raise t.error("preconnect", 'must be a number of connections from 0 to 64, or "auto"', value)
    if value and protocol == "mysql":
        # A MySQL server greets first and starts TLS only after the client's answer, which carries
        # the client's own capabilities: nothing of the TLS can be done ahead, and the server drops
        # an unanswered greeting after its connect_timeout (10 s by default).
        raise t.error(
            "preconnect",
            'not available for protocol = "mysql": TLS starts only after the client answers the server\'s '
            "greeting, so there is no handshake to do ahead",
            value,
            hint="remove preconnect from this route",
        )
    if value and passthrough:
        raise t.error("preconnect", "not available with passthrough (no TLS of ours to do ahead)", value)
    if value and t.data.get("local_tls"):
        raise t.error("preconnect", "not available with local_tls", value, hint="remove one of them")
    return value if isinstance(value, int) else "auto"


def _known_identity(t: Table, identities: Mapping[str, IdentitySpec]) -> str | None:
    identity = t.string("identity")
    if identity is not None and identity not in identities:
        raise t.error(
            "identity", "unknown identity", identity, hint="known: " + (", ".join(identities) or "none configured")
        )
    return identity


def _crl_needs_revocation(t: Table, what: str) -> None:
    if "crl_file" in t.data and t.data.get("revocation", "off") == "off":
        raise t.error(
            "crl_file",
            "crl_file is only read when revocation checking is on",
            t.data["crl_file"],
            hint=f'add revocation = "soft" or revocation = "hard" to this {what}',
        )


def _count(t: Table, key: str, default: int) -> int:
    """A whole number of connections, at least 1."""
    value = t.data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
        raise t.error(key, "must be a whole number from 1 to 1000000", value, hint=f"for example {key} = {default}")
    return value


def _only_for(t: Table, protocol: str, key: str, protocols: tuple[str, ...]) -> None:
    if key in t.data and protocol not in protocols:
        wanted = " or ".join(f'protocol = "{p}"' for p in protocols)
        raise t.error(key, f"only used with {wanted}", t.data[key], hint=f'this route has protocol = "{protocol}"')


def _server_name(t: Table) -> str | None:
    name = t.string("server_name")
    try:
        if name is not None:
            _check_host(name)
    except _Invalid as exc:
        raise t.error(
            "server_name", str(exc), name, hint="the DNS name or IP address the server's certificate is for"
        ) from None
    return name


def _alpn(t: Table) -> tuple[str, ...]:
    items = t.typed("alpn", list, 'an array of strings such as ["h2", "http/1.1"]') or []
    for item in items:
        if not isinstance(item, str) or not 0 < len(item.encode("utf-8", "surrogatepass")) < 256:
            raise t.error(
                "alpn",
                "each protocol must be a non-empty string of up to 255 bytes",
                item,
                hint='for example ["h2", "http/1.1"]',
            )
    return tuple(items)


def _pins(t: Table) -> tuple[str, ...]:
    example = '["Base64SHA256OfTheServerKey="]'
    pins = []
    for item in t.strings("pin_sha256", example):
        try:
            pins.append(parse_pin(item))
        except ValueError as exc:
            raise t.error(
                "pin_sha256",
                f"not a SHA-256 SPKI pin ({exc}): a pin is 44 characters of base64",
                item,
                hint=f"get one from the server certificate with: {PIN_HINT}",
            ) from None
    return tuple(pins)


def _uri_patterns(t: Table) -> tuple[str, ...]:
    patterns = t.strings("allowed_uri_sans", '["spiffe://example.test/api/*"]')
    for item in patterns:
        try:
            check_uri_pattern(item)
        except ValueError as exc:
            raise t.error(
                "allowed_uri_sans",
                str(exc),
                item,
                hint='for example "spiffe://example.test/api/*"; * matches within one path segment, ** across',
            ) from None
    return tuple(patterns)


def _names(t: Table, key: str, example: str) -> tuple[str, ...]:
    """A list of subject CNs or OUs, compared as equal strings."""
    names = t.strings(key, example)
    for item in names:
        try:
            check_name_value(item)
        except ValueError as exc:
            raise t.error(key, str(exc), item, hint=f"for example {key} = {example}") from None
    return tuple(names)


def _dns_names(t: Table) -> tuple[str, ...]:
    example = '["api.example.test"]'
    names = []
    for item in t.strings("allowed_dns_sans", example):
        try:
            names.append(parse_dns_san(item))
        except ValueError as exc:
            raise t.error(
                "allowed_dns_sans",
                str(exc),
                item,
                hint=f"for example allowed_dns_sans = {example}; a name matches a DNS SAN that is equal to it",
            ) from None
    return tuple(names)


def _ip_addresses(t: Table) -> tuple[str, ...]:
    example = '["10.0.0.5", "::1"]'
    addresses = []
    for item in t.strings("allowed_ip_sans", example):
        try:
            addresses.append(parse_ip_san(item))
        except ValueError as exc:
            raise t.error("allowed_ip_sans", str(exc), item, hint=f"for example allowed_ip_sans = {example}") from None
    return tuple(addresses)


def _parse_demo(top: Table) -> DemoServiceSpec:
    raw = top.typed("demo_service", dict, "a table [demo_service]")
    if raw is None:
        return DemoServiceSpec()
    t = Table(top.doc, raw, ("demo_service",))
    t.check_keys(_DEMO_KEYS)
    if "listen" not in raw:
        return DemoServiceSpec(enabled=t.boolean("enabled"))
    listen = t.address("listen", parse_listen, "127.0.0.1:18443")
    if listen.kind != "tcp" or not listen.is_loopback:
        raise t.error(
            "listen",
            "the demo service listens on loopback TCP only",
            raw["listen"],
            hint="use 127.0.0.1:PORT or [::1]:PORT",
        )
    return DemoServiceSpec(enabled=t.boolean("enabled"), listen=listen)


def _metrics_listen(top: Table) -> ListenAddress | None:
    """`metrics_listen = "127.0.0.1:PORT"`: loopback TCP, unless `metrics_unsafe_listen = true`."""
    raw = top.data.get("metrics_listen")
    if raw is None:
        return None
    listen = top.address("metrics_listen", parse_listen, "127.0.0.1:9464")
    if listen.kind != "tcp":
        example = 'for example metrics_listen = "127.0.0.1:9464"'
        raise top.error("metrics_listen", "the metrics listen on TCP only", raw, hint=example)
    if not listen.is_loopback and not top.boolean("metrics_unsafe_listen"):
        hint = "use 127.0.0.1:PORT or [::1]:PORT, or set metrics_unsafe_listen = true to let other machines scrape"
        raise top.error("metrics_listen", "not a loopback address", raw, hint=hint)
    return listen


def _check_metrics_clash(
    doc: Document, listen: ListenAddress, routes: Mapping[str, RouteSpec], demo: DemoServiceSpec, proxy: ProxySpec
) -> None:
    taken = [(f"route {route.name}", route.listen) for route in routes.values()]
    if proxy.enabled:
        taken.append(("the proxy", proxy.listen))
    if demo.enabled:
        taken.append(("the demo service", demo.listen))
    for owner, other in taken:
        if _clash(listen, other):
            raise doc.error(
                ("metrics_listen",),
                f"metrics_listen and {owner} both listen on {other}",
                str(listen),
                hint="give the metrics a port of their own",
            )


def _check_clashes(doc: Document, routes: Mapping[str, RouteSpec], demo: DemoServiceSpec, proxy: ProxySpec) -> None:
    taken = [("the demo service", demo.listen)] if demo.enabled else []
    if proxy.enabled:
        if demo.enabled and _clash(proxy.listen, demo.listen):
            # at the proxy's listen when it is written (or its [proxy] table), else at the demo's
            written = doc.line(("proxy", "listen")) is not None
            raise doc.error(
                ("proxy", "listen") if written else ("demo_service", "listen"),
                f"the proxy and the demo service both listen on {demo.listen}",
                str(proxy.listen if written else demo.listen),
                hint="give each its own port",
            )
        taken.append(("the proxy", proxy.listen))
    for route in routes.values():
        for owner, listen in taken:
            if _clash(route.listen, listen):
                raise doc.error(
                    ("routes", route.name, "listen"),
                    f"route clash: route {route.name} and {owner} both listen on {listen}",
                    str(route.listen),
                    hint="give each its own port or socket path",
                )
        taken.append((f"route {route.name}", route.listen))


def _check_self_targets(
    doc: Document, routes: Mapping[str, RouteSpec], demo: DemoServiceSpec, proxy: ProxySpec
) -> None:
    """A route whose target is one of our own listeners would connect to itself, again and
    again, until descriptors run out: refused here, at the target's line."""
    ours = [(f"route {r.name}", r.listen) for r in routes.values()]
    if proxy.enabled:
        ours.append(("the proxy", proxy.listen))
        for index, rule in enumerate(proxy.rules):
            if rule.connect is None:
                continue
            target = ListenAddress("tcp", *rule.connect)
            for owner, listen in ours:
                if listen.kind == "tcp" and listen.port == rule.connect[1] and _clash(target, listen):
                    raise doc.error(
                        ("proxy", "rules", f"[{index}]", "connect"),
                        f"connect is {owner}'s listen address ({listen}): the sidecar would tunnel into itself",
                        str(target),  # host:port, [v6]:port
                        hint="point connect at the remote service's TLS address",
                    )
    for route in routes.values():
        target = ListenAddress("tcp", route.target_host, route.target_port)
        for owner, listen in ours:
            if listen.kind == "tcp" and listen.port == route.target_port and _clash(target, listen):
                itself = owner == f"route {route.name}"
                raise doc.error(
                    ("routes", route.name, "target"),
                    "the target is this route's own listen address"
                    if itself
                    else f"the target is {owner}'s listen address ({listen}): the sidecar would tunnel into itself",
                    route.target,
                    hint="point target at the remote service's TLS address",
                )


def _parse_proxy(top: Table, identities: Mapping[str, IdentitySpec]) -> ProxySpec:
    raw = top.typed("proxy", dict, "a table [proxy]")
    if raw is None:
        return ProxySpec()
    t = Table(top.doc, raw, ("proxy",))
    t.check_keys(_PROXY_KEYS)
    unsafe_listen = t.boolean("unsafe_listen")
    listen = ProxySpec().listen
    if "listen" in raw:
        listen = t.address("listen", parse_listen, DEFAULT_PROXY_LISTEN)
        if listen.kind != "tcp":
            raise t.error(
                "listen", "the proxy listens on TCP only", raw["listen"], hint=f'for example "{DEFAULT_PROXY_LISTEN}"'
            )
        if not listen.is_loopback and not unsafe_listen:
            hint = "use 127.0.0.1:PORT or [::1]:PORT, or set unsafe_listen = true in [proxy]"
            raise t.error("listen", "not a loopback address", raw["listen"], hint=hint)
    example = 'for example [[proxy.rules]] with hosts = ["*.corp.example"]'
    rules = [_parse_proxy_rule(rule, identities) for rule in t.array_tables("rules", example)]
    seen: dict[str, int] = {}
    for index, rule in enumerate(rules):  # unnamed rules are called after their first host
        if rule.name in seen:
            if "name" in raw["rules"][index]:
                raise top.doc.error(
                    ("proxy", "rules", f"[{index}]", "name"),
                    f"two rules are named {rule.name}",
                    rule.name,
                    hint="give each rule its own name",
                )
            rules[index] = replace(rule, name=f"{rule.name} ({index + 1})")
        seen[rules[index].name] = index
    return ProxySpec(
        listen=listen,
        unsafe_listen=unsafe_listen,
        max_connections=_count(t, "max_connections", DEFAULT_ROUTE_MAX_CONNECTIONS),
        rules=tuple(rules),
    )


def _parse_proxy_rule(t: Table, identities: Mapping[str, IdentitySpec]) -> ProxyRuleSpec:
    t.check_keys(PROXY_RULE_KEYS)
    hosts = []
    for item in t.strings("hosts", '["*.corp.example", "db.example.net", "10.20.0.0/16"]'):
        try:
            hosts.append(parse_host_pattern(item))
        except ValueError as exc:
            raise t.error("hosts", str(exc), item, hint=f"each entry is {PATTERN_RULE}") from None
    if not hosts:
        raise t.error("hosts", "a rule needs at least one host", hint='for example hosts = ["*.corp.example"]')
    ports = t.typed("ports", list, "an array of port numbers such as [443, 5432]") or []
    for port in ports:
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise t.error("ports", "each port must be a number 1-65535", port, hint="for example ports = [443, 5432]")
    identity = _known_identity(t, identities)
    protocol = t.choice("protocol", PROTOCOLS, "protocol", "tcp") if "protocol" in t.data else None
    if "postgres_negotiation" in t.data and protocol != "postgres":
        raise t.error("postgres_negotiation", 'only used with protocol = "postgres"', t.data["postgres_negotiation"])
    _crl_needs_revocation(t, "rule")
    negotiation = t.choice("postgres_negotiation", POSTGRES_NEGOTIATIONS, "PostgreSQL negotiation", "sslrequest")
    alpn = _alpn(t)
    if negotiation == "direct" and not alpn:
        alpn = ("postgresql",)
    connect = None
    if "connect" in t.data:
        connect = t.address("connect", parse_target, "127.0.0.1:8443")
    upstream = _upstream_proxy(t)
    return ProxyRuleSpec(
        name=t.string("name") or hosts[0].text,
        hosts=tuple(hosts),
        ports=tuple(ports),
        identity=identity,
        protocol=protocol,
        tls_port=t.port("tls_port", 443),
        connect=connect,
        passthrough=t.boolean("passthrough"),
        ca_file=t.file("ca_file"),
        ca_dir=t.file("ca_dir"),
        alpn=alpn,
        connect_timeout=t.duration("connect_timeout", DEFAULT_CONNECT_TIMEOUT, positive=True),
        unsafe_skip_verify=t.boolean("unsafe_skip_verify"),
        pin_sha256=_pins(t),
        allowed_uri_sans=_uri_patterns(t),
        allowed_common_names=_names(t, "allowed_common_names", '["api.example.test"]'),
        allowed_ous=_names(t, "allowed_ous", '["Payments"]'),
        allowed_dns_sans=_dns_names(t),
        allowed_ip_sans=_ip_addresses(t),
        revocation=t.choice("revocation", REVOCATION_MODES, "revocation mode", "off"),
        crl_file=t.file("crl_file"),
        postgres_negotiation=negotiation,
        max_connections=_count(t, "max_connections", DEFAULT_ROUTE_MAX_CONNECTIONS),
        idle_timeout=t.duration("idle_timeout", 0.0, positive=False),
        preconnect=_preconnect(t, protocol or "tcp", passthrough=t.boolean("passthrough")),
        preconnect_max_idle=t.duration("preconnect_max_idle", DEFAULT_PRECONNECT_MAX_IDLE, positive=True),
        upstream_proxy=upstream[0],
        upstream_proxy_auth_env=upstream[1],
    )


# --- first run ---------------------------------------------------------------------------


def default_config_text(*, user: str, ca_file: Path, route_port: int, demo_port: int) -> str:
    """A commented config for a first run: one identity, the demo service and a demo route."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", user).strip("-.") or "dev"
    key, quoted = toml_key(name), toml_string(name)
    ca = toml_string(str(ca_file if ca_file.is_absolute() else ca_file.absolute()))
    return f"""\
# mtls-sidecar configuration (TOML), written on first run. Edit freely.
# Durations take a unit: "500ms", "10s", "2m", "1h", "7d".

# The identity used by routes that name none.
active_identity = {quoted}
# debug, info, warning or error
log_level = "info"
# How long open connections may finish on shutdown.
shutdown_grace = "5s"
# Warn this long before a certificate that will not be renewed in time expires
# (renew = "none", or renewal failing); never more than a third of its lifetime.
expiry_warning = "7d"

# An identity is a named series of client certificates, kept in <keystore>/<name>/;
# the newest usable one is presented. renew chooses who issues the next one:
# local-ca (the embedded development CA), acme, command, step-ca or none.
[identities.{key}]
renew = "local-ca"
subject = "CN={name}"
lifetime = "7d"

# A built-in mTLS HTTP service to try the sidecar against.
[demo_service]
enabled = true
listen = "127.0.0.1:{demo_port}"

# A route: a plaintext listener on this machine, tunnelled to a mutual-TLS service.
# Try it: curl http://127.0.0.1:{route_port}/
[routes.demo]
listen = "127.0.0.1:{route_port}"
target = "127.0.0.1:{demo_port}"
ca_file = {ca}

# A route to a real service looks like this (listen: loopback host:port, "[::1]:port" or
# "unix:/path"; server_name defaults to the target's host; without ca_file or ca_dir the
# system trust store is used; identity defaults to active_identity):
# [routes.api]
# listen = "127.0.0.1:8443"
# target = "api.example.test:443"
# server_name = "api.example.test"
# ca_file = "/path/to/api-ca.pem"
# identity = {quoted}
# alpn = ["h2", "http/1.1"]
# connect_timeout = "10s"
# pin_sha256 = ["base64 SHA-256 of the server's public key"]
# allowed_uri_sans = ["spiffe://example.test/api/*"]   # the allowed_* lists are one allow-list:
# allowed_common_names = ["api.example.test"]          # any one entry of any of them lets the server in
# allowed_ous = ["Payments"]
# allowed_dns_sans = ["api.example.test"]
# allowed_ip_sans = ["10.0.0.5", "::1"]
# revocation = "soft"              # off, soft (warn when unknown) or hard (refuse when unknown)
# crl_file = "/path/to/issuer.crl"
"""
