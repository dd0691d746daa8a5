"""Raw HTTP/1.1 on the control socket, as any client could send it (bodies the CLI never makes)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


def request(path: Path, method: str, target: str, body: bytes) -> tuple[int, Any]:
    """One HTTP/1.1 request on the control socket, as any client could send it; (status, JSON answer)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        head = (
            f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data, f"no answer at all to {method} {target}"
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1])
    return status, json.loads(payload)
