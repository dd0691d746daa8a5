"""`upstream_proxy`: routes and proxy rules that reach their target through an HTTP CONNECT or a
SOCKS5 proxy, against real ones on loopback (tests/proxies.py) with a real mTLS server behind.

What is proved: bytes pass both ways through the proxy, the proxy was asked for the target (by
name for SOCKS5), the TLS inside is the target's (SNI, our client certificate); credentials come
from the environment variable only, and a missing or wrong one is explained naming it; a proxy
that refuses or does not answer is counted under its own cause, the daemon keeps serving, and
`check` says the proxy's address, its answer and the fix; bad config is refused with the field
and line; proxy rules and warm connections go through the proxy too; bytes the proxy sent with
its answer (a target that speaks first) are not lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import ListenAddress, RouteSpec, load_config
from sidecar.errors import ConfigError
from sidecar.statusview import render_status
from sidecar.upstreamdial import open_to_target
from sidecar.upstreamproxy import UpstreamProxyError
from tests.daemon_runner import DaemonThread
from tests.proxies import UpstreamProxyServer
from tests.scenario import Pki, mtls_server, recv_all, route_to, write_config
from tests.waiting import wait_until

AUTH_ENV = "MTLS_TEST_PROXY_AUTH"


@pytest.fixture
def pki(isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Pki:
    monkeypatch.delenv(AUTH_ENV, raising=False)
    made = Pki.create(tmp_path / "pki")
    made.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
    return made


def config(home: Path, pki: Pki, port: int, *, host: str = "127.0.0.1", **route: Any) -> Path:
    return write_config(
        home / "config.toml",
        identities={"dev": {"renew": "none"}},
        routes={"svc": route_to(pki, port, target=f"{host}:{port}", **route), "direct": route_to(pki, port)},
    )


def echo_once(port: int, payload: bytes = b"ping\n") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(OSError):  # a refused tunnel may have closed us already
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def route_status(daemon: DaemonThread, name: str = "svc") -> dict[str, Any]:
    return daemon.status()["routes"][name]


@contextlib.contextmanager
def not_listening() -> Iterator[int]:
    """A loopback port that is bound but does not listen: connecting there is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# --- through the proxy


@pytest.mark.parametrize(("kind", "host"), [("http", "127.0.0.1"), ("http", "localhost"), ("socks5", "localhost")])
def test_a_route_reaches_its_target_through_the_proxy(isolated_home: Path, pki: Pki, kind: str, host: str) -> None:
    with (
        mtls_server(pki, mode="echo") as server,
        UpstreamProxyServer(kind) as proxy,
        DaemonThread(config(isolated_home, pki, server.port, host=host, upstream_proxy=proxy.url)) as daemon,
    ):
        assert echo_once(daemon.port("svc")) == b"ping\n"
        # the proxy was asked for the target, by its name (SOCKS5 too: the proxy resolves it)
        assert proxy.requests == [f"{host}:{server.port}"]
        assert proxy.tunnels == 1
        # the TLS inside is the target's: its SNI, our client certificate, the bytes encrypted
        record = server.records[-1]
        assert record.sni == "localhost" and record.peer_cert is not None
        assert b"ping" not in bytes(record.raw)
        status = route_status(daemon)
        assert status["failures"] == {} and status["total_connections"] == 1
        assert status["upstream_proxy"] == proxy.url and route_status(daemon, "direct")["upstream_proxy"] is None
        table = render_status(daemon.status(), datetime.now(UTC))
        assert f"through the upstream proxy {proxy.url}" in table and table.count("through the upstream proxy") == 1


@pytest.mark.parametrize("kind", ["http", "socks5"])
def test_credentials_come_from_the_environment_variable(
    isolated_home: Path, pki: Pki, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(AUTH_ENV, "alice:s3cret")
    with (
        mtls_server(pki, mode="echo") as server,
        UpstreamProxyServer(kind, credentials=("alice", "s3cret")) as proxy,
        DaemonThread(
            config(isolated_home, pki, server.port, upstream_proxy=proxy.url, upstream_proxy_auth_env=AUTH_ENV)
        ) as daemon,
    ):
        assert echo_once(daemon.port("svc")) == b"ping\n"
        assert proxy.authorizations == ["alice:s3cret"]
        # the variable is read at each connection: a wrong one now is refused, and said to be wrong
        monkeypatch.setenv(AUTH_ENV, "alice:wrong")
        assert echo_once(daemon.port("svc")) == b""
        status = route_status(daemon)
        assert status["failures"] == {"upstream_proxy_refused": 1}
        assert f"did not accept the credentials in the environment variable {AUTH_ENV}" in status["last_error"]
        assert "wrong" not in status["last_error"] and "s3cret" not in status["last_error"]


@pytest.mark.parametrize("kind", ["http", "socks5"])
def test_a_missing_credentials_variable_is_explained_by_name(isolated_home: Path, pki: Pki, kind: str) -> None:
    with (
        mtls_server(pki, mode="echo") as server,
        UpstreamProxyServer(kind, credentials=("alice", "s3cret")) as proxy,
        DaemonThread(
            config(isolated_home, pki, server.port, upstream_proxy=proxy.url, upstream_proxy_auth_env=AUTH_ENV)
        ) as daemon,
    ):
        assert echo_once(daemon.port("svc")) == b""
        status = route_status(daemon)
        assert status["failures"] == {"upstream_proxy_refused": 1}
        assert f"the environment variable {AUTH_ENV} (upstream_proxy_auth_env) is not set" in status["last_error"]
        assert proxy.url in status["last_error"]
        if kind == "http":
            assert "407" in status["last_error"]
        assert server.connections == 0  # the target never saw us
        checked = daemon.client().post("/v1/routes/svc/check")
        assert checked["cause"] == "upstream_proxy_refused" and checked["ok"] is False
        assert AUTH_ENV in checked["message"] and AUTH_ENV in checked["fix"]


@pytest.mark.parametrize(("kind", "refuse", "answer"), [("http", 403, "HTTP 403"), ("socks5", 0x02, "reply 0x02")])
def test_a_proxy_that_refuses_is_counted_and_the_daemon_keeps_serving(
    isolated_home: Path, pki: Pki, kind: str, refuse: int, answer: str
) -> None:
    with (
        mtls_server(pki, mode="echo") as server,
        UpstreamProxyServer(kind, refuse=refuse) as proxy,
        DaemonThread(config(isolated_home, pki, server.port, upstream_proxy=proxy.url)) as daemon,
    ):
        assert echo_once(daemon.port("svc")) == b""
        assert echo_once(daemon.port("svc")) == b""
        status = route_status(daemon)
        assert status["failures"] == {"upstream_proxy_refused": 2}
        assert proxy.url in status["last_error"] and answer in status["last_error"]
        assert f"127.0.0.1:{server.port}" in status["last_error"]
        assert server.connections == 0
        # the daemon keeps serving: the route that goes direct works, the refused one still listens
        assert echo_once(daemon.port("direct")) == b"ping\n"
        assert route_status(daemon)["health"] != "stopped"
        checked = daemon.client().post("/v1/routes/svc/check")
        assert checked["cause"] == "upstream_proxy_refused"
        assert proxy.url in checked["message"] and answer in checked["message"]
        assert "administrators" in checked["fix"]
        assert checked["details"]["upstream_proxy"] == proxy.url


def test_a_proxy_that_is_not_listening_is_unreachable(isolated_home: Path, pki: Pki) -> None:
    with (
        mtls_server(pki, mode="echo") as server,
        not_listening() as port,
        DaemonThread(config(isolated_home, pki, server.port, upstream_proxy=f"http://127.0.0.1:{port}")) as daemon,
    ):
        assert echo_once(daemon.port("svc")) == b""
        status = route_status(daemon)
        assert status["failures"] == {"upstream_proxy_unreachable": 1}
        assert f"the upstream proxy http://127.0.0.1:{port} refused the connection" in status["last_error"]
        assert "check upstream_proxy" in status["last_error"]
        checked = daemon.client().post("/v1/routes/svc/check")
        assert checked["cause"] == "upstream_proxy_unreachable"
        assert f"127.0.0.1:{port}" in checked["message"]


def test_a_proxy_speaking_something_else_is_unreachable(isolated_home: Path, pki: Pki) -> None:
    """A SOCKS5 proxy configured as http:// (a common slip): it hangs up on our CONNECT line."""
    with (
        mtls_server(pki, mode="echo") as server,
        UpstreamProxyServer("socks5") as proxy,
        DaemonThread(
            config(isolated_home, pki, server.port, upstream_proxy=f"http://127.0.0.1:{proxy.port}")
        ) as daemon,
    ):
        assert echo_once(daemon.port("svc")) == b""
        status = route_status(daemon)
        assert status["failures"] == {"upstream_proxy_unreachable": 1}
        assert "closed the connection before answering CONNECT" in status["last_error"]


def test_a_proxy_that_never_answers_times_out_naming_it(isolated_home: Path, pki: Pki) -> None:
    from tests.tlsserver import ScriptedTLSServer

    with (
        mtls_server(pki, mode="echo") as server,
        ScriptedTLSServer(cert=None, key=None, tls=False, mode="stall") as silent,
        DaemonThread(
            config(
                isolated_home, pki, server.port, upstream_proxy=f"http://127.0.0.1:{silent.port}", connect_timeout="1s"
            )
        ) as daemon,
    ):
        assert echo_once(daemon.port("svc")) == b""
        status = route_status(daemon)
        assert status["failures"] == {"timeout": 1}
        assert f"through the upstream proxy http://127.0.0.1:{silent.port}: no tunnel within 1s" in status["last_error"]
        assert b"CONNECT 127.0.0.1:" in bytes(silent.records[0].raw)
        checked = daemon.client().post("/v1/routes/svc/check")
        assert checked["cause"] == "timeout"
        assert f"the upstream proxy http://127.0.0.1:{silent.port} gave no tunnel" in checked["message"]


def test_check_goes_through_the_proxy(isolated_home: Path, pki: Pki) -> None:
    with (
        mtls_server(pki, mode="echo") as server,
        UpstreamProxyServer("socks5") as proxy,
        DaemonThread(config(isolated_home, pki, server.port, host="localhost", upstream_proxy=proxy.url)) as daemon,
    ):
        checked = daemon.client().post("/v1/routes/svc/check")
        assert checked["ok"] is True, checked["message"]
        assert f"localhost:{server.port}" in proxy.requests
        assert checked["details"]["address"] == f"localhost:{server.port} through {proxy.url}"


def test_a_warm_route_warms_through_the_proxy(isolated_home: Path, pki: Pki) -> None:
    with (
        mtls_server(pki, mode="echo") as server,
        UpstreamProxyServer("http") as proxy,
        DaemonThread(config(isolated_home, pki, server.port, upstream_proxy=proxy.url, preconnect=1)) as daemon,
    ):
        wait_until(lambda: route_status(daemon)["warm"]["ready"] == 1, timeout=10, what="a warm connection")
        assert proxy.tunnels == 1 and server.connections == 1  # made ahead, through the proxy
        assert echo_once(daemon.port("svc")) == b"ping\n"
        assert route_status(daemon)["warm"]["hits"] == 1
        wait_until(lambda: proxy.tunnels == 2, timeout=10, what="the replacement, through the proxy too")


# --- proxy rules


def rule_config(home: Path, pki: Pki, rule: dict[str, Any]) -> Path:
    return write_config(
        home / "config.toml",
        identities={"dev": {"renew": "none"}},
        routes={},
        proxy={"listen": "127.0.0.1:0", "rules": [rule]},
    )


def connect_through_sidecar(daemon: DaemonThread, target: str) -> socket.socket:
    port = int(daemon.status()["proxy"]["listen"].rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def test_a_proxy_rule_reaches_its_destinations_through_the_upstream_proxy(isolated_home: Path, pki: Pki) -> None:
    with (
        mtls_server(pki, mode="echo") as server,
        UpstreamProxyServer("http") as proxy,
        DaemonThread(
            rule_config(
                isolated_home,
                pki,
                {"hosts": ["localhost"], "ca_file": str(pki.server_ca_file), "upstream_proxy": proxy.url},
            )
        ) as daemon,
        connect_through_sidecar(daemon, f"localhost:{server.port}") as sock,
    ):
        sock.sendall(b"through two proxies\n")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"through two proxies\n"
        assert proxy.requests == [f"localhost:{server.port}"]
        assert server.records[-1].peer_cert is not None  # our certificate, added inside the upstream tunnel
        assert daemon.status()["proxy"]["rules"][0]["upstream_proxy"] == proxy.url
        # `mtls-sidecar proxy check` goes the same way
        checked = daemon.client().post("/v1/proxy/check", {"destination": f"localhost:{server.port}"})
        assert checked["ok"] is True, checked
        assert len(proxy.requests) >= 2


def test_a_passthrough_rule_keeps_what_the_proxy_sent_with_its_answer(isolated_home: Path, pki: Pki) -> None:
    """A target that speaks first, behind a proxy that sends its 200 and the target's banner in
    one write: the banner reaches the client intact (the leftover past the proxy's answer)."""
    with (
        banner_server(b"220 banner from the target\r\n") as port,
        UpstreamProxyServer("http", coalesce=True) as proxy,
        DaemonThread(
            rule_config(isolated_home, pki, {"hosts": ["127.0.0.1"], "passthrough": True, "upstream_proxy": proxy.url})
        ) as daemon,
        connect_through_sidecar(daemon, f"127.0.0.1:{port}") as sock,
    ):
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"220 banner from the target\r\n"
        assert proxy.tunnels == 1


@contextlib.contextmanager
def banner_server(banner: bytes) -> Iterator[int]:
    """A plain TCP server that sends `banner` to each client at once, then closes after its EOF."""
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(banner)
                conn.settimeout(10)
                with contextlib.suppress(OSError):
                    while conn.recv(4096):
                        pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() under way
        listener.close()
        thread.join(timeout=10)


# --- a RouteSpec built in code (the tunnel command's flags)


class _Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.done.set_result(None)
        return False


def spec(port: int, **fields: Any) -> RouteSpec:
    return RouteSpec("flags", ListenAddress("tcp", "127.0.0.1", 0), "127.0.0.1", port, "localhost", **fields)


@pytest.mark.parametrize(
    "loop", ["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(sys.platform == "win32", reason="no uvloop"))]
)
@pytest.mark.parametrize("kind", ["http", "socks5"])
def test_open_to_target_hands_over_the_bytes_past_the_proxy_answer(kind: str, loop: str) -> None:
    """On both event loops the daemon may run (uvloop by default)."""
    with banner_server(b"hello first\n") as port, UpstreamProxyServer(kind, coalesce=True) as proxy:

        async def run() -> bytes:
            transport, protocol = await open_to_target(spec(port, upstream_proxy=proxy.url), _Collect)
            transport.write_eof()
            await asyncio.wait_for(protocol.done, 10)
            transport.close()
            return protocol.data

        factory = asyncio.new_event_loop
        if loop == "uvloop":
            import uvloop

            factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            assert runner.run(run()) == b"hello first\n"
        assert proxy.tunnels == 1


def test_open_to_target_with_a_route_built_in_code_raises_the_proxy_refusal() -> None:
    with UpstreamProxyServer("http", refuse=403) as proxy:

        async def run() -> None:
            await open_to_target(spec(1, upstream_proxy=proxy.url), _Collect)

        with pytest.raises(UpstreamProxyError) as caught:
            asyncio.run(run())
    assert caught.value.status == 403 and caught.value.refused


# --- bad config


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        (
            {"upstream_proxy": "http://alice:s3cret@proxy.corp.example:3128"},
            "routes.svc.upstream_proxy",
            "credentials do not belong in the config file",
        ),
        ({"upstream_proxy": "ftp://proxy.corp.example"}, "routes.svc.upstream_proxy", "unsupported proxy scheme"),
        ({"upstream_proxy": "https://proxy.corp.example"}, "routes.svc.upstream_proxy", "TLS to the proxy itself"),
        ({"upstream_proxy_auth_env": "X"}, "routes.svc.upstream_proxy_auth_env", "only used with upstream_proxy"),
        (
            {"upstream_proxy": "http://p:3128", "upstream_proxy_auth_env": "alice:s3cret"},
            "routes.svc.upstream_proxy_auth_env",
            "not an environment variable name",
        ),
    ],
)
def test_bad_upstream_proxy_config_is_refused_with_field_and_line(
    isolated_home: Path, pki: Pki, extra: dict[str, Any], field: str, words: str
) -> None:
    path = config(isolated_home, pki, 8443, **extra)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    error = caught.value
    assert error.field == field and error.line is not None
    assert words in str(error)
    assert "s3cret" not in str(error)
    if "credentials" in words:
        assert "upstream_proxy_auth_env" in str(error)


def test_a_proxy_rule_checks_its_upstream_proxy_too(isolated_home: Path, pki: Pki) -> None:
    path = rule_config(isolated_home, pki, {"hosts": ["*.corp.example"], "upstream_proxy": "socks4://p"})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.field == "proxy.rules[0].upstream_proxy" or "upstream_proxy" in str(caught.value.field)
    assert "unsupported proxy scheme" in str(caught.value)


# --- the control API


def test_a_route_added_through_the_api_takes_an_upstream_proxy(isolated_home: Path, pki: Pki) -> None:
    from sidecar.control.client import ApiCallError
    from tests.realservers import free_port

    with (
        mtls_server(pki, mode="echo") as server,
        UpstreamProxyServer("socks5") as proxy,
        DaemonThread(config(isolated_home, pki, server.port)) as daemon,
    ):
        client = daemon.client()
        port = free_port()
        added = {"name": "added", "listen": f"127.0.0.1:{port}", "target": f"localhost:{server.port}"}
        trust = {"server_name": "localhost", "ca_file": str(pki.server_ca_file)}
        client.post("/v1/routes", {**added, **trust, "upstream_proxy": proxy.url, "upstream_proxy_auth_env": AUTH_ENV})
        assert echo_once(port) == b"ping\n"
        assert proxy.requests == [f"localhost:{server.port}"]
        with pytest.raises(ApiCallError) as caught:
            client.post(
                "/v1/routes",
                {**added, "name": "leaky", "listen": "127.0.0.1:0", "upstream_proxy": "http://alice:s3cret@p:3128"},
            )
        assert caught.value.status == 400
        assert "upstream_proxy" in str(caught.value) and "credentials do not belong" in str(caught.value)
        assert "s3cret" not in str(caught.value)
    saved = (isolated_home / "config.toml").read_text()
    assert f'upstream_proxy_auth_env = "{AUTH_ENV}"' in saved and "s3cret" not in saved


# --- the real daemon process (uvloop), nginx behind the proxy, curl in front


@pytest.mark.parametrize("kind", ["http", "socks5"])
def test_curl_through_the_daemon_process_and_the_proxy_to_nginx(
    isolated_home: Path, pki: Pki, tmp_path: Path, kind: str
) -> None:
    from tests.realservers import free_port, nginx_mtls
    from tests.scenario import curl
    from tests.test_cli import sidecar_process

    with (
        nginx_mtls(
            tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.client_ca_file
        ) as nginx,
        UpstreamProxyServer(kind, credentials=("alice", "s3cret")) as proxy,
    ):
        port = free_port()
        path = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={
                "web": route_to(
                    pki,
                    nginx.port,
                    listen=f"127.0.0.1:{port}",
                    target=f"localhost:{nginx.port}",
                    upstream_proxy=proxy.url,
                    upstream_proxy_auth_env=AUTH_ENV,
                )
            },
        )
        env = {"MTLS_SIDECAR_CONFIG": str(path), AUTH_ENV: "alice:s3cret"}
        with sidecar_process("run", env=env) as (proc, log):
            log.wait_for(rf"listening on 127\.0\.0\.1:{port} → localhost:{nginx.port}")
            result = curl(port)
            assert "client_dn=CN=dev" in result.stdout, (result.stdout, result.stderr, log.text)
            assert proxy.requests == [f"localhost:{nginx.port}"]
            assert "s3cret" not in log.text
            proc.terminate()
            proc.wait(timeout=20)
