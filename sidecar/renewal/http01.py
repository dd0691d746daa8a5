"""A tiny HTTP responder for ACME http-01 challenges (RFC 8555 §8.3), loopback only.

It runs on the daemon's event loop for the duration of one issuance and answers
`GET /.well-known/acme-challenge/TOKEN` with the key authorization for TOKEN; everything
else is a 404. Tokens are published from any thread (the ACME exchange runs in a worker
thread), so the table is guarded by a lock. Framing is h11's job; each connection serves one
request and is closed.

Key authorizations are public by design (the CA fetches them over plain HTTP); they are not
secrets, but they are still not logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

import h11

from sidecar.h11io import next_event, send_response

log = logging.getLogger("sidecar.renewal.http01")

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
LOOPBACK = "127.0.0.1"
_MAX_REQUEST = 8 * 1024
_READ_TIMEOUT_S = 10.0


class Http01Responder:
    """Serve http-01 key authorizations on `host:port` while started."""

    def __init__(self, port: int, host: str = LOOPBACK) -> None:
        self.host = host
        self.port = port
        self.requests = 0  # every request answered, any path
        self.answered = 0  # requests answered with a key authorization
        self.last_error: str | None = None
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server: asyncio.base_events.Server | None = None

    @property
    def is_running(self) -> bool:
        return self._server is not None

    def publish(self, token: str, key_authorization: str) -> None:
        """Make `token` answerable. Safe to call from any thread."""
        with self._lock:
            self._tokens[token] = key_authorization

    def withdraw(self, token: str) -> None:
        with self._lock:
            self._tokens.pop(token, None)

    def answer(self, target: str) -> str | None:
        """The key authorization for a request target, or None (404). Pure lookup, for tests."""
        path = target.split("?", 1)[0]
        if not path.startswith(CHALLENGE_PREFIX):
            return None
        token = path[len(CHALLENGE_PREFIX) :]
        with self._lock:
            return self._tokens.get(token)

    async def start(self) -> None:
        """Listen; raises OSError (for example EADDRINUSE) when the port cannot be bound."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        log.debug("http-01 responder listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await server.wait_closed()
        with self._lock:
            self._tokens.clear()
        log.debug("http-01 responder on %s:%d stopped", self.host, self.port)

    async def __aenter__(self) -> Http01Responder:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST)
        try:
            while True:
                event = await next_event(conn, reader, _MAX_REQUEST, _READ_TIMEOUT_S)
                if isinstance(event, h11.Request):
                    await self._respond(conn, writer, event)
                break
        except h11.RemoteProtocolError as exc:
            self.last_error = f"bad request: {exc}"
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                headers = [("content-length", "0"), ("connection", "close")]
                writer.write(conn.send(h11.Response(status_code=400, headers=headers)) or b"")
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
        except (h11.ProtocolError, TimeoutError, ConnectionError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.debug("http-01 responder: connection ended: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, conn: h11.Connection, writer: asyncio.StreamWriter, request: h11.Request) -> None:
        self.requests += 1
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("ascii", "replace")
        body_text = self.answer(target) if method in ("GET", "HEAD") else None
        if body_text is None:
            status, body = 404, b"not found\n"
        else:
            status, body = 200, body_text.encode("ascii")
            self.answered += 1
        log.debug("http-01 responder: %s %s -> %d", method, target, status)
        headers = [
            ("content-type", "text/plain"),
            ("content-length", str(len(body))),
            ("connection", "close"),
        ]
        await send_response(conn, writer, status, headers, None if method == "HEAD" else body)
