"""`[proxy]`: one local port for every mTLS service, against real servers and real clients.

Two nginx servers with client-certificate checks, each with its own server CA and its own
client CA, stand for `api.one.test` and `api.two.test` (reached through each rule's `connect`,
as split-horizon names are). Identity `one` is issued by the first client CA, `two` by the
second; nginx's `/` answers with the client certificate's subject, so each test sees which
identity a rule presented. More real servers where a test needs them: a TLS redis and a
PostgreSQL that want identity one's certificate, a TLS nginx that wants none (passthrough),
an nginx whose certificate names 127.0.0.1 and ::1 (address and CIDR rules).

Clients: curl as an HTTP proxy client, a SOCKS5 client and a CONNECT + own-TLS client; Python
sockets speaking CONNECT, SOCKS5 (names, IPv4, IPv6), SOCKS4 and SOCKS4a by hand; redis-cli's
bytes; the real psql behind a forwarder that does what a SOCKS-capable driver does; headless
Chromium with the proxy's PAC file.
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomlkit

from tests.daemon_runner import DaemonThread
from tests.postgres import Postgres, postgres_mtls
from tests.realservers import nginx_mtls, redis_tls, require_binary
from tests.scenario import Pki, recv_all
from tests.scenario import read_response as scenario_read_response
from tests.waiting import wait_until

ONE, TWO = "api.one.test", "api.two.test"
CACHE, DB, PASS = "cache.one.test", "db.one.test", "pass.one.test"  # more servers under the first server CA
PLAIN = "plain.example"  # in no rule


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


def server_pair(s: Two, *names: str) -> tuple[Path, Path]:
    """A server certificate from `api.one.test`'s server CA (the rules' ca_file) for `names`."""
    return s.one.server_ca.server(*names).write_pair(s.tmp / "servers", names[0])


def proxy_config(s: Two, rule_list: list[dict[str, Any]], **proxy: Any) -> Path:
    path = s.home / "config.toml"
    path.write_text(config_text(rule_list, **proxy))
    return path


def config_text(rule_list: list[dict[str, Any]], **proxy: Any) -> str:
    doc = {
        "active_identity": "one",
        "identities": {"one": {"renew": "none"}, "two": {"renew": "none"}},
        "proxy": {"listen": "127.0.0.1:0", **proxy, "rules": rule_list},
    }
    return tomlkit.dumps(doc)


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
    head, body = scenario_read_response(sock)
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
            reply = recv_all(raw)
        assert reply[:2] == b"\x05\x07" or reply[:2] == b"\x05\x08"

        status = daemon.status()["proxy"]
        assert status["refused"]["proxy_not_allowed"] == 3
        assert status["refused"]["protocol_mismatch"] == 1
        # and it still serves
        ok = curl_via(["-x", f"http://127.0.0.1:{port}"], f"http://{ONE}/")
        assert "CN=identity-one" in ok.stdout


def test_a_client_hello_inside_connect_is_refused_unless_passthrough(two_services: Two) -> None:
    s = two_services
    cert, key = server_pair(s, PASS)
    # a TLS server that asks for no client certificate: what passthrough is for
    with nginx_mtls(s.tmp / "nginx-pass", server_cert=cert, server_key=key, client_ca=None) as plain_tls:
        passthrough = {"name": "pass", "hosts": [PASS], "passthrough": True, "connect": f"127.0.0.1:{plain_tls.port}"}
        with DaemonThread(proxy_config(s, [*rules(s), passthrough])) as daemon:
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

            # the same request to a passthrough rule's host: curl's own TLS, end to end, verified by curl
            ca = str(s.one.server_ca_file)
            through = curl_via(["-x", f"http://127.0.0.1:{port}", "--cacert", ca], f"https://{PASS}/")
            assert through.returncode == 0, through.stderr
            assert "verify=NONE" in through.stdout and "client_dn= " in through.stdout  # no certificate of ours
            socks = curl_via(["--socks5-hostname", f"127.0.0.1:{port}", "--cacert", ca], f"https://{PASS}/")
            assert socks.returncode == 0 and "verify=NONE" in socks.stdout, socks.stderr
            dest = destination(daemon, PASS, 443)
            assert dest["protocol"] == "passthrough" and dest["identity"] is None and dest["connections"] == 2
            by_rule = {r["name"]: r for r in daemon.status()["proxy"]["rules"]}
            assert by_rule["pass"]["failures"] == {} and by_rule["pass"]["connections"] == 2
            assert by_rule[ONE]["failures"] == {"client_speaks_tls": 1}

            # a plain http:// request for a passthrough host: we would add our TLS and certificate, so no
            plain = curl_via(["-x", f"http://127.0.0.1:{port}", "-i"], f"http://{PASS}/")
            assert plain.stdout.startswith("HTTP/1.1 403") and "passthrough" in plain.stdout, plain.stdout
            assert daemon.status()["proxy"]["refused"] == {"proxy_not_allowed": 1}
            assert destination(daemon, PASS, 443)["connections"] == 2  # no connection was made for it


# --------------------------------------------------------------------------------------------
# redis, PostgreSQL, a browser, reloads, IP addresses and CIDR blocks


def http_connect(port: int, host: str, dest_port: int) -> tuple[socket.socket, bytes]:
    """An HTTP CONNECT; the socket and the answer's head (nothing past it is read)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    authority = f"[{host}]:{dest_port}" if ":" in host else f"{host}:{dest_port}"
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            break
        head += byte
    return sock, head


def socks5_connect_ip(port: int, host: str, dest_port: int) -> tuple[socket.socket, int]:
    """A SOCKS5 CONNECT to an IPv4 (ATYP 1) or IPv6 (ATYP 4) address; the socket and the reply code."""
    address = ipaddress.ip_address(host)
    kind = b"\x01" if address.version == 4 else b"\x04"
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"\x05\x01\x00")
    assert sock.recv(2) == b"\x05\x00"
    sock.sendall(b"\x05\x01\x00" + kind + address.packed + struct.pack("!H", dest_port))
    reply = recv_exactly(sock, 10)
    return sock, reply[1]


def socks4_connect(port: int, dest_port: int, *, ip: str | None = None, name: str | None = None) -> socket.socket:
    """A hand-written SOCKS4 (to `ip`) or SOCKS4a (to `name`: address 0.0.0.1, the name after the user id)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    address = ipaddress.IPv4Address(ip).packed if ip else b"\0\0\0\x01"
    request = b"\x04\x01" + struct.pack("!H", dest_port) + address + b"tester\0"
    if name:
        request += name.encode() + b"\0"
    sock.sendall(request)
    reply = recv_exactly(sock, 8)
    assert reply[:2] == b"\x00\x5a", f"SOCKS4 request not granted: {reply!r}"
    return sock


def get_through(sock: socket.socket, host: str) -> str:
    """A plain HTTP/1.1 request on an open tunnel; the whole answer (the server closes after it)."""
    with sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return recv_all(sock).decode(errors="replace")


def resp(*words: str) -> bytes:
    """A command as redis-cli sends it (RESP: an array of bulk strings)."""
    out = f"*{len(words)}\r\n".encode()
    for word in words:
        data = word.encode()
        out += b"$%d\r\n%s\r\n" % (len(data), data)
    return out


def redis_talk(sock: socket.socket) -> None:
    """PING, SET and GET (100 kB, more than one TLS record) on a tunnel to redis, in plaintext."""
    value = "v" * 100_000
    sock.sendall(resp("PING"))
    assert recv_exactly(sock, 7) == b"+PONG\r\n"
    sock.sendall(resp("SET", "proxied", value))
    assert recv_exactly(sock, 5) == b"+OK\r\n"
    sock.sendall(resp("GET", "proxied"))
    expected = b"$%d\r\n%s\r\n" % (len(value), value.encode())
    assert recv_exactly(sock, len(expected)) == expected


def destination(daemon: DaemonThread, host: str, port: int) -> dict[str, Any]:
    known: list[dict[str, Any]] = daemon.status()["proxy"]["destinations"]
    found = [d for d in known if (d["host"], d["port"]) == (host, port)]
    assert len(found) == 1, f"destination {host}:{port} in {known}"
    return found[0]


def test_redis_bytes_through_connect_and_socks5_reach_a_tls_redis_that_wants_our_certificate(
    two_services: Two,
) -> None:
    s = two_services
    redis_cli = require_binary("redis-cli")
    cert, key = server_pair(s, CACHE)
    with redis_tls(s.tmp / "redis", server_cert=cert, server_key=key, client_ca=s.one.client_ca_file) as redis:
        rule = {
            "name": "cache",
            "hosts": [CACHE],
            "ports": [6379],
            "identity": "one",
            "ca_file": str(s.one.server_ca_file),
            "connect": f"127.0.0.1:{redis.port}",
        }
        with DaemonThread(proxy_config(s, [rule, *rules(s)])) as daemon:
            port = proxy_port(daemon)
            sock, head = http_connect(port, CACHE, 6379)
            with sock:
                assert head.startswith(b"HTTP/1.1 200"), head
                redis_talk(sock)
            sock, code = socks5_connect(port, CACHE, 6379)
            with sock:
                assert code == 0x00
                redis_talk(sock)
            # a hasty client: CONNECT and its command in one write, then its half-close (`printf … | nc`)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as hasty:
                hasty.sendall(f"CONNECT {CACHE}:6379 HTTP/1.1\r\nHost: {CACHE}:6379\r\n\r\n".encode() + resp("PING"))
                hasty.shutdown(socket.SHUT_WR)
                answer = recv_all(hasty)
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n+PONG\r\n"), answer
            # and the real redis-cli, behind a forwarder that asks the proxy as a SOCKS-capable client would
            with ProxyForwarder(port, CACHE, 6379, "socks5") as forwarder:
                got = subprocess.run(
                    [redis_cli, "-p", str(forwarder.port), "STRLEN", "proxied"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                )
            assert got.returncode == 0 and got.stdout.strip() == "100000", (got.stdout, got.stderr)
            assert forwarder.errors == [] and forwarder.accepted == 1
            dest = destination(daemon, CACHE, 6379)
            assert dest["protocol"] == "tcp" and dest["identity"] == "one" and dest["target"].endswith(str(redis.port))
            assert dest["connections"] == 4 and dest["bytes_out"] > 200_000 and dest["bytes_in"] > 100_000
            assert daemon.status()["proxy"]["rules"][0]["failures"] == {}


class ProxyForwarder:
    """A local port for a client that cannot speak SOCKS or CONNECT itself (psql, libpq).

    For each client it accepts, it opens a connection to the proxy port, asks for one destination
    (a SOCKS5 CONNECT by name, or an HTTP CONNECT), checks that the answer is success, then relays
    bytes both ways, half-close aware (an EOF one way becomes a shutdown of that way only). It does
    only what a SOCKS-capable driver (or proxychains) does inside the client: the proxy sees exactly
    that conversation, and nothing here touches TLS.
    """

    def __init__(self, proxy: int, host: str, port: int, how: str = "socks5") -> None:
        self.proxy, self.host, self.dest_port, self.how = proxy, host, port, how
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.accepted = 0
        self.errors: list[str] = []
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> ProxyForwarder:
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        self.listener.close()
        for thread in self._threads:
            thread.join(timeout=15)
            assert not thread.is_alive(), "a forwarder thread did not finish"

    def _spawn(self, target: Callable[..., None], *args: Any) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            self._spawn(self._serve, client)

    def _serve(self, client: socket.socket) -> None:
        try:
            self._tunnel(client)
        except (OSError, AssertionError) as exc:
            self.errors.append(f"{self.how} to the proxy: {exc!r}")

    def _tunnel(self, client: socket.socket) -> None:
        with client:
            if self.how == "socks5":
                upstream, code = socks5_connect(self.proxy, self.host, self.dest_port)
                ok, answer = code == 0x00, f"SOCKS5 reply {code:#x}"
            else:
                upstream, head = http_connect(self.proxy, self.host, self.dest_port)
                ok, answer = head.startswith(b"HTTP/1.1 200"), repr(head)
            with upstream:
                if not ok:
                    self.errors.append(f"the proxy did not open the tunnel: {answer}")
                    return
                upstream.settimeout(None)
                back = self._spawn(self._pump, upstream, client)
                self._pump(client, upstream)
                back.join(timeout=60)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError as exc:
            self.errors.append(f"relay: {exc}")
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def psql_via(port: int, user: str, sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", f"host=127.0.0.1 port={port} user={user} dbname=postgres sslmode=disable", "-Atc", sql],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_psql_through_socks5_and_connect_with_protocol_postgres_logs_in_as_the_certificates_cn(
    two_services: Two,
) -> None:
    s = two_services
    require_binary("psql")
    cert, key = server_pair(s, DB)
    with postgres_mtls(server_cert=cert, server_key=key, client_ca=s.one.client_ca_file) as pg:
        pg.psql_admin('create role "identity-one" login')
        rule = {
            "name": "db",
            "hosts": [DB],
            "ports": [5432],
            "protocol": "postgres",
            "identity": "one",
            "ca_file": str(s.one.server_ca_file),
            "connect": f"127.0.0.1:{pg.port}",
        }
        with DaemonThread(proxy_config(s, [rule, *rules(s)])) as daemon:
            port = proxy_port(daemon)
            forwarded = 0
            for how in ("socks5", "connect"):
                with ProxyForwarder(port, DB, 5432, how) as forwarder:
                    done = psql_via(
                        forwarder.port,
                        "identity-one",
                        "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()",
                    )
                assert done.returncode == 0, f"{how}: {done.stderr} {forwarder.errors}"
                # cert auth (hostssl ... cert) made the certificate's CN the role; the server's side is TLS
                assert done.stdout.strip() == "identity-one|t", how
                assert forwarder.errors == [] and forwarder.accepted >= 1
                forwarded += forwarder.accepted
            dest = destination(daemon, DB, 5432)
            assert dest["protocol"] == "postgres" and dest["identity"] == "one"
            assert dest["connections"] == forwarded and dest["failures"] == {}

            # Ctrl-C in psql: its CancelRequest comes on a connection of its own, through the proxy too
            with ProxyForwarder(port, DB, 5432, "socks5") as forwarder:
                err = ctrl_c_psql(pg, forwarder.port)
            assert "canceling statement due to user request" in err, err
            assert forwarder.accepted == 2 and forwarder.errors == []


def ctrl_c_psql(pg: Postgres, port: int) -> str:
    """Start `select pg_sleep(30)` as identity-one, press Ctrl-C once it runs; psql's stderr."""
    argv = ["psql", f"host=127.0.0.1 port={port} user=identity-one dbname=postgres sslmode=disable"]
    proc = subprocess.Popen(
        [*argv, "-Atc", "select pg_sleep(30)"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(
            lambda: pg.psql_admin("select count(*) from pg_stat_activity where query = 'select pg_sleep(30)'") == "1",
            timeout=15,
            what="pg_sleep to be running",
        )
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return err


@contextlib.contextmanager
def plain_http_server(body: str) -> Iterator[tuple[int, list[str]]]:
    """A plain HTTP server on 127.0.0.1 (no proxy, no TLS): its port and the Host headers it saw."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Host", ""))
            data = f"<html><body><p>{body}</p></body></html>".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def chromium_dom(chromium: str, profile: Path, pac_url: str, url: str, *extra: str) -> str:
    """What headless Chromium shows for `url` with the proxy's PAC file as its proxy settings."""
    profile.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [
            chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--disable-background-networking",
            f"--user-data-dir={profile}", "--virtual-time-budget=8000", f"--proxy-pac-url={pac_url}",
            *extra, "--dump-dom", url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-3000:]}"
    return done.stdout


def test_chromium_with_the_pac_file_loads_a_rules_host_through_mtls_and_other_hosts_direct(two_services: Two) -> None:
    s = two_services
    chromium = require_binary("chromium")
    marker = "served-directly-not-through-the-proxy"
    with DaemonThread(proxy_config(s, rules(s))) as daemon, plain_http_server(marker) as (plain_port, seen):
        port = proxy_port(daemon)
        pac = f"http://127.0.0.1:{port}/proxy.pac"
        dom = chromium_dom(chromium, s.tmp / "chromium-1", pac, f"http://{ONE}/")
        # nginx's page, as the browser shows it: the client certificate nginx saw is identity one's
        assert "client_dn=CN=identity-one" in dom and "verify=SUCCESS" in dom, dom
        assert destination(daemon, ONE, 443)["via"] == "http"
        # the wildcard rule, as the browser's PAC engine runs the PAC file's test for *.two.test
        dom = chromium_dom(chromium, s.tmp / "chromium-2", pac, f"http://{TWO}/")
        assert "client_dn=CN=identity-two" in dom, dom
        assert all(rule["failures"] == {} for rule in daemon.status()["proxy"]["rules"])

        # Names outside the rules (one with two labels before .two.test, which the wildcard leaves out),
        # mapped to the plain server by Chromium's own resolver: names, not 127.0.0.1, as Chromium never
        # sends loopback addresses to a proxy, whatever the PAC file says.
        for index, name in enumerate((PLAIN, f"deep.{TWO}")):
            before = daemon.status()["proxy"]
            url = f"http://{name}:{plain_port}/"
            dom = chromium_dom(
                chromium, s.tmp / f"chromium-d{index}", pac, url, f"--host-resolver-rules=MAP {name} 127.0.0.1"
            )
            assert marker in dom, dom
            assert f"{name}:{plain_port}" in seen  # the browser itself asked the plain server for that name
            after = daemon.status()["proxy"]
            assert after["pac_served"] > before["pac_served"] >= 1  # each browser fetched the PAC file
            assert after["refused"] == before["refused"]  # the proxy never heard of that name
            assert name not in {d["host"] for d in after["destinations"]}


def test_rules_hot_reload_a_new_host_is_served_and_a_removed_one_refused(two_services: Two) -> None:
    s = two_services
    one_rule, two_rule = rules(s)
    config = proxy_config(s, [one_rule])
    with DaemonThread(config) as daemon:
        port = proxy_port(daemon)
        proxy = ["-x", f"http://127.0.0.1:{port}", "-i"]
        before_one, before_two = curl_via(proxy, f"http://{ONE}/"), curl_via(proxy, f"http://{TWO}/")
        assert "CN=identity-one" in before_one.stdout
        assert before_two.stdout.startswith("HTTP/1.1 403") and "not in the proxy's rules" in before_two.stdout

        # a tunnel opened before the edit
        kept, head = http_connect(port, ONE, 443)
        assert head.startswith(b"HTTP/1.1 200"), head
        kept.sendall(f"GET / HTTP/1.1\r\nHost: {ONE}\r\n\r\n".encode())
        assert "CN=identity-one" in read_response(kept)

        # the user edits config.toml: api.two.test in, api.one.test out (written whole, then renamed in)
        edited = config.with_suffix(".new")
        edited.write_text(config_text([two_rule]))
        edited.replace(config)

        def rule_names() -> list[str]:
            return [rule["name"] for rule in daemon.status()["proxy"]["rules"]]

        wait_until(lambda: rule_names() == ["two"], timeout=15, what="the edited rules to be reloaded")
        after_two, after_one = curl_via(proxy, f"http://{TWO}/"), curl_via(proxy, f"http://{ONE}/")
        assert after_two.stdout.startswith("HTTP/1.1 200") and "CN=identity-two" in after_two.stdout
        assert after_one.stdout.startswith("HTTP/1.1 403") and "not in the proxy's rules" in after_one.stdout
        assert proxy_port(daemon) == port  # the same port, the new rules
        with kept:  # connections already open stay as they are: the old rule, its identity
            kept.sendall(f"GET / HTTP/1.1\r\nHost: {ONE}\r\n\r\n".encode())
            assert "CN=identity-one" in read_response(kept)
        status = daemon.status()["proxy"]
        assert status["last_refusal"] is not None and ONE in status["last_refusal"]
        assert status["refused"]["proxy_not_allowed"] == 2

        # a rule that changes (another identity, new to the config too): new connections present it
        s.two.enroll(s.home / "keystore", "three", "three-1", cn="identity-three")
        doc = tomlkit.parse(config_text([{**two_rule, "identity": "three"}]))
        doc["identities"]["three"] = {"renew": "none"}
        edited.write_text(tomlkit.dumps(doc))
        edited.replace(config)
        wait_until(
            lambda: daemon.status()["proxy"]["rules"][0]["identity"] == "three", timeout=15, what="identity three"
        )
        again = curl_via(proxy, f"http://{TWO}/")
        assert "CN=identity-three" in again.stdout and "verify=SUCCESS" in again.stdout, again.stdout


def test_ip_literals_cidr_rules_and_socks4a(two_services: Two) -> None:
    s = two_services
    by_ip = Pki.create(s.tmp / "pki-ip", "127.0.0.1", "::1")  # a server certificate for the addresses themselves
    with nginx_mtls(
        s.tmp / "nginx-ip", server_cert=by_ip.server_cert, server_key=by_ip.server_key, client_ca=s.two.client_ca_file
    ) as server:
        loopback = {
            "name": "loopback",
            "hosts": ["127.0.0.0/8"],
            "identity": "two",
            "ca_file": str(by_ip.server_ca_file),
        }
        v6 = {
            "name": "v6",
            "hosts": ["::1"],
            "identity": "two",
            "ca_file": str(by_ip.server_ca_file),
            "connect": f"127.0.0.1:{server.port}",
        }
        with DaemonThread(proxy_config(s, [loopback, v6, *rules(s)])) as daemon:
            port = proxy_port(daemon)
            # SOCKS5 with an IPv4 address (ATYP 1): the CIDR rule, no `connect`: the address itself is dialled
            sock, code = socks5_connect_ip(port, "127.0.0.1", server.port)
            assert code == 0x00
            page = get_through(sock, "127.0.0.1")
            assert page.startswith("HTTP/1.1 200") and "CN=identity-two" in page and "verify=SUCCESS" in page

            # SOCKS5 with an IPv6 address (ATYP 4), and CONNECT to [::1]: the server's IP SAN ::1 is checked
            sock, code = socks5_connect_ip(port, "::1", 443)
            assert code == 0x00
            assert "CN=identity-two" in get_through(sock, "[::1]")
            sock, head = http_connect(port, "::1", 443)
            assert head.startswith(b"HTTP/1.1 200"), head
            assert "CN=identity-two" in get_through(sock, "[::1]")

            # SOCKS4 to an address, SOCKS4a by name
            assert "CN=identity-two" in get_through(socks4_connect(port, server.port, ip="127.0.0.1"), "127.0.0.1")
            assert "CN=identity-one" in get_through(socks4_connect(port, 443, name=ONE), ONE)

            # a name is never resolved to match an address block: localhost is not 127.0.0.0/8
            sock, code = socks5_connect(port, "localhost", server.port)
            sock.close()
            assert code == 0x02

            status = daemon.status()["proxy"]
            by_rule = {rule["name"]: rule for rule in status["rules"]}
            assert by_rule["loopback"]["connections"] == 2 and by_rule["v6"]["connections"] == 2
            assert by_rule[ONE]["connections"] == 1
            assert destination(daemon, "127.0.0.1", server.port)["identity"] == "two"
            assert destination(daemon, "::1", 443)["target"].endswith(f":{server.port}")
            assert status["refused"] == {"proxy_not_allowed": 1}


def test_a_rules_preconnect_keeps_warm_connections_per_destination(two_services: Two) -> None:
    """`preconnect` on a rule: each destination reached keeps its own warm connections, used by
    CONNECT, SOCKS and the HTTP proxy alike, each presenting the rule's identity."""
    s = two_services
    with DaemonThread(proxy_config(s, rules(s, preconnect=1))) as daemon:
        port = proxy_port(daemon)

        def warm_of(host: str, dest_port: int, via: str) -> dict[str, Any]:
            for dest in daemon.status()["proxy"]["destinations"]:
                if (dest["host"], dest["port"], dest["via"]) == (host, dest_port, via):
                    return dest["warm"] or {}
            return {}

        first = curl_via(["-x", f"http://127.0.0.1:{port}"], f"http://{TWO}/")
        assert "CN=identity-two" in first.stdout, first.stderr
        wait_until(lambda: warm_of(TWO, 443, "http").get("ready") == 1, timeout=10, what="a warm HTTP destination")
        again = curl_via(["-x", f"http://127.0.0.1:{port}"], f"http://{TWO}/")
        assert "CN=identity-two" in again.stdout and "verify=SUCCESS" in again.stdout
        assert warm_of(TWO, 443, "http")["hits"] == 1

        sock, code = socks5_connect(port, TWO, 443)
        sock.close()
        assert code == 0
        wait_until(lambda: warm_of(TWO, 443, "tunnel").get("ready") == 1, timeout=10, what="a warm SOCKS destination")
        sock, code = socks5_connect(port, TWO, 443)
        with sock:
            assert code == 0
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {TWO}\r\nConnection: close\r\n\r\n".encode())
            answer = recv_all(sock).decode()
        assert "CN=identity-two" in answer and warm_of(TWO, 443, "tunnel")["hits"] == 1
