"""`protocol = "http"` routes against real nginx with two virtual hosts and client-certificate checks.

nginx listens once with `ssl_verify_client on` and two sites: a default one and
`api.internal.test`. The route's `server_name` is `api.internal.test`; its local clients (curl,
http.client, a hand-written WebSocket client) know nothing of it, nor of TLS. nginx proxies a
few paths to a plain backend (tests/httpservers.py): a byte counter, a chunked stream and a
WebSocket echo.

The 1 GiB test runs the daemon as its own process (`python -m sidecar run`), so that its
memory is its own: /proc/PID/status VmRSS before, and VmHWM (the peak, reset through
/proc/PID/clear_refs) over the transfers.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.control.client import ControlClient, DaemonNotRunning
from sidecar.paths import resolve_places
from tests.daemon_runner import DaemonThread
from tests.httpservers import API_NAME, WS_GUID, Backend, nginx_vhosts, read_frame, write_pattern_file, ws_frame
from tests.pki import CA
from tests.realservers import free_port, require_binary
from tests.scenario import Pki, curl, recv_all, route_to, write_config
from tests.tlsserver import ScriptedTLSServer
from tests.waiting import wait_until

GIB = 1 << 30
RSS_GROWTH_MIB = 64  # the daemon's peak RSS over 1 GiB each way may exceed its RSS before by this much


@dataclass
class Setup:
    pki: Pki
    home: Path
    tmp: Path
    backend: Backend


@pytest.fixture
def setup(isolated_home: Path, tmp_path: Path) -> Iterator[Setup]:
    require_binary("curl")
    pki = Pki.create(tmp_path / "pki", API_NAME)
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    with Backend() as backend:
        yield Setup(pki, isolated_home, tmp_path, backend)
    assert backend.errors == []


@contextlib.contextmanager
def vhosts(s: Setup, name: str = "nginx", port: int | None = None) -> Iterator[int]:
    with nginx_vhosts(
        s.tmp / name,
        cert=s.pki.server_cert,
        key=s.pki.server_key,
        client_ca=s.pki.client_ca_file,
        backend=s.backend.port,
        port=port,
    ) as nginx:
        yield nginx.port


def http_route(s: Setup, port: int, **extra: object) -> dict[str, object]:
    return route_to(s.pki, port, server_name=API_NAME, protocol="http", **extra)


def config(s: Setup, routes: dict[str, dict[str, object]]) -> Path:
    return write_config(s.home / "config.toml", identities={"dev": {"renew": "none"}}, routes=routes)


def body_of(answer: bytes) -> bytes:
    return answer.split(b"\r\n\r\n", 1)[1]


# --------------------------------------------------------------------------------------------


def test_curl_reaches_the_named_site_where_a_tcp_route_gets_421(setup: Setup) -> None:
    with vhosts(setup) as port:
        routes = {"api": http_route(setup, port), "raw": route_to(setup.pki, port, server_name=API_NAME)}
        with DaemonThread(config(setup, routes)) as daemon:
            local = daemon.port("api")
            result = curl(local, "/hello?x=1", "-i")
            assert result.returncode == 0, result.stderr
            assert result.stdout.startswith("HTTP/1.1 200 OK\n")  # (curl's text: \r\n read as \n)
            assert f"api site: host={API_NAME}:{port} uri=/hello?x=1 " in result.stdout
            assert "client=CN=dev" in result.stdout
            # What the same request gets through a plain tcp route: nginx sees Host 127.0.0.1:PORT
            # with SNI api.internal.test.
            raw = curl(daemon.port("raw"), "/hello", "-i")
            assert raw.stdout.startswith("HTTP/1.1 421 "), raw.stdout
            status = daemon.status()["routes"]["api"]
    assert status["failures"] == {} and status["total_connections"] == 1


def test_two_requests_on_one_connection_share_one_tls_connection(setup: Setup) -> None:
    with vhosts(setup) as port, DaemonThread(config(setup, {"api": http_route(setup, port)})) as daemon:
        local = daemon.port("api")
        urls = [f"http://127.0.0.1:{local}/one", f"http://127.0.0.1:{local}/two"]  # curl keeps the connection
        result = subprocess.run(["curl", "-sS", "--max-time", "10", *urls], capture_output=True, text=True, timeout=15)
        assert result.returncode == 0, result.stderr
        first, second = result.stdout.splitlines()
        assert "uri=/one " in first and "uri=/two " in second
        conn = first.split("conn=")[1].split()[0]
        assert f"conn={conn} req=1 " in first and f"conn={conn} req=2 " in second
        # http.client: three requests on one connection: one with a body, a HEAD, a GET
        client = http.client.HTTPConnection("127.0.0.1", local, timeout=10)
        client.request("POST", "/count", body=b"x" * 100_000)
        answer = client.getresponse()
        assert answer.status == 200 and answer.read().startswith(b"received=100000 ")
        client.request("HEAD", "/head")  # an answer with Content-Length and no body
        answer = client.getresponse()
        assert answer.status == 200 and int(answer.headers["Content-Length"]) > 0 and answer.read() == b""
        client.request("GET", "/again")
        answer = client.getresponse()
        text = answer.read().decode()
        assert answer.status == 200 and "uri=/again " in text and " req=3 " in text
        client.close()
        status = daemon.status()["routes"]["api"]
    assert status["total_connections"] == 2 and status["failures"] == {}


def test_redirects_from_nginx_come_back_pointing_at_the_local_listener(setup: Setup) -> None:
    with vhosts(setup) as port, DaemonThread(config(setup, {"api": http_route(setup, port)})) as daemon:
        local = daemon.port("api")
        result = curl(local, "/old", "-i")
        assert result.stdout.startswith("HTTP/1.1 302 "), result.stdout
        assert f"\nLocation: http://127.0.0.1:{local}/next\n" in result.stdout
        # nginx makes a relative `return 301 /next-relative` absolute from the Host it saw
        moved = curl(local, "/moved", "-i")
        assert f"\nLocation: http://127.0.0.1:{local}/next-relative\n" in moved.stdout, moved.stdout
        followed = curl(local, "/old", "-L")
        assert followed.returncode == 0, followed.stderr
        assert f"api site: host={API_NAME}:{port} uri=/next " in followed.stdout


def test_chunked_bodies_both_ways(setup: Setup, tmp_path: Path) -> None:
    size = 24 * 1024 * 1024 + 17
    upload = tmp_path / "up.bin"
    digest = write_pattern_file(upload, size)
    with vhosts(setup) as port, DaemonThread(config(setup, {"api": http_route(setup, port)})) as daemon:
        local = daemon.port("api")
        up = curl(local, "/count", "-T", str(upload), "-H", "Transfer-Encoding: chunked", timeout=60)
        assert up.returncode == 0, up.stderr
        assert up.stdout == f"received={size} sha256={digest} chunked=True\n"
        down = subprocess.run(
            ["curl", "-sS", "-D", "-", "-o", str(tmp_path / "down.bin"), f"http://127.0.0.1:{local}/stream?n={size}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert down.returncode == 0, down.stderr
        assert "Transfer-Encoding: chunked" in down.stdout
        expected = (bytes(range(256)) * 256 * (size // 65536 + 1))[:size]
        assert (tmp_path / "down.bin").read_bytes() == expected


def test_a_websocket_echo_behind_nginx(setup: Setup) -> None:
    with vhosts(setup) as port, DaemonThread(config(setup, {"api": http_route(setup, port)})) as daemon:
        with daemon.connect("api") as sock:
            key = base64.b64encode(os.urandom(16))
            sock.sendall(
                b"GET /ws/chat HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
            )
            buf = bytearray()

            def read(n: int) -> bytes:
                while len(buf) < n:
                    data = sock.recv(65536)
                    if not data:
                        raise AssertionError(f"closed; got {bytes(buf)!r}")
                    buf.extend(data)
                out = bytes(buf[:n])
                del buf[:n]
                return out

            while b"\r\n\r\n" not in buf:
                buf.extend(sock.recv(65536))
            head, rest = bytes(buf).split(b"\r\n\r\n", 1)
            buf[:] = rest
            assert head.startswith(b"HTTP/1.1 101 "), head
            assert b"Sec-WebSocket-Accept: " + base64.b64encode(hashlib.sha1(key + WS_GUID).digest()) in head
            assert f"X-Seen-Host: {API_NAME}:{port}".encode() in head
            sock.sendall(ws_frame(b"hello through the tunnel") + ws_frame(b"\x00\xff" * 40_000, opcode=2))
            assert read_frame(read) == (1, b"hello through the tunnel")
            assert read_frame(read) == (2, b"\x00\xff" * 40_000)
            sock.sendall(ws_frame(b"\x03\xe8", opcode=8))
            assert read_frame(read) == (8, b"\x03\xe8")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b""
        status = daemon.status()["routes"]["api"]
    assert status["failures"] == {}


def test_garbage_gets_400_and_the_route_keeps_serving(setup: Setup) -> None:
    with vhosts(setup) as port, DaemonThread(config(setup, {"api": http_route(setup, port)})) as daemon:
        with daemon.connect("api") as sock:
            sock.sendall(b"HELLO? is anyone there\r\n\r\n")
            answer = recv_all(sock)
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
        assert b"is not valid HTTP/1.1" in body_of(answer)
        with daemon.connect("api") as sock:  # https:// by mistake: a ClientHello
            sock.sendall(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03")
            answer = recv_all(sock)
        local = daemon.port("api")
        assert f"use http://127.0.0.1:{local}/, not https://".encode() in body_of(answer)
        result = curl(local, "/after")
        assert result.returncode == 0 and "uri=/after " in result.stdout, result
        status = daemon.status()["routes"]["api"]
    assert status["failures"] == {"protocol_mismatch": 2}


def test_a_target_that_is_down_gets_502_with_the_reason_then_serves_once_it_is_up(setup: Setup) -> None:
    down = free_port()
    with DaemonThread(config(setup, {"api": http_route(setup, down)})) as daemon:
        local = daemon.port("api")
        result = curl(local, "/x", "-i")
        assert result.returncode == 0, result.stderr
        head, body = result.stdout.split("\n\n", 1)
        assert head.startswith("HTTP/1.1 502 Bad Gateway\n")
        assert "\nContent-Type: text/plain; charset=utf-8\n" in head
        assert "\nMtls-Sidecar-Cause: refused" in head
        assert body == (
            f"mtls-sidecar: connection to 127.0.0.1:{down} refused (is the service running?)\n"
            "fix: start the service, or correct the target's port\n"
        )
        with vhosts(setup, port=down):
            again = curl(local, "/x")
            assert again.returncode == 0 and f"api site: host={API_NAME}:{down} uri=/x " in again.stdout, again
        status = daemon.status()["routes"]["api"]
    assert status["failures"] == {"refused": 1}


def test_a_tls13_server_that_rejects_our_certificate_after_the_handshake_gets_502(setup: Setup) -> None:
    """With TLS 1.3 the rejection arrives after our side of the handshake: still a 502 with the cause."""
    stranger = CA("Stranger Client CA").write_root(setup.tmp / "stranger.pem")
    with (
        ScriptedTLSServer(
            cert=setup.pki.server_cert,
            key=setup.pki.server_key,
            client_ca=stranger,
            require_client_cert=True,
            min_version=ssl.TLSVersion.TLSv1_3,
        ) as server,
        DaemonThread(config(setup, {"api": http_route(setup, server.port)})) as daemon,
    ):
        result = curl(daemon.port("api"), "/x", "-i")
        status = daemon.status()["routes"]["api"]
    assert result.stdout.startswith("HTTP/1.1 502 Bad Gateway\n"), result
    assert "\nMtls-Sidecar-Cause: server_rejected_certificate" in result.stdout
    assert "rejected our client certificate" in result.stdout
    assert status["failures"] == {"server_rejected_certificate": 1}


def test_a_target_that_never_answers_the_handshake_gets_504(setup: Setup) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # TCP is accepted by the kernel; no TLS ever
        port = silent.getsockname()[1]
        routes = {"slow": http_route(setup, port, connect_timeout="1s")}
        with DaemonThread(config(setup, routes)) as daemon:
            started = time.monotonic()
            result = curl(daemon.port("slow"), "/x", "-i")
            took = time.monotonic() - started
    assert result.stdout.startswith("HTTP/1.1 504 Gateway Timeout\n"), result
    assert f"mtls-sidecar: timed out connecting to 127.0.0.1:{port}" in result.stdout
    assert "\nfix: " in result.stdout
    assert 0.9 < took < 5


# --------------------------------------------------------------------------------------------
# 1 GiB each way, with the daemon in its own process


@contextlib.contextmanager
def daemon_process(log: Path) -> Iterator[tuple[int, ControlClient]]:
    client = ControlClient(resolve_places().control_socket, timeout=30)
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=stderr
        )

        def up() -> bool:
            assert proc.poll() is None, f"the daemon exited: {log.read_text()[-2000:]}"
            try:
                return bool(client.get("/v1/routes")["api"]["state"] == "up")
            except (DaemonNotRunning, OSError):
                return False

        try:
            wait_until(up, timeout=30, what="the daemon to serve route api")
            yield proc.pid, client
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@contextlib.contextmanager
def removed(path: Path) -> Iterator[None]:
    """Remove `path` at the end (pytest keeps the last runs' temp folders: not 1 GiB files)."""
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def memory_kib(pid: int, key: str) -> int:
    status = (Path("/proc") / str(pid) / "status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith(key)).split()[1])


def download_sha256(url: str) -> tuple[int, str, float]:
    """curl downloads `url`; this process hashes what it writes. (bytes, sha256, seconds)"""
    digest = hashlib.sha256()
    total = 0
    started = time.monotonic()
    with subprocess.Popen(["curl", "-sS", "--fail", "--max-time", "120", url], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        while block := proc.stdout.read(1 << 20):
            digest.update(block)
            total += len(block)
    assert proc.returncode == 0, f"curl exited with {proc.returncode}"
    return total, digest.hexdigest(), time.monotonic() - started


def test_a_gibibyte_each_way_in_flat_memory(setup: Setup, tmp_path: Path) -> None:
    big = tmp_path / "nginx" / "big.bin"  # nginx serves it at /big
    with vhosts(setup) as port, removed(big):
        digest = write_pattern_file(big, GIB)
        config(setup, {"api": http_route(setup, port)})
        with daemon_process(tmp_path / "daemon.log") as (pid, client):
            local = int(client.get("/v1/routes")["api"]["listen"].rsplit(":", 1)[1])
            url = f"http://127.0.0.1:{local}"
            # warm up: the TLS context, the first handshake, the allocator's working size
            warm = tmp_path / "warm.bin"
            write_pattern_file(warm, 16 << 20)
            assert curl(local, "/count", "-T", str(warm), timeout=30).stdout.startswith(f"received={16 << 20} ")
            assert download_sha256(f"{url}/stream?n={16 << 20}")[0] == 16 << 20
            before = memory_kib(pid, "VmRSS:")
            (Path("/proc") / str(pid) / "clear_refs").write_text("5")  # VmHWM := VmRSS from here on

            size, got, down_s = download_sha256(f"{url}/big")
            assert (size, got) == (GIB, digest)
            started = time.monotonic()
            up = curl(local, "/count", "-T", str(big), timeout=120)
            up_s = time.monotonic() - started
            assert up.returncode == 0, up.stderr
            assert up.stdout == f"received={GIB} sha256={digest} chunked=False\n"

            peak = memory_kib(pid, "VmHWM:")
            route = client.get("/v1/routes")["api"]
    growth_mib = (peak - before) / 1024
    print(
        f"\n1 GiB through an http route: download {down_s:.1f}s ({GIB / down_s / 1e6:.0f} MB/s), "
        f"upload {up_s:.1f}s ({GIB / up_s / 1e6:.0f} MB/s); daemon RSS {before / 1024:.1f} MiB before, "
        f"peak {peak / 1024:.1f} MiB during ({growth_mib:+.1f} MiB)"
    )
    assert route["failures"] == {}, route
    assert route["bytes_in"] > GIB and route["bytes_out"] > GIB
    assert growth_mib < RSS_GROWTH_MIB, f"the daemon's RSS peaked {growth_mib:.1f} MiB above where it started"
