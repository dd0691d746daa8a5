"""HTTP/1.1 on the control transport: h11 frames it, `api.dispatch` answers it.

Two transports (config.toml `control = "unix" | "tcp"`):

- unix (Linux, macOS): the socket (`Places.control_socket`) lives in the runtime folder (0700)
  with mode 0600, so only the user reaches it. A folder or path held by another user, or
  answered by another running daemon, is refused.
- tcp (Windows, or chosen): 127.0.0.1 on an ephemeral port. `control.json` in the same runtime
  folder (0600 from birth) holds the port and a fresh 256-bit token; every request must carry
  `Authorization: Bearer <token>`. Without it: 401, counted, nothing done. The file goes on a
  clean stop; a new start writes a new token.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import json
import logging
import os
import secrets
import socket
import stat
from pathlib import Path
from typing import Any

import h11

from sidecar import __version__
from sidecar.control.api import MAX_BODY, ApiResponse, dispatch
from sidecar.control.discovery import BadControlFile, read_control_file, stale_reason
from sidecar.daemon import Daemon
from sidecar.errors import LocalSetupError
from sidecar.files import PRIVATE_FILE_MODE, atomic_write, ensure_private_dir
from sidecar.h11io import ConnectionTasks, next_event, send_response
from sidecar.paths import runtime_folder_problem

log = logging.getLogger("sidecar.control")

_READ_CHUNK = 64 * 1024
_IDLE_TIMEOUT = 300.0
_LOOPBACK = "127.0.0.1"
_UNAUTHORIZED = (
    "missing or wrong control token: send `Authorization: Bearer <token>` with the token from control.json "
    "in the runtime folder (it changes at every daemon start)"
)


class ControlServer:
    """`path` is the Unix socket; with `transport="tcp"`, `control_file` (control.json) is written instead."""

    def __init__(
        self, daemon: Daemon, path: Path, *, transport: str = "unix", control_file: Path | None = None
    ) -> None:
        if transport not in ("unix", "tcp"):
            raise ValueError(f"unknown control transport {transport!r}")
        self.daemon = daemon
        self.path = path
        self.transport = transport
        self.control_file = control_file if control_file is not None else path.with_name("control.json")
        self.port: int | None = None
        self.unauthorized = 0  # requests refused for a missing or wrong token
        self._token: bytes | None = None
        self._server: asyncio.base_events.Server | None = None
        self._connections = ConnectionTasks()

    @property
    def address(self) -> str:
        """Where clients reach it: the socket path, or the control.json that names the port (the lock records it)."""
        return str(self.control_file if self.transport == "tcp" else self.path)

    def describe(self) -> dict[str, Any]:
        """For status["daemon"]["control"]."""
        if self.transport == "unix":
            return {"transport": "unix", "address": str(self.path)}
        return {
            "transport": "tcp",
            "address": f"{_LOOPBACK}:{self.port}",
            "file": str(self.control_file),
            "unauthorized": self.unauthorized,
        }

    async def start(self) -> None:
        own_private_folder(self.path.parent)
        if self.control_file.parent != self.path.parent:
            own_private_folder(self.control_file.parent)
        _clear_stale_control_file(self.control_file)  # either transport: clients try control.json first
        if self.transport == "tcp":
            if self.path.exists():  # a daemon of another data folder on this runtime folder's socket stops us too
                _claim(self.path)
            await self._start_tcp()
        else:
            await self._start_unix()
        self.daemon.control_info = self.describe

    async def _start_tcp(self) -> None:
        token = secrets.token_urlsafe(32)  # 256 bits, new at every start
        try:
            self._server = await asyncio.start_server(self._serve, _LOOPBACK, 0)
        except OSError as exc:
            raise LocalSetupError(f"cannot listen for the control API on {_LOOPBACK}: {exc.strerror or exc}") from exc
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._token = token.encode()
        record = {"port": self.port, "token": token, "pid": os.getpid(), "version": __version__}
        try:  # a temporary file made 0600, then renamed: never readable by others, never half written
            atomic_write(self.control_file, json.dumps(record).encode() + b"\n", PRIVATE_FILE_MODE)
        except OSError as exc:
            self._server.close()
            self._server = None
            raise LocalSetupError(f"cannot write {self.control_file}: {exc.strerror or exc}") from exc
        log.info("control API on %s:%d (port and token in %s)", _LOOPBACK, self.port, self.control_file)

    async def _start_unix(self) -> None:
        _claim(self.path)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others could connect
        try:
            self._server = await asyncio.start_unix_server(self._serve, str(self.path))
        except OSError as exc:
            raise LocalSetupError(f"cannot create the control socket {self.path}: {exc.strerror or exc}") from exc
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        log.info("control API on %s", self.path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        await self._connections.cancel_all()
        if self.transport == "tcp":
            if self._token is not None:
                self._token = None
                _remove_own_control_file(self.control_file)
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _authorized(self, request: h11.Request) -> bool:
        if self._token is None:
            return self.transport == "unix"  # the socket's mode and the client's uid check keep others out
        given = b""
        for name, value in request.headers:
            if name == b"authorization":
                scheme, _, credential = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = credential.strip()
        return hmac.compare_digest(given, self._token)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_BODY)
        async with self._connections.serving(writer):
            try:
                while await self._one_request(conn, reader, writer):
                    conn.start_next_cycle()
            except (h11.RemoteProtocolError, ConnectionError, TimeoutError) as exc:
                log.debug("control connection ended: %s", exc)

    async def _one_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Serve one request; False when the connection should close."""
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = await next_event(conn, reader, _READ_CHUNK, _IDLE_TIMEOUT)
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    await self._send(conn, writer, ApiResponse(413, {"error": "request body too large"}))
                    return False
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return False
        assert request is not None
        if not self._authorized(request):
            self.unauthorized += 1
            if self.unauthorized == 1 or self.unauthorized % 100 == 0:  # told, without letting a flood fill the log
                log.warning(
                    "control API: refused a request without the right token (%d so far; status shows the count)",
                    self.unauthorized,
                )
            await self._send(conn, writer, ApiResponse(401, {"error": _UNAUTHORIZED}))
            return False
        method, target = request.method.decode(), request.target.decode()
        response = await dispatch(self.daemon, method, target, bytes(body))
        if response.stream is not None:
            await self._stream(conn, reader, writer, response)
            return False
        await self._send(conn, writer, response)
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, response: ApiResponse) -> None:
        if response.content_type is not None:  # text as it is (the Prometheus metrics)
            payload = str(response.body).encode("utf-8")
            content_type = response.content_type
        else:
            payload = json.dumps(response.body, indent=None).encode() + b"\n"
            content_type = "application/json"
        headers = [("content-type", content_type), ("content-length", str(len(payload)))]
        await send_response(conn, writer, response.status, headers, payload)

    async def _stream(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: ApiResponse
    ) -> None:
        """Newline-delimited JSON, chunked, until the client goes away or the daemon stops."""
        assert response.stream is not None
        headers = [("content-type", "application/x-ndjson"), ("cache-control", "no-store")]
        writer.write(conn.send(h11.Response(status_code=response.status, headers=headers)) or b"")
        await writer.drain()
        feed = response.stream
        gone = asyncio.ensure_future(reader.read(1))  # a read that returns means the client left
        getter: asyncio.Future[dict[str, Any]] | None = None
        try:
            while True:
                getter = asyncio.ensure_future(feed.get())
                await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    break
                writer.write(conn.send(h11.Data(data=_line(getter.result()))) or b"")
                await writer.drain()
        finally:
            feed.close()
            for pending in (getter, gone):
                if pending is not None and not pending.done():
                    pending.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await pending


def _line(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"


def own_private_folder(folder: Path) -> None:
    """Create the runtime folder 0700, or tighten ours; refuse a symlink or another user's folder."""
    _refuse_foreign_folder(folder)  # first: never chmod what is not ours
    try:
        ensure_private_dir(folder)
    except OSError as exc:
        raise LocalSetupError(f"cannot create the runtime folder {folder}: {exc.strerror or exc}") from exc
    _refuse_foreign_folder(folder)  # and what is there now is a folder of ours
    if os.name == "posix" and folder.stat().st_mode & 0o077:
        folder.chmod(0o700)  # ours, checked above (ensure_private_dir leaves folders it did not make alone)


def _refuse_foreign_folder(folder: Path) -> None:
    problem = runtime_folder_problem(folder)
    if problem is not None:
        raise LocalSetupError(problem)


def _clear_stale_control_file(path: Path) -> None:
    """Refuse a control.json whose daemon still runs; remove one a killed daemon left (or a broken one)."""
    try:
        record = read_control_file(path)
    except BadControlFile as exc:  # in our own 0700 folder: not a daemon's, nobody can use it
        log.warning("removing %s: %s", path, exc)
        path.unlink(missing_ok=True)
        return
    if record is None:
        return
    why = stale_reason(record)
    if why is None:
        raise LocalSetupError(
            f"another mtls-sidecar daemon is running (pid {record.pid}, control API on {_LOOPBACK}:{record.port}, "
            f"named in {path}); stop it first, or give this one its own MTLS_SIDECAR_HOME"
        )
    log.info("removing %s: %s", path, why)  # why names the file
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _remove_own_control_file(path: Path) -> None:
    """Remove control.json on a clean stop, unless another daemon has written its own since."""
    try:
        record = read_control_file(path)
    except BadControlFile:
        record = None
    if record is not None and record.pid not in (None, os.getpid()):
        return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _claim(path: Path) -> None:
    """Make `path` ours to bind: refuse another user's file or a live daemon; clear a stale socket."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if info.st_uid != os.getuid():
        raise LocalSetupError(
            f"{path} belongs to another user (uid {info.st_uid}); refusing to use it. "
            "Point MTLS_SIDECAR_HOME (or XDG_RUNTIME_DIR) at a folder of your own"
        )
    if not stat.S_ISSOCK(info.st_mode):
        raise LocalSetupError(f"{path} exists and is not a socket; move it away")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            path.unlink()  # left by a daemon that died
            return
        raise LocalSetupError(f"cannot check the control socket {path}: {exc.strerror or exc}") from exc
    finally:
        probe.close()
    raise LocalSetupError(
        f"another mtls-sidecar daemon is running (it answers on {path}); stop it first, "
        "or give this one its own MTLS_SIDECAR_HOME"
    )
