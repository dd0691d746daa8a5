"""The built-in demo service: a small HTTPS server on loopback that demands a client certificate.

It answers every request with the subject and serial of the certificate the client
presented, so a first run can show the whole path working: `curl` → route → mTLS → here.
HTTP framing is h11's job, not ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from datetime import datetime, timedelta
from pathlib import Path

import h11
from cryptography import x509

from sidecar.config import ListenAddress
from sidecar.credentials import Candidate
from sidecar.devca import DevCA
from sidecar.errors import LocalSetupError
from sidecar.h11io import next_event, send_response
from sidecar.tlsctx import load_credential

log = logging.getLogger("sidecar.demo")

SERVER_LIFETIME = timedelta(days=30)
_MAX_REQUEST = 64 * 1024


def build_server_context(ca: DevCA, ca_file: Path, now: datetime) -> ssl.SSLContext:
    """Server side: a fresh dev-CA certificate for localhost, client certificates required."""
    issued = ca.issue_server(["localhost", "127.0.0.1", "::1"], SERVER_LIFETIME, now)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca_file))
    ctx.set_alpn_protocols(["http/1.1"])
    load_credential(ctx, Candidate(file="<demo>", cert=issued.cert, chain=issued.chain, key=issued.key))
    return ctx


def greeting(peer_der: bytes | None) -> bytes:
    """The demo's answer for a client certificate (DER) — pure, for tests."""
    if peer_der is None:
        return b"no client certificate\n"
    cert = x509.load_der_x509_certificate(peer_der)
    return (
        "hello from the mtls-sidecar demo service\n"
        f"client subject: {cert.subject.rfc4514_string()}\n"
        f"client serial: {cert.serial_number:x}\n"
        f"client expires: {cert.not_valid_after_utc.isoformat()}\n"
    ).encode()


class DemoService:
    def __init__(self, listen: ListenAddress, ctx: ssl.SSLContext) -> None:
        self.listen = listen
        self.ctx = ctx
        self._server: asyncio.base_events.Server | None = None
        self.port = listen.port

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self.listen.host, self.listen.port, ssl=self.ctx)
        except OSError as exc:
            raise LocalSetupError(
                f"demo service: cannot listen on {self.listen}: {exc.strerror or exc}; "
                "change demo_service.listen in the config or set demo_service.enabled = false"
            ) from exc
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("demo mTLS service listening on %s:%d (client certificate required)", self.listen.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        peer = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST)
        try:
            while True:
                event = await next_event(conn, reader, _MAX_REQUEST, 30)
                if isinstance(event, h11.Request):
                    body = greeting(peer)
                    headers = [("content-type", "text/plain"), ("content-length", str(len(body)))]
                    await send_response(conn, writer, 200, headers, body)
                elif isinstance(event, h11.EndOfMessage) and conn.our_state is h11.DONE:
                    if conn.their_state is h11.DONE:
                        conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    break
        except (h11.ProtocolError, TimeoutError, ConnectionError, ssl.SSLError) as exc:
            log.debug("demo service: connection ended: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
