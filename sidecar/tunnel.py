"""Listeners on loopback that tunnel each plaintext connection to a remote over mutual TLS.

Each accepted connection is a chain (docs/architecture.md has the picture):

    local client ─▶ _PlainSide ─▶ protocol stage ─▶ TLSPipe ─▶ _RemoteSide ─▶ remote socket

`_PlainSide` faces the local client and drives the chain; the protocol stage
(`sidecar.stages`, sans-I/O) may speak before TLS starts and rewrite bytes after, and steps
aside once it has nothing to add (the `tcp` protocol's `PassThrough` always has); the TLS is
our own `TLSPipe` over memory BIOs, so a half-close stays a half-close in each direction
(asyncio's own SSL transport cannot write an EOF); `_RemoteSide` owns the remote socket.
All the asyncio I/O of a tunnel is in this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import ssl
import stat
import struct
import time
from asyncio.trsock import TransportSocket
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from sidecar import failures, policy
from sidecar.causes import Cause, Fault, cause_of, fault_from
from sidecar.config import DEFAULT_MAX_CONNECTIONS, ListenAddress, RouteSpec
from sidecar.credentials import Candidate
from sidecar.durations import Durations
from sidecar.errors import ConfigError, LocalSetupError
from sidecar.failures import Failure
from sidecar.keystore import Selection
from sidecar.peercred import describe_peer_check, peer_uid, user_name
from sidecar.protocols import make_stage
from sidecar.protocols.postgres import looks_like_postgres_client
from sidecar.revocation.checker import RevocationChecker, check_server_policy
from sidecar.stages import (
    Close,
    Command,
    Count,
    EndLocal,
    EndRemote,
    Handoff,
    Refuse,
    SendLocal,
    SendRemote,
    Stage,
    StartLocalTLS,
    StartTLS,
)
from sidecar.tlsctx import ContextCache, ServerPolicy
from sidecar.tlspipe import (
    CertificateRejected,
    CloseNotify,
    Event,
    Failed,
    Flow,
    HandshakeDone,
    Received,
    Reset,
    TLSPipe,
    Truncated,
)
from sidecar.units import rfc3339
from sidecar.upstreamdial import open_to_target
from sidecar.warm import WarmPool

log = logging.getLogger("sidecar.tunnel")

PEER_CHECK = describe_peer_check()
OWN_UID: int | None = os.getuid() if hasattr(os, "getuid") else None
# Windows' Python has no AF_UNIX: unix-socket routes are refused there by config (ListenAddress), and
# sockets are never of that family.
AF_UNIX: int | None = getattr(socket, "AF_UNIX", None)

READ_CHUNK = 64 * 1024
# Fires when a side of the pair has more than this waiting to be written.
HIGH_WATER = 256 * 1024
# How many times, at most, to look for the server's session ticket on one connection (TLS 1.3
# servers send it with their first records after the handshake).
SESSION_LOOKS = 8


# Failures that say nothing about whether the route works: a local client from another OS user
# was turned away before anything was tried; an identity with nothing to present shows live as
# health "no_certificate" instead (it ends when a certificate arrives, not at the next connection).
NOT_HEALTH = frozenset({Cause.OTHER_USER, Cause.PEER_UNKNOWN, Cause.TOO_MANY_CONNECTIONS, Cause.NO_USABLE_CERT})

# accept() failing with these: the process (or the system) is out of descriptors or memory.
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
EXHAUSTED_QUIET = 10.0  # seconds without the error before another shortage is logged again


class ConnectionBudget:
    """Open tunnels over all routes (the top-level `max_connections`): one per daemon, shared by
    its listeners; each route also has its own cap."""

    def __init__(self, limit: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.limit = limit
        self.open = 0


class AcceptGuard:
    """The event loop's exception handler: an accept() that fails for lack of descriptors.

    asyncio's loop already stops accepting on that socket and tries again a second later; what it
    also does is hand the error, with a traceback, to the loop's exception handler at every
    attempt. This handler says it in one line per shortage (a shortage ends when accept() went
    `EXHAUSTED_QUIET` seconds without failing) and passes every other error on.
    """

    def __init__(self) -> None:
        self.previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None = None
        self.last_failed: float | None = None  # when accept() last failed for lack of descriptors
        self.failed = 0  # accept() failures, all told

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Become `loop`'s exception handler (the one before it gets every other error)."""
        if loop.get_exception_handler() is not self:
            self.previous = loop.get_exception_handler()
            loop.set_exception_handler(self)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in EXHAUSTED and "accept" in str(context.get("message", "")):
            now = time.monotonic()
            if self.last_failed is None or now - self.last_failed >= EXHAUSTED_QUIET:
                log.error(
                    "out of file descriptors (%s): new local connections wait until open ones close; "
                    "lower max_connections or raise the limit (ulimit -n)",
                    errno.errorcode.get(exc.errno or 0, exc.errno),
                )
            self.last_failed = now
            self.failed += 1
            return
        if self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)


@dataclass
class RouteCounters:
    """What a route's connections did. Health (README, "Route health"): each connection has one
    outcome, decided once: a success when the server's first application bytes reach the local
    side, or a failure when it fails before that. The latest outcome is the route's."""

    active: int = 0
    total: int = 0
    bytes_in: int = 0  # remote service → local clients
    bytes_out: int = 0  # local clients → remote service
    failures: Counter[str] = field(default_factory=Counter)
    last_error: str | None = None
    last_error_at: datetime | None = None
    last_success_at: datetime | None = None
    # "ok" or "failing" once a connection had an outcome; None: nothing tried yet ("idle")
    outcome: str | None = None
    # the failures since the last success: when the first was, how many, the latest one's cause
    failing_since: datetime | None = None
    failing_count: int = 0
    failing_cause: Cause | None = None
    # Connections let through with a warning (revocation = "soft" and no answer), by reason.
    warnings: Counter[str] = field(default_factory=Counter)
    last_warning: str | None = None
    # TLS handshakes with the target (warm connections' too): from the ClientHello to the
    # handshake's end, so neither the TCP connect nor a protocol's prelude counts.
    handshakes: Durations = field(default_factory=Durations)

    def fail(self, failure: Failure, now: datetime, *, outcome: bool = True) -> None:
        """Count a failure; `outcome`: it decided a connection's outcome (the route is failing)."""
        self.failures[failure.reason] += 1
        self.last_error = failure.message
        self.last_error_at = now
        if not outcome or failure.reason in NOT_HEALTH:
            return
        if self.outcome != "failing":
            self.failing_since = now
            self.failing_count = 0
        self.outcome = "failing"
        self.failing_count += 1
        self.failing_cause = failure.reason

    def succeed(self, now: datetime) -> None:
        self.last_success_at = now
        self.outcome = "ok"
        self.failing_since = None
        self.failing_count = 0
        self.failing_cause = None

    def forget_outcome(self) -> None:
        """The route's settings changed: what its connections did says nothing about the new ones."""
        self.outcome = None
        self.failing_since = None
        self.failing_count = 0
        self.failing_cause = None


# Given the route as it is now (its identity may change at run time). Async so that a route can
# wait briefly for an enrollment or a due renewal to finish.
SelectionSource = Callable[[RouteSpec], Awaitable[Selection]]


class RouteListener:
    """One route's listener: start(), stop(), is_running, last_error, counters."""

    def __init__(
        self,
        route: RouteSpec,
        selection: SelectionSource,
        contexts: ContextCache,
        chains: policy.ChainMemory | None = None,
        budget: ConnectionBudget | None = None,
    ) -> None:
        self.route = route
        self.budget = budget if budget is not None else ConnectionBudget()
        self.selection = selection
        self.contexts = contexts
        self.policy = ServerPolicy.for_route(route)
        self.revocation = RevocationChecker()
        self.chains = chains if chains is not None else policy.ChainMemory()
        self.counters = RouteCounters()
        self.last_error: str | None = None
        self.last_error_at: datetime | None = None
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[_PlainSide] = set()
        self._drained = asyncio.Event()
        self._drained.set()
        self.bound: ListenAddress | None = None
        # (device, inode) of the unix socket file this listener made: the only one close() removes.
        self._made_socket: tuple[int, int] | None = None
        self.reuse_port = False  # several processes share one TCP port (SO_REUSEPORT)
        self.on_failure: Callable[[str, Failure], None] | None = None
        # Called with the route's name when its connections' outcome changes (ok ↔ failing, a new cause).
        self.on_outcome: Callable[[str], None] | None = None
        # A new protocol stage per connection (sidecar.protocols); `tcp` passes bytes untouched.
        self.stage_factory: Callable[[], Stage] = self._make_stage
        # `local_tls` routes: the server context the local client's TLS ends in (the daemon's dev CA).
        self.local_tls_context: Callable[[], ssl.SSLContext] | None = None
        # Connections taken over from another listener (the proxy): where a `Handoff` gives them back.
        self.on_handoff: Callable[[asyncio.Transport, bytes], None] | None = None
        # How log lines name this listener: "route NAME", or the proxy's destination.
        self.label = f"route {route.name}"
        # `preconnect`: connections made ahead (sidecar/warm.py); and what a new connection would
        # present now, to tell a warm one that has gone stale (the daemon's keystore selection).
        self.warm: WarmPool | None = None
        self.current_selection: Callable[[RouteSpec], Selection] | None = None

    @property
    def name(self) -> str:
        return self.route.name

    def update(self, route: RouteSpec) -> None:
        """New settings for new connections (same listen address); open connections keep theirs."""
        assert route.listen == self.route.listen, "a new listen address needs a new listener"
        self.route = route
        self.policy = ServerPolicy.for_route(route)
        self.counters.forget_outcome()
        self.start_warm()

    # --- warm connections (`preconnect`)

    def start_warm(self) -> None:
        """Keep warm connections as the route's `preconnect` says (none: the pool goes)."""
        route = self.route
        pool = self.warm
        if pool is not None and (pool.size, pool.max_idle) == (route.preconnect, route.preconnect_max_idle):
            pool.invalidate("the route's settings changed")
            return
        if pool is not None:
            pool.close()
            self.warm = None
        if route.preconnect in (0, "0"):
            return
        self.warm = WarmPool(
            route.preconnect, route.preconnect_max_idle, self._warm_side, self._warm_stale, name=self.label
        )
        self.warm.fill()

    def refresh_warm(self, reason: str) -> None:
        """What a new connection presents or trusts changed: warm connections are made anew."""
        if self.warm is not None:
            self.warm.invalidate(reason)

    def _warm_side(self) -> _PlainSide:
        side = _PlainSide(self, warm=True)
        side.start_warming()
        return side

    def _warm_stale(self, side: Any) -> str | None:
        """Why a ready warm connection may not serve a client now (None: it is what a new one would be)."""
        conn = cast(_PlainSide, side)
        if conn.route_used is not self.route and conn.route_used != self.route:
            return "the route's settings changed"
        if conn.closed or conn.remote is None or conn.remote.eof or conn.remote.lost:
            return "closed by the server"
        if self.current_selection is not None and self.route.client_auth:
            selected = self.current_selection(self.route).selected
            if selected is None or self.contexts.peek(selected, self.policy) is not conn.ctx:
                return "the identity, its certificate or the trust changed"
        return None

    def warm_status(self) -> dict[str, Any] | None:
        return self.warm.status() if self.warm is not None else None

    def health(self, *, has_certificate: bool) -> str:
        """ok, failing, idle (no connection had an outcome yet), no_certificate or stopped."""
        if not self.is_running:
            return "stopped"
        if not has_certificate:
            return "no_certificate"
        return self.counters.outcome or "idle"

    def status(self, *, identity: str, has_certificate: bool) -> dict[str, Any]:
        """This route as status shows it (the control API serves this shape).

        `identity`: the identity its new connections use; `has_certificate`: whether that
        identity has a usable certificate now (the daemon knows, the listener does not).
        """
        route = self.route
        counters = self.counters
        if not self.is_running:
            state = "error" if self.last_error else "stopped"
        elif not has_certificate:
            state = "no_certificate"
        else:
            state = "up"
        health = self.health(has_certificate=has_certificate)
        failing = None
        if health == "failing" and counters.failing_since is not None:
            failing = {
                "since": rfc3339(counters.failing_since),
                "cause": str(counters.failing_cause),
                "count": counters.failing_count,
            }
        last_error_at = self.last_error_at if self.last_error else counters.last_error_at
        return {
            "listen": str(self.bound or route.listen),
            "target": self.target,
            "server_name": route.server_name,
            "upstream_proxy": route.upstream_proxy,  # reached through this HTTP CONNECT or SOCKS5 proxy
            "protocol": route.protocol,
            "identity": identity,
            "state": state,  # the listener's own state (kept for older clients); health says whether it works
            "health": health,
            "failing": failing,
            "active_connections": counters.active,
            "total_connections": counters.total,
            "bytes_in": counters.bytes_in,
            "bytes_out": counters.bytes_out,
            "failures": {str(cause): n for cause, n in counters.failures.items()},
            "last_error": self.last_error or counters.last_error,
            "last_error_at": rfc3339(last_error_at) if last_error_at else None,
            "last_success": rfc3339(counters.last_success_at) if counters.last_success_at else None,
            # connections let through despite a problem (revocation = "soft"), by reason, and the latest
            "warnings": {str(cause): n for cause, n in counters.warnings.items()},
            "last_warning": counters.last_warning,
            # TLS handshakes with the target: how many, their total seconds, cumulative buckets
            "handshake_seconds": counters.handshakes.to_json(),
            "policy": {
                "pins": len(route.pin_sha256),
                **{key: list(values) for key, values in route.server_allow_list.by_key().items()},
                "revocation": route.revocation,
                "crl_file": str(route.crl_file) if route.crl_file else None,
            },
            "verify": not route.unsafe_skip_verify,
            # listening beyond loopback: other machines can reach it and use our identity (a warning too)
            "unsafe_listen": route.unsafe_listen,
            # how connections from other OS users are kept out ("method": null: they cannot be)
            "peer_check": self.peer_check(),
            # `preconnect`: warm connections ready and warming, and how often a client found one
            "warm": self.warm_status(),
        }

    def peer_check(self) -> dict[str, str | None]:
        """How connections from other OS users are refused on this route (method None: they cannot be)."""
        if self.route.listen.kind == "unix":
            method = "so-peercred" if hasattr(socket, "SO_PEERCRED") else "socket-mode"
            return {"method": method, "detail": "the socket is 0600; on Linux the peer's uid is checked too"}
        return {"method": PEER_CHECK.method, "detail": PEER_CHECK.detail}

    def _make_stage(self) -> Stage:
        return make_stage(self.route, self.bound or self.route.listen)

    @property
    def is_running(self) -> bool:
        return self._server is not None and self._server.is_serving()

    @property
    def target(self) -> str:
        return self.route.target

    async def start(self) -> None:
        """Bind and start accepting; raises LocalSetupError with a message naming the route."""
        loop = asyncio.get_running_loop()
        listen = self.route.listen
        try:
            if listen.kind == "unix":
                sock, self._made_socket = _bind_unix(listen.path)
                try:
                    # `sock=`: asyncio's own path handling would delete whatever socket is there
                    self._server = await loop.create_unix_server(self._new_connection, sock=sock)
                except BaseException:
                    sock.close()
                    self._remove_own_socket()
                    raise
                self.bound = listen
            else:
                self._server = await loop.create_server(
                    self._new_connection,
                    listen.host,
                    listen.port,
                    reuse_address=True,
                    reuse_port=self.reuse_port or None,
                )
                port = self._server.sockets[0].getsockname()[1]
                self.bound = ListenAddress("tcp", listen.host, port)
        except OSError as exc:
            self.last_error = _listen_error(self.route, exc)
            self.last_error_at = datetime.now(UTC)
            raise LocalSetupError(self.last_error) from exc
        self.last_error = None
        self.last_error_at = None
        self.start_warm()

    async def stop(self, grace: float) -> bool:
        """Stop accepting, let open connections finish for up to `grace` seconds, then cut them.
        True when every one finished by itself."""
        self.close()
        return await self.drain(grace)

    def close(self) -> None:
        """Stop accepting new connections (the address is free again at once)."""
        if self.warm is not None:
            self.warm.close()
            self.warm = None
        if self._server is not None:
            self._server.close()
            self._server = None
            self._remove_own_socket()

    def _remove_own_socket(self) -> None:
        """Remove the unix socket file this listener made, and only it: a file another program
        put at that path since (or that was there before us) stays."""
        made, self._made_socket = self._made_socket, None
        path = self.route.listen.path
        if made is None or not path:
            return
        with contextlib.suppress(FileNotFoundError):
            info = os.lstat(path)
            if (info.st_dev, info.st_ino) == made:
                os.unlink(path)

    async def drain(self, grace: float) -> bool:
        """Let open connections finish for up to `grace` seconds, then cut them. True when every
        one finished by itself."""
        finished = True
        if self._connections:
            log.info(
                "%s: waiting up to %.0fs for %d connection(s) to finish", self.label, grace, len(self._connections)
            )
            try:
                await asyncio.wait_for(self._drained.wait(), grace)
            except TimeoutError:
                finished = False
        self.cut()
        return finished

    def cut(self) -> None:
        """End every open connection now (both sides aborted)."""
        for conn in list(self._connections):
            conn.abort()

    def _new_connection(self) -> _PlainSide:
        if self.warm is not None:
            side = self.warm.take()
            if side is not None:
                return cast(_PlainSide, side)
        return _PlainSide(self)

    def adopt(
        self,
        transport: asyncio.Transport,
        make_stage: Callable[[], Stage],
        data: bytes = b"",
        eof: bool = False,
        *,
        wrap: Callable[[Stage], Stage] | None = None,
    ) -> None:
        """Take over a local connection another listener accepted (the proxy) and already checked
        for its owner: the stage `make_stage()` gives drives it, `data` is what the client sent that
        the stage reads first, `eof`: the client has finished sending. With `wrap`, a warm connection
        may serve it instead: its own stage (made by `stage_factory`), wrapped for this client, and
        no new stage is made."""
        conn = None
        if self.warm is not None and wrap is not None:
            side = self.warm.take()
            if side is not None:
                conn = cast(_PlainSide, side)
                conn.stage = wrap(conn.stage)
                conn._peer_checked = True
        if conn is None:
            conn = _PlainSide(self, make_stage(), peer_checked=True)
        transport.set_protocol(conn)
        conn.connection_made(transport)
        if data and not conn.closed:
            conn.data_received(data)
        if eof and not conn.closed:
            conn.eof_received()

    def _refusal(self, transport: asyncio.Transport) -> failures.Failure | None:
        return refuse_other_user(transport, "this route")

    def _over_cap(self) -> failures.Failure | None:
        """A failure when the route's or the daemon's `max_connections` tunnels are open already."""
        if self.counters.active >= self.route.max_connections:
            limit, whose = self.route.max_connections, f"routes.{self.name}.max_connections"
        elif self.budget.open >= self.budget.limit:
            limit, whose = self.budget.limit, "max_connections (all routes)"
        else:
            return None
        return failures.Failure(
            Cause.TOO_MANY_CONNECTIONS,
            f"refused a local connection: {limit} tunnel(s) already open, the limit of {whose}",
        )

    def _opened(self, conn: _PlainSide) -> None:
        self._connections.add(conn)
        self._drained.clear()
        self.counters.active += 1
        self.counters.total += 1
        self.budget.open += 1

    def _closed(self, conn: _PlainSide) -> None:
        if conn in self._connections:
            self._connections.discard(conn)
            self.counters.active -= 1
            self.budget.open -= 1
        if not self._connections:
            self._drained.set()

    async def check_server(self, route: RouteSpec, tls: ssl.SSLObject) -> policy.Verdict:
        """Pins, the allow-list and revocation, after the handshake and before any byte is forwarded."""
        verified = not route.unsafe_skip_verify
        chain = policy.peer_chain(tls, verified=verified)
        if chain and tls.session_reused:  # no chain in a resumed session: the one from its full handshake
            chain = self.chains.recall(self.policy, chain[0]) or chain
        else:
            self.chains.remember(self.policy, chain)
        verdict = await check_server_policy(route, chain, self.revocation, now=datetime.now(UTC), verified=verified)
        if verdict.ok and verdict.warning:
            if self.counters.last_warning != verdict.warning:
                log.warning("%s: %s", self.label, verdict.warning)
            self.counters.warnings[Cause.REVOCATION_UNKNOWN] += 1
            self.counters.last_warning = verdict.warning
        elif verdict.ok and route.revocation != "off":
            self.counters.last_warning = None  # a definite answer again
        return verdict

    def _record_failure(self, failure: failures.Failure, conn: _PlainSide | None = None) -> None:
        """Count a failure; when it is the first thing that happened to `conn` (no answer from the
        server yet), it is that connection's outcome, and the route is failing."""
        if conn is not None and (conn.warm or conn.parked):
            # A warm connection no client has joined: its end is the pool's business (sidecar/warm.py).
            log.debug("%s: a warm connection ended: %s", self.label, failure.message)
            return
        decides = conn is None or conn.outcome is None
        if conn is not None and conn.outcome is None:
            conn.outcome = "failed"
        before = (self.counters.outcome, self.counters.failing_cause)
        self.counters.fail(failure, datetime.now(UTC), outcome=decides)
        log.warning("%s: %s", self.label, failure.message)
        if self.on_failure is not None:
            self.on_failure(self.name, failure)
        if (self.counters.outcome, self.counters.failing_cause) != before and self.on_outcome is not None:
            self.on_outcome(self.name)

    def _record_success(self, conn: _PlainSide) -> None:
        """The server's first answer on `conn` reached the local side: the route works."""
        conn.outcome = "ok"
        before = self.counters.outcome
        self.counters.succeed(datetime.now(UTC))
        if before == "failing":
            log.info("%s: works again (a connection got the server's answer)", self.label)
        if before != "ok" and self.on_outcome is not None:
            self.on_outcome(self.name)


def refuse_other_user(transport: asyncio.Transport, what: str) -> failures.Failure | None:
    """A failure when the local peer is another OS user (they would use our identity).

    Where the platform cannot tell (PEER_CHECK.method is None), connections are let in and
    status says so. A peer that is not on loopback is another machine, allowed only by
    the listener's explicit unsafe_listen. `what`: the listener, as the message names it.
    """
    if PEER_CHECK.method is None or OWN_UID is None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    if AF_UNIX is not None and sock.family == AF_UNIX:
        if not hasattr(socket, "SO_PEERCRED"):
            return None  # the socket's 0600 mode is the guard there
    else:
        peer = transport.get_extra_info("peername")
        if peer is None or not ipaddress.ip_address(peer[0].split("%")[0]).is_loopback:
            return None
    uid = peer_uid(sock)
    if uid == OWN_UID:
        return None
    if uid is None:
        return failures.Failure(
            Cause.PEER_UNKNOWN,
            "refused a local connection whose owner could not be found (it was gone, or no descriptor "
            "was left to ask with)",
        )
    return failures.Failure(
        Cause.OTHER_USER,
        f"refused a local connection from uid {user_name(uid)}: {what} uses the identity of uid "
        f"{user_name(OWN_UID)} and serves only that user",
    )


def _bind_unix(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """A unix socket bound at `path`, 0600 from birth, and the (device, inode) of its file.

    Never takes another program's place: a live socket there (someone answers a connect) is
    EADDRINUSE, as a taken port is; a file that is not a socket is EEXIST. Only a stale
    socket, one nobody listens on any more, is removed and the bind tried again.
    """
    for attempt in (1, 2):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # born 0600: no moment where others could connect
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE or attempt == 2:
                raise
            _remove_stale_socket(path)
            continue
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        info = os.lstat(path)
        return sock, (info.st_dev, info.st_ino)
    raise AssertionError("not reached")


def _remove_stale_socket(path: str) -> None:
    info = os.lstat(path)
    if not stat.S_ISSOCK(info.st_mode):
        raise OSError(errno.EEXIST, "a file that is not a socket is there", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise OSError(errno.EADDRINUSE, "a socket is there and cannot be checked", path) from exc
    else:
        raise OSError(errno.EADDRINUSE, "another program listens on that socket", path)
    finally:
        probe.close()
    now = os.lstat(path)
    if (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino):  # still the stale one we probed
        os.unlink(path)


def _listen_error(route: RouteSpec, exc: OSError) -> str:
    where = str(route.listen)
    field_name = f"routes.{route.name}.listen"
    if route.listen.kind == "unix" and exc.errno in (errno.EADDRINUSE, errno.EEXIST):
        fix = "stop that program" if exc.errno == errno.EADDRINUSE else "move it away"
        return (
            f"route {route.name}: cannot listen on {where}: {exc.strerror}; it is left alone: "
            f"{fix}, or choose another path in {field_name}"
        )
    if exc.errno == errno.EADDRINUSE:
        return (
            f"route {route.name}: cannot listen on {where}: address already in use; another "
            f"program holds it (see `ss -ltnp`), or choose another port in {field_name}"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            f"route {route.name}: cannot listen on {where}: permission denied; ports below 1024 "
            f"need privileges, choose another port in {field_name}"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"route {route.name}: cannot listen on {where}: no such local address ({field_name})"
    return f"route {route.name}: cannot listen on {where}: {exc.strerror or exc} ({field_name})"


class _PlainSide(asyncio.Protocol):
    """The local client's connection, and the driver of its chain of stages.

    Reading stays paused until the remote is ready: connected, through the protocol stage's
    prelude and the TLS handshake, and checked (pins, URI SANs, revocation).
    """

    def __init__(
        self, listener: RouteListener, stage: Stage | None = None, *, peer_checked: bool = False, warm: bool = False
    ) -> None:
        self.listener = listener
        self.stage: Stage = stage if stage is not None else listener.stage_factory()
        self._peer_checked = peer_checked  # adopted from the proxy, which checked the owner
        # `preconnect`: made before any client; `parked` once ready, until a client joins. What the
        # server says meanwhile (a banner) waits in `_held_local`. `route_used`/`ctx`: what it was
        # made with, to tell when it is stale.
        self.warm = warm
        self.parked = False
        self.warm_since = 0.0
        self._held_local: list[bytes] = []
        self._held_local_eof = False
        self.route_used: RouteSpec | None = None
        self.ctx: ssl.SSLContext | None = None
        self.transport: asyncio.Transport | None = None
        self.remote: _RemoteSide | None = None
        self.ready = False  # the remote passed every check: bytes flow
        self.failed = False  # a failure was counted for this connection
        # Decided once (see RouteCounters): "ok" at the server's first answer, "failed" at a failure before it.
        self.outcome: str | None = None
        self.local_tls: TLSPipe | None = None  # `local_tls`: TLS towards the local client too
        self.eof = False  # the local client finished sending
        self.closed = False
        self.lost = False  # the local connection is gone
        self._task: asyncio.Task[None] | None = None
        self._early: list[bytes] = []
        # `idle_timeout`: when a byte last went either way, and the timer that looks at it
        self.active_at = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None  # `close_timeout`, once one side finished

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.transport = transport
        transport.pause_reading()
        joining = self.parked  # a warm connection, ready: this client is joined to it
        self.parked = self.warm = False
        refusal = (None if self._peer_checked else self.listener._refusal(transport)) or self.listener._over_cap()
        if refusal is not None:
            self.closed = True
            self.listener._record_failure(refusal, self)
            transport.abort()
            if self.remote is not None:
                self.remote.close()
            return
        if joining:
            self._join(transport)
            return
        self._count_in(transport)
        if not self.stage.transparent:
            transport.resume_reading()  # the stage reads the client's first words itself
        self._task = asyncio.get_running_loop().create_task(
            self._open_remote(), name=f"route {self.listener.name}: open remote"
        )

    def _count_in(self, transport: asyncio.Transport) -> None:
        """An accepted client: counted open, and watched for `idle_timeout`."""
        transport.set_write_buffer_limits(high=HIGH_WATER)
        self.listener._opened(self)
        idle = self.listener.route.idle_timeout
        if idle > 0:
            self.active_at = time.monotonic()
            self._idle_timer = asyncio.get_running_loop().call_later(idle, self._idle_check, idle)

    def start_warming(self) -> None:
        """`preconnect`: connect, prelude, handshake and checks now; `parked` when done."""
        self._task = asyncio.get_running_loop().create_task(
            self._open_remote(), name=f"{self.listener.label}: warm connection"
        )

    def _join(self, transport: asyncio.Transport) -> None:
        """A local client connected to a warm connection: what the server said meanwhile goes to
        it first, then the chain goes on as if the remote had just become ready."""
        self._count_in(transport)
        held, self._held_local = self._held_local, []
        if held:
            transport.write(b"".join(held))
        if self._held_local_eof:
            self.write_eof()
        if self.closed:
            return
        if not self.stage.transparent:
            transport.resume_reading()
        self._after_ready()

    async def _open_remote(self) -> None:
        listener = self.listener
        route = listener.route
        self.route_used = route
        if route.passthrough:
            await self._open_relay()
            return
        credential: Candidate | None = None  # `client_auth = False`: TLS with no client certificate
        if route.client_auth:
            selection = await listener.selection(route)
            if selection.selected is None:
                self._fail(
                    failures.Failure(
                        Cause.NO_USABLE_CERT, f"refused a connection: {selection.why_unusable(datetime.now(UTC))}"
                    )
                )
                return
            credential = selection.selected
        try:
            ctx = self.ctx = listener.contexts.get(credential, listener.policy)
        except Exception as exc:
            fault = fault_from("setup", exc)
            kind = "config" if isinstance(exc, ConfigError) else "credential"
            self._fail(failures.Failure(cause_of(Fault("setup", kind)), f"cannot build TLS context: {fault.text}"))
            return
        remote: _RemoteSide | None = None
        try:
            async with asyncio.timeout(route.connect_timeout):
                _, remote = await open_to_target(
                    route, lambda: _RemoteSide(self, ctx, route.server_name, listener.contexts)
                )
                self.remote = remote
                self._run(self.stage.connected())
                await remote.handshake_done
        except asyncio.CancelledError:  # the local client went away while we connected
            if remote is not None:
                remote.abort()
            raise
        except Exception as exc:
            if remote is not None:
                remote.abort()
            failure = failures.classify(
                exc,
                target=listener.target,
                server_name=route.server_name,
                trust=listener.policy.describe_trust(),
                connected=remote is not None,
                timeout=route.connect_timeout,
                first_bytes=remote.first_bytes() if remote is not None else b"",
                via=route.upstream_proxy,
            )
            self._fail(failure)
            return
        if self.closed:  # the local client gave up while we were connecting
            remote.close()
            return
        if route.checks_after_handshake:
            assert remote.pipe is not None
            try:
                verdict = await listener.check_server(route, remote.pipe.tls)
            except asyncio.CancelledError:  # the local client went away meanwhile
                remote.abort()
                raise
            if not verdict.ok:
                remote.abort()
                self._fail(failures.Failure(verdict.reason or Cause.TLS_ERROR, verdict.message))
                return
            if self.closed:
                remote.close()
                return
        self.ready = True
        remote.approve()
        log.debug(
            "%s: connected to %s as serial %x",
            listener.label,
            listener.target,
            credential.cert.serial_number if credential is not None and credential.cert else 0,
        )
        self._after_ready()

    async def _open_relay(self) -> None:
        """`passthrough`: a plain TCP connection to the target; the client does its own TLS."""
        listener = self.listener
        route = listener.route
        remote: _RemoteSide | None = None
        try:
            async with asyncio.timeout(route.connect_timeout):
                _, remote = await open_to_target(
                    route, lambda: _RemoteSide(self, None, route.server_name, listener.contexts)
                )
        except Exception as exc:
            failure = failures.classify(
                exc,
                target=listener.target,
                server_name=route.server_name,
                trust=listener.policy.describe_trust(),
                connected=False,
                timeout=route.connect_timeout,
                first_bytes=b"",
                via=route.upstream_proxy,
            )
            self._fail(failure)
            return
        self.remote = remote
        if self.closed:
            remote.close()
            return
        self.ready = True
        remote.approve()
        listener._record_success(self)
        self._after_ready()

    def _after_ready(self) -> None:
        """The remote is connected and checked: the stage starts, or the client's bytes flow."""
        if self.closed:
            return
        if self.warm:  # no client yet: wait for one in the pool
            self.parked = True
            pool = self.listener.warm
            if pool is None:
                self.close()
            else:
                pool.became_ready(self)
            return
        assert self.transport is not None
        if not self.stage.transparent:
            self._run(self.stage.tls_established())
            return  # local reading was never paused for it
        for data in self._early:
            self._from_local(data)
        self._early.clear()
        if self.eof:  # the client already finished sending (uvloop read its EOF early)
            self._local_eof()
            return
        self.transport.resume_reading()

    def _fail(self, failure: Failure) -> None:
        """Connecting, the handshake or the route's checks failed: count it (once), tell the stage."""
        if self.failed:
            return
        self.failed = True
        if self.warm:  # no client saw it: the pool backs off, clients connect the usual way
            pool, self.remote = self.listener.warm, None
            self.closed = True
            if pool is not None:
                pool.failed(self, failure.message)
            return
        if self.listener.route.protocol == "tcp" and failure.reason in (Cause.CONNECT, Cause.NOT_TLS):
            failure = self._local_protocol_mismatch() or failure
        self.listener._record_failure(failure, self)
        self.remote = None
        if self.stage.transparent:
            self.close()
        else:
            self._run(self.stage.remote_failed(failure.reason, failure.message))

    def failed_late(self, failure: Failure) -> None:
        """The remote failed after the handshake (already counted): a stage that still reads the
        client may answer it in its protocol (an HTTP 502, say); otherwise close."""
        self.remote = None
        if self.stage.transparent:
            self.close()
        else:
            self._run(self.stage.remote_failed(failure.reason, failure.message))

    def _local_protocol_mismatch(self) -> Failure | None:
        """A `tcp` route whose local client opened with PostgreSQL's SSLRequest or StartupMessage:
        the server then hangs up on our TLS hello, and the fix is on this side."""
        first = b"".join(self._early)[:16] or self._peek_local(16)
        if not looks_like_postgres_client(first):
            return None
        route = self.listener.route
        return failures.Failure(
            Cause.PROTOCOL_MISMATCH,
            f"the local client speaks PostgreSQL, but route {route.name} passes bytes as they are "
            f'(protocol = "tcp"): set protocol = "postgres" for route {route.name}',
        )

    def _peek_local(self, size: int) -> bytes:
        """The first bytes the local client sent, left in the socket (a duplicate descriptor: asyncio keeps its own)."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return b""
        try:
            with socket.fromfd(sock.fileno(), sock.family, sock.type) as raw:
                return raw.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (OSError, ValueError):
            return b""

    # --- the chain: local ⇄ stage ⇄ remote

    def _run(self, commands: list[Command]) -> None:
        for command in commands:
            if isinstance(command, SendRemote):
                if self.remote is not None:
                    self.remote.send(command.data)
            elif isinstance(command, SendLocal):
                self.write(command.data)
            elif isinstance(command, EndRemote):
                if self.remote is not None:
                    self.remote.send_eof()
            elif isinstance(command, EndLocal):
                self.write_eof()
            elif isinstance(command, StartTLS):
                if self.remote is not None:
                    self.remote.start_tls(command.leftover)
            elif isinstance(command, Refuse):
                failure = failures.Failure(cause_of(command.fault), command.message)
                if command.fault.stage == "local" or self.stage.transparent:
                    self.listener._record_failure(failure, self)
                    self.close()
                else:  # the remote side broke the protocol: the stage may tell the client in its own words
                    if self.remote is not None:
                        self.remote.abort()
                    self._fail(failure)
            elif isinstance(command, StartLocalTLS):
                self._start_local_tls(command.leftover)
            elif isinstance(command, Close):
                self.close()
            elif isinstance(command, Count):
                self.listener._record_failure(failures.Failure(cause_of(command.fault), command.message), self)
            elif isinstance(command, Handoff):
                self._hand_back(command.data)

    def _hand_back(self, data: bytes) -> None:
        """`Handoff`: end the remote, and give the local client back to whoever handed it to us."""
        hand, transport = self.listener.on_handoff, self.transport
        if hand is None or transport is None or self.closed:
            self.close()
            return
        self.closed = True
        self.lost = True  # for this side; the connection lives on elsewhere
        self.transport = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self.remote is not None:
            self.remote.close()
        self.listener._closed(self)
        hand(transport, data)

    def _from_local(self, data: bytes) -> None:
        if self.stage.transparent:
            if self.remote is not None:
                self.remote.send(data)
        else:
            self._run(self.stage.from_local(data))

    def _local_eof(self) -> None:
        if self.stage.transparent:
            if self.remote is not None:
                self.remote.send_eof()
        else:
            self._run(self.stage.local_eof())
        if self.remote is not None and self.remote.eof:
            self.close()

    def from_remote(self, data: bytes) -> None:
        """Bytes from the remote: raw before the protocol stage's StartTLS, plaintext after."""
        if self.stage.transparent:
            self.write(data)
        else:
            self._run(self.stage.from_remote(data))

    def remote_eof(self) -> None:
        if self.stage.transparent:
            self.write_eof()
        else:
            self._run(self.stage.remote_eof())
        self._one_side_finished()

    def _one_side_finished(self) -> None:
        """`close_timeout`: a half-close may last that long, then the tunnel closes."""
        wait = self.listener.route.close_timeout
        if wait is None or self._close_timer is not None or self.closed:
            return
        self._close_timer = asyncio.get_running_loop().call_later(wait, self._close_timed_out, wait)

    def _close_timed_out(self, wait: float) -> None:
        if self.closed:
            return
        log.info(
            "%s: one side finished %.0fs ago and the other did not: closing (close_timeout)", self.listener.label, wait
        )
        self.close()

    # --- asyncio callbacks

    def _idle_check(self, idle: float) -> None:
        """`idle_timeout`: close the tunnel when nothing went either way for that long; else look
        again when it would be due (one timer per connection, never moved by traffic)."""
        if self.closed:
            return
        quiet = time.monotonic() - self.active_at
        if quiet >= idle:
            log.info("%s: closing a tunnel idle for %.0fs (idle_timeout)", self.listener.label, quiet)
            self.close()
            return
        self._idle_timer = asyncio.get_running_loop().call_later(idle - quiet, self._idle_check, idle)

    def data_received(self, data: bytes) -> None:
        self.active_at = time.monotonic()
        if self.local_tls is not None:
            self._local_tls_received(data)
            return
        self.listener.counters.bytes_out += len(data)
        if self.ready or not self.stage.transparent:
            self._from_local(data)
        elif not self.closed and self.transport is not None:
            # uvloop starts reading after connection_made() whatever it asked: hold what came
            # early until the remote is ready (pausing works from here on).
            self._early.append(data)
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self.local_tls is not None:
            self.local_tls.receive_eof()
            self._local_tls_received(b"")
            return True
        self.eof = True
        if self.ready or not self.stage.transparent:
            self._local_eof()
        self._one_side_finished()
        return True  # keep our write side open for the server's remaining answer

    # --- local TLS (`local_tls`): we are the server, the stage sees plaintext

    def _start_local_tls(self, leftover: bytes = b"") -> None:
        make = self.listener.local_tls_context
        if make is None:
            self._run([Refuse(Fault("local", "config", "no local TLS"), "local_tls needs the daemon's dev CA")])
            return
        self.local_tls = TLSPipe(make(), None, server_side=True)
        if leftover:
            self._local_tls_received(leftover)

    def _local_tls_received(self, data: bytes) -> None:
        pipe = self.local_tls
        assert pipe is not None
        if data:
            pipe.receive_data(data)
        while (event := pipe.next_event()) is not None:
            if isinstance(event, Received):
                self.listener.counters.bytes_out += len(event.data)
                self._from_local(event.data)
            elif isinstance(event, CloseNotify | Truncated):
                self.eof = True
                self._local_eof()
            elif isinstance(event, Failed | CertificateRejected | Reset):
                reason = getattr(event, "alert", "") or fault_from("local", event.error).text
                self.listener._record_failure(
                    failures.Failure(
                        Cause.LOCAL_TLS,
                        f"the local client's TLS failed ({reason}); it must trust the dev CA "
                        "(mtls-sidecar ca export) and connect to localhost, 127.0.0.1 or ::1",
                    ),
                    self,
                )
                self._flush_local_tls()
                self.close()
                return
        self._flush_local_tls()

    def _flush_local_tls(self) -> None:
        if self.local_tls is None or self.transport is None or self.transport.is_closing():
            return
        data = self.local_tls.data_to_send()
        if data:
            self.transport.write(data)

    def pause_writing(self) -> None:
        if self.remote is not None:
            self.remote.pause_reading()

    def resume_writing(self) -> None:
        if self.remote is not None:
            self.remote.resume_reading()

    def write(self, data: bytes) -> None:
        self.active_at = time.monotonic()
        self.listener.counters.bytes_in += len(data)
        if self.warm:  # the server spoke first (a banner): it waits for the client
            self._held_local.append(data)
            return
        if self.local_tls is not None:
            self.local_tls.send(data)
            self._flush_local_tls()
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def write_eof(self) -> None:
        """The remote finished sending: pass its EOF on; the local client may go on sending."""
        if self.warm:  # a warm connection the server ended: no client will want it
            self._held_local_eof = True
            self.close()
            return
        if self.local_tls is not None:
            self.local_tls.send_eof()
            self._flush_local_tls()
        if self.transport is not None and not self.transport.is_closing() and self.transport.can_write_eof():
            self.transport.write_eof()
        if self.eof:
            self.close()

    def close(self) -> None:
        """Flush what is buffered, then close both sides."""
        if self.closed:
            return
        self.closed = True
        if self.warm or self.parked:
            self.parked = False
            pool = self.listener.warm
            if pool is not None:
                pool.gone(self)
        if self.transport is not None:
            self.transport.close()
        if self.remote is not None:
            self.remote.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        if self.remote is not None:
            self.remote.abort()

    def reset(self) -> None:
        """The remote reset us: pass on what it sent, then reset the local client too (RST, not FIN),
        so that it cannot take a cut-off answer for a whole one."""
        if self.closed:
            return
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is not None and sock.family != AF_UNIX:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self.close()
        self.listener._closed(self)
        self.lost = True
        if self.remote is not None and self.remote.lost:  # both sides gone: no cycle left
            self.remote = None


class _RemoteSide(asyncio.Protocol):
    """The TCP connection to the remote service: raw until StartTLS, then through a `TLSPipe`."""

    def __init__(self, peer: _PlainSide, ctx: ssl.SSLContext | None, server_name: str, sessions: ContextCache) -> None:
        self.peer = peer
        self.ctx = ctx
        self.server_name = server_name
        # TLS session resumption: offer the route's last session, keep this connection's ticket.
        self.sessions = sessions
        self._session_saved = False  # or given up on: see SESSION_LOOKS
        self._session_looks = 0
        self.transport: asyncio.Transport | None = None
        self.pipe: TLSPipe | None = None
        self.handshake_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.eof = False  # the remote finished sending (close_notify or a bare FIN)
        self.lost = False
        self._closing = False
        # Nothing the server sends reaches the local client before the server policy passed.
        self._approved = False
        self._tls_started = 0.0  # time.monotonic() when our ClientHello went out

    # --- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)
        if self.ctx is None:  # passthrough: no TLS of ours, the connection is ready as it is
            self.handshake_done.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.pipe is None:  # before StartTLS: the protocol stage's prelude (passthrough: all)
            self.peer.from_remote(data)
            return
        self.pipe.receive_data(data)
        if self._approved or not self.pipe.handshake_complete:
            self._pump()
        elif self.transport is not None:
            self.transport.pause_reading()  # held until approve(): what the server sends meanwhile waits in TCP

    def eof_received(self) -> bool:
        if self.ctx is None:  # passthrough: the server's half-close, passed on as one
            self.eof = True
            self.peer.remote_eof()
            return True
        if self.pipe is None:
            if not self.handshake_done.done():
                self.handshake_done.set_exception(ConnectionResetError(errno.ECONNRESET, "closed before TLS started"))
            return False
        self.pipe.receive_eof()
        if not self.pipe.handshake_complete:
            self._pump()
            return False
        if self._approved:
            self._pump()
        return True  # our side stays open: the local client may go on sending (a half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.handshake_done.done():
            self.handshake_done.set_exception(
                exc or ConnectionResetError(errno.ECONNRESET, "closed during the TLS handshake")
            )
            self._release()
            return
        if self.pipe is not None and not self._closing:
            if exc is not None:  # reset (or broken) mid-stream
                # What the server sent just before (an alert, the end of its answer) may still wait
                # in the socket: asyncio reports a failed write before it reads. It may explain why.
                self._drain_socket()
                self.pipe.receive_reset(exc)
            else:
                self.pipe.receive_eof()
            if self._approved:
                self._pump()
            else:
                return  # approve() reads what arrived (an alert?), then lets go
        self.peer.close()
        self._release()

    def pause_writing(self) -> None:
        if self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer.transport is not None and not self.peer.closed:
            self.peer.transport.resume_reading()

    # --- called by the local side

    def first_bytes(self) -> bytes:
        """The start of what the server sent once TLS was to start (a protocol's own prelude
        before that, a MySQL greeting say, is not a sign of a plaintext server)."""
        return self.pipe.first_bytes if self.pipe is not None else b""

    def start_tls(self, leftover: bytes = b"") -> None:
        assert self.ctx is not None, "passthrough never starts TLS"
        target = self.peer.listener.target
        session = self.sessions.session(self.ctx, self.server_name, target)
        prepared = self.sessions.take_prepared(self.ctx, self.server_name, target) if session is not None else None
        self.pipe = TLSPipe(self.ctx, self.server_name, session=session, prepared=prepared)
        self._tls_started = time.monotonic()
        if session is not None:  # the next connection's SSLObject, made once the loop has nothing more urgent
            asyncio.get_running_loop().call_soon(self.sessions.prepare, self.ctx, self.server_name, target)
        if leftover:
            self.pipe.receive_data(leftover)
        self._pump()

    def approve(self) -> None:
        """The server passed our checks: pass on what it sent meanwhile, then everything."""
        self._approved = True
        if self._closing:
            return
        self.resume_reading()
        if self.pipe is not None:
            self._pump()
        if self.lost and not self._closing:
            self.peer.close()
            self._release()

    def send(self, data: bytes) -> None:
        if self._closing or self.transport is None:
            return
        if self.pipe is None:  # before StartTLS: raw
            self.transport.write(data)
            return
        events = self.pipe.send(data)
        if events:
            self._handle(events)
        self._flush()

    def send_eof(self) -> None:
        """Pass the client's EOF on: close_notify, then TCP half-close, and keep reading."""
        if self.ctx is None and not self._closing and self.transport is not None:  # passthrough
            if self.transport.can_write_eof() and not self.transport.is_closing():
                self.transport.write_eof()
            return
        if self._closing or self.pipe is None or Flow.CAN_SEND not in self.pipe.flow:
            return
        self.pipe.send_eof()
        self._flush()
        if self.transport is not None and self.transport.can_write_eof() and not self.transport.is_closing():
            self.transport.write_eof()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        if self._closing:
            return
        if self.pipe is not None and self.pipe.handshake_complete:
            self.pipe.send_eof()
            self._flush()
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self._closing = True
        if self.handshake_done.done() and not self.handshake_done.cancelled():
            self.handshake_done.exception()  # mark it seen: the caller already handled it
        if self.transport is not None:
            self.transport.abort()

    # --- internals

    def _pump(self) -> None:
        pipe = self.pipe
        assert pipe is not None
        if not pipe.handshake_complete:
            events = pipe.events()
            self._flush()  # handshake flights, our alert
            self._handle(events)
        else:
            # One record at a time: each is on its way to the local client before the next is
            # decrypted (reading all first cost a quarter of the download rate).
            while (event := pipe.next_event()) is not None:
                self._handle((event,))
                if self.pipe is not pipe:
                    break  # let go of meanwhile
        self._flush()  # answers to key updates and the like

    def _handle(self, events: Sequence[Event]) -> None:
        listener = self.peer.listener
        for event in events:
            if isinstance(event, Received):
                if self.peer.outcome is None:
                    self._first_answer(event.data)
                else:
                    self.peer.from_remote(event.data)
            elif isinstance(event, HandshakeDone):
                if not self.handshake_done.done():
                    listener.counters.handshakes.observe(time.monotonic() - self._tls_started)
                    self.handshake_done.set_result(None)
            elif isinstance(event, CloseNotify | Truncated):
                if isinstance(event, Truncated) and self.pipe is not None and Flow.CAN_SEND in self.pipe.flow:
                    # The local client has not finished: the answer it waits for may be cut short.
                    listener._record_failure(
                        failures.broken_stream(None, target=listener.target, received=event.received), self.peer
                    )
                self._remote_eof()
            elif isinstance(event, Reset):
                listener._record_failure(
                    failures.broken_stream(event.error, target=listener.target, received=event.received), self.peer
                )
                self.peer.reset()
            elif isinstance(event, CertificateRejected | Failed):
                if not self.handshake_done.done():
                    self.handshake_done.set_exception(event.error)
                    continue
                # After the handshake; with TLS 1.3 this is how a server rejects our certificate.
                failure = failures.classify_ssl_error(event.error, target=listener.target)
                listener._record_failure(failure, self.peer)
                self.abort()
                self.peer.failed_late(failure)
        if self._approved and not self._session_saved and self.pipe is not None and self.pipe.handshake_complete:
            self._save_session()

    def _first_answer(self, data: bytes) -> None:
        """The server's first application bytes on this connection: unless the protocol stage
        finds a failure in them (an error answer), the connection worked. A stage whose
        `judging_answer` is true has not decided yet: the next record is asked again."""
        peer = self.peer
        counters = peer.listener.counters
        failed_before = counters.failures.total()
        peer.from_remote(data)
        if peer.outcome is not None or peer.warm:  # a warm connection's outcome is its client's
            return
        if counters.failures.total() != failed_before:
            peer.outcome = "failed"  # counted meanwhile by code that did not name this connection
            return
        if getattr(peer.stage, "judging_answer", False):
            return  # the stage needs more of the answer (an HTTP error page's words): decide at the next record
        peer.listener._record_success(peer)

    def _remote_eof(self) -> None:
        if self.eof:
            return
        self.eof = True
        self.peer.remote_eof()

    def _release(self) -> None:
        """Let go of the TLS state once the connection is gone. The two sides of a pair point at
        each other, so they wait for the cycle collector; the OpenSSL connection (some 40 KiB of
        buffers) should not wait with them: under load that was tens of MiB held for minutes."""
        self.pipe = None
        if self.peer.lost and self.peer.remote is self:  # both sides gone: no cycle left
            self.peer.remote = None

    def _drain_socket(self) -> None:
        """Move what the kernel still holds for us into the TLS input (during connection_lost, when
        asyncio has stopped reading but not yet closed the socket). Best effort, bounded."""
        if self.transport is None or self.pipe is None:
            return
        sock = self.transport.get_extra_info("socket")
        # Only asyncio's own transports promise that the socket is still open here; elsewhere
        # (uvloop) its number may already belong to another connection.
        if not isinstance(sock, TransportSocket):
            return
        try:
            raw = socket.fromfd(sock.fileno(), sock.family, sock.type)  # a duplicate: asyncio keeps its own
        except (OSError, ValueError):
            return
        with raw:
            with contextlib.suppress(OSError):
                if raw.getsockname() != self.transport.get_extra_info("sockname"):
                    return  # not our connection's socket any more
            raw.setblocking(False)
            for _ in range(16):
                try:
                    data = raw.recv(READ_CHUNK)
                except OSError:  # nothing left (BlockingIOError), or the reset itself after the data
                    return
                if not data:
                    return
                self.pipe.receive_data(data)

    def _save_session(self) -> None:
        """Keep the server's session ticket (TLS 1.3 sends it after the handshake) for the next connection."""
        assert self.pipe is not None and self.ctx is not None
        self._session_looks += 1
        if self._session_looks > SESSION_LOOKS:
            # A server that sends no ticket (PostgreSQL, TLS 1.2 without tickets) would have us
            # look after every record: SSLObject.session took 42 % of a pgbench run's time.
            self._session_saved = True
            return
        tls = self.pipe.tls
        target = self.peer.listener.target
        if tls.session_reused and self.sessions.session_is_fresh(self.ctx, self.server_name, target):
            self._session_saved = True
            return
        session = tls.session
        if session is not None and session.has_ticket:
            self._session_saved = True
            self.sessions.remember(self.ctx, self.server_name, target, session)

    def _flush(self) -> None:
        if self.pipe is None or self.transport is None or self.transport.is_closing():
            return
        data = self.pipe.data_to_send()
        if data:
            self.transport.write(data)
