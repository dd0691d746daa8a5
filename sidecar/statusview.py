"""The status document → a readable table for `mtls-sidecar status`. Pure: takes `now`."""

from __future__ import annotations

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


def render_status(status: dict[str, Any], now: datetime, colour: bool = False) -> str:
    def paint(text: str, kind: str) -> str:
        return f"\033[{_COLOURS[kind]}m{text}\033[0m" if colour else text

    lines = [f"mtls-sidecar {status.get('version', '?')}  active identity: {status.get('active_identity') or '-'}"]
    lines.append("")
    lines.append("IDENTITY      CERTIFICATE                          RENEWAL")
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
        lines.append(f"{marker}{name:<12} {paint(f'{cert:<36}', kind)} {paint(renewal_text, state_kind)}")
        if not selected and identity.get("problem"):
            lines.append(f"  {paint(identity['problem'], 'dim')}")
    lines.append("")
    lines.append("ROUTE         LISTEN → TARGET                                  AS           STATE   CONNECTIONS")
    for name, route in status.get("routes", {}).items():
        path = f"{route['listen']} → {route['target']}"
        kind = "ok" if route["state"] == "up" else "bad"
        conns = f"{route['active_connections']} open, {route['total_connections']} total"
        failed = sum(route.get("failures", {}).values())
        if failed:
            conns += f", {failed} failed"
        state = paint(f"{route['state']:<7}", kind)
        lines.append(f" {name:<12} {path:<48} {route['identity']:<12} {state} {conns}")
        if route.get("last_error") and (route["state"] != "up" or failed):
            lines.append(f"  {paint(route['last_error'], 'dim')}")
    for warning in status.get("warnings", []):
        lines.append(paint(f"warning: {warning}", "warn"))
    return "\n".join(lines) + "\n"
