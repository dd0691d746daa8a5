"""What the tray shows, as plain data: status (and events) in → icon state, tooltip, menu,
notifications out. No pystray, no sockets, no clock: `now` is passed in."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sidecar.causes import Cause
from sidecar.statusview import parse_time

# Route health (README, "Route health") that makes the icon red: the route does not work now.
ROUTE_TROUBLE = ("failing", "no_certificate", "stopped")


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
# "renew:IDENTITY", "copy:ROUTE", "copy-proxy:url" / "copy-proxy:pac_url" (the proxy's address or PAC URL),
# "check:ROUTE", "open-config", "open-logs", "start-daemon", "quit".


def route_health(route: dict[str, Any]) -> str:
    """ok, failing, idle, no_certificate or stopped; from a daemon before health, its listener state."""
    health = route.get("health")
    if isinstance(health, str):
        return health
    state = route.get("state")
    return {"up": "ok", "error": "stopped"}.get(str(state), str(state))


def cause_words(cause: str | None) -> str:
    """A cause key in plain words, short enough for a menu: "the server refused our client certificate"."""
    if cause is None:
        return "unknown cause"
    try:
        text = Cause(cause).text
    except ValueError:  # a key this tray does not know (a newer daemon)
        return cause.replace("_", " ")
    return text.split(" (")[0]  # the part in brackets is for the README's table


def route_trouble(route: dict[str, Any]) -> str:
    """Why a route in trouble does not work, in words."""
    health = route_health(route)
    if health == "failing":
        return cause_words((route.get("failing") or {}).get("cause"))
    if health == "no_certificate":
        return "its identity has no usable certificate"
    if health == "stopped":
        return "not listening"
    return health


def route_fix(route: dict[str, Any]) -> str | None:
    health = route_health(route)
    cause = (route.get("failing") or {}).get("cause") if health == "failing" else None
    if health == "no_certificate":
        cause = Cause.NO_USABLE_CERT
    try:
        return Cause(cause).fix if cause else None
    except ValueError:
        return None


def troubled_routes(status: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, r) for name, r in status.get("routes", {}).items() if route_health(r) in ROUTE_TROUBLE]


def routes_summary(status: dict[str, Any]) -> str:
    """ "3 routes OK", or "2 of 12 routes failing: <the first one's cause in words>"."""
    routes = status.get("routes", {})
    plural = "s" if len(routes) != 1 else ""
    troubled = troubled_routes(status)
    if not troubled:
        return f"{len(routes)} route{plural} OK"
    return f"{len(troubled)} of {len(routes)} route{plural} failing: {route_trouble(troubled[0][1])}"


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
    if identity.get("expiry_warning"):
        return IconState.WARNING  # expires soon and will not be renewed in time
    renewal = identity.get("renewal") or {}
    state = renewal.get("state")
    if state in ("failing", "renew_due"):
        return IconState.WARNING
    next_at = parse_time(renewal.get("next_renewal_at"))
    if next_at is not None and next_at <= now and state != "renewing":
        return IconState.WARNING  # within its renewal window and not yet renewed
    return IconState.OK


def icon_state(status: dict[str, Any] | None, now: datetime) -> IconState:
    """ok: all identities valid and no route in trouble; warning: an expiry warning, renewal
    window, renewal failing, verification off, a route open to other machines (unsafe_listen);
    error: an identity without a usable certificate, a route failing, without a certificate or
    not listening; disconnected: no daemon."""
    if status is None:
        return IconState.DISCONNECTED
    states = [_identity_trouble(i, now) for i in status.get("identities", {}).values()]
    for route in status.get("routes", {}).values():
        if route_health(route) in ROUTE_TROUBLE:
            states.append(IconState.ERROR)
        if route.get("verify") is False or route.get("unsafe_listen"):
            states.append(IconState.WARNING)
    if status.get("warnings"):
        states.append(IconState.WARNING)
    for worst in (IconState.ERROR, IconState.WARNING):
        if worst in states:
            return worst
    return IconState.OK


def tooltip(status: dict[str, Any] | None, now: datetime, error: str | None = None) -> str:
    """ "dev · expires in 5 d · 3 routes OK", "dev · expires in 5 d · 1 of 3 routes failing: <why>" """
    if status is None:
        return "mtls-sidecar · daemon not running" + (f" ({error})" if error else "")
    active = status.get("active_identity") or "no identity"
    identity = status.get("identities", {}).get(active, {})
    parts = [active, expiry_text(identity, now), routes_summary(status)]
    renewal = identity.get("renewal") or {}
    if renewal.get("state") == "failing":
        parts.append("renewal failing")
    elif identity.get("expiry_warning"):
        parts.append("not renewed")
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
        if troubled_routes(status):
            items.append(MenuItem(routes_summary(status), enabled=False))
        if active in identities:
            not_renewed = " · not renewed" if identities[active].get("expiry_warning") else ""
            items.append(MenuItem(f"{active} · {expiry_text(identities[active], now)}{not_renewed}", enabled=False))
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
        items.append(MenuItem("Routes", submenu=_routes_menu(status, now), enabled=bool(status.get("routes"))))
        proxy = status.get("proxy") or {}
        if proxy.get("enabled"):
            items.append(_proxy_menu(proxy))
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


def _routes_menu(status: dict[str, Any], now: datetime) -> tuple[MenuItem, ...]:
    identities = list(status.get("identities", {}))
    entries = []
    for name, route in status.get("routes", {}).items():
        opened = route.get("active_connections", 0)
        troubled = route_health(route) in ROUTE_TROUBLE
        mark = f" · ✗ {route_health(route).replace('_', ' ')}" if troubled else ""
        protocol = route.get("protocol") or "tcp"
        speaks = "" if protocol == "tcp" else f" · {protocol}"  # tcp is the default: said only when it is not
        unsafe = " · ⚠ reachable from other machines" if route.get("unsafe_listen") else ""
        label = f"{name}  {route['listen']} → {route['target']}{speaks} · {opened} open{mark}{unsafe}"
        current = route.get("identity")
        choices = tuple(
            MenuItem(
                f"as {identity}", action=f"route-identity:{name}:{identity}", checked=identity == current, radio=True
            )
            for identity in identities
        )
        trouble = (*_trouble_items(name, route, now), SEPARATOR) if troubled else ()
        entries.append(
            MenuItem(
                label,
                submenu=(
                    *trouble,
                    MenuItem(f"Copy address {route['listen']}", action=f"copy:{name}"),
                    SEPARATOR,
                    *choices,
                ),
            )
        )
    return tuple(entries)


def _proxy_menu(proxy: dict[str, Any]) -> MenuItem:
    """ "Proxy 127.0.0.1:18888 · 2 rules", with its addresses to copy and each rule as a line."""
    rules = proxy.get("rules") or []
    state = "" if proxy.get("state") == "up" else f" · ✗ {proxy.get('state')}"
    label = f"Proxy {proxy.get('listen')} · {len(rules)} rule{'s' if len(rules) != 1 else ''}{state}"
    lines = []
    for rule in rules:
        hosts = ", ".join(rule.get("hosts") or [])
        who = "passthrough" if rule.get("passthrough") else f"as {rule.get('identity')}"
        failed = sum((rule.get("failures") or {}).values())
        trouble = f" · {failed} failed" if failed else ""
        lines.append(
            MenuItem(
                f"{rule.get('name')}: {hosts} · {who} · {rule.get('connections', 0)} connections{trouble}",
                enabled=False,
            )
        )
    if proxy.get("state") != "up" and proxy.get("last_error"):
        lines.insert(0, MenuItem(str(proxy["last_error"]), enabled=False))
    return MenuItem(
        label,
        submenu=(
            *lines,
            SEPARATOR,
            MenuItem(f"Copy proxy address {proxy.get('url')}", action="copy-proxy:url"),
            MenuItem(f"Copy PAC URL {proxy.get('pac_url')}", action="copy-proxy:pac_url"),
        ),
    )


def _trouble_items(name: str, route: dict[str, Any], now: datetime) -> tuple[MenuItem, ...]:
    """What is wrong with a route, what to do, and a Check item (labels are disabled items)."""
    why = route_trouble(route)
    failing = route.get("failing") or {}
    since = parse_time(failing.get("since"))
    if since is not None:
        count = failing.get("count", 0)
        why = f"Failing for {short_duration(now - since)} ({count} failed): {why}"
    elif route_health(route) == "stopped" and route.get("last_error"):
        why = str(route["last_error"])
    else:
        why = why[0].upper() + why[1:]
    items = [MenuItem(why, enabled=False)]
    fix = route_fix(route)
    if fix:
        items.append(MenuItem(f"Fix: {fix}", enabled=False))
    items.append(MenuItem(f"Check {name} now", action=f"check:{name}"))
    return tuple(items)


def view(
    status: dict[str, Any] | None,
    now: datetime,
    *,
    error: str | None = None,
    autostart: bool | None = None,
    notice: str | None = None,
) -> TrayView:
    """`notice`: the latest notification, shown atop the menu where the tray cannot notify (macOS)."""
    menu = build_menu(status, now, autostart=autostart)
    if notice:
        menu = (MenuItem(notice, enabled=False), SEPARATOR, *menu)
    return TrayView(icon_state(status, now), tooltip(status, now, error), menu)


@dataclass
class NotificationMemory:
    """What was already said, so each thing is announced once, not on every event or reconnect."""

    expiring: set[str] = field(default_factory=set)  # identity:serial with an expiry warning
    unusable: set[str] = field(default_factory=set)  # identities without a usable certificate
    failing: dict[str, str | None] = field(default_factory=dict)  # route → the cause announced


def notifications_for(
    event: dict[str, Any], status: dict[str, Any] | None, now: datetime, memory: NotificationMemory
) -> list[Notification]:
    """The notifications one event (plus the status after it) deserves. Each names the route or
    identity it is about, and says what to do when something is to be done."""
    kind = event.get("type")
    out: list[Notification] = []
    if kind == "renewal.succeeded":
        not_after = parse_time(event.get("not_after"))
        until = f", valid until {not_after:%Y-%m-%d %H:%M} UTC" if not_after else ""
        out.append(Notification("Certificate renewed", f"{event.get('identity')}: new certificate{until}"))
    elif kind == "renewal.failed" and event.get("consecutive_failures") in (1, 3, 10):
        # the first failure, and a few reminders; not every hourly retry
        identity = event.get("identity")
        out.append(
            Notification(
                f"Renewal of {identity} failing",
                f"{event.get('error')}. The current certificate keeps serving meanwhile; "
                f"fix that, then choose Renew {identity} now (or run `mtls-sidecar renew {identity}`).",
            )
        )
    elif kind == "route.error":
        out.append(Notification(f"Route {event.get('route')} could not start", str(event.get("error"))))
    elif kind == "route.health":
        out += _route_health(event, memory)
    elif kind == "config.rejected":
        out.append(
            Notification(
                "config.toml not applied",
                f"{event.get('error')}. The previous config keeps running until the file is fixed.",
            )
        )
    if status is not None:
        out += _identity_news(status, memory)
    return out


def _route_health(event: dict[str, Any], memory: NotificationMemory) -> list[Notification]:
    """A route that starts failing (or fails for a new cause) is announced once; ok clears it."""
    route, health, cause = str(event.get("route")), event.get("health"), event.get("cause")
    if health != "failing":
        memory.failing.pop(route, None)
        return []
    if route in memory.failing and memory.failing[route] == cause:
        return []
    memory.failing[route] = cause
    message = str(event.get("error") or cause_words(cause))
    fix = route_fix({"health": "failing", "failing": {"cause": cause}})
    return [Notification(f"Route {route} is failing", f"{message}. Fix: {fix}" if fix else message)]


def _identity_news(status: dict[str, Any], memory: NotificationMemory) -> list[Notification]:
    """Expiry warnings (the daemon decides: it knows the horizon and the renewal), once per
    certificate; an identity left without a usable certificate, once until it has one again."""
    out = []
    for name, identity in status.get("identities", {}).items():
        selected = identity.get("selected")
        warning = identity.get("expiry_warning")
        if selected and warning:
            key = f"{name}:{selected.get('serial')}"
            if key not in memory.expiring:
                memory.expiring.add(key)
                out.append(Notification(f"Certificate of {name} expires soon", str(warning)))
        if selected:
            memory.unusable.discard(name)
        elif name not in memory.unusable:
            memory.unusable.add(name)
            provider = (identity.get("renewal") or {}).get("provider")
            folder = identity.get("folder") or "its keystore folder"
            fix = (
                f"put a valid certificate and key in {folder}"
                if provider == "none"
                else f"choose Renew {name} now, or put a valid certificate and key in {folder}"
            )
            problem = identity.get("problem") or f"identity {name!r} has no usable certificate"
            out.append(
                Notification(f"{name} has no usable certificate", f"{problem}; its routes refuse connections. {fix}.")
            )
    return out


def check_notification(route: str, result: dict[str, Any]) -> Notification:
    """What `Check ROUTE now` found (the control API's check answer), as a notification."""
    lines = [str(result.get("message", ""))]
    if result.get("fix"):
        lines.append(f"Fix: {result['fix']}")
    lines += [f"Warning: {w}" for w in (result.get("details") or {}).get("warnings", [])]
    title = f"Check {route}: OK" if result.get("ok") else f"Check {route}: {cause_words(result.get('cause'))}"
    return Notification(title, "\n".join(lines))


def utc_now() -> datetime:
    return datetime.now(UTC)
