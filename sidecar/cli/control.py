"""CLI commands that read or change the running daemon, through the control API only.

Each run is a fresh interpreter, often one that finds no daemon: what only an answer needs (json,
the status table, the control client's HTTP) is imported where the answer is used, not here.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sidecar.control.client import ApiCallError, ControlClient
from sidecar.errors import ConfigError
from sidecar.paths import Places

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3


def client_for(places: Places) -> ControlClient:
    """The daemon of this runtime folder, on either transport (control.json first, else the socket)."""
    return ControlClient.for_places(places)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if getattr(args, "json", False):
        import json

        print(json.dumps(data, indent=2))
    else:
        print(text)


def cmd_status(places: Places, args: argparse.Namespace) -> int:
    status = client_for(places).get("/v1/status")
    other = foreign_daemon(status, places)
    if other:
        print(f"mtls-sidecar: warning: {other}", file=sys.stderr)
    if args.json:
        import json

        print(json.dumps(status, indent=2))
    else:
        from sidecar.statusview import render_status

        sys.stdout.write(render_status(status, datetime.now(UTC), colour=sys.stdout.isatty()))
    return EXIT_OK


def foreign_daemon(status: dict[str, Any], places: Places) -> str | None:
    """Why the daemon that answered is not the one of this command's config and data folder, or None.

    One runtime folder can serve several homes (`XDG_RUNTIME_DIR` unset: /run/user/UID), so the
    socket may belong to a daemon started with another HOME, MTLS_SIDECAR_HOME or config.
    """
    theirs = (status.get("config") or {}).get("path")
    data = (status.get("daemon") or {}).get("data_folder")
    differs = [
        f"{what} {there}, not {here}"
        for what, there, here in (
            ("config", theirs, places.config_file),
            ("data folder", data, places.lock_file.parent),
        )
        if there and not _same_path(there, here)
    ]
    if not differs:
        return None
    pid = (status.get("daemon") or {}).get("pid")
    address = ((status.get("daemon") or {}).get("control") or {}).get("address") or places.control_socket
    return (
        f"the daemon answering on {address}"
        + (f" (pid {pid})" if pid else "")
        + f" runs {' and '.join(differs)} (this command's). It was started with another HOME, MTLS_SIDECAR_HOME "
        "or MTLS_SIDECAR_CONFIG: run this command with the same settings, or give each its own XDG_RUNTIME_DIR"
    )


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def cmd_use(places: Places, args: argparse.Namespace) -> int:
    client = client_for(places)
    if args.route:
        status = client.post(f"/v1/routes/{args.route}/identity", {"name": args.name})
        text = f"route {args.route} now presents identity {args.name} on new connections"
    else:
        status = client.post("/v1/active-identity", {"name": args.name})
        text = f"active identity is now {args.name}; open connections keep the identity they started with"
    _emit(args, status, text)
    return EXIT_OK


def cmd_renew(places: Places, args: argparse.Namespace) -> int:
    """Ask for a renewal and wait (up to --wait) for its outcome on the events stream."""
    from sidecar.units import parse_duration

    try:
        wait = parse_duration(args.wait)
    except ValueError as exc:
        raise ConfigError(str(exc), source="command line", field="--wait", value=args.wait) from exc
    client = client_for(places)
    path = f"/v1/identities/{args.name}/renew"
    if args.no_wait:
        answer = client.post(path)
        _emit(args, answer, f"renewal of {args.name} started; follow it with `mtls-sidecar status`")
        return EXIT_OK
    deadline = time.monotonic() + wait
    with contextlib.closing(client.events(timeout=wait)) as events:
        next(events)  # the greeting: from here on no event is missed, so ask now
        client.post(path)
        try:
            for event in events:
                if event.get("identity") == args.name and event["type"] in ("renewal.succeeded", "renewal.failed"):
                    _emit(args, event, _renewal_outcome(event))
                    return EXIT_OK if event["type"] == "renewal.succeeded" else EXIT_FAILURE
                if time.monotonic() > deadline:
                    break
        except TimeoutError:
            pass
    print(
        f"mtls-sidecar: the renewal of {args.name} has not finished after {args.wait}; "
        "it goes on in the daemon: follow it with `mtls-sidecar status`",
        file=sys.stderr,
    )
    return EXIT_FAILURE


def _renewal_outcome(event: dict[str, Any]) -> str:
    name = event["identity"]
    if event["type"] == "renewal.succeeded":
        expires = event["not_after"].replace("T", " ").replace("Z", " UTC")
        return f"renewed {name}: serial {event['serial']}, expires {expires} (took {event['seconds']:.1f} s)"
    retry = event.get("retry_at")
    again = f"; it is tried again at {retry.replace('T', ' ').replace('Z', ' UTC')}" if retry else ""
    return f"renewal of {name} failed ({event['provider']}): {event['error']}{again}; the current certificate stays"


def cmd_route(places: Places, args: argparse.Namespace) -> int:
    client = client_for(places)
    if args.route_command == "list":
        routes = client.get("/v1/routes")
        lines = [
            f"{name:<12} {r['listen']} → {r['target']}  {r.get('protocol', 'tcp')}  as {r['identity']}  "
            f"{r.get('health', r['state'])}"
            for name, r in routes.items()
        ]
        _emit(args, routes, "\n".join(lines) or "no routes")
        return EXIT_OK
    if args.route_command == "rm":
        answer = client.delete(f"/v1/routes/{args.name}")
        _emit(args, answer, f"route {args.name} removed; its open connections finish on their own")
        return EXIT_OK
    fields: dict[str, Any] = {}
    for key in _ROUTE_FLAG_KEYS:
        value = getattr(args, key)
        if value is not None:
            fields[key] = str(Path(value).absolute()) if key == "ca_file" else value
    if args.alpn:
        fields["alpn"] = args.alpn
    try:
        if args.route_command == "set":
            if not fields:
                raise ConfigError("nothing to change", source="command line", hint="give any flag of `route add`")
            route = client.patch(f"/v1/routes/{args.name}", fields)
            text = f"route {args.name} changed: {route['listen']} → {route['target']} as {route['identity']}"
        else:
            route = client.post("/v1/routes", {"name": args.name, **fields})
            text = f"route {args.name}: listening on {route['listen']} → {route['target']} as {route['identity']}"
    except ApiCallError as exc:
        raise _as_flag_error(exc) from None
    _emit(args, route, text)
    return EXIT_OK


# The `route add` / `route set` flags, by the route key each one sets (`--ca-file` sets ca_file).
_ROUTE_FLAG_KEYS = (
    "listen",
    "target",
    "server_name",
    "ca_file",
    "identity",
    "protocol",
    "postgres_negotiation",
    "local_tls",
    "host_header",
)


def _as_flag_error(exc: ApiCallError) -> Exception:
    """A refused route key said as the flag the user typed: `--ca-file`, not a line of config.toml."""
    body = exc.body if isinstance(exc.body, dict) else {}
    key = body.get("field")
    if exc.status != 400 or not body.get("message") or key not in (*_ROUTE_FLAG_KEYS, "alpn"):
        return exc
    flag = "--" + str(key).replace("_", "-")
    value, hint = body.get("value"), body.get("hint")
    return ConfigError(body["message"], source="command line", field=flag, value=value, hint=hint)


def cmd_identity_list(places: Places, args: argparse.Namespace) -> int:
    status = client_for(places).get("/v1/status")
    from sidecar.statusview import countdown

    now = datetime.now(UTC)
    lines = []
    for name, identity in status["identities"].items():
        selected = identity.get("selected")
        marker = "*" if name == status["active_identity"] else " "
        cert = f"{selected['subject']} {countdown(selected['not_after'], now)}" if selected else "no usable certificate"
        lines.append(f"{marker} {name:<12} {cert}  ({identity['renewal']['provider']}: {identity['renewal']['state']})")
    _emit(args, status["identities"], "\n".join(lines) or "no identities")
    return EXIT_OK


def cmd_check(places: Places, args: argparse.Namespace) -> int:
    if (args.route is None) == (args.via_proxy is None):
        print("mtls-sidecar: check needs a ROUTE or --via-proxy HOST:PORT (one of them)", file=sys.stderr)
        return EXIT_USAGE
    if args.via_proxy is not None:
        result = client_for(places).post("/v1/proxy/check", {"destination": args.via_proxy})
    else:
        result = client_for(places).post(f"/v1/routes/{args.route}/check")
    text = ("ok: " if result["ok"] else "problem: ") + result["message"]
    if args.via_proxy is not None:
        rule = result.get("rule")
        text += (
            f" (proxy rule {rule}" + (f", as {result['identity']})" if result.get("identity") else ")") if rule else ""
        )
    presented = presented_line(result)
    if presented:
        text += f"\n{presented}"
    if result.get("fix"):
        text += f"\nfix: {result['fix']}"
    for warning in (result.get("details") or {}).get("warnings", []):
        text += f"\nwarning: {warning}"
    _emit(args, result, text)
    return EXIT_OK if result["ok"] else EXIT_FAILURE


def presented_line(result: dict[str, Any], now: datetime | None = None) -> str | None:
    """Which client certificate `check` presented: "presented: dev's CN=dev, issued by …, expires in 6 days (…)"."""
    details = result.get("details") or {}
    cert = details.get("client_certificate")
    if not cert:
        return None
    from sidecar.statusview import countdown

    when = countdown(cert.get("not_after"), now or datetime.now(UTC))
    where = f" from {cert['file']}" if cert.get("file") else ""
    return (
        f"presented: {details.get('identity', '?')}'s {cert['subject']}, issued by {cert['issuer']}, "
        f"{when} ({cert.get('not_after')}){where}"
    )
