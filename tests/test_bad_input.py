"""Bad input gets a clear message naming the file, line or field, and loses nothing."""

from __future__ import annotations

import logging
import socket
from datetime import timedelta
from pathlib import Path

import pytest

from sidecar.cli import main
from tests.daemon_runner import DaemonThread
from tests.pki import now
from tests.scenario import Pki, mtls_server, one_route_config, recv_all, write_config
from tests.tlsserver import ScriptedTLSServer


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


def test_broken_toml_stops_run_with_file_and_line(isolated_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = isolated_home / "config.toml"
    config.write_text('active_identity = "dev"\n\n[identities.dev]\nrenew = "none"\nsubject = "CN=dev\n')
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert f"{config}:5" in err
    assert config.read_text().endswith('subject = "CN=dev\n')  # the user's file is left as it was


def test_unknown_identity_named_by_a_route(isolated_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(
        isolated_home / "config.toml",
        identities={"dev": {"renew": "none"}},
        routes={"api": {"listen": "127.0.0.1:0", "target": "example.test:443", "identity": "prod"}},
    )
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert "routes.api.identity" in err and "'prod'" in err and "dev" in err


def test_bad_listen_address_names_the_field(isolated_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(
        isolated_home / "config.toml",
        identities={"dev": {"renew": "none"}},
        routes={"api": {"listen": "0.0.0.0:8443", "target": "example.test:443"}},
    )
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert "routes.api.listen" in err and "0.0.0.0:8443" in err and "unsafe_listen" in err


def test_a_port_already_taken_fails_that_route_only(
    pki: Pki, isolated_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    with (
        socket.socket() as squatter,
        ScriptedTLSServer(
            cert=pki.server_cert,
            key=pki.server_key,
            client_ca=pki.client_ca_file,
            require_client_cert=True,
            mode="echo",
        ) as server,
    ):
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        target = {"target": f"127.0.0.1:{server.port}", "server_name": "localhost", "ca_file": str(pki.server_ca_file)}
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={"blocked": {"listen": f"127.0.0.1:{taken}", **target}, "fine": {"listen": "127.0.0.1:0", **target}},
        )
        with caplog.at_level(logging.ERROR, logger="sidecar"), DaemonThread(config) as daemon:
            status = daemon.status()["routes"]
            with daemon.connect("fine", timeout=10) as sock:
                sock.sendall(b"still serving\n")
                sock.shutdown(socket.SHUT_WR)
                assert recv_all(sock) == b"still serving\n"
    assert status["blocked"]["state"] == "error"
    assert f"cannot listen on 127.0.0.1:{taken}: address already in use" in status["blocked"]["last_error"]
    assert "routes.blocked.listen" in status["blocked"]["last_error"]
    assert status["fine"]["state"] == "up"
    assert any("address already in use" in r.getMessage() for r in caplog.records)


def test_identity_with_only_malformed_or_expired_files_refuses_connections(
    pki: Pki, isolated_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = isolated_home / "keystore" / "dev"
    folder.mkdir(parents=True)
    (folder / "broken.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n")
    pki.enroll(
        isolated_home / "keystore",
        "dev",
        "old",
        not_before=now() - timedelta(days=9),
        not_after=now() - timedelta(days=2),
    )
    with ScriptedTLSServer(cert=pki.server_cert, key=pki.server_key, mode="echo") as server:
        config = one_route_config(isolated_home, pki, server.port, "api")
        with caplog.at_level(logging.WARNING, logger="sidecar"), DaemonThread(config) as daemon:
            with daemon.connect("api", timeout=10) as sock:
                assert recv_all(sock) == b""
            status = daemon.status()
        assert server.connections == 0  # refused before any connection to the server
    route = status["routes"]["api"]
    assert route["state"] == "no_certificate"
    assert route["failures"] == {"no_usable_certificate": 1}
    assert "expired 2 days ago" in route["last_error"]
    reasons = {Path(c["file"]).name: c["reason"] for c in status["identities"]["dev"]["candidates"]}
    assert reasons["broken.pem"].startswith("not a PEM file")
    assert status["identities"]["dev"]["selected"] is None
    assert any("no usable certificate" in r.getMessage() for r in caplog.records)


def test_a_half_written_certificate_never_replaces_a_usable_one(pki: Pki, isolated_home: Path) -> None:
    keystore = isolated_home / "keystore"
    good = pki.enroll(keystore, "dev", "good")
    with mtls_server(pki, mode="echo") as server:
        config = one_route_config(isolated_home, pki, server.port, "api")
        with DaemonThread(config) as daemon:
            newer = pki.client_ca.client("dev", not_before=now())
            # a newer certificate cut short, and a complete one whose key has not arrived yet
            (keystore / "dev" / "partial.pem").write_bytes(newer.chain_pem()[:200])
            (keystore / "dev" / "nokey.crt").write_bytes(newer.chain_pem())
            daemon.call(lambda d: d.keystore_changed())
            status = daemon.status()
            with daemon.connect("api", timeout=10) as sock:
                sock.sendall(b"x")
                sock.shutdown(socket.SHUT_WR)
                assert recv_all(sock) == b"x"
    assert status["identities"]["dev"]["selected"]["serial"] == f"{good.cert.serial_number:x}"
    from cryptography import x509

    assert server.peer_certs[-1] is not None
    assert x509.load_der_x509_certificate(server.peer_certs[-1]).serial_number == good.cert.serial_number
