"""`preconnect`: warm connections, against real TLS servers on loopback.

What must hold (issue 18): a warm connection is used once and replaced; it is never used with a
stale identity, certificate or config; bytes the server sends first wait in it and reach the
client intact; it is dropped after `preconnect_max_idle`, and when the server closes it; `auto`
keeps none while the route is idle. No timings are asserted: what the server saw (handshakes,
client certificates) and the pool's counters are.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import tomlkit

from sidecar.cli import main
from sidecar.statusview import warm_note
from tests.daemon_runner import DaemonThread
from tests.realservers import free_port
from tests.scenario import Pki, mtls_server, recv_all, route_to, write_config
from tests.test_cli import sidecar_process
from tests.waiting import wait_until


def warm(daemon: DaemonThread, route: str = "svc") -> dict[str, Any]:
    return daemon.status()["routes"][route]["warm"]


def echo_once(port: int, payload: bytes = b"ping\n") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def subject_cn(der: bytes) -> str:
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def config(home: Path, pki: Pki, port: int, *, active: str = "dev", **route: Any) -> Path:
    return write_config(
        home / "config.toml",
        identities={"dev": {"renew": "none"}, "other": {"renew": "none"}},
        routes={"svc": route_to(pki, port, **route)},
        active=active,
    )


@pytest.fixture
def pki(isolated_home: Path, tmp_path: Path) -> Pki:
    made = Pki.create(tmp_path / "pki")
    made.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
    made.enroll(isolated_home / "keystore", "other", "other-1", cn="other")
    return made


def test_warm_connections_are_made_ahead_used_once_and_replaced(isolated_home: Path, pki: Pki) -> None:
    with (
        mtls_server(pki, mode="echo") as server,
        DaemonThread(config(isolated_home, pki, server.port, preconnect=2)) as d,
    ):
        # before any client: two handshakes done, as the route's identity
        wait_until(lambda: warm(d)["ready"] == 2, timeout=10, what="two warm connections")
        assert server.connections == 2 and all(subject_cn(c) == "dev" for c in server.peer_certs if c)
        port = d.port("svc")
        assert echo_once(port) == b"ping\n"
        status = warm(d)
        assert status["hits"] == 1 and status["misses"] == 0
        # the one used is replaced: two ready again, three handshakes in all, one of them used
        wait_until(lambda: warm(d)["ready"] == 2, timeout=10, what="the warm connection to be replaced")
        assert server.connections == 3
        route = d.status()["routes"]["svc"]
        assert route["total_connections"] == 1 and route["health"] == "ok"
        assert warm_note(route["warm"]) == "warm: 2 ready (preconnect 2), 1 joined at once, 0 connected the usual way"
        for i in range(5):  # each client its own warm connection, never one used twice
            assert echo_once(port, f"n{i}\n".encode()) == f"n{i}\n".encode()
        assert server.app_received.count(b"ping\n") == 1


def test_what_the_server_says_first_waits_in_the_warm_connection(isolated_home: Path, pki: Pki) -> None:
    """A server that greets first (a banner, after TLS): the client that joins later gets it intact."""
    with (
        mtls_server(pki, mode="hello") as server,
        DaemonThread(config(isolated_home, pki, server.port, preconnect=1)) as d,
    ):
        wait_until(lambda: warm(d)["ready"] == 1, timeout=10, what="a warm connection")
        wait_until(lambda: d.status()["routes"]["svc"]["bytes_in"] >= 6, timeout=10, what="the banner to be read")
        with socket.create_connection(("127.0.0.1", d.port("svc")), timeout=10) as sock:
            assert recv_exactly(sock, 6) == b"hello\n"  # before the client said anything
            sock.sendall(b"after\n")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"after\n"
        assert warm(d)["hits"] == 1


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, data
        data += chunk
    return data


def test_a_warm_connection_is_never_used_with_a_stale_identity_certificate_or_config(
    isolated_home: Path, pki: Pki, tmp_path: Path
) -> None:
    with (
        mtls_server(pki, mode="echo") as server,
        DaemonThread(config(isolated_home, pki, server.port, preconnect=1)) as d,
    ):
        port = d.port("svc")
        wait_until(lambda: warm(d)["ready"] == 1, timeout=10, what="a warm connection as dev")

        # the active identity switches: the next client is served as `other`, never by dev's warm one
        assert main(["use", "other"]) == 0
        assert echo_once(port) == b"ping\n"
        assert subject_cn(_cert_of_last_app(server)) == "other"

        # a newer certificate arrives for `other`: the warm one made with the old is not used
        wait_until(lambda: warm(d)["ready"] == 1, timeout=10, what="a warm connection as other")
        newer = pki.client_ca.client("other-renewed", not_before=datetime.now(UTC) - timedelta(seconds=5))
        newer.write_pair(isolated_home / "keystore" / "other", "other-2")
        wait_until(
            lambda: d.status()["identities"]["other"]["selected"]["subject"] == "CN=other-renewed",
            timeout=10,
            what="the keystore watch to pick the newer certificate",
        )
        assert echo_once(port, b"renewed\n") == b"renewed\n"
        assert subject_cn(_cert_of_last_app(server, b"renewed\n")) == "other-renewed"

        # the route's settings change (server_name: an IP address, so no SNI at all): the warm one made
        # with the old settings (SNI localhost) is not used
        wait_until(lambda: warm(d)["ready"] == 1, timeout=10, what="a warm connection with the new certificate")
        # the newest connection's handshake (and so its SNI) may still be under way: wait for it
        wait_until(lambda: server.records[-1].sni == "localhost", timeout=10, what="the warm one's SNI: localhost")
        path = isolated_home / "config.toml"
        doc = tomlkit.parse(path.read_text())
        doc["routes"]["svc"]["server_name"] = "127.0.0.1"  # type: ignore[index]
        path.write_text(tomlkit.dumps(doc))
        wait_until(
            lambda: warm(d)["dropped"].get("the route's settings changed", 0) >= 1,
            timeout=10,
            what="the old one dropped",
        )
        assert echo_once(port, b"settings\n") == b"settings\n"
        used = [r for r in server.records if b"settings\n" in bytes(r.app)]
        assert len(used) == 1 and used[0].sni is None
        assert set(warm(d)["dropped"]) <= {
            "the active identity switched",
            "a certificate changed",
            "the route's settings changed",
            "the identity, its certificate or the trust changed",
        }


def _cert_of_last_app(server: Any, payload: bytes = b"ping\n") -> bytes:
    """The client certificate of the connection that carried `payload` (the one a client used)."""
    used = [r for r in server.records if payload in bytes(r.app)]
    assert len(used) == 1, [bytes(r.app) for r in server.records]
    return bytes(used[0].peer_cert)


def test_warm_connections_idle_too_long_are_replaced(isolated_home: Path, pki: Pki) -> None:
    with mtls_server(pki, mode="echo") as server:
        cfg = config(isolated_home, pki, server.port, preconnect=1, preconnect_max_idle="300ms")
        with DaemonThread(cfg) as d:
            wait_until(lambda: warm(d)["dropped"].get("idle too long", 0) >= 2, timeout=10, what="two expiries")
            assert server.connections >= 3  # each dropped one replaced
            wait_until(lambda: warm(d)["ready"] == 1, timeout=10, what="a fresh one")
            assert echo_once(d.port("svc")) == b"ping\n"


def test_a_server_that_closes_warm_connections_is_backed_off_and_clients_still_served(
    isolated_home: Path, pki: Pki
) -> None:
    with (
        mtls_server(pki, mode="close") as server,
        DaemonThread(config(isolated_home, pki, server.port, preconnect=1)) as d,
    ):
        wait_until(lambda: warm(d)["last_error"] is not None, timeout=10, what="the closes to be noticed")
        made = server.connections
        assert made < 10, made  # backed off, not a loop
        # a client is not joined to a closed one: it connects the usual way and sees the server's close
        assert echo_once(d.port("svc")) == b""
        assert warm(d)["ready"] == 0


def test_auto_keeps_none_while_idle_and_some_once_clients_come(isolated_home: Path, pki: Pki) -> None:
    with mtls_server(pki, mode="echo") as server:
        cfg = config(isolated_home, pki, server.port, preconnect="auto", preconnect_max_idle="1s")
        with DaemonThread(cfg) as d:
            assert warm(d)["target"] == 0 and server.connections == 0  # idle: nothing made
            port = d.port("svc")
            for _ in range(3):
                assert echo_once(port) == b"ping\n"
            assert warm(d)["misses"] >= 1
            wait_until(lambda: warm(d)["ready"] >= 1, timeout=10, what="warm connections once clients came")
            assert echo_once(port) == b"ping\n"
            assert warm(d)["hits"] >= 1
            # no client for longer than preconnect_max_idle: none kept
            wait_until(lambda: warm(d)["target"] == 0 and warm(d)["ready"] == 0, timeout=10, what="none when idle")


def test_preconnect_settings_are_checked(isolated_home: Path, pki: Pki) -> None:
    from sidecar.config import parse_config
    from sidecar.errors import ConfigError

    base = '[identities.dev]\n[routes.db]\nlisten = "127.0.0.1:5999"\ntarget = "db.test:3306"\n'
    with pytest.raises(ConfigError, match='not available for protocol = "mysql"'):
        parse_config(base + 'protocol = "mysql"\npreconnect = 1\n')
    with pytest.raises(ConfigError, match="from 0 to 64"):
        parse_config(base + "preconnect = 65\n")
    with pytest.raises(ConfigError, match="from 0 to 64"):
        parse_config(base + 'preconnect = "some"\n')
    assert parse_config(base + 'preconnect = "auto"\n').routes["db"].preconnect == "auto"
    assert parse_config(base + 'protocol = "postgres"\npreconnect = 2\n').routes["db"].preconnect == 2


def test_tunnel_preconnect_flag(isolated_home: Path, pki: Pki, tmp_path: Path) -> None:
    leaf = pki.client_ca.client("flag")
    cert_path, key_path = leaf.write_pair(tmp_path, "flag")
    with mtls_server(pki, mode="echo") as server:
        port = free_port()
        args = [
            "tunnel", "--listen", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{server.port}",
            "--cert", str(cert_path), "--key", str(key_path), "--cacert", str(pki.server_ca_file),
            "--server-name", "localhost", "--preconnect", "2",
        ]  # fmt: skip
        with sidecar_process(*args) as (proc, log):
            log.wait_for(r"listening on")
            wait_until(lambda: server.connections >= 2, timeout=10, what="two warm handshakes before any client")
            assert echo_once(port) == b"ping\n"
            proc.terminate()
            assert proc.wait(timeout=20) == 0
    bad = subprocess.run(
        [sys.executable, "-m", "sidecar", "tunnel", "--listen", "127.0.0.1:0", "--target", "x:1",
         "--cert", str(cert_path), "--key", str(key_path), "--preconnect", "lots"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert bad.returncode == 2 and "--preconnect" in bad.stderr
