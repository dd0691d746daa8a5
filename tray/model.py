"""What the tray shows, as plain data: status (and events) in → icon state, tooltip, menu,
notifications out. No pystray, no sockets, no clock: `now` is passed in."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sidecar.causes import Cause
from sidecar.statusview import parse_time
from sidecar.units import human_duration

# How far ahead of expiry a certificate that is not being renewed earns a notification.
WARNING_WINDOW = timedelta(days=1)


class IconState(StrEnum):
    OK = "ok"
    WARNING = "warning"
    ERROR = "error"
    DISCONNECTED = "disconnected"


@dataclass(frozen=True)
class MenuItem:
    text: str
    action: str | None = None  # an action id (see ACTIONS); None for a label or a submenu
    checked: bool | None = None  # None: not a check item
    radio: bool = False
    enabled: bool = True
    default: bool = False
    submenu: tuple[MenuItem, ...] = ()


SEPARATOR = MenuItem("-")


@dataclass(frozen=True)
class TrayView:
    state: IconState
    tooltip: str
    menu: tuple[MenuItem, ...]


@dataclass(frozen=True)
class Notification:
    title: str
    message: str


# Action ids: "use:IDENTITY", "route-identity:ROUTE:IDENTITY" ("" = follow the active one),
# "renew:IDENTITY", "copy:ROUTE", "open-config", "open-logs", "start-daemon", "quit".


def short_duration(delta: timedelta) -> str:
    """ "5 d", "3 h", "12 min", "40 s" — compact, for menus and tooltips."""
    seconds = abs(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def expiry_text(identity: dict[str, Any], now: datetime) -> str:
    selected = identity.get("selected")
    if not selected:
        return "no usable certificate"
    not_after = parse_time(selected.get("not_after"))
    if not_after is None:
        return "unknown expiry"
    if not_after <= now:
        return f"expired {short_duration(now - not_after)} ago"
    return f"expires in {short_duration(not_after - now)}"


def _identity_trouble(identity: dict[str, Any], now: datetime) -> IconState:
    selected = identity.get("selected")
    not_after = parse_time(selected.get("not_after")) if selected else None
    if not selected or (not_after is not None and not_after <= now):
        return IconState.ERROR
    renewal = identity.get("renewal") or {}
    state = renewal.get("state")
    if state in ("failing", "renew_due"):
        return IconState.WARNING
    next_at = parse_time(renewal.get("next_renewal_at"))
    if next_at is not None and next_at <= now and state != "renewing":
        return IconState.WARNING  # within its renewal window and not yet renewed
    return IconState.OK


def icon_state(status: dict[str, Any] | None, now: datetime) -> IconState:
    """ok: all identities valid and routes up; warning: renewal window, renewal failing,
    verification off; error: an identity without a usable certificate, a route failing;
    disconnected: no daemon."""
    if status is None:
        return IconState.DISCONNECTED
    states = [_identity_trouble(i, now) for i in status.get("identities", {}).values()]
    for route in status.get("routes", {}).values():
        if route.get("state") != "up":
            states.append(IconState.ERROR)
        if route.get("verify") is False:
            states.append(IconState.WARNING)
    if status.get("warnings"):
        states.append(IconState.WARNING)
    for worst in (IconState.ERROR, IconState.WARNING):
        if worst in states:
            return worst
    return IconState.OK


def tooltip(status: dict[str, Any] | None, now: datetime, error: str | None = None) -> str:
    """ "dev · expires in 5 d · 3 routes OK" """
    if status is None:
        return "mtls-sidecar · daemon not running" + (f" ({error})" if error else "")
    active = status.get("active_identity") or "no identity"
    identity = status.get("identities", {}).get(active, {})
    routes = status.get("routes", {})
    failing = [name for name, r in routes.items() if r.get("state") != "up"]
    route_text = (
        f"{len(routes)} route{'s' if len(routes) != 1 else ''} OK"
        if not failing
        else f"{len(failing)} of {len(routes)} route{'s' if len(routes) != 1 else ''} failing"
    )
    parts = [active, expiry_text(identity, now), route_text]
    renewal = identity.get("renewal") or {}
    if renewal.get("state") == "failing":
        parts.append("renewal failing")
    return " · ".join(parts)


def build_menu(status: dict[str, Any] | None, now: datetime, *, autostart: bool | None = None) -> tuple[MenuItem, ...]:
    """The tray menu. `autostart` None leaves "Start at login" out (no launch-at-login support)."""
    items: list[MenuItem] = []
    if status is None:
        items += [
            MenuItem("mtls-sidecar is not running", enabled=False),
            MenuItem("Start daemon", action="start-daemon", default=True),
            SEPARATOR,
        ]
    else:
        identities = status.get("identities", {})
        active = status.get("active_identity") or ""
        if active in identities:
            items.append(MenuItem(f"{active} · {expiry_text(identities[active], now)}", enabled=False))
        items.append(
            MenuItem(
                "Switch identity",
                submenu=tuple(
                    MenuItem(
                        f"{name} · {expiry_text(identity, now)}",
                        action=f"use:{name}",
                        checked=name == active,
                        radio=True,
                    )
                    for name, identity in identities.items()
                ),
                enabled=bool(identities),
            )
        )
        items.append(MenuItem("Routes", submenu=_routes_menu(status), enabled=bool(status.get("routes"))))
        if active in identities:
            items.append(
                MenuItem(
                    f"Renew {active} now",
                    action=f"renew:{active}",
                    enabled=(identities[active].get("renewal") or {}).get("provider") != "none",
                )
            )
        items.append(SEPARATOR)
    items += [MenuItem("Open config", action="open-config"), MenuItem("Open logs folder", action="open-logs")]
    if autostart is not None:
        items.append(MenuItem("Start at login", action="toggle-autostart", checked=autostart))
    items += [SEPARATOR, MenuItem("Quit tray", action="quit")]
    return tuple(items)


def _routes_menu(status: dict[str, Any]) -> tuple[MenuItem, ...]:
    identities = list(status.get("identities", {}))
    entries = []
    for name, route in status.get("routes", {}).items():
        opened = route.get("active_connections", 0)
        state = "" if route.get("state") == "up" else f" · {route.get('state')}"
        protocol = route.get("protocol") or "tcp"
        speaks = "" if protocol == "tcp" else f" · {protocol}"  # tcp is the default: said only when it is not
        label = f"{name}  {route['listen']} → {route['target']}{speaks} · {opened} open{state}"
        current = route.get("identity")
        choices = tuple(
            MenuItem(
                f"as {identity}", action=f"route-identity:{name}:{identity}", checked=identity == current, radio=True
            )
            for identity in identities
        )
        entries.append(
            MenuItem(
                label, submenu=(MenuItem(f"Copy address {route['listen']}", action=f"copy:{name}"), SEPARATOR, *choices)
            )
        )
    return tuple(entries)


def view(
    status: dict[str, Any] | None, now: datetime, *, error: str | None = None, autostart: bool | None = None
) -> TrayView:
    return TrayView(icon_state(status, now), tooltip(status, now, error), build_menu(status, now, autostart=autostart))


@dataclass
class NotificationMemory:
    """What was already said, so a certificate's expiry is announced once, not on every event."""

    expiring: set[str] = field(default_factory=set)
    rejected: set[str] = field(default_factory=set)


def notifications_for(
    event: dict[str, Any], status: dict[str, Any] | None, now: datetime, memory: NotificationMemory
) -> list[Notification]:
    """The notifications one event (plus the status after it) deserves."""
    kind = event.get("type")
    out: list[Notification] = []
    if kind == "renewal.succeeded":
        not_after = parse_time(event.get("not_after"))
        until = f", valid until {not_after:%Y-%m-%d %H:%M} UTC" if not_after else ""
        out.append(Notification("Certificate renewed", f"{event.get('identity')}: new certificate{until}"))
    elif kind == "renewal.failed" and event.get("consecutive_failures") in (1, 3, 10):
        # the first failure, and a few reminders; not every hourly retry
        out.append(Notification("Renewal failing", f"{event.get('identity')}: {event.get('error')}"))
    elif kind == "route.error":
        out.append(Notification("Route could not start", str(event.get("error"))))
    elif kind == "route.failure" and event.get("reason") == Cause.SERVER_REJECTED_CERT:
        key = f"{event.get('route')}:{event.get('error')}"
        if key not in memory.rejected:  # once per route and cause, not per connection
            memory.rejected.add(key)
            fix = Cause.SERVER_REJECTED_CERT.fix
            out.append(Notification("Server rejected our certificate", f"{event.get('error')}; {fix}"))
    if status is not None:
        out += _expiring(status, now, memory)
    return out


def _expiring(status: dict[str, Any], now: datetime, memory: NotificationMemory) -> list[Notification]:
    out = []
    for name, identity in status.get("identities", {}).items():
        selected = identity.get("selected")
        not_after = parse_time(selected.get("not_after")) if selected else None
        if not_after is None or selected is None:
            continue
        key = f"{name}:{selected.get('serial')}"
        if now < not_after <= now + WARNING_WINDOW and key not in memory.expiring:
            memory.expiring.add(key)
            out.append(Notification("Certificate expiring", f"{name}: expires in {human_duration(not_after - now)}"))
    return out


def utc_now() -> datetime:
    return datetime.now(UTC)
