"""`mtls-sidecar tunnel`: one route from flags, no config file, in the foreground.

The argparse namespace stops at the edge: `run_tunnel` turns it into a `TunnelFlags` (typed,
frozen) and everything after reads that.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sidecar import eventloop, logsetup
from sidecar.config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_PRECONNECT_MAX_IDLE,
    DEFAULT_ROUTE_MAX_CONNECTIONS,
    RouteSpec,
    parse_listen,
    parse_target,
)
from sidecar.credentials import Secrets, candidates_from_files
from sidecar.errors import ConfigError
from sidecar.keystore import Selection, read_identity_folder, refuse_loose_key, select
from sidecar.stopsignals import on_stop_signals
from sidecar.tlsctx import ContextCache
from sidecar.tunnel import AcceptGuard, ConnectionBudget, RouteListener
from sidecar.units import parse_duration
from sidecar.watch import FolderWatch

log = logging.getLogger("sidecar.tunnel")

SOURCE = "command line"
SHUTDOWN_GRACE = 5.0
PR_SET_PDEATHSIG = 1  # prctl(2): a signal for the child when its parent dies


@dataclass(frozen=True)
class TunnelFlags:
    """The `tunnel` command's flags, as typed values (ghostunnel's client flags where they overlap)."""

    listen: str
    target: str
    cert: str | None = None
    key: str | None = None
    keystore: str | None = None
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

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TunnelFlags:
        return cls(
            listen=args.listen,
            target=args.target,
            cert=args.cert,
            key=args.key,
            keystore=args.keystore,
            storepass_env=args.storepass_env,
            cacert=args.cacert,
            server_name=args.server_name,
            alpn=tuple(args.alpn or ()),
            connect_timeout=args.connect_timeout,
            unsafe_listen=bool(args.unsafe_listen),
            workers=int(getattr(args, "workers", 1) or 1),
            log_level=getattr(args, "log_level", None),
            protocol=getattr(args, "protocol", None) or "tcp",
            host_header=getattr(args, "host_header", None),
            preconnect=str(getattr(args, "preconnect", "0") or "0"),
            preconnect_max_idle=getattr(args, "preconnect_max_idle", None),
            max_connections=getattr(args, "max_connections", None),
        )


class FlagCredentials:
    """The identity behind `--cert/--key` or `--keystore`, re-read when its folder changes."""

    def __init__(self, args: TunnelFlags) -> None:
        password_text = os.environ.get(args.storepass_env) if args.storepass_env else None
        password = password_text.encode() if password_text is not None else None
        source = f"environment variable {args.storepass_env}" if args.storepass_env else "--storepass-env"
        self.secrets = Secrets(password, password, source, source)
        self.folder: Path | None = None
        self.files: dict[str, bytes] = {}
        self.key_file: tuple[Path, int] | None = None  # where the private key is read from, and its mode
        if args.keystore and (args.cert or args.key):
            raise ConfigError(
                "use either --keystore or --cert/--key, not both",
                source=SOURCE,
                field="--keystore",
                value=args.keystore,
            )
        if args.keystore:
            path = Path(args.keystore).expanduser()
            if path.is_dir():
                self.folder = path  # read as the daemon reads an identity folder: loose keys refused there
            else:
                data, mode = _read(path, "--keystore")
                self.files, self.key_file = {path.name: data}, (path, mode)
        elif args.cert and args.key:
            # One bundle: candidates_from_files pairs a certificate with a key in the same file.
            cert, key = Path(args.cert).expanduser(), Path(args.key).expanduser()
            cert_data, _ = _read(cert, "--cert")
            key_data, key_mode = _read(key, "--key")
            self.files = {cert.stem + ".pem": cert_data + b"\n" + key_data}
            self.key_file = (key, key_mode)
        else:
            raise ConfigError(
                "a client certificate is required",
                source=SOURCE,
                field="--cert",
                hint="give --cert FILE --key FILE, or --keystore PATH",
            )
        self.current = self._select()
        if self.current.selected is None:  # nothing to present at all: a usage error, not a tunnel that refuses
            flag = "--keystore" if args.keystore else "--cert"
            value = args.keystore if args.keystore else args.cert
            reasons = "; ".join(f"{Path(r.candidate.file).name}: {r.reason}" for r in self.current.rejected)
            raise ConfigError(
                f"no usable client certificate ({reasons or 'no credential files found'})",
                source=SOURCE,
                field=flag,
                value=value,
            )

    def refresh(self) -> None:
        self.current = self._select()
        if self.current.selected is None:
            log.warning("%s", self.current.why_unusable())

    def _select(self) -> Selection:
        if self.folder is not None:
            candidates = read_identity_folder(self.folder, self.secrets)
        else:
            candidates = candidates_from_files(self.files, self.secrets)
            if self.key_file is not None:  # as the daemon does: a key others can read is refused
                candidates = [refuse_loose_key(c, *self.key_file) for c in candidates]
        return select("tunnel", candidates, datetime.now(UTC))


def _read(path: Path, flag: str) -> tuple[bytes, int]:
    """The file's bytes and its mode (a private key others can read is refused)."""
    try:
        with path.open("rb") as fh:
            return fh.read(), os.fstat(fh.fileno()).st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror}", source=SOURCE, field=flag, value=str(path)) from exc


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
    return RouteSpec(
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
    )


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


def _duration_flag(text: str | None, flag: str) -> float | None:
    if not text:
        return None
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise ConfigError(str(exc), source=SOURCE, field=flag, value=text) from exc
    if seconds <= 0:
        raise ConfigError("must be longer than zero", source=SOURCE, field=flag, value=text)
    return seconds


def run_tunnel(namespace: argparse.Namespace) -> int:
    args = TunnelFlags.from_args(namespace)
    route = route_from_flags(args)
    workers = _check_workers(args, route)
    credentials = FlagCredentials(args)
    logsetup.configure(args.log_level or "info")  # only once it will run: a usage error changes no global state
    children = [_fork_worker(route, credentials) for _ in range(workers - 1)]
    try:
        eventloop.run(_serve(route, credentials, reuse_port=workers > 1))
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            os.waitpid(pid, 0)
    return 0


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


def _fork_worker(route: RouteSpec, credentials: FlagCredentials) -> int:
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
        eventloop.run(_serve(route, credentials, reuse_port=True))
    except BaseException:
        log.exception("tunnel worker %d failed", os.getpid())
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)


async def _serve(route: RouteSpec, credentials: FlagCredentials, reuse_port: bool = False) -> None:
    loop = asyncio.get_running_loop()

    async def current(_: RouteSpec) -> Selection:
        return credentials.current

    AcceptGuard().install(loop)  # out of descriptors: one log line, not a traceback per accept
    # One route: the process's cap is the route's (--max-concurrent-conns), not the daemon's 4,096 over all routes.
    listener = RouteListener(route, current, ContextCache(), budget=ConnectionBudget(route.max_connections))
    listener.current_selection = lambda _route: credentials.current  # warm connections: still this credential?
    listener.reuse_port = reuse_port
    await listener.start()
    watch = None
    if credentials.folder is not None:
        watch = FolderWatch(credentials.folder, loop, credentials.refresh)
        watch.start()
    selected = credentials.current.selected
    who = (
        f"serial {selected.cert.serial_number:x}, expires {selected.cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        if selected and selected.cert
        else "no usable certificate: connections are refused"
    )
    log.info("listening on %s → %s (%s)", listener.bound, listener.target, who)
    stop = asyncio.Event()
    on_stop_signals(loop, lambda _sig: stop.set())  # SIGINT, SIGTERM (Windows: Ctrl-C, Ctrl-Break)
    await stop.wait()
    log.info("stopping: open connections have %.0fs to finish", SHUTDOWN_GRACE)
    if watch is not None:
        watch.stop()
    await listener.stop(SHUTDOWN_GRACE)
