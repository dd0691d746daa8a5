"""The control API's client, used by the CLI and the tray: blocking, stdlib only."""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Generator
from pathlib import Path
from typing import Any

from sidecar.errors import SidecarError
from sidecar.paths import runtime_folder_problem
from sidecar.peercred import unix_socket_peer_uid, user_name


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


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        problem = runtime_folder_problem(self.socket_path.parent)
        if problem is not None:
            raise NotOurDaemon(self.socket_path, problem)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.socket_path))
        except FileNotFoundError:
            sock.close()
            raise DaemonNotRunning(self.socket_path, "no control socket") from None
        except ConnectionRefusedError:
            sock.close()
            raise DaemonNotRunning(self.socket_path, "nobody answers on the control socket") from None
        except OSError:
            sock.close()
            raise
        try:
            _check_peer(sock, self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _check_peer(sock: socket.socket, path: Path) -> None:
    """Refuse a socket served by another user's process (SO_PEERCRED), before a byte is sent.

    Where the platform cannot tell (no SO_PEERCRED), the 0700 runtime folder checked above is
    what keeps others out.
    """
    uid = unix_socket_peer_uid(sock)
    if uid is not None and hasattr(os, "getuid") and uid != os.getuid():
        raise NotOurDaemon(
            path, f"the control socket is served by another user (uid {user_name(uid)}), not by your daemon"
        )


class ControlClient:
    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout

    def get(self, target: str) -> Any:
        return self.request("GET", target)

    def post(self, target: str, body: Any = None) -> Any:
        return self.request("POST", target, body)

    def delete(self, target: str) -> Any:
        return self.request("DELETE", target)

    def patch(self, target: str, body: Any) -> Any:
        return self.request("PATCH", target, body)

    def request(self, method: str, target: str, body: Any = None) -> Any:
        conn = _UnixConnection(self.path, self.timeout)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"content-type": "application/json"} if payload is not None else {}
            conn.request(method, target, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        try:
            decoded = json.loads(data) if data.strip() else None
        except ValueError:
            decoded = {"error": data.decode(errors="replace")[:200]}
        if response.status >= 400:
            raise ApiCallError(response.status, decoded)
        return decoded

    def events(self, timeout: float | None = None) -> Generator[dict[str, Any], None, None]:
        """Follow GET /v1/events: yields each event as it comes, until the daemon goes away."""
        conn = _UnixConnection(self.path, timeout)
        try:
            conn.request("GET", "/v1/events")
            response = conn.getresponse()
            if response.status != 200:
                raise ApiCallError(response.status, None)
            while line := response.readline():
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()
