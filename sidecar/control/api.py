"""Control API requests → daemon operations → JSON answers. No HTTP in here: `server.py` frames it.

| method | path | body | answer |
|---|---|---|---|
| GET | /v1/status | | the status document |
| POST | /v1/active-identity | {"name"} | status |
| POST | /v1/routes/NAME/identity | {"name"} | status |
| POST | /v1/identities/NAME/renew | | {"renewing": NAME} (202) |
| GET | /v1/routes | | {NAME: route status} |
| POST | /v1/routes | {"name", "listen", "target", ...config keys} | the route's status (201) |
| PATCH | /v1/routes/NAME | {config keys to change; null removes one} | the route's status |
| DELETE | /v1/routes/NAME | | {"removed": NAME} |
| POST | /v1/routes/NAME/check | | the diagnosis |
| GET | /v1/proxy | | the proxy's status ({"enabled": false} until a rule exists) |
| GET | /v1/proxy/pac | | the PAC file (JSON: {"pac": TEXT}) |
| POST | /v1/proxy/check | {"destination": "HOST[:PORT]"} | the diagnosis of what its rule would do |
| GET | /v1/events | | newline-delimited JSON events, until the client goes |
| GET | /v1/metrics | | Prometheus text (`text/plain; version=0.0.4`), not JSON |
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sidecar import __version__
from sidecar.causes import Cause
from sidecar.config import ROUTE_KEYS, RouteSpec
from sidecar.daemon import Daemon, NotFound
from sidecar.errors import ConfigError, LocalSetupError
from sidecar.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from sidecar.names import name_problem

MAX_BODY = 1 << 20
# How long a request made while the daemon starts waits for it to be ready.
STARTING_WAIT = 60.0

log = logging.getLogger("sidecar.control")


class EventFeed:
    """The events a stream client receives: a greeting, then every event the daemon publishes."""

    def __init__(self, daemon: Daemon) -> None:
        self._queue = daemon.events.add_subscriber()
        self._events = daemon.events
        self._queue.put_nowait({"type": "hello", "version": __version__, "active_identity": daemon.active_identity})

    async def get(self) -> dict[str, Any]:
        return await self._queue.get()

    def close(self) -> None:
        self._events.remove_subscriber(self._queue)


@dataclass(frozen=True)
class ApiResponse:
    """`body` is sent as JSON; with `content_type`, `body` is text sent as it is, in that type."""

    status: int
    body: Any = None
    stream: EventFeed | None = None
    content_type: str | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra

    def response(self) -> ApiResponse:
        return ApiResponse(self.status, {"error": self.message, **self.extra})


Handler = Callable[[Daemon, dict[str, str], Any], Awaitable[ApiResponse]]


async def dispatch(daemon: Daemon, method: str, path: str, body: bytes) -> ApiResponse:
    """Find the handler for `method path`, run it, and turn the daemon's errors into answers."""
    path = path.split("?", 1)[0]
    if not daemon.ready.is_set():
        # Still starting (reading the keystore, enrolling, opening routes): an answer now would
        # describe half a daemon ("no certificates" for an identity not read yet). Wait for it.
        try:
            await asyncio.wait_for(daemon.ready.wait(), STARTING_WAIT)
        except TimeoutError:
            return ApiResponse(503, {"error": f"the daemon is still starting after {STARTING_WAIT:g}s; see its log"})
    allowed = []
    for route_method, pattern, handler in _ROUTES:
        match = pattern.fullmatch(path)
        if match is None:
            continue
        if route_method != method:
            allowed.append(route_method)
            continue
        try:
            return await handler(daemon, match.groupdict(), _json_body(body))
        except ApiError as exc:
            return exc.response()
        except NotFound as exc:
            return ApiResponse(404, {"error": str(exc)})
        except ConfigError as exc:
            return ApiResponse(400, _config_error(exc))
        except LocalSetupError as exc:
            return ApiResponse(409, {"error": str(exc)})
        except Exception:  # a bug of ours: the client still gets an answer, the log the traceback
            log.exception("control API: %s %s failed", method, path)
            return ApiResponse(500, {"error": f"{method} {path} failed inside the daemon (see its log)"})
    if allowed:
        return ApiResponse(405, {"error": f"{method} is not allowed on {path}; use {' or '.join(allowed)}"})
    return ApiResponse(404, {"error": f"no such endpoint: {method} {path} (see the API reference in the README)"})


def _config_error(exc: ConfigError) -> dict[str, Any]:
    """The whole error in one line, and its parts, so a client can say it in its own terms (a flag)."""
    value = exc.value if exc.value is None or isinstance(exc.value, str | int | float | bool | list) else str(exc.value)
    return {
        "error": str(exc),
        "field": exc.field,
        "line": exc.line,
        "message": exc.message,
        "value": value,
        "hint": exc.hint,
    }


def _json_body(body: bytes) -> Any:
    if not body.strip():
        return None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not JSON: {exc}") from None
    except RecursionError:  # nested deeper than the parser goes: no body of ours is
        raise ApiError(400, "the request body is nested too deeply; send a flat JSON object") from None


def _name_field(body: Any, what: str) -> str:
    if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"]:
        raise ApiError(400, f'send {{"name": "..."}} naming the {what}', field="name")
    name: str = body["name"]
    problem = name_problem(name)
    if problem is not None:
        shown = name if len(name) <= 80 else f"{name[:40]}…({len(name)} characters)"
        raise ApiError(400, f"name = {shown!r}: {problem}", field="name")
    return name


async def _status(daemon: Daemon, params: dict[str, str], body: Any) -> ApiResponse:
    return ApiResponse(200, daemon.status())


async def _active_identity(daemon: Daemon, params: dict[str, str], body: Any) -> ApiResponse:
    await daemon.use_identity(_name_field(body, "identity"))
    return ApiResponse(200, daemon.status())


async def _route_identity(daemon: Daemon, params: dict[str, str], body: Any) -> ApiResponse:
    await daemon.use_identity(_name_field(body, "identity"), route=params["name"])
    return ApiResponse(200, daemon.status())


async def _renew(daemon: Daemon, params: dict[str, str], body: Any) -> ApiResponse:
    daemon.request_renewal(params["name"])
    return ApiResponse(202, {"renewing": params["name"]})


async def _list_routes(daemon: Daemon, params: dict[str, str], body: Any) -> ApiResponse:
    return ApiResponse(200, daemon.routes_status())


async def _add_route(daemon: Daemon, params: dict[str, str], body: Any) -> ApiResponse:
    name = _name_field(body, "route")
    fields = _route_fields(body, allowed=frozenset({"name"}))
    await daemon.add_route(name, fields)
    return ApiResponse(201, daemon.route_status(name))


async def _set_route(daemon: Daemon, params: dict[str, str], body: Any) -> ApiResponse:
    if not isinstance(body, dict) or not body:
        raise ApiError(400, 'send the route keys to change, for example {"target": "api.example.test:443"}')
    name = params["name"]
    await daemon.set_route(name, _route_fields(body))
    return ApiResponse(200, daemon.route_status(name))


def _route_fields(body: dict[str, Any], allowed: frozenset[str] = frozenset()) -> dict[str, Any]:
    unknown = sorted(set(body) - allowed - set(ROUTE_KEYS))
    if unknown:
        raise ApiError(400, f"unknown route field(s): {', '.join(unknown)}; known: {', '.join(ROUTE_KEYS)}")
    fields = {key: body[key] for key in ROUTE_KEYS if key in body}
    for key, value in fields.items():
        problem = _value_problem(value)
        if problem is not None:
            raise ApiError(400, f"{key}: {problem}", field=key)
    return fields


def _value_problem(value: Any) -> str | None:
    """Why `value` cannot be a route key's value (config.toml's types, checked there), or None.

    A route key is a string, number or boolean, or a flat list of them; null removes a key
    (PATCH) and means nothing inside a list.
    """
    if value is None or isinstance(value, str | bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else "expected a finite number"
    if isinstance(value, list):
        for index, item in enumerate(value):
            if item is None:
                return f"item {index} is null; a list holds strings (or numbers), never null"
            if not isinstance(item, str | bool | int | float) or (isinstance(item, float) and not math.isfinite(item)):
                return f"item {index} is {_json_type(item)}; a list holds strings (or numbers)"
        return None
    return f"expected a string, number, boolean or list, got {_json_type(value)}"


def _json_type(value: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


async def _remove_route(daemon: Daemon, params: dict[str, str], body: Any) -> ApiResponse:
    await daemon.remove_route(params["name"])
    return ApiResponse(200, {"removed": params["name"]})


async def _check(daemon: Daemon, params: dict[str, str], body: Any) -> ApiResponse:
    name = params["name"]
    route = daemon.config.routes.get(name)
    if route is None:
        raise NotFound(f"no route named {name!r} (known: {', '.join(daemon.config.routes) or 'none'})")
    identity, result = await _check_as_daemon(daemon, route)
    return ApiResponse(200, {"route": name, "identity": identity, **result})


async def _check_as_daemon(daemon: Daemon, route: RouteSpec) -> tuple[str, dict[str, Any]]:
    """`check` of `route` with the identity, selection and renew setting the daemon would use now."""
    from sidecar.check.observe import check_route

    identity = daemon.identity_for(route)
    spec = daemon.config.identities.get(identity)
    result = await check_route(
        route,
        daemon.current_selection(route),
        renew=spec.renew if spec is not None else None,
        identity_warning=daemon.expiry_warning(identity, datetime.now(UTC)),
    )
    return identity, result.to_json()


async def _proxy(daemon: Daemon, params: dict[str, str], body: Any) -> ApiResponse:
    return ApiResponse(200, daemon.proxy_status())


async def _proxy_pac(daemon: Daemon, params: dict[str, str], body: Any) -> ApiResponse:
    if daemon.proxy is None:
        raise ApiError(409, "the proxy is off: it starts once config.toml has a [[proxy.rules]]")
    return ApiResponse(200, {"pac": daemon.proxy.pac()})


async def _proxy_check(daemon: Daemon, params: dict[str, str], body: Any) -> ApiResponse:
    """What a proxy rule would do for `destination` (as CONNECT and SOCKS reach it): the real handshake."""
    from sidecar.proxy.rules import CONNECT, destination_route, match, refusal

    destination = body.get("destination") if isinstance(body, dict) else None
    if not isinstance(destination, str) or not destination:
        raise ApiError(400, 'send {"destination": "HOST:PORT"}, for example {"destination": "api.corp.example:443"}')
    host, port = _host_port(destination)
    proxy = daemon.config.proxy
    found = match(proxy.rules, host, port, CONNECT)
    if found is None:
        return ApiResponse(200, {
            "destination": destination,
            "rule": None,
            "ok": False,
            "cause": str(Cause.PROXY_NOT_ALLOWED),
            "message": refusal(proxy.rules, host, port, CONNECT),
            "fix": Cause.PROXY_NOT_ALLOWED.fix,
        })  # fmt: skip
    rule, dest = found
    if rule.passthrough:
        return ApiResponse(200, {
            "destination": dest.address,
            "rule": rule.name,
            "ok": True,
            "cause": str(Cause.OK),
            "message": f"rule {rule.name} passes {dest.address} through untouched (passthrough): the client does its "
            "own TLS and no client certificate is added, so there is nothing of ours to check",
            "fix": None,
        })  # fmt: skip
    identity, result = await _check_as_daemon(daemon, destination_route(rule, dest, proxy, CONNECT))
    return ApiResponse(200, {"destination": dest.address, "rule": rule.name, "identity": identity, **result})


def _host_port(text: str) -> tuple[str, int]:
    """ "host:port", "[v6]:port", or a host alone (port 443)."""
    from sidecar.config import parse_target

    field = "destination"
    if (text.startswith("[") and "]:" not in text) or (not text.startswith("[") and ":" not in text):
        text += ":443"
    return parse_target(text, field=field, source="the request")


async def _events(daemon: Daemon, params: dict[str, str], body: Any) -> ApiResponse:
    return ApiResponse(200, stream=EventFeed(daemon))


async def _metrics(daemon: Daemon, params: dict[str, str], body: Any) -> ApiResponse:
    return ApiResponse(200, daemon.metrics_text(), content_type=METRICS_CONTENT_TYPE)


_NAME = r"(?P<name>[A-Za-z0-9_.-]+)"

_ROUTES: list[tuple[str, re.Pattern[str], Handler]] = [
    ("GET", re.compile(r"/v1/status"), _status),
    ("POST", re.compile(r"/v1/active-identity"), _active_identity),
    ("POST", re.compile(rf"/v1/routes/{_NAME}/identity"), _route_identity),
    ("POST", re.compile(rf"/v1/identities/{_NAME}/renew"), _renew),
    ("GET", re.compile(r"/v1/routes"), _list_routes),
    ("POST", re.compile(r"/v1/routes"), _add_route),
    ("DELETE", re.compile(rf"/v1/routes/{_NAME}"), _remove_route),
    ("PATCH", re.compile(rf"/v1/routes/{_NAME}"), _set_route),
    ("POST", re.compile(rf"/v1/routes/{_NAME}/check"), _check),
    ("GET", re.compile(r"/v1/proxy"), _proxy),
    ("GET", re.compile(r"/v1/proxy/pac"), _proxy_pac),
    ("POST", re.compile(r"/v1/proxy/check"), _proxy_check),
    ("GET", re.compile(r"/v1/events"), _events),
    ("GET", re.compile(r"/v1/metrics"), _metrics),
]
