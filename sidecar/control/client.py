"""The control API's client, used by the CLI and the tray: blocking, stdlib only.

`ControlClient.for_places(places)` finds the daemon the same way on every platform, at every
request: when the runtime folder holds control.json (the loopback transport), its port and
token; otherwise the Unix socket. A control.json left by a killed daemon is "not running".

The transport is connected and checked before anything else is imported: a command that finds no
daemon (`mtls-sidecar status` before `run`) says so without loading http.client (and the ssl
and email packages it imports), json or the peer-credential code.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.control.discovery import (
    LOOPBACK,
    BadControlFile,
    ControlRecord,
    pid_alive,
    read_control_file,
    stale_reason,
)
from sidecar.errors import SidecarError
from sidecar.paths import CONTROL_FILE_NAME, CONTROL_SOCKET_NAME, runtime_folder_problem

if TYPE_CHECKING:
    import http.client

    from sidecar.paths import Places


class DaemonNotRunning(SidecarError):
    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"the mtls-sidecar daemon is not running ({why} at {path}); start it with `mtls-sidecar run`")
        self.path = path


class NotOurDaemon(SidecarError):
    """The control socket, or its folder, is not this user's: nothing is sent to it."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{why}; nothing was sent to {path}")
        self.path = path


class ApiCallError(SidecarError):
    """The daemon answered with an error; `message` is its one-line explanation."""

    def __init__(self, status: int, body: Any) -> None:
        message = body.get("error") if isinstance(body, dict) else None
        super().__init__(message or f"the daemon answered HTTP {status}")
        self.status = status
        self.body = body


def _connect_tcp(control_file: Path, timeout: float | None) -> tuple[http.client.HTTPConnection, str] | None:
    """A connection to the daemon named by control.json and its token; None when there is no control.json."""
    problem = runtime_folder_problem(control_file.parent)
    if problem is not None:
        raise NotOurDaemon(control_file, problem)
    try:
        record = read_control_file(control_file)
    except BadControlFile as exc:
        raise DaemonNotRunning(control_file, str(exc)) from None
    if record is None:
        return None
    _check_owner(record)
    try:
        sock = socket.create_connection((LOOPBACK, record.port), timeout=timeout)
    except (ConnectionRefusedError, TimeoutError):
        raise DaemonNotRunning(control_file, stale_reason(record) or "nobody answers on its port") from None
    if record.pid is not None and not pid_alive(record.pid):  # whatever answers on that port is not our daemon
        sock.close()
        raise DaemonNotRunning(
            control_file, f"{control_file.name} was left by a daemon that is gone (pid {record.pid})"
        )
    try:
        conn = _tcp_connection_class()(LOOPBACK, record.port, timeout)
    except BaseException:
        sock.close()
        raise
    conn.sock = sock
    return conn, record.token


def _check_owner(record: ControlRecord) -> None:
    """A control.json another user wrote (or may read) is not our daemon's: nothing is sent."""
    if not hasattr(os, "getuid"):
        return  # Windows: the per-user folder's ACL keeps others out
    info = record.file.lstat()
    if info.st_uid != os.getuid():
        raise NotOurDaemon(record.file, f"{record.file} belongs to another user (uid {info.st_uid})")


@functools.cache
def _tcp_connection_class() -> Callable[[str, int, float | None], http.client.HTTPConnection]:
    import http.client

    return http.client.HTTPConnection


def _connect(path: Path, timeout: float | None) -> http.client.HTTPConnection:
    """An HTTP connection on the control socket at `path`, already connected to a daemon of ours."""
    sock = _open_socket(path, timeout)
    try:
        conn = _unix_connection_class()(path, timeout)
    except BaseException:
        sock.close()
        raise
    conn.sock = sock
    return conn


def _open_socket(path: Path, timeout: float | None) -> socket.socket:
    problem = runtime_folder_problem(path.parent)
    if problem is not None:
        raise NotOurDaemon(path, problem)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except FileNotFoundError:
        sock.close()
        raise DaemonNotRunning(path, "no control socket") from None
    except ConnectionRefusedError:
        sock.close()
        raise DaemonNotRunning(path, "nobody answers on the control socket") from None
    except OSError:
        sock.close()
        raise
    try:
        _check_peer(sock, path)
    except BaseException:
        sock.close()
        raise
    return sock


@functools.cache
def _unix_connection_class() -> Callable[[Path, float | None], http.client.HTTPConnection]:
    import http.client

    class UnixConnection(http.client.HTTPConnection):
        """HTTP/1.1 on the control socket; were http.client to connect again, it is the same socket, checked again."""

        def __init__(self, path: Path, timeout: float | None) -> None:
            super().__init__("localhost", timeout=timeout)
            self.socket_path = path

        def connect(self) -> None:
            self.sock = _open_socket(self.socket_path, self.timeout)

    return UnixConnection


def _check_peer(sock: socket.socket, path: Path) -> None:
    """Refuse a socket served by another user's process (SO_PEERCRED), before a byte is sent.

    Where the platform cannot tell (no SO_PEERCRED), the 0700 runtime folder checked above is
    what keeps others out.
    """
    from sidecar.peercred import unix_socket_peer_uid, user_name

    uid = unix_socket_peer_uid(sock)
    if uid is not None and hasattr(os, "getuid") and uid != os.getuid():
        raise NotOurDaemon(
            path, f"the control socket is served by another user (uid {user_name(uid)}), not by your daemon"
        )


class ControlClient:
    """The daemon's control API. `path` is the Unix socket; with `control_file` (control.json),
    that file is tried first at every request, so a daemon on either transport is found."""

    def __init__(self, path: Path, timeout: float = 30.0, *, control_file: Path | None = None) -> None:
        self.path = path
        self.timeout = timeout
        self.control_file = control_file

    @classmethod
    def for_places(cls, places: Places, timeout: float = 30.0) -> ControlClient:
        """The one way to find the daemon, on every platform: its runtime folder."""
        return cls(places.control_socket, timeout, control_file=places.control_file)

    @classmethod
    def for_address(cls, address: Path, timeout: float = 30.0) -> ControlClient:
        """The daemon at a recorded control address (the instance lock's): a socket or a control.json."""
        folder = address.parent
        return cls(folder / CONTROL_SOCKET_NAME, timeout, control_file=folder / CONTROL_FILE_NAME)

    def with_timeout(self, timeout: float) -> ControlClient:
        return ControlClient(self.path, timeout, control_file=self.control_file)

    def _open(self, timeout: float | None) -> tuple[http.client.HTTPConnection, dict[str, str]]:
        """A connected HTTP connection and the headers every request carries (the token, on tcp)."""
        if self.control_file is not None:
            found = _connect_tcp(self.control_file, timeout)
            if found is not None:
                conn, token = found
                return conn, {"authorization": f"Bearer {token}"}
            if not hasattr(socket, "AF_UNIX"):  # Windows: the loopback transport is the only one
                raise DaemonNotRunning(self.control_file, "no control.json")
        return _connect(self.path, timeout), {}

    def get(self, target: str) -> Any:
        return self.request("GET", target)

    def post(self, target: str, body: Any = None) -> Any:
        return self.request("POST", target, body)

    def delete(self, target: str) -> Any:
        return self.request("DELETE", target)

    def patch(self, target: str, body: Any) -> Any:
        return self.request("PATCH", target, body)

    def request(self, method: str, target: str, body: Any = None) -> Any:
        status, data = self._exchange(method, target, None if body is None else _json_bytes(body))
        decoded = _decoded(data)
        if status >= 400:
            raise ApiCallError(status, decoded)
        return decoded

    def get_text(self, target: str) -> str:
        """GET an answer that is text, not JSON (`/v1/metrics`)."""
        status, data = self._exchange("GET", target, None)
        if status >= 400:
            raise ApiCallError(status, _decoded(data))
        return data.decode("utf-8")

    def _exchange(self, method: str, target: str, payload: bytes | None) -> tuple[int, bytes]:
        conn, headers = self._open(self.timeout)
        if payload is not None:
            headers["content-type"] = "application/json"
        try:
            conn.request(method, target, body=payload, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def events(self, timeout: float | None = None) -> Generator[dict[str, Any], None, None]:
        """Follow GET /v1/events: yields each event as it comes, until the daemon goes away."""
        conn, headers = self._open(timeout)
        import json

        try:
            conn.request("GET", "/v1/events", headers=headers)
            response = conn.getresponse()
            if response.status != 200:
                data = response.read()
                try:
                    body = json.loads(data) if data.strip() else None
                except ValueError:
                    body = None
                raise ApiCallError(response.status, body)
            while line := response.readline():
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()


def _decoded(data: bytes) -> Any:
    import json

    try:
        return json.loads(data) if data.strip() else None
    except ValueError:
        return {"error": data.decode(errors="replace")[:200]}


def _json_bytes(value: Any) -> bytes:
    import json

    return json.dumps(value).encode()
