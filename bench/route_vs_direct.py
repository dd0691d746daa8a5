"""Bulk download through `mtls-sidecar tunnel` vs. curl speaking mTLS to nginx directly.

    python3 bench/route_vs_direct.py [--size-mib 1024] [--runs 3]

Loopback only. Prints MB/s (medians) and writes bench/results/route_vs_direct.json. The
full side-by-side benchmark against stunnel, haproxy, nginx stream and socat is the
performance issue's; this is the quick check the core issue asks for.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.realservers import free_port, nginx_mtls, wait_for_port
from tests.scenario import Pki


def curl_speed(url: str, *extra: str) -> float:
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{speed_download} %{size_download}", *extra, url],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout.split()
    return float(out[0]) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mtls-bench-") as tmp_name:
        tmp = Path(tmp_name)
        pki = Pki.create(tmp / "pki")
        leaf = pki.client_ca.client("bench")
        cert, key = leaf.write_pair(tmp / "client", "bench")
        with nginx_mtls(
            tmp / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.client_ca_file
        ) as nginx:
            data = nginx.data_dir / "blob"
            with open(data, "wb") as fh:
                fh.truncate(args.size_mib << 20)
            port = free_port()
            tunnel = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sidecar",
                    "tunnel",
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--target",
                    f"127.0.0.1:{nginx.port}",
                    "--cert",
                    str(cert),
                    "--key",
                    str(key),
                    "--cacert",
                    str(pki.server_ca_file),
                    "--server-name",
                    "localhost",
                    "--log-level",
                    "warning",
                ],
                env={**os.environ, "MTLS_SIDECAR_HOME": str(tmp / "home")},
            )
            try:
                wait_for_port("127.0.0.1", port, 20, proc=tunnel)
                direct, routed = [], []
                for _ in range(args.runs):  # alternate, so drift hits both alike
                    direct.append(
                        curl_speed(
                            f"https://127.0.0.1:{nginx.port}/bytes/blob",
                            "--cacert",
                            str(pki.server_ca_file),
                            "--cert",
                            str(cert),
                            "--key",
                            str(key),
                            "--resolve",
                            f"localhost:{nginx.port}:127.0.0.1",
                        )
                    )
                    routed.append(curl_speed(f"http://127.0.0.1:{port}/bytes/blob"))
            finally:
                tunnel.send_signal(signal.SIGTERM)
                tunnel.wait(timeout=30)
    result = {
        "size_mib": args.size_mib,
        "runs": args.runs,
        "direct_mtls_curl_MBps": direct,
        "through_route_MBps": routed,
        "median_direct": statistics.median(direct),
        "median_route": statistics.median(routed),
        "ratio_route_to_direct": statistics.median(routed) / statistics.median(direct),
        "machine": f"{os.cpu_count()} cores, Python {sys.version.split()[0]}",
    }
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "route_vs_direct.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
