"""Another OS user on this machine cannot use our identity through a route.

A real second user is created with `useradd` (the suite runs as root in CI) and its client
runs under `setpriv`; the owner's own connections keep working.
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tomlkit

from sidecar.peercred import find_owner, proc_net_hex
from tests.daemon_runner import DaemonThread
from tests.scenario import Pki, mtls_server, recv_all, route_to, write_config
from tests.waiting import wait_until

OTHER_USER = "mtls-sidecar-other"

# What the other user runs: connect, send, report what came back (or how it ended).
CLIENT = """
import socket, sys
family = socket.AF_UNIX if sys.argv[1] == "unix" else (socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
address = sys.argv[2] if family == socket.AF_UNIX else (sys.argv[1], int(sys.argv[2]))
try:
    with socket.socket(family) as sock:
        sock.settimeout(10)
        sock.connect(address)
        sock.sendall(b"from another user\\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    print("received", len(data))
except OSError as exc:
    print("error", type(exc).__name__, exc.errno)
"""


@pytest.fixture(scope="module")
def other_user() -> pwd.struct_passwd:
    return make_other_user()


def make_other_user() -> pwd.struct_passwd:
    """The throw-away second OS user (made once with useradd; the suite runs as root)."""
    if os.geteuid() != 0:
        pytest.fail("this test creates a second OS user: run the suite as root (CI does)", pytrace=False)
    try:
        return pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", OTHER_USER], check=True, timeout=30)
    return pwd.getpwnam(OTHER_USER)


def as_user(user: pwd.struct_passwd, *args: str) -> str:
    done = subprocess.run(
        [
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--clear-groups",
            sys.executable,
            "-c",
            CLIENT,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def own_echo(host: str, port: int) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_connection((host, port), timeout=10) as sock:
        assert sock.family == family
        sock.sendall(b"from the owner\n")
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def test_another_user_is_refused_before_tls_and_the_owner_is_served(
    other_user: pwd.struct_passwd, isolated_home: Path, tmp_path: Path
) -> None:
    pki = Pki.create(tmp_path / "pki")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
    sock_dir = tmp_path / "sockets"
    sock_dir.mkdir()
    sock_dir.chmod(0o755)  # the folder lets anyone reach the socket: its own 0600 mode must hold
    tmp_path.chmod(0o755)
    unix_path = sock_dir / "svc.sock"
    with mtls_server(pki, mode="echo") as server:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={
                "v4": route_to(pki, server.port, listen="127.0.0.1:0"),
                "v6": route_to(pki, server.port, listen="[::1]:0"),
                "unix": route_to(pki, server.port, listen=f"unix:{unix_path}"),
            },
        )
        with DaemonThread(config) as daemon:
            for route, host in (("v4", "127.0.0.1"), ("v6", "::1")):
                port = daemon.port(route)
                assert own_echo(host, port) == b"from the owner\n"
                answer = as_user(other_user, host, str(port))
                # closed without a byte of the service's answer (a reset or an empty read; a reset
                # that lands before the client's shutdown() makes that fail with ENOTCONN)
                assert answer in ("received 0", "error ConnectionResetError 104", "error OSError 107"), answer
                wait_until(
                    lambda route=route: daemon.status()["routes"][route]["failures"].get("other_user") == 1,
                    timeout=10,
                    what=f"route {route} to count the refusal",
                )
                status = daemon.status()["routes"][route]
                assert f"uid {other_user.pw_uid} ({OTHER_USER})" in status["last_error"]
                assert status["peer_check"]["method"] == "proc-net-tcp"
                assert own_echo(host, port) == b"from the owner\n"  # still served
            # the unix socket's mode keeps the other user out before we even see them
            assert as_user(other_user, "unix", str(unix_path)) == "error PermissionError 13"
            assert daemon.status()["routes"]["unix"]["peer_check"]["method"] == "so-peercred"
            # only the owner's four connections reached the server: no TLS for the refused ones
            wait_until(lambda: len(server.records) >= 4, timeout=10, what="the server to record 4 connections")
            assert len(server.records) == 4


def test_proc_net_tcp_lookup_matches_the_client_side_of_the_connection() -> None:
    table = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n"
        "   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n"
        "   2: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1001        0 3 1\n"
    )
    assert proc_net_hex(("127.0.0.1", 8080)) == "0100007F:1F90" or sys.byteorder == "big"
    assert find_owner(table, ("127.0.0.1", 54321), ("127.0.0.1", 8080)) == 1001
    assert find_owner(table, ("127.0.0.1", 8080), ("127.0.0.1", 54321)) == 0  # the server's own side
    assert find_owner(table, ("127.0.0.1", 1), ("127.0.0.1", 8080)) is None
    assert proc_net_hex(("::1", 443)) == "00000000000000000000000001000000:01BB" or sys.byteorder == "big"


def test_another_user_is_refused_by_the_proxy_before_it_reads_a_byte(
    other_user: pwd.struct_passwd, isolated_home: Path, tmp_path: Path
) -> None:
    """The proxy port serves every rule's identity: another user is refused there as on a route."""
    pki = Pki.create(tmp_path / "pki", "svc.test")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
    with mtls_server(pki, mode="echo") as server:
        config = isolated_home / "config.toml"
        config.write_text(
            tomlkit.dumps(
                {
                    "identities": {"dev": {"renew": "none"}},
                    "proxy": {
                        "listen": "127.0.0.1:0",
                        "rules": [
                            {
                                "hosts": ["svc.test"],
                                "ca_file": str(pki.server_ca_file),
                                "connect": f"127.0.0.1:{server.port}",
                            }
                        ],
                    },
                }
            )
        )
        with DaemonThread(config) as daemon:
            port = int(daemon.status()["proxy"]["listen"].rsplit(":", 1)[1])
            # the other user's "from another user" would be a (bad) proxy request if it were read
            answer = as_user(other_user, "127.0.0.1", str(port))
            assert answer in ("received 0", "error ConnectionResetError 104", "error OSError 107"), answer
            wait_until(
                lambda: daemon.status()["proxy"]["refused"].get("other_user") == 1,
                timeout=10,
                what="the proxy to count the refusal",
            )
            proxy = daemon.status()["proxy"]
            assert f"uid {other_user.pw_uid} ({OTHER_USER})" in proxy["last_refusal"]
            assert "the proxy uses the identity" in proxy["last_refusal"]
            assert proxy["refused"].get("protocol_mismatch") is None  # refused before anything was read
            # the owner is served through the same port
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"CONNECT svc.test:443 HTTP/1.1\r\nHost: svc.test:443\r\n\r\n")
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = sock.recv(4096)
                    assert chunk, head
                    head += chunk
                assert head.startswith(b"HTTP/1.1 200"), head
                sock.sendall(b"from the owner\n")
                sock.shutdown(socket.SHUT_WR)
                assert recv_all(sock) == b"from the owner\n"
            assert len(server.records) == 1
