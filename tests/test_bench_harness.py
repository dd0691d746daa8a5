"""The benchmark harness's pure parts: statistics, the tables, the peers' configs (bench/README.md).

No timing here: the benchmark itself runs only by hand, `python3 -m bench`.
"""

from __future__ import annotations

import math
from pathlib import Path

from bench import peers, stats

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
