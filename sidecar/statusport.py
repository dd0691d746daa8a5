"""`tunnel --status ADDRESS`: ghostunnel's status port, for scripts and orchestrators that watch it.

- `GET /_status`: JSON in ghostunnel's shape (`ok`, `status`, `listen_address`,
  `forward_address`, `backend_ok`, `backend_status`, `backend_error`, `time`, `last_reload`,
  `message`), plus what we know besides (`certificate`, `connections`). The backend check is a
  full mTLS connection to the target (`check`'s), as ghostunnel's client mode does; 503 when it fails.
- `GET /_metrics`: Prometheus text (`/_metrics/prometheus` too); `/_metrics/json` or
  `?format=json`: the same figures as JSON.
- `POST /_shutdown` with `--enable-shutdown`: a graceful stop, as SIGTERM (other methods: 405).

Over HTTPS presenting the tunnel's current client certificate, so a reload shows on the port
(`openssl s_client` or `curl -v` see the new serial); plain HTTP for `http://` addresses,
`unix:` sockets, and when the tunnel presents no certificate (`--disable-authentication`).
`answer` is pure (but for the backend check it awaits); `metricsserver.MetricsServer` is the
socket side, as for `metrics_listen`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sidecar.config import ListenAddress, parse_listen
from sidecar.errors import ConfigError
from sidecar.metrics import CONTENT_TYPE
from sidecar.metricsserver import Answer, error_answer

log = logging.getLogger("sidecar.status")

_READ_CHUNK = 16 * 1024
_REQUEST_TIMEOUT = 30.0
JSON_TYPE = "application/json"


@dataclass(frozen=True)
class StatusAddress:
    listen: ListenAddress
    tls: bool  # HTTPS with the current client certificate (when there is one)

    def __str__(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.listen}" if self.listen.kind == "tcp" else str(self.listen)


def parse_status_address(text: str, *, source: str) -> StatusAddress:
    """`HOST:PORT` or `https://HOST:PORT` (HTTPS), `http://HOST:PORT` (plain), `unix:PATH` (plain)."""
    scheme, _, rest = text.partition("://")
    if not rest:
        scheme, rest = "https", text
    if scheme not in ("http", "https"):
        raise ConfigError(
            f"unknown scheme {scheme!r}: use HOST:PORT, https://HOST:PORT, http://HOST:PORT or unix:PATH",
            source=source,
            field="--status",
            value=text,
        )
    listen = parse_listen(rest, field="--status", source=source)
    return StatusAddress(listen, tls=scheme == "https" and listen.kind == "tcp")


@dataclass(frozen=True)
class Figures:
    """What the port reports, read when a request comes."""

    status: Callable[[], Awaitable[dict[str, Any]]]  # the /_status document (runs the backend check)
    metrics_text: Callable[[], str]  # Prometheus text
    metrics_json: Callable[[], dict[str, Any]]


async def answer(method: str, target: str, figures: Figures, *, shutdown: Callable[[], None] | None) -> Answer:
    """The answer to one request (no sockets here); `shutdown`: what POST /_shutdown calls
    once answered (None: --enable-shutdown was not given)."""
    parts = urlsplit(target)
    path, query = parts.path.rstrip("/") or "/", parse_qs(parts.query)
    if path == "/_shutdown":
        if shutdown is None:
            return error_answer(404, "/_shutdown is off: start the tunnel with --enable-shutdown")
        if method != "POST":
            return error_answer(405, f"{method} is not allowed on /_shutdown; use POST", allow="POST")
        return Answer(200, JSON_TYPE, b'{"ok": true, "message": "stopping"}\n', after=shutdown)
    if method not in ("GET", "HEAD"):
        return error_answer(405, f"{method} is not allowed on {path}; use GET", allow="GET, HEAD")
    if path == "/_status":
        document = await figures.status()
        return _json(200 if document.get("ok") else 503, document)
    if path in ("/_metrics", "/_metrics/prometheus", "/_metrics/json"):
        wants_json = path == "/_metrics/json" or query.get("format", [""])[0] == "json"
        if wants_json:
            return _json(200, figures.metrics_json())
        return Answer(200, CONTENT_TYPE, figures.metrics_text().encode())
    return error_answer(404, f"no such path: {path}; try /_status, /_metrics or /_shutdown")


def _json(status: int, body: Any) -> Answer:
    return Answer(status, JSON_TYPE, json.dumps(body, indent=None).encode() + b"\n")
