"""Raw HTTP/1.1 on the control transport, as any client could send it (bodies the CLI never makes).

`path` is the control socket; when control.json sits beside it (the loopback transport), the
request goes to its port with its token, or with `token` when given ("" sends no Authorization)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


def request(path: Path, method: str, target: str, body: bytes, *, token: str | None = None) -> tuple[int, Any]:
    """One HTTP/1.1 request on the control transport, as any client could send it; (status, JSON answer)."""
    control_file = path.with_name("control.json")
    if control_file.exists():
        record = json.loads(control_file.read_text())
        sock = socket.create_connection(("127.0.0.1", record["port"]), timeout=30)
        token = record["token"] if token is None else token
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(str(path))
    authorization = f"Authorization: Bearer {token}\r\n" if token else ""
    with sock:
        head = (
            f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"{authorization}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data, f"no answer at all to {method} {target}"
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1])
    return status, json.loads(payload)
