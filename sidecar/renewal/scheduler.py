"""One task per identity that waits until renewal is due, then asks its provider.

All decisions about time come from `timing`; all state changes go through `state`'s table.
The task sleeps on an `asyncio.Event` (keystore change, "renew now", clock jump) with a
timeout to the next planned moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from sidecar.config import IdentitySpec
from sidecar.events import EventBus
from sidecar.identities import IdentityBook
from sidecar.keystore import Selection, load_anchor_file
from sidecar.renewal.providers.base import CannotEnroll, Provider, ProviderError, Refused, RenewalRequest
from sidecar.renewal.state import Event, RenewalStatus, State
from sidecar.renewal.store import (
    CredentialNotWritten,
    CredentialRejected,
    prune_expired,
    validate_new,
    write_credential,
)
from sidecar.renewal.timing import MAX_WAIT, next_retry, renewal_time

log = logging.getLogger("sidecar.renewal")

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Plan:
    due: bool
    at: datetime  # when due, or when to look again
    enrolling: bool = False


class IdentityRenewer:
    def __init__(
        self,
        spec: IdentitySpec,
        provider: Provider,
        book: IdentityBook,
        events: EventBus,
        *,
        clock: Clock = utc_now,
        rng: random.Random | None = None,
    ) -> None:
        self.spec = spec
        self.provider = provider
        self.book = book
        self.events = events
        self.clock = clock
        self.policy = spec.timing
        self._status = RenewalStatus(provider=provider.name)
        self._rng = rng or random.Random()
        self._jitter: dict[str, float] = {}  # one jitter draw per certificate, stable across re-plans
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._forced = False
        self._known_fingerprint = ""
        self._hold_until: datetime | None = None  # a renewed certificate that starts in the future
        self._refused_files: frozenset[str] | None = None  # the folder's credentials when the provider refused

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def status(self) -> RenewalStatus:
        return self._status

    @status.setter
    def status(self, new: RenewalStatus) -> None:
        """Every state change is an event (the tray and `status` follow them) and a log line."""
        old, self._status = self._status, new
        if new.state is not old.state:
            self.events.publish(
                "renewal.state",
                identity=self.name,
                state=str(new.state),
                previous=str(old.state),
                last_error=new.last_error,
            )
            # Entering `renewing` is told by attempt()'s own line ("enrollment started", "renewal started").
            log.log(logging.DEBUG if new.state is State.RENEWING else logging.INFO, "%s", self._change_line(old, new))

    def _change_line(self, old: RenewalStatus, new: RenewalStatus) -> str:
        """A state change in words; the first look at an identity with nothing usable reads as enrollment,
        not as `valid → expired` (its `valid` was only the starting value)."""
        if new.state is State.EXPIRED and old == RenewalStatus(provider=old.provider):
            if self.book.selection(self.name).rejected:
                return f"identity {self.name}: no usable certificate (see `mtls-sidecar status`): enrolling"
            return f"identity {self.name}: no certificate yet: enrolling"
        return f"identity {self.name}: renewal state {old.state} → {new.state}"

    # --- asked from outside

    def wake(self) -> None:
        """Something changed (keystore, clock): plan again."""
        self._wake.set()

    def renew_now(self) -> None:
        self._forced = True
        self._idle.clear()
        self._wake.set()

    async def settle(self, timeout: float) -> None:
        """Give a due renewal or an enrollment up to `timeout` seconds to finish."""
        self._idle.clear()
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    # --- the task

    async def run(self) -> None:
        while True:
            now = self.clock()
            plan = self.plan(now)
            if plan.due:
                self._idle.clear()
                await self.attempt(enrolling=plan.enrolling)
                continue
            self._idle.set()
            await _sleep_until(self._wake, plan.at - now)

    def plan(self, now: datetime) -> Plan:
        """Decide from the current selection and state; updates status (pure but for that)."""
        selection = self.book.selection(self.name)
        selected = selection.selected
        self._note_selection(selection)
        if selected is None or selected.cert is None:
            if self.status.state is not State.EXPIRED:
                self.status = self.status.apply(Event.EXPIRED, now)
            enroll_at = self._retry_at(None) or now
            self.status = _with_next(self.status, enroll_at)
            return Plan(due=now >= enroll_at or self._forced, at=enroll_at, enrolling=True)
        if self._hold_until is not None and now < self._hold_until:
            return Plan(due=False, at=self._hold_until)  # the new certificate is about to become valid
        cert = selected.cert
        jitter = self._jitter.setdefault(selected.fingerprint, self._rng.random())
        times = renewal_time(cert.not_valid_before_utc, cert.not_valid_after_utc, now, self.policy, jitter)
        self.status = _with_next(self.status, times.renew_at)
        if self._forced:
            return Plan(due=True, at=now)
        backoff = self._retry_at(cert.not_valid_after_utc)
        if backoff is not None:  # failing: the back-off decides, not renew_at
            self.status = _with_next(self.status, backoff)
            return Plan(due=now >= backoff, at=backoff)
        if times.due(now):
            if self.status.state is State.VALID:
                self.status = self.status.apply(Event.DUE, now)
            return Plan(due=True, at=now)
        return Plan(due=False, at=times.recheck_at)

    def _retry_at(self, not_after: datetime | None) -> datetime | None:
        failed_at = self.status.last_failure_at
        if failed_at is None or self.status.consecutive_failures == 0:
            return None
        if self._refused_files is not None and self._refused_files != self._credential_files():
            return None  # the provider refused this folder as it was; it has changed since: ask again now
        return next_retry(failed_at, self.status.consecutive_failures, not_after)

    def _credential_files(self) -> frozenset[str]:
        selection = self.book.selection(self.name)
        found = (selection.selected, *(r.candidate for r in selection.rejected))
        return frozenset(c.file for c in found if c is not None)

    def _note_selection(self, selection: Selection) -> None:
        """A usable certificate that arrived by other means (by hand, another tool) ends a failure streak."""
        fingerprint = selection.selected.fingerprint if selection.selected else ""
        if fingerprint == self._known_fingerprint:
            return
        if fingerprint and self.status.state in (State.FAILING, State.EXPIRED, State.RENEW_DUE):
            self.status = self.status.apply(Event.REPLACED, self.clock())
        self._known_fingerprint = fingerprint

    async def attempt(self, *, enrolling: bool = False) -> bool:
        """One renewal (or enrollment) attempt; True when a new certificate is in use."""
        self._forced = False
        self._refused_files = None
        now = self.clock()
        current = self.book.selection(self.name).selected
        self.status = self.status.apply(Event.START, now)
        kind = "enrollment" if enrolling or current is None else "renewal"
        self.events.publish("renewal.started", identity=self.name, provider=self.provider.name, kind=kind)
        log.info("identity %s: %s started (%s)", self.name, kind, self.provider.name)
        started = asyncio.get_running_loop().time()
        try:
            issued = await self.provider.issue(RenewalRequest(self.spec, self.book.folder(self.name), current, now))
            anchors = load_anchor_file(self.spec.issuer_ca_file) if self.spec.issuer_ca_file else []
            # Parsing what a provider returned is the keystore's work: off the loop, like a re-read.
            candidate = await asyncio.to_thread(
                validate_new, issued.cert_chain_pem, issued.key_pem, current, self.clock(), anchors
            )
            assert candidate.cert is not None
            path = write_credential(
                self.book.folder(self.name), candidate.cert, issued.cert_chain_pem, issued.key_pem, self.clock()
            )
        except CannotEnroll as exc:
            if isinstance(exc, Refused):
                self._refused_files = self._credential_files()
            # With a usable certificate in hand this is a renewal that failed, not a missing certificate.
            return self._failed(_one_line(exc), event=Event.CANNOT_ENROLL if current is None else Event.FAILED)
        except (ProviderError, CredentialRejected, CredentialNotWritten, OSError, ValueError) as exc:
            return self._failed(_one_line(exc))
        except Exception as exc:  # a provider bug must not end the renewal task
            log.exception("identity %s: %s failed unexpectedly", self.name, kind)
            return self._failed(f"unexpected error: {_one_line(exc)}")
        self.book.apply(await asyncio.to_thread(self.book.read, self.clock()))
        self._known_fingerprint = candidate.fingerprint
        starts = candidate.cert.not_valid_before_utc
        self._hold_until = starts if starts > self.clock() else None
        elapsed = asyncio.get_running_loop().time() - started
        self.status = self.status.apply(Event.SUCCEEDED, self.clock())
        cert = candidate.cert
        self.events.publish(
            "renewal.succeeded",
            identity=self.name,
            serial=f"{cert.serial_number:x}",
            not_after=cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
            file=str(path),
            seconds=round(elapsed, 3),
        )
        log.info(
            "identity %s: %s succeeded in %.2fs: serial %x, expires %s",
            self.name,
            kind,
            elapsed,
            cert.serial_number,
            cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC"),
        )
        with contextlib.suppress(OSError):
            if prune_expired(self.book.selection(self.name), self.clock(), self.policy.prune_after):
                self.book.apply(await asyncio.to_thread(self.book.read, self.clock()))
        return True

    def _failed(self, reason: str, event: Event = Event.FAILED) -> bool:
        now = self.clock()
        self.status = self.status.apply(event, now, error=reason)
        retry = self._retry_at(_not_after(self.book.selection(self.name)))
        self.events.publish(
            "renewal.failed",
            identity=self.name,
            provider=self.provider.name,
            error=reason,
            consecutive_failures=self.status.consecutive_failures,
            retry_at=retry.strftime("%Y-%m-%dT%H:%M:%SZ") if retry else None,
        )
        if event is Event.CANNOT_ENROLL:
            log.warning("identity %s: no usable certificate and none can be enrolled: %s", self.name, reason)
            return False
        log.warning(
            "identity %s: renewal failed (%d in a row): %s; next try %s; the current certificate keeps serving",
            self.name,
            self.status.consecutive_failures,
            reason,
            retry.strftime("%H:%M:%S UTC") if retry else "-",
        )
        return False


class ExpiryWarner:
    """`renew = "none"`: never renewed; warns once per certificate when it enters the window in
    which it would have been renewed, and once when nothing usable is left."""

    def __init__(self, spec: IdentitySpec, book: IdentityBook, events: EventBus, *, clock: Clock = utc_now) -> None:
        self.spec = spec
        self.book = book
        self.events = events
        self.clock = clock
        self.policy = spec.timing
        self._wake = asyncio.Event()
        self._warned: set[str] = set()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            now = self.clock()
            await _sleep_until(self._wake, self.check(now) - now)

    def check(self, now: datetime) -> datetime:
        """Warn if due; return when to look again."""
        selection = self.book.selection(self.spec.name)
        selected = selection.selected
        if selected is None or selected.cert is None:
            if "" not in self._warned:
                self._warned.add("")
                log.warning(
                    'identity %s: %s; it has renew = "none", so add a certificate to %s',
                    self.spec.name,
                    selection.why_unusable(),
                    self.book.folder(self.spec.name),
                )
            return now + MAX_WAIT
        self._warned.discard("")
        cert = selected.cert
        times = renewal_time(cert.not_valid_before_utc, cert.not_valid_after_utc, now, self.policy, 0.0)
        if not times.due(now):
            return times.recheck_at
        if selected.fingerprint not in self._warned:
            self._warned.add(selected.fingerprint)
            not_after = cert.not_valid_after_utc
            self.events.publish(
                "certificate.expiring",
                identity=self.spec.name,
                serial=f"{cert.serial_number:x}",
                not_after=not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
            )
            log.warning(
                'identity %s: its certificate (serial %x) expires %s and is not renewed (renew = "none")',
                self.spec.name,
                cert.serial_number,
                not_after.strftime("%Y-%m-%d %H:%M UTC"),
            )
        return min(cert.not_valid_after_utc, now + MAX_WAIT)


async def _sleep_until(wake: asyncio.Event, delay: timedelta) -> None:
    """Sleep for `delay` (at most MAX_WAIT, see timing) or until `wake` is set; then clear it."""
    seconds = max(min(delay, MAX_WAIT).total_seconds(), 0.0)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), seconds)
    wake.clear()


def _with_next(status: RenewalStatus, moment: datetime) -> RenewalStatus:
    return replace(status, next_renewal_at=moment)


def _not_after(selection: Selection) -> datetime | None:
    return selection.selected.cert.not_valid_after_utc if selection.selected and selection.selected.cert else None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:500]
