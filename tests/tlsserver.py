"""A small threaded TLS server on 127.0.0.1 that can misbehave on purpose.

For what nginx and redis will not do: close or reset right after the handshake, speak
plaintext on a TLS port, never answer, answer only after the client half-closes. TLS runs
over `ssl.MemoryBIO`, so every byte that crosses the TCP socket is recorded before
decryption (`raw_received`): tests can prove that no plaintext leaked.

    with ScriptedTLSServer(cert=c, key=k, client_ca=ca, require_client_cert=True) as srv:
        ...connect to 127.0.0.1:srv.port...
        srv.wait_closed(1)
        assert srv.peer_certs == [client_der]

Modes (what each accepted connection gets):
- "echo":       echo application bytes until EOF, then close (with close_notify).
- "hello":      send b"hello\\n" first, then echo.
- "plaintext":  no TLS at all: read one chunk, answer "HTTP/1.0 200 OK\\r\\n\\r\\nplain\\n",
                close. (Implies tls=False.)
- "close":      complete the TLS handshake, then close at once (close_notify, FIN).
- "reset":      complete the TLS handshake, then reset (RST via SO_LINGER 0).
- "reset_on_accept": reset right after the TCP accept, before any TLS.
- "halfclose":  read until the client's EOF (close_notify or TCP FIN), then send
                b"got N bytes\\n" and close.
- "stall":      accept TCP, read and record whatever arrives, never answer (not even the
                handshake) until the client goes away or the server stops.
- "partial_reset": read one chunk, send PARTIAL_ANSWER (the start of an HTTP answer that
                promises more), then reset (RST via SO_LINGER 0): a server that crashes mid-answer.
- "partial_close": the same, then close TCP without TLS close_notify (a FIN only): a server
                process that dies mid-answer.
- "fin_then_read": send b"first part\n", half-close TCP without close_notify (a FIN only,
                as a server does that uses shutdown(SHUT_WR) under its own TLS), then keep
                reading and recording what the client sends until its EOF.

`full_backlog()` gives a port whose listener never accepts and whose queue is full: the
kernel drops new SYNs, so connecting there hangs (a server too slow to accept).

With tls=False the modes apply to the plain TCP stream.
"""

from __future__ import annotations

import fcntl
import selectors
import socket
import ssl
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

LOOPBACK = "127.0.0.1"
MODES = frozenset(
    {
        "echo",
        "hello",
        "plaintext",
        "close",
        "reset",
        "reset_on_accept",
        "halfclose",
        "stall",
        "partial_reset",
        "partial_close",
        "fin_then_read",
    }
)
PLAINTEXT_ANSWER = b"HTTP/1.0 200 OK\r\n\r\nplain\n"
PARTIAL_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\npartial answer, cut short here"
_CHUNK = 65536


class TLSStream:
    """TLS (or plain TCP when `context` is None) over a blocking socket, via MemoryBIO.

    Works on either side. Every raw byte read from the socket is passed to `on_raw` before
    it is decrypted. `recv` returns b"" at EOF, whether the peer sent close_notify or only
    closed TCP; `eof_kind` then says which ("close_notify" or "tcp_fin").
    """

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext | None,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        on_raw: Callable[[bytes], None] | None = None,
    ) -> None:
        self.sock = sock
        self._on_raw = on_raw
        self._raw_eof = False
        self.eof_kind: str | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.sslobj: ssl.SSLObject | None = None
        if context is not None:
            self.sslobj = context.wrap_bio(
                self._incoming,
                self._outgoing,
                server_side=server_side,
                server_hostname=server_hostname,
            )

    # -- raw side
    def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.recv_raw()
        if data:
            self._incoming.write(data)
        else:
            self._raw_eof = True
            self._incoming.write_eof()

    def recv_raw(self, size: int = _CHUNK) -> bytes:
        """Read (and report) raw socket bytes without any TLS processing."""
        data = self.sock.recv(size)
        if self._on_raw is not None:
            self._on_raw(data)
        return data

    # -- TLS side
    def handshake(self) -> None:
        if self.sslobj is None:
            return
        while True:
            try:
                self.sslobj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
            except ssl.SSLError:
                # Send our alert, if any, so the peer learns why.
                self._try_flush()
                raise
        self._flush()

    def recv(self, size: int = _CHUNK) -> bytes:
        if self.sslobj is None:
            data = self.recv_raw(size)
            if not data:
                self.eof_kind = "tcp_fin"
            return data
        while True:
            try:
                data = self.sslobj.read(size)
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                data = b""
            self._try_flush()  # session tickets, key updates, alerts
            if not data:
                # All buffered records were consumed before the raw EOF was fed in, so a
                # zero return before the raw EOF can only be a close_notify.
                self.eof_kind = "tcp_fin" if self._raw_eof else "close_notify"
            return data

    def sendall(self, data: bytes) -> None:
        if self.sslobj is None:
            self.sock.sendall(data)
            return
        view = memoryview(data)
        while view:
            written = self.sslobj.write(view)
            view = view[written:]
            self._flush()

    def close_write(self) -> None:
        """Send close_notify (TLS) and FIN, but keep reading possible."""
        if self.sslobj is not None:
            # In BIO mode unwrap() queues close_notify, then wants the peer's: not waited for.
            with suppress(ssl.SSLError):
                self.sslobj.unwrap()
            self._try_flush()
        with suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def _try_flush(self) -> None:
        with suppress(OSError):
            self._flush()

    @property
    def peer_cert_der(self) -> bytes | None:
        if self.sslobj is None:
            return None
        return self.sslobj.getpeercert(binary_form=True)

    @property
    def version(self) -> str | None:
        return None if self.sslobj is None else self.sslobj.version()

    @property
    def alpn(self) -> str | None:
        return None if self.sslobj is None else self.sslobj.selected_alpn_protocol()

    def close(self) -> None:
        self.sock.close()

    def wait_sent(self, timeout: float = 2.0) -> None:
        """Wait (bounded) until the peer has acknowledged everything written (Linux TIOCOUTQ)."""
        deadline = time.monotonic() + timeout
        while fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0") != b"\0\0\0\0":
            if time.monotonic() > deadline:
                raise TimeoutError(f"the peer did not acknowledge our data within {timeout:g}s")
            time.sleep(0.005)  # a poll against the deadline

    def reset(self) -> None:
        """Close with RST instead of FIN."""
        with suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


@dataclass
class ConnectionRecord:
    """What one accepted connection did."""

    raw: bytearray = field(default_factory=bytearray)
    app: bytearray = field(default_factory=bytearray)
    peer_cert: bytes | None = None
    sni: str | None = None
    alpn: str | None = None
    version: str | None = None
    resumed: bool = False  # the client resumed an earlier TLS session
    handshake_error: str | None = None
    io_error: str | None = None
    eof_kind: str | None = None
    closed: bool = False

    def __repr__(self) -> str:
        cert = "none" if self.peer_cert is None else f"{len(self.peer_cert)} bytes"
        return (
            f"ConnectionRecord(raw={len(self.raw)} bytes, app={len(self.app)} bytes, peer_cert={cert}, "
            f"sni={self.sni!r}, alpn={self.alpn!r}, version={self.version!r}, "
            f"handshake_error={self.handshake_error!r}, io_error={self.io_error!r}, "
            f"eof_kind={self.eof_kind!r}, closed={self.closed})"
        )


@contextmanager
def full_backlog() -> Iterator[int]:
    """A loopback port whose listener never accepts, its queue filled by one connection of ours.

    Linux queues backlog + 1 connections and then drops SYNs (tcp_abort_on_overflow = 0, the
    default), so a connect() there neither succeeds nor fails until the caller gives up.
    """
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        with socket.create_connection((LOOPBACK, port), timeout=5):  # fills the one queue slot
            with socket.socket() as probe:  # prove the queue is full: a SYN now goes unanswered
                probe.settimeout(0.3)
                try:
                    probe.connect((LOOPBACK, port))
                except TimeoutError:
                    pass
                else:
                    raise AssertionError(f"the accept queue of port {port} is not full; tcp_abort_on_overflow?")
            yield port


class ScriptedTLSServer:
    """See the module docstring. Use as a context manager; `port` is set on entry."""

    def __init__(
        self,
        *,
        cert: Path | None,
        key: Path | None,
        client_ca: Path | None = None,
        require_client_cert: bool = False,
        mode: str = "echo",
        tls: bool = True,
        min_version: ssl.TLSVersion | None = None,
        max_version: ssl.TLSVersion | None = None,
        alpn: list[str] | None = None,
        io_timeout: float = 10.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {sorted(MODES)}")
        if mode == "plaintext":
            tls = False
        if require_client_cert and client_ca is None:
            raise ValueError("require_client_cert=True needs client_ca")
        self.mode = mode
        self.tls = tls
        self.io_timeout = io_timeout
        self.context: ssl.SSLContext | None = None
        if tls:
            if cert is None or key is None:
                raise ValueError(f"mode {mode!r} with tls=True needs cert and key")
            self.context = self._make_context(cert, key, client_ca, require_client_cert, min_version, max_version, alpn)
        self.port = 0
        self.records: list[ConnectionRecord] = []
        self._cond = threading.Condition(threading.RLock())
        self._sni_by_obj: dict[int, str | None] = {}
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stopping = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self._handlers: list[threading.Thread] = []
        self._live: set[socket.socket] = set()

    def _make_context(
        self,
        cert: Path,
        key: Path,
        client_ca: Path | None,
        require_client_cert: bool,
        min_version: ssl.TLSVersion | None,
        max_version: ssl.TLSVersion | None,
        alpn: list[str] | None,
    ) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        if client_ca is not None:
            ctx.load_verify_locations(cafile=client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        if min_version is not None:
            ctx.minimum_version = min_version
        if max_version is not None:
            ctx.maximum_version = max_version
        if alpn:
            ctx.set_alpn_protocols(alpn)
        # A bare TCP FIN ends the stream like close_notify (recorded as eof_kind "tcp_fin"),
        # and the connection stays writable: "halfclose" must be able to answer.
        ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF

        def on_sni(obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            with self._cond:
                self._sni_by_obj[id(obj)] = name

        ctx.sni_callback = on_sni
        return ctx

    # -- lifecycle
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # With the test already failing, report that failure rather than stuck threads.
        self.stop(raise_if_stuck=exc is None)

    def start(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, 0))
        listener.listen(64)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"scripted-tls-accept-{self.port}", daemon=True
        )
        self._accept_thread.start()

    def stop(self, timeout: float = 5.0, *, raise_if_stuck: bool = True) -> None:
        """Close the listener, shut down open connections, join every thread (bounded)."""
        self._stopping.set()
        if self._wake_w is not None:
            with suppress(OSError):
                self._wake_w.send(b"x")
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        with self._cond:
            live = list(self._live)
        for sock in live:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread in list(self._handlers):
            thread.join(max(0.0, deadline - time.monotonic()))
        for owned in (self._listener, self._wake_r, self._wake_w):
            if owned is not None:
                owned.close()
        stuck = [t.name for t in self._handlers if t.is_alive()]
        if self._accept_thread is not None and self._accept_thread.is_alive():
            stuck.append(self._accept_thread.name)
        if stuck and raise_if_stuck:
            raise RuntimeError(f"ScriptedTLSServer threads did not stop: {stuck}")

    def _accept_loop(self) -> None:
        assert self._listener is not None and self._wake_r is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _events in sel.select():
                    if key.fileobj is self._wake_r or self._stopping.is_set():
                        return
                    try:
                        conn, _addr = self._listener.accept()
                    except OSError:
                        continue
                    record = ConnectionRecord()
                    with self._cond:
                        self.records.append(record)
                        self._live.add(conn)
                        self._cond.notify_all()
                    thread = threading.Thread(
                        target=self._handle,
                        args=(conn, record),
                        name=f"scripted-tls-conn-{self.port}-{len(self.records)}",
                        daemon=True,
                    )
                    self._handlers.append(thread)
                    thread.start()

    # -- one connection
    def _handle(self, conn: socket.socket, record: ConnectionRecord) -> None:
        conn.settimeout(self.io_timeout)

        def on_raw(data: bytes) -> None:
            with self._cond:
                record.raw += data
                self._cond.notify_all()

        stream = TLSStream(conn, self.context, server_side=True, on_raw=on_raw)
        try:
            self._run_mode(stream, record)
        except (OSError, ssl.SSLError) as exc:
            with self._cond:
                record.io_error = f"{type(exc).__name__}: {exc}"
            stream.close()
        finally:
            with self._cond:
                record.eof_kind = stream.eof_kind
                record.closed = True
                self._live.discard(conn)
                self._cond.notify_all()

    def _run_mode(self, stream: TLSStream, record: ConnectionRecord) -> None:
        mode = self.mode
        if mode == "reset_on_accept":
            stream.reset()
            return
        if mode == "stall":
            while stream.recv_raw():
                pass
            stream.close()
            return
        if mode == "plaintext":
            self._app(record, stream.recv())
            stream.sendall(PLAINTEXT_ANSWER)
            stream.close_write()
            stream.close()
            return
        try:
            stream.handshake()
        except (ssl.SSLError, OSError) as exc:
            with self._cond:
                record.handshake_error = f"{type(exc).__name__}: {exc}"
                self._cond.notify_all()
            stream.close()
            return
        with self._cond:
            record.peer_cert = stream.peer_cert_der
            record.alpn = stream.alpn
            record.version = stream.version
            record.resumed = bool(stream.sslobj is not None and stream.sslobj.session_reused)
            if stream.sslobj is not None:
                record.sni = self._sni_by_obj.pop(id(stream.sslobj), None)
            self._cond.notify_all()
        if mode == "reset":
            stream.reset()
            return
        if mode in ("partial_reset", "partial_close"):
            self._app(record, stream.recv())
            stream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stream.sendall(PARTIAL_ANSWER)
            if mode == "partial_reset":
                # a reset discards what is still queued: let the answer reach the peer first
                stream.wait_sent()
                stream.reset()
            else:
                stream.close()  # TCP FIN, no close_notify
            return
        if mode == "fin_then_read":
            stream.sendall(b"first part\n")
            stream.sock.shutdown(socket.SHUT_WR)  # a FIN, no close_notify
            while data := stream.recv():
                self._app(record, data)
            stream.close()
            return
        if mode == "close":
            stream.close_write()
            stream.close()
            return
        if mode == "halfclose":
            total = 0
            while data := stream.recv():
                total += len(data)
                self._app(record, data)
            stream.sendall(f"got {total} bytes\n".encode())
            stream.close_write()
            stream.close()
            return
        if mode == "hello":
            stream.sendall(b"hello\n")
        while data := stream.recv():
            self._app(record, data)
            stream.sendall(data)
        stream.close_write()
        stream.close()

    def _app(self, record: ConnectionRecord, data: bytes) -> None:
        with self._cond:
            record.app += data
            self._cond.notify_all()

    # -- what happened (aggregated over all connections, in accept order)
    @property
    def connections(self) -> int:
        with self._cond:
            return len(self.records)

    @property
    def closed_connections(self) -> int:
        with self._cond:
            return sum(1 for r in self.records if r.closed)

    @property
    def raw_received(self) -> bytes:
        with self._cond:
            return b"".join(bytes(r.raw) for r in self.records)

    @property
    def app_received(self) -> bytes:
        with self._cond:
            return b"".join(bytes(r.app) for r in self.records)

    @property
    def peer_certs(self) -> list[bytes | None]:
        """Client certificate (DER) of each accepted connection; None: none (or no handshake)."""
        with self._cond:
            return [r.peer_cert for r in self.records]

    @property
    def handshake_errors(self) -> list[str]:
        with self._cond:
            return [r.handshake_error for r in self.records if r.handshake_error is not None]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
        """Wait until `predicate()` is true (re-checked on every server event)."""
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise AssertionError(
                    f"ScriptedTLSServer on port {self.port}: timed out after {timeout} s "
                    f"waiting for {what}; records: {self.records!r}"
                )

    def wait_closed(self, count: int = 1, timeout: float = 5.0) -> None:
        """Wait until `count` connections have been handled to the end."""
        self.wait_for(lambda: self.closed_connections >= count, timeout, f"{count} closed connection(s)")
