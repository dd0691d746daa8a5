"""Durations as people write them ("10s", "2m", "1h30m", "7d") and as people read them."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(text: str | int | float) -> float:
    """Return seconds for "500ms", "10s", "2m", "1h30m", "7d", "1w" or a bare number of seconds.

    Raises ValueError with a message that says what would be valid.
    """
    if isinstance(text, bool):
        raise ValueError('expected a duration such as "10s", "2m" or "7d", not a boolean')
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError("a duration cannot be negative")
        return float(text)
    if not isinstance(text, str):  # values straight from TOML: a list, a table, a date
        raise ValueError(f'expected a duration such as "10s", "2m" or "7d", not {type(text).__name__}')
    compact = text.strip().replace(" ", "")
    if not compact:
        raise ValueError('empty duration; write for example "10s", "2m" or "7d"')
    pos = 0
    total = 0.0
    for match in _PART.finditer(compact):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(compact):
        raise ValueError(
            f"{text!r} is not a duration; write a number and a unit "
            '(ms, s, m, h, d, w), for example "10s", "2m", "1h30m" or "7d"'
        )
    return total


def human_duration(delta: timedelta | float) -> str:
    """A rounded, readable length of time: "3 days", "5 hours", "2 minutes", "40 seconds"."""
    seconds = abs(delta.total_seconds() if isinstance(delta, timedelta) else delta)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    count = int(seconds)
    return f"{count} second{'s' if count != 1 else ''}"


def rfc3339(moment: datetime) -> str:
    """A moment as status and events write it: "2026-11-22T12:00:00Z" (UTC, whole seconds)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
