"""`preconnect`: connections to a route's target made ahead, so a local client is joined at once.

A warm connection has done what every new connection does before its first byte: TCP connect,
the protocol's own prelude (PostgreSQL's SSLRequest), the mTLS handshake and the route's checks
(pins, URI SANs, revocation). A local client that connects takes one (`take`), and the pool
makes a replacement in the background (`fill`). A warm connection is used once, and never
stale: `take` asks the listener whether it is still what a new connection would be now (same
route settings, same TLS context, which is per credential and trust) and drops it otherwise;
the daemon also empties the pool (`invalidate`) when an identity switches, a certificate
renews or trust files change, so the replacements come at once. One that waited longer than
`preconnect_max_idle` (below servers' idle timeouts) is dropped and replaced.

`preconnect = "auto"` keeps as many warm as local clients arrived in the busiest second of the
last `preconnect_max_idle` seconds (at most `AUTO_MAX`), and none once no client came for that
long. Failing to warm never fails a client: it backs off (1 s, doubling to 60 s) and clients
connect the usual way meanwhile. This module holds the policy and the bookkeeping; the
listener makes and joins the connections (`sidecar.tunnel`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("sidecar.tunnel")

AUTO = "auto"
AUTO_MAX = 8  # warm connections at most in auto mode
MAX_PRECONNECT = 64
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0


class WarmSide(Protocol):
    """A connection being warmed or ready (`sidecar.tunnel`'s local side without its client yet)."""

    warm_since: float

    def close(self) -> None: ...


class WarmPool:
    def __init__(
        self,
        size: int | str,
        max_idle: float,
        make: Callable[[], WarmSide],
        stale: Callable[[WarmSide], str | None],
        *,
        name: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.size = size  # a number, or AUTO
        self.max_idle = max_idle
        self._make = make
        self._stale = stale  # why a ready side may not be used now, or None
        self.name = name
        self._clock = clock
        self.ready: deque[WarmSide] = deque()
        self.warming: set[WarmSide] = set()
        self.hits = 0
        self.misses = 0
        self.dropped: Counter[str] = Counter()  # by reason
        self.last_error: str | None = None
        self._failures = 0  # in a row
        self._retry_at = 0.0
        self._arrivals: deque[float] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False

    # --- what the listener asks

    def take(self) -> WarmSide | None:
        """A ready connection for a local client that just connected, or None (it connects the usual way)."""
        now = self._clock()
        self._arrivals.append(now)
        self._forget_arrivals(now)
        found = None
        while self.ready:
            side = self.ready.popleft()
            why = "idle too long" if now - side.warm_since >= self.max_idle else self._stale(side)
            if why is None:
                found = side
                break
            self._drop(side, why)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        self.fill()
        return found

    def target(self) -> int:
        """How many warm connections to keep now."""
        if self.size != AUTO:
            return int(self.size)
        now = self._clock()
        self._forget_arrivals(now)
        if not self._arrivals:
            return 0
        per_second = Counter(int(t) for t in self._arrivals)
        return min(AUTO_MAX, max(per_second.values()))

    def fill(self) -> None:
        """Start as many new warm connections as the target wants (unless backing off)."""
        if self.closed or self._clock() < self._retry_at:
            return
        for _ in range(self.target() - len(self.ready) - len(self.warming)):
            side = self._make()
            self.warming.add(side)
        self._schedule()

    def invalidate(self, reason: str) -> None:
        """Drop every warm connection (identity, certificate, trust or settings changed) and refill."""
        sides = [*self.ready, *self.warming]
        self.ready.clear()
        self.warming.clear()
        for side in sides:
            self._drop(side, reason)
        self._retry_at = 0.0
        self.fill()

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        sides = [*self.ready, *self.warming]
        self.ready.clear()
        self.warming.clear()
        for side in sides:
            side.close()

    # --- what a warm side tells

    def became_ready(self, side: WarmSide) -> None:
        self.warming.discard(side)
        if self.closed:
            side.close()
            return
        side.warm_since = self._clock()
        self.ready.append(side)
        if self._failures:
            log.info("%s: warm connections work again", self.name)
        self._failures = 0
        self.last_error = None
        self._schedule()

    def failed(self, side: WarmSide, message: str) -> None:
        """Warming failed: no client saw it; back off before the next try."""
        self.warming.discard(side)
        self._failures += 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self._failures - 1))
        self._retry_at = self._clock() + delay
        if self.last_error != message:
            log.info("%s: could not make a warm connection (%s); clients connect the usual way", self.name, message)
        self.last_error = message
        if not self.closed:
            asyncio.get_running_loop().call_later(delay, self.fill)

    def gone(self, side: WarmSide) -> None:
        """A warm side closed by itself (the server hung up, or it was refused)."""
        if side in self.warming:
            self.warming.discard(side)
        elif side in self.ready:
            self.ready.remove(side)
            self.dropped["closed by the server"] += 1
            if self._clock() - side.warm_since < self.max_idle / 2:
                # A server that closes connections soon after the handshake (it wants the client to
                # speak first, or limits idle ones): warming there would be a loop. Back off.
                self.failed(side, "the server closed a warm connection soon after the handshake")
            else:
                self.fill()

    # --- status

    def status(self) -> dict[str, Any]:
        return {
            "preconnect": self.size,
            "target": self.target(),
            "ready": len(self.ready),
            "warming": len(self.warming),
            "hits": self.hits,
            "misses": self.misses,
            "dropped": dict(self.dropped),
            "max_idle": self.max_idle,
            "last_error": self.last_error,
        }

    # --- internals

    def _drop(self, side: WarmSide, reason: str) -> None:
        self.dropped[reason] += 1
        side.close()

    def _forget_arrivals(self, now: float) -> None:
        while self._arrivals and now - self._arrivals[0] > self.max_idle:
            self._arrivals.popleft()

    def _schedule(self) -> None:
        """One timer: at the oldest ready side's expiry (or, in auto mode, when arrivals age out)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.closed or not (self.ready or (self.size == AUTO and self._arrivals)):
            return
        now = self._clock()
        due = [side.warm_since + self.max_idle for side in self.ready]
        if self.size == AUTO and self._arrivals:
            due.append(self._arrivals[0] + self.max_idle)
        self._timer = asyncio.get_running_loop().call_later(max(0.0, min(due) - now) + 0.01, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self._clock()
        for side in [s for s in self.ready if now - s.warm_since >= self.max_idle]:
            self.ready.remove(side)
            self._drop(side, "idle too long")
        excess = len(self.ready) + len(self.warming) - self.target()
        while excess > 0 and self.ready:  # auto mode: fewer wanted now
            self._drop(self.ready.pop(), "not needed")
            excess -= 1
        self.fill()
