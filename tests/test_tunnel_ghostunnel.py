"""`mtls-sidecar tunnel` as a drop-in for ghostunnel's client mode: reloads, half-close,
fail-fast start-up, staged shutdown and the flags a ghostunnel user reaches for.

Real TLS servers on loopback (tests/tlsserver.py), the real command in a subprocess.
"""

from __future__ import annotations

import signal
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from subprocess import Popen

import pytest
from cryptography import x509

from sidecar.cli import main
from tests.pki import Leaf
from tests.realservers import free_port
from tests.scenario import Pki, mtls_server, recv_all
from tests.test_cli import LogFollower, sidecar_process
from tests.tlsserver import ScriptedTLSServer
from tests.waiting import wait_until

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals (SIGHUP, SIGUSR1)")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


@contextmanager
def tunnel(*flags: str, listen: str | None = None) -> Iterator[tuple[Popen[str], LogFollower, int]]:
    """A running `tunnel` on a free loopback port (or `listen`); yields the process, its log and the port."""
    port = free_port()
    with sidecar_process("tunnel", "--listen", listen or f"127.0.0.1:{port}", *flags) as (proc, log):
        log.wait_for(r"listening on ")
        yield proc, log, port


def presented_serial(server: ScriptedTLSServer) -> int:
    """The serial of the client certificate the server saw on its newest connection."""
    der = server.peer_certs[-1]
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def echo_once(port: int, payload: bytes = b"ping\n") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def pair_flags(pki: Pki, cert: Path, key: Path) -> list[str]:
    return ["--cert", str(cert), "--key", str(key), "--cacert", str(pki.server_ca_file)]


def newer_leaf(pki: Pki, cn: str, days_ago: int) -> Leaf:
    now = datetime.now(UTC)
    return pki.client_ca.client(cn, not_before=now - timedelta(days=days_ago), not_after=now + timedelta(days=30))


# --- reloads


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGUSR1])
def test_a_reload_signal_rereads_a_single_keystore_file_and_keeps_open_connections(
    pki: Pki, tmp_path: Path, sig: signal.Signals
) -> None:
    first = newer_leaf(pki, "me", days_ago=2)
    bundle = first.write_bundle(tmp_path / "ks", "me.pem")
    with (
        mtls_server(pki) as server,
        tunnel(
            "--target", f"127.0.0.1:{server.port}", "--keystore", str(bundle), "--cacert", str(pki.server_ca_file)
        ) as (proc, log, port),
    ):
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.sendall(b"before\n")
        assert held.recv(100) == b"before\n"
        assert presented_serial(server) == first.cert.serial_number

        second = newer_leaf(pki, "me", days_ago=1)
        second.write_bundle(tmp_path / "ks", "me.pem")
        proc.send_signal(sig)
        log.wait_for(rf"{sig.name}: reloading")
        log.wait_for(r"now presenting serial " + f"{second.cert.serial_number:x}")
        assert proc.poll() is None, log.text  # a reload signal never ends the tunnel
        assert echo_once(port) == b"ping\n"
        assert presented_serial(server) == second.cert.serial_number

        held.sendall(b"after the reload\n")  # the open connection stays as it was
        assert held.recv(100) == b"after the reload\n"
        held.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.text


def test_a_broken_replacement_keeps_the_last_good_certificate_until_a_good_one_arrives(
    pki: Pki, tmp_path: Path
) -> None:
    good = newer_leaf(pki, "me", days_ago=2)
    bundle = good.write_bundle(tmp_path / "ks", "me.pem")
    status_port = free_port()
    with (
        mtls_server(pki) as server,
        tunnel(
            "--target",
            f"127.0.0.1:{server.port}",
            "--keystore",
            str(bundle),
            "--cacert",
            str(pki.server_ca_file),
            "--status",
            f"http://127.0.0.1:{status_port}",
        ) as (proc, log, port),
    ):
        bundle.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
        proc.send_signal(signal.SIGHUP)
        log.wait_for(r"me\.pem is broken now \(.*\); still presenting the certificate last read from it")
        assert echo_once(port) == b"ping\n"  # new connections still work, with the last good certificate
        assert presented_serial(server) == good.cert.serial_number
        status = _get_json(status_port, "/_status")
        assert status["certificate"]["kept_last_good"]["file"] == "me.pem", status
        assert status["certificate"]["serial"] == f"{good.cert.serial_number:x}"

        fixed = newer_leaf(pki, "me", days_ago=1)
        fixed.write_bundle(tmp_path / "ks", "me.pem")
        proc.send_signal(signal.SIGHUP)
        log.wait_for(r"now presenting serial " + f"{fixed.cert.serial_number:x}")
        assert echo_once(port) == b"ping\n"
        assert presented_serial(server) == fixed.cert.serial_number
        assert _get_json(status_port, "/_status")["certificate"]["kept_last_good"] is None


def test_timed_reload_picks_up_a_replaced_cert_and_key_pair(pki: Pki, tmp_path: Path) -> None:
    first = newer_leaf(pki, "me", days_ago=2)
    cert, key = first.write_pair(tmp_path / "pair", "client")
    with (
        mtls_server(pki) as server,
        tunnel(
            "--target",
            f"127.0.0.1:{server.port}",
            "--cert",
            str(cert),
            "--key",
            str(key),
            "--cacert",
            str(pki.server_ca_file),
            "--timed-reload",
            "300ms",
        ) as (_proc, log, port),
    ):
        second = newer_leaf(pki, "me", days_ago=1)
        second.write_pair(tmp_path / "pair", "client")
        log.wait_for(r"now presenting serial " + f"{second.cert.serial_number:x}", timeout=10)
        assert echo_once(port) == b"ping\n"
        assert presented_serial(server) == second.cert.serial_number


def test_a_reload_rereads_the_cacert(pki: Pki, tmp_path: Path) -> None:
    """--cacert starts out trusting another CA: refused; the right CA copied in + SIGHUP: accepted."""
    other = Pki.create(tmp_path / "other")
    cacert = tmp_path / "trust.pem"
    cacert.write_bytes(other.server_ca_file.read_bytes())
    pki.client_ca.client("me").write_pair(tmp_path / "c", "me")
    with (
        mtls_server(pki) as server,
        tunnel(
            "--target",
            f"127.0.0.1:{server.port}",
            "--cert",
            str(tmp_path / "c" / "me.crt"),
            "--key",
            str(tmp_path / "c" / "me.key"),
            "--cacert",
            str(cacert),
        ) as (proc, log, port),
    ):
        assert echo_once(port) == b""  # the server's certificate is not trusted: refused
        cacert.write_bytes(pki.server_ca_file.read_bytes())
        proc.send_signal(signal.SIGUSR1)
        log.wait_for(r"--cacert changed")
        assert echo_once(port) == b"ping\n"


# --- half-close


@pytest.mark.parametrize("listen_kind", ["tcp", "unix"])
def test_a_server_fin_without_close_notify_stays_a_half_close(pki: Pki, tmp_path: Path, listen_kind: str) -> None:
    cert, key = pki.client_ca.client("me").write_pair(tmp_path / "c", "me")
    path = tmp_path / "t.sock"
    listen = f"unix:{path}" if listen_kind == "unix" else None
    with (
        mtls_server(pki, mode="fin_then_read") as server,
        tunnel(
            "--target",
            f"127.0.0.1:{server.port}",
            "--cert",
            str(cert),
            "--key",
            str(key),
            "--cacert",
            str(pki.server_ca_file),
            listen=listen,
        ) as (_proc, _log, port),
    ):
        if listen_kind == "unix":
            client = socket.socket(socket.AF_UNIX)
            client.settimeout(10)
            client.connect(str(path))
        else:
            client = socket.create_connection(("127.0.0.1", port), timeout=10)
        with client:
            received = b""
            while chunk := client.recv(65536):  # ends at the server's EOF, passed on as one
                received += chunk
            assert received == b"first part\n"
            client.sendall(b"late words from the client")  # no broken pipe: our direction is open
            client.shutdown(socket.SHUT_WR)
            server.wait_for(lambda: server.app_received == b"late words from the client", what="the late words")


# --- fail-fast start-up


def _base(pki: Pki, tmp_path: Path, target: str = "127.0.0.1:9") -> list[str]:
    cert, key = pki.client_ca.client("me").write_pair(tmp_path / "c", "me")
    return ["tunnel", "--listen", "127.0.0.1:0", "--target", target, "--cert", str(cert), "--key", str(key)]


def test_a_cacert_that_does_not_exist_or_holds_no_certificate_exits_2(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.pem"
    assert main([*_base(pki, tmp_path), "--cacert", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "--cacert" in err and "nope.pem" in err, err
    empty = tmp_path / "empty.pem"
    empty.write_text("no certificates in here\n")
    assert main([*_base(pki, tmp_path), "--cacert", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "--cacert" in err and "empty.pem" in err and "cannot load trusted CA certificates" in err, err


def test_a_keystore_with_a_wrong_password_or_without_a_key_exits_2(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    leaf = pki.client_ca.client("me")
    p12 = leaf.write_p12(tmp_path / "ks", "me.p12", b"right")
    args = ["tunnel", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:9", "--keystore", str(p12)]
    assert main([*args, "--storepass", "wrong"]) == 2
    err = capsys.readouterr().err
    assert "--keystore" in err and "password" in err, err
    lonely = tmp_path / "ks" / "cert-only.pem"
    lonely.write_bytes(leaf.chain_pem())
    assert main(["tunnel", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:9", "--keystore", str(lonely)]) == 2
    err = capsys.readouterr().err
    assert "no usable client certificate" in err and "key" in err, err


def test_an_unresolvable_target_exits_1_unless_skip_resolve(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _base(pki, tmp_path, target="no-such-host.invalid:443")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "no-such-host.invalid" in err and "--skip-resolve" in err, err
    port = free_port()
    args[2] = f"127.0.0.1:{port}"
    with sidecar_process(*args, "--skip-resolve") as (proc, log):
        log.wait_for(r"listening on ")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.text


@pytest.mark.parametrize(
    ("flags", "pair"),
    [
        (["--proxy", "http://127.0.0.1:1", "--connect-proxy", "http://127.0.0.1:1"], ("--connect-proxy", "--proxy")),
        (["--storepass", "x", "--storepass-env", "X"], ("--storepass-env", "--storepass")),
        (["--keystore", "ks.p12"], ("--keystore", "--cert")),
        (["--disable-authentication"], ("--disable-authentication", "--cert")),
        (["--verify-spki-pin", "sha256:" + "A" * 43 + "=", "--verify-cn", "x"], ("--verify-spki-pin", "--verify-cn")),
    ],
)
def test_mutually_exclusive_flags_exit_2_naming_the_pair(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], pair: tuple[str, str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        raise SystemExit(main([*_base(pki, tmp_path), *flags]))
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert pair[0] in err and pair[1] in err, err


def test_enable_shutdown_needs_status(pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*_base(pki, tmp_path), "--enable-shutdown"]) == 2
    assert "--enable-shutdown" in capsys.readouterr().err


# --- shutdown


def test_an_open_connection_at_sigterm_is_cut_after_the_shutdown_timeout_and_the_exit_is_1(
    pki: Pki, tmp_path: Path
) -> None:
    cert, key = pki.client_ca.client("me").write_pair(tmp_path / "c", "me")
    with (
        mtls_server(pki) as server,
        tunnel(
            "--target",
            f"127.0.0.1:{server.port}",
            "--cert",
            str(cert),
            "--key",
            str(key),
            "--cacert",
            str(pki.server_ca_file),
            "--shutdown-timeout",
            "1s",
        ) as (proc, log, port),
    ):
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.sendall(b"hi\n")
        assert held.recv(10) == b"hi\n"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 1, log.text
        assert time.monotonic() - started < 10  # the 1 s timeout, not the 5-minute default
        assert "--shutdown-timeout (1s) passed" in log.text
        assert recv_all(held) == b""
        held.close()


def test_shutdown_ends_as_soon_as_the_open_connection_finishes(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.client_ca.client("me").write_pair(tmp_path / "c", "me")
    with (
        mtls_server(pki) as server,
        tunnel("--target", f"127.0.0.1:{server.port}", *pair_flags(pki, cert, key)) as (proc, log, port),
    ):
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.sendall(b"hi\n")
        assert held.recv(10) == b"hi\n"
        proc.send_signal(signal.SIGTERM)
        log.wait_for(r"waiting up to 300s for 1 connection")
        held.sendall(b"still carried\n")
        assert held.recv(100) == b"still carried\n"
        held.shutdown(socket.SHUT_WR)
        assert recv_all(held) == b""
        held.close()
        assert proc.wait(timeout=20) == 0, log.text  # not after the 5-minute timeout


def test_a_second_stop_signal_cuts_at_once(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.client_ca.client("me").write_pair(tmp_path / "c", "me")
    with (
        mtls_server(pki) as server,
        tunnel("--target", f"127.0.0.1:{server.port}", *pair_flags(pki, cert, key)) as (proc, log, port),
    ):
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.sendall(b"hi\n")
        assert held.recv(10) == b"hi\n"
        proc.send_signal(signal.SIGTERM)
        log.wait_for(r"waiting up to 300s for 1 connection")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 1, log.text
        assert "second stop signal: cutting open connections now" in log.text
        held.close()


def test_close_timeout_closes_a_half_closed_tunnel_whose_other_side_stays_open(pki: Pki, tmp_path: Path) -> None:
    """The server half-closes (FIN) and then never finishes reading: with --close-timeout 1s the tunnel
    closes a second later; the local client, which never sent its EOF, sees the connection end."""
    cert, key = pki.client_ca.client("me").write_pair(tmp_path / "c", "me")
    with (
        mtls_server(pki, mode="fin_then_read") as server,
        tunnel(
            "--target",
            f"127.0.0.1:{server.port}",
            "--cert",
            str(cert),
            "--key",
            str(key),
            "--cacert",
            str(pki.server_ca_file),
            "--close-timeout",
            "1s",
        ) as (_proc, log, port),
        socket.create_connection(("127.0.0.1", port), timeout=10) as client,
    ):
        assert recv_all(client) == b"first part\n"
        log.wait_for(r"one side finished 1s ago and the other did not: closing \(close_timeout\)")
        server.wait_closed(1)  # the server side, closed by the tunnel


# --- the status port


def _get_json(port: int, path: str, *, tls: bool = False) -> dict[str, object]:
    import http.client
    import json

    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection("127.0.0.1", port, timeout=20, context=ctx)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.request("GET", path)
    answer = conn.getresponse()
    body = json.loads(answer.read())
    conn.close()
    assert isinstance(body, dict)
    return body


def _request(port: int, method: str, path: str, *, tls: bool) -> tuple[int, bytes, bytes | None]:
    """Status code, body, and the certificate the port presented (DER; None over plain HTTP)."""
    import http.client

    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection("127.0.0.1", port, timeout=20, context=ctx)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.connect()
    der = conn.sock.getpeercert(binary_form=True) if isinstance(conn.sock, ssl.SSLSocket) else None
    conn.request(method, path)
    answer = conn.getresponse()
    body = answer.read()
    conn.close()
    return answer.status, body, der


def test_status_port_over_https_presents_the_current_client_certificate_and_follows_a_reload(
    pki: Pki, tmp_path: Path
) -> None:
    import json

    first = newer_leaf(pki, "me", days_ago=2)
    bundle = first.write_bundle(tmp_path / "ks", "me.pem")
    status_port = free_port()
    with (
        mtls_server(pki) as server,
        tunnel(
            "--target",
            f"127.0.0.1:{server.port}",
            "--keystore",
            str(bundle),
            "--cacert",
            str(pki.server_ca_file),
            "--status",
            f"127.0.0.1:{status_port}",
        ) as (proc, log, port),
    ):
        code, body, der = _request(status_port, "GET", "/_status", tls=True)
        assert code == 200, body
        status = json.loads(body)
        assert status["ok"] is True and status["backend_ok"] is True and status["message"] == "listening", status
        assert status["forward_address"] == f"127.0.0.1:{server.port}"
        assert status["listen_address"] == f"127.0.0.1:{port}"
        assert der is not None and x509.load_der_x509_certificate(der).serial_number == first.cert.serial_number

        second = newer_leaf(pki, "me", days_ago=1)
        second.write_bundle(tmp_path / "ks", "me.pem")
        proc.send_signal(signal.SIGHUP)
        log.wait_for(r"now presenting serial")
        _code, _body, der = _request(status_port, "GET", "/_status", tls=True)
        assert der is not None and x509.load_der_x509_certificate(der).serial_number == second.cert.serial_number

        code, _body, _ = _request(status_port, "POST", "/_shutdown", tls=True)
        assert code == 404  # not enabled


def test_status_reports_a_failing_backend_with_503(pki: Pki, tmp_path: Path) -> None:
    import json

    cert, key = pki.client_ca.client("me").write_pair(tmp_path / "c", "me")
    status_port = free_port()
    dead = free_port()
    with tunnel(
        "--target",
        f"127.0.0.1:{dead}",
        "--cert",
        str(cert),
        "--key",
        str(key),
        "--cacert",
        str(pki.server_ca_file),
        "--status",
        f"http://127.0.0.1:{status_port}",
    ):
        code, body, _ = _request(status_port, "GET", "/_status", tls=False)
        assert code == 503, body
        status = json.loads(body)
        assert status["ok"] is False and status["backend_ok"] is False and status["backend_status"] == "critical"
        assert status["backend_error"], status


def test_post_shutdown_stops_the_tunnel_gracefully(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.client_ca.client("me").write_pair(tmp_path / "c", "me")
    status_port = free_port()
    with (
        mtls_server(pki) as server,
        tunnel(
            "--target",
            f"127.0.0.1:{server.port}",
            "--cert",
            str(cert),
            "--key",
            str(key),
            "--cacert",
            str(pki.server_ca_file),
            "--status",
            f"127.0.0.1:{status_port}",
            "--enable-shutdown",
        ) as (proc, log, _port),
    ):
        code, _body, _ = _request(status_port, "GET", "/_shutdown", tls=True)
        assert code == 405
        assert proc.poll() is None
        code, _body, _ = _request(status_port, "POST", "/_shutdown", tls=True)
        assert code == 200
        assert proc.wait(timeout=20) == 0, log.text
        assert "stopping (POST /_shutdown)" in log.text


# --- authentication off


def test_disable_authentication_reaches_a_server_that_asks_for_no_certificate(pki: Pki, tmp_path: Path) -> None:
    with ScriptedTLSServer(cert=pki.server_cert, key=pki.server_key, mode="echo") as server:
        port = free_port()
        with sidecar_process(
            "tunnel",
            "--listen",
            f"127.0.0.1:{port}",
            "--target",
            f"127.0.0.1:{server.port}",
            "--cacert",
            str(pki.server_ca_file),
            "--disable-authentication",
        ) as (_proc, log):
            log.wait_for(r"listening on .*no client certificate \(--disable-authentication\)")
            assert echo_once(port) == b"ping\n"
            wait_until(lambda: server.peer_certs == [None], timeout=5, what="a connection without a certificate")


def test_a_broken_replacement_in_a_keystore_folder_keeps_the_last_good_certificate(pki: Pki, tmp_path: Path) -> None:
    """Folder mode, the watch notices by itself: every new connection keeps working meanwhile."""
    good = newer_leaf(pki, "me", days_ago=2)
    cert, _key = good.write_pair(tmp_path / "ks" / "me", "me")
    with (
        mtls_server(pki) as server,
        tunnel(
            "--target",
            f"127.0.0.1:{server.port}",
            "--keystore",
            str(tmp_path / "ks" / "me"),
            "--cacert",
            str(pki.server_ca_file),
        ) as (_proc, log, port),
    ):
        cert.write_text("-----BEGIN CERTIFICATE-----\nhalf-written\n")
        log.wait_for(r"me\.crt is broken now \(.*\); still presenting the certificate last read from it")
        assert echo_once(port) == b"ping\n"
        assert presented_serial(server) == good.cert.serial_number


# --- the server checks ghostunnel's --verify-* flags set


def _server_with(pki: Pki, tmp_path: Path, **kwargs: object) -> ScriptedTLSServer:
    leaf = pki.server_ca.server("localhost", "127.0.0.1", **kwargs)
    cert, key = leaf.write_pair(tmp_path / "srv", "server")
    return ScriptedTLSServer(cert=cert, key=key, client_ca=pki.client_ca_file, require_client_cert=True, mode="echo")


def test_verify_uri_accepts_the_right_server_and_refuses_another(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.client_ca.client("me").write_pair(tmp_path / "c", "me")
    with _server_with(pki, tmp_path, uris=["spiffe://example.test/api"]) as server:
        for pattern, works in (("spiffe://example.test/*", True), ("spiffe://example.test/db", False)):
            with tunnel(
                "--target", f"127.0.0.1:{server.port}", *pair_flags(pki, cert, key), "--verify-uri", pattern
            ) as (_proc, _log, port):
                assert echo_once(port) == (b"ping\n" if works else b""), pattern


def test_verify_spki_pin_authenticates_the_server_by_its_key_alone(pki: Pki, tmp_path: Path) -> None:
    """The pinned server's certificate is self-issued by an untrusted CA, for another name, and
    expired: the pin alone decides. The wrong pin is refused."""
    import base64
    import hashlib

    from cryptography.hazmat.primitives import serialization

    stranger = Pki.create(tmp_path / "stranger", "elsewhere.example")
    now = datetime.now(UTC)
    leaf = stranger.server_ca.server(
        "elsewhere.example", not_before=now - timedelta(days=10), not_after=now - timedelta(days=1)
    )
    srv_cert, srv_key = leaf.write_pair(tmp_path / "srv", "server")
    spki = leaf.cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pin = "sha256:" + base64.b64encode(hashlib.sha256(spki).digest()).decode()
    wrong = "sha256:" + base64.b64encode(hashlib.sha256(b"another key").digest()).decode()
    cert, key = pki.client_ca.client("me").write_pair(tmp_path / "c", "me")
    with ScriptedTLSServer(
        cert=srv_cert, key=srv_key, client_ca=pki.client_ca_file, require_client_cert=True, mode="echo"
    ) as server:
        for given, works in ((pin, True), (wrong, False)):
            with tunnel(
                "--target",
                f"127.0.0.1:{server.port}",
                "--cert",
                str(cert),
                "--key",
                str(key),
                "--verify-spki-pin",
                given,
            ) as (_proc, _log, port):
                assert echo_once(port) == (b"ping\n" if works else b""), given


@pytest.mark.parametrize(
    ("flag", "right", "wrong", "server"),
    [
        ("--verify-cn", "api-server", "db-server", {"cn": "api-server"}),
        ("--verify-ou", "payments", "billing", {"ou": "payments"}),
        ("--verify-dns", "api.internal.test", "db.internal.test", {"dns": ["localhost", "api.internal.test"]}),
        ("--verify-ip", "0:0::1", "10.9.9.9", {"ips": ["127.0.0.1", "::1"]}),
    ],
)
def test_each_verify_flag_accepts_the_right_server_and_refuses_another(
    pki: Pki, tmp_path: Path, flag: str, right: str, wrong: str, server: dict[str, object]
) -> None:
    from cryptography.x509.oid import ExtendedKeyUsageOID

    leaf = pki.server_ca.issue(
        str(server.get("cn", "localhost")),
        dns=list(server.get("dns", ["localhost"])),  # type: ignore[call-overload]
        ips=list(server.get("ips", ["127.0.0.1"])),  # type: ignore[call-overload]
        ou=server.get("ou"),  # type: ignore[arg-type]
        eku=(ExtendedKeyUsageOID.SERVER_AUTH,),
    )
    srv_cert, srv_key = leaf.write_pair(tmp_path / "srv", "server")
    cert, key = pki.client_ca.client("me").write_pair(tmp_path / "c", "me")
    with ScriptedTLSServer(
        cert=srv_cert, key=srv_key, client_ca=pki.client_ca_file, require_client_cert=True, mode="echo"
    ) as srv:
        for value, works in ((right, True), (wrong, False)):
            with tunnel("--target", f"127.0.0.1:{srv.port}", *pair_flags(pki, cert, key), flag, value) as (
                _proc,
                log,
                port,
            ):
                assert echo_once(port) == (b"ping\n" if works else b""), (flag, value)
                if not works:
                    log.wait_for(r"matches nothing the route allows")


def test_metrics_on_the_status_port_parse_as_prometheus_text(pki: Pki, tmp_path: Path) -> None:
    import json

    from prometheus_client.parser import text_string_to_metric_families

    leaf = pki.client_ca.client("me")
    cert, key = leaf.write_pair(tmp_path / "c", "me")
    status_port = free_port()
    with (
        mtls_server(pki) as server,
        tunnel(
            "--target", f"127.0.0.1:{server.port}", *pair_flags(pki, cert, key), "--status", f"127.0.0.1:{status_port}"
        ) as (_proc, _log, port),
    ):
        for _ in range(3):
            assert echo_once(port) == b"ping\n"
        wait_until(
            lambda: (
                json.loads(_request(status_port, "GET", "/_metrics/json", tls=True)[1])["route"]["active_connections"]
                == 0
            ),
            timeout=10,
            what="the three connections closed",
        )
        code, body, _ = _request(status_port, "GET", "/_metrics", tls=True)
        assert code == 200
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }
        assert samples[("mtls_sidecar_connections_total", (("route", "tunnel"),))] == 3
        assert samples[("mtls_sidecar_bytes_total", (("direction", "sent"), ("route", "tunnel")))] == 15
        assert samples[("mtls_sidecar_handshake_seconds_count", (("route", "tunnel"),))] >= 1
        expiry = samples[("mtls_sidecar_certificate_expiry_seconds", (("identity", "tunnel"),))]
        left = (leaf.cert.not_valid_after_utc - datetime.now(UTC)).total_seconds()
        assert abs(expiry - left) < 60, (expiry, left)
        code, body, _ = _request(status_port, "GET", "/_metrics?format=json", tls=True)
        assert code == 200 and json.loads(body)["route"]["total_connections"] == 3


def test_a_status_port_already_taken_exits_1_naming_it(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.client_ca.client("me").write_pair(tmp_path / "c", "me")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        port = free_port()
        with sidecar_process(
            "tunnel",
            "--listen",
            f"127.0.0.1:{port}",
            "--target",
            "127.0.0.1:9",
            *pair_flags(pki, cert, key),
            "--status",
            f"127.0.0.1:{busy}",
        ) as (proc, log):
            assert proc.wait(timeout=20) == 1, log.text
            log.join()
            expected = f"--status https://127.0.0.1:{busy}: cannot listen on 127.0.0.1:{busy}: the port is taken"
            assert expected in log.text, log.text
            assert "Traceback" not in log.text


def test_a_unix_status_socket_speaks_plain_http_to_its_owner_only(pki: Pki, tmp_path: Path) -> None:
    import json
    import stat

    cert, key = pki.client_ca.client("me").write_pair(tmp_path / "c", "me")
    path = tmp_path / "status.sock"
    with (
        mtls_server(pki) as server,
        tunnel("--target", f"127.0.0.1:{server.port}", *pair_flags(pki, cert, key), "--status", f"unix:{path}"),
    ):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(20)
            sock.connect(str(path))
            sock.sendall(b"GET /_status HTTP/1.1\r\nHost: status\r\n\r\n")
            head, _, body = recv_all(sock).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert json.loads(body)["backend_ok"] is True


# --- upstream proxies


@pytest.mark.parametrize(("kind", "flag"), [("http", "--proxy"), ("socks5", "--connect-proxy")])
def test_the_tunnel_reaches_its_target_through_a_proxy_with_credentials_from_the_environment(
    pki: Pki, tmp_path: Path, kind: str, flag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.proxies import UpstreamProxyServer

    cert, key = pki.client_ca.client("me").write_pair(tmp_path / "c", "me")
    monkeypatch.setenv("CORP_PROXY_AUTH", "dev:s3cret")
    with (
        mtls_server(pki) as server,
        UpstreamProxyServer(kind, credentials=("dev", "s3cret")) as proxy,
        tunnel(
            # a name only the proxy needs to resolve: the tunnel starts without resolving it
            "--target",
            f"localhost:{server.port}",
            *pair_flags(pki, cert, key),
            flag,
            proxy.url,
            "--proxy-auth-env",
            "CORP_PROXY_AUTH",
        ) as (_proc, log, port),
    ):
        assert echo_once(port) == b"ping\n"
        assert proxy.requests == [f"localhost:{server.port}"]
        assert proxy.authorizations == ["dev:s3cret"]
        assert "s3cret" not in log.text


def test_a_proxy_that_refuses_is_named_and_the_tunnel_keeps_serving(pki: Pki, tmp_path: Path) -> None:
    from tests.proxies import UpstreamProxyServer

    cert, key = pki.client_ca.client("me").write_pair(tmp_path / "c", "me")
    with (
        mtls_server(pki) as server,
        UpstreamProxyServer("http", refuse=403) as proxy,
        tunnel("--target", f"127.0.0.1:{server.port}", *pair_flags(pki, cert, key), "--proxy", proxy.url) as (
            proc,
            log,
            port,
        ),
    ):
        assert echo_once(port) == b""
        log.wait_for(rf"127\.0\.0\.1:{proxy.port}.*403")
        assert echo_once(port) == b""
        assert proc.poll() is None


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("https://proxy.corp:3128", "https"),
        ("http://user:hunter2@proxy.corp:3128", "--proxy-auth-env"),
        ("proxy.corp:3128", "not a proxy URL"),
    ],
)
def test_a_bad_proxy_url_exits_2_naming_the_flag(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, says: str
) -> None:
    assert main([*_base(pki, tmp_path), "--proxy", url]) == 2
    err = capsys.readouterr().err
    assert "--proxy" in err and says in err, err
    assert "hunter2" not in err, err  # the password is not echoed
