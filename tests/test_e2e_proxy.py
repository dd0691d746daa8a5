"""`[proxy]`: one local port for every mTLS service, against real servers and real clients.

Two nginx servers with client-certificate checks, each with its own server CA and its own
client CA, stand for `api.one.test` and `api.two.test` (reached through each rule's `connect`,
as split-horizon names are). Identity `one` is issued by the first client CA, `two` by the
second; nginx's `/` answers with the client certificate's subject, so each test sees which
identity a rule presented. Clients: curl as an HTTP proxy client and as a SOCKS5 client,
Python sockets speaking CONNECT and SOCKS by hand, redis-cli's bytes to a TLS redis.
"""

from __future__ import annotations

import socket
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomlkit

from tests.daemon_runner import DaemonThread
from tests.realservers import nginx_mtls, require_binary
from tests.scenario import Pki, recv_all
from tests.waiting import wait_until

ONE, TWO = "api.one.test", "api.two.test"


@dataclass
class Two:
    home: Path
    tmp: Path
    one: Pki
    two: Pki
    one_port: int
    two_port: int


@pytest.fixture
def two_services(isolated_home: Path, tmp_path: Path) -> Iterator[Two]:
    require_binary("curl")
    one = Pki.create(tmp_path / "pki-one", ONE)
    two = Pki.create(tmp_path / "pki-two", TWO)
    one.enroll(isolated_home / "keystore", "one", "one-1", cn="identity-one")
    two.enroll(isolated_home / "keystore", "two", "two-1", cn="identity-two")
    with (
        nginx_mtls(
            tmp_path / "nginx-one", server_cert=one.server_cert, server_key=one.server_key, client_ca=one.client_ca_file
        ) as n1,
        nginx_mtls(
            tmp_path / "nginx-two", server_cert=two.server_cert, server_key=two.server_key, client_ca=two.client_ca_file
        ) as n2,
    ):
        yield Two(isolated_home, tmp_path, one, two, n1.port, n2.port)


def rules(s: Two, **extra: Any) -> list[dict[str, Any]]:
    return [
        {"hosts": [ONE], "identity": "one", "ca_file": str(s.one.server_ca_file), "connect": f"127.0.0.1:{s.one_port}"},
        {
            "name": "two",
            "hosts": ["*.two.test"],
            "identity": "two",
            "ca_file": str(s.two.server_ca_file),
            "connect": f"127.0.0.1:{s.two_port}",
            **extra,
        },
    ]


def proxy_config(s: Two, rule_list: list[dict[str, Any]], **proxy: Any) -> Path:
    doc = {
        "active_identity": "one",
        "identities": {"one": {"renew": "none"}, "two": {"renew": "none"}},
        "proxy": {"listen": "127.0.0.1:0", **proxy, "rules": rule_list},
    }
    path = s.home / "config.toml"
    path.write_text(tomlkit.dumps(doc))
    return path


def proxy_port(daemon: DaemonThread) -> int:
    return int(daemon.status()["proxy"]["listen"].rsplit(":", 1)[1])


def curl_via(args: list[str], url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", *args, url], capture_output=True, text=True, timeout=20, check=False
    )


def socks5_connect(port: int, host: str, dest_port: int) -> tuple[socket.socket, int]:
    """A SOCKS5 CONNECT by name; the socket and the reply code."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"\x05\x01\x00")
    assert sock.recv(2) == b"\x05\x00"
    name = host.encode()
    sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", dest_port))
    reply = recv_exactly(sock, 10)
    return sock, reply[1]


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_http_proxy_and_socks_each_present_their_rules_identity(two_services: Two) -> None:
    s = two_services
    with DaemonThread(proxy_config(s, rules(s))) as daemon:
        port = proxy_port(daemon)
        one = curl_via(["-x", f"http://127.0.0.1:{port}"], f"http://{ONE}/")
        assert one.returncode == 0, one.stderr
        assert "CN=identity-one" in one.stdout and "verify=SUCCESS" in one.stdout
        two = curl_via(["--socks5-hostname", f"127.0.0.1:{port}"], f"http://{TWO}/")
        # SOCKS carries curl's own plain HTTP over our mTLS: nginx sees identity two's certificate
        assert two.returncode == 0, two.stderr
        assert "CN=identity-two" in two.stdout and "verify=SUCCESS" in two.stdout

        status = daemon.status()["proxy"]
        assert status["state"] == "up" and status["enabled"] is True
        by_rule = {rule["name"]: rule for rule in status["rules"]}
        assert by_rule[ONE]["connections"] == 1 and by_rule[ONE]["identity"] == "one"
        assert by_rule["two"]["connections"] == 1 and by_rule["two"]["identity"] == "two"
        dests = {(d["host"], d["port"]): d for d in status["destinations"]}
        assert dests[(ONE, 443)]["identity"] == "one" and dests[(ONE, 443)]["bytes_in"] > 0
        assert dests[(TWO, 80)]["identity"] == "two" and dests[(TWO, 80)]["health"] == "ok"


def test_kept_alive_http_proxy_connection_follows_each_requests_host(two_services: Two) -> None:
    """One client connection to the proxy, requests for two hosts: each reaches its own server."""
    s = two_services
    with DaemonThread(proxy_config(s, rules(s, ports=[443]))) as daemon:
        port = proxy_port(daemon)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            bodies = []
            for host in (ONE, TWO, ONE):
                sock.sendall(f"GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                bodies.append(read_response(sock))
        assert "CN=identity-one" in bodies[0]
        assert "CN=identity-two" in bodies[1]
        assert "CN=identity-one" in bodies[2]


def read_response(sock: socket.socket) -> str:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return body.decode()


def test_destinations_outside_the_rules_are_refused_and_counted(two_services: Two) -> None:
    s = two_services
    with DaemonThread(proxy_config(s, rules(s, ports=[443]))) as daemon:
        port = proxy_port(daemon)
        http = curl_via(["-x", f"http://127.0.0.1:{port}", "-i"], "http://elsewhere.example/")
        assert "403" in http.stdout.splitlines()[0]
        assert "not in the proxy's rules" in http.stdout and "open relay" in http.stdout

        sock, code = socks5_connect(port, "elsewhere.example", 443)
        sock.close()
        assert code == 0x02  # connection not allowed by ruleset

        # a CONNECT to a port outside the rule's ports
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(f"CONNECT {TWO}:5432 HTTP/1.1\r\nHost: {TWO}:5432\r\n\r\n".encode())
            answer = recv_all(raw).decode()
        assert answer.startswith("HTTP/1.1 403") and "only on port(s) 443" in answer

        # a malformed SOCKS greeting
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"\x05\x01\x00\x05\x09\x00\x07")
            assert raw.recv(2) == b"\x05\x00"
            answer = recv_all(raw)
        assert answer[:2] == b"\x05\x07" or answer[:2] == b"\x05\x08"

        status = daemon.status()["proxy"]
        assert status["refused"]["proxy_not_allowed"] == 3
        assert status["refused"]["protocol_mismatch"] == 1
        # and it still serves
        ok = curl_via(["-x", f"http://127.0.0.1:{port}"], f"http://{ONE}/")
        assert "CN=identity-one" in ok.stdout


def test_a_client_hello_inside_connect_is_refused_unless_passthrough(two_services: Two) -> None:
    s = two_services
    with DaemonThread(proxy_config(s, rules(s))) as daemon:
        port = proxy_port(daemon)
        # curl to https:// through the proxy sends CONNECT, then its own ClientHello
        result = curl_via(["-x", f"http://127.0.0.1:{port}", "-k"], f"https://{ONE}/")
        assert result.returncode != 0
        wait_until(
            lambda: daemon.status()["proxy"]["rules"][0]["failures"].get("client_speaks_tls") == 1,
            timeout=10,
            what="the ClientHello refusal is counted for the rule",
        )
        rule = daemon.status()["proxy"]["rules"][0]
        assert "began its own TLS" in rule["last_error"] and "passthrough" in rule["last_error"]
