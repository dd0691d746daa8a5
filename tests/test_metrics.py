"""Metrics: the status as Prometheus text, read back with Prometheus's own parser.

The renderer and the HTTP answers are checked without sockets; then a real daemon with a route
to a real mTLS server (and one to a server with another name) serves `/v1/metrics` on the
control API and `metrics_listen` over plain HTTP, and both say what the traffic did.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import socket
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import parse_config
from sidecar.control.client import ApiCallError
from sidecar.durations import Durations
from sidecar.errors import ConfigError
from sidecar.metrics import CONTENT_TYPE, render, render_status
from sidecar.metricsserver import metrics_answer
from tests.daemon_runner import DaemonThread
from tests.realservers import free_port
from tests.scenario import Pki, mtls_server, read_response, recv_all, route_to, write_config
from tests.waiting import wait_until

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """{family name: type}, {(sample name, sorted labels): value}: what a Prometheus server reads."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def route_status(**overrides: Any) -> dict[str, Any]:
    times = Durations()
    for seconds in (0.002, 0.005, 0.3, 20.0):
        times.observe(seconds)
    return {
        "total_connections": 7,
        "active_connections": 2,
        "bytes_in": 1000,
        "bytes_out": 300,
        "failures": {"name_mismatch": 2, "refused": 1},
        "health": "failing",
        "handshake_seconds": times.to_json(),
        **overrides,
    }


# --- the renderer, without sockets


def test_routes_identities_and_the_proxy_become_families_a_prometheus_parser_reads() -> None:
    identities = {
        "dev": {
            "selected": {"not_after": "2026-12-01T12:00:00Z"},
            "renewal": {"state": "renewing", "consecutive_failures": 3, "next_renewal_at": "2026-11-30T11:00:00Z"},
        },
        "none-yet": {"selected": None, "renewal": {"state": "expired", "consecutive_failures": 0}},
    }
    proxy = {
        "connections": 5,
        "active_connections": 1,
        "refused": {"proxy_not_allowed": 4},
        "rules": [{"name": "corp", "connections": 3, "active_connections": 1, "bytes_in": 9, "bytes_out": 8}],
    }
    text = render({"api": route_status()}, identities, now=NOW, proxy=proxy, version="9.9", config_error=True)
    types, samples = parse(text)

    assert types["mtls_sidecar_connections"] == "counter"
    assert types["mtls_sidecar_handshake_seconds"] == "histogram"
    assert types["mtls_sidecar_certificate_expiry_seconds"] == "gauge"
    assert value(samples, "mtls_sidecar_build_info", version="9.9") == 1
    assert value(samples, "mtls_sidecar_config_error") == 1
    assert value(samples, "mtls_sidecar_connections_total", route="api") == 7
    assert value(samples, "mtls_sidecar_connections_open", route="api") == 2
    assert value(samples, "mtls_sidecar_bytes_total", route="api", direction="sent") == 300
    assert value(samples, "mtls_sidecar_bytes_total", route="api", direction="received") == 1000
    assert value(samples, "mtls_sidecar_failures_total", route="api", cause="name_mismatch") == 2
    assert value(samples, "mtls_sidecar_failures_total", route="api", cause="refused") == 1
    assert value(samples, "mtls_sidecar_route_health", route="api", health="failing") == 1
    assert value(samples, "mtls_sidecar_route_health", route="api", health="ok") == 0
    # buckets are cumulative and a bound counts what equals it; 20 s is past every bound
    assert value(samples, "mtls_sidecar_handshake_seconds_bucket", route="api", le="0.005") == 2
    assert value(samples, "mtls_sidecar_handshake_seconds_bucket", route="api", le="0.5") == 3
    assert value(samples, "mtls_sidecar_handshake_seconds_bucket", route="api", le="10.0") == 3
    assert value(samples, "mtls_sidecar_handshake_seconds_bucket", route="api", le="+Inf") == 4
    assert value(samples, "mtls_sidecar_handshake_seconds_count", route="api") == 4
    assert value(samples, "mtls_sidecar_handshake_seconds_sum", route="api") == pytest.approx(20.307)

    assert value(samples, "mtls_sidecar_identity_usable", identity="dev") == 1
    assert value(samples, "mtls_sidecar_identity_usable", identity="none-yet") == 0
    assert value(samples, "mtls_sidecar_certificate_expiry_seconds", identity="dev") == 86400
    assert not any(  # no certificate: no expiry series at all (not a 0 that reads as "expires now")
        name == "mtls_sidecar_certificate_expiry_seconds" and dict(labels)["identity"] == "none-yet"
        for name, labels in samples
    )
    states = {
        dict(labels)["state"]: v
        for (name, labels), v in samples.items()
        if name == "mtls_sidecar_renewal_state" and dict(labels)["identity"] == "dev"
    }
    assert states == {"valid": 0, "renew_due": 0, "renewing": 1, "failing": 0, "expired": 0}
    assert value(samples, "mtls_sidecar_renewal_state", identity="none-yet", state="expired") == 1
    assert value(samples, "mtls_sidecar_renewal_consecutive_failures", identity="dev") == 3
    assert value(samples, "mtls_sidecar_renewal_next_seconds", identity="dev") == -3600

    # a proxy rule is a route named proxy:RULE; the proxy port has families of its own
    assert value(samples, "mtls_sidecar_connections_total", route="proxy:corp") == 3
    assert value(samples, "mtls_sidecar_bytes_total", route="proxy:corp", direction="sent") == 8
    assert value(samples, "mtls_sidecar_proxy_connections_total") == 5
    assert value(samples, "mtls_sidecar_proxy_connections_open") == 1
    assert value(samples, "mtls_sidecar_proxy_refused_total", cause="proxy_not_allowed") == 4


def test_label_values_are_escaped_and_missing_or_broken_numbers_are_left_out() -> None:
    odd = 'we"ird\\name\nline'
    text = render(
        {odd: {"total_connections": "many", "bytes_in": True, "active_connections": 1}},
        {odd: {"selected": {"not_after": "not a time"}}},
        now=NOW,
    )
    _, samples = parse(text)
    assert value(samples, "mtls_sidecar_connections_open", route=odd) == 1
    assert value(samples, "mtls_sidecar_identity_usable", identity=odd) == 1
    names = {name for name, _ in samples}
    assert "mtls_sidecar_connections_total" not in names  # "many" is not a count
    assert "mtls_sidecar_bytes_total" not in names  # nor is true
    assert "mtls_sidecar_certificate_expiry_seconds" not in names
    assert "mtls_sidecar_config_error" not in names  # not a daemon: no config.toml to reject


def test_an_empty_status_renders_and_a_naive_now_is_refused() -> None:
    types, samples = parse(render_status({}, NOW))
    assert value(samples, "mtls_sidecar_build_info", version=__import__("sidecar").__version__) == 1
    assert "mtls_sidecar_connections" in types  # the family is there, with no series yet
    with pytest.raises(ValueError, match="aware"):
        render({}, {}, now=datetime(2026, 1, 1))


def test_durations_count_in_the_first_bucket_that_holds_them() -> None:
    times = Durations(bounds=(0.1, 1.0))
    for seconds in (-1.0, 0.1, 0.10001, 1.0, math.inf):
        times.observe(seconds)
    assert times.to_json()["buckets"] == [[0.1, 2], [1.0, 4], ["+Inf", 5]]
    assert times.count == 5
    with pytest.raises(ValueError, match="increasing"):
        Durations(bounds=(1.0, 0.5))


def test_the_metrics_port_answers_get_and_head_404_elsewhere_405_for_other_methods() -> None:
    calls: list[int] = []

    def text() -> str:
        calls.append(1)
        return "# metrics\n"

    for path in ("/metrics", "/v1/metrics", "/metrics?x=1"):
        answer = metrics_answer("GET", path, text)
        assert (answer.status, answer.content_type, answer.body) == (200, CONTENT_TYPE, b"# metrics\n")
    assert metrics_answer("HEAD", "/metrics", text).status == 200
    missing = metrics_answer("GET", "/", text)
    assert missing.status == 404 and b"/metrics" in missing.body
    wrong = metrics_answer("POST", "/metrics", text)
    assert (wrong.status, wrong.allow) == (405, "GET, HEAD")
    assert len(calls) == 4  # rendered only for what is answered with the text
    elsewhere = metrics_answer("GET", "/_metrics", text, paths=("/_metrics",))
    assert elsewhere.status == 200 and metrics_answer("GET", "/metrics", text, paths=("/_metrics",)).status == 404


# --- config


@pytest.mark.parametrize(
    ("lines", "words"),
    [
        ('metrics_listen = "0.0.0.0:9464"', "not a loopback address"),
        ('metrics_listen = "metrics"', "missing port"),
        ('metrics_listen = "127.0.0.1:99999"', "port must be a number"),
        ("metrics_listen = 9464", "expected a string"),
        ('metrics_listen = "unix:/tmp/metrics.sock"', "TCP only"),
        ('metrics_listen = "127.0.0.1:18888"\n[[proxy.rules]]\nhosts = ["*.corp.example"]', "the proxy both"),
    ],
)
def test_a_bad_metrics_listen_is_refused_naming_the_key_and_line(lines: str, words: str) -> None:
    text = 'log_level = "info"\n' + lines + "\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="config.toml")
    assert caught.value.field == "metrics_listen" and caught.value.line == 2
    assert words in str(caught.value) and "config.toml:2" in str(caught.value)


def test_metrics_listen_clashing_with_a_route_and_the_unsafe_opt_in() -> None:
    route = '[identities.dev]\nrenew = "none"\n[routes.api]\nlisten = "127.0.0.1:9464"\ntarget = "api.test:443"\n'
    with pytest.raises(ConfigError, match=re.escape("metrics_listen and route api both listen on 127.0.0.1:9464")):
        parse_config('metrics_listen = "localhost:9464"\n' + route)
    config = parse_config('metrics_listen = "0.0.0.0:9464"\nmetrics_unsafe_listen = true\n')
    assert str(config.metrics_listen) == "0.0.0.0:9464" and config.metrics_unsafe_listen
    assert parse_config("").metrics_listen is None


# --- a real daemon


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


def exchange(daemon: DaemonThread, route: str, data: bytes) -> bytes:
    with daemon.connect(route) as sock:
        sock.sendall(data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def scrape(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, str, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["content-type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["content-type"], exc.read().decode()


def test_the_daemon_counts_traffic_failures_handshakes_and_expiry_on_both_endpoints(
    pki: Pki, isolated_home: Path
) -> None:
    leaf = pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
    metrics_port = free_port()
    with mtls_server(pki, mode="echo") as server:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={
                "svc": route_to(pki, server.port),
                # the server's certificate does not name this: a failure before any byte flows
                "wrong": route_to(pki, server.port, server_name="elsewhere.example.test"),
            },
            metrics_listen=f"127.0.0.1:{metrics_port}",
        )
        with DaemonThread(config) as daemon:
            for _ in range(2):
                assert exchange(daemon, "svc", b"hello metrics\n") == b"hello metrics\n"
            assert exchange(daemon, "wrong", b"no\n") == b""
            wait_until(lambda: daemon.status()["routes"]["wrong"]["failures"], timeout=10, what="the failure")
            wait_until(
                lambda: daemon.status()["routes"]["svc"]["active_connections"] == 0, timeout=10, what="tunnels to end"
            )
            status = daemon.status()
            from_api = daemon.client().get_text("/v1/metrics")
            code, content_type, from_port = scrape(metrics_port)
            head = scrape(metrics_port, method="HEAD")
            elsewhere = scrape(metrics_port, "/status")
            posted = scrape(metrics_port, method="POST")

    types, samples = parse(from_api)
    assert value(samples, "mtls_sidecar_connections_total", route="svc") == 2
    assert value(samples, "mtls_sidecar_connections_open", route="svc") == 0
    assert value(samples, "mtls_sidecar_bytes_total", route="svc", direction="sent") == 2 * len(b"hello metrics\n")
    assert value(samples, "mtls_sidecar_bytes_total", route="svc", direction="received") == 2 * len(b"hello metrics\n")
    failures = {
        dict(labels)["cause"]: v
        for (name, labels), v in samples.items()
        if name == "mtls_sidecar_failures_total" and dict(labels)["route"] == "wrong"
    }
    assert failures == status["routes"]["wrong"]["failures"] and sum(failures.values()) == 1
    assert value(samples, "mtls_sidecar_route_health", route="svc", health="ok") == 1
    assert value(samples, "mtls_sidecar_route_health", route="wrong", health="failing") == 1
    assert value(samples, "mtls_sidecar_handshake_seconds_count", route="svc") == 2
    assert 0 < value(samples, "mtls_sidecar_handshake_seconds_sum", route="svc") < 10
    expected = (leaf.cert.not_valid_after_utc - datetime.now(UTC)).total_seconds()
    assert value(samples, "mtls_sidecar_certificate_expiry_seconds", identity="dev") == pytest.approx(expected, abs=60)
    assert value(samples, "mtls_sidecar_identity_usable", identity="dev") == 1
    assert value(samples, "mtls_sidecar_renewal_state", identity="dev", state="valid") == 1
    assert value(samples, "mtls_sidecar_config_error") == 0

    # metrics_listen: the same families over plain HTTP, in the classic text format
    assert (code, content_type) == (200, "text/plain; version=0.0.4; charset=utf-8")
    assert parse(from_port)[0] == types
    assert head[:2] == (200, content_type) and head[2] == ""
    assert elsewhere[0] == 404 and "/metrics" in elsewhere[2]
    assert posted[0] == 405
    assert status["daemon"]["metrics"]["listen"] == f"127.0.0.1:{metrics_port}"
    assert status["daemon"]["metrics"]["state"] == "up"


def test_a_taken_metrics_port_is_an_error_in_status_and_the_routes_still_serve(pki: Pki, isolated_home: Path) -> None:
    pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
    holder = socket.socket()
    with contextlib.closing(holder), mtls_server(pki, mode="echo") as server:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]

        def config(log_level: str) -> Path:
            return write_config(
                isolated_home / "config.toml",
                identities={"dev": {"renew": "none"}},
                routes={"svc": route_to(pki, server.port)},
                metrics_listen=f"127.0.0.1:{taken}",
                log_level=log_level,
            )

        with DaemonThread(config("info")) as daemon:
            status = daemon.status()
            assert exchange(daemon, "svc", b"still here\n") == b"still here\n"
            assert "# TYPE mtls_sidecar_connections_total counter" in daemon.client().get_text("/v1/metrics")
            # the other program lets go; the next reload (any edit) tries the port again
            holder.close()
            config("debug")
            assert daemon.daemon is not None
            asyncio.run_coroutine_threadsafe(daemon.daemon.reload_config(), daemon.loop).result(timeout=10)
            assert scrape(taken)[0] == 200
            assert daemon.status()["daemon"]["metrics"]["state"] == "up"
    metrics = status["daemon"]["metrics"]
    assert metrics["state"] == "error"
    assert metrics["error"] == (
        f"metrics_listen: cannot listen on 127.0.0.1:{taken}: the port is taken (another program listens there); "
        "pick another port in config.toml"
    )
    assert metrics["error"] in status["warnings"]


def test_a_config_reload_moves_and_stops_the_metrics_port(pki: Pki, isolated_home: Path) -> None:
    pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
    first, second = free_port(), free_port()

    def config(**top: Any) -> Path:
        return write_config(isolated_home / "config.toml", identities={"dev": {"renew": "none"}}, routes={}, **top)

    def reload(daemon: DaemonThread) -> None:
        assert daemon.daemon is not None
        asyncio.run_coroutine_threadsafe(daemon.daemon.reload_config(), daemon.loop).result(timeout=10)

    def refused(port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except ConnectionRefusedError:
            return True
        return False

    with DaemonThread(config(metrics_listen=f"127.0.0.1:{first}")) as daemon:
        assert scrape(first)[0] == 200
        config(metrics_listen=f"127.0.0.1:{second}")
        reload(daemon)
        assert scrape(second)[0] == 200
        assert refused(first)
        config()
        reload(daemon)
        assert refused(second)
        assert daemon.status()["daemon"]["metrics"] is None
        assert "mtls_sidecar_build_info" in daemon.client().get_text("/v1/metrics")  # the control API's stay


def test_another_os_user_is_refused_on_the_metrics_port(isolated_home: Path, pki: Pki) -> None:
    from tests.test_other_user import as_user, make_other_user

    other = make_other_user()
    port = free_port()
    config = write_config(
        isolated_home / "config.toml",
        identities={"dev": {"renew": "none"}},
        routes={},
        metrics_listen=f"127.0.0.1:{port}",
    )
    with DaemonThread(config) as daemon:
        answer = as_user(other, "127.0.0.1", str(port))
        assert answer in ("received 0", "error ConnectionResetError 104", "error OSError 107"), answer
        wait_until(lambda: daemon.status()["daemon"]["metrics"]["refused"] == 1, timeout=10, what="the refusal")
        assert scrape(port)[0] == 200  # the owner is served


def test_expiry_seconds_follow_the_certificate_not_the_clock_of_the_render(pki: Pki, isolated_home: Path) -> None:
    """render_status at a later `now` gives fewer seconds: the value is notAfter − now."""
    leaf = pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev", lifetime=timedelta(days=2))
    config = write_config(isolated_home / "config.toml", identities={"dev": {"renew": "none"}}, routes={})
    with DaemonThread(config) as daemon:
        status = daemon.status()
    now = datetime.now(UTC)
    later = now + timedelta(hours=1)
    at_now = value(parse(render_status(status, now))[1], "mtls_sidecar_certificate_expiry_seconds", identity="dev")
    at_later = value(parse(render_status(status, later))[1], "mtls_sidecar_certificate_expiry_seconds", identity="dev")
    assert at_now - at_later == pytest.approx(3600)
    assert at_now == (leaf.cert.not_valid_after_utc - now).total_seconds()


def test_a_proxy_rule_is_a_route_named_proxy_colon_rule_and_refusals_are_counted(
    isolated_home: Path, tmp_path: Path
) -> None:
    pki = Pki.create(tmp_path / "pki-svc", "svc.test")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
    with mtls_server(pki, mode="echo") as server:
        rule = {
            "name": "svc",
            "hosts": ["svc.test"],
            "ca_file": str(pki.server_ca_file),
            "connect": f"127.0.0.1:{server.port}",
        }
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={},
            proxy={"listen": "127.0.0.1:0", "rules": [rule]},
        )
        with DaemonThread(config) as daemon:
            port = int(daemon.status()["proxy"]["listen"].rsplit(":", 1)[1])
            assert connect_through(port, "svc.test:443", b"via the proxy\n") == (200, b"via the proxy\n")
            assert connect_through(port, "elsewhere.example:443", b"")[0] == 403
            wait_until(lambda: daemon.status()["proxy"]["refused"], timeout=10, what="the refusal")
            _, samples = parse(daemon.client().get_text("/v1/metrics"))
    assert value(samples, "mtls_sidecar_connections_total", route="proxy:svc") == 1
    # the echo, and the proxy's own "200 Connection established" before it
    assert value(samples, "mtls_sidecar_bytes_total", route="proxy:svc", direction="received") > len(b"via the proxy\n")
    assert value(samples, "mtls_sidecar_bytes_total", route="proxy:svc", direction="sent") >= len(b"via the proxy\n")
    assert value(samples, "mtls_sidecar_handshake_seconds_count", route="proxy:svc") == 1
    assert value(samples, "mtls_sidecar_proxy_connections_total") == 2
    assert value(samples, "mtls_sidecar_proxy_refused_total", cause="proxy_not_allowed") == 1


def connect_through(proxy_port: int, destination: str, data: bytes) -> tuple[int, bytes]:
    """HTTP CONNECT to `destination` through the proxy; then `data`, a half-close, and what comes back."""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as sock:
        sock.sendall(f"CONNECT {destination} HTTP/1.1\r\nHost: {destination}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            if not chunk:
                break
            head += chunk
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            return status, b""
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return status, recv_all(sock)


def control_get(daemon: DaemonThread, target: str, *, token: str | None = None) -> tuple[int, str, str]:
    """GET on the control transport as any client would send it: (status, content type, body)."""
    if daemon.transport == "tcp":
        record = json.loads(daemon.places.control_file.read_text())
        sock = socket.create_connection(("127.0.0.1", record["port"]), timeout=10)
        token = record["token"] if token is None else token
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(daemon.socket))
    authorization = f"Authorization: Bearer {token}\r\n" if token else ""
    with sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: localhost\r\n{authorization}Connection: close\r\n\r\n".encode())
        head, body = read_response(sock)
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ", 2)[1]), headers["content-type"], body.decode()


def test_v1_metrics_is_text_on_either_control_transport_and_needs_the_token_on_tcp(
    control_transport: str, isolated_home: Path
) -> None:
    config = write_config(isolated_home / "config.toml", identities={"dev": {"renew": "none"}}, routes={})
    with DaemonThread(config) as daemon:
        status, content_type, body = control_get(daemon, "/v1/metrics")
        assert (status, content_type) == (200, "text/plain; version=0.0.4; charset=utf-8")
        assert value(parse(body)[1], "mtls_sidecar_identity_usable", identity="dev") == 0  # an empty keystore
        refused = control_get(daemon, "/v1/metrics", token="") if control_transport == "tcp" else None
        posted = daemon.client()
        with pytest.raises(ApiCallError) as wrong_method:
            posted.post("/v1/metrics")
    if refused is not None:
        assert refused[:2] == (401, "application/json") and "control token" in refused[2]
    assert wrong_method.value.status == 405
