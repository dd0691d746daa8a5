"""The client side of one TLS connection, with no I/O inside.

Bytes from the network go in (`receive_data`, `receive_eof`, `receive_reset`); what happened
comes out as events (`events()`); bytes to put on the network come out of `data_to_send()`.
The caller owns the socket, as with h11's `Connection`. The tunnel and `check` both drive
TLS through this one class, so the rules below hold for both and are tested by feeding bytes
(tests/test_tlspipe.py), with no sockets:

- **Half-close is per direction** (`flow`): the server's close_notify ends only what it
  sends (`CloseNotify`); our `send_eof()` (close_notify) ends only what we send.
- **A TCP FIN without close_notify is a half-close too**, reported as `Truncated` (the
  answer may have been cut short, and nothing proves otherwise), but what we send still
  goes out: the TLS session is not torn down. (OpenSSL would refuse to write once told of
  an unexpected EOF, so after the handshake the EOF is never handed to OpenSSL: whatever
  came before it is read out, and the pipe itself notes that no close_notify was among it.)
- **A reset** (`receive_reset`) first reads what arrived before it: a server that rejects
  our certificate after a TLS 1.3 handshake often sends its alert and resets at once, and
  the alert is the explanation (`CertificateRejected`, not `Reset`).
- **Rejection after the handshake**: with TLS 1.3 the client's handshake is complete before
  the server has looked at our certificate; its verdict arrives as an alert on the first
  read, reported as `CertificateRejected` like the same alert during the handshake.
"""

from __future__ import annotations

import contextlib
import ssl
from dataclasses import dataclass
from enum import Flag, auto

from sidecar.causes import REJECTING_ALERTS, alert_name, ssl_reason

READ_CHUNK = 64 * 1024
KEEP_FIRST_BYTES = 256  # of what the server sent first: enough to show what a plaintext server said


class Flow(Flag):
    """What may still pass on an open connection, per direction."""

    NONE = 0
    CAN_RECEIVE = auto()  # the server may still send us plaintext
    CAN_SEND = auto()  # we may still send plaintext to the server
    BOTH = CAN_RECEIVE | CAN_SEND


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HandshakeDone:
    """Our side of the handshake is complete (with TLS 1.3 the server may still reject us)."""


@dataclass(frozen=True)
class Received:
    data: bytes


@dataclass(frozen=True)
class CloseNotify:
    """The server's clean end of what it sends; we may go on sending."""


@dataclass(frozen=True)
class Truncated:
    """TCP closed without close_notify: an end of what the server sends that proves nothing.
    `received`: plaintext bytes it sent before."""

    received: int


@dataclass(frozen=True)
class Reset:
    """The transport broke (`error`) with nothing in what came before to explain it."""

    error: BaseException
    received: int


@dataclass(frozen=True)
class CertificateRejected:
    """The server sent an alert that means "not your certificate" (during or after the handshake)."""

    error: ssl.SSLError
    alert: str
    during_handshake: bool


@dataclass(frozen=True)
class Failed:
    """Any other TLS failure: our verification of the server, an alert, a protocol error, or
    the connection ending in the middle of the handshake (`error` then an OSError)."""

    error: BaseException
    during_handshake: bool


Event = HandshakeDone | Received | CloseNotify | Truncated | Reset | CertificateRejected | Failed
_NO_EVENTS: list[Event] = []  # returned, never changed: no list made per write


@dataclass(frozen=True)
class Prepared:
    """An SSLObject and its memory BIOs made ahead of the connection that will use them.

    Making one that offers a TLS 1.3 session costs about 150 µs here (CPython copies the session,
    with the server's certificate chain, through DER), against 5 µs without: the tunnel makes
    the next one when nothing else is waiting, not while a client waits for its connection."""

    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO
    tls: ssl.SSLObject
    session: ssl.SSLSession | None


def prepare(ctx: ssl.SSLContext, server_name: str | None, session: ssl.SSLSession | None) -> Prepared:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name, session=session)
    return Prepared(incoming, outgoing, tls, session)


class TLSPipe:
    """One TLS client connection over memory BIOs."""

    def __init__(
        self,
        ctx: ssl.SSLContext,
        server_name: str | None,
        *,
        session: ssl.SSLSession | None = None,
        server_side: bool = False,
        prepared: Prepared | None = None,
    ) -> None:
        """`server_side`: the local end of a `local_tls` route, where we are the server (the
        rules are the same; "the server" in the events then means the local client).
        `prepared`: the SSLObject made ahead for this connection (`prepare`), if there is one."""
        if prepared is not None:
            self._incoming, self._outgoing, self.tls = prepared.incoming, prepared.outgoing, prepared.tls
        else:
            self._incoming = ssl.MemoryBIO()
            self._outgoing = ssl.MemoryBIO()
            self.tls = ctx.wrap_bio(
                self._incoming,
                self._outgoing,
                server_side=server_side,
                server_hostname=None if server_side else server_name,
                session=session,
            )
        self.handshake_complete = False
        self._can_receive = True  # the per-direction state; `flow` shows it as a Flow
        self._can_send = True
        self.received = 0  # plaintext bytes from the server
        self.first_bytes = b""  # the start of what the server sent, raw
        self.failed = False  # a Failed, CertificateRejected or Reset was reported: nothing more passes
        self._eof = False
        self._reset: BaseException | None = None

    @property
    def flow(self) -> Flow:
        return (Flow.CAN_RECEIVE if self._can_receive else Flow.NONE) | (Flow.CAN_SEND if self._can_send else Flow.NONE)

    # --- input

    def receive_data(self, data: bytes) -> None:
        if len(self.first_bytes) < KEEP_FIRST_BYTES:
            self.first_bytes += data[: KEEP_FIRST_BYTES - len(self.first_bytes)]
        self._incoming.write(data)

    def receive_eof(self) -> None:
        """The server closed its side of TCP (a FIN)."""
        self._eof = True

    def receive_reset(self, error: BaseException) -> None:
        """The transport broke; `events()` reads what came before, then reports it."""
        self._reset = error

    # --- output

    def data_to_send(self) -> bytes:
        return self._outgoing.read() if self._outgoing.pending else b""

    def events(self) -> list[Event]:
        """Advance the handshake, or (once it is done: call again) read plaintext; say what happened.

        Stops after HandshakeDone: the caller may want to check the server before it reads a byte.
        """
        out: list[Event] = []
        while (event := self.next_event()) is not None:
            out.append(event)
            if isinstance(event, HandshakeDone):
                break
        return out

    def next_event(self) -> Event | None:
        """One event, or None when nothing more can be said until more bytes come.

        One TLS record at a time, so a caller can pass each on before decrypting the next.
        """
        if self.failed:
            return None
        if not self.handshake_complete:
            return self._advance_handshake()
        return self._read_one()

    def send(self, data: bytes) -> list[Event]:
        """Encrypt plaintext for the server (then `data_to_send()`); an error comes back as an event."""
        if self.failed or not self._can_send or not self.handshake_complete:
            return _NO_EVENTS
        try:
            self.tls.write(data)
        except ssl.SSLError as exc:
            return [self._fail(exc, during_handshake=False)]
        return _NO_EVENTS

    def send_eof(self) -> None:
        """End what we send: close_notify. The server may go on sending."""
        if not self._can_send:
            return
        self._can_send = False
        if self.failed or not self.handshake_complete:
            return
        with contextlib.suppress(ssl.SSLError):  # SSLWantReadError: it would now want the server's
            self.tls.unwrap()  # in BIO mode: queues close_notify

    # --- internals

    def _advance_handshake(self) -> Event | None:
        if self._eof or self._reset is not None:
            self._incoming.write_eof()  # during the handshake, OpenSSL must see the end to explain it
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            if self._eof or self._reset is not None:
                error = self._reset or ConnectionResetError("closed during the TLS handshake")
                return self._fail(error, during_handshake=True)
            return None
        except (ssl.SSLError, OSError) as exc:
            return self._fail(exc, during_handshake=True)
        self.handshake_complete = True
        return HandshakeDone()

    def _read_one(self) -> Event | None:
        if self._can_receive:
            try:
                chunk = self.tls.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                chunk = None  # nothing whole is buffered
            except ssl.SSLZeroReturnError:  # close_notify, when we had sent ours first
                chunk = b""
            except ssl.SSLError as exc:  # an alert: with TLS 1.3, how a server rejects our certificate
                return self._fail(exc, during_handshake=False)
            if chunk:
                self.received += len(chunk)
                return Received(chunk)
            if chunk is not None:  # close_notify (Python's SSLObject returns b"" for it)
                self._can_receive = False
                return CloseNotify()
        if self._reset is not None:
            if self._can_receive or self._can_send:
                self.failed = True
                self._can_receive = self._can_send = False
                return Reset(self._reset, self.received)
            return None
        if self._eof and self._can_receive:
            self._can_receive = False
            return Truncated(self.received)
        return None

    def _fail(self, exc: BaseException, *, during_handshake: bool) -> Event:
        self.failed = True
        self._can_receive = self._can_send = False
        if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLCertVerificationError):
            alert = alert_name(ssl_reason(exc) or "")
            if alert in REJECTING_ALERTS:
                return CertificateRejected(exc, alert, during_handshake)
        return Failed(exc, during_handshake)
