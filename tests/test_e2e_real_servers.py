"""Routes to real mTLS servers: nginx with ssl_verify_client, redis with tls-auth-clients."""

from __future__ import annotations

import hashlib
import socket
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from tests.daemon_runner import DaemonThread
from tests.pki import key_pem, now
from tests.realservers import nginx_mtls, redis_tls, require_binary
from tests.scenario import Pki, curl, http_get_on, mtls_server, route_to, write_config
from tests.waiting import wait_until


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


def test_curl_through_a_route_reaches_nginx_with_our_certificate(pki: Pki, isolated_home: Path, tmp_path: Path) -> None:
    leaf = pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    with nginx_mtls(
        tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.client_ca_file
    ) as nginx:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={"api": route_to(pki, nginx.port)},
        )
        with DaemonThread(config) as daemon:
            result = curl(daemon.port("api"))
            assert result.returncode == 0, result.stderr
            assert "client_dn=CN=dev " in result.stdout
            assert f"serial={leaf.serial_hex} " in result.stdout
            assert "verify=SUCCESS" in result.stdout
            status = daemon.status()
    route = status["routes"]["api"]
    assert route["total_connections"] == 1 and route["failures"] == {}
    assert route["bytes_in"] > 0 and route["bytes_out"] > 0
    assert status["identities"]["dev"]["selected"]["serial"] == f"{leaf.cert.serial_number:x}"


def test_http2_through_a_route_with_alpn(pki: Pki, isolated_home: Path, tmp_path: Path) -> None:
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    with nginx_mtls(
        tmp_path / "nginx",
        server_cert=pki.server_cert,
        server_key=pki.server_key,
        client_ca=pki.client_ca_file,
        http2=True,
    ) as nginx:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={"h2": route_to(pki, nginx.port, alpn=["h2"])},
        )
        with DaemonThread(config) as daemon:
            result = curl(daemon.port("h2"), "/", "--http2-prior-knowledge")
    assert result.returncode == 0, result.stderr
    assert "alpn=h2" in result.stdout
    assert "proto=HTTP/2.0" in result.stdout
    assert "client_dn=CN=dev " in result.stdout


def test_redis_cli_ping_through_a_route(pki: Pki, isolated_home: Path, tmp_path: Path) -> None:
    redis_cli = require_binary("redis-cli")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    with redis_tls(
        tmp_path / "redis", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.client_ca_file
    ) as redis:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={"cache": route_to(pki, redis.port)},
        )
        with DaemonThread(config) as daemon:
            port = daemon.port("cache")
            ping = subprocess.run([redis_cli, "-p", str(port), "PING"], capture_output=True, text=True, timeout=20)
            assert ping.stdout.strip() == "PONG", ping.stderr
            big = "x" * 100_000  # several TLS records; below the 128 KiB limit of one argv string
            subprocess.run([redis_cli, "-p", str(port), "SET", "k", big], check=True, capture_output=True, timeout=20)
            got = subprocess.run([redis_cli, "-p", str(port), "GET", "k"], capture_output=True, text=True, timeout=20)
            assert got.stdout.strip() == big


def test_selection_at_the_server_newest_valid_certificate_among_many(
    pki: Pki, isolated_home: Path, tmp_path: Path
) -> None:
    """Six and more candidates; nginx must see the newest valid one."""
    from cryptography.x509.oid import ExtendedKeyUsageOID

    keystore = isolated_home / "keystore"
    t = now()
    pki.enroll(keystore, "dev", "older", not_before=t - timedelta(days=2), lifetime=timedelta(days=10))
    newest = pki.enroll(keystore, "dev", "newest", not_before=t - timedelta(hours=1), lifetime=timedelta(days=10))
    pki.enroll(
        keystore, "dev", "newer-expired", not_before=t - timedelta(minutes=30), not_after=t - timedelta(minutes=2)
    )
    pki.enroll(keystore, "dev", "not-yet-valid", not_before=t + timedelta(days=1), lifetime=timedelta(days=10))
    pki.enroll(
        keystore, "dev", "server-only", not_before=t - timedelta(minutes=5), eku=(ExtendedKeyUsageOID.SERVER_AUTH,)
    )
    pki.enroll(keystore, "dev", "mismatch", not_before=t - timedelta(minutes=4))
    other = pki.client_ca.client("dev")
    (keystore / "dev" / "mismatch.key").write_bytes(key_pem(other.key))
    (keystore / "dev" / "corrupt.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n")
    pki.client_ca.client("dev", not_before=t - timedelta(minutes=3)).write_p12(keystore / "dev", "bundle.p12", b"right")
    with nginx_mtls(
        tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.client_ca_file
    ) as nginx:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none", "pkcs12_password_env": "TEST_P12_PASSWORD_UNSET"}},
            routes={"api": route_to(pki, nginx.port)},
        )
        with DaemonThread(config) as daemon:
            result = curl(daemon.port("api"))
            status = daemon.status()
    assert f"serial={newest.serial_hex} " in result.stdout, result.stdout
    reasons = {Path(c["file"]).name: c["reason"] for c in status["identities"]["dev"]["candidates"] if not c["usable"]}
    assert reasons["newer-expired.crt"].startswith("expired 2 minutes ago")
    assert reasons["not-yet-valid.crt"].startswith("not valid until")
    assert reasons["server-only.crt"] == "no clientAuth in extendedKeyUsage"
    assert reasons["mismatch.crt"] == "key does not match certificate"
    assert reasons["corrupt.pem"].startswith("malformed certificate PEM")
    assert reasons["bundle.p12"].startswith("PKCS#12 file needs a password")
    usable = [Path(c["file"]).name for c in status["identities"]["dev"]["candidates"] if c["usable"]]
    assert usable == ["newest.crt"]


def test_live_keystore_new_certificate_for_new_connections_old_connection_keeps_working(
    pki: Pki, isolated_home: Path, tmp_path: Path
) -> None:
    keystore = isolated_home / "keystore"
    first = pki.enroll(keystore, "dev", "first", not_before=now() - timedelta(hours=2))
    with nginx_mtls(
        tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.client_ca_file
    ) as nginx:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={"api": route_to(pki, nginx.port)},
        )
        with DaemonThread(config) as daemon:
            port = daemon.port("api")
            with socket.create_connection(("127.0.0.1", port), timeout=10) as held:
                assert f"serial={first.serial_hex} ".encode() in http_get_on(held)

                second = pki.enroll(keystore, "dev", "second", not_before=now() - timedelta(minutes=1))
                wanted = f"{second.cert.serial_number:x}"
                wait_until(
                    lambda: daemon.status()["identities"]["dev"]["selected"]["serial"] == wanted,
                    timeout=5,
                    what="the daemon to select the new certificate",
                )
                fresh = curl(port)
                assert f"serial={second.serial_hex} " in fresh.stdout, fresh.stdout
                # the connection opened before keeps its TLS session and its certificate
                assert f"serial={first.serial_hex} ".encode() in http_get_on(held)


def test_large_transfer_is_intact_both_ways(pki: Pki, isolated_home: Path) -> None:
    """32 MiB through an echo server: backpressure must not drop or reorder bytes."""

    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    payload = hashlib.sha256(b"seed").digest() * (32 * 1024 * 1024 // 32)
    with mtls_server(pki, mode="echo") as server:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={"echo": route_to(pki, server.port)},
        )
        with DaemonThread(config) as daemon, daemon.connect("echo", timeout=30) as sock:
            import threading

            received = bytearray()

            def reader() -> None:
                while chunk := sock.recv(1 << 20):
                    received.extend(chunk)

            thread = threading.Thread(target=reader)
            thread.start()
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            thread.join(timeout=60)
            assert not thread.is_alive()
    assert len(received) == len(payload)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
