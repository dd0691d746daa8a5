"""Pure helpers: percentiles, medians over repetitions, ratios against targets, the table."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any


def percentile(samples: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


# (column key, heading, digits, better): "high" or "low" is better.
COLUMNS: list[tuple[str, str, int, str]] = [
    ("t1_down_MBps", "T1 down MB/s", 0, "high"),
    ("t1_up_MBps", "T1 up MB/s", 0, "high"),
    ("t2_p50_ms", "T2 p50 ms", 2, "low"),
    ("t2_p99_ms", "T2 p99 ms", 2, "low"),
    ("t3_conn_per_s", "T3 conn/s", 0, "high"),
    ("t4_1k_held", "T4 1k held", 0, "high"),
    ("t4_1k_pss_mib", "T4 1k PSS MiB", 1, "low"),
    ("t4_10k_held", "T4 10k held", 0, "high"),
    ("t4_10k_pss_mib", "T4 10k PSS MiB", 1, "low"),
    ("t5_p50_us", "T5 p50 µs", 0, "low"),
    ("t5_p99_us", "T5 p99 µs", 0, "low"),
]


def summarise(reps: Sequence[dict[str, float]]) -> dict[str, float]:
    """Median of each figure over the repetitions."""
    keys = {k for rep in reps for k in rep}
    return {k: median([rep[k] for rep in reps if k in rep]) for k in sorted(keys)}


def table(rows: dict[str, dict[str, float]], order: Sequence[str]) -> str:
    """A Markdown table, one row per contender, in `order`."""
    head = "| | " + " | ".join(h for _, h, _, _ in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    lines = [head, rule]
    for name in order:
        if name not in rows:
            continue
        row = rows[name]
        cells = [fmt(row.get(key), digits) for key, _, digits, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_table(cpu: dict[str, dict[str, dict[str, float]]], order: Sequence[str]) -> str:
    """CPU use in % of one core per test: load generator, tunnel, backend (nginx + app)."""
    tests = ["t1_down", "t1_up", "t2", "t3", "t5"]
    head = "| | " + " | ".join(f"{t} load/tunnel/backend %" for t in tests) + " |"
    lines = [head, "|---|" + "---:|" * len(tests)]
    for name in order:
        if name not in cpu:
            continue
        cells = []
        for t in tests:
            c = cpu[name].get(t)
            cells.append("–" if not c else f"{c['load']:.0f} / {c['tunnel']:.0f} / {c['backend']:.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: dict[str, dict[str, float]], ours: str, peers: Sequence[str]) -> list[dict[str, Any]]:
    """The issue's targets, each with the figure, the bar and met / missed by how much."""
    present = [p for p in peers if p in rows]
    me = rows.get(ours, {})
    out: list[dict[str, Any]] = []

    def add(name: str, value: float, bar: float, higher_better: bool, against: str) -> None:
        if math.isnan(value) or math.isnan(bar):
            out.append({"target": name, "value": value, "bar": bar, "against": against, "met": None, "ratio": None})
            return
        met = value >= bar if higher_better else value <= bar
        ratio = value / bar if bar else math.nan
        out.append({"target": name, "value": value, "bar": bar, "against": against, "met": met, "ratio": ratio})

    def best(key: str) -> tuple[float, str]:
        vals = [(rows[p].get(key, math.nan), p) for p in present]
        vals = [v for v in vals if not math.isnan(v[0])]
        return max(vals) if vals else (math.nan, "none")

    for key, label in (
        ("t1_down_MBps", "T1 download ≥ 1.25× best peer"),
        ("t1_up_MBps", "T1 upload ≥ 1.25× best peer"),
    ):
        value, who = best(key)
        add(label, me.get(key, math.nan), 1.25 * value, True, f"1.25 × {who}")
    nginx = rows.get("nginx", {})
    stunnel = rows.get("stunnel", {})
    add("T2 p50 ≤ nginx", me.get("t2_p50_ms", math.nan), nginx.get("t2_p50_ms", math.nan), False, "nginx")
    add("T3 ≥ nginx", me.get("t3_conn_per_s", math.nan), nginx.get("t3_conn_per_s", math.nan), True, "nginx")
    add("T4 1k all held", me.get("t4_1k_held", math.nan), 1000.0, True, "1000")
    add("T4 1k PSS ≤ nginx", me.get("t4_1k_pss_mib", math.nan), nginx.get("t4_1k_pss_mib", math.nan), False, "nginx")
    add("T4 10k all held", me.get("t4_10k_held", math.nan), 10000.0, True, "10000")
    add("T5 p50 ≤ stunnel", me.get("t5_p50_us", math.nan), stunnel.get("t5_p50_us", math.nan), False, "stunnel")
    return out


def targets_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| target | mtls-sidecar | bar | verdict |", "|---|---:|---:|---|"]
    for t in rows:
        if t["met"] is None:
            verdict = "not measured"
        elif t["met"]:
            verdict = "met"
        else:
            verdict = f"missed ({t['ratio']:.2f}× the bar)"
        lines.append(f"| {t['target']} | {fmt(t['value'], 2)} | {fmt(t['bar'], 2)} ({t['against']}) | {verdict} |")
    return "\n".join(lines)
