"""`mtls-sidecar` command line. `main(argv)` is the only place errors become exit codes.

Exit codes: 0 success; 1 a runtime failure (could not start, remote refused, `check` found a
problem); 2 bad usage or bad configuration (the message names the file, line and field);
3 the daemon is not running (for commands that talk to it); 130 `run` was stopped by a second
Ctrl-C, which cut the open connections instead of letting them finish; 141 the output's reader
went away (`| head`): the command stops quietly, as `cat` would.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar import __version__
from sidecar.errors import ConfigError, SidecarError
from sidecar.paths import Places, resolve_places

if TYPE_CHECKING:
    from sidecar.instance import InstanceLock

# Only what every command needs is imported here: `status` and the other client commands start in
# a fresh interpreter each time, so asyncio, logging, the daemon, cryptography and the control
# client's HTTP are imported by the commands that use them (tests/test_cli_imports.py).

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT: `run` stopped by a second Ctrl-C, open connections cut
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE, as `cat` or `git log` report it: the output's reader went away

EPILOG = """exit codes: 0 success; 1 runtime failure (or `check` found a problem); 2 bad usage or
configuration; 3 the daemon is not running; 130 `run` cut short by a second Ctrl-C;
141 the output's reader went away (`| head`).
environment: MTLS_SIDECAR_HOME (everything under one folder), MTLS_SIDECAR_CONFIG (config file)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtls-sidecar",
        description="Plaintext localhost ports tunnelled to mutual-TLS services.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mtls-sidecar {__version__}")
    _add_common_options(parser, argparse.SUPPRESS)
    parser.set_defaults(home=None, config=None, log_level=None)
    # The same options after the command name too (`mtls-sidecar run --config F`).
    common = argparse.ArgumentParser(add_help=False)
    _add_common_options(common, argparse.SUPPRESS)
    commands = _Commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True), common)

    commands.add_parser("run", help="run the daemon in the foreground", epilog=EPILOG)

    status = commands.add_parser("status", help="identities, expiry, renewal and routes of the running daemon")
    status.add_argument("--json", action="store_true", help="the status document as JSON")
    use = commands.add_parser("use", help="switch the active identity (or one route's identity)")
    use.add_argument("name", help="identity name")
    use.add_argument("--route", help="switch only this route")
    use.add_argument("--json", action="store_true")
    renew = commands.add_parser("renew", help="renew an identity's certificate now and say how it went")
    renew.add_argument("name", help="identity name")
    renew.add_argument("--wait", default="60s", help="how long to wait for the outcome (default 60s)")
    renew.add_argument("--no-wait", dest="no_wait", action="store_true", help="ask for it and return at once")
    renew.add_argument("--json", action="store_true")
    check = commands.add_parser("check", help="a real handshake to a route's target, explained")
    check.add_argument("route", nargs="?", help="the route to check (or --via-proxy)")
    check.add_argument(
        "--via-proxy",
        metavar="HOST:PORT",
        help="check what the proxy's rule for this destination would do (port 443 when left out)",
    )
    check.add_argument("--json", action="store_true")

    proxy = commands.add_parser("proxy", help="the one local port for every service ([proxy] in config.toml)")
    proxy_commands = commands.add_subparsers(proxy, dest="proxy_command", metavar="PROXY_COMMAND")
    env = proxy_commands.add_parser("env", help="print the http_proxy/ALL_PROXY/NO_PROXY lines to paste into a shell")
    env.add_argument("--shell", choices=("sh", "fish", "powershell"), default="sh", help="the shell's syntax (sh)")
    proxy_commands.add_parser("pac", help="print the proxy auto-config (PAC) file")

    route = commands.add_parser("route", help="routes of the running daemon (changes are saved to config.toml)")
    route_commands = commands.add_subparsers(route, dest="route_command", metavar="ROUTE_COMMAND")
    add = route_commands.add_parser("add", help="add a route; it listens at once")
    _add_route_flags(add, required=True)
    change = route_commands.add_parser(
        "set", help="change a route in place (the flags of `route add`); same listen address: open connections stay"
    )
    _add_route_flags(change, required=False)
    rm = route_commands.add_parser("rm", help="remove a route; open connections finish on their own")
    rm.add_argument("name")
    rm.add_argument("--json", action="store_true")
    route_list = route_commands.add_parser("list", help="list routes")
    route_list.add_argument("--json", action="store_true")

    tunnel = commands.add_parser("tunnel", help="one tunnel in the foreground, no config file (ghostunnel-style flags)")
    tunnel.add_argument("--listen", required=True, help="local address, 127.0.0.1:PORT or unix:/path")
    tunnel.add_argument("--target", required=True, help="remote HOST:PORT speaking TLS")
    tunnel.add_argument("--cert", help="client certificate (PEM, chain allowed)")
    tunnel.add_argument("--key", help="private key of --cert (PEM)")
    tunnel.add_argument(
        "--keystore",
        help="a keystore folder (newest usable certificate wins), or one PEM bundle / PKCS#12 file",
    )
    storepass = tunnel.add_mutually_exclusive_group()
    storepass.add_argument(
        "--storepass",
        metavar="PASS",
        help="PKCS#12 or key password (ghostunnel's flag; --storepass-env keeps it off ps)",
    )
    storepass.add_argument(
        "--storepass-env", metavar="VAR", help="environment variable holding the PKCS#12 or key password"
    )
    tunnel.add_argument(
        "--disable-authentication",
        action="store_true",
        help="present no client certificate (TLS to a server that asks for none)",
    )
    tunnel.add_argument("--cacert", help="CA bundle to verify the server (default: system trust)")
    for flag, what in (
        ("cn", "subject common name"),
        ("ou", "subject organizational unit"),
        ("dns", "DNS subject alternative name"),
        ("ip", "IP subject alternative name"),
        ("uri", "URI subject alternative name (* and ** wildcards)"),
    ):
        tunnel.add_argument(
            f"--verify-{flag}",
            action="append",
            default=[],
            metavar=flag.upper(),
            help=f"accept only a server whose certificate has this {what} (repeatable; any one match passes)",
        )
    tunnel.add_argument(
        "--verify-spki-pin",
        action="append",
        default=[],
        metavar="sha256:BASE64",
        help="authenticate the server by its key's SPKI SHA-256 alone: no chain, validity or name check (repeatable)",
    )
    upstream = tunnel.add_mutually_exclusive_group()
    upstream.add_argument(
        "--proxy",
        metavar="URL",
        help="reach the target through this proxy: http://HOST:PORT (CONNECT) or socks5://HOST:PORT",
    )
    upstream.add_argument("--connect-proxy", metavar="URL", help="the same as --proxy")
    tunnel.add_argument(
        "--proxy-auth-env", metavar="VAR", help="environment variable holding the proxy's USER:PASSWORD"
    )
    tunnel.add_argument(
        "--skip-resolve", action="store_true", help="start even when the target's name does not resolve yet"
    )
    tunnel.add_argument(
        "--timed-reload",
        metavar="DURATION",
        help="re-read the keystore and --cacert this often (also: SIGHUP, SIGUSR1)",
    )
    tunnel.add_argument(
        "--shutdown-timeout",
        default="5m",
        metavar="DURATION",
        help="at a stop signal, wait this long for open connections to finish, then cut them and exit 1 (default 5m)",
    )
    tunnel.add_argument(
        "--close-timeout",
        default="60s",
        metavar="DURATION",
        help="once one side has finished sending, close the tunnel this long after unless the other has too "
        "(default 60s; 0: at once)",
    )
    tunnel.add_argument(
        "--status",
        metavar="ADDRESS",
        help="serve /_status and /_metrics on [https://|http://]HOST:PORT or unix:PATH "
        "(HTTPS presents the current client certificate)",
    )
    tunnel.add_argument(
        "--enable-shutdown", action="store_true", help="with --status: POST /_shutdown stops the tunnel gracefully"
    )
    tunnel.add_argument(
        "--quiet",
        action="append",
        default=[],
        choices=("all", "conns", "conn-errs", "handshake-errs"),
        help="fewer log lines (ghostunnel's values; repeatable): all shows errors only, the others warnings and up",
    )
    tunnel.add_argument(
        "--server-name",
        "--override-server-name",
        dest="server_name",
        help="name sent as SNI and checked in the server certificate",
    )
    tunnel.add_argument("--alpn", action="append", default=[], help="ALPN protocol (repeatable)")
    tunnel.add_argument(
        "--protocol",
        choices=("tcp", "postgres", "mysql", "http"),
        default="tcp",
        help="what the local client speaks (default tcp: TLS at once, bytes untouched)",
    )
    tunnel.add_argument("--host-header", dest="host_header", help="http: the Host every request gets")
    tunnel.add_argument("--connect-timeout", default="10s", help="e.g. 10s")
    tunnel.add_argument(
        "--preconnect",
        default="0",
        metavar="N|auto",
        help="keep N connections to the target connected and through the mTLS handshake, so a client is joined "
        "at once (auto: as many as the recent rate of new connections needs); default 0",
    )
    tunnel.add_argument(
        "--preconnect-max-idle", metavar="DURATION", help="drop a warm connection unused this long (default 20s)"
    )
    tunnel.add_argument(
        "--unsafe-listen",
        action="store_true",
        help="allow a non-loopback listen address (other machines can use your identity)",
    )
    tunnel.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the listen port (Linux, SO_REUSEPORT; default 1)",
    )
    tunnel.add_argument(
        "--max-concurrent-conns",
        "--max-connections",
        dest="max_connections",
        type=int,
        default=None,
        help="open tunnels at most per process; more are refused (ghostunnel's flag; default 1000)",
    )

    ca = commands.add_parser("ca", help="the embedded development CA")
    ca_commands = commands.add_subparsers(ca, dest="ca_command", metavar="CA_COMMAND")
    ca_commands.add_parser("export", help="print the dev CA certificate (PEM) for test servers to trust")
    server = ca_commands.add_parser(
        "server", help="issue a server certificate for a local test service (NAME.crt, NAME.key)"
    )
    server.add_argument(
        "names", nargs="+", metavar="NAME", help="DNS names or IP addresses (the first names the files)"
    )
    server.add_argument("--out", default=".", help="folder to write into (default: the current folder)")
    server.add_argument("--lifetime", default="30d", help="e.g. 30d (default)")

    identity = commands.add_parser("identity", help="identities in the keystore")
    identity_commands = commands.add_subparsers(identity, dest="identity_command", metavar="IDENTITY_COMMAND")
    identity_list = identity_commands.add_parser("list", help="identities of the running daemon")
    identity_list.add_argument("--json", action="store_true")
    imported = identity_commands.add_parser(
        "import", help="check a credential, copy it into an identity's folder and add the identity to config.toml"
    )
    imported.add_argument("file", help="PEM bundle, certificate (with --key), or PKCS#12 file")
    imported.add_argument("--key", help="the private key, when FILE holds only the certificate")
    imported.add_argument("--name", required=True, help="identity to import into (added to config.toml if new)")
    password = imported.add_mutually_exclusive_group()
    password.add_argument("--password-env", metavar="VAR", help="environment variable with the file's password")
    password.add_argument(
        "--password-keyring",
        metavar="SERVICE/USER",
        help="OS keyring entry with the password (keyring set SERVICE USER)",
    )
    new = identity_commands.add_parser("new", help="issue a dev-CA certificate into the keystore and config.toml")
    new.add_argument("name")
    new.add_argument("--lifetime", help="e.g. 2m, 8h, 7d (default: the identity's, else 7d)")
    new.add_argument("--subject", help='RFC 4514 subject (default: the identity\'s, else "CN=NAME")')

    autostart = commands.add_parser("autostart", help="start the daemon and the tray when you log in")
    autostart_commands = commands.add_subparsers(autostart, dest="autostart_command", metavar="AUTOSTART_COMMAND")
    for name, text in (
        ("install", "install (or update) launch at login for this user; idempotent"),
        ("uninstall", "remove launch at login; config, keystore and logs are kept"),
        ("status", "what is installed, and whether it points at this installation"),
    ):
        sub = autostart_commands.add_parser(name, help=text)
        sub.add_argument("--json", action="store_true")
        sub.add_argument(
            "--method",
            choices=["systemd", "xdg"],
            help="Linux: a systemd user unit (default where systemd runs) or XDG autostart entries only",
        )
    return parser


def _add_route_flags(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """The flags of `route add` (listen and target required) and `route set` (any of them)."""
    parser.add_argument("name")
    parser.add_argument("--listen", required=required, help="127.0.0.1:PORT, [::1]:PORT or unix:/path")
    parser.add_argument("--target", required=required, help="HOST:PORT of the mTLS service")
    parser.add_argument("--server-name", dest="server_name")
    parser.add_argument("--ca-file", dest="ca_file", help="PEM file of the CA(s) that issued the server's certificate")
    parser.add_argument("--identity")
    parser.add_argument("--alpn", action="append", default=[], help="repeatable")
    parser.add_argument(
        "--protocol", choices=("tcp", "postgres", "mysql", "http"), help="what the local client speaks (default tcp)"
    )
    parser.add_argument("--postgres-negotiation", dest="postgres_negotiation", choices=("sslrequest", "direct"))
    parser.add_argument(
        "--local-tls", dest="local_tls", action="store_true", default=None, help="postgres/mysql: TLS to the client too"
    )
    parser.add_argument("--host-header", dest="host_header", help="http: the Host every request gets")
    parser.add_argument("--json", action="store_true")


def _add_common_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--home", default=default, help="keep config, keystore, CA, logs and socket under this folder")
    parser.add_argument("--config", default=default, help="config file (default: in the config folder)")
    parser.add_argument("--log-level", default=default, choices=["debug", "info", "warning", "error"])


class _Commands:
    """Sub-command factory that gives every sub-command the common options."""

    def __init__(
        self, action: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
    ) -> None:
        self._action = action
        self._common = common

    def add_parser(self, name: str, **kwargs: object) -> argparse.ArgumentParser:
        return self._action.add_parser(name, parents=[self._common], **kwargs)  # type: ignore[arg-type]

    def add_subparsers(self, parser: argparse.ArgumentParser, dest: str, metavar: str) -> _Commands:
        return _Commands(parser.add_subparsers(dest=dest, metavar=metavar, required=True), self._common)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # now rather than at exit, so that a reader gone away is caught below
    except BrokenPipeError:  # `mtls-sidecar status | head -1`: the reader has all it wanted
        _discard_stdout()
        return EXIT_PIPE_CLOSED
    return code


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush at exit cannot fail again."""
    with contextlib.suppress(OSError, ValueError):  # no real file behind stdout (tests): nothing to do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    places = resolve_places(home=args.home, config=args.config)
    try:
        if args.command == "run":
            return _cmd_run(places, args)
        if args.command == "tunnel":
            from sidecar.cli.tunnel import run_tunnel

            return run_tunnel(args)
        if args.command in _REMOTE or (args.command == "identity" and args.identity_command == "list"):
            return _remote(places, args)
        if args.command == "identity" and args.identity_command == "import":
            from sidecar.cli.identity import cmd_identity_import

            return cmd_identity_import(places, args)
        if args.command == "ca" and args.ca_command == "server":
            return _cmd_ca_server(places, args)
        if args.command == "ca":
            return _cmd_ca_export(places)
        if args.command == "identity":
            from sidecar.cli.identity import cmd_identity_new

            return cmd_identity_new(places, args)
        if args.command == "autostart":
            from sidecar.cli.autostart import cmd_autostart

            return cmd_autostart(places, args)
        if args.command == "proxy":
            from sidecar.cli.proxy import cmd_proxy

            return cmd_proxy(places, args)
    except ConfigError as exc:
        print(f"mtls-sidecar: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SidecarError as exc:
        print(f"mtls-sidecar: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:
        raise  # main() ends quietly with 141
    except OSError as exc:  # a folder or file the OS refused us: one line, as every error, never a traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"mtls-sidecar: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE  # not reached: parser.error exits


def _cmd_run(places: Places, args: argparse.Namespace) -> int:
    from sidecar.instance import InstanceLock

    # First, before any log, config, socket or port is opened: one daemon per data folder, whatever
    # its runtime folder. A second one stops here (exit 1), naming the first one's pid and address.
    with InstanceLock(places.lock_file).hold(places.control_socket, places.config_file) as lock:
        return _run_daemon(places, args, lock)


def _run_daemon(places: Places, args: argparse.Namespace, lock: InstanceLock) -> int:
    import logging

    from sidecar import eventloop, logsetup
    from sidecar.control.server import ControlServer
    from sidecar.daemon import Daemon, log_file_path
    from sidecar.firstrun import load_or_create_config
    from sidecar.instance import tell_starter_ready
    from sidecar.limits import raise_open_file_limit

    logsetup.configure(args.log_level or "info", log_file_path(places))
    raise_open_file_limit()  # two descriptors per tunnelled connection
    config, _ = load_or_create_config(places)
    log = logging.getLogger("sidecar.cli")
    if args.log_level is None:
        logging.getLogger("sidecar").setLevel(config.log_level.upper())
    log.info(
        "mtls-sidecar %s: config %s, keystore %s",
        __version__,
        places.config_file,
        config.keystore_dir or places.keystore,
    )
    if places.run_fallback:  # said once, here; the client commands name the socket when it is not there
        log.info("%s: the runtime folder (control socket) is %s, yours only (0700)", places.run_fallback, places.run)

    async def serve() -> bool:
        """True when a second Ctrl-C cut the shutdown short."""
        daemon = Daemon(config, places)
        control = ControlServer(
            daemon, places.control_socket, transport=config.control, control_file=places.control_file
        )
        await control.start()  # before any port: a daemon of another data folder on this socket stops here
        lock.record_control(control.address)
        tell_starter_ready()  # the tray that started us may connect now
        try:
            await daemon.start()
            demo = daemon.listeners.get("demo")
            if demo is not None and demo.is_running and demo.bound is not None:
                log.info("try it: curl http://%s/", demo.bound)
            await daemon.run_until_stopped()
        finally:
            await control.stop()
        return daemon.forced

    return EXIT_INTERRUPTED if eventloop.run(serve()) else EXIT_OK


def _cmd_ca_export(places: Places) -> int:
    from sidecar.devca import load_or_create_ca

    ca = load_or_create_ca(places.ca, datetime.now(UTC))
    sys.stdout.write(ca.cert_pem.decode())
    return EXIT_OK


_REMOTE = ("status", "use", "renew", "check", "route")


def _remote(places: Places, args: argparse.Namespace) -> int:
    from sidecar.cli import control as cli_control
    from sidecar.control.client import ApiCallError, DaemonNotRunning

    commands = {
        "status": cli_control.cmd_status,
        "use": cli_control.cmd_use,
        "renew": cli_control.cmd_renew,
        "check": cli_control.cmd_check,
        "route": cli_control.cmd_route,
        "identity": cli_control.cmd_identity_list,
    }
    try:
        return commands[args.command](places, args)
    except DaemonNotRunning as exc:
        print(f"mtls-sidecar: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except ApiCallError as exc:
        print(f"mtls-sidecar: {exc}", file=sys.stderr)
        return EXIT_USAGE if exc.status in (400, 404, 405) else EXIT_FAILURE


def _cmd_ca_server(places: Places, args: argparse.Namespace) -> int:
    from sidecar.devca import load_or_create_ca
    from sidecar.files import PRIVATE_FILE_MODE, atomic_write
    from sidecar.names import inside, server_name_problem
    from sidecar.units import parse_duration

    try:
        lifetime = parse_duration(args.lifetime)
    except ValueError as exc:
        raise ConfigError(str(exc), source="command line", field="--lifetime", value=args.lifetime) from exc
    for name in args.names:  # the first also names the files: a DNS name cannot lead out of --out
        problem = server_name_problem(name)
        if problem is not None:
            raise ConfigError(problem, source="command line", field="NAME", value=name)
    now = datetime.now(UTC)
    issued = load_or_create_ca(places.ca, now).issue_server(args.names, timedelta(seconds=lifetime), now)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.names[0].replace("*", "wildcard").replace(":", "_")
    key_file, cert_file = inside(out, f"{stem}.key"), inside(out, f"{stem}.crt")
    atomic_write(key_file, issued.key_pem(), PRIVATE_FILE_MODE)
    atomic_write(cert_file, issued.cert_pem(), 0o644)
    print(f"wrote {out / (stem + '.crt')} (certificate and dev CA chain) and {out / (stem + '.key')} (mode 0600)")
    print("clients verify it with the dev CA: mtls-sidecar ca export > dev-ca.pem")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
