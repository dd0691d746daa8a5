"""Pure parts of health and expiry: the warning horizon and sentence, reasons worded when shown,
and how the status table shows a route's health."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sidecar.config import parse_config
from sidecar.errors import ConfigError
from sidecar.expiry import Renewal, expiry_warning, warning_horizon, warning_starts
from sidecar.keystore import select
from sidecar.statusview import render_status
from tests.pki import CA

# Runs anywhere: pure logic, or loopback sockets only (the macOS and Windows CI jobs run it).
pytestmark = pytest.mark.portable

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
WEEK = timedelta(days=7)


def warn(lifetime: timedelta, left: timedelta, renewal: Renewal, horizon: timedelta = WEEK) -> str | None:
    not_after = NOW + left
    return expiry_warning(
        "ci",
        not_before=not_after - lifetime,
        not_after=not_after,
        renewal=renewal,
        folder="/k/ci",
        expiry_warning=horizon,
        now=NOW,
    )


def test_the_horizon_is_the_setting_but_never_more_than_a_third_of_the_lifetime() -> None:
    start = NOW - timedelta(days=80)
    assert warning_horizon(WEEK, start, start + timedelta(days=90)) == WEEK
    assert warning_horizon(WEEK, start, start + timedelta(days=3)) == timedelta(days=1)
    assert warning_horizon(WEEK, start, start + timedelta(hours=24)) == timedelta(hours=8)
    assert warning_starts(WEEK, start, start + timedelta(days=90)) == start + timedelta(days=83)


@pytest.mark.parametrize(
    ("lifetime", "left", "renewal", "warned"),
    [
        (timedelta(days=90), timedelta(days=6), Renewal("none"), True),
        (timedelta(days=90), timedelta(days=8), Renewal("none"), False),  # not yet inside 7 days
        (timedelta(days=3), timedelta(hours=25), Renewal("none"), False),  # a third of 3 days is 1 day
        (timedelta(days=3), timedelta(hours=23), Renewal("none"), True),
        (timedelta(days=90), timedelta(days=2), Renewal("local-ca"), False),  # renewal will come
        (timedelta(days=90), timedelta(days=2), Renewal("acme", 2, "CA down"), True),  # renewal failing
        (timedelta(days=90), -timedelta(hours=1), Renewal("none"), False),  # expired: an error, not a warning
    ],
    ids=["none-inside", "none-outside", "short-outside-third", "short-inside-third", "renewing", "failing", "expired"],
)
def test_who_is_warned(lifetime: timedelta, left: timedelta, renewal: Renewal, warned: bool) -> None:
    assert (warn(lifetime, left, renewal) is not None) is warned


def test_the_sentence_names_the_identity_when_why_and_what_to_do() -> None:
    assert warn(timedelta(days=90), timedelta(hours=19), Renewal("none")) == (
        "identity ci: its certificate expires in 19 hours (2026-11-23 07:00 UTC) and will not be renewed "
        '(renew = "none"): put a new certificate and key in /k/ci (mtls-sidecar identity import FILE --name ci)'
    )
    assert warn(timedelta(days=90), timedelta(days=5), Renewal("acme", 1, "CA down")) == (
        "identity ci: its certificate expires in 5 days (2026-11-27 12:00 UTC) and renewal is failing "
        "(1 attempt with acme: CA down): fix that, then run `mtls-sidecar renew ci`"
    )
    # 47 hours is not "1 day"
    assert "expires in 47 hours" in str(warn(timedelta(days=90), timedelta(hours=47, minutes=59), Renewal("none")))


def test_expiry_warning_in_config() -> None:
    base = '[identities.dev]\nrenew = "none"\n'
    assert parse_config(base).expiry_warning == 7 * 86400
    assert parse_config('expiry_warning = "36h"\n' + base).expiry_warning == 36 * 3600
    with pytest.raises(ConfigError) as bad:
        parse_config('expiry_warning = "soon"\n' + base, source="config.toml")
    assert bad.value.field == "expiry_warning" and bad.value.line == 1


def test_reasons_that_age_are_worded_when_shown() -> None:
    from sidecar.credentials import Candidate

    leaf = CA("Test CA").client("dev", not_before=NOW - timedelta(days=10), not_after=NOW - timedelta(days=3))
    candidate = Candidate(file="/k/dev/old.pem", cert=leaf.cert, key=leaf.key)
    selection = select("dev", [candidate], NOW)
    [rejected] = selection.rejected
    assert rejected.reason == "expired 3 days ago (2026-11-19 12:00 UTC)"
    later = NOW + timedelta(days=4)
    assert rejected.reason_at(later) == "expired 7 days ago (2026-11-19 12:00 UTC)"
    assert "old.pem: expired 7 days ago" in selection.why_unusable(later)
    assert "old.pem: expired 3 days ago" in selection.why_unusable()  # as read
    mismatched = Candidate(file="/k/dev/other.pem", cert=leaf.cert, key=CA("X").client("x").key)
    [other] = select("dev", [mismatched], NOW).rejected
    assert other.reason_at(later) == other.reason == "key does not match certificate"  # does not age


def route(**fields: Any) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:8443",
        "target": "api.example.test:443",
        "identity": "dev",
        "state": "up",
        "active_connections": 0,
        "total_connections": 5,
        "failures": {},
        "last_error": None,
        **fields,
    }


def table(**routes: dict[str, Any]) -> str:
    return render_status({"version": "0.1.0", "active_identity": "dev", "identities": {}, "routes": routes}, NOW)


def test_the_state_column_shows_health_and_says_why_a_route_fails() -> None:
    failing = route(
        health="failing",
        failing={"since": "2026-11-22T11:50:00Z", "cause": "refused", "count": 4},
        failures={"refused": 4},
        last_error="connection to api.example.test:443 refused (is the service running?)",
        last_error_at="2026-11-22T11:59:00Z",
    )
    text = table(api=failing, db=route(health="idle"), old=route())  # `old`: a daemon from before health
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith(" ")}
    assert rows["api"].split()[5] == "failing" and rows["db"].split()[5] == "idle" and rows["old"].split()[5] == "up"
    assert (
        "\n  failing for 10 minutes (4 connections failed): connection to api.example.test:443 refused "
        "(is the service running?)\n  fix: start the service, or correct the target's port\n"
    ) in text
    recovered = route(
        health="ok",
        failures={"refused": 4},
        last_error="connection refused",
        last_error_at="2026-11-22T11:00:00Z",
        last_success="2026-11-22T11:30:00Z",
    )
    assert "\n  last error 1 hour ago: connection refused\n" in table(api=recovered)
    stopped = route(health="stopped", state="error", last_error="route api: cannot listen on 127.0.0.1:8443")
    assert "\n  route api: cannot listen on 127.0.0.1:8443\n" in table(api=stopped)
