"""When an identity's certificate deserves a warning: it expires soon and nothing will renew it. Pure.

The warning horizon is the config's `expiry_warning` (default 7 days), but never more than a
third of the certificate's lifetime: a 24-hour certificate is "expiring" in its last 8 hours,
not all day. Inside the horizon, an identity is warned about when its certificate will not be
renewed in time: `renew = "none"`, or its renewals are failing. A certificate being renewed
normally is no news; an expired one is not a warning but "no usable certificate".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sidecar.units import human_duration


def warning_horizon(expiry_warning: timedelta, not_before: datetime, not_after: datetime) -> timedelta:
    """How long before `not_after` the warning starts."""
    return min(expiry_warning, (not_after - not_before) / 3)


def warning_starts(expiry_warning: timedelta, not_before: datetime, not_after: datetime) -> datetime:
    return not_after - warning_horizon(expiry_warning, not_before, not_after)


@dataclass(frozen=True)
class Renewal:
    """What is known about an identity's renewal: its provider's name ("none": never renewed),
    how many attempts in a row failed, and the last error."""

    provider: str
    consecutive_failures: int = 0
    last_error: str | None = None


def expiry_warning(
    identity: str,
    *,
    not_before: datetime,
    not_after: datetime,
    renewal: Renewal,
    folder: str,
    expiry_warning: timedelta,
    now: datetime,
) -> str | None:
    """The warning for the certificate `identity` presents, or None when it needs none.

    The sentence names the identity, when the certificate expires, why it will not be renewed
    and what to do.
    """
    if now >= not_after or now < warning_starts(expiry_warning, not_before, not_after):
        return None
    when = f"expires in {_time_left(not_after - now)} ({not_after:%Y-%m-%d %H:%M} UTC)"
    if renewal.provider == "none":
        return (
            f'identity {identity}: its certificate {when} and will not be renewed (renew = "none"): '
            f"put a new certificate and key in {folder} "
            f"(mtls-sidecar identity import FILE --name {identity})"
        )
    if renewal.consecutive_failures > 0:
        error = f": {renewal.last_error}" if renewal.last_error else ""
        return (
            f"identity {identity}: its certificate {when} and renewal is failing "
            f"({renewal.consecutive_failures} attempt{'s' if renewal.consecutive_failures != 1 else ''} "
            f"with {renewal.provider}{error}): fix that, then run `mtls-sidecar renew {identity}`"
        )
    return None


def _time_left(left: timedelta) -> str:
    """Hours until two days are left: "1 day" for 47 hours would make it sound later than it is."""
    if timedelta(hours=1) <= left < timedelta(days=2):
        hours = int(left.total_seconds() // 3600)
        return f"{hours} hour{'s' if hours != 1 else ''}"
    return human_duration(left)
