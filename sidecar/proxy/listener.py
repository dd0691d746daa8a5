"""The proxy's port: read what each client asks for, then hand it to the destination's tunnel.

A connection starts with `_Front`, which reads the client's first words (`greeting.Greeting`),
serves the PAC file, and refuses what no rule covers (HTTP `403`, SOCKS `0x02`). A destination a
rule covers is served by a `RouteListener` of its own that listens nowhere: the front hands the
client's connection to it (`RouteListener.adopt`), with the stage for how the client asked, and
from there on it is a tunnel like any route's, with that destination's counters. An HTTP proxy
client whose next request names another host is handed back here (`Handoff`) and goes on.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, cast

from sidecar import policy
from sidecar.causes import Cause
from sidecar.config import ListenAddress, ProxyRuleSpec, ProxySpec, RouteSpec
from sidecar.durations import Durations
from sidecar.errors import LocalSetupError
from sidecar.failures import Failure
from sidecar.keystore import Selection
from sidecar.protocols import make_stage
from sidecar.protocols.http import HTTPStage, Proxied
from sidecar.proxy import greeting
from sidecar.proxy.greeting import Asked, ForProxy, Invalid
from sidecar.proxy.rules import HTTP, Destination, destination_route, http_base, match, normal_host, pac_file, refusal
from sidecar.proxy.stage import ProxyTunnelStage, Relay
from sidecar.stages import Stage
from sidecar.tlsctx import ContextCache
from sidecar.tunnel import PEER_CHECK, ConnectionBudget, RouteListener, SelectionSource, refuse_other_user
from sidecar.units import rfc3339

log = logging.getLogger("sidecar.proxy")

GREETING_TIMEOUT = 30.0  # seconds a client may take to say where it goes
MAX_DESTINATIONS = 256  # destinations remembered with their counters; idle ones beyond are forgotten


@dataclass
class RuleCounters:
    connections: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    last_error: str | None = None
    last_error_at: datetime | None = None
    # bytes and TLS handshakes of destinations no longer remembered (MAX_DESTINATIONS)
    bytes_in: int = 0
    bytes_out: int = 0
    handshakes: Durations = field(default_factory=Durations)


@dataclass
class ProxyCounters:
    connections: int = 0  # accepted on the proxy port
    refused: Counter[str] = field(default_factory=Counter)  # before a destination was reached, by cause
    last_refusal: str | None = None
    last_refusal_at: datetime | None = None
    pac_served: int = 0


class _Destination:
    """A destination reached through a rule: its tunnel owner and what it is remembered by."""

    def __init__(self, rule: ProxyRuleSpec, dest: Destination, how: str, tunnel: RouteListener) -> None:
        self.rule = rule
        self.dest = dest
        self.how = how
        self.tunnel = tunnel


class ProxyListener:
    """`[proxy]`: start(), stop(grace), close(), drain(grace), cut(), update(spec), status(...)."""

    def __init__(
        self,
        spec: ProxySpec,
        selection: SelectionSource,
        contexts: ContextCache,
        chains: policy.ChainMemory | None = None,
        budget: ConnectionBudget | None = None,
    ) -> None:
        self.spec = spec
        self.selection = selection
        self.contexts = contexts
        self.chains = chains if chains is not None else policy.ChainMemory()
        self.budget = budget if budget is not None else ConnectionBudget()
        self.counters = ProxyCounters()
        self.rule_counters: dict[str, RuleCounters] = {rule.name: RuleCounters() for rule in spec.rules}
        self.last_error: str | None = None
        self.bound: ListenAddress | None = None
        self._server: asyncio.base_events.Server | None = None
        self._fronts: set[_Front] = set()
        self._destinations: OrderedDict[tuple[str, str, str, int], _Destination] = OrderedDict()
        self._retired: list[RouteListener] = []  # of rules since changed, while their tunnels finish
        # (kind, rule or None, destination or None, failure): the daemon turns these into events
        self.on_failure: Callable[[str | None, str | None, Failure], None] | None = None
        # What a new connection would present now (warm connections: still fresh?), from the daemon.
        self.current_selection: Callable[[RouteSpec], Selection] | None = None

    # --- lifecycle

    @property
    def is_running(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def start(self) -> None:
        listen = self.spec.listen
        try:
            self._server = await asyncio.get_running_loop().create_server(
                lambda: _Front(self), listen.host, listen.port, reuse_address=True
            )
        except OSError as exc:
            self.last_error = _listen_error(listen, exc)
            raise LocalSetupError(self.last_error) from exc
        self.bound = ListenAddress("tcp", listen.host, self._server.sockets[0].getsockname()[1])
        self.last_error = None

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for known in self._destinations.values():
            known.tunnel.close()  # its warm connections
        for front in list(self._fronts):
            front.abort()

    async def stop(self, grace: float) -> None:
        self.close()
        await self.drain(grace)

    async def drain(self, grace: float) -> None:
        await asyncio.gather(*(tunnel.drain(grace) for tunnel in self._tunnels()))

    def cut(self) -> None:
        for front in list(self._fronts):
            front.abort()
        for tunnel in self._tunnels():
            tunnel.cut()

    def refresh_warm(self, reason: str) -> None:
        for known in self._destinations.values():
            known.tunnel.refresh_warm(reason)

    def _tunnels(self) -> list[RouteListener]:
        return [d.tunnel for d in self._destinations.values()] + self._retired

    def update(self, spec: ProxySpec) -> None:
        """New rules for new connections (same listen address); open tunnels keep theirs."""
        assert spec.listen == self.spec.listen, "a new listen address needs a new listener"
        rules = {rule.name: rule for rule in spec.rules}
        for key, known in list(self._destinations.items()):
            if rules.get(known.rule.name) != known.rule:
                del self._destinations[key]
                known.tunnel.close()  # its warm connections; open tunnels go on
                if known.tunnel.counters.active:
                    self._retired.append(known.tunnel)
        self.rule_counters = {rule.name: self.rule_counters.get(rule.name) or RuleCounters() for rule in spec.rules}
        self.spec = spec

    # --- what the front asks

    def pac(self) -> str:
        return pac_file(self.spec if self.bound is None else _with_listen(self.spec, self.bound))

    def over_cap(self) -> Failure | None:
        active = len(self._fronts) + sum(t.counters.active for t in self._tunnels())
        if active >= self.spec.max_connections:
            limit, whose = self.spec.max_connections, "proxy.max_connections"
        elif self.budget.open >= self.budget.limit:
            limit, whose = self.budget.limit, "max_connections (all routes)"
        else:
            return None
        return Failure(
            Cause.TOO_MANY_CONNECTIONS,
            f"refused a local connection: {limit} connection(s) already open, the limit of {whose}",
        )

    def refused(self, failure: Failure) -> None:
        """A connection refused before it reached a destination (counted for the proxy)."""
        self.counters.refused[failure.reason] += 1
        self.counters.last_refusal = failure.message
        self.counters.last_refusal_at = datetime.now(UTC)
        log.warning("proxy: %s", failure.message)
        if self.on_failure is not None:
            self.on_failure(None, None, failure)

    def open_tunnel(self, transport: asyncio.Transport, asked: Asked) -> None:
        """Hand the client's connection to its destination's tunnel, or refuse it."""
        found = match(self.spec.rules, asked.host, asked.port, asked.how)
        if found is None:
            reason = refusal(self.spec.rules, asked.host, asked.port, asked.how)
            self.refused(Failure(Cause.PROXY_NOT_ALLOWED, f"refused: {reason}"))
            _answer_and_close(transport, greeting.not_allowed(asked, reason))
            return
        rule, dest = found
        if rule.passthrough and asked.how == HTTP:
            # The rule says this host needs no certificate of ours: we would add one by doing the TLS.
            reason = (
                f"rule {rule.name} passes {dest.host} through untouched (passthrough): ask for https://{dest.host}/ "
                "through the proxy (CONNECT), so that your client does its own TLS"
            )
            self.refused(Failure(Cause.PROXY_NOT_ALLOWED, f"refused: {reason}"))
            _answer_and_close(transport, greeting.not_allowed(asked, reason))
            return
        known = self._destination(rule, dest, asked.how)
        self.rule_counters[rule.name].connections += 1
        known.tunnel.adopt(
            transport,
            lambda: self._wrap(known, asked, self._inner_stage(known)),
            asked.leftover,
            wrap=lambda warm: self._wrap(known, asked, warm),
        )

    def take_back(self, transport: asyncio.Transport, data: bytes) -> None:
        """An HTTP proxy client's next request is for another destination: read it here again."""
        front = _Front(self, checked=True)
        transport.set_protocol(front)
        front.connection_made(transport)
        if data:
            front.data_received(data)

    def _inner_stage(self, known: _Destination) -> Stage:
        """The destination's protocol stage (also what its warm connections are made with)."""
        route, dest = known.tunnel.route, known.dest
        listen = self.bound or self.spec.listen
        if known.how == HTTP:
            host, port = dest.host, dest.asked_port

            def same_destination(target: bytes) -> bool:
                other = greeting.Greeting().receive(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                return isinstance(other, Asked) and normal_host(other.host) == host and _same_port(other.port, port)

            return HTTPStage(route, listen, Proxied(dest.port, http_base(dest), same_destination))
        return Relay() if route.passthrough else make_stage(route, listen)

    def _wrap(self, known: _Destination, asked: Asked, inner: Stage) -> Stage:
        """For CONNECT and SOCKS, the stage that answers the client's request in front of `inner`."""
        if asked.how == HTTP:
            return inner
        route, dest = known.tunnel.route, known.dest
        return ProxyTunnelStage(
            inner,
            greeting.granted(asked),
            lambda cause, message: greeting.failed(asked, cause, message),
            refuse_client_tls=not route.passthrough,
            destination=dest.address,
        )

    def _destination(self, rule: ProxyRuleSpec, dest: Destination, how: str) -> _Destination:
        kind = "http" if how == HTTP else "stream"
        key = (rule.name, kind, dest.host, dest.port)
        known = self._destinations.get(key)
        if known is not None:
            self._destinations.move_to_end(key)
            return known
        route = destination_route(rule, dest, self.spec, how)
        if rule.passthrough and how != HTTP:
            route = _passthrough(route)
        tunnel = RouteListener(route, self.selection, self.contexts, self.chains, budget=self.budget)
        tunnel.bound = self.bound
        tunnel.label = f"proxy to {dest.address} (rule {rule.name})"
        tunnel.on_handoff = self.take_back
        tunnel.on_failure = lambda _name, failure: self._tunnel_failed(rule.name, route.name, failure)
        known = _Destination(rule, dest, how, tunnel)
        tunnel.stage_factory = lambda: self._inner_stage(known)
        tunnel.current_selection = self.current_selection
        self._destinations[key] = known
        self._forget_idle()
        tunnel.start_warm()  # the rule's `preconnect`, for this destination
        return known

    def _forget_idle(self) -> None:
        excess = len(self._destinations) - MAX_DESTINATIONS
        for key, known in list(self._destinations.items()):
            if excess <= 0:
                break
            if known.tunnel.counters.active == 0:
                known.tunnel.close()  # its warm connections, if any
                counters = self.rule_counters.get(known.rule.name)
                if counters is not None:
                    counters.bytes_in += known.tunnel.counters.bytes_in
                    counters.bytes_out += known.tunnel.counters.bytes_out
                    counters.handshakes.add(known.tunnel.counters.handshakes)
                del self._destinations[key]
                excess -= 1
        self._retired = [t for t in self._retired if t.counters.active]

    def _tunnel_failed(self, rule: str, destination: str, failure: Failure) -> None:
        counters = self.rule_counters.get(rule)
        if counters is not None:
            counters.failures[failure.reason] += 1
            counters.last_error = failure.message
            counters.last_error_at = datetime.now(UTC)
        if self.on_failure is not None:
            self.on_failure(rule, destination, failure)

    # --- status

    def status(
        self, identity_of: Callable[[str | None], str], has_certificate: Callable[[str], bool]
    ) -> dict[str, Any]:
        """The proxy as status shows it. `identity_of(rule.identity)`: the identity a rule uses now."""
        spec = self.spec
        listen = self.bound or spec.listen
        state = "up" if self.is_running else "error" if self.last_error else "stopped"
        destinations = []
        per_rule: dict[str, dict[str, int]] = {
            rule.name: {"active": 0, "bytes_in": c.bytes_in, "bytes_out": c.bytes_out}
            for rule in spec.rules
            if (c := self.rule_counters.get(rule.name)) is not None
        }
        handshakes: dict[str, Durations] = {}  # per rule: its destinations' TLS handshakes, and the forgotten ones'
        for rule in spec.rules:
            handshakes[rule.name] = times = Durations()
            if (c := self.rule_counters.get(rule.name)) is not None:
                times.add(c.handshakes)
        for known in reversed(self._destinations.values()):  # the most recent first
            tunnel, counters = known.tunnel, known.tunnel.counters
            identity = identity_of(known.rule.identity)
            sums = per_rule.get(known.rule.name)
            if sums is not None:
                sums["active"] += counters.active
                sums["bytes_in"] += counters.bytes_in
                sums["bytes_out"] += counters.bytes_out
                handshakes[known.rule.name].add(counters.handshakes)
            destinations.append({
                "host": known.dest.host,
                "port": known.dest.port,
                "rule": known.rule.name,
                "via": "http" if known.how == HTTP else "tunnel",
                "target": tunnel.target,
                "protocol": "passthrough" if tunnel.route.passthrough else tunnel.route.protocol,
                "identity": None if tunnel.route.passthrough else identity,
                "health": _health(tunnel, has_certificate(identity)),
                "connections": counters.total,
                "active_connections": counters.active,
                "bytes_in": counters.bytes_in,
                "bytes_out": counters.bytes_out,
                "failures": {str(cause): n for cause, n in counters.failures.items()},
                "last_error": counters.last_error,
                "last_error_at": rfc3339(counters.last_error_at) if counters.last_error_at else None,
                "last_success": rfc3339(counters.last_success_at) if counters.last_success_at else None,
                "warm": tunnel.warm_status(),
                "handshake_seconds": counters.handshakes.to_json(),
            })  # fmt: skip
        rules = []
        for rule in spec.rules:
            tally = self.rule_counters.get(rule.name) or RuleCounters()
            sums = per_rule.get(rule.name, {"active": 0, "bytes_in": 0, "bytes_out": 0})
            rules.append({
                "name": rule.name,
                "hosts": [pattern.text for pattern in rule.hosts],
                "ports": list(rule.ports),
                "identity": None if rule.passthrough else identity_of(rule.identity),
                "protocol": rule.protocol,
                "passthrough": rule.passthrough,
                "connect": f"{rule.connect[0]}:{rule.connect[1]}" if rule.connect else None,
                "upstream_proxy": rule.upstream_proxy,
                "verify": not rule.unsafe_skip_verify,
                "connections": tally.connections,
                "active_connections": sums["active"],
                "bytes_in": sums["bytes_in"],
                "bytes_out": sums["bytes_out"],
                "failures": {str(cause): n for cause, n in tally.failures.items()},
                "last_error": tally.last_error,
                "last_error_at": rfc3339(tally.last_error_at) if tally.last_error_at else None,
                "handshake_seconds": handshakes[rule.name].to_json(),
            })  # fmt: skip
        url = f"http://{listen.host if ':' not in listen.host else '[' + listen.host + ']'}:{listen.port}"
        return {
            "enabled": spec.enabled,
            "listen": str(listen),
            "url": url,
            "pac_url": url + "/proxy.pac",
            "state": state,
            "last_error": self.last_error,
            "connections": self.counters.connections,
            "active_connections": len(self._fronts) + sum(t.counters.active for t in self._tunnels()),
            "refused": {str(cause): n for cause, n in self.counters.refused.items()},
            "last_refusal": self.counters.last_refusal,
            "last_refusal_at": rfc3339(self.counters.last_refusal_at) if self.counters.last_refusal_at else None,
            "pac_served": self.counters.pac_served,
            "unsafe_listen": spec.unsafe_listen,
            "peer_check": {"method": PEER_CHECK.method, "detail": PEER_CHECK.detail},
            "rules": rules,
            "destinations": destinations,
        }


class _Front(asyncio.Protocol):
    """A proxy client until it has said where it goes."""

    def __init__(self, proxy: ProxyListener, *, checked: bool = False) -> None:
        self.proxy = proxy
        self.checked = checked  # handed back by a tunnel: counted and checked already
        self.transport: asyncio.Transport | None = None
        self.greeting = greeting.Greeting()
        self._timer: asyncio.TimerHandle | None = None
        self._done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.transport = transport
        proxy = self.proxy
        if not self.checked:
            proxy.counters.connections += 1
            refusal = refuse_other_user(transport, "the proxy") or proxy.over_cap()
            if refusal is not None:
                proxy.refused(refusal)
                self._done = True
                transport.abort()
                return
        proxy._fronts.add(self)
        self._timer = asyncio.get_running_loop().call_later(GREETING_TIMEOUT, self._too_slow)
        transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._done or self.transport is None:
            return
        decision = self.greeting.receive(data)
        answer = self.greeting.data_to_send()
        if answer:
            self.transport.write(answer)
        if decision is not None:
            self._decided(decision)

    def eof_received(self) -> bool:
        if not self._done:
            self._decided(self.greeting.receive_eof())
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()

    def abort(self) -> None:
        self._finish()
        if self.transport is not None:
            self.transport.abort()

    def _too_slow(self) -> None:
        if not self._done:
            self.proxy.refused(
                Failure(
                    Cause.PROTOCOL_MISMATCH, f"closed a client that named no destination within {GREETING_TIMEOUT:.0f}s"
                )
            )
            self.abort()

    def _finish(self) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.proxy._fronts.discard(self)

    def _decided(self, decision: greeting.Decision) -> None:
        transport = self.transport
        assert transport is not None
        self._finish()
        if isinstance(decision, Invalid):
            if decision.counted:
                self.proxy.refused(Failure(decision.cause, f"refused a client: {decision.message}"))
            _answer_and_close(transport, decision.reply)
        elif isinstance(decision, ForProxy):
            _answer_and_close(transport, self._for_proxy(decision))
        else:
            transport.pause_reading()
            self.proxy.open_tunnel(transport, decision)

    def _for_proxy(self, asked: ForProxy) -> bytes:
        path = asked.path.split("?", 1)[0]
        if path in ("/proxy.pac", "/wpad.dat") and asked.method in ("GET", "HEAD"):
            self.proxy.counters.pac_served += 1
            body = self.proxy.pac().encode()
            head = (
                "HTTP/1.1 200 OK\r\nContent-Type: application/x-ns-proxy-autoconfig\r\n"
                f"Content-Length: {len(body)}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n"
            ).encode()
            return head + (b"" if asked.method == "HEAD" else body)
        return greeting.http_error(
            404 if asked.method in ("GET", "HEAD") else 405,
            "this port is mtls-sidecar's proxy: set it as the proxy (http_proxy, or the PAC file at "
            "/proxy.pac), and ask for http://HOST/… URLs through it",
        )


def _health(tunnel: RouteListener, has_certificate: bool) -> str:
    """ok, failing, idle or no_certificate: a route's health, for a tunnel that listens nowhere."""
    if not tunnel.route.passthrough and not has_certificate:
        return "no_certificate"
    return tunnel.counters.outcome or "idle"


def _answer_and_close(transport: asyncio.Transport, answer: bytes) -> None:
    if answer and not transport.is_closing():
        transport.write(answer)
    transport.close()


def _same_port(a: int | None, b: int | None) -> bool:
    return (a if a not in (None, 80) else None) == (b if b not in (None, 80) else None)


def _passthrough(route: RouteSpec) -> RouteSpec:
    return replace(route, passthrough=True, protocol="tcp")


def _with_listen(spec: ProxySpec, bound: ListenAddress) -> ProxySpec:
    return replace(spec, listen=bound)


def _listen_error(listen: ListenAddress, exc: OSError) -> str:
    where = f"proxy: cannot listen on {listen}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"{where}: address already in use; another program holds it (see `ss -ltnp`), "
            "or choose another port in proxy.listen"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{where}: permission denied; ports below 1024 need privileges, choose another port in proxy.listen"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: no such local address (proxy.listen)"
    return f"{where}: {exc.strerror or exc} (proxy.listen)"
