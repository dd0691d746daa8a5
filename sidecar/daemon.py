"""Wiring and lifecycle: config → identities → listeners; keystore watch; staged shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sidecar import __version__
from sidecar.config import Config, RouteSpec
from sidecar.credentials import Candidate
from sidecar.demo import DemoService, build_server_context
from sidecar.devca import DevCA, ca_paths, load_or_create_ca
from sidecar.errors import ConfigError, LocalSetupError
from sidecar.events import EventBus
from sidecar.files import ensure_private_dir, remove_stale_temp_files
from sidecar.identities import IdentityBook
from sidecar.keystore import Selection
from sidecar.paths import Places
from sidecar.renewal.providers import make_provider
from sidecar.renewal.providers.base import ProviderContext, ProviderError
from sidecar.renewal.scheduler import ExpiryWarner, IdentityRenewer
from sidecar.renewal.state import State
from sidecar.renewal.timing import clock_jumped
from sidecar.tlsctx import ContextCache
from sidecar.tunnel import RouteListener
from sidecar.watch import FolderWatch

log = logging.getLogger("sidecar.daemon")

MAX_RESELECT_INTERVAL = 3600.0
# How long a new connection may wait for an enrollment, or for a renewal that fell due while
# the machine slept, before it is served with what there is (or refused).
ROUTE_WAIT_SECONDS = 5.0
# How long start-up waits for enrollments before opening routes.
STARTUP_ENROLL_WAIT = 15.0
CLOCK_TICK_SECONDS = 30.0


class Daemon:
    """Owns the state; everything else reads it or asks it to change."""

    def __init__(self, config: Config, places: Places) -> None:
        self.config = config
        self.places = places
        self.keystore = config.keystore_dir or places.keystore
        self.active_identity = config.active_identity
        self.book = IdentityBook(config.identities, self.keystore)
        self.contexts = ContextCache()
        self.listeners: dict[str, RouteListener] = {}
        self.demo: DemoService | None = None
        self.ca: DevCA | None = None
        self._watch: FolderWatch | None = None
        self._clock_timer: asyncio.TimerHandle | None = None
        self.events = EventBus()
        self.renewers: dict[str, IdentityRenewer] = {}
        self.warners: dict[str, ExpiryWarner] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._clock_mark = (datetime.now(UTC), time.monotonic())
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()

    # --- lifecycle

    async def start(self) -> None:
        now = datetime.now(UTC)
        if self.config.demo_service.enabled or any(s.renew == "local-ca" for s in self.config.identities.values()):
            self.ca = load_or_create_ca(self.places.ca, now)
        ensure_private_dir(self.keystore)
        remove_stale_temp_files(self.keystore)
        self.book.refresh(now)
        self._start_renewers()
        await self._wait_for_enrollments()
        if self.config.demo_service.enabled:
            await self._start_demo(now)
        for route in self.config.routes.values():
            await self._start_route(route)
        self._watch = FolderWatch(self.keystore, asyncio.get_running_loop(), self.keystore_changed)
        self._watch.start()
        self._schedule_clock_refresh()
        self._spawn(self._watch_clock(), "clock watch")
        self.ready.set()

    async def run_until_stopped(self) -> None:
        """Serve until SIGINT/SIGTERM (or `request_stop()`), then shut down in stages."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Not possible off the main thread (tests) or on Windows: then request_stop() it is.
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        await self._stop.wait()
        await self.shutdown()

    def request_stop(self) -> None:
        if self._stop.is_set():
            return
        log.info("stopping: no new connections; open ones have %.0fs to finish", self.config.shutdown_grace)
        self._stop.set()

    async def shutdown(self) -> None:
        if self._clock_timer is not None:
            self._clock_timer.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        await asyncio.gather(*(listener.stop(self.config.shutdown_grace) for listener in self.listeners.values()))
        if self.demo is not None:
            await self.demo.stop()
        log.info("stopped")

    # --- pieces of start-up

    def _start_renewers(self) -> None:
        context = ProviderContext(keystore=self.keystore, dev_ca=self.ca)
        for name, spec in self.config.identities.items():
            try:
                provider = make_provider(spec, context)
                if provider is None:
                    warner = ExpiryWarner(spec, self.book, self.events)
                    self.warners[name] = warner
                    self._spawn(warner.run(), f"expiry warnings of {name}")
                    continue
                renewer = IdentityRenewer(spec, provider, self.book, self.events)
            except (ProviderError, ValueError) as exc:
                raise ConfigError(str(exc), source=self.config.source, field=f"identities.{name}") from exc
            self.renewers[name] = renewer
            self._spawn(renewer.run(), f"renewal of {name}")

    async def _wait_for_enrollments(self) -> None:
        """Identities with a provider and nothing usable get a certificate before routes open."""
        pending = [r for name, r in self.renewers.items() if not self.book.selection(name).usable]
        if pending:
            await asyncio.gather(*(r.settle(STARTUP_ENROLL_WAIT) for r in pending))

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.append(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %r stopped: %s", task.get_name(), task.exception(), exc_info=task.exception())

    async def _start_demo(self, now: datetime) -> None:
        assert self.ca is not None
        ctx = build_server_context(self.ca, ca_paths(self.places.ca)[0], now)
        self.demo = DemoService(self.config.demo_service.listen, ctx)
        try:
            await self.demo.start()
        except LocalSetupError as exc:
            log.error("%s", exc)
            self.demo = None

    async def _start_route(self, route: RouteSpec) -> RouteListener:
        listener = RouteListener(route, lambda: self.selection_for(route), self.contexts)
        self.listeners[route.name] = listener
        try:
            await listener.start()
        except LocalSetupError as exc:
            log.error("%s", exc)
            return listener
        log.info("%s", self.describe_listener(listener))
        return listener

    def describe_listener(self, listener: RouteListener) -> str:
        identity = self.identity_for(listener.route)
        selected = self.book.selection(identity).selected
        if selected is not None and selected.cert is not None:
            as_who = (
                f"as {identity} (serial {selected.cert.serial_number:x}, expires "
                f"{selected.cert.not_valid_after_utc.strftime('%Y-%m-%d %H:%M UTC')})"
            )
        else:
            as_who = f"as {identity} (no usable certificate yet: connections are refused)"
        text = f"listening on {listener.bound} → {listener.target} {as_who}"
        if listener.route.unsafe_skip_verify:
            text += " WARNING: server verification is OFF (unsafe_skip_verify)"
        return text

    # --- state the listeners and status read

    def identity_for(self, route: RouteSpec) -> str:
        return route.identity or self.active_identity

    def current_selection(self, route: RouteSpec) -> Selection:
        return self.book.selection(self.identity_for(route))

    async def selection_for(self, route: RouteSpec) -> Selection:
        """What a new connection on `route` presents; may wait briefly for enrollment or a due renewal."""
        identity = self.identity_for(route)
        jumped = self._check_clock()
        renewer = self.renewers.get(identity)
        if renewer is not None and (jumped or not self.book.selection(identity).usable):
            await renewer.settle(ROUTE_WAIT_SECONDS)
        return self.book.selection(identity)

    def keystore_changed(self) -> None:
        for change in self.book.refresh():
            after = describe_certificate(change.after)
            self.events.publish("certificate.selected", identity=change.identity, certificate=after)
        for renewer in self.renewers.values():
            renewer.wake()
        for warner in self.warners.values():
            warner.wake()
        self._schedule_clock_refresh()

    def request_renewal(self, identity: str) -> None:
        renewer = self.renewers.get(identity)
        if renewer is None:
            raise LocalSetupError(f'identity {identity!r} has no renewal provider (renew = "none")')
        renewer.renew_now()

    def _check_clock(self) -> bool:
        """Notice a wall-clock jump (sleep, clock change) and re-plan everything at once."""
        wall, mono = datetime.now(UTC), time.monotonic()
        before_wall, before_mono = self._clock_mark
        self._clock_mark = (wall, mono)
        if not clock_jumped(before_wall, before_mono, wall, mono):
            return False
        log.info(
            "the wall clock jumped by %s (sleep or clock change): re-checking certificates",
            (wall - before_wall) - timedelta(seconds=mono - before_mono),
        )
        self.keystore_changed()
        return True

    async def _watch_clock(self) -> None:
        # A monotonic timer does not run while the machine sleeps, so nothing can wake us on
        # resume: a slow tick compares the two clocks. New connections check inline as well.
        while True:
            await asyncio.sleep(CLOCK_TICK_SECONDS)
            self._check_clock()

    def _schedule_clock_refresh(self) -> None:
        """Re-apply the keystore rule when a certificate expires or becomes valid.

        A timer at the exact moment rather than a polling loop; capped so a changed wall
        clock (laptop asleep) is noticed within the hour.
        """
        if self._clock_timer is not None:
            self._clock_timer.cancel()
        boundary = self.book.next_boundary()
        delay = MAX_RESELECT_INTERVAL
        if boundary is not None:
            delay = min(delay, max(0.0, (boundary - datetime.now(UTC)).total_seconds()) + 0.5)
        self._clock_timer = asyncio.get_running_loop().call_later(delay, self.keystore_changed)

    # --- status

    def status(self, now: datetime | None = None) -> dict[str, Any]:
        """The status document (the control API serves this shape)."""
        now = now or datetime.now(UTC)
        identities = {name: self._identity_status(name) for name in self.config.identities}
        routes = {name: self._route_status(listener) for name, listener in self.listeners.items()}
        warnings = [
            f"route {name}: server verification is turned off (unsafe_skip_verify)"
            for name, listener in self.listeners.items()
            if listener.route.unsafe_skip_verify
        ]
        return {
            "version": __version__,
            "active_identity": self.active_identity,
            "identities": identities,
            "routes": routes,
            "warnings": warnings,
            "generated_at": rfc3339(now),
        }

    def _identity_status(self, name: str) -> dict[str, Any]:
        selection = self.book.selection(name)
        candidates = [{"file": r.candidate.file, "usable": False, "reason": r.reason} for r in selection.rejected]
        if selection.selected is not None:
            candidates.insert(0, {"file": selection.selected.file, "usable": True, "reason": None})
        return {
            "selected": describe_certificate(selection.selected),
            "candidates": candidates,
            "folder": str(self.book.folder(name)),
            "renewal": self._renewal_status(name, selection),
            "problem": selection.why_unusable() or None,
        }

    def _renewal_status(self, name: str, selection: Selection) -> dict[str, Any]:
        renewer = self.renewers.get(name)
        if renewer is None:
            state = State.VALID if selection.usable else State.EXPIRED
            return {
                "provider": "none",
                "state": str(state),
                "next_renewal_at": None,
                "last_renewed_at": None,
                "last_error": None,
                "consecutive_failures": 0,
            }
        status = renewer.status
        return {
            "provider": status.provider,
            "state": str(status.state),
            "next_renewal_at": rfc3339(status.next_renewal_at) if status.next_renewal_at else None,
            "last_renewed_at": rfc3339(status.last_renewed_at) if status.last_renewed_at else None,
            "last_error": status.last_error,
            "consecutive_failures": status.consecutive_failures,
        }

    def _route_status(self, listener: RouteListener) -> dict[str, Any]:
        route = listener.route
        counters = listener.counters
        identity = self.identity_for(route)
        if not listener.is_running:
            state = "error" if listener.last_error else "stopped"
        elif not self.book.selection(identity).usable:
            state = "no_certificate"
        else:
            state = "up"
        return {
            "listen": str(listener.bound or route.listen),
            "target": listener.target,
            "server_name": route.server_name,
            "identity": identity,
            "state": state,
            "active_connections": counters.active,
            "total_connections": counters.total,
            "bytes_in": counters.bytes_in,
            "bytes_out": counters.bytes_out,
            "failures": dict(counters.failures),
            "last_error": listener.last_error or counters.last_error,
            "verify": not route.unsafe_skip_verify,
        }


def describe_certificate(candidate: Candidate | None) -> dict[str, Any] | None:
    if candidate is None or candidate.cert is None:
        return None
    cert = candidate.cert
    return {
        "serial": f"{cert.serial_number:x}",
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_before": rfc3339(cert.not_valid_before_utc),
        "not_after": rfc3339(cert.not_valid_after_utc),
        "file": candidate.file,
        "sha256": candidate.fingerprint,
    }


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def log_file_path(places: Places) -> Path:
    return places.logs / "daemon.log"
