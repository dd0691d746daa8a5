"""When to renew: pure functions of the certificate's dates, the policy and `now`.

The scheduler only waits and calls; every decision about time is made here, so it can be
tested with a table and an injected clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

DEFAULT_FRACTION = 2 / 3
JITTER_FRACTION = 1 / 20
# Longest single wait: a monotonic timer does not advance while a laptop sleeps, so waits
# are re-planned against the wall clock at least this often.
MAX_WAIT = timedelta(hours=1)
# Failure back-off: 1 min, 10 min, 100 min, then hourly.
BACKOFF = (timedelta(minutes=1), timedelta(minutes=10), timedelta(minutes=100))
BACKOFF_AFTER = timedelta(hours=1)
DEFAULT_PRUNE_AFTER = timedelta(days=7)
# A wall clock that moved this much more (or less) than the monotonic clock jumped.
CLOCK_JUMP_THRESHOLD = timedelta(seconds=5)


@dataclass(frozen=True)
class RenewalPolicy:
    """`fraction` of the lifetime, or `before` expiry; jitter moves renewal earlier, never later.

    Read from an identity's `renew_at`, `renew_before` and `prune_after` by
    `sidecar.renewal.settings.parse_timing` when the config is loaded.
    """

    fraction: float = DEFAULT_FRACTION
    before: timedelta | None = None
    jitter_fraction: float = JITTER_FRACTION
    prune_after: timedelta = DEFAULT_PRUNE_AFTER


@dataclass(frozen=True)
class RenewalTimes:
    renew_at: datetime  # when renewal is due
    recheck_at: datetime  # when the scheduler should look again (≤ renew_at, ≤ now + MAX_WAIT)

    def due(self, now: datetime) -> bool:
        return now >= self.renew_at


def renewal_time(
    not_before: datetime, not_after: datetime, now: datetime, policy: RenewalPolicy, jitter_unit: float
) -> RenewalTimes:
    """When to renew a certificate valid from `not_before` to `not_after`.

    `jitter_unit` in [0, 1) comes from the caller's random source, so this stays pure; the
    jitter (up to `jitter_fraction` of the lifetime) only ever makes renewal earlier.
    """
    lifetime = not_after - not_before
    target = not_after - policy.before if policy.before is not None else not_before + lifetime * policy.fraction
    renew_at = max(not_before, target - lifetime * policy.jitter_fraction * jitter_unit)
    recheck_at = max(now, min(renew_at, now + MAX_WAIT))
    return RenewalTimes(renew_at=renew_at, recheck_at=recheck_at)


def backoff_delay(consecutive_failures: int) -> timedelta:
    """How long to wait after the n-th failure in a row (n ≥ 1)."""
    if consecutive_failures <= 0:
        return timedelta(0)
    if consecutive_failures <= len(BACKOFF):
        return BACKOFF[consecutive_failures - 1]
    return BACKOFF_AFTER


def next_retry(failed_at: datetime, consecutive_failures: int, not_after: datetime | None) -> datetime:
    """The retry after a failure: back-off, but never past expiry (try once more just before)."""
    retry = failed_at + backoff_delay(consecutive_failures)
    if not_after is not None and failed_at < not_after < retry:
        return max(failed_at, not_after - timedelta(seconds=1))
    return retry


def clock_jumped(wall_before: datetime, mono_before: float, wall_now: datetime, mono_now: float) -> bool:
    """True when the wall clock moved differently from the monotonic clock (sleep, clock change)."""
    wall_delta = wall_now - wall_before
    mono_delta = timedelta(seconds=mono_now - mono_before)
    return abs(wall_delta - mono_delta) > CLOCK_JUMP_THRESHOLD
