"""`protocol = "postgres"`: PostgreSQL's SSLRequest dance on both sides. Pure.

PostgreSQL does not start TLS on connect: the client sends an 8-byte SSLRequest and the
server answers one byte, `S` (TLS follows) or `N`. PostgreSQL 17 also takes TLS at once, but
only with the ALPN `postgresql` (`postgres_negotiation = "direct"`).

Towards the local client (which knows nothing of certificates), the stage answers an
SSLRequest or a GSSENCRequest with `N`, so `sslmode=disable`, `allow` and `prefer` all carry
on in plaintext (with `local_tls = true` it answers the SSLRequest with `S` instead and the
local client's TLS ends in the sidecar, with a dev-CA certificate for localhost: for clients
that insist on `sslmode=require` or `verify-full`), and keeps the client's first real message: a StartupMessage, or a
CancelRequest (psql opens a new connection for it when you press Ctrl-C). Towards the server
it sends its own SSLRequest (unless direct), requires `S`, lets the connection run the mTLS
handshake and the route's checks, and only then sends the client's message through TLS.
From there on it steps aside: bytes pass untouched both ways.

When the server cannot be reached or refuses us, the client gets a PostgreSQL ErrorResponse
with the reason and the fix, so psql prints them instead of "server closed the connection
unexpectedly".
"""

from __future__ import annotations

import struct

from sidecar.causes import Cause, Fault
from sidecar.config import RouteSpec
from sidecar.stages import (
    Close,
    Command,
    EndLocal,
    EndRemote,
    Refuse,
    SendLocal,
    SendRemote,
    StartLocalTLS,
    StartTLS,
)

SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
PROTOCOL_3 = 196608  # 3.0, the StartupMessage's version
SSL_REQUEST = struct.pack("!ii", 8, SSL_REQUEST_CODE)
MAX_STARTUP = 10_000  # PostgreSQL's own limit for a startup packet
# SQLSTATE 08006 connection_failure: what libpq reports for a server it cannot get through to.
CONNECTION_FAILURE = "08006"


def first_message(data: bytes) -> tuple[str, int] | None:
    """What a client's first packet is ("ssl", "gssenc", "cancel", "startup"), and its length;
    None while fewer than 8 bytes are here. Raises ValueError for anything else."""
    if len(data) < 8:
        return None
    length, code = struct.unpack("!ii", data[:8])
    if length == 8 and code == SSL_REQUEST_CODE:
        return "ssl", 8
    if length == 8 and code == GSSENC_REQUEST_CODE:
        return "gssenc", 8
    if length == 16 and code == CANCEL_REQUEST_CODE:
        return "cancel", 16
    if 8 <= length <= MAX_STARTUP and code >> 16 == 3:
        return "startup", length
    raise ValueError(f"not a PostgreSQL startup packet (length {length}, code {code})")


def looks_like_postgres_client(data: bytes) -> bool:
    """A local client's first bytes are a PostgreSQL SSLRequest, GSSENCRequest or StartupMessage."""
    try:
        found = first_message(data)
    except ValueError:
        return False
    return found is not None and found[0] != "cancel"


def error_response(message: str, hint: str | None = None, code: str = CONNECTION_FAILURE) -> bytes:
    """A FATAL ErrorResponse ('E') as libpq shows it: message, and hint on its own line."""
    fields = [b"SFATAL", b"VFATAL", b"C" + code.encode(), b"M" + message.encode()]
    if hint:
        fields.append(b"H" + hint.encode())
    body = b"".join(f + b"\0" for f in fields) + b"\0"
    return b"E" + struct.pack("!i", len(body) + 4) + body


class PostgresStage:
    def __init__(self, route: RouteSpec) -> None:
        self.route = route
        self.direct = route.postgres_negotiation == "direct"
        self.transparent = False
        self._local = b""  # the client's bytes not yet understood or not yet sent
        self._message: bytes | None = None  # its StartupMessage or CancelRequest, whole
        self._remote = b""  # the server's answer to our SSLRequest
        self._asked = False  # our SSLRequest is on its way
        self._established = False
        self._local_tls = False  # the local client's TLS is on (local_tls)
        self._failure: tuple[str, str | None] | None = None  # (message, fix) once the remote failed

    # --- the local client

    def from_local(self, data: bytes) -> list[Command]:
        if self._message is not None:  # more after its first message, before TLS is up: keep it
            self._local += data
            return self._send_if_ready()
        self._local += data
        out: list[Command] = []
        while self._message is None:
            try:
                found = first_message(self._local)
            except ValueError as exc:
                fault = Fault("local", "protocol", str(exc))
                return [Refuse(fault, f"the local client does not speak PostgreSQL: {exc}")]
            if found is None:
                return out
            kind, length = found
            if len(self._local) < length:
                return out
            packet, self._local = self._local[:length], self._local[length:]
            if kind == "ssl" and self.route.local_tls and not self._local_tls:
                self._local_tls = True  # TLS towards the local client too; what follows is decrypted for us
                out += [SendLocal(b"S"), StartLocalTLS()]
                continue
            if kind in ("ssl", "gssenc"):
                out.append(SendLocal(b"N"))  # no TLS or GSS towards the local client: it goes on in plaintext
                continue
            self._message = packet
        if self._failure is not None:
            return out + self._answer_failure()
        return out + self._send_if_ready()

    def local_eof(self) -> list[Command]:
        if self._established:
            return [EndRemote()]
        return [Close()]

    # --- the server

    def connected(self) -> list[Command]:
        if self.direct:
            return [StartTLS()]
        self._asked = True
        return [SendRemote(SSL_REQUEST)]

    def from_remote(self, data: bytes) -> list[Command]:
        if self._established:
            return [SendLocal(data)]
        self._remote += data
        answer, rest = self._remote[:1], self._remote[1:]
        if answer == b"S":
            if rest:  # bytes after `S` before our ClientHello: a server trying to inject plaintext
                fault = Fault("handshake", "protocol", "data after S")
                return [Refuse(fault, f"{self._target()} sent data after agreeing to TLS: refused")]
            return [StartTLS()]
        if answer == b"N":
            fault = Fault("handshake", "no_tls", "server answered N to SSLRequest")
            message = f"{self._target()} does not offer TLS (it answered N to our SSLRequest)"
            return [Refuse(fault, message + "; turn on ssl in its postgresql.conf")]
        fault = Fault("handshake", "protocol", f"unexpected answer {answer!r} to SSLRequest")
        return [Refuse(fault, f"{self._target()} answered {answer!r} to our SSLRequest: is it PostgreSQL?")]

    def remote_eof(self) -> list[Command]:
        return [EndLocal()]

    def tls_established(self) -> list[Command]:
        self._established = True
        return self._send_if_ready()

    def remote_failed(self, cause: Cause, message: str) -> list[Command]:
        self._failure = (message, cause.fix)
        if self._message is None:
            return []  # answer once the client has said who it is (it waits for nothing else)
        return self._answer_failure()

    # --- internals

    def _send_if_ready(self) -> list[Command]:
        if not self._established or self._message is None:
            return []
        out: list[Command] = [SendRemote(self._message + self._local)]
        self._message, self._local = b"", b""
        self.transparent = True  # from here on, bytes pass untouched
        return out

    def _answer_failure(self) -> list[Command]:
        assert self._failure is not None
        message, fix = self._failure
        return [SendLocal(error_response(f"mtls-sidecar: {message}", fix)), Close()]

    def _target(self) -> str:
        return self.route.target
