"""Which OS user is on the other end of a local connection.

A route's loopback port is reachable by every user of the machine, and whoever connects
uses *our* identity. So a connection is refused unless its peer is our own uid.

- Unix sockets: SO_PEERCRED (Linux) / LOCAL_PEERCRED via getpeereid semantics elsewhere.
- TCP on Linux: the client's socket appears in /proc/net/tcp{,6} with local address = the
  client's, remote address = our listener's, and the uid that owns it.
- TCP elsewhere: psutil, when installed, maps the client's socket to a process and its uid.

The /proc parsing is pure (`find_owner`) so it is tested without sockets.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import sys
from dataclasses import dataclass

Address = tuple[str, int]


@dataclass(frozen=True)
class PeerCheck:
    """How this platform tells a connection's owner; `method` None: it cannot."""

    method: str | None
    detail: str


def describe_peer_check() -> PeerCheck:
    if not hasattr(os, "getuid"):
        return PeerCheck(None, "cannot tell which user owns a local connection on this platform")
    if sys.platform.startswith("linux") and os.path.exists("/proc/net/tcp"):
        return PeerCheck("proc-net-tcp", "TCP peers are matched to their owner in /proc/net/tcp and /proc/net/tcp6")
    try:
        import psutil  # noqa: F401  # optional: only where /proc is not there
    except ImportError:
        return PeerCheck(None, "cannot tell which user owns a TCP connection here: install psutil (pip install psutil)")
    return PeerCheck("psutil", "TCP peers are matched to their owner with psutil")


# -- /proc/net/tcp (pure) ---------------------------------------------------------------------


def proc_net_hex(address: Address) -> str:
    """An address as /proc/net/tcp{,6} writes it: the IP's 32-bit words in host byte order, in
    hex, then `:` and the port in hex."""
    raw = ipaddress.ip_address(address[0]).packed  # an IPv4-mapped v6 address stays v6, as in tcp6
    words = struct.unpack(f"={len(raw) // 4}I", raw)
    return "".join(f"{word:08X}" for word in words) + f":{address[1]:04X}"


def find_owner(table: str, local: Address, remote: Address) -> int | None:
    """The uid owning the socket `local` → `remote` in a /proc/net/tcp{,6} table, if listed."""
    needle = f" {proc_net_hex(local)} {proc_net_hex(remote)} "
    at = table.find(needle)
    if at < 0:
        return None
    line_end = table.find("\n", at)
    fields = table[at : line_end if line_end >= 0 else len(table)].split()
    # local remote st tx_queue:rx_queue tr:tm->when retrnsmt uid ...
    return int(fields[6]) if len(fields) > 6 else None


# -- I/O -------------------------------------------------------------------------------------


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process on the other end of `sock` (an accepted connection), or None
    when it cannot be told (see `describe_peer_check`) or the peer is already gone."""
    if sock.family == socket.AF_UNIX:
        return _unix_peer_uid(sock)
    try:
        server, client = sock.getsockname()[:2], sock.getpeername()[:2]
    except OSError:
        return None
    if sys.platform.startswith("linux"):
        table = "tcp6" if sock.family == socket.AF_INET6 else "tcp"
        try:
            with open(f"/proc/net/{table}", encoding="ascii") as fh:
                return find_owner(fh.read(), client, server)
        except OSError:
            return None
    return _psutil_peer_uid(client, server)


def _unix_peer_uid(sock: socket.socket) -> int | None:
    peercred = getattr(socket, "SO_PEERCRED", None)
    if peercred is not None:
        creds = sock.getsockopt(socket.SOL_SOCKET, peercred, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return int(uid)
    getpeereid = getattr(os, "getpeereid", None)  # not in the standard library; psutil below
    if getpeereid is not None:  # pragma: no cover
        return int(getpeereid(sock.fileno())[0])
    return None


def _psutil_peer_uid(client: Address, server: Address) -> int | None:  # pragma: no cover - not Linux
    try:
        import psutil
    except ImportError:
        return None
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.raddr and tuple(conn.laddr)[:2] == client and tuple(conn.raddr)[:2] == server:
                if conn.pid is None:
                    return None
                return int(psutil.Process(conn.pid).uids().real)
    except (psutil.Error, OSError):
        return None
    return None


def user_name(uid: int) -> str:
    try:
        import pwd

        return f"{uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return str(uid)
