"""`protocol = "mysql"` against a real MariaDB whose users require our client certificate.

The `mariadb` client (`--skip-ssl`) and PyMySQL (an independent pure-Python driver) connect
in plaintext to the route; the server sees TLS (`Ssl_version`) with our certificate, which
`REQUIRE SUBJECT '/CN=dev'` checks, so the same client straight to the server is refused. An
ed25519 user makes the server switch the client's auth plugin through the route. Failures
(a server without TLS, a target that is down, a client that is not MySQL) are named in
status, reach the client as MySQL errors with the reason and the fix, and the route keeps
serving.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest

from sidecar.protocols.mysql import (
    CLIENT_PLUGIN_AUTH,
    CLIENT_PROTOCOL_41,
    CLIENT_SECURE_CONNECTION,
    CLIENT_SSL,
    next_packet,
    packet,
    parse_greeting,
)
from tests.daemon_runner import DaemonThread
from tests.mariadb import MariaDB, binary, mariadb_mtls
from tests.pki import CA
from tests.realservers import free_port
from tests.scenario import Pki, route_to, write_config
from tests.test_cli import sidecar_process
from tests.waiting import wait_until

ED25519_PASSWORD = "ed-secret"
NATIVE_PASSWORD = "native-secret"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pki, MariaDB]]:
    pki = Pki.create(tmp_path_factory.mktemp("mysql-pki"))
    with mariadb_mtls(server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.client_ca_file) as db:
        db.sql(
            "CREATE USER 'dev'@'%' REQUIRE SUBJECT '/CN=dev'; GRANT ALL ON *.* TO 'dev'@'%';"
            f"CREATE USER 'pw'@'%' IDENTIFIED BY '{NATIVE_PASSWORD}' REQUIRE SUBJECT '/CN=dev';"
            "CREATE DATABASE big; GRANT SELECT ON big.* TO 'pw'@'%';"
            f"CREATE USER 'edd'@'%' IDENTIFIED VIA ed25519 USING PASSWORD('{ED25519_PASSWORD}')"
            " REQUIRE SUBJECT '/CN=dev';"
        )
        yield pki, db


@pytest.fixture
def daemon(lab: tuple[Pki, MariaDB], isolated_home: Path) -> Iterator[DaemonThread]:
    pki, db = lab
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    config = write_config(
        isolated_home / "config.toml",
        identities={"dev": {"renew": "none"}},
        routes={
            "db": route_to(pki, db.port, protocol="mysql"),
            "db_tls": route_to(pki, db.port, protocol="mysql", local_tls=True),
            "db_as_tcp": route_to(pki, db.port),  # what a user had before this protocol existed
        },
    )
    with DaemonThread(config) as running:
        yield running


def mariadb(port: int, sql: str, user: str = "dev", *extra: str) -> subprocess.CompletedProcess[str]:
    """The mariadb client in plaintext (as it must be: the route's local side is plaintext)."""
    argv = [binary("mariadb"), "--no-defaults", "-h", "127.0.0.1", "-P", str(port), f"-u{user}", "--skip-ssl"]
    return subprocess.run(
        [*argv, *extra, "-N", "-B", "--connect-timeout=20", "-e", sql], capture_output=True, text=True, timeout=30
    )


SESSION = "select current_user(); show session status like 'Ssl_version'"


def test_the_mariadb_client_in_plaintext_is_mtls_on_the_server(lab: tuple[Pki, MariaDB], daemon: DaemonThread) -> None:
    _, db = lab
    done = mariadb(daemon.port("db"), SESSION)
    assert done.returncode == 0, done.stderr
    user, ssl_version = done.stdout.splitlines()
    assert user == "dev@%"  # REQUIRE SUBJECT '/CN=dev' took our certificate
    assert ssl_version.startswith("Ssl_version\tTLSv1.")  # the server's side of the session is TLS
    assert daemon.status()["routes"]["db"]["failures"] == {}
    # The same client straight to the server, with no certificate, is refused: the route did it.
    direct = mariadb(db.port, "select 1")
    assert direct.returncode != 0 and "Access denied for user 'dev'" in direct.stderr, direct.stderr


def test_sessions_end_without_counting_a_failure_compressed_or_not(daemon: DaemonThread) -> None:
    """The server hangs up after COM_QUIT without TLS close_notify; the route ends the session
    itself first, so no session is counted as cut short (it was, often, before)."""
    port = daemon.port("db")
    for extra in ((), ("--compress",)) * 3:
        done = mariadb(port, "show session status like 'Compression'", "dev", *extra)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["Compression", "ON" if extra else "OFF"]
    wait_until(
        lambda: daemon.status()["routes"]["db"]["active_connections"] == 0, timeout=10, what="the sessions to end"
    )
    status = daemon.status()["routes"]["db"]
    assert status["failures"] == {} and status["total_connections"] == 6, status


def test_pymysql_with_a_password_and_a_large_result(daemon: DaemonThread) -> None:
    conn = pymysql.connect(
        host="127.0.0.1",
        port=daemon.port("db"),
        user="pw",
        password=NATIVE_PASSWORD,
        database="big",
        connect_timeout=20,
    )
    try:
        with conn.cursor() as cursor:
            cursor.execute("select current_user(), @@version")
            user, version = cursor.fetchone()
            assert user == "pw@%" and "MariaDB" in version
            cursor.execute("show session status like 'Ssl_version'")
            assert cursor.fetchone()[1].startswith("TLSv1.")
            cursor.execute("select seq, repeat('x', 100) from seq_1_to_50000")  # the sequence engine
            rows = cursor.fetchall()
            assert len(rows) == 50000 and rows[-1] == (50000, "x" * 100)
    finally:
        conn.close()
    assert daemon.status()["routes"]["db"]["failures"] == {}


def test_an_ed25519_user_switches_the_clients_auth_plugin_through_the_route(daemon: DaemonThread) -> None:
    port = daemon.port("db")
    # The server's greeting (as the client gets it) names mysql_native_password, which the
    # client starts with; edd's plugin is ed25519, so the server must send an AuthSwitchRequest.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        greeting = parse_greeting(PacketReader(sock).read()[1])
    assert greeting.plugin == "mysql_native_password" and not greeting.capabilities & CLIENT_SSL
    done = mariadb(port, "select current_user()", "edd", f"-p{ED25519_PASSWORD}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "edd@%"
    wrong = mariadb(port, "select 1", "edd", "-pnot-the-password")
    assert wrong.returncode != 0 and "Access denied for user 'edd'" in wrong.stderr, wrong.stderr
    # The server said no to a password: that is the server's answer, not a failure of the route.
    assert daemon.status()["routes"]["db"]["failures"] == {}


def test_a_handshake_response_in_pieces_by_hand(daemon: DaemonThread) -> None:
    """Our own HandshakeResponse41 sent in three writes: the stage frames it, the server takes it."""
    with socket.create_connection(("127.0.0.1", daemon.port("db")), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = PacketReader(sock)
        seq, _ = reader.read()
        assert seq == 0
        flags = CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH
        response = struct.pack("<IIB", flags, 1 << 24, 45) + b"\0" * 23 + b"dev\0" + b"\0" + b"mysql_native_password\0"
        wire = packet(1, response)
        for piece in (wire[:2], wire[2:20], wire[20:]):
            sock.sendall(piece)
            time.sleep(0.05)  # separate writes are the subject of the test, not synchronisation
        seq, ok = reader.read()
        assert (seq, ok[:1]) == (2, b"\x00"), ok  # OK, numbered as a plaintext client expects
        sock.sendall(packet(0, b"\x03select current_user()"))
        answer = b""
        deadline = time.monotonic() + 10
        while b"dev@%" not in answer and time.monotonic() < deadline:
            answer += reader.read()[1]
        assert b"dev@%" in answer


def test_a_server_without_tls_is_named_the_client_reads_why_and_the_route_keeps_serving(
    lab: tuple[Pki, MariaDB], isolated_home: Path
) -> None:
    pki, db = lab
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    with mariadb_mtls(
        server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.client_ca_file, ssl=False
    ) as plain:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={
                "plain": route_to(pki, plain.port, protocol="mysql"),
                "db": route_to(pki, db.port, protocol="mysql"),
            },
        )
        with DaemonThread(config) as daemon:
            first = mariadb(daemon.port("plain"), "select 1")
            second = mariadb(daemon.port("plain"), "select 1")
            good = mariadb(daemon.port("db"), SESSION)
            status = daemon.status()["routes"]
    for done in (first, second):
        assert done.returncode != 0
        assert "ERROR 1043 (HY000)" in done.stderr, done.stderr  # before the greeting: no SQLSTATE
        assert f"mtls-sidecar: 127.0.0.1:{plain.port} does not offer TLS" in done.stderr
        assert "ssl_cert, ssl_key, ssl_ca" in done.stderr  # the fix
    assert status["plain"]["failures"] == {"server_offers_no_tls": 2}
    assert status["plain"]["state"] == "up"
    assert good.returncode == 0 and good.stdout.startswith("dev@%"), good.stderr
    assert status["db"]["failures"] == {}


def test_a_target_that_is_down_reaches_the_client_as_an_error_with_the_fix(
    lab: tuple[Pki, MariaDB], isolated_home: Path
) -> None:
    pki, _ = lab
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    config = write_config(
        isolated_home / "config.toml",
        identities={"dev": {"renew": "none"}},
        routes={"db": route_to(pki, closed, protocol="mysql")},
    )
    with DaemonThread(config) as daemon:
        done = mariadb(daemon.port("db"), "select 1")
        with pytest.raises(pymysql.err.OperationalError) as raised:
            pymysql.connect(host="127.0.0.1", port=daemon.port("db"), user="dev", connect_timeout=20)
        status = daemon.status()["routes"]["db"]
    # Before any greeting: the ERR is the client's first packet, and it prints it.
    assert done.returncode != 0
    assert f"ERROR 1043 (HY000): mtls-sidecar: connection to 127.0.0.1:{closed} refused" in done.stderr, done.stderr
    assert "fix: start the service" in done.stderr
    code, text = raised.value.args
    assert code == 1043 and "refused" in text and text.startswith("mtls-sidecar:")
    assert status["failures"] == {"refused": 2}


def test_a_server_that_rejects_our_certificate_is_named_and_the_client_reads_why(
    lab: tuple[Pki, MariaDB], isolated_home: Path
) -> None:
    """With TLS 1.3 the server's verdict on our certificate comes after our side of the
    handshake, while the client waits for the answer to its login: it gets an ERR there."""
    pki, db = lab
    CA("Not the server's client CA").client("dev").write_pair(isolated_home / "keystore" / "dev", "dev-1")
    config = write_config(
        isolated_home / "config.toml",
        identities={"dev": {"renew": "none"}},
        routes={"db": route_to(pki, db.port, protocol="mysql")},
    )
    with DaemonThread(config) as daemon:
        done = mariadb(daemon.port("db"), "select 1")
        status = daemon.status()["routes"]["db"]
    assert done.returncode != 0
    assert "ERROR 1043 (08S01): mtls-sidecar: " in done.stderr, done.stderr
    assert "rejected our client certificate" in done.stderr and "fix: " in done.stderr
    assert status["failures"] == {"server_rejected_certificate": 1}, status


def test_a_client_that_is_not_mysql_is_named_and_the_route_keeps_serving(daemon: DaemonThread) -> None:
    with daemon.connect("db") as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # speaks first: a MySQL client waits for the greeting
        sock.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(65536):
                pass  # the greeting may have come first; then the close
    wait_until(lambda: daemon.status()["routes"]["db"]["failures"], timeout=10, what="the failure to be counted")
    status = daemon.status()["routes"]["db"]
    assert status["failures"] == {"protocol_mismatch": 1}, status
    assert "the local client does not speak MySQL" in status["last_error"]
    done = mariadb(daemon.port("db"), "select current_user()")
    assert done.returncode == 0 and done.stdout.strip() == "dev@%", done.stderr


def test_tunnel_command_with_protocol_mysql(lab: tuple[Pki, MariaDB], tmp_path: Path) -> None:
    pki, db = lab
    cert, key = pki.client_ca.client("dev").write_pair(tmp_path / "client", "dev")
    port = free_port()
    args = [
        "tunnel", "--protocol", "mysql", "--listen", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{db.port}",
        "--cert", str(cert), "--key", str(key), "--cacert", str(pki.server_ca_file), "--server-name", "localhost",
    ]  # fmt: skip
    with sidecar_process(*args) as (proc, log):
        log.wait_for(rf"listening on 127\.0\.0\.1:{port} → 127\.0\.0\.1:{db.port}")
        done = mariadb(port, SESSION)
        proc.send_signal(signal.SIGINT)
    assert done.returncode == 0, done.stderr + log.text
    assert done.stdout.splitlines()[0] == "dev@%"


def mariadb_tls(port: int, root: Path, sql: str, user: str = "dev", *extra: str) -> subprocess.CompletedProcess[str]:
    """The mariadb client insisting on TLS with a verified server certificate for 127.0.0.1
    (libmariadb's --ssl-verify-server-cert checks the chain and the host name)."""
    argv = [
        binary("mariadb"), "--no-defaults", "-h", "127.0.0.1", "-P", str(port), f"-u{user}", "--ssl",
        f"--ssl-ca={root}", "--ssl-verify-server-cert", "--connect-timeout=20", *extra,
    ]  # fmt: skip
    return subprocess.run([*argv, "-N", "-B", "-e", sql], capture_output=True, text=True, timeout=30)


def test_local_tls_serves_clients_that_insist_on_a_verified_tls(
    lab: tuple[Pki, MariaDB], daemon: DaemonThread, isolated_home: Path
) -> None:
    """local_tls: the client's own TLS ends in the sidecar (a dev-CA certificate for
    127.0.0.1), the server still sees mTLS with our identity; sequence ids need no renumbering."""
    root = isolated_home / "ca" / "ca.crt"
    assert root.exists()
    port = daemon.port("db_tls")
    done = mariadb_tls(port, root, SESSION + ";\\s")  # \\s: the client's own status
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "dev@%"  # REQUIRE SUBJECT '/CN=dev' took our certificate
    assert lines[1].startswith("Ssl_version\tTLSv1.")  # the server's side is TLS
    assert any(line.startswith("SSL:") and "Cipher in use" in line for line in lines), done.stdout  # and the client's
    # The same route serves a client that does not ask for TLS, in plaintext.
    plain = mariadb(port, "select current_user()")
    assert plain.returncode == 0 and plain.stdout.strip() == "dev@%", plain.stderr
    # Through an auth-plugin switch (ed25519): its packets keep their numbers on both links.
    switched = mariadb_tls(port, root, "select current_user()", "edd", f"-p{ED25519_PASSWORD}")
    assert switched.returncode == 0 and switched.stdout.strip() == "edd@%", switched.stderr
    # An independent driver with TLS verified against the dev CA, a password and a large result.
    conn = pymysql.connect(
        host="127.0.0.1", port=port, user="pw", password=NATIVE_PASSWORD, database="big", connect_timeout=20,
        ssl={"ca": str(root), "check_hostname": True},
    )  # fmt: skip
    try:
        with conn.cursor() as cursor:
            cursor.execute("select current_user()")
            assert cursor.fetchone() == ("pw@%",)
            assert conn._sock.version().startswith("TLSv1.")  # PyMySQL's own socket is TLS
            cursor.execute("select seq, repeat('x', 100) from seq_1_to_50000")
            rows = cursor.fetchall()
            assert len(rows) == 50000 and rows[-1] == (50000, "x" * 100)
    finally:
        conn.close()
    assert daemon.status()["routes"]["db_tls"]["failures"] == {}
    # A client that does not trust the dev CA is refused by its own check, and status says why.
    other = CA("Not the dev CA").write_root(isolated_home / "other-root.pem")
    refused = mariadb_tls(port, other, "select 1")
    assert refused.returncode != 0 and "2026" in refused.stderr, refused.stderr  # SSL connection error
    wait_until(lambda: daemon.status()["routes"]["db_tls"]["failures"], timeout=10, what="the local TLS failure")
    status = daemon.status()["routes"]["db_tls"]
    assert status["failures"] == {"local_tls_failed": 1}, status
    assert "mtls-sidecar ca export" in status["last_error"]


def test_without_local_tls_a_client_insisting_on_tls_is_turned_away(daemon: DaemonThread, isolated_home: Path) -> None:
    """Real clients see no CLIENT_SSL in the greeting and give up by themselves, saying why; one
    that asks for TLS all the same (an SSLRequest) is refused, and status names local_tls."""
    done = mariadb_tls(daemon.port("db"), isolated_home / "ca" / "ca.crt", "select 1")
    assert done.returncode != 0 and "SSL is required, but the server does not support it" in done.stderr, done.stderr
    with daemon.connect("db") as sock:
        seq, greeting = PacketReader(sock).read()
        assert seq == 0 and not parse_greeting(greeting).capabilities & CLIENT_SSL
        flags = CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_SSL
        sock.sendall(packet(1, struct.pack("<IIB", flags, 1 << 24, 45) + b"\0" * 23))
        assert sock.recv(65536) == b""  # closed
    wait_until(lambda: daemon.status()["routes"]["db"]["failures"], timeout=10, what="the refusal to be counted")
    status = daemon.status()["routes"]["db"]
    assert status["failures"] == {"protocol_mismatch": 1}, status
    assert "asked for TLS" in status["last_error"] and "local_tls = true" in status["last_error"]


def test_check_speaks_mysql_on_a_mysql_route_and_names_it_behind_a_tcp_route(daemon: DaemonThread) -> None:
    client = daemon.client()
    for name in ("db", "db_tls"):
        ok = client.post(f"/v1/routes/{name}/check")
        assert ok["ok"] is True and ok["cause"] == "ok", ok
    wrong = client.post("/v1/routes/db_as_tcp/check")
    assert wrong["cause"] == "protocol_mismatch", wrong
    assert "is a MySQL or MariaDB server" in wrong["message"]
    assert 'set protocol = "mysql" for route db_as_tcp' in wrong["fix"]
    # The tunnel counts the mariadb client on that route under the same key (status and check agree).
    done = mariadb(daemon.port("db_as_tcp"), "select 1")
    assert done.returncode != 0
    wait_until(lambda: daemon.status()["routes"]["db_as_tcp"]["failures"], timeout=10, what="the failure")
    status = daemon.status()["routes"]["db_as_tcp"]
    assert status["failures"] == {"protocol_mismatch": 1}, status
    assert 'set protocol = "mysql"' in status["last_error"]
    assert daemon.status()["routes"]["db"]["failures"] == {}  # check's connections count nowhere


def test_check_names_a_server_without_tls_and_one_that_rejects_our_certificate(
    lab: tuple[Pki, MariaDB], isolated_home: Path
) -> None:
    pki, db = lab
    CA("Not the server's client CA").client("dev").write_pair(isolated_home / "keystore" / "stranger", "dev-1")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    with mariadb_mtls(
        server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.client_ca_file, ssl=False
    ) as plain:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}, "stranger": {"renew": "none"}},
            active="dev",
            routes={
                "plain": route_to(pki, plain.port, protocol="mysql"),
                "stranger": route_to(pki, db.port, protocol="mysql", identity="stranger"),
            },
        )
        with DaemonThread(config) as daemon:
            no_tls = daemon.client().post("/v1/routes/plain/check")
            rejected = daemon.client().post("/v1/routes/stranger/check")
    assert no_tls["cause"] == "server_offers_no_tls", no_tls
    assert "does not offer TLS (its greeting lacks CLIENT_SSL)" in no_tls["message"]
    assert "ssl_cert, ssl_key, ssl_ca" in no_tls["fix"]
    assert rejected["ok"] is False and rejected["cause"] == "server_rejected_certificate", rejected


class PacketReader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def read(self) -> tuple[int, bytes]:
        while (found := next_packet(self.buffer)) is None:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed mid-packet after {self.buffer!r}")
            self.buffer += chunk
        seq, payload, self.buffer = found
        return seq, payload
