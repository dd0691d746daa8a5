"""Servers we must not talk to, and servers that will not talk to us.

Each refusal: the local client's connection is closed, nothing the client sent reaches the
server's application (nor its socket in plaintext), the reason is counted and logged.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_runner import DaemonThread
from tests.pki import CA
from tests.scenario import Pki, mtls_server, one_route_config, recv_all, write_config
from tests.tlsserver import ScriptedTLSServer

SECRET = b"PLAINTEXT-SECRET-must-not-leak"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


def run_refusal(
    isolated_home: Path,
    pki: Pki,
    server: ScriptedTLSServer,
    server_name: str = "localhost",
) -> tuple[bytes, dict[str, Any]]:
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    config = write_config(
        isolated_home / "config.toml",
        identities={"dev": {"renew": "none"}},
        routes={
            "svc": {
                "listen": "127.0.0.1:0",
                "target": f"127.0.0.1:{server.port}",
                "server_name": server_name,
                "ca_file": str(pki.server_ca_file),
            }
        },
    )
    with DaemonThread(config) as daemon, daemon.connect("svc", timeout=10) as sock:
        with contextlib.suppress(OSError):  # the tunnel may already have closed us: also a refusal
            sock.sendall(SECRET)
        answer = recv_all(sock)
        status = daemon.status()["routes"]["svc"]
    assert SECRET not in server.raw_received
    assert SECRET not in server.app_received
    return answer, status


def serve(pki: Pki, leaf_paths: tuple[Path, Path], **kwargs: Any) -> ScriptedTLSServer:
    cert, key = leaf_paths
    return ScriptedTLSServer(cert=cert, key=key, mode="echo", **kwargs)


def test_server_with_an_untrusted_ca_is_refused(
    pki: Pki, isolated_home: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rogue = CA("Rogue CA").server("localhost", "127.0.0.1").write_pair(tmp_path / "rogue", "s")
    with caplog.at_level(logging.WARNING, logger="sidecar"), serve(pki, rogue) as server:
        answer, status = run_refusal(isolated_home, pki, server)
    assert answer == b""
    assert status["failures"] == {"server_untrusted": 1}
    assert "not trusted" in status["last_error"]
    assert any("not trusted" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("names", "cn", "server_name"),
    [
        (("other.example.test",), None, "localhost"),  # SAN lacks the name
        ((), "localhost", "localhost"),  # CN only: the CN is never used
        (("*.example.test",), None, "a.b.example.test"),  # wildcard covers one label only
        (("*.example.test",), None, "example.test"),  # nor the bare domain
        (("api*.example.test",), None, "api1.example.test"),  # partial-label wildcards are refused
        (("127.0.0.2",), None, "127.0.0.1"),  # IP SAN must match the IP target
    ],
    ids=["wrong-san", "cn-only", "wildcard-two-labels", "wildcard-bare-domain", "partial-wildcard", "wrong-ip"],
)
def test_server_certificate_without_our_name_is_refused(
    pki: Pki,
    isolated_home: Path,
    tmp_path: Path,
    names: tuple[str, ...],
    cn: str | None,
    server_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ips = [n for n in names if n[0].isdigit()]
    dns = [n for n in names if not n[0].isdigit()]
    leaf = pki.server_ca.issue(cn or (names[0] if names else "x"), dns=dns, ips=ips, eku=None)
    paths = leaf.write_pair(tmp_path / "srv", "s")
    with caplog.at_level(logging.WARNING, logger="sidecar"), serve(pki, paths) as server:
        answer, status = run_refusal(isolated_home, pki, server, server_name=server_name)
    assert answer == b""
    assert status["failures"] == {"name_mismatch": 1}
    assert server_name in status["last_error"]
    assert any("is not valid for" in r.getMessage() for r in caplog.records)


def test_wildcard_matching_one_label_is_accepted(pki: Pki, isolated_home: Path, tmp_path: Path) -> None:
    """The positive twin of the wildcard refusals: `*.example.test` does cover `api.example.test`."""
    paths = pki.server_ca.issue("wild", dns=["*.example.test"], eku=None).write_pair(tmp_path / "srv", "s")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    with serve(pki, paths) as server:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={
                "svc": {
                    "listen": "127.0.0.1:0",
                    "target": f"127.0.0.1:{server.port}",
                    "server_name": "api.example.test",
                    "ca_file": str(pki.server_ca_file),
                }
            },
        )
        with DaemonThread(config) as daemon, daemon.connect("svc", timeout=10) as sock:
            sock.sendall(b"ping\n")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"ping\n"


@pytest.mark.parametrize("tls_version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls13", "tls12"])
def test_server_that_demands_a_certificate_we_do_not_have(
    pki: Pki,
    isolated_home: Path,
    tls_version: ssl.TLSVersion,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server trusts another client CA. With TLS 1.3 its refusal arrives after our side of
    the handshake has completed, as an alert: it must be reported, not be a silent close."""
    stranger = CA("Stranger Client CA").write_root(pki.folder / "stranger.pem")
    with (
        caplog.at_level(logging.WARNING, logger="sidecar"),
        ScriptedTLSServer(
            cert=pki.server_cert,
            key=pki.server_key,
            client_ca=stranger,
            require_client_cert=True,
            mode="hello",
            min_version=tls_version,
            max_version=tls_version,
        ) as server,
    ):
        answer, status = run_refusal(isolated_home, pki, server)
    assert answer == b""
    assert status["failures"] == {"server_rejected_certificate": 1}
    assert "rejected our client certificate" in status["last_error"]
    assert any("rejected our client certificate" in r.getMessage() for r in caplog.records)


def test_target_refusing_connections_is_counted_as_refused(pki: Pki, isolated_home: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    config = write_config(
        isolated_home / "config.toml",
        identities={"dev": {"renew": "none"}},
        routes={
            "svc": {"listen": "127.0.0.1:0", "target": f"127.0.0.1:{closed_port}", "ca_file": str(pki.server_ca_file)}
        },
    )
    with DaemonThread(config) as daemon, daemon.connect("svc", timeout=10) as sock:
        assert recv_all(sock) == b""
        status = daemon.status()["routes"]["svc"]
    assert status["failures"] == {"refused": 1}  # `check` says `refused` for it too (one vocabulary)
    assert "refused" in status["last_error"]


def test_plaintext_server_is_not_tls(pki: Pki, isolated_home: Path) -> None:
    with ScriptedTLSServer(cert=None, key=None, tls=False, mode="plaintext") as server:
        answer, status = run_refusal(isolated_home, pki, server)
    assert answer == b""
    assert list(status["failures"]) == ["not_tls"]
    assert "did not answer with TLS" in status["last_error"]


def test_half_close_reaches_the_server_and_its_answer_comes_back(pki: Pki, isolated_home: Path) -> None:
    """Client EOF becomes TLS close_notify; the tunnel keeps reading the server's answer."""
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    with ScriptedTLSServer(
        cert=pki.server_cert,
        key=pki.server_key,
        client_ca=pki.client_ca_file,
        require_client_cert=True,
        mode="halfclose",
    ) as server:
        config = one_route_config(isolated_home, pki, server.port, "svc")
        with DaemonThread(config) as daemon, daemon.connect("svc", timeout=10) as sock:
            sock.sendall(b"x" * 1000)
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"got 1000 bytes\n"


def test_server_that_never_answers_the_handshake_times_out(pki: Pki, isolated_home: Path) -> None:
    """The kernel accepts the TCP connection; nobody ever speaks TLS on it."""
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={
                "svc": {
                    "listen": "127.0.0.1:0",
                    "target": f"127.0.0.1:{silent.getsockname()[1]}",
                    "connect_timeout": "500ms",
                    "ca_file": str(pki.server_ca_file),
                }
            },
        )
        with DaemonThread(config) as daemon, daemon.connect("svc", timeout=10) as sock:
            assert recv_all(sock) == b""
            status = daemon.status()["routes"]["svc"]
    assert status["failures"] == {"timeout": 1}
    assert "timed out" in status["last_error"]


def test_one_tls_context_per_credential_not_per_connection(pki: Pki, isolated_home: Path) -> None:
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    with mtls_server(pki, mode="echo") as server:
        config = one_route_config(isolated_home, pki, server.port, "svc")
        with DaemonThread(config) as daemon:
            for i in range(5):
                with daemon.connect("svc", timeout=10) as sock:
                    sock.sendall(b"%d" % i)
                    sock.shutdown(socket.SHUT_WR)
                    assert recv_all(sock) == b"%d" % i
            assert daemon.call(lambda d: d.contexts.builds) == 1
            assert daemon.status()["routes"]["svc"]["total_connections"] == 5
