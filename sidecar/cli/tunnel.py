"""`mtls-sidecar tunnel`: one route from flags, no config file, in the foreground.

The argparse namespace stops at the edge: `run_tunnel` turns it into a `TunnelFlags` (typed,
frozen) and everything after reads that.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sidecar import eventloop, logsetup
from sidecar.cli.tunnelcreds import SOURCE, FlagCredentials
from sidecar.cli.tunnelrun import ServeOptions, check_trust_and_credential, resolve_target, route_has_proxy, serve
from sidecar.config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_PRECONNECT_MAX_IDLE,
    DEFAULT_ROUTE_MAX_CONNECTIONS,
    RouteSpec,
    parse_listen,
    parse_target,
)
from sidecar.errors import ConfigError
from sidecar.policyspec import PIN_HINT, check_name_value, check_uri_pattern, parse_dns_san, parse_ip_san, parse_pin
from sidecar.statusport import parse_status_address
from sidecar.units import parse_duration
from sidecar.upstreamproxy import ProxyURLError, parse_proxy_url

log = logging.getLogger("sidecar.tunnel")

PR_SET_PDEATHSIG = 1  # prctl(2): a signal for the child when its parent dies


@dataclass(frozen=True)
class TunnelFlags:
    """The `tunnel` command's flags, as typed values (ghostunnel's client flags where they overlap)."""

    listen: str
    target: str
    cert: str | None = None
    key: str | None = None
    keystore: str | None = None
    storepass: str | None = None
    storepass_env: str | None = None
    cacert: str | None = None
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    connect_timeout: str | None = "10s"
    unsafe_listen: bool = False
    workers: int = 1
    log_level: str | None = None
    protocol: str = "tcp"
    host_header: str | None = None
    preconnect: str = "0"
    preconnect_max_idle: str | None = None
    max_connections: int | None = None
    disable_authentication: bool = False
    verify_cn: tuple[str, ...] = ()
    verify_ou: tuple[str, ...] = ()
    verify_dns: tuple[str, ...] = ()
    verify_ip: tuple[str, ...] = ()
    verify_uri: tuple[str, ...] = ()
    verify_spki_pin: tuple[str, ...] = ()
    proxy: str | None = None
    proxy_was_connect_proxy: bool = False
    proxy_auth_env: str | None = None
    skip_resolve: bool = False
    timed_reload: str | None = None
    shutdown_timeout: str = "5m"
    close_timeout: str = "60s"
    status: str | None = None
    enable_shutdown: bool = False
    quiet: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> TunnelFlags:
        """The flags; where one is missing, ghostunnel's environment variable for it (CERT_PATH…)."""
        env = os.environ if environ is None else environ

        def get(name: str, default: Any = None) -> Any:
            return getattr(args, name, default)

        return cls(
            listen=args.listen,
            target=args.target,
            cert=get("cert") or env.get("CERT_PATH") or None,
            key=get("key") or env.get("KEY_PATH") or None,
            keystore=get("keystore") or env.get("KEYSTORE_PATH") or None,
            storepass=get("storepass") if get("storepass") is not None else env.get("KEYSTORE_PASS"),
            storepass_env=get("storepass_env"),
            cacert=get("cacert") or env.get("CACERT_PATH") or None,
            server_name=get("server_name"),
            alpn=tuple(get("alpn") or ()),
            connect_timeout=get("connect_timeout", "10s"),
            unsafe_listen=bool(get("unsafe_listen")),
            workers=int(get("workers", 1) or 1),
            log_level=get("log_level"),
            protocol=get("protocol") or "tcp",
            host_header=get("host_header"),
            preconnect=str(get("preconnect", "0") or "0"),
            preconnect_max_idle=get("preconnect_max_idle"),
            max_connections=get("max_connections"),
            disable_authentication=bool(get("disable_authentication")),
            verify_cn=tuple(get("verify_cn") or ()),
            verify_ou=tuple(get("verify_ou") or ()),
            verify_dns=tuple(get("verify_dns") or ()),
            verify_ip=tuple(get("verify_ip") or ()),
            verify_uri=tuple(get("verify_uri") or ()),
            verify_spki_pin=tuple(get("verify_spki_pin") or ()),
            proxy=get("proxy") or get("connect_proxy"),
            proxy_was_connect_proxy=bool(get("connect_proxy")),
            proxy_auth_env=get("proxy_auth_env"),
            skip_resolve=bool(get("skip_resolve")),
            timed_reload=get("timed_reload"),
            shutdown_timeout=get("shutdown_timeout") or "5m",
            close_timeout=get("close_timeout") if get("close_timeout") is not None else "60s",
            status=get("status"),
            enable_shutdown=bool(get("enable_shutdown")),
            quiet=tuple(get("quiet") or ()),
        )

    @property
    def verify_lists(self) -> dict[str, tuple[str, ...]]:
        return {
            "--verify-cn": self.verify_cn,
            "--verify-ou": self.verify_ou,
            "--verify-dns": self.verify_dns,
            "--verify-ip": self.verify_ip,
            "--verify-uri": self.verify_uri,
        }

    def check_combinations(self) -> None:
        """Flags that exclude or need each other: a usage error (exit 2) naming both."""
        credential_flags = {"--keystore": self.keystore, "--cert": self.cert, "--key": self.key}
        if self.keystore:
            for flag in ("--cert", "--key"):
                if credential_flags[flag]:
                    _exclusive("--keystore", flag, "a keystore holds the certificate and its key already")
        if self.disable_authentication:
            for flag, value in {
                **credential_flags,
                "--storepass": self.storepass,
                "--storepass-env": self.storepass_env,
            }.items():
                if value:
                    _exclusive("--disable-authentication", flag, "no client certificate is presented with it")
        if self.verify_spki_pin:
            for flag, values in self.verify_lists.items():
                if values:
                    _exclusive("--verify-spki-pin", flag, "a pinned server is authenticated by its key alone")
            if self.cacert:
                _exclusive("--verify-spki-pin", "--cacert", "a pinned server's chain is not verified")
        if self.enable_shutdown and not self.status:
            raise ConfigError(
                "needs --status (the port /_shutdown is served on)", source=SOURCE, field="--enable-shutdown"
            )
        if self.proxy_auth_env and not self.proxy:
            raise ConfigError("needs --proxy (the proxy to authenticate to)", source=SOURCE, field="--proxy-auth-env")


def _exclusive(first: str, second: str, why: str) -> None:
    raise ConfigError(
        f"{first} and {second} cannot be used together ({why})",
        source=SOURCE,
        field=first,
        hint=f"drop {second} or {first}",
    )


def route_from_flags(args: TunnelFlags) -> RouteSpec:
    listen = parse_listen(args.listen, field="--listen", source=SOURCE)
    if not listen.is_loopback and not args.unsafe_listen:
        raise ConfigError(
            "not a loopback address",
            source=SOURCE,
            field="--listen",
            value=args.listen,
            hint="use 127.0.0.1:PORT, [::1]:PORT or unix:/path, or pass --unsafe-listen",
        )
    host, port = parse_target(args.target, field="--target", source=SOURCE)
    try:
        timeout = parse_duration(args.connect_timeout) if args.connect_timeout else DEFAULT_CONNECT_TIMEOUT
    except ValueError as exc:
        raise ConfigError(str(exc), source=SOURCE, field="--connect-timeout", value=args.connect_timeout) from exc
    pins = tuple(_pin_flag(pin) for pin in args.verify_spki_pin)
    return RouteSpec(
        **_policy_fields(args),
        name="tunnel",
        listen=listen,
        target_host=host,
        target_port=port,
        server_name=args.server_name or host,
        ca_file=Path(args.cacert).expanduser().absolute() if args.cacert else None,
        alpn=args.alpn,
        connect_timeout=timeout,
        unsafe_listen=bool(args.unsafe_listen),
        protocol=args.protocol,
        host_header=args.host_header if args.protocol == "http" else None,
        preconnect=_preconnect_flag(args),
        max_connections=_max_connections_flag(args.max_connections),
        preconnect_max_idle=_duration_flag(args.preconnect_max_idle, "--preconnect-max-idle")
        or DEFAULT_PRECONNECT_MAX_IDLE,
        # --verify-spki-pin: the server is authenticated by its key alone, as ghostunnel does
        pin_sha256=pins,
        unsafe_skip_verify=bool(pins),
        close_timeout=_duration_flag(args.close_timeout, "--close-timeout", zero=True),
        client_auth=not args.disable_authentication,
        upstream_proxy=_proxy_flag(args),
        upstream_proxy_auth_env=args.proxy_auth_env,
    )


def _proxy_flag(args: TunnelFlags) -> str | None:
    """--proxy (or --connect-proxy), checked as config.toml's upstream_proxy is."""
    if not args.proxy:
        return None
    flag = "--connect-proxy" if args.proxy_was_connect_proxy else "--proxy"
    if "@" in args.proxy.partition("://")[2].partition("/")[0]:  # user:password@ (never repeated back)
        raise ConfigError(
            "credentials do not belong on the command line, where `ps` shows them to everyone",
            source=SOURCE,
            field=flag,
            hint='put "user:password" in an environment variable and name it with --proxy-auth-env VAR',
        )
    try:
        parse_proxy_url(args.proxy, args.proxy_auth_env)
    except ProxyURLError as exc:
        raise ConfigError(exc.message, source=SOURCE, field=flag, value=args.proxy, hint=exc.hint) from None
    return args.proxy


def _pin_flag(text: str) -> str:
    try:
        return parse_pin(text)
    except ValueError as exc:
        raise ConfigError(
            f"not a SHA-256 SPKI pin ({exc})",
            source=SOURCE,
            field="--verify-spki-pin",
            value=text,
            hint=f"sha256:$({PIN_HINT})",
        ) from exc


def _checked(flag: str, values: tuple[str, ...], check: Callable[[str], Any]) -> tuple[str, ...]:
    """Each value as `check` normalises it (returning None: kept as given); a bad one names its flag."""
    out = []
    for value in values:
        try:
            normal = check(value)
        except ValueError as exc:
            raise ConfigError(str(exc), source=SOURCE, field=flag, value=value) from exc
        out.append(value if normal is None else normal)
    return tuple(out)


def _policy_fields(args: TunnelFlags) -> dict[str, Any]:
    """--verify-cn/-ou/-dns/-ip/-uri: the route keys of the same meaning, one allow-list (any match passes)."""
    return {
        "allowed_common_names": _checked("--verify-cn", args.verify_cn, check_name_value),
        "allowed_ous": _checked("--verify-ou", args.verify_ou, check_name_value),
        "allowed_dns_sans": _checked("--verify-dns", args.verify_dns, parse_dns_san),
        "allowed_ip_sans": _checked("--verify-ip", args.verify_ip, parse_ip_san),
        "allowed_uri_sans": _checked("--verify-uri", args.verify_uri, check_uri_pattern),
    }


def _preconnect_flag(args: TunnelFlags) -> int | str:
    """`--preconnect N` (0 to 64) or `auto`, checked as config.toml's `preconnect` is."""
    value = args.preconnect.strip().lower()
    if value == "auto":
        parsed: int | str = "auto"
    elif value.isdigit() and int(value) <= 64:
        parsed = int(value)
    else:
        raise ConfigError(
            'must be a number of connections from 0 to 64, or "auto"', source=SOURCE, field="--preconnect", value=value
        )
    if parsed and args.protocol == "mysql":
        raise ConfigError(
            "not available with --protocol mysql: TLS starts only after the client answers the server's greeting",
            source=SOURCE,
            field="--preconnect",
            value=value,
        )
    return parsed


def _max_connections_flag(value: int | None) -> int:
    if value is None:
        return DEFAULT_ROUTE_MAX_CONNECTIONS
    if not 1 <= value <= 1_000_000:
        raise ConfigError(
            "must be a whole number from 1 to 1000000", source=SOURCE, field="--max-concurrent-conns", value=value
        )
    return value


def _duration_flag(text: str | None, flag: str, *, zero: bool = False) -> float | None:
    """A duration flag in seconds (None when not given); `zero`: 0 is allowed (it means "at once")."""
    if text is None or text == "":
        return None
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise ConfigError(str(exc), source=SOURCE, field=flag, value=text) from exc
    if seconds < 0 or (seconds == 0 and not zero):
        raise ConfigError("must be longer than zero", source=SOURCE, field=flag, value=text)
    return seconds


def run_tunnel(namespace: argparse.Namespace) -> int:
    """Check everything that can be checked before serving (a usage error exits 2, a target that does
    not resolve 1), then serve until stopped: 0 when open connections finished, 1 when cut."""
    args = TunnelFlags.from_args(namespace)
    args.check_combinations()
    route = route_from_flags(args)
    workers = _check_workers(args, route)
    credentials = None if args.disable_authentication else _credentials(args)
    check_trust_and_credential(route, credentials)
    if not (args.skip_resolve or route_has_proxy(route)):
        resolve_target(route)
    options = ServeOptions(
        shutdown_timeout=_duration_flag(args.shutdown_timeout, "--shutdown-timeout", zero=True) or 0.0,
        timed_reload=_duration_flag(args.timed_reload, "--timed-reload"),
        status=parse_status_address(args.status, source=SOURCE) if args.status else None,
        enable_shutdown=args.enable_shutdown,
        cacert=route.ca_file,
    )
    logsetup.configure(_log_level(args))  # only once it will run: a usage error changes no global state
    children = [_fork_worker(route, credentials, options) for _ in range(workers - 1)]
    try:
        return eventloop.run(serve(route, credentials, options, reuse_port=workers > 1, children=children))
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            os.waitpid(pid, 0)


def _credentials(args: TunnelFlags) -> FlagCredentials:
    if args.storepass_env:
        password, source = os.environ.get(args.storepass_env), f"environment variable {args.storepass_env}"
    elif args.storepass is not None:
        password, source = args.storepass, "--storepass"
    else:
        password, source = None, "--storepass"
    return FlagCredentials(
        keystore=args.keystore, cert=args.cert, key=args.key, password=password, password_source=source
    )


def _log_level(args: TunnelFlags) -> str:
    """--log-level wins; ghostunnel's --quiet all shows errors only, its other values warnings and up."""
    if args.log_level:
        return args.log_level
    if "all" in args.quiet:
        return "error"
    return "warning" if args.quiet else "info"


def _check_workers(args: TunnelFlags, route: RouteSpec) -> int:
    workers = args.workers
    if workers == 1:
        return 1
    if workers < 1 or workers > 64:
        raise ConfigError("must be between 1 and 64", source=SOURCE, field="--workers", value=workers)
    if not sys.platform.startswith("linux"):
        raise ConfigError("several workers need Linux (SO_REUSEPORT)", source=SOURCE, field="--workers", value=workers)
    if route.listen.kind != "tcp" or route.listen.port == 0:
        raise ConfigError(
            "several workers share a fixed TCP port", source=SOURCE, field="--workers", hint="give --listen HOST:PORT"
        )
    return workers


def _fork_worker(route: RouteSpec, credentials: FlagCredentials | None, options: ServeOptions) -> int:
    """A child process serving the same port; it ends when asked or when its parent dies."""
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(0)
        # The status port is the parent's alone (one address); reloads reach workers through it.
        code = eventloop.run(serve(route, credentials, replace(options, status=None), reuse_port=True))
    except BaseException:
        log.exception("tunnel worker %d failed", os.getpid())
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)
