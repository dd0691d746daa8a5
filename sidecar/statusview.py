"""The status document → a readable table for `mtls-sidecar status`. Pure: takes `now`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import PurePath
from typing import Any

from sidecar.causes import Cause, quoted_all
from sidecar.units import human_duration

_COLOURS = {"ok": "32", "warn": "33", "bad": "31", "dim": "2"}


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def countdown(not_after: str | None, now: datetime) -> str:
    moment = parse_time(not_after)
    if moment is None:
        return "no certificate"
    if moment <= now:
        return f"expired {human_duration(now - moment)} ago"
    return f"expires in {human_duration(moment - now)}"


# Each table's columns are at least this wide (its look with everyday values), and as wide as
# their longest value: a long subject or route name pushes the columns after it, for every row.
_IDENTITY_WIDTHS = (13, 36, 0)
_ROUTE_WIDTHS = (13, 48, 12, 7, 0)


def render_status(status: dict[str, Any], now: datetime, colour: bool = False) -> str:
    def paint(text: str, kind: str) -> str:
        return f"\033[{_COLOURS[kind]}m{text}\033[0m" if colour else text

    status = quoted_all(status)  # names and errors may come from a server: no control character reaches the terminal
    lines = [f"mtls-sidecar {status.get('version', '?')}  active identity: {status.get('active_identity') or '-'}"]
    config = (status.get("config") or {}).get("path")
    if config:  # which daemon answered: with another HOME or runtime folder it may not be the one you meant
        daemon = status.get("daemon") or {}
        pid, loop = daemon.get("pid"), daemon.get("loop")
        about = ", ".join(part for part in (f"daemon pid {pid}" if pid else "", f"{loop} loop" if loop else "") if part)
        lines.append(f"config: {config}" + (f" ({about})" if about else ""))
        control = daemon.get("control") or {}
        refused = control.get("unauthorized") or 0
        if refused:  # the loopback transport: some local program tried the port without the token
            lines.append(
                f"control API {control.get('address', '?')}: refused {refused} request(s) without the token "
                "from control.json (a local program that is not your CLI or tray tried it)"
            )
    lines.append("")
    identities: list[_Row] = [_Row(("IDENTITY", "CERTIFICATE", "RENEWAL"))]
    for name, identity in status.get("identities", {}).items():
        selected = identity.get("selected")
        renewal = identity.get("renewal") or {}
        marker = "*" if name == status.get("active_identity") else " "
        if selected:
            cert = f"{selected['subject']}, {countdown(selected['not_after'], now)}"
            kind = "ok"
        else:
            cert = "no usable certificate"
            kind = "bad"
        state = renewal.get("state") or "-"
        renewal_text = f"{renewal.get('provider', '-')}: {state}"
        if renewal.get("next_renewal_at") and state in ("valid", "failing", "renew_due"):
            renewal_text += f", next {renewal['next_renewal_at'].replace('T', ' ').replace('Z', ' UTC')}"
        if renewal.get("last_error"):
            renewal_text += f" ({renewal['last_error']})"
        state_kind = {"valid": "ok", "renew_due": "warn", "renewing": "warn", "failing": "warn"}.get(state, "bad")
        row = _Row((f"{marker}{name}", cert, renewal_text), (None, kind, state_kind))
        row.notes += [f"  {paint(note, 'dim')}" for note in identity_notes(identity)]
        identities.append(row)
    lines += _table(identities, _IDENTITY_WIDTHS, paint)
    lines.append("")
    routes: list[_Row] = [_Row(("ROUTE", "LISTEN → TARGET", "AS", "STATE", "CONNECTIONS"))]
    for name, route in status.get("routes", {}).items():
        path = f"{route['listen']} → {route['target']}"
        # STATE is the route's health (README, "Route health"); a daemon from before health, its listener state
        health = route.get("health") or route["state"]
        kind = _HEALTH_KINDS.get(health, "bad")
        conns = f"{route['active_connections']} open, {route['total_connections']} total"
        failed = sum(route.get("failures", {}).values())
        if failed:
            conns += f", {failed} failed"
        row = _Row((f" {name}", path, route["identity"], health, conns), (None, None, None, kind, None))
        row.notes += [f"  {paint(note, 'dim')}" for note in route_notes(route, now)]
        warm_line = warm_note(route.get("warm"))
        if warm_line:
            row.notes.append(f"  {paint(warm_line, 'dim')}")
        if route.get("upstream_proxy"):
            row.notes.append(f"  {paint('through the upstream proxy ' + route['upstream_proxy'], 'dim')}")
        routes.append(row)
    lines += _table(routes, _ROUTE_WIDTHS, paint)
    proxy = status.get("proxy") or {}
    if proxy.get("enabled"):
        lines.append("")
        lines += proxy_lines(proxy, paint)
    for warning in status.get("warnings", []):
        lines.append(paint(f"warning: {warning}", "warn"))
    return "\n".join(lines) + "\n"


_RULE_WIDTHS = (13, 30, 12, 0)
_DESTINATION_WIDTHS = (25, 13, 12, 7, 0)
SHOWN_DESTINATIONS = 10  # the most recent; `status --json` has them all


def proxy_lines(proxy: dict[str, Any], paint: Callable[[str, str], str]) -> list[str]:
    """The proxy: its address and PAC URL, each rule, and the destinations reached lately."""
    state = proxy.get("state", "?")
    refused = sum((proxy.get("refused") or {}).values())
    head = (
        f"PROXY {proxy.get('url')} ({state}) · PAC {proxy.get('pac_url')} · {proxy.get('connections', 0)} connections"
    )
    if refused:
        head += f", {refused} refused"
    lines = [paint(head, "ok" if state == "up" else "bad")]
    if proxy.get("last_error"):
        lines.append(f"  {paint(proxy['last_error'], 'bad')}")
    elif proxy.get("last_refusal"):
        lines.append(f"  {paint('last refused: ' + proxy['last_refusal'], 'dim')}")
    rules: list[_Row] = [_Row(("RULE", "HOSTS", "AS", "CONNECTIONS"))]
    for rule in proxy.get("rules") or []:
        who = "passthrough" if rule.get("passthrough") else str(rule.get("identity"))
        conns = f"{rule.get('active_connections', 0)} open, {rule.get('connections', 0)} total"
        failed = sum((rule.get("failures") or {}).values())
        if failed:
            conns += f", {failed} failed"
        row = _Row((f" {rule.get('name')}", ", ".join(rule.get("hosts") or []), who, conns))
        if rule.get("last_error"):
            row.notes.append(f"  {paint('last error: ' + rule['last_error'], 'dim')}")
        rules.append(row)
    lines += _table(rules, _RULE_WIDTHS, paint)
    destinations = proxy.get("destinations") or []
    if destinations:
        rows: list[_Row] = [_Row(("DESTINATION", "RULE", "AS", "HEALTH", "CONNECTIONS"))]
        for dest in destinations[:SHOWN_DESTINATIONS]:
            host = f"[{dest['host']}]" if ":" in dest["host"] else dest["host"]
            health = dest.get("health", "?")
            conns = (
                f"{dest.get('connections', 0)} total, {dest.get('bytes_in', 0)} B in, {dest.get('bytes_out', 0)} B out"
            )
            rows.append(
                _Row(
                    (f" {host}:{dest['port']}", str(dest.get("rule")), str(dest.get("identity") or "-"), health, conns),
                    (None, None, None, _HEALTH_KINDS.get(health, "bad"), None),
                )
            )
        lines += _table(rows, _DESTINATION_WIDTHS, paint)
        if len(destinations) > SHOWN_DESTINATIONS:
            lines.append(paint(f"  … and {len(destinations) - SHOWN_DESTINATIONS} more (status --json)", "dim"))
    return lines


def identity_notes(identity: dict[str, Any]) -> list[str]:
    """The lines under an identity's row: every candidate that cannot be used, and why, even
    when another one is presented (an import that did not take is seen at once)."""
    unusable = [c for c in identity.get("candidates") or [] if not c.get("usable")]
    if unusable:
        return [f"unusable: {PurePath(c['file']).name}: {c['reason']}" for c in unusable]
    if not identity.get("selected") and identity.get("problem"):
        return [identity["problem"]]
    return []


_HEALTH_KINDS = {"ok": "ok", "up": "ok", "idle": "dim", "failing": "bad", "no_certificate": "bad", "stopped": "bad"}


def warm_note(warm: dict[str, Any] | None) -> str | None:
    """ "warm: 2 ready (preconnect 2), 41 joined at once, 3 connected the usual way"."""
    if not warm:
        return None
    text = (
        f"warm: {warm.get('ready', 0)} ready (preconnect {warm.get('preconnect')}), "
        f"{warm.get('hits', 0)} joined at once, {warm.get('misses', 0)} connected the usual way"
    )
    if warm.get("last_error"):
        text += f"; not warming: {warm['last_error']}"
    return text


def route_notes(route: dict[str, Any], now: datetime) -> list[str]:
    """The lines under a route's row: why it fails and what to do, or when it last failed."""
    error = route.get("last_error")
    failing = route.get("failing")
    if route.get("health") == "failing" and failing:
        since = parse_time(failing.get("since"))
        count = failing.get("count", 0)
        how_long = f" for {human_duration(now - since)}" if since else ""
        notes = [f"failing{how_long} ({count} connection{'s' if count != 1 else ''} failed): {error}"]
        if failing.get("cause") in Cause.__members__.values():  # not one a newer daemon added
            notes.append(f"fix: {Cause(failing['cause']).fix}")
        return notes
    if not error:
        return []
    at = parse_time(route.get("last_error_at"))
    if route.get("health") in ("ok", "idle") and at is not None:
        return [f"last error {human_duration(now - at)} ago: {error}"]
    if route.get("health") is None and route["state"] == "up" and not route.get("failures"):
        return []
    return [error]


@dataclass
class _Row:
    cells: tuple[str, ...]
    kinds: tuple[str | None, ...] = ()
    notes: list[str] = field(default_factory=list)  # lines shown under the row, outside the columns


def _table(rows: list[_Row], minimum: tuple[int, ...], paint: Callable[[str, str], str]) -> list[str]:
    """Rows padded to shared column widths (measured before colour codes are added)."""
    widths = [max(least, *(len(row.cells[i]) for row in rows)) for i, least in enumerate(minimum)]
    lines = []
    for row in rows:
        cells = []
        for i, text in enumerate(row.cells):
            padded = text if i == len(row.cells) - 1 else text.ljust(widths[i])
            kind = row.kinds[i] if i < len(row.kinds) else None
            cells.append(paint(padded, kind) if kind else padded)
        lines.append(" ".join(cells).rstrip())
        lines += row.notes
    return lines
