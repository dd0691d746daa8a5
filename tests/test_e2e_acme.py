"""ACME renewal against a real pebble, seen by a real nginx."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.daemon_runner import DaemonThread
from tests.pebble import pebble_server
from tests.realservers import nginx_mtls
from tests.scenario import Pki, curl, http_get_on, route_to, write_config
from tests.waiting import wait_until

IDENTIFIER = "dev-laptop.example.test"


def acme_identity(pebble: Any, **extra: Any) -> dict[str, Any]:
    return {
        "renew": "acme",
        "subject": f"CN={IDENTIFIER}",
        "acme_directory": pebble.directory_url,
        "acme_ca_file": str(pebble.listener_ca_file),
        "acme_identifiers": [IDENTIFIER],
        "acme_http_port": pebble.http_port,
        **extra,
    }


def serial_of(status: dict[str, Any]) -> int | None:
    selected = status["identities"]["dev"]["selected"]
    return int(selected["serial"], 16) if selected else None


def nginx_serial(text: str | bytes) -> int:
    body = text.decode() if isinstance(text, bytes) else text
    match = re.search(r"serial=([0-9A-F]+) ", body)
    assert match, body
    return int(match.group(1), 16)


def test_acme_enrolls_and_renews_before_expiry_without_dropping_connections(
    isolated_home: Path, tmp_path: Path
) -> None:
    pki = Pki.create(tmp_path / "pki")
    with pebble_server(tmp_path / "pebble", validity_seconds=120) as pebble:
        client_ca = tmp_path / "pebble-roots.pem"
        client_ca.write_bytes(pebble.roots_pem())  # fetched after pebble started: a new root each start
        with nginx_mtls(
            tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=client_ca
        ) as nginx:
            config = write_config(
                isolated_home / "config.toml",
                # 120 s certificates, due 100 s before expiry: renewal about 20 s after issue
                identities={"dev": acme_identity(pebble, renew_before="100s")},
                routes={"api": route_to(pki, nginx.port)},
            )
            started = datetime.now(UTC)
            with DaemonThread(config) as daemon:
                first = serial_of(daemon.status())
                assert first is not None, daemon.status()["identities"]["dev"]
                enrolled_in = (datetime.now(UTC) - started).total_seconds()
                with daemon.connect("api", timeout=60) as held:
                    assert nginx_serial(http_get_on(held)) == first
                    second = wait_until(
                        lambda: (s := serial_of(daemon.status())) != first and s,
                        timeout=60,
                        what="the daemon to renew through ACME",
                    )
                    assert nginx_serial(curl(daemon.port("api")).stdout) == second
                    assert nginx_serial(http_get_on(held)) == first  # the held connection is undisturbed
                status = daemon.status()
                events = daemon.call(lambda d: list(d.events.history))
    renewal = status["identities"]["dev"]["renewal"]
    assert renewal["provider"] == "acme" and renewal["state"] == "valid"
    account = isolated_home / "keystore" / "dev" / ".acme-account.json"
    assert account.exists() and account.stat().st_mode & 0o077 == 0
    timings = [e["seconds"] for e in events if e["type"] == "renewal.succeeded"]
    print(f"\nacme: enrolled {enrolled_in:.2f} s after start; issuance times {timings} s")


def test_acme_server_down_backs_off_keeps_serving_then_renews(isolated_home: Path, tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    with pebble_server(tmp_path / "pebble", validity_seconds=600) as pebble:
        client_ca = tmp_path / "pebble-roots.pem"
        client_ca.write_bytes(pebble.roots_pem())
        with nginx_mtls(
            tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=client_ca
        ) as nginx:
            config = write_config(
                isolated_home / "config.toml",
                identities={"dev": acme_identity(pebble)},
                routes={"api": route_to(pki, nginx.port)},
            )
            with DaemonThread(config) as daemon:
                first = serial_of(daemon.status())
                assert first is not None
                pebble.stop()
                failed_at = datetime.now(UTC)
                daemon.call(lambda d: d.request_renewal("dev"))
                wait_until(
                    lambda: daemon.status()["identities"]["dev"]["renewal"]["state"] == "failing",
                    timeout=30,
                    what="the renewal to fail while pebble is down",
                )
                renewal = daemon.status()["identities"]["dev"]["renewal"]
                assert renewal["consecutive_failures"] == 1
                assert pebble.directory_url in renewal["last_error"]
                retry_at = datetime.strptime(renewal["next_renewal_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
                assert timedelta(seconds=50) < retry_at - failed_at < timedelta(seconds=75)  # first back-off: 1 min
                # the current certificate keeps serving
                assert nginx_serial(curl(daemon.port("api")).stdout) == first

                daemon.call(lambda d: d.request_renewal("dev"))
                wait_until(
                    lambda: daemon.status()["identities"]["dev"]["renewal"]["consecutive_failures"] == 2,
                    timeout=30,
                    what="a second failure",
                )
                renewal = daemon.status()["identities"]["dev"]["renewal"]
                retry_at = datetime.strptime(renewal["next_renewal_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
                assert timedelta(minutes=9) < retry_at - datetime.now(UTC) < timedelta(minutes=11)  # then 10 min

                pebble.start()
                daemon.call(lambda d: d.request_renewal("dev"))
                second = wait_until(
                    lambda: (s := serial_of(daemon.status())) != first and s,
                    timeout=60,
                    what="renewal once pebble is back",
                )
                renewal = daemon.status()["identities"]["dev"]["renewal"]
    assert second != first
    assert renewal["state"] == "valid" and renewal["consecutive_failures"] == 0 and renewal["last_error"] is None
