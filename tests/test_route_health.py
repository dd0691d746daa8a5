"""Route health and expiry warnings, end to end: a real daemon, real TLS servers on loopback.

A route whose every connection fails is `failing` (with its cause, since when, how many) in
status, its JSON, the table, events and the tray's model; once the server is fixed, the next
connection that gets an answer makes it `ok`. A certificate that expires inside the warning
horizon and will not be renewed gets a `warning:` in status, an event, a line in `check`, and
an amber tray.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from sidecar.cli import main
from sidecar.control.client import ControlClient
from sidecar.statusview import parse_time
from tests.daemon_runner import DaemonThread
from tests.pki import CA, Leaf, now
from tests.scenario import Pki, mtls_server, recv_all, route_to, write_config
from tests.tlsserver import ScriptedTLSServer
from tests.waiting import wait_until
from tray.model import IconState, NotificationMemory, build_menu, icon_state, notifications_for, tooltip


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


def follow(client: ControlClient) -> list[dict[str, Any]]:
    """Collect the daemon's events on a thread, from now on."""
    seen: list[dict[str, Any]] = []

    def run() -> None:
        try:
            for event in client.events():
                seen.append(event)
        except OSError:
            pass  # the daemon stopped

    threading.Thread(target=run, daemon=True).start()
    wait_until(lambda: any(e["type"] == "hello" for e in seen), timeout=5, what="the events stream")
    return seen


def exchange(daemon: DaemonThread, route: str, data: bytes) -> bytes:
    """One connection through the route: send, half-close, read to the end (a reset ends it too)."""
    with daemon.connect(route) as sock:
        sock.sendall(data)
        with contextlib.suppress(OSError):  # already reset by the tunnel
            sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def health_events(seen: list[dict[str, Any]], route: str) -> list[tuple[str, str | None]]:
    return [(e["health"], e["cause"]) for e in seen if e["type"] == "route.health" and e["route"] == route]


def test_a_route_that_fails_every_connection_is_failing_until_the_server_is_fixed(
    pki: Pki, isolated_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stranger = CA("Someone Else's Client CA").write_root(tmp_path / "other-client-ca.pem")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
    # The server trusts another client CA: it rejects our certificate (a TLS alert after the handshake).
    with ScriptedTLSServer(
        cert=pki.server_cert, key=pki.server_key, client_ca=stranger, require_client_cert=True, mode="echo"
    ) as server:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={"api": route_to(pki, server.port)},
        )
        with DaemonThread(config) as daemon:
            seen = follow(daemon.client())
            before = daemon.client().get("/v1/status")["routes"]["api"]
            assert (before["health"], before["state"], before["failing"]) == ("idle", "up", None)
            assert before["last_success"] is None and before["last_error_at"] is None

            for _ in range(3):
                assert exchange(daemon, "api", b"ping\n") == b""
            failing = wait_until(
                lambda: (
                    (r := daemon.client().get("/v1/status")["routes"]["api"])["failing"]
                    and r["failing"]["count"] == 3
                    and r
                ),
                timeout=10,
                what="three failed connections counted",
            )
            assert failing["health"] == "failing" and failing["state"] == "up"  # the listener itself is fine
            assert failing["failing"]["cause"] == "server_rejected_certificate"
            assert failing["failures"] == {"server_rejected_certificate": 3}
            since, error_at = parse_time(failing["failing"]["since"]), parse_time(failing["last_error_at"])
            assert since is not None and error_at is not None and since <= error_at <= now()
            assert failing["last_success"] is None
            assert "rejected our client certificate" in failing["last_error"]

            # everywhere people look: the CLI's table and JSON, the tray
            assert main(["status"]) == 0
            table = capsys.readouterr().out
            assert re.search(r" api\s+127\.0\.0\.1:\d+ → 127\.0\.0\.1:\d+\s+dev\s+failing", table), table
            assert "(3 connections failed): " in table and "\n  fix: check that the server trusts" in table
            assert main(["status", "--json"]) == 0
            assert json.loads(capsys.readouterr().out)["routes"]["api"]["health"] == "failing"
            status = daemon.client().get("/v1/status")
            assert icon_state(status, now()) is IconState.ERROR
            menu = build_menu(status, now())
            assert menu[0].text == "1 of 1 route failing: the server refused our client certificate"
            assert tooltip(status, now()).endswith("1 of 1 route failing: the server refused our client certificate")
            notes = notifications_for(
                next(e for e in seen if e["type"] == "route.health" and e["health"] == "failing"),
                status,
                now(),
                NotificationMemory(),
            )
            assert [n.title for n in notes] == ["Route api is failing"]
            assert "rejected our client certificate" in notes[0].message and "Fix: check that" in notes[0].message

            # the server is fixed (it trusts our CA now): the next answered connection makes the route ok
            server.context = mtls_server(pki).context
            assert exchange(daemon, "api", b"ping\n") == b"ping\n"
            ok = wait_until(
                lambda: (r := daemon.client().get("/v1/status")["routes"]["api"])["health"] == "ok" and r,
                timeout=10,
                what="the route to be ok again",
            )
            assert ok["failing"] is None and ok["last_success"] is not None
            assert parse_time(ok["last_success"]) >= error_at  # type: ignore[operator]
            assert ok["last_error_at"] == failing["last_error_at"]  # the old error stays, with its time
            wait_until(lambda: health_events(seen, "api")[-1:] == [("ok", None)], timeout=5, what="route.health ok")
            assert main(["status"]) == 0
            table = capsys.readouterr().out
            assert re.search(r"dev\s+ok\s+0 open, 4 total, 3 failed", table), table
            assert re.search(r"\n  last error \d+ seconds? ago: ", table), table
    assert health_events(seen, "api") == [("failing", "server_rejected_certificate"), ("ok", None)]
    changes = [e for e in seen if e["type"] == "route.health"]
    assert changes[0]["previous"] == "idle" and changes[0]["since"] == failing["failing"]["since"]
    assert changes[1]["previous"] == "failing"


def test_idle_no_certificate_and_stopped(pki: Pki, isolated_home: Path) -> None:
    pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
    with mtls_server(pki) as server:
        config = write_config(
            isolated_home / "config.toml",
            active="dev",
            identities={"dev": {"renew": "none"}, "empty": {"renew": "none"}},
            routes={"api": route_to(pki, server.port), "bare": route_to(pki, server.port, identity="empty")},
        )
        with DaemonThread(config) as daemon:
            routes = daemon.status()["routes"]
            assert routes["api"]["health"] == "idle" and routes["bare"]["health"] == "no_certificate"
            assert exchange(daemon, "bare", b"x") == b""  # refused locally: no connection was tried
            assert daemon.status()["routes"]["bare"]["health"] == "no_certificate"
            daemon.call(lambda d: d.listeners["api"].close())
            assert daemon.status()["routes"]["api"]["health"] == "stopped"


def expiring(pki: Pki, keystore: Path, identity: str, *, lived: timedelta, left: timedelta) -> Leaf:
    return pki.enroll(keystore, identity, f"{identity}-1", not_before=now() - lived, not_after=now() + left)


def test_a_certificate_that_expires_soon_and_is_not_renewed_is_warned_about(
    pki: Pki, isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keystore = isolated_home / "keystore"
    # ci: a 10-day certificate with 2 days left, renew = "none": inside the 7-day horizon
    expiring(pki, keystore, "ci", lived=timedelta(days=8), left=timedelta(days=2))
    # short: a 3-day certificate with 1.5 days left: the horizon is a third of its life (1 day)
    expiring(pki, keystore, "short", lived=timedelta(days=1, hours=12), left=timedelta(days=1, hours=12))
    with mtls_server(pki) as server:
        config = write_config(
            isolated_home / "config.toml",
            active="ci",
            identities={"ci": {"renew": "none"}, "short": {"renew": "none"}},
            routes={"api": route_to(pki, server.port)},
        )
        with DaemonThread(config) as daemon:
            status = daemon.client().get("/v1/status")
            warning = status["identities"]["ci"]["expiry_warning"]
            assert warning is not None and status["identities"]["short"]["expiry_warning"] is None
            assert re.fullmatch(
                r"identity ci: its certificate expires in 47 hours \(\d{4}-\d\d-\d\d \d\d:\d\d UTC\) "
                r'and will not be renewed \(renew = "none"\): put a new certificate and key in \S+/keystore/ci '
                r"\(mtls-sidecar identity import FILE --name ci\)",
                warning,
            ), warning
            assert status["warnings"] == [warning]
            told = daemon.call(lambda d: [e for e in d.events.history if e["type"] == "identity.expiry_warning"])
            assert [(e["identity"], e["warning"]) for e in told] == [("ci", warning)]

            assert main(["status"]) == 0
            assert f"\nwarning: {warning}\n" in capsys.readouterr().out
            assert main(["check", "api"]) == 0  # the route works; check says so, and warns
            out = capsys.readouterr().out
            assert out.startswith("ok: ") and f"\nwarning: {warning}" in out

            # the tray: amber, and a notification that names the identity and what to do
            assert icon_state(status, now()) is IconState.WARNING
            notes = notifications_for({"type": "hello"}, status, now(), NotificationMemory())
            assert [(n.title, n.message) for n in notes] == [("Certificate of ci expires soon", warning)]

            # a shorter horizon in config.toml: no longer inside it, and an event says so
            config.write_text('expiry_warning = "1d"\n' + config.read_text())
            wait_until(lambda: not daemon.status()["warnings"], timeout=10, what="the warning to end")
            told = daemon.call(lambda d: [e for e in d.events.history if e["type"] == "identity.expiry_warning"])
            assert [(e["identity"], e["warning"]) for e in told] == [("ci", warning), ("ci", None)]


def test_a_failing_renewal_inside_the_horizon_is_warned_about(pki: Pki, isolated_home: Path) -> None:
    # 90 % through its life, so renewal is due at once; the renew command fails every time
    expiring(pki, isolated_home / "keystore", "dev", lived=timedelta(days=9), left=timedelta(days=1))
    config = write_config(
        isolated_home / "config.toml",
        identities={"dev": {"renew": "command", "renew_command": ["false"]}},
        routes={},
    )
    with DaemonThread(config) as daemon:
        warning = wait_until(
            lambda: daemon.status()["identities"]["dev"]["expiry_warning"], timeout=10, what="the warning"
        )
    assert warning.startswith("identity dev: its certificate expires in ")
    assert "and renewal is failing (1 attempt with command: " in warning
    assert warning.endswith("then run `mtls-sidecar renew dev`")


def test_an_http_refusal_whose_words_come_in_a_later_record_still_makes_the_route_failing(
    pki: Pki, isolated_home: Path
) -> None:
    """The answer's head in one TLS record, the body that says "The SSL certificate error" in the
    next (as a server may write them): the connection is not a success for its first record."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    body = b"<html><center>The SSL certificate error</center></html>\n"
    head = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n" % len(body)
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(65536)  # the request
                tls.sendall(head)  # one record
                tls.sendall(body)  # another
                tls.recv(65536)  # until the client goes

        threading.Thread(target=serve, daemon=True).start()
        pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={"api": route_to(pki, listener.getsockname()[1], protocol="http")},
        )
        with DaemonThread(config) as daemon:
            with daemon.connect("api") as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = b""
                while not answer.endswith(body):
                    chunk = sock.recv(65536)
                    assert chunk, answer
                    answer += chunk
            api = wait_until(
                lambda: (r := daemon.status()["routes"]["api"])["failures"] and r, timeout=10, what="the count"
            )
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert api["failures"] == {"server_rejected_certificate_http": 1}
    assert api["health"] == "failing" and api["last_success"] is None, api


def test_a_warning_begins_on_time_with_nothing_else_happening(pki: Pki, isolated_home: Path) -> None:
    """The daemon's clock timer is set for the moment a certificate enters its warning horizon:
    the warning (and its event, which the tray follows) comes then, not at the next file change."""
    left = timedelta(days=2)
    leaf = expiring(pki, isolated_home / "keystore", "ci", lived=timedelta(days=8), left=left)
    horizon = timedelta(seconds=int(left.total_seconds()) - 3)
    # The horizon begins about 3 s from now; exactly, at the stored notAfter (whole seconds) less it.
    begins = leaf.cert.not_valid_after_utc - horizon
    config = write_config(
        isolated_home / "config.toml",
        identities={"ci": {"renew": "none"}},
        routes={},
        expiry_warning=f"{int(horizon.total_seconds())}s",
    )
    with DaemonThread(config) as daemon:
        assert daemon.status()["warnings"] == [], "the test machine took more than 3 s to start the daemon"
        told = wait_until(
            lambda: daemon.call(lambda d: [e for e in d.events.history if e["type"] == "identity.expiry_warning"]),
            timeout=10,
            what="the warning to begin",
        )
        assert told[0]["identity"] == "ci" and told[0]["warning"].startswith("identity ci: its certificate expires")
        # not before the horizon begins (timers may fire a hair early: 50 ms allowed)
        assert now() >= begins - timedelta(milliseconds=50), (now(), begins)
        assert daemon.status()["warnings"] == [told[0]["warning"]]
