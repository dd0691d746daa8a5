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
`answer` is pure; `StatusPort` is the socket side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11

from sidecar.config import ListenAddress, parse_listen
from sidecar.errors import ConfigError
from sidecar.h11io import next_event, send_response
from sidecar.metrics import CONTENT_TYPE

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
class Reply:
    status: int
    content_type: str
    body: bytes
    then_shutdown: bool = False


@dataclass(frozen=True)
class Figures:
    """What the port reports, read when a request comes."""

    status: Callable[[], Awaitable[dict[str, Any]]]  # the /_status document (runs the backend check)
    metrics_text: Callable[[], str]  # Prometheus text
    metrics_json: Callable[[], dict[str, Any]]


async def answer(method: str, target: str, figures: Figures, *, shutdown_enabled: bool) -> Reply:
    """The reply to one request (no sockets here)."""
    parts = urlsplit(target)
    path, query = parts.path.rstrip("/") or "/", parse_qs(parts.query)
    if path == "/_shutdown":
        if not shutdown_enabled:
            return _json(404, {"error": "/_shutdown is off: start the tunnel with --enable-shutdown"})
        if method != "POST":
            return _json(405, {"error": "use POST /_shutdown"})
        return Reply(200, JSON_TYPE, b'{"ok": true, "message": "stopping"}\n', then_shutdown=True)
    if method not in ("GET", "HEAD"):
        return _json(405, {"error": f"{method} is not served here: use GET"})
    if path == "/_status":
        document = await figures.status()
        return _json(200 if document.get("ok") else 503, document)
    if path in ("/_metrics", "/_metrics/prometheus", "/_metrics/json"):
        wants_json = path == "/_metrics/json" or query.get("format", [""])[0] == "json"
        if wants_json:
            return _json(200, figures.metrics_json())
        return Reply(200, CONTENT_TYPE, figures.metrics_text().encode())
    return _json(404, {"error": f"no such page {path}: try /_status, /_metrics or /_shutdown"})


def _json(status: int, body: Any) -> Reply:
    return Reply(status, JSON_TYPE, json.dumps(body, indent=None).encode() + b"\n")


class StatusPort:
    """Serves `answer` on `address`, over TLS with `ssl_context` (None: plain HTTP). The caller
    loads a reloaded certificate into that same context: the next handshake presents it."""

    def __init__(
        self,
        address: StatusAddress,
        figures: Figures,
        *,
        ssl_context: ssl.SSLContext | None,
        on_shutdown: Callable[[], None],
        shutdown_enabled: bool,
    ) -> None:
        self.address = address
        self.figures = figures
        self.ssl_context = ssl_context if address.tls else None
        self.on_shutdown = on_shutdown
        self.shutdown_enabled = shutdown_enabled
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def bound(self) -> str:
        if self._server is None or not self._server.sockets:
            return str(self.address)
        name = self._server.sockets[0].getsockname()
        if self.address.listen.kind == "unix":
            return str(self.address)
        host, port = name[0], name[1]
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return f"{'https' if self.ssl_context is not None else 'http'}://{shown}"

    async def start(self) -> None:
        listen = self.address.listen
        if listen.kind == "unix":
            assert listen.path is not None
            self._server = await asyncio.start_unix_server(self._serve, path=listen.path)
        else:
            self._server = await asyncio.start_server(self._serve, listen.host, listen.port, ssl=self.ssl_context)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._requests(reader, writer)
        except (h11.RemoteProtocolError, ConnectionError, TimeoutError, ssl.SSLError) as exc:
            log.debug("status port: a connection ended: %s", exc)
        except asyncio.CancelledError:
            pass  # stop(): ending normally keeps asyncio from logging the cancelled handler
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_READ_CHUNK)
        while True:
            request: h11.Request | None = None
            while True:
                event = await next_event(conn, reader, _READ_CHUNK, _REQUEST_TIMEOUT)
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
            assert request is not None
            method = request.method.decode("ascii", "replace")
            try:
                reply = await answer(
                    method,
                    request.target.decode("ascii", "replace"),
                    self.figures,
                    shutdown_enabled=self.shutdown_enabled,
                )
            except Exception as exc:  # a bug of ours: an answer that says so, and the tunnel goes on
                log.exception("status port: %s %s failed", method, request.target.decode("ascii", "replace"))
                reply = _json(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})
            headers = [("content-type", reply.content_type), ("content-length", str(len(reply.body)))]
            await send_response(conn, writer, reply.status, headers, None if method == "HEAD" else reply.body)
            if reply.then_shutdown:
                log.info("stopping: asked by POST /_shutdown on the status port")
                self.on_shutdown()
                return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
