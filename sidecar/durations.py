"""How long something took, counted in fixed buckets (a histogram's data): pure, no clock inside.

A route's listener keeps one for its TLS handshakes; status shows `to_json()` and the metrics
(sidecar/metrics.py) turn that into a Prometheus histogram.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

# Upper bounds in seconds: a loopback handshake takes milliseconds, one across the world or to
# a server checking revocation takes a second or more.
HANDSHAKE_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Durations:
    """Observations counted in `bounds` (each counted in the first bucket whose bound is >= it)."""

    bounds: tuple[float, ...] = HANDSHAKE_BUCKETS
    counts: list[int] = field(default_factory=list)  # per bucket, the last one past every bound (+Inf)
    count: int = 0
    total: float = 0.0

    def __post_init__(self) -> None:
        if list(self.bounds) != sorted(set(self.bounds)) or not all(math.isfinite(b) for b in self.bounds):
            raise ValueError(f"bucket bounds must be finite and increasing, got {self.bounds}")
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.count += 1
        self.total += seconds

    def add(self, other: Durations) -> None:
        """Count `other`'s observations in here too (same bounds)."""
        if other.bounds != self.bounds:
            raise ValueError("cannot add durations counted in other buckets")
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.count += other.count
        self.total += other.total

    def to_json(self) -> dict[str, Any]:
        """{"count", "sum", "buckets": [[bound, observations <= bound], ..., ["+Inf", count]]} (cumulative)."""
        buckets: list[list[Any]] = []
        running = 0
        for bound, n in zip((*self.bounds, "+Inf"), self.counts, strict=True):
            running += n
            buckets.append([bound, running])
        return {"count": self.count, "sum": self.total, "buckets": buckets}
