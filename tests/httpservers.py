"""nginx with two virtual hosts on one port, and a small plain-HTTP backend behind it.

The shape of an API behind virtual hosting: one TLS port, `ssl_verify_client on`, a default
site and a named one (`api.internal.test`), chosen by `Host`. The named site answers what it
saw, redirects, serves a large file, and proxies to `Backend` (a byte counter, a chunked
stream and a WebSocket echo) the way nginx proxies to an application.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tests.realservers import (
    LOOPBACK,
    START_DEADLINE_S,
    ServerStartError,
    free_port,
    require_binary,
    start_process,
    stop_process,
    wait_for_port,
)

API_NAME = "api.internal.test"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
BLOCK = 1 << 20
# What the named site answers on `/`: what it saw of the request, its connection and the client.
API_ECHO = (
    "api site: host=$http_host uri=$request_uri conn=$connection req=$connection_requests client=$ssl_client_s_dn\\n"
)


@dataclass(frozen=True)
class VirtualHosts:
    port: int
    workdir: Path
    big_file: Path | None


def nginx_vhosts_conf(workdir: Path, *, port: int, cert: Path, key: Path, client_ca: Path, backend: int) -> str:
    w = workdir
    user = "user root;\n" if os.geteuid() == 0 else ""  # see tests/realservers.py
    proxy = f"proxy_pass http://{LOOPBACK}:{backend}; proxy_http_version 1.1;"
    return f"""\
{user}daemon off;
master_process on;
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/error.log info;
events {{ worker_connections 256; }}
http {{
    default_type text/plain;
    access_log {w}/access.log;
    client_body_temp_path {w}/tmp/client_body;
    proxy_temp_path {w}/tmp/proxy;
    fastcgi_temp_path {w}/tmp/fastcgi;
    uwsgi_temp_path {w}/tmp/uwsgi;
    scgi_temp_path {w}/tmp/scgi;
    client_max_body_size 0;
    keepalive_timeout 30s;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_client_certificate {client_ca};
    ssl_verify_client on;
    ssl_verify_depth 3;

    server {{
        listen {LOOPBACK}:{port} ssl default_server;
        server_name _;
        location / {{ return 404 "default site: host=$http_host\\n"; }}
    }}

    server {{
        listen {LOOPBACK}:{port} ssl;
        server_name {API_NAME};
        location / {{
            return 200 "{API_ECHO}";
        }}
        location = /old {{ return 302 https://{API_NAME}:{port}/next; }}
        location = /moved {{ return 301 /next-relative; }}
        location = /big {{ alias {w}/big.bin; }}
        location /count {{ {proxy} proxy_request_buffering off; }}
        location /stream {{ {proxy} proxy_buffering off; }}
        location /ws {{
            {proxy}
            proxy_set_header Host $http_host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
        }}
    }}
}}
"""


@contextmanager
def nginx_vhosts(
    workdir: Path, *, cert: Path, key: Path, client_ca: Path, backend: int, port: int | None = None
) -> Iterator[VirtualHosts]:
    """Run nginx with the two virtual hosts on `port` (or a free one) until the block ends."""
    nginx = require_binary("nginx")
    workdir = workdir.resolve()
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    chosen = port if port is not None else free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(
        nginx_vhosts_conf(
            workdir, port=chosen, cert=cert.resolve(), key=key.resolve(), client_ca=client_ca.resolve(), backend=backend
        )
    )
    pid_file = workdir / "nginx.pid"
    pid_file.unlink(missing_ok=True)
    proc = start_process(
        [nginx, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")], workdir / "nginx.out"
    )
    try:
        try:
            wait_for_port(LOOPBACK, chosen, START_DEADLINE_S, proc, ready=partial(_pid_written, pid_file, proc.pid))
        except (ServerStartError, TimeoutError) as exc:
            log = (workdir / "error.log").read_text(errors="replace")[-4000:]
            raise ServerStartError(f"nginx did not start on port {chosen}: {exc}\n{log}") from exc
        big = workdir / "big.bin"
        yield VirtualHosts(chosen, workdir, big if big.exists() else None)
    finally:
        stop_process(proc)


def _pid_written(path: Path, pid: int) -> bool:
    """nginx writes its pid file once every listening socket is bound."""
    with suppress(FileNotFoundError):
        return path.read_text().strip() == str(pid)
    return False


def write_pattern_file(path: Path, size: int) -> str:
    """`size` bytes in 1 MiB blocks that each start with their number; returns the SHA-256."""
    digest = hashlib.sha256()
    base = bytes(range(256)) * (BLOCK // 256)
    with path.open("wb") as f:
        for n in range(0, size, BLOCK):
            block = (n // BLOCK).to_bytes(8, "big") + base[8 : min(BLOCK, size - n)]
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# The backend: what nginx proxies /count, /stream and /ws to.


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _more(self) -> None:
        data = self.sock.recv(BLOCK)
        if not data:
            raise EOFError("the peer closed the connection")
        self.buf += data

    def until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            self._more()
        out, self.buf = self.buf.split(marker, 1)
        return out

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._more()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def count_into(self, n: int, digest: hashlib._Hash) -> None:
        """Read `n` bytes into `digest` without keeping them."""
        take = min(n, len(self.buf))
        digest.update(self.buf[:take])
        self.buf, n = self.buf[take:], n - take
        scratch = bytearray(BLOCK)
        view = memoryview(scratch)
        while n:
            got = self.sock.recv_into(view[: min(n, BLOCK)])
            if not got:
                raise EOFError(f"the body ended {n} bytes early")
            digest.update(view[:got])
            n -= got


class Backend:
    """A plain HTTP/1.1 application server, one request per connection, in threads.

    - `/count` (any method): reads the body (Content-Length or chunked) and answers
      `received=N sha256=HEX chunked=BOOL`.
    - `/stream?n=N`: answers N bytes (a pattern), chunked.
    - `/ws`: a WebSocket upgrade (101 with `X-Seen-Host`), then echoes each frame until a close.
    """

    def __init__(self) -> None:
        self.server = socket.create_server((LOOPBACK, 0))
        self.port: int = self.server.getsockname()[1]
        self.errors: list[str] = []
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, name="http-backend", daemon=True)

    def __enter__(self) -> Backend:
        self._accepting.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self._accepting.join(timeout=10)
        for thread in self._threads:
            thread.join(timeout=10)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                reader = _Reader(conn)
                request_line, *lines = reader.until(b"\r\n\r\n").decode("latin-1").split("\r\n")
                _, target, _ = request_line.split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
                if target.startswith("/ws"):
                    self._websocket(conn, reader, headers)
                elif target.startswith("/count"):
                    self._count(conn, reader, headers)
                elif target.startswith("/stream"):
                    self._stream(conn, int(target.split("n=", 1)[1]))
                else:
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except (OSError, EOFError, ValueError) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def _count(self, conn: socket.socket, reader: _Reader, headers: dict[str, str]) -> None:
        digest = hashlib.sha256()
        total = 0
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if chunked:
            while size := int(reader.until(b"\r\n").split(b";")[0], 16):
                reader.count_into(size, digest)
                total += size
                reader.exactly(2)
            reader.until(b"\r\n")  # no trailers from nginx: the empty line
        else:
            total = int(headers.get("content-length", "0"))
            reader.count_into(total, digest)
        body = f"received={total} sha256={digest.hexdigest()} chunked={chunked}\n".encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))

    def _stream(self, conn: socket.socket, n: int) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        piece = bytes(range(256)) * 256  # 64 KiB
        while n:
            part = piece[: min(n, len(piece))]
            conn.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            n -= len(part)
        conn.sendall(b"0\r\n\r\n")

    def _websocket(self, conn: socket.socket, reader: _Reader, headers: dict[str, str]) -> None:
        key = headers["sec-websocket-key"].encode()
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        conn.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\nX-Seen-Host: " + headers.get("host", "").encode() + b"\r\n\r\n"
        )
        while True:
            opcode, payload = read_frame(reader.exactly)
            if opcode == 8:  # close: answer it, and end
                conn.sendall(ws_frame(payload, opcode=8, mask=False))
                return
            conn.sendall(ws_frame(payload, opcode=opcode, mask=False))


def ws_frame(payload: bytes, *, opcode: int = 1, mask: bool = True) -> bytes:
    """One final WebSocket frame (RFC 6455); a client's frames are masked."""
    head = bytes([0x80 | opcode])
    size = len(payload)
    bit = 0x80 if mask else 0
    if size < 126:
        head += bytes([bit | size])
    elif size < 1 << 16:
        head += bytes([bit | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + size.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def read_frame(read: Callable[[int], bytes]) -> tuple[int, bytes]:
    """(opcode, payload) of the next frame, read with `read(n)`, which returns exactly n bytes."""
    first, second = read(2)
    size = second & 0x7F
    if size == 126:
        size = int.from_bytes(read(2), "big")
    elif size == 127:
        size = int.from_bytes(read(8), "big")
    key = read(4) if second & 0x80 else b""
    payload = read(size)
    if key:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return first & 0x0F, payload
