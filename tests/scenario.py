"""Building blocks shared by the end-to-end tests: a two-CA PKI, config files, clients."""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit

from tests.pki import CA, Leaf
from tests.tlsserver import ScriptedTLSServer


@dataclass
class Pki:
    """A server CA (what routes trust) and a client CA with an intermediate (what servers trust)."""

    folder: Path
    server_ca: CA
    client_ca: CA
    server: Leaf
    server_cert: Path
    server_key: Path
    server_ca_file: Path
    client_ca_file: Path

    @classmethod
    def create(cls, folder: Path, *server_names: str) -> Pki:
        folder.mkdir(parents=True, exist_ok=True)
        server_ca = CA("Test Server CA")
        client_ca = CA("Test Client CA", with_intermediate=True)
        server = server_ca.server(*(server_names or ("localhost", "127.0.0.1")))
        server_cert, server_key = server.write_pair(folder, "server")
        return cls(
            folder=folder,
            server_ca=server_ca,
            client_ca=client_ca,
            server=server,
            server_cert=server_cert,
            server_key=server_key,
            server_ca_file=server_ca.write_root(folder / "server-ca.pem"),
            client_ca_file=client_ca.write_root(folder / "client-ca.pem"),
        )

    def enroll(self, keystore: Path, identity: str, stem: str, cn: str | None = None, **kwargs: Any) -> Leaf:
        leaf = self.client_ca.client(cn or identity, **kwargs)
        leaf.write_pair(keystore / identity, stem)
        return leaf


# Set by the `control_transport` fixture (tests/conftest.py): written into every config as `control`.
CONTROL: list[str | None] = [None]


def write_config(
    path: Path,
    *,
    identities: dict[str, dict[str, Any]],
    routes: dict[str, dict[str, Any]],
    active: str | None = None,
    **top: Any,
) -> Path:
    doc: dict[str, Any] = {**top}
    if CONTROL[0] is not None:  # the control_transport fixture's choice, for daemons in this process and in others
        doc.setdefault("control", CONTROL[0])
    if active:
        doc["active_identity"] = active
    doc["identities"] = identities
    doc["routes"] = routes
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomlkit.dumps(doc))
    return path


def curl(port: int, path: str = "/", *extra: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", str(timeout), *extra, f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        text=True,
        timeout=timeout + 5,
    )


def http_get_on(sock: socket.socket, path: str = "/") -> bytes:
    """One keep-alive HTTP/1.1 request on an open socket; returns the response body."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    return read_response(sock)[1]


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response with a Content-Length, read from an open socket: (head, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed mid-response: {data!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("connection closed mid-body")
        body += chunk
    return head, body


def recv_all(sock: socket.socket, timeout: float = 10) -> bytes:
    """Read until EOF (or a reset, which also ends the stream)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def route_to(pki: Pki, port: int, **extra: Any) -> dict[str, Any]:
    """A route from an OS-chosen loopback port to a test server that holds `pki.server`."""
    return {
        "listen": "127.0.0.1:0",
        "target": f"127.0.0.1:{port}",
        "server_name": "localhost",
        "ca_file": str(pki.server_ca_file),
        **extra,
    }


def one_route_config(home: Path, pki: Pki, port: int, name: str = "svc", **extra: Any) -> Path:
    """config.toml with identity `dev` (no renewal) and one route `name` to 127.0.0.1:`port`."""
    top = {k: extra.pop(k) for k in list(extra) if k in ("shutdown_grace", "log_level")}
    return write_config(
        home / "config.toml", identities={"dev": {"renew": "none"}}, routes={name: route_to(pki, port, **extra)}, **top
    )


def mtls_server(pki: Pki, mode: str = "echo", **kwargs: Any) -> ScriptedTLSServer:
    """A scripted TLS server holding `pki.server` (or `cert`/`key`) that requires a client certificate
    from `pki.client_ca`."""
    kwargs.setdefault("cert", pki.server_cert)
    kwargs.setdefault("key", pki.server_key)
    return ScriptedTLSServer(
        client_ca=pki.client_ca_file,
        require_client_cert=True,
        mode=mode,
        **kwargs,
    )
