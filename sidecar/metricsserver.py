"""A tiny HTTP server for a local scraper (`metrics_listen`) and `tunnel --status`: h11 frames
it, `answer` decides.

`metrics_answer(method, target, render)` is the pure part: which status, content type and body
a request gets. `MetricsServer(listen, answer)` is the socket part, and serves any `answer`
function (sync or async; `tunnel --status` gives its own, and a TLS context): one request per
connection, other OS users' connections refused as routes refuse them.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import json
import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import h11

from sidecar.config import ListenAddress
from sidecar.errors import LocalSetupError
from sidecar.h11io import ConnectionTasks, next_event, send_response
from sidecar.metrics import CONTENT_TYPE
from sidecar.tunnel import refuse_other_user

log = logging.getLogger("sidecar.metrics")

METRICS_PATHS = ("/metrics", "/v1/metrics")
_READ_CHUNK = 16 * 1024
_MAX_REQUEST = 16 * 1024  # a scraper's request line and headers; nothing we serve takes a body
_REQUEST_TIMEOUT = 30.0


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes
    allow: str | None = None  # the Allow header of a 405
    after: Callable[[], None] | None = None  # called once the answer is sent (POST /_shutdown)


Answerer = Callable[[str, str], Answer | Awaitable[Answer]]


def metrics_answer(
    method: str, target: str, render: Callable[[], str], *, paths: tuple[str, ...] = METRICS_PATHS
) -> Answer:
    """`GET /metrics` (or another of `paths`): the Prometheus text `render()` gives; 404 elsewhere,
    405 for methods other than GET and HEAD."""
    path = target.split("?", 1)[0]
    if path not in paths:
        return error_answer(404, f"no such path: {path}; the metrics are at {paths[0]}")
    if method not in ("GET", "HEAD"):
        return error_answer(405, f"{method} is not allowed on {path}; use GET", allow="GET, HEAD")
    return Answer(200, CONTENT_TYPE, render().encode("utf-8"))


def error_answer(status: int, message: str, *, allow: str | None = None) -> Answer:
    body = json.dumps({"error": message}).encode() + b"\n"
    return Answer(status, "application/json", body, allow)


class MetricsServer:
    """start(), stop(), is_running, bound, last_error; `what` names it in messages (the config key
    or flag). With `ssl_context`, TCP connections speak HTTPS (a certificate loaded into that
    context later is what the next handshake presents); a unix socket is plain HTTP, mode 0600."""

    def __init__(
        self,
        listen: ListenAddress,
        answer: Answerer,
        *,
        what: str = "metrics_listen",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.listen = listen
        self.answer = answer
        self.what = what
        self.ssl_context = ssl_context if listen.kind == "tcp" else None
        self.bound: ListenAddress | None = None
        self.last_error: str | None = None
        self.served = 0
        self.refused = 0  # connections from other OS users
        self._server: asyncio.base_events.Server | None = None
        self._connections = ConnectionTasks()

    @property
    def is_running(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def start(self) -> None:
        """Bind and serve; LocalSetupError naming the key and address when it cannot."""
        listen = self.listen
        try:
            if listen.kind == "unix":
                assert listen.path is not None
                self._server = await asyncio.start_unix_server(self._serve, path=listen.path)
                os.chmod(listen.path, 0o600)
            else:
                self._server = await asyncio.start_server(
                    self._serve, listen.host, listen.port, reuse_address=True, ssl=self.ssl_context
                )
        except OSError as exc:
            why = "the port is taken (another program listens there)" if _taken(exc) else (exc.strerror or str(exc))
            fix = "pick another port in config.toml" if self.what == "metrics_listen" else "pick another address"
            self.last_error = f"{self.what}: cannot listen on {listen}: {why}; {fix}"
            raise LocalSetupError(self.last_error) from exc
        if listen.kind == "unix":
            self.bound = listen
        else:
            self.bound = ListenAddress("tcp", listen.host, int(self._server.sockets[0].getsockname()[1]))
        self.last_error = None
        log.info("%s: serving on %s", self.what, self.url)

    @property
    def url(self) -> str:
        where = self.bound or self.listen
        if where.kind == "unix":
            return f"unix:{where.path}"
        return f"{'https' if self.ssl_context is not None else 'http'}://{where}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        await self._connections.cancel_all()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self._connections.serving(writer):
            try:
                transport = cast(asyncio.Transport, writer.transport)
                refusal = refuse_other_user(transport, self.what)
                if refusal is not None:
                    self.refused += 1
                    log.warning("%s: %s", self.what, refusal.message)
                    transport.abort()
                    return
                await self._one_request(reader, writer)
            except (h11.RemoteProtocolError, ConnectionError, TimeoutError, ssl.SSLError) as exc:
                log.debug("%s: a connection ended: %s", self.what, exc)

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST)
        request: h11.Request | None = None
        body = 0  # bytes of a request body: nothing here takes one, so it is read past, up to a limit
        while True:
            event = await next_event(conn, reader, _READ_CHUNK, _REQUEST_TIMEOUT)
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += len(event.data)
                if body > _MAX_REQUEST:
                    return
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
        if request is None:
            return
        method = request.method.decode("ascii", "replace")
        try:
            given = self.answer(method, request.target.decode("ascii", "replace"))
            answer = await given if inspect.isawaitable(given) else given
        except Exception:  # a bug of ours: the scraper still gets an answer, the log the traceback
            log.exception("%s: answering %s failed", self.what, method)
            answer = error_answer(500, "the sidecar failed to answer (see its log)")
        self.served += 1
        headers = [
            ("content-type", answer.content_type),
            ("content-length", str(len(answer.body))),
            ("cache-control", "no-store"),
            ("connection", "close"),
        ]
        if answer.allow:
            headers.append(("allow", answer.allow))
        await send_response(conn, writer, answer.status, headers, None if method == "HEAD" else answer.body)
        if answer.after is not None:
            answer.after()


def _taken(exc: OSError) -> bool:
    return exc.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1))
