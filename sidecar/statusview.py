"""The status document → a readable table for `mtls-sidecar status`. Pure: takes `now`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

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

    lines = [f"mtls-sidecar {status.get('version', '?')}  active identity: {status.get('active_identity') or '-'}"]
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
        if not selected and identity.get("problem"):
            row.notes.append(f"  {paint(identity['problem'], 'dim')}")
        identities.append(row)
    lines += _table(identities, _IDENTITY_WIDTHS, paint)
    lines.append("")
    routes: list[_Row] = [_Row(("ROUTE", "LISTEN → TARGET", "AS", "STATE", "CONNECTIONS"))]
    for name, route in status.get("routes", {}).items():
        path = f"{route['listen']} → {route['target']}"
        kind = "ok" if route["state"] == "up" else "bad"
        conns = f"{route['active_connections']} open, {route['total_connections']} total"
        failed = sum(route.get("failures", {}).values())
        if failed:
            conns += f", {failed} failed"
        row = _Row((f" {name}", path, route["identity"], route["state"], conns), (None, None, None, kind, None))
        if route.get("last_error") and (route["state"] != "up" or failed):
            row.notes.append(f"  {paint(route['last_error'], 'dim')}")
        routes.append(row)
    lines += _table(routes, _ROUTE_WIDTHS, paint)
    for warning in status.get("warnings", []):
        lines.append(paint(f"warning: {warning}", "warn"))
    return "\n".join(lines) + "\n"


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
