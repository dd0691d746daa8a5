"""The WAN line: a new connection's time to the first echoed byte when the backend is far away.

Every tunnel dials the backend through `bench/delayrelay.py`, which holds each chunk DELAY each
way (default 10 ms: a 20 ms round trip) and puts back TCP's handshake round trip that loopback
makes free. The load client opens N connections one after another (a pause of 5 round trips
before each) and times each from `connect()` to the first echoed byte, as T2 does.

Rows: every selected tunnel; `mtls-sidecar (warm)`, the sidecar with `--preconnect 2` (only
when this tree's `tunnel` accepts that flag); `direct`, the load client speaking mTLS to the
backend itself through the relay (the floor for a client that does its own TLS); `plain-tcp`,
the client to the C server through a second relay, no TLS (2 round trips: TCP's and the echo's).

A cold tunnel pays 3 round trips (TCP's handshake, TLS 1.3's, the echo); a tunnel whose
connection is already connected and through the handshake should pay 1.

    python3 -m bench --tests wan [--quick] [--reps N] [--wan-delay-ms 10]
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import peers, procs, stats

TESTS = ("wan",)
ROOT = Path(__file__).resolve().parent.parent
WARM = "mtls-sidecar (warm)"
DIRECT = "direct"
WARM_ARGS = ("--preconnect=2",)
ROWS = ("mtls-sidecar", WARM, "stunnel", "haproxy", "nginx", "socat", "plain-tcp", DIRECT)
# A pause before each connection, in round trips: a warm connection used by the last client is
# replaced (3 round trips and some CPU) before the next client comes, as between the
# connections of a developer's tools. Every row gets the same pause.
GAP_ROUND_TRIPS = 5


def selected_rows(contenders: list[str], warm_ok: bool) -> list[str]:
    """The rows `--only` asks for: the warm sidecar comes with the sidecar, `direct` with
    `client-mtls` (the same client, here through the relay)."""
    chosen = set(contenders)
    want = {
        WARM: warm_ok and bool(chosen & {"mtls-sidecar", WARM}),
        DIRECT: bool(chosen & {DIRECT, "client-mtls"}),
    }
    return [row for row in ROWS if want.get(row, row in chosen)]


def preconnect_supported() -> bool:
    """Whether this tree's `mtls-sidecar tunnel` has `--preconnect` (being built alongside)."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "sidecar", "tunnel", "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--preconnect" in out.stdout


def figures(samples_ms: list[float], errors: int, delay_ms: float) -> dict[str, float]:
    """p50, p90 and the round trips the median implies."""
    p50 = stats.percentile(samples_ms, 50)
    return {
        "p50_ms": p50,
        "p90_ms": stats.percentile(samples_ms, 90),
        "min_ms": min(samples_ms) if samples_ms else math.nan,
        "round_trips": p50 / (2 * delay_ms),
        "errors": float(errors),
    }


def fresh(port: int, tls: peers.Files | None, count: int, gap_ms: float) -> dict[str, Any]:
    """The load generator's `fresh` test (T2's), in its own process."""
    cmd = [sys.executable, "-m", "bench.load", "fresh", "--port", str(port), "--count", str(count)]
    cmd += ["--gap-ms", str(gap_ms)]
    if tls is not None:
        cmd += ["--tls", str(tls.cert), str(tls.key), str(tls.server_ca)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"load fresh failed: {out.stderr.strip()[-800:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


class Wan:
    """One repetition's relays and the way to measure one row through them."""

    def __init__(self, args: Any, files: peers.Files, relay_tls: int, relay_app: int, folder: Path) -> None:
        self.args = args
        self.files = files
        self.relay_tls = relay_tls
        self.relay_app = relay_app
        self.folder = folder

    def measure(self, row: str) -> dict[str, float]:
        args = self.args
        if row == DIRECT:
            return self._load(self.relay_tls, self.files)
        if row == "plain-tcp":
            return self._load(self.relay_app, None)
        name = "mtls-sidecar" if row == WARM else row
        extra = (*args.sidecar_arg, *WARM_ARGS) if row == WARM else tuple(args.sidecar_arg)
        slug = row.replace(" ", "-").replace("(", "").replace(")", "")
        port = procs.free_port()
        env = {**os.environ, "MTLS_SIDECAR_HOME": str(self.folder / f"home-{slug}")}
        for item in args.sidecar_env if name == "mtls-sidecar" else ():
            key, _, value = item.partition("=")
            env[key] = value
        cmd = peers.peer_command(name, self.files, port, self.relay_tls, extra)
        with procs.process(cmd, port, self.folder / f"{slug}.log", env):
            # As for T1-T5, a moment to settle; long enough too for warm connections to be made
            # (each takes 3 round trips).
            time.sleep(max(0.2, 10 * 2 * args.wan_delay_ms / 1e3))
            return self._load(port, None)

    def _load(self, port: int, tls: peers.Files | None) -> dict[str, float]:
        args = self.args
        r = fresh(port, tls, args.wan_count, GAP_ROUND_TRIPS * 2 * args.wan_delay_ms)
        return figures(r["samples_ms"], r["errors"], args.wan_delay_ms)


def relay_command(listen: int, target: int, delay_ms: float) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.delayrelay",
        "--listen",
        str(listen),
        "--target",
        str(target),
        "--delay-ms",
        str(delay_ms),
    ]


def run(
    args: Any,
    tmp: Path,
    files: peers.Files,
    server_cert: Path,
    server_key: Path,
    client_ca: Path,
    backend_exe: Path,
) -> dict[str, Any]:
    """The WAN line for every selected row, `args.reps` times, a fresh backend and relays per
    repetition, the rows' order rotated by one place per repetition."""
    notes: list[str] = []
    warm_ok = preconnect_supported()
    if not warm_ok and "mtls-sidecar" in args.contenders:
        notes.append(f"{WARM} skipped: this tree's `mtls-sidecar tunnel` has no --preconnect")
        print(f"note: {notes[-1]}", file=sys.stderr)
    rows = selected_rows(args.contenders, warm_ok)
    raw: dict[str, list[dict[str, float]]] = {row: [] for row in rows}
    for rep in range(args.reps):
        folder = tmp / f"wan-rep{rep}"
        folder.mkdir()
        shift = rep % len(rows) if rows else 0
        order = rows[shift:] + rows[:shift]
        relay_tls, relay_app = procs.free_port(), procs.free_port()
        with (
            peers.backend(backend_exe, folder, server_cert, server_key, client_ca) as backend,
            procs.process(
                relay_command(relay_tls, backend.tls_port, args.wan_delay_ms), relay_tls, folder / "relay-tls.log"
            ),
            procs.process(
                relay_command(relay_app, backend.app_port, args.wan_delay_ms), relay_app, folder / "relay-app.log"
            ),
        ):
            wan = Wan(args, files, relay_tls, relay_app, folder)
            for row in order:
                print(f"wan rep {rep + 1}/{args.reps}: {row} …", file=sys.stderr, flush=True)
                try:
                    result = wan.measure(row)
                except Exception as exc:
                    print(f"  {row} failed: {exc}", file=sys.stderr)
                    result = {"failed": 1.0}
                print(f"  {json.dumps({k: round(v, 2) for k, v in result.items()})}", file=sys.stderr)
                raw[row].append(result)
    medians = {row: stats.summarise(reps) for row, reps in raw.items() if reps}
    for row in medians.values():  # the round trips of the median, not the median of round trips
        row["round_trips"] = row.get("p50_ms", math.nan) / (2 * args.wan_delay_ms)
    return {
        "delay_ms": args.wan_delay_ms,
        "gap_ms": GAP_ROUND_TRIPS * 2 * args.wan_delay_ms,
        "count": args.wan_count,
        "rows": rows,
        "notes": notes,
        "medians": medians,
        "raw": raw,
    }


def table(result: dict[str, Any], reps: int) -> str:
    """The WAN line as a Markdown table, rows in the bench's order, then any notes."""
    delay = result["delay_ms"]
    rtt = 2 * delay
    medians = result["medians"]
    floor = medians.get(DIRECT, {}).get("p50_ms", math.nan)
    lines = [
        f"WAN line: {delay:g} ms each way ({rtt:g} ms round trip), "
        f"{result['count']} new connections in sequence, medians of {reps}:",
        "",
        f"| | first echoed byte p50 ms | p90 ms | round trips (p50 / {rtt:g} ms) | vs direct | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        if row not in medians:
            continue
        m = medians[row]
        ratio = m.get("p50_ms", math.nan) / floor
        cells = [
            stats.fmt(m.get("p50_ms"), 2),
            stats.fmt(m.get("p90_ms"), 2),
            stats.fmt(m.get("round_trips"), 2),
            "–" if row == DIRECT or math.isnan(ratio) else f"{ratio:.2f}×",
            stats.fmt(m.get("errors"), 0),
        ]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += [f"\n{note}" for note in result["notes"]]
    return "\n".join(lines)
