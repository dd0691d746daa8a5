"""Status data → Prometheus text (exposition format 0.0.4). Pure: no sockets, no clock, no global registry.

`render` takes plain data, the shapes the status document already has, and `now`:

- `routes`: {label: a route's status}, as `RouteListener.status()` gives it (keys used:
  total_connections, active_connections, bytes_in, bytes_out, failures, health,
  handshake_seconds); every key is optional.
- `identities`: {name: an identity's status}, as `Daemon.status()["identities"]` gives it (keys
  used: selected.not_after, renewal.state, renewal.consecutive_failures, renewal.next_renewal_at);
  an identity with only {"selected": {"not_after": "…Z"}} (the `tunnel` command's, which
  `identity_sample(selection)` makes) is fine.
- `proxy`: the proxy's status (`Daemon.proxy_status()`), or None. Its rules become routes named
  `proxy:RULE` (route names cannot hold a colon, so they never clash with a route's), and the
  proxy port itself gets `mtls_sidecar_proxy_*` families.

`render_status(status, now)` does it for a whole status document (the daemon's `/v1/metrics`).
The metric names and what they mean are in the README ("Metrics").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from sidecar import __version__
from sidecar.keystore import Selection
from sidecar.renewal.state import State
from sidecar.units import rfc3339

# The classic text format, which every Prometheus, Grafana Agent and Alloy reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "mtls_sidecar_"
PROXY_ROUTE_PREFIX = "proxy:"  # the route label of a proxy rule: proxy:RULE
# A route's health (README, "Route health"): each is a series of mtls_sidecar_route_health.
HEALTHS = ("ok", "failing", "idle", "no_certificate", "stopped")
RENEWAL_STATES = tuple(str(state) for state in State)


def render(
    routes: Mapping[str, Mapping[str, Any]],
    identities: Mapping[str, Mapping[str, Any]],
    *,
    now: datetime,
    proxy: Mapping[str, Any] | None = None,
    version: str = __version__,
    config_error: bool | None = None,
) -> str:
    """The Prometheus text for these routes and identities at `now` (an aware datetime).

    `config_error`: whether config.toml's last edit was rejected (None: no such thing, as in the
    `tunnel` command; the family is left out)."""
    collector = _Snapshot(routes, identities, now=now, proxy=proxy, version=version, config_error=config_error)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry).decode("utf-8")


def render_status(status: Mapping[str, Any], now: datetime) -> str:
    """The text for a whole status document (what `Daemon.status()` returns)."""
    proxy = status.get("proxy")
    return render(
        status.get("routes") or {},
        status.get("identities") or {},
        now=now,
        proxy=proxy if proxy and proxy.get("enabled") else None,
        version=str(status.get("version") or __version__),
        config_error=bool((status.get("config") or {}).get("error")),
    )


def identity_sample(selection: Selection) -> dict[str, Any]:
    """What `render` needs of an identity with no renewal of its own (the `tunnel` command's):
    {"selected": {"not_after": "…Z"}} or {"selected": None}."""
    selected = selection.selected
    if selected is None or selected.cert is None:
        return {"selected": None}
    return {"selected": {"not_after": rfc3339(selected.cert.not_valid_after_utc)}}


class _Snapshot:
    """A custom collector over one snapshot of plain data (prometheus_client's Collector protocol)."""

    def __init__(
        self,
        routes: Mapping[str, Mapping[str, Any]],
        identities: Mapping[str, Mapping[str, Any]],
        *,
        now: datetime,
        proxy: Mapping[str, Any] | None,
        version: str,
        config_error: bool | None,
    ) -> None:
        if now.tzinfo is None:
            raise ValueError("now must be an aware datetime (UTC)")
        self.routes = dict(routes)
        if proxy is not None:
            for rule in proxy.get("rules") or ():
                self.routes[PROXY_ROUTE_PREFIX + str(rule.get("name"))] = _rule_as_route(rule)
        self.identities = identities
        self.now = now
        self.proxy = proxy
        self.version = version
        self.config_error = config_error

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily(PREFIX + "build", "The sidecar's version.")
        info.add_metric([], {"version": self.version})
        yield info
        if self.config_error is not None:
            yield _gauge(
                "config_error",
                "1 when the last edit of config.toml was rejected (the previous config keeps running), else 0.",
                [],
                [([], float(self.config_error))],
            )
        yield from self._routes()
        yield from self._identities()
        if self.proxy is not None:
            yield from self._proxy(self.proxy)

    def _routes(self) -> Iterator[Metric]:
        routes = sorted(self.routes.items())
        yield _counter(
            "connections",
            "Local connections accepted, per route (proxy rules as proxy:RULE).",
            ["route"],
            [([name], _number(r.get("total_connections"))) for name, r in routes],
        )
        yield _gauge(
            "connections_open",
            "Tunnels open now, per route.",
            ["route"],
            [([name], _number(r.get("active_connections"))) for name, r in routes],
        )
        byte_samples: list[tuple[list[str], float | None]] = []
        for name, r in routes:
            byte_samples.append(([name, "sent"], _number(r.get("bytes_out"))))  # local client → remote service
            byte_samples.append(([name, "received"], _number(r.get("bytes_in"))))  # remote service → local client
        yield _counter(
            "bytes",
            "Bytes tunnelled, per route: sent to the remote service, received from it.",
            ["route", "direction"],
            byte_samples,
        )
        yield _counter(
            "failures",
            "Failed or refused connections, per route and cause (the cause names of the README's reason table).",
            ["route", "cause"],
            [
                ([name, str(cause)], _number(n))
                for name, r in routes
                for cause, n in sorted((r.get("failures") or {}).items())
            ],
        )
        health = [(name, r.get("health")) for name, r in routes if r.get("health") is not None]
        yield _gauge(
            "route_health",
            "1 for the route's health now (ok, failing, idle, no_certificate, stopped), 0 for the others.",
            ["route", "health"],
            [([name, state], 1.0 if current == state else 0.0) for name, current in health for state in HEALTHS],
        )
        histogram = HistogramMetricFamily(
            PREFIX + "handshake_seconds",
            "TLS handshakes with the target, per route: from the ClientHello to the handshake's end.",
            labels=["route"],
        )
        for name, r in routes:
            times = r.get("handshake_seconds")
            if times:
                buckets = [(_bound(bound), _number(n) or 0.0) for bound, n in times.get("buckets") or ()]
                histogram.add_metric([name], buckets, _number(times.get("sum")) or 0.0)
        yield histogram

    def _identities(self) -> Iterator[Metric]:
        identities = sorted(self.identities.items())
        expiry, usable, states, failures, next_renewal = [], [], [], [], []
        for name, identity in identities:
            selected = identity.get("selected")
            usable.append(([name], 1.0 if selected else 0.0))
            not_after = _moment(selected.get("not_after")) if selected else None
            if not_after is not None:
                expiry.append(([name], (not_after - self.now).total_seconds()))
            renewal = identity.get("renewal")
            if not renewal:
                continue
            state = renewal.get("state")
            known = RENEWAL_STATES if state in RENEWAL_STATES else (*RENEWAL_STATES, str(state))
            states += [([name, s], 1.0 if s == state else 0.0) for s in known]
            failures.append(([name], _number(renewal.get("consecutive_failures"))))
            due = _moment(renewal.get("next_renewal_at"))
            if due is not None:
                next_renewal.append(([name], (due - self.now).total_seconds()))
        yield _gauge(
            "identity_usable",
            "1 when the identity has a usable certificate (the keystore rule), else 0.",
            ["identity"],
            usable,
        )
        yield _gauge(
            "certificate_expiry_seconds",
            "Seconds until the presented certificate's notAfter (negative once past); absent with no certificate.",
            ["identity"],
            expiry,
        )
        yield _gauge(
            "renewal_state",
            "1 for the identity's renewal state now (valid, renew_due, renewing, failing, expired), 0 for the others.",
            ["identity", "state"],
            states,
        )
        yield _gauge(
            "renewal_consecutive_failures",
            "Renewal attempts that failed in a row (0 after a success).",
            ["identity"],
            failures,
        )
        yield _gauge(
            "renewal_next_seconds",
            "Seconds until the next planned renewal (negative: overdue); absent when none is planned.",
            ["identity"],
            next_renewal,
        )

    def _proxy(self, proxy: Mapping[str, Any]) -> Iterator[Metric]:
        yield _counter(
            "proxy_connections",
            "Connections accepted on the proxy port (each rule's are in mtls_sidecar_connections_total).",
            [],
            [([], _number(proxy.get("connections")))],
        )
        yield _gauge(
            "proxy_connections_open",
            "Proxy clients connected now.",
            [],
            [([], _number(proxy.get("active_connections")))],
        )
        yield _counter(
            "proxy_refused",
            "Proxy clients refused before a destination was reached, per cause.",
            ["cause"],
            [([str(cause)], _number(n)) for cause, n in sorted((proxy.get("refused") or {}).items())],
        )


def _rule_as_route(rule: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "total_connections": rule.get("connections"),
        "active_connections": rule.get("active_connections"),
        "bytes_in": rule.get("bytes_in"),
        "bytes_out": rule.get("bytes_out"),
        "failures": rule.get("failures"),
        "handshake_seconds": rule.get("handshake_seconds"),
    }


def _counter(
    name: str, documentation: str, labels: list[str], samples: Iterable[tuple[list[str], float | None]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(PREFIX + name, documentation, labels=labels)
    for values, value in samples:
        if value is not None:
            family.add_metric(values, value)
    return family


def _gauge(
    name: str, documentation: str, labels: list[str], samples: Iterable[tuple[list[str], float | None]]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(PREFIX + name, documentation, labels=labels)
    for values, value in samples:
        if value is not None:
            family.add_metric(values, value)
    return family


def _number(value: Any) -> float | None:
    """A count from the status data; None (the sample is left out) when it is missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _bound(bound: Any) -> str:
    return "+Inf" if bound in ("+Inf", math.inf) else repr(float(bound))


def _moment(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None
