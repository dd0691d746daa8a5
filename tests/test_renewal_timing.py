"""Renewal timing and the state table: pure, table-driven, with an injected clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from sidecar.renewal.state import TRANSITIONS, Event, InvalidTransition, RenewalStatus, State, next_state
from sidecar.renewal.timing import (
    MAX_WAIT,
    RenewalPolicy,
    backoff_delay,
    clock_jumped,
    next_retry,
    renewal_time,
)

# Runs anywhere: pure logic, or loopback sockets only (the macOS and Windows CI jobs run it).
pytestmark = pytest.mark.portable

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.mark.parametrize(
    ("lifetime", "policy", "jitter", "expected_offset"),
    [
        (timedelta(days=3), RenewalPolicy(), 0.0, timedelta(days=2)),  # 2/3 of the lifetime
        (timedelta(days=3), RenewalPolicy(), 0.5, timedelta(days=2) - timedelta(days=3) / 40),
        (timedelta(days=10), RenewalPolicy(fraction=0.5), 0.0, timedelta(days=5)),
        (timedelta(days=10), RenewalPolicy(before=timedelta(hours=8)), 0.0, timedelta(days=10, hours=-8)),
        (timedelta(minutes=2), RenewalPolicy(before=timedelta(seconds=110)), 0.0, timedelta(seconds=10)),
        # renew_before longer than the lifetime: due from the start, never before notBefore
        (timedelta(minutes=2), RenewalPolicy(before=timedelta(hours=1)), 0.9, timedelta(0)),
    ],
)
def test_renew_at(lifetime: timedelta, policy: RenewalPolicy, jitter: float, expected_offset: timedelta) -> None:
    times = renewal_time(T0, T0 + lifetime, T0, policy, jitter)
    assert times.renew_at == T0 + expected_offset


def test_jitter_only_moves_renewal_earlier_by_at_most_a_twentieth() -> None:
    lifetime = timedelta(days=30)
    plain = renewal_time(T0, T0 + lifetime, T0, RenewalPolicy(), 0.0).renew_at
    for unit in (0.0, 0.25, 0.5, 0.999):
        jittered = renewal_time(T0, T0 + lifetime, T0, RenewalPolicy(), unit).renew_at
        assert plain - lifetime / 20 <= jittered <= plain


def test_recheck_is_never_more_than_an_hour_away_and_never_in_the_past() -> None:
    far = renewal_time(T0, T0 + 90 * DAY, T0, RenewalPolicy(), 0.0)
    assert far.recheck_at == T0 + MAX_WAIT
    assert not far.due(T0)
    near = renewal_time(T0, T0 + timedelta(minutes=3), T0, RenewalPolicy(), 0.0)
    assert near.recheck_at == near.renew_at == T0 + timedelta(minutes=2)
    late = T0 + timedelta(minutes=2, seconds=30)
    overdue = renewal_time(T0, T0 + timedelta(minutes=3), late, RenewalPolicy(), 0.0)
    assert overdue.due(late) and overdue.recheck_at == late


def test_backoff_schedule() -> None:
    assert [backoff_delay(n) for n in range(0, 7)] == [
        timedelta(0),
        timedelta(minutes=1),
        timedelta(minutes=10),
        timedelta(minutes=100),
        timedelta(hours=1),
        timedelta(hours=1),
        timedelta(hours=1),
    ]


def test_retries_never_wait_past_expiry() -> None:
    expiry = T0 + timedelta(minutes=30)
    assert next_retry(T0, 1, expiry) == T0 + timedelta(minutes=1)
    assert next_retry(T0, 2, expiry) == T0 + timedelta(minutes=10)
    assert next_retry(T0, 3, expiry) == expiry - timedelta(seconds=1)  # 100 min would pass expiry
    assert next_retry(T0, 3, None) == T0 + timedelta(minutes=100)  # enrolling: nothing to expire
    after = expiry + timedelta(minutes=5)
    assert next_retry(after, 4, expiry) == after + timedelta(hours=1)  # already expired: keep trying hourly


@pytest.mark.parametrize(
    ("wall", "mono", "jumped"),
    [
        (timedelta(seconds=30), 30.0, False),  # both clocks agree
        (timedelta(seconds=33), 30.0, False),  # small drift
        (timedelta(hours=2), 30.0, True),  # laptop slept: wall moved, monotonic did not
        (timedelta(seconds=-600), 1.0, True),  # clock set back
        (timedelta(days=1), 1.0, True),  # clock set forward
    ],
)
def test_clock_jump_detection(wall: timedelta, mono: float, jumped: bool) -> None:
    assert clock_jumped(T0, 100.0, T0 + wall, 100.0 + mono) is jumped


# The timing keys (renew_at, renew_before, prune_after) are read with the config:
# tests/test_provider_settings.py checks their values and errors.


# --- the state table

LIFE = [
    # a normal life: due, renewed
    ([Event.DUE, Event.START, Event.SUCCEEDED], [State.RENEW_DUE, State.RENEWING, State.VALID]),
    # the CA is down, then back
    (
        [Event.DUE, Event.START, Event.FAILED, Event.START, Event.FAILED, Event.START, Event.SUCCEEDED],
        [State.RENEW_DUE, State.RENEWING, State.FAILING, State.RENEWING, State.FAILING, State.RENEWING, State.VALID],
    ),
    # failing until expiry, then enrollment succeeds
    (
        [Event.DUE, Event.START, Event.FAILED, Event.EXPIRED, Event.START, Event.SUCCEEDED],
        [State.RENEW_DUE, State.RENEWING, State.FAILING, State.EXPIRED, State.RENEWING, State.VALID],
    ),
    # a certificate dropped in by hand rescues a failing identity
    (
        [Event.DUE, Event.START, Event.FAILED, Event.REPLACED],
        [State.RENEW_DUE, State.RENEWING, State.FAILING, State.VALID],
    ),
    # renew now, while valid
    ([Event.START, Event.SUCCEEDED], [State.RENEWING, State.VALID]),
    # news during an attempt waits for the attempt's outcome
    (
        [Event.START, Event.DUE, Event.EXPIRED, Event.FAILED],
        [State.RENEWING, State.RENEWING, State.RENEWING, State.FAILING],
    ),
]


@pytest.mark.parametrize(("events", "states"), LIFE)
def test_state_sequences(events: list[Event], states: list[State]) -> None:
    state = State.VALID
    seen = []
    for event in events:
        state = next_state(state, event)
        seen.append(state)
    assert seen == states


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (State.VALID, Event.SUCCEEDED),
        (State.VALID, Event.FAILED),
        (State.EXPIRED, Event.SUCCEEDED),
        (State.RENEW_DUE, Event.FAILED),
        (State.FAILING, Event.SUCCEEDED),
    ],
)
def test_impossible_transitions_raise(state: State, event: Event) -> None:
    with pytest.raises(InvalidTransition):
        next_state(state, event)


def test_every_state_is_reachable_and_every_target_is_a_state() -> None:
    targets = set(TRANSITIONS.values())
    assert targets == set(State)


def test_status_counts_failures_and_clears_them_on_success() -> None:
    status = RenewalStatus(provider="local-ca")
    status = status.apply(Event.DUE, T0).apply(Event.START, T0).apply(Event.FAILED, T0, error="CA down")
    status = status.apply(Event.START, T0).apply(Event.FAILED, T0 + timedelta(minutes=1), error="still down")
    assert (status.state, status.consecutive_failures, status.last_error) == (State.FAILING, 2, "still down")
    assert status.last_failure_at == T0 + timedelta(minutes=1)
    done = status.apply(Event.START, T0).apply(Event.SUCCEEDED, T0 + timedelta(minutes=11))
    assert (done.state, done.consecutive_failures, done.last_error) == (State.VALID, 0, None)
    assert done.last_renewed_at == T0 + timedelta(minutes=11)
