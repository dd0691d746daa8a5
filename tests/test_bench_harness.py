"""The benchmark harness's pure parts: statistics, the tables, the peers' configs, and the protocol
lines' configs, output parsers and ratios (bench/README.md).

No timing of the contenders here: the benchmark itself runs only by hand, `python3 -m bench`.
The WAN line's delay relay is checked on real loopback sockets, its delay as a lower bound only.
"""

from __future__ import annotations

import json
import math
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import delayrelay, peers, pki, protocols, stats, wanline
from tests.waiting import wait_until

FILES = peers.Files(
    cert=Path("/b/client.crt"),
    key=Path("/b/client.key"),
    bundle=Path("/b/client-bundle.pem"),
    server_ca=Path("/b/server-ca.pem"),
    folder=Path("/b"),
)


def test_percentiles_are_nearest_rank() -> None:
    samples = [float(x) for x in range(1, 101)]
    assert stats.percentile(samples, 50) == 50
    assert stats.percentile(samples, 99) == 99
    assert stats.percentile([3.0], 99) == 3
    assert math.isnan(stats.percentile([], 50))


def test_summary_is_the_median_of_repetitions() -> None:
    reps = [{"t3_conn_per_s": 10.0}, {"t3_conn_per_s": 30.0}, {"t3_conn_per_s": 20.0, "t5_p50_us": 5.0}]
    assert stats.summarise(reps) == {"t3_conn_per_s": 20.0, "t5_p50_us": 5.0}


def test_targets_compare_with_the_right_peer() -> None:
    rows = {
        "mtls-sidecar": {"t1_down_MBps": 500.0, "t2_p50_ms": 0.5, "t3_conn_per_s": 100.0, "t5_p50_us": 90.0},
        "nginx": {"t1_down_MBps": 400.0, "t2_p50_ms": 0.7, "t3_conn_per_s": 200.0},
        "haproxy": {"t1_down_MBps": 450.0},
        "stunnel": {"t5_p50_us": 100.0},
    }
    by_name = {t["target"]: t for t in stats.targets(rows, "mtls-sidecar", ["nginx", "haproxy", "stunnel"])}
    t1 = by_name["T1 download ≥ 1.25× best peer"]
    assert t1["bar"] == 1.25 * 450 and t1["against"] == "1.25 × haproxy" and t1["met"] is False
    assert by_name["T2 p50 ≤ nginx"]["met"] is True
    assert by_name["T3 ≥ nginx"]["met"] is False and by_name["T3 ≥ nginx"]["ratio"] == 0.5
    assert by_name["T5 p50 ≤ stunnel"]["met"] is True
    assert by_name["T4 1k all held"]["met"] is None  # not measured
    table = stats.targets_table(list(by_name.values()))
    assert "| T3 ≥ nginx | 100.00 | 200.00 (nginx) | missed (0.50× the bar) |" in table


def test_table_has_a_row_per_contender_in_order() -> None:
    rows = {"nginx": {"t1_down_MBps": 1234.5}, "plain-tcp": {"t5_p50_us": 12.0}}
    lines = stats.table(rows, ["plain-tcp", "socat", "nginx"]).splitlines()
    assert lines[2].startswith("| plain-tcp |") and lines[3].startswith("| nginx | 1,234 |")
    assert len(lines) == 4


def test_every_peer_verifies_the_backend_and_presents_the_client_certificate() -> None:
    stunnel = peers.stunnel_config(FILES, 1, 2)
    assert "client = yes" in stunnel and "verifyChain = yes" in stunnel and "checkHost = localhost" in stunnel
    assert "cert = /b/client.crt" in stunnel and "CAfile = /b/server-ca.pem" in stunnel
    haproxy = peers.haproxy_config(FILES, 1, 2)
    assert "ssl crt /b/client-bundle.pem ca-file /b/server-ca.pem verify required" in haproxy
    assert "verifyhost localhost" in haproxy
    nginx = peers.nginx_tunnel_config(FILES, 1, 2)
    for directive in ("proxy_ssl on;", "proxy_ssl_verify on;", "proxy_ssl_name localhost;", "proxy_ssl_certificate "):
        assert directive in nginx
    socat = " ".join(peers.socat_command(FILES, 1, 2))
    assert "verify=1" in socat and "cafile=/b/server-ca.pem" in socat and "commonname=localhost" in socat
    sidecar = peers.sidecar_command(FILES, 1, 2, ("--workers=2",))
    assert sidecar[sidecar.index("--cacert") + 1] == "/b/server-ca.pem" and sidecar[-1] == "--workers=2"


def test_the_backend_requires_a_client_certificate(tmp_path: Path) -> None:
    conf = peers.nginx_backend_config(tmp_path, Path("s.crt"), Path("s.key"), Path("ca.pem"), 1, 2)
    assert "ssl_verify_client on;" in conf and "ssl_client_certificate ca.pem;" in conf
    assert "listen 127.0.0.1:1 ssl" in conf and "proxy_pass 127.0.0.1:2;" in conf


# --- the protocol lines (bench/protocols.py)

PGBENCH_OUT = """\
transaction type: <builtin: select only>
scaling factor: 10
query mode: simple
number of clients: 8
number of threads: 2
maximum number of tries: 1
duration: 5 s
number of transactions actually processed: 72345
number of failed transactions: 0 (0.000%)
latency average = 0.553 ms
initial connection time = 21.337 ms
tps = 14469.012345 (without initial connection time)
"""

WRK_OUT = """\
Running 5s test @ http://127.0.0.1:20001/
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   412.10us  300.00us   9.87ms   90.00%
    Req/Sec    19.95k     1.20k   22.00k    70.00%
  Latency Distribution
     50%  362.00us
     75%  450.00us
     90%  600.00us
     99%    2.52ms
  198765 requests in 5.00s, 40.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 3
Requests/sec:  39703.52
Transfer/sec:      8.00MB
"""


def test_pgbench_and_wrk_reports_are_read() -> None:
    pg = protocols.parse_pgbench(PGBENCH_OUT)
    assert pg == {"tps": 14469.012345, "latency_ms": 0.553, "transactions": 72345.0, "failed": 0.0}
    wrk = protocols.parse_wrk(WRK_OUT)
    assert wrk["req_per_s"] == 39703.52 and wrk["requests"] == 198765
    assert math.isclose(wrk["p50_ms"], 0.362) and wrk["p99_ms"] == 2.52
    assert wrk["non_2xx"] == 3 and wrk["errors"] == 3
    # wrk leaves out the error lines when there are none
    clean = protocols.parse_wrk("  10 requests in 1.00s, 1KB read\nRequests/sec:     10.00\n")
    assert clean["non_2xx"] == 0 and clean["errors"] == 0
    with pytest.raises(ValueError, match="no tps"):
        protocols.parse_pgbench("connection to server failed")


def test_postgres_wants_tls_with_a_client_certificate_from_tcp(tmp_path: Path) -> None:
    conf = protocols.postgres_settings(tmp_path, 5999)
    assert "ssl = on" in conf and f"ssl_ca_file = '{tmp_path}/client-ca.pem'" in conf
    assert "listen_addresses = '127.0.0.1'" in conf and "port = 5999" in conf
    assert protocols.postgres_hba().splitlines() == ["local all all trust", "hostssl all all 127.0.0.1/32 cert"]
    assert protocols.ROLE == pki.CLIENT_CN  # cert auth logs in as the certificate's CN


def test_pgbench_runs_select_only_three_ways() -> None:
    cmd = protocols.pgbench_command("/pg/pgbench", 7000, 15, connect_each=False)
    assert cmd[:2] == ["/pg/pgbench", "-n"] and "-S" in cmd and "-C" not in cmd
    assert cmd[cmd.index("-c") + 1] == "8" and cmd[cmd.index("-T") + 1] == "15" and cmd[-1] == "bench"
    assert "-C" in protocols.pgbench_command("/pg/pgbench", 7000, 15, connect_each=True)
    through_tunnel = protocols.pgbench_env({"PGSSLMODE": "require", "HOME": "/root"}, None)
    assert through_tunnel == {"HOME": "/root", "PGSSLMODE": "disable"}
    direct = protocols.pgbench_env({}, FILES)
    assert direct["PGSSLMODE"] == "verify-full" and direct["PGSSLCERT"] == "/b/client.crt"
    assert direct["PGSSLROOTCERT"] == "/b/server-ca.pem" and direct["PGHOSTADDR"] == "127.0.0.1"
    stunnel = peers.stunnel_config(FILES, 1, 2, protocol="pgsql")
    assert "protocol = pgsql" in stunnel and "verifyChain = yes" in stunnel and "checkHost = localhost" in stunnel
    assert "protocol" not in peers.stunnel_config(FILES, 1, 2)


def test_nginx_http_backend_and_proxy_are_the_same_mtls_as_the_route(tmp_path: Path) -> None:
    backend = protocols.nginx_http_backend_config(
        tmp_path, Path("s.crt"), Path("s.key"), Path("ca.pem"), 4443, as_root=False
    )
    assert "ssl_verify_client on;" in backend and "ssl_client_certificate ca.pem;" in backend
    assert "server_name localhost;" in backend and "default_server" in backend
    assert f"return 200 {json.dumps(protocols.BODY)};" in backend
    assert "load_module" not in backend and "user root;" not in backend
    proxy = protocols.nginx_http_proxy_config(FILES, tmp_path, 8080, 4443, as_root=True)
    assert proxy.startswith("user root;")
    for directive in (
        "proxy_pass https://backend;",
        "server 127.0.0.1:4443;",
        "keepalive 32;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_set_header Host localhost:4443;",
        "proxy_ssl_certificate /b/client.crt;",
        "proxy_ssl_certificate_key /b/client.key;",
        "proxy_ssl_trusted_certificate /b/server-ca.pem;",
        "proxy_ssl_verify on;",
        "proxy_ssl_name localhost;",
        "listen 127.0.0.1:8080",
    ):
        assert directive in proxy
    assert protocols.wrk_command(8080, 15)[-1] == "http://127.0.0.1:8080/"


def test_protocol_tables_and_ratios() -> None:
    medians = {
        "pg": {
            "mtls-sidecar": {"tps": 15000.0, "tps_C": 150.0},
            "stunnel": {"tps": 12000.0, "tps_C": 200.0},
            "direct": {"tps": 20000.0},
        },
        "http": {"mtls-sidecar": {"req_per_s": 10000.0}, "nginx": {"req_per_s": 40000.0, "p50_ms": 0.36}},
    }
    cpu = {"mtls-sidecar": {"pg": {"load": 13.0, "tunnel": 137.4, "server": 48.0}}, "direct": {"pg": {"load": 40.0}}}
    rows = {r["what"]: r for r in protocols.ratios(medians)}
    assert (
        rows["pgbench -S TPS, sidecar / stunnel"]["ratio"] == 1.25 and rows["pgbench -S TPS, sidecar / stunnel"]["met"]
    )
    assert rows["pgbench -S TPS, sidecar / direct"]["met"] is None  # no goal: reported only
    assert math.isnan(rows["pgbench -S -C TPS, sidecar / direct"]["ratio"])
    assert (
        rows["wrk requests/s, sidecar / nginx"]["ratio"] == 0.25
        and rows["wrk requests/s, sidecar / nginx"]["met"] is False
    )
    table = protocols.ratios_table(list(rows.values()))
    assert "| wrk requests/s, sidecar / nginx | 10,000 | 40,000 | 0.25× | ≥ 0.50× | missed |" in table
    assert "| pgbench -S -C TPS, sidecar / direct | 150 | – | – | – | not measured |" in table
    assert [r["what"] for r in protocols.ratios({"http": medians["http"]})] == ["wrk requests/s, sidecar / nginx"]
    pg = protocols.pg_table(medians["pg"], cpu).splitlines()
    assert pg[2].startswith("| mtls-sidecar (`--protocol postgres`) | 15,000 |") and "| 13 / 137 / 48 |" in pg[2]
    assert "| 40 / – / – |" in pg[4]  # direct: no tunnel
    http = protocols.http_table(medians["http"], {}).splitlines()
    assert len(http) == 4 and http[3].startswith("| nginx (HTTP → mTLS proxy) | 40,000 | 0.36 |")


# --- the WAN line's delay relay (bench/delayrelay.py), on real loopback sockets

DELAY = 0.03
# Lower bounds only (a busy machine is late, never early); this covers float rounding.
EARLY = 0.001


@pytest.fixture
def far_listener() -> Iterator[tuple[socket.socket, delayrelay.DelayRelay]]:
    """A listening socket and a relay in front of it adding DELAY each way."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)  # every accept and recv below has a deadline
        relay = delayrelay.DelayRelay(0, listener.getsockname()[1], DELAY)
        relay.start()
        try:
            yield listener, relay
        finally:
            relay.close()


def _recv_exactly(sock: socket.socket, size: int) -> tuple[bytes, float]:
    """`size` bytes (the socket's timeout is the deadline), and when the first of them came."""
    data = sock.recv(size)
    first = time.monotonic()
    while data and len(data) < size:
        part = sock.recv(size - len(data))
        if not part:
            break
        data += part
    return data, first


def _send_in_pieces(sock: socket.socket, data: bytes) -> float:
    started = time.monotonic()
    for i in range(0, len(data), 7):
        sock.sendall(data[i : i + 7])
    return started


def test_relay_delays_each_way_keeps_order_and_passes_a_half_close_late(
    far_listener: tuple[socket.socket, delayrelay.DelayRelay],
) -> None:
    listener, relay = far_listener
    numbered = b"".join(b"%04d," % i for i in range(1500))
    connected = time.monotonic()
    client = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    hello = b"hello before the server accepts"
    client.sendall(hello)
    server, _addr = listener.accept()
    server.settimeout(10)
    with client, server:
        # TCP's handshake round trip is put back: the server accepts 1.5 round trips after the
        # connect, and the client's first bytes reach it one more delay later.
        assert time.monotonic() - connected >= 3 * DELAY - EARLY
        got, first = _recv_exactly(server, len(hello))
        assert got == hello and first - connected >= 3 * DELAY - EARLY

        sent_at = _send_in_pieces(client, numbered)
        got, first = _recv_exactly(server, len(numbered))
        assert got == numbered  # order kept client → server
        assert first - sent_at >= DELAY - EARLY

        sent_at = _send_in_pieces(server, numbered[::-1])
        got, first = _recv_exactly(client, len(numbered))
        assert got == numbered[::-1]  # and server → client
        assert first - sent_at >= DELAY - EARLY

        # A half-close travels like data: late, and the other way stays open.
        closed_at = time.monotonic()
        client.shutdown(socket.SHUT_WR)
        assert server.recv(1) == b""
        assert time.monotonic() - closed_at >= DELAY - EARLY
        server.sendall(b"still open")
        assert _recv_exactly(client, 10)[0] == b"still open"
        closed_at = time.monotonic()
        server.shutdown(socket.SHUT_WR)
        assert client.recv(1) == b""
        assert time.monotonic() - closed_at >= DELAY - EARLY
    wait_until(lambda: relay.links_done == 1, what="the relay to close both sides")


def test_relay_carries_many_connections_at_once(far_listener: tuple[socket.socket, delayrelay.DelayRelay]) -> None:
    listener, relay = far_listener
    clients = [socket.create_connection(("127.0.0.1", relay.port), timeout=10) for _ in range(20)]
    servers = [listener.accept()[0] for _ in clients]
    for i, client in enumerate(clients):
        client.sendall(b"%02d" % i)
    # Each server side holds one client's bytes; which is which depends on accept order.
    seen = set()
    for server in servers:
        server.settimeout(10)
        seen.add(_recv_exactly(server, 2)[0])
        server.close()
    assert seen == {b"%02d" % i for i in range(20)}
    for client in clients:
        client.settimeout(10)
        assert client.recv(1) == b""  # each server's close reached its client
        client.close()
    wait_until(lambda: relay.links_done == 20, what="the relay to close every link")


def test_wan_rows_and_table() -> None:
    assert wanline.selected_rows(["stunnel", "mtls-sidecar", "client-mtls"], warm_ok=True) == [
        "mtls-sidecar",
        wanline.WARM,
        "stunnel",
        wanline.DIRECT,
    ]
    assert wanline.WARM not in wanline.selected_rows(["mtls-sidecar"], warm_ok=False)
    assert wanline.figures([60.0, 62.0, 64.0], 1, 10.0) == {
        "p50_ms": 62.0,
        "p90_ms": 64.0,
        "min_ms": 60.0,
        "round_trips": 3.1,
        "errors": 1.0,
    }
    result = {
        "delay_ms": 10.0,
        "count": 30,
        "rows": ["mtls-sidecar", wanline.WARM, wanline.DIRECT],
        "notes": ["a note"],
        "medians": {
            "mtls-sidecar": {"p50_ms": 64.0, "p90_ms": 65.0, "round_trips": 3.2, "errors": 0.0},
            wanline.WARM: {"p50_ms": 22.0, "p90_ms": 23.0, "round_trips": 1.1, "errors": 0.0},
            wanline.DIRECT: {"p50_ms": 64.0, "p90_ms": 66.0, "round_trips": 3.2, "errors": 0.0},
        },
    }
    lines = wanline.table(result, 1).splitlines()
    assert lines[0].startswith("WAN line: 10 ms each way (20 ms round trip), 30 new connections")
    assert "round trips (p50 / 20 ms)" in lines[2]
    assert lines[4] == "| mtls-sidecar | 64.00 | 65.00 | 3.20 | 1.00× | 0 |"
    assert lines[5] == "| mtls-sidecar (warm) | 22.00 | 23.00 | 1.10 | 0.34× | 0 |"
    assert lines[6] == "| direct | 64.00 | 66.00 | 3.20 | – | 0 |"
    assert lines[-1] == "a note"
    relay = wanline.relay_command(2001, 2002, 10.0)
    assert relay[2:] == ["bench.delayrelay", "--listen", "2001", "--target", "2002", "--delay-ms", "10.0"]
