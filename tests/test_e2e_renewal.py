"""Renewal against real servers: nginx sees a new serial on new connections, old ones keep working."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sidecar.devca import ca_paths, load_or_create_ca
from sidecar.paths import resolve_places
from tests.daemon_runner import DaemonThread
from tests.realservers import nginx_mtls
from tests.scenario import Pki, curl, http_get_on, route_to, write_config
from tests.waiting import wait_until


def nginx_serial(body: bytes | str) -> int:
    text = body.decode() if isinstance(body, bytes) else body
    match = re.search(r"serial=([0-9A-F]+) ", text)
    assert match, text
    return int(match.group(1), 16)


def selected_serial(status: dict[str, Any], identity: str = "dev") -> int | None:
    selected = status["identities"][identity]["selected"]
    return int(selected["serial"], 16) if selected else None


def test_local_ca_renews_a_two_minute_certificate_without_dropping_connections(
    isolated_home: Path, tmp_path: Path
) -> None:
    places = resolve_places()
    load_or_create_ca(places.ca, datetime.now(UTC))  # the CA the daemon will use: nginx must trust it
    pki = Pki.create(tmp_path / "pki")
    with nginx_mtls(
        tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=ca_paths(places.ca)[0]
    ) as nginx:
        config = write_config(
            isolated_home / "config.toml",
            # a 2-minute certificate, due 110 s before expiry: renewal about 10 s after issue
            identities={"dev": {"renew": "local-ca", "lifetime": "2m", "renew_before": "110s"}},
            routes={"api": route_to(pki, nginx.port)},
        )
        with DaemonThread(config) as daemon:
            status = daemon.status()
            first = selected_serial(status)
            assert first is not None, "the identity was enrolled at start-up"
            renewal = status["identities"]["dev"]["renewal"]
            assert renewal["provider"] == "local-ca" and renewal["state"] == "valid"
            renew_at = datetime.strptime(renewal["next_renewal_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)

            with daemon.connect("api") as held:
                assert nginx_serial(http_get_on(held)) == first
                second = wait_until(
                    lambda: (s := selected_serial(daemon.status())) != first and s,
                    timeout=40,
                    what="the daemon to renew",
                )
                in_use_at = datetime.now(UTC)
                assert nginx_serial(curl(daemon.port("api")).stdout) == second
                assert nginx_serial(http_get_on(held)) == first  # the old connection is undisturbed
            status = daemon.status()
            events = [e["type"] for e in daemon.call(lambda d: d.events.history)]
    renewal = status["identities"]["dev"]["renewal"]
    assert renewal["state"] == "valid" and renewal["last_renewed_at"] is not None
    assert renewal["consecutive_failures"] == 0
    assert events.count("renewal.succeeded") >= 2  # enrollment, then the renewal
    lag = (in_use_at - renew_at).total_seconds()
    print(f"\nlocal-ca: renew_at → new certificate in use: {lag:.2f} s (status polled)")
    assert lag < 30


def test_expired_only_identity_with_local_ca_is_enrolled_before_routes_open(
    isolated_home: Path, tmp_path: Path
) -> None:
    """Enrollment is the same path as renewal: all expired → a new certificate at start-up."""
    from datetime import timedelta

    from sidecar.devca import write_credential

    places = resolve_places()
    ca = load_or_create_ca(places.ca, datetime.now(UTC))
    old = ca.issue_client("CN=dev", timedelta(minutes=1), datetime.now(UTC) - timedelta(hours=1))
    write_credential(isolated_home / "keystore" / "dev", old, datetime.now(UTC) - timedelta(hours=1))
    pki = Pki.create(tmp_path / "pki")
    with nginx_mtls(
        tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=ca_paths(places.ca)[0]
    ) as nginx:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "local-ca"}},
            routes={"api": route_to(pki, nginx.port)},
        )
        started = time.monotonic()
        with DaemonThread(config) as daemon:
            result = curl(daemon.port("api"))
            status = daemon.status()
        assert time.monotonic() - started < 30
    assert "verify=SUCCESS" in result.stdout
    assert nginx_serial(result.stdout) == selected_serial(status) != old.cert.serial_number


def test_a_route_waits_briefly_for_enrollment_when_the_keystore_is_emptied(isolated_home: Path, tmp_path: Path) -> None:
    places = resolve_places()
    load_or_create_ca(places.ca, datetime.now(UTC))
    pki = Pki.create(tmp_path / "pki")
    with nginx_mtls(
        tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=ca_paths(places.ca)[0]
    ) as nginx:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "local-ca"}},
            routes={"api": route_to(pki, nginx.port)},
        )
        with DaemonThread(config) as daemon:
            first = selected_serial(daemon.status())
            for credential in (isolated_home / "keystore" / "dev").glob("*.pem"):
                credential.unlink()
            daemon.call(lambda d: d.book.refresh())  # as the keystore watch would, without waiting for it
            assert selected_serial(daemon.status()) is None
            result = curl(daemon.port("api"))  # waits for the enrollment this connection triggers
            status = daemon.status()
    assert "verify=SUCCESS" in result.stdout, result
    assert nginx_serial(result.stdout) == selected_serial(status) != first
    assert status["routes"]["api"]["failures"] == {}
