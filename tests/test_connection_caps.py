"""Connections are bounded (issue 16, point 6): `max_connections` per route, a daemon out of
descriptors that says so in one line and serves again, a route aimed at our own listener
refused at load, and `idle_timeout`. Real sockets, a real mTLS echo server."""

from __future__ import annotations

import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidecar.config import parse_config
from sidecar.errors import ConfigError
from tests.daemon_runner import DaemonThread
from tests.scenario import Pki, mtls_server, one_route_config, route_to, write_config
from tests.waiting import wait_until


def echo(sock: socket.socket, text: bytes) -> bytes:
    sock.sendall(text)
    data = b""
    while len(data) < len(text):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def ended(sock: socket.socket, timeout: float = 10) -> bool:
    """The sidecar closed (or reset) this connection without a byte."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_route_refuses_its_third_connection_with_max_connections_2_and_keeps_serving(
    isolated_home: Path, tmp_path: Path
) -> None:
    pki = Pki.create(tmp_path / "pki")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
    with mtls_server(pki, mode="echo") as server:
        config = one_route_config(isolated_home, pki, server.port, max_connections=2)
        with DaemonThread(config) as daemon:
            first, second = daemon.connect("svc"), daemon.connect("svc")
            assert echo(first, b"one\n") == b"one\n"
            assert echo(second, b"two\n") == b"two\n"
            third = daemon.connect("svc")
            assert ended(third)
            route = daemon.status()["routes"]["svc"]
            assert route["failures"] == {"too_many_connections": 1}
            assert "routes.svc.max_connections" in route["last_error"]
            assert route["health"] == "ok"  # a refusal here says nothing about the service
            assert echo(first, b"still\n") == b"still\n"
            first.close()
            wait_until(lambda: daemon.status()["routes"]["svc"]["active_connections"] == 1, timeout=10, what="close")
            fourth = daemon.connect("svc")
            assert echo(fourth, b"four\n") == b"four\n"
            for sock in (second, third, fourth):
                sock.close()


def test_the_daemons_own_max_connections_spans_its_routes(isolated_home: Path, tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
    with mtls_server(pki, mode="echo") as server:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={"a": route_to(pki, server.port), "b": route_to(pki, server.port)},
            max_connections=1,
        )
        with DaemonThread(config) as daemon:
            held = daemon.connect("a")
            assert echo(held, b"a\n") == b"a\n"
            other = daemon.connect("b")
            assert ended(other)
            route = daemon.status()["routes"]["b"]
            assert route["failures"] == {"too_many_connections": 1}
            assert "all routes" in route["last_error"]
            held.close()
            other.close()


def test_a_route_aimed_at_one_of_our_listeners_is_refused_at_load_with_its_line() -> None:
    itself = """[identities.dev]
renew = "none"

[routes.loop]
listen = "127.0.0.1:18600"
target = "127.0.0.1:18600"
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(itself, source="config.toml")
    assert caught.value.field == "routes.loop.target"
    assert caught.value.line == 6
    assert "own listen address" in caught.value.message
    other = itself.replace('target = "127.0.0.1:18600"', 'target = "127.0.0.1:443"') + (
        '\n[routes.b]\nlisten = "127.0.0.1:18601"\ntarget = "localhost:18600"\n'
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(other, source="config.toml")
    assert caught.value.field == "routes.b.target"
    assert caught.value.line == 10
    assert "route loop" in caught.value.message
    # a wildcard listener (unsafe_listen) covers loopback too
    wild = itself.replace('listen = "127.0.0.1:18600"', 'listen = "0.0.0.0:18600"\nunsafe_listen = true')
    with pytest.raises(ConfigError):
        parse_config(wild, source="config.toml")
    # the same port on another host is someone else's service
    assert parse_config(itself.replace('target = "127.0.0.1:18600"', 'target = "api.example.test:18600"'))


def test_max_connections_must_be_a_positive_whole_number() -> None:
    base = '[identities.dev]\nrenew = "none"\n\n[routes.r]\nlisten = "127.0.0.1:18600"\ntarget = "api.test:443"\n'
    for bad in ("0", "-1", '"10"', "true", "1.5"):
        with pytest.raises(ConfigError) as caught:
            parse_config(base + f"max_connections = {bad}\n")
        assert caught.value.field == "routes.r.max_connections"
    config = parse_config(f'max_connections = 9\n{base}max_connections = 3\nidle_timeout = "90s"\n')
    assert config.max_connections == 9
    assert config.routes["r"].max_connections == 3
    assert config.routes["r"].idle_timeout == 90
    defaults = parse_config(base)
    assert (defaults.max_connections, defaults.routes["r"].max_connections) == (4096, 1000)
    assert defaults.routes["r"].idle_timeout == 0


def test_idle_timeout_closes_an_idle_tunnel_and_not_a_busy_one(isolated_home: Path, tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
    with mtls_server(pki, mode="echo") as server:
        config = one_route_config(isolated_home, pki, server.port, idle_timeout="1s")
        with DaemonThread(config) as daemon:
            idle, busy = daemon.connect("svc"), daemon.connect("svc")
            assert echo(idle, b"hello\n") == b"hello\n"
            assert echo(busy, b"hello\n") == b"hello\n"
            start = time.monotonic()
            # the busy one talks every 0.3 s (traffic, not waiting for something) for 2.5 s
            while time.monotonic() - start < 2.5:
                assert echo(busy, b"tick\n") == b"tick\n"
                time.sleep(0.3)
            assert ended(idle, timeout=1)  # closed while the other one talked
            assert echo(busy, b"still here\n") == b"still here\n"
            busy.close()
            idle.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_out_of_descriptors_the_daemon_logs_one_line_and_serves_again(isolated_home: Path, tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
    port = _free_port()
    limit = 96

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    with mtls_server(pki, mode="echo") as server:
        one_route_config(isolated_home, pki, server.port, listen=f"127.0.0.1:{port}")
        log_path = tmp_path / "daemon.err"
        with log_path.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "run", "--log-level", "info"],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env={**os.environ, "MTLS_SIDECAR_LOOP": "asyncio"},
                preexec_fn=low_limit,
            )
        clients: list[socket.socket] = []
        try:

            def serving() -> bool:
                assert proc.poll() is None, log_path.read_text()
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                        return echo(sock, b"up\n") == b"up\n"
                except OSError:
                    return False

            wait_until(serving, timeout=30, what="the daemon to serve")
            for _ in range(limit * 2):  # twice as many as it has descriptors, each tunnel takes two
                sock = socket.socket()
                sock.settimeout(10)
                sock.connect(("127.0.0.1", port))  # the kernel's backlog takes them even when accept fails
                clients.append(sock)
            wait_until(
                lambda: "out of file descriptors" in log_path.read_text(), timeout=20, what="the shortage logged"
            )
            time.sleep(3)  # asyncio retries accept every second: three more tries that must stay quiet
            for sock in clients:
                sock.close()
            clients.clear()
            wait_until(serving, timeout=30, what="the daemon to serve again")
        finally:
            for sock in clients:
                sock.close()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    text = log_path.read_text()
    assert text.count("out of file descriptors") == 1, text
    assert "Traceback" not in text, text


def test_own_connections_that_reset_at_once_are_never_counted_as_another_user(
    isolated_home: Path, tmp_path: Path
) -> None:
    pki = Pki.create(tmp_path / "pki")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
    with mtls_server(pki, mode="echo") as server:
        config = one_route_config(isolated_home, pki, server.port)
        with DaemonThread(config) as daemon:
            port = daemon.port("svc")
            for _ in range(200):  # connect and reset at once: gone before the owner can be looked up, often
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.connect(("127.0.0.1", port))
                sock.close()
            wait_until(
                lambda: daemon.status()["routes"]["svc"]["active_connections"] == 0, timeout=20, what="all closed"
            )
            failures = daemon.status()["routes"]["svc"]["failures"]
            assert "other_user" not in failures, failures
            with daemon.connect("svc") as sock:
                assert echo(sock, b"mine\n") == b"mine\n"
    print(f"\n200 connections reset at once: {failures or 'no refusal'}")
