"""Side-by-side mTLS tunnel benchmark: mtls-sidecar vs stunnel, haproxy, nginx stream, socat;
the protocol lines (bench/protocols.py): pgbench through a postgres route vs stunnel
`protocol = pgsql` vs libpq's own TLS, wrk through an http route vs nginx as HTTP → mTLS proxy;
the proxy line (bench/proxyline.py); and the WAN line (bench/wanline.py): a new connection's
first echoed byte through every tunnel when the backend is 10 ms away each way.

    python3 -m bench [--quick] [--reps N] [--only NAME,...] [--tests t1,t2,t3,t4,t5,pg,http,proxy,wan]

Loopback only. Installs nothing: names the missing programs and their apt packages. Each
repetition restarts the backend and every contender, in an order rotated per repetition.
Writes bench/results/<time>.json (and latest.json) and prints the tables for the README.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import peers, pki, procs, protocols, proxyline, stats, wanline
from bench.procs import free_port, process, raise_nofile

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
CONTENDERS = (*peers.PEERS, *peers.SIDECAR_VARIANTS, *peers.LIMITS)
# socat forks a process (with its own TLS state) per connection: 10,000 of them is not a
# test of a tunnel but of the machine's process table.
SKIP_10K = {"socat"}
# Like nginx's `worker_processes auto` on this 2-core box; and room for T4's 10,000 held connections
# (the tunnel refuses more than 1,000 per process unless told otherwise).
DEFAULT_SIDECAR_ARGS = ["--workers=2", "--max-concurrent-conns=20000"]


def make_pki(folder: Path) -> tuple[peers.Files, Path, Path, Path]:
    """Certificates and keys made now, kept in the run's temporary `folder` only."""
    made = pki.make(folder, peers.SERVER_NAME)
    files = peers.Files(
        cert=made.client_cert, key=made.client_key, bundle=made.client_bundle, server_ca=made.server_ca, folder=folder
    )
    return files, made.server_cert, made.server_key, made.client_ca


class Bench:
    def __init__(self, args: argparse.Namespace, files: peers.Files, backend_tls: int, backend_pids: list[int]) -> None:
        self.args = args
        self.files = files
        self.backend_tls = backend_tls
        self.backend_pids = backend_pids

    def load(self, test: str, port: int, tls: bool, *extra: str) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "bench.load", test, "--port", str(port), *extra]
        if tls:
            cmd += ["--tls", str(self.files.cert), str(self.files.key), str(self.files.server_ca)]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"load {test} failed: {out.stderr.strip()[-800:]}")
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        return result

    def measured(
        self, test: str, port: int, tls: bool, tunnel: list[int], *extra: str
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """Run one load, with the CPU of the tunnel and backend over the same wall time."""
        t_tree = [p for pid in tunnel for p in procs.tree(pid)]
        b_tree = [p for pid in self.backend_pids for p in procs.tree(pid)]
        t0, b0, w0 = procs.cpu_seconds(t_tree), procs.cpu_seconds(b_tree), time.perf_counter()
        result = self.load(test, port, tls, *extra)
        wall = time.perf_counter() - w0
        t_tree = sorted(set(t_tree) | {p for pid in tunnel for p in procs.tree(pid)})
        cpu = {
            "load": 100 * result["cpu_s"] / result["wall_s"],
            "tunnel": 100 * (procs.cpu_seconds(t_tree) - t0) / wall,
            "backend": 100 * (procs.cpu_seconds(b_tree) - b0) / wall,
        }
        return result, cpu

    def hold(self, port: int, tls: bool, tunnel: list[int], count: int) -> tuple[int, float]:
        cmd = [sys.executable, "-m", "bench.load", "hold", "--port", str(port), "--count", str(count)]
        cmd += ["--timeout", str(self.args.hold_timeout)]
        if tls:
            cmd += ["--tls", str(self.files.cert), str(self.files.key), str(self.files.server_ca)]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdin is not None and proc.stdout is not None
        line = proc.stdout.readline()
        held = int(json.loads(line)["held"]) if line else 0
        time.sleep(0.5)  # let the last connections settle into their steady state
        pss = procs.pss_kib([p for pid in tunnel for p in procs.tree(pid)]) / 1024 if tunnel else math.nan
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.communicate(timeout=120)
        return held, pss

    def run_contender(self, name: str, rep_folder: Path) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        args = self.args
        figures: dict[str, float] = {}
        cpu: dict[str, dict[str, float]] = {}
        if name in peers.LIMITS:
            port = self.backend_tls if name == "client-mtls" else args.app_port
            tls = name == "client-mtls"
            return self._tests(name, port, tls, [], figures, cpu)
        port = free_port()
        env = {**os.environ, "MTLS_SIDECAR_HOME": str(rep_folder / "sidecar-home")}
        for item in args.sidecar_env:
            key, _, value = item.partition("=")
            if name.startswith("mtls-sidecar"):
                env[key] = value
        flags = tuple(args.sidecar_arg)
        peer = name
        if name in peers.SIDECAR_VARIANTS:
            extra, replace, variant_env = peers.SIDECAR_VARIANTS[name]
            flags = extra if replace else (*flags, *extra)
            env.update(variant_env)
            peer = "mtls-sidecar"
        cmd = peers.peer_command(peer, self.files, port, self.backend_tls, flags)
        with process(cmd, port, rep_folder / f"{name}.log", env) as proc:
            time.sleep(0.2)
            return self._tests(name, port, False, [proc.pid], figures, cpu)

    def _tests(
        self,
        name: str,
        port: int,
        tls: bool,
        tunnel: list[int],
        figures: dict[str, float],
        cpu: dict[str, dict[str, float]],
    ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        args = self.args
        if "t1" in args.tests:
            r, cpu["t1_down"] = self.measured("download", port, tls, tunnel, "--size", str(args.size))
            figures["t1_down_MBps"] = r["MBps"]
            r, cpu["t1_up"] = self.measured("upload", port, tls, tunnel, "--size", str(args.size))
            figures["t1_up_MBps"] = r["MBps"]
        if "t2" in args.tests:
            r, cpu["t2"] = self.measured("fresh", port, tls, tunnel, "--count", str(args.fresh))
            figures["t2_p50_ms"] = stats.percentile(r["samples_ms"], 50)
            figures["t2_p99_ms"] = stats.percentile(r["samples_ms"], 99)
            figures["t2_errors"] = r["errors"]
        if "t3" in args.tests:
            r, cpu["t3"] = self.measured("rate", port, tls, tunnel, "--seconds", str(args.rate_seconds))
            figures["t3_conn_per_s"] = r["per_s"]
            figures["t3_errors"] = r["errors"]
        if "t5" in args.tests:
            r, cpu["t5"] = self.measured("rtt", port, tls, tunnel, "--count", str(args.rtt))
            figures["t5_p50_us"] = stats.percentile(r["samples_us"], 50)
            figures["t5_p99_us"] = stats.percentile(r["samples_us"], 99)
        if "t4" in args.tests:
            for count, key in ((1000, "1k"), (10000, "10k")):
                if count > args.max_held or (count > 1000 and name in SKIP_10K):
                    continue
                held, pss = self.hold(port, tls, tunnel, count)
                figures[f"t4_{key}_held"] = held
                figures[f"t4_{key}_pss_mib"] = pss
                time.sleep(1)  # let the closes drain before the next load
        return figures, cpu


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "uvloop": importlib.util.find_spec("uvloop") is not None,
        "load_avg_at_start": os.getloadavg(),
        "versions": {
            "nginx": version(["nginx", "-v"]),
            "haproxy": version(["haproxy", "-v"]),
            "stunnel": version(["sh", "-c", "stunnel4 -version 2>&1 | grep -m1 '^stunnel'"]),
            "socat": version(["socat", "-V"])[:0] or version(["sh", "-c", "socat -V | sed -n 2p"]),
            "openssl": version(["openssl", "version"]),
            "postgres": version(["sh", "-c", "/usr/lib/postgresql/*/bin/postgres --version"]),
            "wrk": version(["wrk", "-v"]),
        },
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="256 MiB bulk, 1 repetition, 1,000 held, 5 s pgbench/wrk, shorter runs"
    )
    parser.add_argument("--reps", type=int, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument("--only", help="comma-separated contenders (default: all)")
    parser.add_argument(
        "--tests",
        default="t1,t2,t3,t4,t5,pg,http,proxy,wan",
        help="comma-separated tests (default: all): t1-t5 (tunnels), pg (pgbench), http (wrk), proxy (proxy vs route),"
        " wan (new connections through a delay)",
    )
    parser.add_argument("--size-mib", type=int, help="T1 bytes per direction (default 1024; 256 with --quick)")
    parser.add_argument("--max-held", type=int, help="largest T4 count to try (default 10000; 1000 with --quick)")
    parser.add_argument(
        "--sidecar-arg",
        action="append",
        help=f"extra flag for `mtls-sidecar tunnel`, as --sidecar-arg=--flag=value (default {DEFAULT_SIDECAR_ARGS})",
    )
    parser.add_argument("--sidecar-env", action="append", default=[], help="KEY=VALUE for the sidecar's environment")
    parser.add_argument(
        "--wan-delay-ms", type=float, default=10.0, help="wan: delay each way (default 10: a 20 ms round trip)"
    )
    parser.add_argument("--label", default="", help="a word stored in the JSON (e.g. the lever tried)")
    args = parser.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 3)
    args.size = (args.size_mib or (256 if args.quick else 1024)) << 20
    args.max_held = args.max_held if args.max_held is not None else (1000 if args.quick else 10000)
    args.fresh = 500
    args.rtt = 2000
    args.rate_seconds = 3.0 if args.quick else 5.0
    args.hold_timeout = 60.0
    args.pg_seconds = 5 if args.quick else 15
    args.http_seconds = 5 if args.quick else 15
    args.wan_count = 30 if args.quick else 100  # each costs ~3 round trips plus a pause of 5
    args.tests = set(args.tests.split(","))
    unknown_tests = args.tests - {*TUNNEL_TESTS, *protocols.TESTS, *proxyline.TESTS, *wanline.TESTS}
    if unknown_tests:
        parser.error(f"unknown test(s) {', '.join(sorted(unknown_tests))}")
    args.sidecar_arg = DEFAULT_SIDECAR_ARGS if args.sidecar_arg is None else args.sidecar_arg
    extra_names = (*protocols.PG_CONTENDERS, wanline.WARM, wanline.DIRECT)
    names = [*CONTENDERS, *dict.fromkeys(n for n in extra_names if n not in CONTENDERS)]
    args.contenders = args.only.split(",") if args.only else list(CONTENDERS)
    unknown = set(args.contenders) - set(names)
    if unknown:
        parser.error(f"unknown contender(s) {', '.join(sorted(unknown))}; choose from {', '.join(names)}")
    return args


TUNNEL_TESTS = ("t1", "t2", "t3", "t4", "t5")


def missing_programs(tests: set[str]) -> list[str]:
    """What the chosen tests need and is not installed, each with its apt package."""
    missing = peers.missing_programs() if tests & {*TUNNEL_TESTS, *wanline.TESTS} else []
    proto_tests = tests | ({"http"} if "proxy" in tests else set())  # the proxy line uses the http line's parts
    return [*missing, *(m for m in protocols.missing_programs(proto_tests) if m not in missing)]


def tunnel_lines(
    args: argparse.Namespace,
    tmp: Path,
    files: peers.Files,
    server_cert: Path,
    server_key: Path,
    client_ca: Path,
    backend_exe: Path,
) -> tuple[dict[str, list[dict[str, float]]], dict[str, list[dict[str, dict[str, float]]]]]:
    """T1-T5 for every contender, `args.reps` times, a fresh backend per repetition."""
    contenders = [c for c in args.contenders if c in CONTENDERS]
    raw: dict[str, list[dict[str, float]]] = {c: [] for c in contenders}
    cpu_raw: dict[str, list[dict[str, dict[str, float]]]] = {c: [] for c in contenders}
    if not contenders:
        return raw, cpu_raw
    for rep in range(args.reps):
        rep_folder = tmp / f"rep{rep}"
        rep_folder.mkdir()
        shift = rep % len(contenders)
        order = contenders[shift:] + contenders[:shift]
        with peers.backend(backend_exe, rep_folder, server_cert, server_key, client_ca) as backend:
            args.app_port = backend.app_port
            bench = Bench(args, files, backend.tls_port, backend.pids)
            for name in order:
                print(f"rep {rep + 1}/{args.reps}: {name} …", file=sys.stderr, flush=True)
                try:
                    figures, cpu = bench.run_contender(name, rep_folder)
                except Exception as exc:
                    print(f"  {name} failed: {exc}", file=sys.stderr)
                    figures, cpu = {"failed": 1.0}, {}
                print(f"  {json.dumps({k: round(v, 2) for k, v in figures.items()})}", file=sys.stderr)
                raw[name].append(figures)
                cpu_raw[name].append(cpu)
    return raw, cpu_raw


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_programs(args.tests)
    if missing:
        print("missing: " + "; ".join(missing), file=sys.stderr)
        packages = sorted({m.rsplit("(apt package ", 1)[1].rstrip(")") for m in missing})
        print("install them with: apt-get install -y --no-install-recommends " + " ".join(packages), file=sys.stderr)
        return 2
    raise_nofile()
    started = datetime.now(UTC)
    info = machine()
    raw: dict[str, list[dict[str, float]]] = {}
    cpu_raw: dict[str, list[dict[str, dict[str, float]]]] = {}
    proto: dict[str, Any] | None = None
    proxy: dict[str, Any] | None = None
    wan: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="mtls-bench-") as tmp_name:
        tmp = Path(tmp_name)
        files, server_cert, server_key, client_ca = make_pki(tmp)
        backend_exe = peers.build_backend(tmp) if args.tests & {*TUNNEL_TESTS, *wanline.TESTS} else None
        if backend_exe and args.tests & set(TUNNEL_TESTS):
            raw, cpu_raw = tunnel_lines(args, tmp, files, server_cert, server_key, client_ca, backend_exe)
        if args.tests & set(protocols.TESTS):
            proto = protocols.run(args, files, server_cert, server_key, client_ca)
        if args.tests & set(proxyline.TESTS):
            proxy = proxyline.run(args, files, server_cert, server_key, client_ca)
        if backend_exe and args.tests & set(wanline.TESTS):
            wan = wanline.run(args, tmp, files, server_cert, server_key, client_ca, backend_exe)
    rows = {name: stats.summarise(reps) for name, reps in raw.items() if reps}
    cpu_rows = {
        name: {test: stats.summarise([r[test] for r in reps if test in r]) for test in {t for r in reps for t in r}}
        for name, reps in cpu_raw.items()
    }
    checks = stats.targets(rows, "mtls-sidecar", [p for p in peers.PEERS if p != "mtls-sidecar"]) if rows else []
    report = {
        "started": started.isoformat(),
        "label": args.label,
        "quick": args.quick,
        "reps": args.reps,
        "tests": sorted(args.tests),
        "size_bytes": args.size,
        "sidecar_args": args.sidecar_arg,
        "sidecar_env": args.sidecar_env,
        "machine": info,
        "load_avg_at_end": os.getloadavg(),
        "medians": rows,
        "cpu_percent_medians": cpu_rows,
        "targets": checks,
        "raw": raw,
        "cpu_raw": cpu_raw,
        "protocols": proto,
        "proxy": proxy,
        "wan": wan,
    }
    RESULTS.mkdir(exist_ok=True)
    text = json.dumps(report, indent=2, default=str) + "\n"
    (RESULTS / f"{started:%Y%m%dT%H%M%SZ}{'-' + args.label if args.label else ''}.json").write_text(text)
    (RESULTS / "latest.json").write_text(text)
    if rows:
        print(stats.table(rows, args.contenders))
        print()
        print(stats.cpu_table(cpu_rows, args.contenders))
        print()
        print(stats.targets_table(checks))
        print()
    if proto is not None:
        print(protocols.tables(proto, args.reps))
    if proxy is not None:
        print(proxyline.table(proxy, args.reps))
    if wan is not None:
        print(wanline.table(wan, args.reps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
