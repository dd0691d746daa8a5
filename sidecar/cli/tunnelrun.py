"""The running `tunnel`: its listener, reloads, status port and staged shutdown.

- Start-up refuses what would make every connection fail (`check_trust_and_credential`,
  `resolve_target`): a one-shot command says so at once rather than serving refusals.
- Reload (SIGHUP, SIGUSR1, `--timed-reload`, a change in the keystore's folder): the credential
  files and `--cacert` are read again; new connections use them, open ones stay as they are.
- Stop (SIGINT, SIGTERM, `POST /_shutdown`): no new connections; open ones have
  `--shutdown-timeout` to finish and the tunnel exits 0 as soon as they have; then they are cut
  and it exits 1. A second stop signal cuts them at once (exit 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sidecar import __version__
from sidecar.cli.tunnelcreds import SOURCE, FlagCredentials
from sidecar.config import RouteSpec
from sidecar.errors import ConfigError, LocalSetupError
from sidecar.keystore import Selection
from sidecar.metrics import identity_sample, render
from sidecar.metricsserver import MetricsServer
from sidecar.statusport import Figures, StatusAddress, answer
from sidecar.stopsignals import on_reload_signals, on_stop_signals
from sidecar.tlsctx import ContextCache, ServerPolicy, build_client_context, load_credential
from sidecar.tunnel import AcceptGuard, ConnectionBudget, RouteListener
from sidecar.units import rfc3339
from sidecar.watch import FolderWatch

log = logging.getLogger("sidecar.tunnel")


@dataclass(frozen=True)
class ServeOptions:
    shutdown_timeout: float = 300.0
    timed_reload: float | None = None
    status: StatusAddress | None = None
    enable_shutdown: bool = False
    cacert: Path | None = None


# --- start-up checks


def check_trust_and_credential(route: RouteSpec, credentials: FlagCredentials | None) -> None:
    """Build the client context once now: a --cacert that holds no certificate, or a credential
    `ssl` will not load, is a usage error before any connection is accepted."""
    policy = ServerPolicy.for_route(route)
    try:
        build_client_context(None, policy)
    except ConfigError as exc:
        raise ConfigError(
            exc.message, source=SOURCE, field="--cacert", value=str(route.ca_file), hint=exc.hint
        ) from exc
    selected = credentials.current.selected if credentials is not None else None
    if selected is None:
        return
    try:
        build_client_context(selected, policy)
    except (ssl.SSLError, ValueError, OSError) as exc:
        raise ConfigError(
            f"the client certificate cannot be used for TLS: {exc}",
            source=SOURCE,
            field=credentials.flag if credentials else "--cert",
            value=credentials.value if credentials else None,
        ) from exc


def route_has_proxy(route: RouteSpec) -> bool:
    """An upstream proxy resolves the target's name itself: ours need not resolve it."""
    return route.upstream_proxy is not None


def resolve_target(route: RouteSpec) -> None:
    """The target's name must resolve now (`--skip-resolve` for one that will later): LocalSetupError."""
    try:
        socket.getaddrinfo(route.target_host, route.target_port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise LocalSetupError(
            f"command line: --target {route.target}: the name {route.target_host!r} does not resolve "
            f"({getattr(exc, 'strerror', None) or exc}); check the name, or pass --skip-resolve to start anyway "
            "(for a name that resolves once the network or VPN is up)"
        ) from exc


# --- serving


class RunningTunnel:
    def __init__(
        self, route: RouteSpec, credentials: FlagCredentials | None, options: ServeOptions, children: list[int]
    ) -> None:
        self.route = route
        self.credentials = credentials
        self.options = options
        self.children = children
        self.contexts = ContextCache()
        # One route: the process's cap is the route's (--max-concurrent-conns), not the daemon's over all routes.
        self.listener = RouteListener(
            route, self._selection, self.contexts, budget=ConnectionBudget(route.max_connections)
        )
        if credentials is not None:
            self.listener.current_selection = lambda _route: credentials.current  # warm connections: still current?
        self.stop = asyncio.Event()
        self.force = asyncio.Event()
        self.state = "starting"
        self.last_reload = datetime.now(UTC)
        self._trust_digest = _digest(options.cacert)
        self._status_fingerprint = ""
        self.status_port: MetricsServer | None = None
        self._watch: FolderWatch | None = None

    async def _selection(self, _route: RouteSpec) -> Selection:
        assert self.credentials is not None
        return self.credentials.current

    # --- reload

    def reload(self, why: str) -> None:
        """Read the credential files and --cacert again; new connections use what they hold now."""
        self.state = "reloading"
        try:
            changed = False
            if self.credentials is not None:
                before = self.credentials.current.selected
                after = self.credentials.reload().selected
                changed = (before.fingerprint if before else "") != (after.fingerprint if after else "")
            digest = _digest(self.options.cacert)
            if digest != self._trust_digest and self._trust_loads():
                self._trust_digest = digest
                self.contexts.forget_trust()
                log.info("--cacert changed: new connections verify the server with it as it is now")
                changed = True
            if changed:
                self.listener.refresh_warm(why)
                self._status_follows_reload()
            self.last_reload = datetime.now(UTC)
            log.debug("reloaded (%s)", why)
        finally:
            self.state = "stopping" if self.stop.is_set() else "listening"

    def _trust_loads(self) -> bool:
        """A --cacert that became unreadable or empty keeps the trust read before (as a keystore file does)."""
        try:
            build_client_context(None, ServerPolicy.for_route(self.route))
        except ConfigError as exc:
            log.warning("--cacert is broken now (%s): new connections keep the trust read before", exc.message)
            return False
        return True

    def _reload_signalled(self, sig: signal.Signals) -> None:
        log.info("%s: reloading the client certificate and --cacert", sig.name)
        for pid in self.children:  # workers serve the same port: they reload too
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        self.reload(sig.name)

    async def _timed_reloads(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            self.reload("--timed-reload")

    # --- stop

    def _stop_signalled(self, sig: signal.Signals) -> None:
        if self.stop.is_set():
            if not self.force.is_set():
                log.warning("second stop signal: cutting open connections now instead of waiting for them")
            self.force.set()
        else:
            self.request_stop(sig.name)

    def request_stop(self, why: str) -> None:
        if self.stop.is_set():
            return
        log.info(
            "stopping (%s): no new connections; open ones have %s to finish (Ctrl-C again to cut them now)",
            why,
            _seconds(self.options.shutdown_timeout),
        )
        self.state = "stopping"
        self.stop.set()

    async def _drain(self) -> int:
        """0 when every open connection finished by itself, 1 when some were cut."""
        drained = asyncio.ensure_future(self.listener.stop(self.options.shutdown_timeout))
        forced = asyncio.ensure_future(self.force.wait())
        try:
            await asyncio.wait({drained, forced}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            forced.cancel()
        if drained.done():
            if drained.result():
                return 0
            log.warning(
                "open connections were cut: --shutdown-timeout (%s) passed", _seconds(self.options.shutdown_timeout)
            )
            return 1
        drained.cancel()
        await asyncio.gather(drained, return_exceptions=True)
        self.listener.cut()
        return 1

    # --- the status port

    def _status_tls(self) -> ssl.SSLContext | None:
        """The status port's TLS context, holding the client certificate presented now (None: plain
        HTTP, as ghostunnel falls back to when there is no certificate)."""
        selected = self.credentials.current.selected if self.credentials is not None else None
        if selected is None:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        load_credential(ctx, selected)
        self._status_fingerprint = selected.fingerprint
        return ctx

    def _status_follows_reload(self) -> None:
        """Load the credential presented now into the status port's context: the next handshake shows it."""
        port = self.status_port
        selected = self.credentials.current.selected if self.credentials is not None else None
        if port is None or port.ssl_context is None or selected is None:
            return
        if selected.fingerprint != self._status_fingerprint:
            load_credential(port.ssl_context, selected)
            self._status_fingerprint = selected.fingerprint

    async def status_document(self) -> dict[str, Any]:
        backend_error = await self._backend_problem() if self.state != "stopping" else "stopping"
        ok = backend_error is None and self.state in ("listening", "reloading")
        document: dict[str, Any] = {
            "ok": ok,
            "status": "ok" if ok else "critical",
            "message": self.state,
            "listen_address": str(self.listener.bound or self.route.listen),
            "forward_address": self.route.target,
            "backend_ok": backend_error is None,
            "backend_status": "ok" if backend_error is None else "critical",
            "time": rfc3339(datetime.now(UTC)),
            "last_reload": rfc3339(self.last_reload),
            "version": __version__,
            "certificate": self._certificate(),
            "route": self.route_status(),
        }
        if backend_error is not None:
            document["backend_error"] = backend_error
        return document

    def route_status(self) -> dict[str, Any]:
        usable = self.credentials is None or self.credentials.current.usable
        return self.listener.status(identity="tunnel", has_certificate=usable)

    def _certificate(self) -> dict[str, Any] | None:
        if self.credentials is None:
            return None
        selection = self.credentials.current
        selected = selection.selected
        if selected is None or selected.cert is None:
            return {"usable": False, "problem": selection.why_unusable()}
        cert = selected.cert
        return {
            "usable": True,
            "subject": cert.subject.rfc4514_string(),
            "serial": f"{cert.serial_number:x}",
            "not_after": rfc3339(cert.not_valid_after_utc),
            "file": selected.file,
            "kept_last_good": {"file": selection.kept.file, "reason": selection.kept.reason}
            if selection.kept
            else None,
        }

    async def _backend_problem(self) -> str | None:
        """ghostunnel's client-mode backend check: a whole mTLS connection to the target."""
        from sidecar.check.observe import check_route  # only when the status port asks

        route = self.route
        if self.credentials is None:  # no certificate to present: the TCP connection is what we can check
            try:
                async with asyncio.timeout(route.connect_timeout):
                    _, writer = await asyncio.open_connection(route.target_host, route.target_port)
                writer.close()
                return None
            except (OSError, TimeoutError) as exc:
                return f"cannot connect to {route.target}: {exc}"
        result = await check_route(route, self.credentials.current, timeout=route.connect_timeout)
        return None if result.ok else result.message

    def metrics_text(self) -> str:
        """The daemon's metric families for this one route (named `tunnel`) and its certificate."""
        identities = {"tunnel": identity_sample(self.credentials.current)} if self.credentials is not None else {}
        return render({"tunnel": self.route_status()}, identities, now=datetime.now(UTC))

    def metrics_json(self) -> dict[str, Any]:
        return {"route": self.route_status(), "certificate": self._certificate()}

    # --- the whole run

    async def run(self, reuse_port: bool) -> int:
        loop = asyncio.get_running_loop()
        AcceptGuard().install(loop)  # out of descriptors: one log line, not a traceback per accept
        self.listener.reuse_port = reuse_port
        await self.listener.start()
        tasks: list[asyncio.Task[None]] = []
        try:
            await self._start_status_port()
            folder = self.credentials.watched_folder if self.credentials is not None else None
            if folder is not None and folder.is_dir():
                self._watch = FolderWatch(folder, loop, lambda: self.reload("a keystore file changed"), recursive=False)
                self._watch.start()
            if self.options.timed_reload:
                tasks.append(asyncio.create_task(self._timed_reloads(self.options.timed_reload)))
            on_stop_signals(loop, self._stop_signalled)  # SIGINT, SIGTERM (Windows: Ctrl-C, Ctrl-Break)
            on_reload_signals(loop, self._reload_signalled)  # SIGHUP, SIGUSR1 (not on Windows)
            self.state = "listening"
            log.info("listening on %s → %s (%s)", self.listener.bound, self.listener.target, self._who())
            await self.stop.wait()
            if self._watch is not None:
                self._watch.stop()
            return await self._drain()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.status_port is not None:
                await self.status_port.stop()
            self.listener.close()

    async def _start_status_port(self) -> None:
        address = self.options.status
        if address is None:
            return
        figures = Figures(status=self.status_document, metrics_text=self.metrics_text, metrics_json=self.metrics_json)
        shutdown = (lambda: self.request_stop("POST /_shutdown")) if self.options.enable_shutdown else None
        port = MetricsServer(
            address.listen,
            lambda method, target: answer(method, target, figures, shutdown=shutdown),
            what=f"--status {address}",
            ssl_context=self._status_tls() if address.tls else None,
        )
        await port.start()  # LocalSetupError naming the flag and address: exit 1
        self.status_port = port

    def _who(self) -> str:
        if self.credentials is None:
            return "no client certificate (--disable-authentication)"
        selected = self.credentials.current.selected
        if selected is None or selected.cert is None:
            return "no usable certificate: connections are refused"
        cert = selected.cert
        return f"serial {cert.serial_number:x}, expires {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"


async def serve(
    route: RouteSpec,
    credentials: FlagCredentials | None,
    options: ServeOptions,
    *,
    reuse_port: bool = False,
    children: list[int] | None = None,
) -> int:
    return await RunningTunnel(route, credentials, options, children or []).run(reuse_port)


def _digest(path: Path | None) -> str:
    """What --cacert holds now (a change means a rebuild of the contexts)."""
    if path is None:
        return ""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        return f"unreadable: {exc.strerror}"


def _seconds(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"
