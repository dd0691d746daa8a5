"""control.json: where a daemon on the loopback transport answers, and whether it still does.

Stdlib only and light: the CLI reads it on every command. json is imported once the file exists.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ControlRecord:
    """What a daemon wrote into control.json: {"port", "token", "pid", "version"}."""

    file: Path
    port: int
    token: str
    pid: int | None
    version: str


class BadControlFile(ValueError):
    """control.json is there but is not one a daemon wrote (unreadable, not JSON, fields missing)."""


def read_control_file(path: Path) -> ControlRecord | None:
    """The record in `path`; None when there is no such file. BadControlFile when it cannot be used."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BadControlFile(f"cannot read {path}: {exc.strerror or exc}") from exc
    import json

    try:
        fields = json.loads(data)
    except ValueError:
        fields = None
    if not isinstance(fields, dict):
        raise BadControlFile(f"{path} is not a control file written by mtls-sidecar (not a JSON object)")
    port, token, pid = fields.get("port"), fields.get("token"), fields.get("pid")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise BadControlFile(f"{path} names no port (a number 1-65535)")
    if not isinstance(token, str) or not token:
        raise BadControlFile(f"{path} holds no token")
    return ControlRecord(
        file=path,
        port=port,
        token=token,
        pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
        version=str(fields.get("version") or ""),
    )


def stale_reason(record: ControlRecord) -> str | None:
    """Why `record` is left over from a daemon that is gone; None while something answers on its port."""
    if record.pid is not None and not pid_alive(record.pid):
        return f"{record.file.name} was left by a daemon that is gone (pid {record.pid})"
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect((LOOPBACK, record.port))
    except (ConnectionRefusedError, TimeoutError):
        return f"nobody answers on {LOOPBACK}:{record.port}, named in {record.file.name}"
    except OSError as exc:
        return f"{LOOPBACK}:{record.port}, named in {record.file.name}, cannot be reached: {exc.strerror or exc}"
    finally:
        probe.close()
    return None


def pid_alive(pid: int) -> bool:
    if sys.platform == "win32":  # os.kill there terminates the process: the port alone tells
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone's process: the port check decides
    return True
