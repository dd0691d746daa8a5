"""Untrusted text is quoted, and what a peer or a program could abuse is closed (issue 16, point 7):
a server certificate whose subject holds a newline and a terminal escape reaches status, check,
events, the status table and the log escaped; a TLS 1.2 server that renegotiates is refused;
renew_command gets a clean environment and its stderr loses keys and passwords; unsafe_listen
is a warning. Real servers, real processes."""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from sidecar.causes import quoted
from sidecar.renewal.providers.run import clean_environment, stderr_tail
from sidecar.revocation.judge import UNKNOWN, Answer
from sidecar.statusview import render_status
from tests.daemon_runner import DaemonThread
from tests.realservers import free_port, require_binary
from tests.scenario import Pki, mtls_server, one_route_config, recv_all, route_to, write_config
from tests.tlsserver import ScriptedTLSServer
from tests.waiting import wait_until

EVIL = "evil\nWARNING forged log line \x1b[2J\x1b]0;title\x07\u202eexe.txt"


def test_quoted_escapes_what_a_terminal_or_a_log_would_act_on() -> None:
    assert quoted("CN=api.example.test, O=Ünïcode") == "CN=api.example.test, O=Ünïcode"
    shown = quoted(EVIL)
    assert shown == "evil\\nWARNING forged log line \\x1b[2J\\x1b]0;title\\x07\\u202eexe.txt"
    assert shown.isprintable()
    assert quoted(shown) == shown  # quoting twice changes nothing


def _no_control(text: str) -> None:
    assert "\n" not in text and "\x1b" not in text and "\u202e" not in text and "\x07" not in text, text


def test_a_server_subject_with_a_newline_and_escapes_is_shown_escaped_everywhere(
    isolated_home: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = Pki.create(tmp_path / "pki")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
    leaf = pki.server_ca.issue(EVIL, dns=["localhost"], ips=["127.0.0.1"], eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
    cert, key = leaf.write_pair(tmp_path / "evil", "server")
    # a pin the server's key does not have: the refusal names the server's certificate by its subject
    other_pin = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
    with ScriptedTLSServer(
        cert=cert, key=key, client_ca=pki.client_ca_file, require_client_cert=True, mode="echo"
    ) as server:
        config = one_route_config(isolated_home, pki, server.port, pin_sha256=[other_pin])
        caplog.set_level(logging.INFO, logger="sidecar")
        with DaemonThread(config) as daemon:
            with daemon.connect("svc") as sock:
                sock.sendall(b"hello\n")
                recv_all(sock)
            wait_until(lambda: daemon.status()["routes"]["svc"]["failures"], timeout=10, what="the refusal")
            status = daemon.status()
            route = status["routes"]["svc"]
            assert route["failures"] == {"pin_mismatch": 1}
            assert "evil\\nWARNING forged log line \\x1b[2J" in route["last_error"]
            _no_control(route["last_error"])
            checked = daemon.client().post("/v1/routes/svc/check")
            assert checked["cause"] == "pin_mismatch"
            assert "evil\\nWARNING" in checked["message"]
            _no_control(checked["message"])
            _no_control(str(checked["fix"]))
            table = render_status(status, datetime.now(UTC), colour=False)
            assert "evil\\nWARNING" in table
            assert "\x1b" not in table and "\u202e" not in table
            assert not any(line.startswith("WARNING forged") for line in table.splitlines())
    logged = [r.getMessage() for r in caplog.records if "evil" in r.getMessage()]
    assert logged, "the refusal was not logged"
    for line in logged:
        _no_control(line)
    assert not any(r.getMessage().startswith("WARNING forged") for r in caplog.records)


def test_the_status_table_quotes_whatever_the_document_holds() -> None:
    status = {
        "version": "x",
        "active_identity": "dev",
        "identities": {},
        "routes": {},
        "warnings": [f"route svc: {EVIL}"],
    }
    table = render_status(status, datetime.now(UTC), colour=True)
    assert "\\x1b[2J" in table
    assert "\x1b[2J" not in table and "\n" + "WARNING forged" not in table


def test_a_tls12_server_that_renegotiates_is_refused(isolated_home: Path, tmp_path: Path) -> None:
    """OpenSSL's s_server, told `R`, sends a HelloRequest; with OP_NO_RENEGOTIATION our side
    answers no_renegotiation and the server ends the connection: no second handshake, whose
    certificate the route's checks would never see."""
    openssl = require_binary("openssl")
    pki = Pki.create(tmp_path / "pki")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
    port = free_port()
    log = tmp_path / "s_server.log"
    argv = [
        openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_2", "-naccept", "1",
        "-cert", str(pki.server_cert), "-key", str(pki.server_key), "-CAfile", str(pki.client_ca_file), "-Verify", "3",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
    assert proc.stdin is not None
    try:
        wait_until(lambda: "ACCEPT" in log.read_text(errors="replace"), timeout=20, what="s_server to start")
        config = one_route_config(isolated_home, pki, port)
        with DaemonThread(config) as daemon, daemon.connect("svc") as sock:
            sock.sendall(b"first words\n")
            wait_until(lambda: "first words" in log.read_text(errors="replace"), timeout=20, what="the tunnel")
            proc.stdin.write(b"R\n")  # s_server: renegotiate now
            proc.stdin.flush()
            time.sleep(0.5)  # the HelloRequest is on its way; our answer to it is what is tested
            with contextlib.suppress(OSError):
                sock.sendall(b"after renegotiation\n")
            assert recv_all(sock, timeout=20) == b""  # the tunnel ended, with nothing more from the server
            text = log.read_text(errors="replace")
            assert "no renegotiation" in text, text
            assert "after renegotiation" not in text, text
    finally:
        proc.stdin.close()
        proc.kill()
        proc.wait(timeout=10)


def test_renew_command_gets_a_clean_environment_and_its_stderr_loses_keys_and_passwords(
    isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = Pki.create(tmp_path / "pki")
    monkeypatch.setenv("DEV_P12_PASSWORD", "dev-secret-123")
    monkeypatch.setenv("PROD_P12_PASSWORD", "prod-secret-456")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "cloud-key")
    monkeypatch.setenv("VAULT_ADDR", "https://vault.example.test")
    seen = tmp_path / "env.txt"
    key_pem = (
        pki.server.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        .decode()
        .strip()
    )
    script = tmp_path / "renew.py"
    script.write_text(
        "import os, sys\n"
        f"open({str(seen)!r}, 'w').write('\\n'.join(sorted(os.environ)))\n"
        f"sys.stderr.write({key_pem!r} + '\\nlogin with ' + os.environ.get('DEV_P12_PASSWORD', '') + ' failed\\n')\n"
        "sys.exit(3)\n"
    )
    config = write_config(
        isolated_home / "config.toml",
        identities={
            "dev": {
                "renew": "command",
                "renew_command": [sys.executable, str(script)],
                "renew_env": ["VAULT_ADDR"],
                "pkcs12_password_env": "DEV_P12_PASSWORD",
            },
            "prod": {"renew": "none", "pkcs12_password_env": "PROD_P12_PASSWORD"},
        },
        routes={},
        active="dev",
    )
    with DaemonThread(config) as daemon:
        wait_until(lambda: seen.exists(), timeout=20, what="the renew_command to run")

        def failed() -> str | None:
            renewal = daemon.status()["identities"]["dev"].get("renewal") or {}
            error = renewal.get("last_error")
            return str(error) if error else None

        error = wait_until(failed, timeout=20, what="the renewal failure in status")
    assert error is not None
    names = set(seen.read_text().split("\n"))
    assert "DEV_P12_PASSWORD" in names and "VAULT_ADDR" in names and "PATH" in names
    assert "PROD_P12_PASSWORD" not in names and "AWS_SECRET_ACCESS_KEY" not in names
    assert "dev-secret-123" not in error and "PRIVATE KEY" not in error, error
    assert "login with [password removed] failed" in error, error


def test_a_revocation_answer_quotes_its_source_and_detail() -> None:
    answer = Answer(UNKNOWN, "OCSP http://ocsp.example.test/\nforged", "responder said \x1b[2Jno")
    assert answer.source == "OCSP http://ocsp.example.test/\\nforged"
    assert answer.detail == "responder said \\x1b[2Jno"


def test_stderr_tail_removes_key_blocks_and_passwords() -> None:
    stderr = b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\nbad pass hunter2\n"
    assert stderr_tail(stderr, ["hunter2"]) == "bad pass [password removed]"
    assert stderr_tail(b"-----BEGIN PRIVATE KEY-----\nMIIE half a key", ()) == "[private key removed]"
    env = clean_environment(["MINE"], {"PATH": "/bin", "MINE": "1", "OTHER_PASSWORD": "x", "LC_ALL": "C"})
    assert env == {"PATH": "/bin", "MINE": "1", "LC_ALL": "C"}


def test_unsafe_listen_is_a_warning_in_status(isolated_home: Path, tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
    with mtls_server(pki, mode="echo") as server:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={
                "open": route_to(pki, server.port, listen="0.0.0.0:0", unsafe_listen=True),
                "local": route_to(pki, server.port),
            },
        )
        with DaemonThread(config) as daemon:
            status = daemon.status()
            warned = [w for w in status["warnings"] if "unsafe_listen" in w]
            assert len(warned) == 1 and warned[0].startswith("route open:"), status["warnings"]
            assert status["routes"]["open"]["unsafe_listen"] is True
            assert status["routes"]["local"]["unsafe_listen"] is False
            with socket.create_connection(("127.0.0.1", daemon.port("open")), timeout=10) as sock:
                sock.sendall(b"hi\n")
                assert sock.recv(3) == b"hi\n"
