"""The tray's logic, pure: status JSON in → icon state, tooltip, menu, notifications out."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tray.model import IconState, MenuItem, NotificationMemory, build_menu, icon_state, notifications_for, tooltip, view

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def stamp(delta: timedelta) -> str:
    return (NOW + delta).strftime("%Y-%m-%dT%H:%M:%SZ")


def identity(
    expires_in: timedelta | None,
    state: str = "valid",
    provider: str = "local-ca",
    next_in: timedelta = timedelta(days=3),
) -> dict[str, Any]:
    selected = (
        None
        if expires_in is None
        else {
            "serial": "ab",
            "subject": "CN=x",
            "issuer": "CN=ca",
            "not_before": stamp(-timedelta(days=2)),
            "not_after": stamp(expires_in),
            "file": "/k/x.pem",
        }
    )
    return {
        "selected": selected,
        "candidates": [],
        "renewal": {
            "provider": provider,
            "state": state,
            "next_renewal_at": stamp(next_in),
            "last_renewed_at": None,
            "last_error": None,
        },
    }


def route(state: str = "up", open_: int = 2, ident: str = "dev", verify: bool = True) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:8443",
        "target": "api.example.test:443",
        "server_name": "api.example.test",
        "identity": ident,
        "state": state,
        "active_connections": open_,
        "total_connections": 9,
        "bytes_in": 1,
        "bytes_out": 1,
        "failures": {},
        "last_error": None,
        "verify": verify,
    }


def healthy() -> dict[str, Any]:
    return {
        "version": "0.1.0",
        "active_identity": "dev",
        "identities": {"dev": identity(timedelta(days=5)), "ci-bot": identity(timedelta(hours=20))},
        "routes": {"api": route(), "db": route(open_=0), "cache": route(open_=1)},
        "warnings": [],
    }


def with_(status: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(status)
    target = changed
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return changed


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (healthy(), IconState.OK),
        (None, IconState.DISCONNECTED),
        (with_(healthy(), ("identities", "dev"), identity(timedelta(days=1), state="renew_due")), IconState.WARNING),
        (with_(healthy(), ("identities", "dev"), identity(timedelta(days=1), state="failing")), IconState.WARNING),
        # within the renewal window and not renewed yet
        (
            with_(healthy(), ("identities", "dev"), identity(timedelta(days=1), next_in=-timedelta(hours=1))),
            IconState.WARNING,
        ),
        (with_(healthy(), ("routes", "api"), route(verify=False)), IconState.WARNING),
        (with_(healthy(), ("warnings",), ["config.toml was not applied: …"]), IconState.WARNING),
        (with_(healthy(), ("identities", "dev"), identity(None, state="expired")), IconState.ERROR),
        (with_(healthy(), ("identities", "dev"), identity(-timedelta(minutes=1))), IconState.ERROR),
        (with_(healthy(), ("routes", "api"), route(state="error")), IconState.ERROR),
        (with_(healthy(), ("routes", "api"), route(state="no_certificate")), IconState.ERROR),
    ],
    ids=[
        "ok",
        "daemon-down",
        "renew-due",
        "renewal-failing",
        "in-window",
        "verify-off",
        "config-warning",
        "no-certificate",
        "expired",
        "route-error",
        "route-without-certificate",
    ],
)
def test_icon_state(status: dict[str, Any] | None, expected: IconState) -> None:
    assert icon_state(status, NOW) is expected


def test_tooltip() -> None:
    assert tooltip(healthy(), NOW) == "dev · expires in 5 d · 3 routes OK"
    failing = with_(healthy(), ("routes", "db"), route(state="error"))
    assert tooltip(failing, NOW) == "dev · expires in 5 d · 1 of 3 routes failing"
    renewal = with_(healthy(), ("identities", "dev"), identity(timedelta(hours=3), state="failing"))
    assert tooltip(renewal, NOW) == "dev · expires in 3 h · 3 routes OK · renewal failing"
    assert tooltip(None, NOW) == "mtls-sidecar · daemon not running"
    assert tooltip(None, NOW, error="the daemon answered an error: boom").endswith(
        "(the daemon answered an error: boom)"
    )


def find(menu: tuple[MenuItem, ...], text_start: str) -> MenuItem:
    return next(item for item in menu if item.text.startswith(text_start))


def test_menu_when_running() -> None:
    menu = build_menu(healthy(), NOW)
    texts = [item.text for item in menu]
    assert texts[0] == "dev · expires in 5 d"
    assert texts[1:4] == ["Switch identity", "Routes", "Renew dev now"]
    assert texts[-4:] == ["Open config", "Open logs folder", "-", "Quit tray"]
    assert "Start at login" not in texts  # no launch-at-login yet: no dead item
    assert "Start daemon" not in texts
    switch = find(menu, "Switch identity").submenu
    assert [(i.text, i.action, i.checked, i.radio) for i in switch] == [
        ("dev · expires in 5 d", "use:dev", True, True),
        ("ci-bot · expires in 20 h", "use:ci-bot", False, True),
    ]
    routes = find(menu, "Routes").submenu
    assert routes[0].text == "api  127.0.0.1:8443 → api.example.test:443 · 2 open"
    with_pg = with_(healthy(), ("routes", "db"), {**route(open_=0), "protocol": "postgres"})
    db = next(i for i in find(view(with_pg, NOW).menu, "Routes").submenu if i.text.startswith("db "))
    assert db.text == "db  127.0.0.1:8443 → api.example.test:443 · postgres · 0 open"
    api = routes[0].submenu
    assert api[0].action == "copy:api"
    assert [(i.text, i.action, i.checked) for i in api[2:]] == [
        ("as dev", "route-identity:api:dev", True),
        ("as ci-bot", "route-identity:api:ci-bot", False),
    ]
    assert find(menu, "Renew dev now").action == "renew:dev"


def test_menu_when_the_daemon_is_down_and_with_autostart() -> None:
    menu = build_menu(None, NOW, autostart=False)
    start = find(menu, "Start daemon")
    assert start.action == "start-daemon" and start.default
    assert find(menu, "Start at login").checked is False
    assert not any(item.text == "Switch identity" for item in menu)


def test_renew_is_disabled_for_renew_none() -> None:
    status = with_(healthy(), ("identities", "dev"), identity(timedelta(days=5), provider="none"))
    assert find(build_menu(status, NOW), "Renew dev now").enabled is False


def test_view_bundles_everything() -> None:
    result = view(healthy(), NOW)
    assert result.state is IconState.OK and result.tooltip.startswith("dev") and result.menu


def test_notifications() -> None:
    memory = NotificationMemory()
    status = healthy()  # ci-bot expires in 20 h: inside the 1-day warning window
    first = notifications_for({"type": "hello"}, status, NOW, memory)
    assert [(n.title, n.message) for n in first] == [("Certificate expiring", "ci-bot: expires in 20 hours")]
    assert notifications_for({"type": "route.up"}, status, NOW, memory) == []  # once per certificate
    renewed = notifications_for(
        {"type": "renewal.succeeded", "identity": "dev", "not_after": stamp(timedelta(days=7))}, status, NOW, memory
    )
    assert renewed[0].title == "Certificate renewed" and "dev: new certificate" in renewed[0].message
    failed = {"type": "renewal.failed", "identity": "dev", "error": "CA down", "consecutive_failures": 1}
    assert notifications_for(failed, status, NOW, memory)[0].message == "dev: CA down"
    assert notifications_for({**failed, "consecutive_failures": 2}, status, NOW, memory) == []
    rejected = {
        "type": "route.failure",
        "route": "api",
        "reason": "server_rejected_certificate",
        "error": "x rejected our client certificate (TLS alert: unknown ca)",
    }
    assert notifications_for(rejected, status, NOW, memory)[0].title == "Server rejected our certificate"
    assert notifications_for(rejected, status, NOW, memory) == []  # once per route and cause
    assert (
        notifications_for(
            {"type": "route.failure", "reason": "connect", "route": "api", "error": "e"}, status, NOW, memory
        )
        == []
    )
    route_error = notifications_for({"type": "route.error", "error": "cannot listen"}, status, NOW, memory)
    assert route_error[0].title == "Route could not start"
