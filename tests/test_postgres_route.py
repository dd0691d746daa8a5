"""`protocol = "postgres"` against a real PostgreSQL that requires client certificates.

psql (libpq) and pg8000 (an independent pure-Python driver) connect in plaintext to the
route; the server sees TLS with our client certificate (`pg_stat_ssl`), cert auth makes the
session's role the certificate's CN, Ctrl-C in psql cancels a running query through the same
route, and failures reach psql as PostgreSQL errors with the reason and the fix.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pg8000.native
import pytest

from sidecar.cli import main
from sidecar.protocols.postgres import SSL_REQUEST
from tests.daemon_runner import DaemonThread
from tests.pki import CA
from tests.postgres import Postgres, postgres_mtls
from tests.realservers import free_port
from tests.scenario import Pki, route_to, write_config
from tests.test_cli import sidecar_process
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pki, Postgres]]:
    pki = Pki.create(tmp_path_factory.mktemp("pg-pki"))
    with postgres_mtls(server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.client_ca_file) as pg:
        pg.psql_admin("create role dev login")
        yield pki, pg


@pytest.fixture
def daemon(lab: tuple[Pki, Postgres], isolated_home: Path) -> Iterator[DaemonThread]:
    pki, pg = lab
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    config = write_config(
        isolated_home / "config.toml",
        identities={"dev": {"renew": "none"}},
        routes={
            "pg": route_to(pki, pg.port, protocol="postgres"),
            "pg_as_tcp": route_to(pki, pg.port),  # what a user had before this protocol existed
            # warm connections: the SSLRequest and the mTLS handshake done ahead, the startup the client's
            "pg_warm": route_to(pki, pg.port, protocol="postgres", preconnect=1),
        },
    )
    with DaemonThread(config) as running:
        yield running


def psql(port: int, sql: str, sslmode: str = "disable", timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", f"host=127.0.0.1 port={port} user=dev dbname=postgres sslmode={sslmode}", "-Atc", sql],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("sslmode", ["disable", "prefer", "allow"])
def test_psql_in_plaintext_is_mtls_on_the_server(daemon: DaemonThread, sslmode: str) -> None:
    done = psql(daemon.port("pg"), "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()", sslmode)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "dev|t"  # cert auth took the CN; the server's side is TLS
    assert daemon.status()["routes"]["pg"]["failures"] == {}


def test_a_large_result_arrives_whole(daemon: DaemonThread) -> None:
    done = psql(daemon.port("pg"), "select md5(string_agg(g::text, ',')), count(*) from generate_series(1, 300000) g")
    expected = psql_direct_md5(300000)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{expected}|300000"
    rows = psql(daemon.port("pg"), "select repeat('x', 100) from generate_series(1, 50000)")
    assert rows.returncode == 0 and rows.stdout.count("x" * 100) == 50000


def psql_direct_md5(n: int) -> str:
    import hashlib

    return hashlib.md5(",".join(str(i) for i in range(1, n + 1)).encode()).hexdigest()


def test_ctrl_c_in_psql_cancels_the_running_query(daemon: DaemonThread) -> None:
    port = daemon.port("pg")
    started = time.monotonic()
    proc = subprocess.Popen(
        ["psql", f"host=127.0.0.1 port={port} user=dev dbname=postgres sslmode=disable", "-Atc", "select pg_sleep(30)"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The query is running once the route has carried a session that is still open.
        wait_until(
            lambda: (
                daemon.status()["routes"]["pg"]["active_connections"] == 1
                and daemon.status()["routes"]["pg"]["bytes_out"] > 0
            ),
            timeout=10,
            what="psql's session to be open",
        )
        wait_until(lambda: _sleeping(daemon), timeout=10, what="pg_sleep to be running")
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does: psql sends a CancelRequest on a new connection
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "canceling statement due to user request" in err, err
    assert time.monotonic() - started < 20
    assert daemon.status()["routes"]["pg"]["total_connections"] >= 2  # the cancel went through the route


def _sleeping(daemon: DaemonThread) -> bool:
    done = psql(daemon.port("pg"), "select count(*) from pg_stat_activity where query like 'select pg_sleep%'")
    return done.returncode == 0 and done.stdout.strip() not in ("", "0")


def test_an_independent_driver_pg8000(daemon: DaemonThread) -> None:
    conn = pg8000.native.Connection(
        user="dev", host="127.0.0.1", port=daemon.port("pg"), database="postgres", ssl_context=None, timeout=30
    )
    try:
        rows = conn.run("select current_user, ssl, version from pg_stat_ssl where pid = pg_backend_pid()")
        assert rows[0][0] == "dev" and rows[0][1] is True and rows[0][2].startswith("TLSv1.")
        assert conn.run("select sum(g) from generate_series(1, 100000) g") == [[5000050000]]
    finally:
        conn.close()


def test_garbage_on_the_route_is_a_named_failure_and_the_route_keeps_serving(daemon: DaemonThread) -> None:
    with daemon.connect("pg") as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(100) == b""
    routes = daemon.status()["routes"]
    assert routes["pg"]["failures"] == {"protocol_mismatch": 1}
    assert "does not speak PostgreSQL" in routes["pg"]["last_error"]
    assert psql(daemon.port("pg"), "select 1").stdout.strip() == "1"


def test_a_short_then_complete_startup_packet_in_pieces(daemon: DaemonThread) -> None:
    """The client's SSLRequest split over two writes still gets its N."""
    with daemon.connect("pg") as sock:
        sock.sendall(SSL_REQUEST[:3])
        time.sleep(0.05)  # two writes, not one: this is the subject of the test, not synchronisation
        sock.sendall(SSL_REQUEST[3:])
        sock.settimeout(10)
        assert sock.recv(1) == b"N"
        startup = struct.pack("!i", 196608) + b"user\0dev\0database\0postgres\0\0"
        sock.sendall(struct.pack("!i", len(startup) + 4) + startup)
        assert sock.recv(1) == b"R"  # an authentication message: the server took the startup


def test_psql_through_a_tcp_route_is_told_to_use_protocol_postgres(daemon: DaemonThread) -> None:
    done = psql(daemon.port("pg_as_tcp"), "select 1")
    assert done.returncode != 0
    wait_until(
        lambda: daemon.status()["routes"]["pg_as_tcp"]["failures"],
        timeout=10,
        what="the tcp route to count the failure",
    )
    status = daemon.status()["routes"]["pg_as_tcp"]
    assert status["failures"] == {"protocol_mismatch": 1}, status
    assert 'protocol = "postgres"' in status["last_error"]


def test_a_server_without_tls_is_named_and_psql_reads_why(
    lab: tuple[Pki, Postgres], isolated_home: Path, tmp_path: Path
) -> None:
    pki, _ = lab
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    with postgres_mtls(
        server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.client_ca_file, ssl=False
    ) as plain:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={"pg": route_to(pki, plain.port, protocol="postgres")},
        )
        with DaemonThread(config) as daemon:
            done = psql(daemon.port("pg"), "select 1")
            status = daemon.status()["routes"]["pg"]
    assert done.returncode != 0
    assert "does not offer TLS" in done.stderr and "mtls-sidecar" in done.stderr, done.stderr
    assert status["failures"] == {"server_offers_no_tls": 1}


def test_a_target_that_is_down_reaches_psql_as_an_error_with_the_fix(
    lab: tuple[Pki, Postgres], isolated_home: Path
) -> None:
    pki, _ = lab
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    config = write_config(
        isolated_home / "config.toml",
        identities={"dev": {"renew": "none"}},
        routes={"pg": route_to(pki, closed, protocol="postgres")},
    )
    with DaemonThread(config) as daemon:
        done = psql(daemon.port("pg"), "select 1")
    assert done.returncode != 0
    assert "mtls-sidecar: connection to 127.0.0.1" in done.stderr and "refused" in done.stderr, done.stderr
    assert "HINT:" in done.stderr  # the fix, as libpq shows a hint


def test_local_tls_serves_clients_that_insist_on_verify_full(lab: tuple[Pki, Postgres], isolated_home: Path) -> None:
    """local_tls: psql's own TLS ends in the sidecar (a dev-CA certificate for 127.0.0.1), the
    upstream is still mTLS with our identity."""
    pki, pg = lab
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    config = write_config(
        isolated_home / "config.toml",
        identities={"dev": {"renew": "none"}},
        routes={"pg": route_to(pki, pg.port, protocol="postgres", local_tls=True)},
    )
    with DaemonThread(config) as daemon:
        root = isolated_home / "ca" / "ca.crt"
        assert root.exists()
        port = daemon.port("pg")
        conninfo = f"host=127.0.0.1 port={port} user=dev dbname=postgres sslmode=verify-full sslrootcert={root}"
        sql = "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()"
        done = subprocess.run(["psql", conninfo, "-Atc", sql], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "dev|t"
        # A client that does not trust the dev CA is refused by its own check, and status says why.
        other = CA("Not the dev CA").write_root(isolated_home / "other-root.pem")
        wrong = conninfo.replace(str(root), str(other))
        refused = subprocess.run(["psql", wrong, "-Atc", "select 1"], capture_output=True, text=True, timeout=30)
        assert refused.returncode != 0 and "certificate verify failed" in refused.stderr, refused.stderr
        wait_until(lambda: daemon.status()["routes"]["pg"]["failures"], timeout=10, what="the local TLS failure")
        status = daemon.status()["routes"]["pg"]
    assert status["failures"] == {"local_tls_failed": 1}, status
    assert "mtls-sidecar ca export" in status["last_error"]


def test_tunnel_command_with_protocol_postgres(lab: tuple[Pki, Postgres], tmp_path: Path) -> None:
    pki, pg = lab
    leaf = pki.client_ca.client("dev")
    cert, key = leaf.write_pair(tmp_path / "client", "dev")
    port = free_port()
    args = [
        "tunnel", "--protocol", "postgres", "--listen", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{pg.port}",
        "--cert", str(cert), "--key", str(key), "--cacert", str(pki.server_ca_file), "--server-name", "localhost",
    ]  # fmt: skip
    with sidecar_process(*args) as (proc, log):
        log.wait_for(rf"listening on 127\.0\.0\.1:{port} → 127\.0\.0\.1:{pg.port}")
        done = psql(port, "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()")
        assert done.returncode == 0, done.stderr + log.text
        assert done.stdout.strip() == "dev|t"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0, log.text


def test_route_add_with_protocol_postgres(
    lab: tuple[Pki, Postgres], isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki, pg = lab
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    config = write_config(isolated_home / "config.toml", identities={"dev": {"renew": "none"}}, routes={})
    port = free_port()
    with DaemonThread(config) as daemon:
        argv = [
            "route", "add", "db", "--listen", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{pg.port}",
            "--server-name", "localhost", "--ca-file", str(pki.server_ca_file), "--protocol", "postgres",
        ]  # fmt: skip
        assert main(argv) == 0
        assert psql(port, "select current_user").stdout.strip() == "dev"
        assert main(["route", "list"]) == 0  # after a connection went through: health ok
        assert 'protocol = "postgres"' in (isolated_home / "config.toml").read_text()
        assert daemon.status()["routes"]["db"]["protocol"] == "postgres"
    assert re.search(r"db\s+127\.0\.0\.1:\d+ → 127\.0\.0\.1:\d+  postgres  as dev  ok", capsys.readouterr().out)


def test_check_speaks_postgres_on_a_postgres_route_and_names_it_behind_a_tcp_route(daemon: DaemonThread) -> None:
    client = daemon.client()
    ok = client.post("/v1/routes/pg/check")
    assert ok["ok"] is True and ok["cause"] == "ok", ok
    assert any("channel binding" in w for w in ok["details"]["warnings"])
    wrong = client.post("/v1/routes/pg_as_tcp/check")
    assert wrong["cause"] == "protocol_mismatch", wrong
    assert "is a PostgreSQL server" in wrong["message"]
    assert 'set protocol = "postgres" for route pg_as_tcp' in wrong["fix"]
    # The tunnel counts psql on that route under the same key (status and check agree).
    psql(daemon.port("pg_as_tcp"), "select 1")
    wait_until(lambda: daemon.status()["routes"]["pg_as_tcp"]["failures"], timeout=10, what="the failure")
    assert daemon.status()["routes"]["pg_as_tcp"]["failures"] == {"protocol_mismatch": 1}


def test_check_names_a_server_without_tls(lab: tuple[Pki, Postgres], isolated_home: Path) -> None:
    pki, _ = lab
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    with postgres_mtls(
        server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.client_ca_file, ssl=False
    ) as plain:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={"pg": route_to(pki, plain.port, protocol="postgres")},
        )
        with DaemonThread(config) as daemon:
            checked = daemon.client().post("/v1/routes/pg/check")
    assert checked["cause"] == "server_offers_no_tls", checked
    assert "answered N to our SSLRequest" in checked["message"] and "ssl" in checked["fix"]


@pytest.mark.parametrize("sslmode", ["disable", "prefer"])
def test_psql_through_a_warm_connection(daemon: DaemonThread, sslmode: str) -> None:
    """`preconnect` on a postgres route: the SSLRequest and the handshake were done before psql came;
    psql's own SSLRequest is answered on our side, and its startup goes through the warm connection."""
    wait_until(lambda: daemon.status()["routes"]["pg_warm"]["warm"]["ready"] == 1, timeout=15, what="a warm connection")
    sql = "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()"
    done = psql(daemon.port("pg_warm"), sql, sslmode)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "dev|t"
    assert daemon.status()["routes"]["pg_warm"]["warm"]["hits"] == 1
