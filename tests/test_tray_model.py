"""The tray's logic, pure: status JSON in → icon state, tooltip, menu, notifications out."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tray.model import (
    IconState,
    MenuItem,
    NotificationMemory,
    build_menu,
    cause_words,
    check_notification,
    icon_state,
    notifications_for,
    tooltip,
    view,
)

# Runs anywhere: pure logic, or loopback sockets only (the macOS and Windows CI jobs run it).
pytestmark = pytest.mark.portable

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


def route(
    state: str = "up", open_: int = 2, ident: str = "dev", verify: bool = True, health: str | None = "ok"
) -> dict[str, Any]:
    """A route as status shows it; health None: as a daemon from before route health showed it."""
    shown: dict[str, Any] = {
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
    if health is not None:
        shown["health"] = health
        shown["failing"] = None
    return shown


def failing_route(cause: str = "server_rejected_certificate", count: int = 4) -> dict[str, Any]:
    return {
        **route(open_=0),
        "health": "failing",
        "failing": {"since": stamp(-timedelta(minutes=12)), "cause": cause, "count": count},
        "failures": {cause: count},
        "last_error": "api.example.test:443 rejected our client certificate (TLS alert: unknown ca)",
        "last_error_at": stamp(-timedelta(minutes=1)),
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
        (with_(healthy(), ("routes", "api"), route(state="error", health="stopped")), IconState.ERROR),
        (with_(healthy(), ("routes", "api"), route(state="no_certificate", health="no_certificate")), IconState.ERROR),
        # listening fine, but every connection fails: red, not green
        (with_(healthy(), ("routes", "api"), failing_route()), IconState.ERROR),
        # nothing tried yet is no trouble
        (with_(healthy(), ("routes", "api"), route(health="idle")), IconState.OK),
        # expires inside the warning horizon and will not be renewed (the daemon says so): amber
        (
            with_(healthy(), ("identities", "dev", "expiry_warning"), "identity dev: its certificate …"),
            IconState.WARNING,
        ),
        # a daemon from before route health: its listener state decides
        (with_(healthy(), ("routes", "api"), route(state="error", health=None)), IconState.ERROR),
        (with_(healthy(), ("routes", "api"), route(health=None)), IconState.OK),
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
        "route-stopped",
        "route-without-certificate",
        "route-failing",
        "route-idle",
        "expiry-warning",
        "old-daemon-route-error",
        "old-daemon-route-up",
    ],
)
def test_icon_state(status: dict[str, Any] | None, expected: IconState) -> None:
    assert icon_state(status, NOW) is expected


def test_tooltip() -> None:
    assert tooltip(healthy(), NOW) == "dev · expires in 5 d · 3 routes OK"
    failing = with_(healthy(), ("routes", "db"), failing_route())
    assert tooltip(failing, NOW) == (
        "dev · expires in 5 d · 1 of 3 routes failing: the server refused our client certificate"
    )
    stopped = with_(healthy(), ("routes", "db"), route(state="error", health="stopped"))
    assert tooltip(stopped, NOW) == "dev · expires in 5 d · 1 of 3 routes failing: not listening"
    warned = with_(healthy(), ("identities", "dev", "expiry_warning"), "identity dev: …")
    assert tooltip(warned, NOW) == "dev · expires in 5 d · 3 routes OK · not renewed"
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


def test_failing_routes_are_counted_first_and_marked_with_their_reason_and_a_check_item() -> None:
    status = with_(with_(healthy(), ("routes", "db"), failing_route()), ("routes", "cache"), route(health="idle"))
    menu = build_menu(status, NOW)
    assert [item.text for item in menu[:2]] == [
        "1 of 3 routes failing: the server refused our client certificate",
        "dev · expires in 5 d",
    ]
    assert not menu[0].enabled and menu[0].action is None
    routes = {item.text.split()[0]: item for item in find(menu, "Routes").submenu}
    assert routes["db"].text == "db  127.0.0.1:8443 → api.example.test:443 · 0 open · ✗ failing"
    assert routes["cache"].text == "cache  127.0.0.1:8443 → api.example.test:443 · 2 open"  # idle is no trouble
    db = routes["db"].submenu
    assert [(i.text, i.action, i.enabled) for i in db[:3]] == [
        ("Failing for 12 min (4 failed): the server refused our client certificate", None, False),
        (
            "Fix: check that the server trusts the identity's issuer and that the certificate allows clientAuth",
            None,
            False,
        ),
        ("Check db now", "check:db", True),
    ]
    assert db[3].text == "-" and db[4].action == "copy:db"
    assert [i.action for i in routes["cache"].submenu][:1] == ["copy:cache"]  # no Check clutter on a fine route
    # without a certificate, or not listening: said in words, with a Check item too
    bare = with_(healthy(), ("routes", "db"), route(state="no_certificate", health="no_certificate"))
    db = next(i for i in find(build_menu(bare, NOW), "Routes").submenu if i.text.startswith("db "))
    assert [i.text for i in db.submenu[:3]] == [
        "Its identity has no usable certificate",
        "Fix: put a valid certificate and key in the identity's keystore folder (`mtls-sidecar identity import FILE "
        "--name IDENTITY`); `mtls-sidecar status` says whether its renewal can get one",
        "Check db now",
    ]
    stopped = {**route(state="error", health="stopped"), "last_error": "route db: cannot listen on …: address in use"}
    db = next(
        i
        for i in find(build_menu(with_(healthy(), ("routes", "db"), stopped), NOW), "Routes").submenu
        if i.text.startswith("db ")
    )
    assert db.text.endswith("· ✗ stopped") and db.submenu[0].text == "route db: cannot listen on …: address in use"


def test_cause_words_leave_out_the_readme_detail_and_survive_unknown_keys() -> None:
    assert cause_words("server_rejected_certificate") == "the server refused our client certificate"
    assert cause_words("refused") == "nothing listens at the target's port"
    assert cause_words("a_cause_from_a_newer_daemon") == "a cause from a newer daemon"
    assert cause_words(None) == "unknown cause"


def test_notifications_name_the_route_or_identity_and_the_fix() -> None:
    memory = NotificationMemory()
    status = healthy()
    assert notifications_for({"type": "hello"}, status, NOW, memory) == []  # nothing to say
    renewed = notifications_for(
        {"type": "renewal.succeeded", "identity": "dev", "not_after": stamp(timedelta(days=7))}, status, NOW, memory
    )
    assert renewed[0].title == "Certificate renewed" and "dev: new certificate" in renewed[0].message
    failed = {"type": "renewal.failed", "identity": "dev", "error": "CA down", "consecutive_failures": 1}
    [note] = notifications_for(failed, status, NOW, memory)
    assert note.title == "Renewal of dev failing"
    assert note.message.startswith("CA down. The current certificate keeps serving meanwhile; fix that, then ")
    assert "Renew dev now" in note.message and "`mtls-sidecar renew dev`" in note.message
    assert notifications_for({**failed, "consecutive_failures": 2}, status, NOW, memory) == []

    # a route that starts failing: once per route and cause; ok again clears it
    failing = {
        "type": "route.health",
        "route": "api",
        "health": "failing",
        "previous": "ok",
        "cause": "server_rejected_certificate",
        "error": "api.example.test:443 rejected our client certificate (TLS alert: unknown ca)",
    }
    [note] = notifications_for(failing, status, NOW, memory)
    assert note.title == "Route api is failing"
    assert note.message == (
        "api.example.test:443 rejected our client certificate (TLS alert: unknown ca). "
        "Fix: check that the server trusts the identity's issuer and that the certificate allows clientAuth"
    )
    assert notifications_for(failing, status, NOW, memory) == []  # the same news once (reconnects, repeats)
    refused = {**failing, "cause": "refused", "error": "connection to api.example.test:443 refused"}
    assert notifications_for(refused, status, NOW, memory)[0].message.endswith(
        "Fix: start the service, or correct the target's port"
    )
    assert notifications_for({"type": "route.health", "route": "api", "health": "ok"}, status, NOW, memory) == []
    assert notifications_for(refused, status, NOW, memory)[0].title == "Route api is failing"  # a new streak

    route_error = notifications_for(
        {"type": "route.error", "route": "db", "error": "route db: cannot listen"}, status, NOW, memory
    )
    assert (route_error[0].title, route_error[0].message) == ("Route db could not start", "route db: cannot listen")
    rejected = {"type": "config.rejected", "error": "config.toml:3: routes.x.listen: bad"}
    assert notifications_for(rejected, status, NOW, memory)[0].message == (
        "config.toml:3: routes.x.listen: bad. The previous config keeps running until the file is fixed."
    )


def test_expiry_warnings_come_from_the_daemon_once_per_certificate() -> None:
    memory = NotificationMemory()
    warning = 'identity ci-bot: its certificate expires in 20 hours (…) and will not be renewed (renew = "none"): …'
    status = with_(healthy(), ("identities", "ci-bot", "expiry_warning"), warning)
    [note] = notifications_for({"type": "hello"}, status, NOW, memory)
    assert (note.title, note.message) == ("Certificate of ci-bot expires soon", warning)
    assert notifications_for({"type": "route.up"}, status, NOW, memory) == []  # once per certificate
    renewed = with_(status, ("identities", "ci-bot", "selected", "serial"), "cd")
    assert [n.title for n in notifications_for({"type": "x"}, renewed, NOW, memory)] == [
        "Certificate of ci-bot expires soon"
    ]
    # 20 hours left but being renewed normally: the daemon gives no warning, the tray says nothing
    assert notifications_for({"type": "hello"}, healthy(), NOW, NotificationMemory()) == []


def test_an_identity_left_without_a_certificate_is_announced_once_with_what_to_do() -> None:
    memory = NotificationMemory()
    gone = with_(healthy(), ("identities", "ci-bot"), identity(None, state="expired", provider="none"))
    gone["identities"]["ci-bot"]["folder"] = "/k/ci-bot"
    gone["identities"]["ci-bot"]["problem"] = "identity 'ci-bot' has no usable certificate (x.pem: expired 1 day ago)"
    [note] = notifications_for({"type": "certificate.selected"}, gone, NOW, memory)
    assert note.title == "ci-bot has no usable certificate"
    assert note.message == (
        "identity 'ci-bot' has no usable certificate (x.pem: expired 1 day ago); its routes refuse connections. "
        "put a valid certificate and key in /k/ci-bot."
    )
    assert notifications_for({"type": "x"}, gone, NOW, memory) == []
    assert notifications_for({"type": "x"}, healthy(), NOW, memory) == []  # back: forgotten, so a new loss is told
    assert len(notifications_for({"type": "x"}, gone, NOW, memory)) == 1


def test_check_results_as_notifications() -> None:
    ok = check_notification(
        "api", {"ok": True, "cause": "ok", "message": "api:443: OK: TLSv1.3", "fix": None, "details": {"warnings": []}}
    )
    assert (ok.title, ok.message) == ("Check api: OK", "api:443: OK: TLSv1.3")
    bad = check_notification(
        "db",
        {
            "ok": False,
            "cause": "refused",
            "message": "db:5432: connection refused",
            "fix": "start the service",
            "details": {"warnings": ["identity dev: its certificate expires in 2 days …"]},
        },
    )
    assert bad.title == "Check db: nothing listens at the target's port"
    assert bad.message.splitlines() == [
        "db:5432: connection refused",
        "Fix: start the service",
        "Warning: identity dev: its certificate expires in 2 days …",
    ]


def test_a_route_open_to_other_machines_is_a_warning_and_says_so_in_its_label() -> None:
    status = with_(healthy(), ("routes", "api", "unsafe_listen"), True)
    assert icon_state(healthy(), NOW) == IconState.OK
    assert icon_state(status, NOW) == IconState.WARNING
    labels = [item.text for item in build_menu(status, NOW)] + [
        sub.text for item in build_menu(status, NOW) for sub in item.submenu
    ]
    assert any(label.startswith("api ") and "reachable from other machines" in label for label in labels), labels
    assert not any(label.startswith("db ") and "reachable" in label for label in labels)
