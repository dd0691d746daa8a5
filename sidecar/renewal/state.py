"""An identity's renewal state as a small machine with its transitions in one table."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum


class State(StrEnum):
    VALID = "valid"
    RENEW_DUE = "renew_due"
    RENEWING = "renewing"
    FAILING = "failing"
    EXPIRED = "expired"


class Event(StrEnum):
    DUE = "due"  # renew_at reached
    START = "start"  # an attempt begins
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANNOT_ENROLL = "cannot_enroll"  # nothing usable and the provider cannot get one without the user
    EXPIRED = "expired"  # no usable certificate any more
    REPLACED = "replaced"  # a usable certificate that is not yet due appeared (e.g. dropped in by hand)


TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.VALID, Event.DUE): State.RENEW_DUE,
    (State.VALID, Event.START): State.RENEWING,  # "renew now"
    (State.VALID, Event.EXPIRED): State.EXPIRED,
    (State.VALID, Event.REPLACED): State.VALID,
    (State.RENEW_DUE, Event.START): State.RENEWING,
    (State.RENEW_DUE, Event.EXPIRED): State.EXPIRED,
    (State.RENEW_DUE, Event.REPLACED): State.VALID,
    (State.RENEWING, Event.SUCCEEDED): State.VALID,
    (State.RENEWING, Event.FAILED): State.FAILING,
    (State.RENEWING, Event.CANNOT_ENROLL): State.EXPIRED,
    (State.FAILING, Event.START): State.RENEWING,
    (State.FAILING, Event.DUE): State.FAILING,
    (State.FAILING, Event.EXPIRED): State.EXPIRED,
    (State.FAILING, Event.REPLACED): State.VALID,
    (State.EXPIRED, Event.START): State.RENEWING,
    (State.EXPIRED, Event.EXPIRED): State.EXPIRED,
    (State.EXPIRED, Event.REPLACED): State.VALID,
}
# While an attempt runs, its own outcome decides; other news waits for it.
_IGNORED_WHILE_RENEWING = {Event.DUE, Event.EXPIRED, Event.REPLACED}


class InvalidTransition(Exception):
    pass


def next_state(state: State, event: Event) -> State:
    if state is State.RENEWING and event in _IGNORED_WHILE_RENEWING:
        return state
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(f"no transition from {state} on {event}") from None


@dataclass(frozen=True)
class RenewalStatus:
    """What status and the tray show for one identity's renewal."""

    provider: str
    state: State = State.VALID
    next_renewal_at: datetime | None = None
    last_renewed_at: datetime | None = None
    last_error: str | None = None
    consecutive_failures: int = 0
    last_failure_at: datetime | None = None

    def apply(self, event: Event, now: datetime, error: str | None = None) -> RenewalStatus:
        state = next_state(self.state, event)
        if event is Event.SUCCEEDED:
            return replace(
                self, state=state, last_renewed_at=now, last_error=None, consecutive_failures=0, last_failure_at=None
            )
        if event in (Event.FAILED, Event.CANNOT_ENROLL):  # both back off before the next try
            return replace(
                self,
                state=state,
                last_error=error,
                consecutive_failures=self.consecutive_failures + 1,
                last_failure_at=now,
            )
        if event is Event.REPLACED:
            return replace(self, state=state, last_error=None, consecutive_failures=0, last_failure_at=None)
        return replace(self, state=state)
