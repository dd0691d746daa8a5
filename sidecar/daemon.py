"""Wiring and lifecycle: config → identities → listeners; keystore watch; staged shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sidecar import __version__, config_edit
from sidecar.causes import quoted
from sidecar.config import Config, ListenAddress, ProxyRuleSpec, ProxySpec, RouteSpec, parse_config
from sidecar.credentials import Candidate
from sidecar.demo import DemoService, build_server_context
from sidecar.devca import DevCA, ca_paths, load_or_create_ca
from sidecar.errors import ConfigError, LocalSetupError, SidecarError
from sidecar.eventloop import running_loop_name
from sidecar.events import EventBus
from sidecar.expiry import Renewal, expiry_warning, warning_starts
from sidecar.failures import Failure
from sidecar.files import (
    PRIVATE_FILE_MODE,
    atomic_write,
    empty_private_dir,
    ensure_private_dir,
    remove_stale_temp_files,
)
from sidecar.identities import IdentityBook, SelectionChange
from sidecar.keystore import Selection
from sidecar.localtls import LocalServerContext
from sidecar.metrics import render_status
from sidecar.metricsserver import MetricsServer, metrics_answer
from sidecar.paths import Places
from sidecar.policy import ChainMemory
from sidecar.proxy.listener import ProxyListener
from sidecar.renewal.providers import make_provider
from sidecar.renewal.providers.base import ProviderContext, ProviderError
from sidecar.renewal.scheduler import ExpiryWarner, IdentityRenewer
from sidecar.renewal.state import State
from sidecar.renewal.timing import clock_jumped
from sidecar.stopsignals import on_reload_signals, on_stop_signals
from sidecar.tlsctx import ContextCache, check_trust_files
from sidecar.tunnel import PEER_CHECK, AcceptGuard, ConnectionBudget, RouteListener
from sidecar.units import rfc3339
from sidecar.watch import FolderWatch

log = logging.getLogger("sidecar.daemon")

MAX_RESELECT_INTERVAL = 3600.0
# How long a new connection may wait for an enrollment, or for a renewal that fell due while
# the machine slept, before it is served with what there is (or refused).
ROUTE_WAIT_SECONDS = 5.0
# How long start-up waits for enrollments before opening routes.
STARTUP_ENROLL_WAIT = 15.0
CLOCK_TICK_SECONDS = 30.0
SLOW_KEYSTORE_READ = 2.0  # a keystore read longer than this is logged: some file in it is costly


class NotFound(SidecarError):
    """The request names an identity or route that does not exist."""


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


class Daemon:
    """Owns the state; everything else reads it or asks it to change.

    Every change of configuration — start-up, an edit of config.toml, a control-API call —
    goes through `apply_config`, which works out what changed and touches only that.
    """

    def __init__(self, config: Config, places: Places) -> None:
        self.config = config
        self.places = places
        self.keystore = config.keystore_dir or places.keystore
        self.book = IdentityBook(config.identities, self.keystore)
        self.contexts = ContextCache()
        self.chains = ChainMemory()  # verified server chains, for routes' resumed TLS sessions
        self.listeners: dict[str, RouteListener] = {}
        self.budget = ConnectionBudget(config.max_connections)  # open tunnels over all routes
        self.accept_guard = AcceptGuard()  # out of descriptors: one log line, not a traceback per accept
        self.demo: DemoService | None = None
        self.proxy: ProxyListener | None = None  # `[proxy]`, once a rule exists
        self.metrics_server: MetricsServer | None = None  # `metrics_listen`, when set
        self.ca: DevCA | None = None
        self._local_server: LocalServerContext | None = None
        self.events = EventBus()
        self.renewers: dict[str, IdentityRenewer] = {}
        self.warners: dict[str, ExpiryWarner] = {}
        self.config_error: str | None = None
        # How the control API is reached ({"transport", "address", ...}), set by the control server.
        self.control_info: Callable[[], dict[str, Any]] | None = None
        # What events last told about each route's health and each identity's expiry warning.
        self._told_health: dict[str, tuple[str, str | None]] = {}
        self._told_expiry: dict[str, str] = {}
        self._identity_tasks: dict[str, asyncio.Task[None]] = {}
        self._watches: list[FolderWatch] = []
        self._clock_timer: asyncio.TimerHandle | None = None
        self._keystore_reader: asyncio.Task[None] | None = None
        self._trust_watches: dict[Path, FolderWatch] = {}  # folders holding routes' ca_file, ca_dir, crl_file
        self._keystore_stale = False
        self._tasks: list[asyncio.Task[None]] = []
        self._clock_mark = (datetime.now(UTC), time.monotonic())
        self._config_text = _read_text(places.config_file)
        self._config_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._force = asyncio.Event()  # a second Ctrl-C or SIGTERM: cut open connections instead of waiting
        self.ready = asyncio.Event()

    @property
    def active_identity(self) -> str:
        return self.config.active_identity

    # --- lifecycle

    async def start(self) -> None:
        now = datetime.now(UTC)
        self.accept_guard.install(asyncio.get_running_loop())
        self.ca = load_or_create_ca(self.places.ca, now)  # cheap once made; the demo and local-ca need it
        ensure_private_dir(self.keystore)
        remove_stale_temp_files(self.keystore)
        empty_private_dir(self.places.scratch)  # a decrypted key left by a renewal that was killed
        await self.read_keystore(now)
        watchers = self._make_identity_watchers(self.config, set(self.config.identities))
        self._install_identity_watchers(watchers)
        await self._wait_for_enrollments()
        if self.config.demo_service.enabled:
            await self._start_demo(now)
        for route in self.config.routes.values():
            await self._start_route(route)
        if self.config.proxy.enabled:
            await self._start_proxy(self.config.proxy)
        await self._apply_metrics_listen(self.config.metrics_listen)
        loop = asyncio.get_running_loop()
        self._watches = [
            FolderWatch(self.keystore, loop, self.keystore_changed),
            FolderWatch(
                self.places.config_file.parent,
                loop,
                self._config_file_changed,
                only=self.places.config_file,
                recursive=False,
            ),
        ]
        target = Path(os.path.realpath(self.places.config_file))
        if target != self.places.config_file:  # a symlinked config.toml: edits of the file it points to count
            self._watches.append(
                FolderWatch(target.parent, loop, self._config_file_changed, only=target, recursive=False)
            )
        for watch in self._watches:
            watch.start()
        self._watch_trust_files()
        self._schedule_clock_refresh()
        self._spawn(self._watch_clock(), "clock watch")
        self._spawn(self._follow_renewals(), "expiry warnings")
        self._tell_expiry()
        self.ready.set()

    @property
    def forced(self) -> bool:
        """Whether a second stop signal cut the shutdown short (`run` then exits 130)."""
        return self._force.is_set()

    async def run_until_stopped(self) -> None:
        """Serve until SIGINT/SIGTERM (or `request_stop()`), then shut down in stages.

        A second stop signal during the shutdown cuts the open connections at once (as uvicorn
        and ghostunnel do). SIGHUP and SIGUSR1 reload: config, keystore and trust files.
        """
        # SIGINT and SIGTERM (Windows: Ctrl-C and Ctrl-Break); off the main thread, request_stop() it is.
        loop = asyncio.get_running_loop()
        on_stop_signals(loop, self._signalled)
        on_reload_signals(loop, self._reload_signalled)
        await self._stop.wait()
        await self.shutdown()

    def _signalled(self, sig: signal.Signals) -> None:
        if self._stop.is_set():
            self.force_stop()
        else:
            self.request_stop()

    def _reload_signalled(self, sig: signal.Signals) -> None:
        log.info("%s: reloading config.toml, the keystore and the trust files", sig.name)
        self.reload_everything()

    def reload_everything(self) -> None:
        """What a reload signal asks for: re-read config.toml, every identity folder and the trust
        files now, rather than when a file watch notices (a watch can miss a change on a network
        folder, and a script that replaced a file wants the new one in use when it returns)."""
        if self._stop.is_set():
            return
        self._spawn(self.reload_config(), "config reload")
        self.trust_changed()
        self.keystore_changed()

    def request_stop(self) -> None:
        if self._stop.is_set():
            return
        log.info(
            "stopping: no new connections; open ones have %.0fs to finish (Ctrl-C again to cut them now)",
            self.config.shutdown_grace,
        )
        self._stop.set()

    def force_stop(self) -> None:
        """Stop without waiting for open connections: they are cut at once."""
        if self._force.is_set():
            return
        log.warning("second Ctrl-C (or stop signal): cutting open connections now instead of waiting for them")
        self._force.set()
        self._stop.set()

    async def shutdown(self) -> None:
        if self._clock_timer is not None:
            self._clock_timer.cancel()
        tasks = [*self._tasks, *self._identity_tasks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for watch in [*self._watches, *self._trust_watches.values()]:
            watch.stop()
        self._watches = []
        self._trust_watches = {}
        await self._apply_metrics_listen(None)
        await self._stop_listeners()
        if self.demo is not None:
            await self.demo.stop()
        log.info("stopped")

    async def _stop_listeners(self) -> None:
        """Stop accepting; give open connections the grace, or less when force_stop() comes."""
        listeners: list[RouteListener | ProxyListener] = list(self.listeners.values())
        if self.proxy is not None:
            listeners.append(self.proxy)
        grace = asyncio.ensure_future(
            asyncio.gather(*(listener.stop(self.config.shutdown_grace) for listener in listeners))
        )
        forced = asyncio.ensure_future(self._force.wait())
        waiting: set[asyncio.Future[Any]] = {grace, forced}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            forced.cancel()
        if grace.done():
            await grace  # what a listener's stop raised, if anything
            return
        grace.cancel()
        await asyncio.gather(grace, return_exceptions=True)
        for listener in listeners:
            listener.cut()

    # --- configuration: one path for start-up, reloads and API changes

    async def apply_config(self, new: Config) -> None:
        """Move from the running config to `new`, touching only what changed.

        Raises ConfigError (before changing anything) when a provider cannot be set up.
        """
        old = self.config
        changed_identities = {n for n in new.identities if old.identities.get(n) != new.identities[n]}
        watchers = self._make_identity_watchers(new, changed_identities)
        self.config = new
        self.budget.limit = new.max_connections
        if new.keystore_dir != old.keystore_dir:
            log.warning("keystore_dir changed: it takes effect when the daemon restarts")
        for name in set(old.identities) - set(new.identities) | changed_identities:
            self._stop_identity(name)
        self.book.specs = dict(new.identities)
        await self.read_keystore()
        self._install_identity_watchers(watchers)
        if new.active_identity != old.active_identity:
            self._refresh_warm("the active identity switched")
            log.info("active identity: %s → %s", old.active_identity, new.active_identity)
            self.events.publish("identity.switched", name=new.active_identity, previous=old.active_identity)
        for name in set(old.routes) - set(new.routes):
            self._remove_listener(name)
        for name, route in new.routes.items():
            listener = self.listeners.get(name)
            if listener is None:
                await self._start_route(route)
            elif listener.route != route:
                if listener.route.listen == route.listen and listener.is_running:
                    listener.update(route)
                    self.events.publish("route.changed", route=name)
                    log.info("route %s: %s", name, self.describe_listener(listener))
                else:
                    self._remove_listener(name)
                    await self._start_route(route)
        if new.proxy != old.proxy:
            await self._apply_proxy(new.proxy)
        metrics = self.metrics_server
        if new.metrics_listen != old.metrics_listen or (metrics is not None and not metrics.is_running):
            await self._apply_metrics_listen(new.metrics_listen)  # a port that was taken is tried again too
        if new.demo_service != old.demo_service:
            if self.demo is not None:
                await self.demo.stop()
                self.demo = None
            if new.demo_service.enabled:
                await self._start_demo(datetime.now(UTC))
        self._tell_health()
        self._tell_expiry()
        if self._clock_timer is not None:  # running (not starting): the next warning may start sooner or later
            self._schedule_clock_refresh()
            self._watch_trust_files()

    async def reload_config(self) -> bool:
        """Re-read config.toml; a bad edit is rejected and the running config stays."""
        async with self._config_lock:
            text = _read_text(self.places.config_file)
            if text == self._config_text:
                if self.config_error is not None:  # the rejected edit was undone: nothing left to warn about
                    self.config_error = None
                    self.events.publish("config.reloaded", path=str(self.places.config_file))
                    log.info("config.toml is back to the running config; the rejected edit is gone")
                return False
            try:
                new = parse_config(text, source=str(self.places.config_file), base_dir=self.places.config_file.parent)
                await self.apply_config(new)
            except ConfigError as exc:
                self.config_error = str(exc)
                self.events.publish(
                    "config.rejected", path=str(self.places.config_file), error=str(exc), line=exc.line, field=exc.field
                )
                log.error("config change rejected, the previous config keeps running: %s", exc)
                return False
            self._config_text = text
            self.config_error = None
            self.events.publish("config.reloaded", path=str(self.places.config_file))
            log.info("config reloaded from %s", self.places.config_file)
            return True

    async def edit_config(self, edit: Callable[[str], str]) -> Config:
        """Apply a change made through the API and write it back to config.toml (atomically)."""
        async with self._config_lock:
            return await self._edit_config_locked(edit)

    async def _edit_config_locked(self, edit: Callable[[str], str]) -> Config:
        """`edit_config` for a caller that holds `_config_lock` (one change, config and listeners, at a time)."""
        text = _read_text(self.places.config_file)
        if self.config_error is not None and text != self._config_text:
            raise ConfigError(
                f"config.toml has an error to fix first: {self.config_error}", source=str(self.places.config_file)
            )
        new_text = edit(text)
        new = parse_config(new_text, source=str(self.places.config_file), base_dir=self.places.config_file.parent)
        await self.apply_config(new)
        atomic_write(self.places.config_file, new_text.encode(), PRIVATE_FILE_MODE, through_symlink=True)
        self._config_text = new_text
        return new

    def _config_file_changed(self) -> None:
        self._spawn(self.reload_config(), "config reload")

    # --- identities

    def _make_identity_watchers(self, config: Config, names: set[str]) -> dict[str, IdentityRenewer | ExpiryWarner]:
        """Build renewers (or, for renew = "none", warners) without starting them."""
        context = ProviderContext(keystore=self.keystore, dev_ca=self.ca, scratch=self.places.scratch)
        made: dict[str, IdentityRenewer | ExpiryWarner] = {}
        for name in names:
            spec = config.identities[name]
            try:
                provider = make_provider(spec, context)
                made[name] = (
                    ExpiryWarner(spec, self.book, self.events)
                    if provider is None
                    else IdentityRenewer(spec, provider, self.book, self.events)
                )
            except (ProviderError, ValueError) as exc:
                # The provider's message names its field already (identities.NAME.KEY): once is enough.
                raise ConfigError(str(exc), source=config.source) from exc
        return made

    def _install_identity_watchers(self, watchers: dict[str, IdentityRenewer | ExpiryWarner]) -> None:
        for name, watcher in watchers.items():
            if isinstance(watcher, IdentityRenewer):
                self.renewers[name] = watcher
                what = "renewal"
            else:
                self.warners[name] = watcher
                what = "expiry warnings"
            task = asyncio.get_running_loop().create_task(watcher.run(), name=f"{what} of {name}")
            task.add_done_callback(self._task_done)
            self._identity_tasks[name] = task

    def _stop_identity(self, name: str) -> None:
        task = self._identity_tasks.pop(name, None)
        if task is not None:
            task.cancel()
        self.renewers.pop(name, None)
        self.warners.pop(name, None)

    async def _wait_for_enrollments(self) -> None:
        """Identities with a provider and nothing usable get a certificate before routes open."""
        pending = [r for name, r in self.renewers.items() if not self.book.selection(name).usable]
        if pending:
            await asyncio.gather(*(r.settle(STARTUP_ENROLL_WAIT) for r in pending))

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.append(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if task in self._tasks:
            self._tasks.remove(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %r stopped: %s", task.get_name(), task.exception(), exc_info=task.exception())

    # --- routes

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
        listener = RouteListener(route, self.selection_for, self.contexts, self.chains, budget=self.budget)
        listener.on_failure = self._route_failed
        listener.on_outcome = self._route_outcome
        listener.local_tls_context = self._local_tls
        listener.current_selection = self.current_selection
        self.listeners[route.name] = listener
        try:
            await listener.start()
        except LocalSetupError as exc:
            log.error("%s", exc)
            self.events.publish("route.error", route=route.name, error=str(exc))
            self._tell_health(route.name)
            return listener
        log.info("%s", self.describe_listener(listener))
        self.events.publish("route.up", route=route.name, listen=str(listener.bound), target=listener.target)
        self._tell_health(route.name)
        return listener

    async def _start_proxy(self, spec: ProxySpec) -> None:
        proxy = ProxyListener(spec, self.selection_for, self.contexts, self.chains, budget=self.budget)
        proxy.on_failure = self._proxy_failed
        proxy.current_selection = self.current_selection
        self.proxy = proxy
        try:
            await proxy.start()
        except LocalSetupError as exc:
            log.error("%s", exc)
            self.events.publish("proxy.error", error=str(exc))
            return
        rules = ", ".join(rule.name for rule in spec.rules)
        log.info("proxy: listening on %s for %d rule(s): %s", proxy.bound, len(spec.rules), rules)
        self.events.publish("proxy.up", listen=str(proxy.bound), rules=[rule.name for rule in spec.rules])

    async def _apply_proxy(self, spec: ProxySpec) -> None:
        """The proxy's new settings: its rules change in place; a new address or no rules stop it."""
        proxy = self.proxy
        if proxy is not None and spec.enabled and proxy.is_running and spec.listen == proxy.spec.listen:
            proxy.update(spec)
            log.info("proxy: rules now %s", ", ".join(rule.name for rule in spec.rules))
            self.events.publish("proxy.changed", rules=[rule.name for rule in spec.rules])
            return
        if proxy is not None:
            proxy.close()
            self.proxy = None
            self._spawn(proxy.drain(self.config.shutdown_grace), "drain of the proxy")
            self.events.publish("proxy.down")
            log.info("proxy: stopped listening on %s", proxy.bound or proxy.spec.listen)
        if spec.enabled:
            await self._start_proxy(spec)

    async def _apply_metrics_listen(self, listen: ListenAddress | None) -> None:
        """Serve the metrics on `listen` (None: nowhere): a moved address stops the old server first.

        A port that cannot be bound is an error in the log and in status, as for a route: the
        daemon goes on serving its routes."""
        if self.metrics_server is not None:
            if listen is not None and self.metrics_server.listen == listen and self.metrics_server.is_running:
                return
            await self.metrics_server.stop()
            log.info("metrics: stopped listening on %s", self.metrics_server.bound or self.metrics_server.listen)
            self.metrics_server = None
        if listen is None:
            return
        server = MetricsServer(listen, lambda method, target: metrics_answer(method, target, self.metrics_text))
        self.metrics_server = server
        try:
            await server.start()
        except LocalSetupError as exc:
            log.error("%s", exc)
            self.events.publish("metrics.error", error=str(exc))

    def metrics_text(self) -> str:
        """The Prometheus text of the status now (`/v1/metrics` and `metrics_listen` serve it)."""
        now = datetime.now(UTC)
        return render_status(self.status(now), now)

    def metrics_status(self) -> dict[str, Any] | None:
        """`metrics_listen` as status shows it; None when it is not set."""
        server = self.metrics_server
        if server is None:
            return None
        state = "up" if server.is_running else "error"
        return {
            "listen": str(server.bound or server.listen),
            "url": f"http://{server.bound or server.listen}/metrics",
            "state": state,
            "error": server.last_error,
            "served": server.served,
            "refused": server.refused,
        }

    def _proxy_failed(self, rule: str | None, destination: str | None, failure: Failure) -> None:
        self.events.publish(
            "proxy.failure", rule=rule, destination=destination, reason=failure.reason, error=failure.message
        )

    def proxy_status(self) -> dict[str, Any]:
        """The proxy as status shows it; `{"enabled": false}` until a rule exists."""
        if self.proxy is None:
            spec = self.config.proxy
            return {"enabled": False, "listen": str(spec.listen), "state": "off" if not spec.enabled else "stopped"}

        def identity_of(name: str | None) -> str:
            return name or self.active_identity

        return self.proxy.status(identity_of, lambda name: self.book.selection(name).usable)

    def _local_tls(self) -> ssl.SSLContext:
        """The server context `local_tls` routes end the local client's TLS in."""
        if self._local_server is None:
            assert self.ca is not None, "the dev CA is loaded at start"
            self._local_server = LocalServerContext(self.ca)
        return self._local_server()

    def _route_failed(self, route: str, failure: Failure) -> None:
        self.events.publish("route.failure", route=route, reason=failure.reason, error=failure.message)

    def _route_outcome(self, route: str) -> None:
        self._tell_health(route)

    def _tell_health(self, *names: str) -> None:
        """Publish `route.health` for each route (all when none is named) whose health or failing
        cause changed since the last one told."""
        for name in names or tuple(self.listeners):
            listener = self.listeners.get(name)
            if listener is None:
                self._told_health.pop(name, None)
                continue
            identity = self.identity_for(listener.route)
            health = listener.health(has_certificate=self.book.selection(identity).usable)
            counters = listener.counters
            cause = str(counters.failing_cause) if health == "failing" and counters.failing_cause else None
            previous = self._told_health.get(name)
            if previous == (health, cause):
                continue
            self._told_health[name] = (health, cause)
            self.events.publish(
                "route.health",
                route=name,
                health=health,
                previous=previous[0] if previous else None,
                cause=cause,
                since=rfc3339(counters.failing_since) if cause and counters.failing_since else None,
                error=(listener.last_error or counters.last_error) if health in ("failing", "stopped") else None,
            )

    def _remove_listener(self, name: str) -> None:
        """Stop accepting now; open connections drain in the background."""
        listener = self.listeners.pop(name)
        listener.close()
        self._told_health.pop(name, None)
        self._spawn(listener.drain(self.config.shutdown_grace), f"drain of route {name}")
        self.events.publish("route.down", route=name)
        log.info("route %s stopped listening on %s", name, listener.bound or listener.route.listen)

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

    # --- operations the control API offers

    # Each change holds `_config_lock` from its checks to its last listener start or stop, so
    # changes (and hot reloads) happen one after another: a change that fails and is put back
    # puts back only itself, never another change made meanwhile.

    async def use_identity(self, name: str, route: str | None = None) -> None:
        async with self._config_lock:
            self._require_identity(name)
            if route is None:
                await self._edit_config_locked(lambda text: config_edit.set_active_identity(text, name))
            else:
                self._require_route(route)
                await self._edit_config_locked(lambda text: config_edit.set_route_identity(text, route, name))

    async def add_route(self, name: str, fields: dict[str, Any]) -> RouteListener:
        async with self._config_lock:
            if name in self.config.routes:
                raise LocalSetupError(
                    f"a route named {name!r} exists already; change it in place (`route set`), or pick another name"
                )
            return await self._change_route(name, fields, lambda text: config_edit.add_route(text, name, fields))

    async def set_route(self, name: str, fields: dict[str, Any]) -> RouteListener:
        """Change some of a route's keys (None removes one); an unchanged listen address keeps its connections."""
        async with self._config_lock:
            self._require_route(name)
            return await self._change_route(name, fields, lambda text: config_edit.set_route(text, name, fields))

    async def _change_route(self, name: str, fields: dict[str, Any], edit: Callable[[str], str]) -> RouteListener:
        """Save and apply a route edit, or refuse it with config.toml untouched (the caller holds the lock).

        Errors name the request's own keys (`target`, `ca_file`), not a line of config.toml that
        only existed in the refused edit.
        """
        check_trust_files(fields, source=f"route {name}", base_dir=self.places.config_file.parent)
        before = _read_text(self.places.config_file)
        try:
            await self._edit_config_locked(edit)
        except ConfigError as exc:
            prefix = f"routes.{name}."
            if exc.field is None or not exc.field.startswith(prefix):
                raise
            key = exc.field.removeprefix(prefix)
            raise ConfigError(exc.message, source=f"route {name}", field=key, value=exc.value, hint=exc.hint) from exc
        listener = self.listeners[name]
        if not listener.is_running:  # the port is taken, say: put config.toml back as it was
            error = listener.last_error or f"route {name} could not start"
            await self._edit_config_locked(lambda _: before)
            raise LocalSetupError(error)
        return listener

    async def remove_route(self, name: str) -> None:
        async with self._config_lock:
            self._require_route(name)
            await self._edit_config_locked(lambda text: config_edit.remove_route(text, name))

    def request_renewal(self, identity: str) -> None:
        self._require_identity(identity)
        renewer = self.renewers.get(identity)
        if renewer is None:
            raise LocalSetupError(f'identity {identity!r} has no renewal provider (renew = "none")')
        renewer.renew_now()

    def _require_identity(self, name: str) -> None:
        if name not in self.config.identities:
            known = ", ".join(self.config.identities) or "none"
            raise NotFound(f"no identity named {name!r} (known: {known})")

    def _require_route(self, name: str) -> None:
        if name not in self.config.routes:
            known = ", ".join(self.config.routes) or "none"
            raise NotFound(f"no route named {name!r} (known: {known})")

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
        """A keystore file changed or a certificate's moment came: re-read the keystore.

        The read (files, PEM scans, key derivation) runs on a worker thread, so one hostile
        or slow file never holds the event loop; changes that arrive during a read make one
        more read after it."""
        self._keystore_stale = True
        if self._keystore_reader is None or self._keystore_reader.done():
            self._keystore_reader = self._spawn(self._reread_keystore(), "keystore re-read")

    async def _reread_keystore(self) -> None:
        while self._keystore_stale:
            self._keystore_stale = False
            self._keystore_read(await self.read_keystore())

    async def read_keystore(self, now: datetime | None = None) -> list[SelectionChange]:
        """Re-read every identity folder off the loop and take the result on it."""
        started = time.monotonic()
        found = await asyncio.to_thread(self.book.read, now)
        took = time.monotonic() - started
        if took > SLOW_KEYSTORE_READ:
            log.warning("reading the keystore took %.1fs (a large or costly file in it?)", took)
        return self.book.apply(found)

    def _watch_trust_files(self) -> None:
        """Watch the folders of every route's ca_file, ca_dir and crl_file, as the keystore is
        watched: a change there rebuilds the contexts, so new connections use the new trust."""
        wanted: set[Path] = set()
        sources: list[RouteSpec | ProxyRuleSpec] = [*self.config.routes.values(), *self.config.proxy.rules]
        for route in sources:
            for path, is_dir in ((route.ca_file, False), (route.ca_dir, True), (route.crl_file, False)):
                if path is not None:
                    folder = Path(path) if is_dir else Path(path).parent
                    if folder.is_dir():
                        wanted.add(folder)
        for folder in set(self._trust_watches) - wanted:
            self._trust_watches.pop(folder).stop()
        loop = asyncio.get_running_loop()
        for folder in wanted - set(self._trust_watches):
            watch = FolderWatch(folder, loop, self.trust_changed, recursive=False)
            watch.start()
            self._trust_watches[folder] = watch

    def _refresh_warm(self, reason: str) -> None:
        """What new connections present or trust changed: warm connections are made anew at once
        (a stale one is never used in any case: each is checked when a client takes it)."""
        for listener in self.listeners.values():
            listener.refresh_warm(reason)
        if self.proxy is not None:
            self.proxy.refresh_warm(reason)

    def trust_changed(self) -> None:
        self.contexts.forget_trust()
        self._refresh_warm("a trust file changed")
        log.info("a trust file (ca_file, ca_dir or crl_file) changed: new connections use it as it is now")

    def _keystore_read(self, changes: list[SelectionChange]) -> None:
        if changes:
            self._refresh_warm("a certificate changed")
        for change in changes:
            after = describe_certificate(change.after)
            self.events.publish("certificate.selected", identity=change.identity, certificate=after)
        for renewer in self.renewers.values():
            renewer.wake()
        for warner in self.warners.values():
            warner.wake()
        self._schedule_clock_refresh()
        self._tell_health()
        self._tell_expiry()

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
        boundary = min(
            (m for m in (self.book.next_boundary(), self._next_expiry_warning()) if m is not None), default=None
        )
        delay = MAX_RESELECT_INTERVAL
        if boundary is not None:
            delay = min(delay, max(0.0, (boundary - datetime.now(UTC)).total_seconds()) + 0.5)
        self._clock_timer = asyncio.get_running_loop().call_later(delay, self.keystore_changed)

    # --- status

    # --- expiry warnings (sidecar/expiry.py decides)

    def expiry_warning(self, name: str, now: datetime) -> str | None:
        """The warning for identity `name`'s certificate at `now`: it expires within the warning
        horizon and will not be renewed in time; None when it needs none."""
        selected = self.book.selection(name).selected
        if selected is None or selected.cert is None or name not in self.config.identities:
            return None
        renewer = self.renewers.get(name)
        renewal = (
            Renewal("none")
            if renewer is None
            else Renewal(renewer.status.provider, renewer.status.consecutive_failures, renewer.status.last_error)
        )
        return expiry_warning(
            name,
            not_before=selected.cert.not_valid_before_utc,
            not_after=selected.cert.not_valid_after_utc,
            renewal=renewal,
            folder=str(self.book.folder(name)),
            expiry_warning=timedelta(seconds=self.config.expiry_warning),
            now=now,
        )

    def _tell_expiry(self) -> None:
        """Log and publish `identity.expiry_warning` when an identity's warning begins (once per
        certificate) or ends (`warning` null)."""
        now = datetime.now(UTC)
        for name in sorted(set(self.config.identities) | set(self._told_expiry)):
            warning = self.expiry_warning(name, now)
            selected = self.book.selection(name).selected
            key = selected.fingerprint if warning and selected is not None else ""
            if self._told_expiry.get(name, "") == key:
                continue
            if key:
                self._told_expiry[name] = key
                log.warning("%s", warning)
            else:
                self._told_expiry.pop(name, None)
            self.events.publish("identity.expiry_warning", identity=name, warning=warning)

    def _next_expiry_warning(self) -> datetime | None:
        """The next moment an identity's certificate enters its warning horizon."""
        now = datetime.now(UTC)
        horizon = timedelta(seconds=self.config.expiry_warning)
        moments = []
        for name in self.config.identities:
            selected = self.book.selection(name).selected
            if selected is not None and selected.cert is not None:
                starts = warning_starts(horizon, selected.cert.not_valid_before_utc, selected.cert.not_valid_after_utc)
                if starts > now:
                    moments.append(starts)
        return min(moments, default=None)

    async def _follow_renewals(self) -> None:
        """A renewal that starts failing (or works again) changes the expiry warnings at once."""
        with self.events.subscribe() as events:
            while True:
                event = await events.get()
                if event["type"] in ("renewal.failed", "renewal.succeeded", "renewal.state"):
                    self._tell_expiry()

    # --- status

    def status(self, now: datetime | None = None) -> dict[str, Any]:
        """The status document (the control API serves this shape)."""
        now = now or datetime.now(UTC)
        identities = {name: self._identity_status(name, now) for name in self.config.identities}
        routes = self.routes_status()
        warnings = [
            identity["expiry_warning"] for identity in identities.values() if identity["expiry_warning"] is not None
        ]
        kept = {name: self.book.selection(name).kept for name in identities}
        warnings += [last_good.sentence(name) for name, last_good in kept.items() if last_good is not None]
        warnings += [
            f"route {name}: server verification is turned off (unsafe_skip_verify)"
            for name, listener in self.listeners.items()
            if listener.route.unsafe_skip_verify
        ]
        warnings += [
            f"route {name}: listens on {listener.route.listen}, which other machines can reach (unsafe_listen): "
            "whoever connects uses your identity"
            for name, listener in self.listeners.items()
            if listener.route.unsafe_listen
        ]
        if PEER_CHECK.method is None and any(lst.route.listen.kind == "tcp" for lst in self.listeners.values()):
            warnings.append(f"other users' connections to TCP routes are not refused: {PEER_CHECK.detail}")
        warnings += [
            f"route {name}: {listener.counters.last_warning}"
            for name, listener in self.listeners.items()
            if listener.counters.last_warning
        ]
        proxy = self.config.proxy
        warnings += [
            f"proxy rule {rule.name}: server verification is turned off (unsafe_skip_verify)"
            for rule in proxy.rules
            if rule.unsafe_skip_verify
        ]
        if proxy.enabled and proxy.unsafe_listen:
            warnings.append(
                f"the proxy listens on {proxy.listen}, which other machines can reach (unsafe_listen): "
                "whoever connects uses your identities"
            )
        if self.proxy is not None and self.proxy.last_error:
            warnings.append(self.proxy.last_error)
        if self.metrics_server is not None and self.metrics_server.last_error:
            warnings.append(self.metrics_server.last_error)
        if self.config.metrics_listen is not None and not self.config.metrics_listen.is_loopback:
            warnings.append(
                f"the metrics listen on {self.config.metrics_listen}, which other machines can reach "
                "(metrics_unsafe_listen): they show route and identity names"
            )
        if self.config_error:
            warnings.append(f"config.toml was not applied: {self.config_error}")
        return {
            "version": __version__,
            "active_identity": self.active_identity,
            "identities": identities,
            "routes": routes,
            "proxy": self.proxy_status(),
            "warnings": warnings,
            "config": {"path": str(self.places.config_file), "error": self.config_error},
            "daemon": {
                "pid": os.getpid(),
                "data_folder": str(self.places.lock_file.parent),
                "loop": running_loop_name(),  # uvloop where it exists, else asyncio's own
                "control": self.control_info() if self.control_info is not None else None,
                "metrics": self.metrics_status(),
            },
            "generated_at": rfc3339(now),
        }

    def _identity_status(self, name: str, now: datetime) -> dict[str, Any]:
        selection = self.book.selection(name)
        # Reasons that age ("expired 3 days ago") are worded now, not when the keystore was read.
        candidates = [
            {"file": r.candidate.file, "usable": False, "reason": r.reason_at(now)} for r in selection.rejected
        ]
        if selection.selected is not None and selection.kept is None:
            candidates.insert(0, {"file": selection.selected.file, "usable": True, "reason": None})
        elif selection.kept is not None:
            for candidate in candidates:  # the broken file: shown with its reason, and what is kept from it
                if candidate["file"] == selection.kept.file:
                    candidate["kept_last_good"] = True
        return {
            "selected": describe_certificate(selection.selected),
            "candidates": candidates,
            "folder": str(self.book.folder(name)),
            "renewal": self._renewal_status(name, selection),
            "problem": selection.why_unusable(now) or None,
            "expiry_warning": self.expiry_warning(name, now),
            # The file the presented certificate came from is broken now; it is presented from memory.
            "kept_last_good": {"file": selection.kept.file, "reason": selection.kept.reason}
            if selection.kept
            else None,
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
        identity = self.identity_for(listener.route)
        return listener.status(identity=identity, has_certificate=self.book.selection(identity).usable)

    def routes_status(self) -> dict[str, Any]:
        return {name: self._route_status(listener) for name, listener in self.listeners.items()}

    def route_status(self, name: str) -> dict[str, Any]:
        """One route's status, without building the whole document."""
        self._require_route(name)
        return self._route_status(self.listeners[name])


def describe_certificate(candidate: Candidate | None) -> dict[str, Any] | None:
    if candidate is None or candidate.cert is None:
        return None
    cert = candidate.cert
    return {
        "serial": f"{cert.serial_number:x}",
        "subject": quoted(cert.subject.rfc4514_string()),
        "issuer": quoted(cert.issuer.rfc4514_string()),
        "not_before": rfc3339(cert.not_valid_before_utc),
        "not_after": rfc3339(cert.not_valid_after_utc),
        "file": candidate.file,
        "sha256": candidate.fingerprint,
    }


def log_file_path(places: Places) -> Path:
    return places.logs / "daemon.log"
