"""Which OS user is on the other end of a local connection.

A route's loopback port is reachable by every user of the machine, and whoever connects
uses *our* identity. So a connection is refused unless its peer is our own uid.

- Unix sockets: SO_PEERCRED (Linux) / LOCAL_PEERCRED via getpeereid semantics elsewhere.
- TCP on Linux: the kernel is asked for the client's socket by its exact address (netlink
  sock_diag), which answers with its owner; where that is not allowed, the socket is found in
  /proc/net/tcp{,6} (local address = the client's, remote = our listener's) with its uid.
- TCP elsewhere: psutil, when installed, maps the client's socket to a process and its uid.

The /proc parsing is pure (`find_owner`) so it is tested without sockets.
"""

from __future__ import annotations

import errno
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
        return PeerCheck(
            "proc-net-tcp",
            "TCP peers are matched to their owner by the kernel (sock_diag), else in /proc/net/tcp and /proc/net/tcp6",
        )
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
        try:
            return netlink_owner(sock.family, client, server)
        except OSError:
            pass  # no sock_diag here (a container may forbid it): scan the table instead
        table = "tcp6" if sock.family == socket.AF_INET6 else "tcp"
        try:
            with open(f"/proc/net/{table}", encoding="ascii") as fh:
                return find_owner(fh.read(), client, server)
        except OSError:
            return None
    return _psutil_peer_uid(client, server)


NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
_NO_COOKIE = 0xFFFFFFFF
# struct nlmsghdr, then struct inet_diag_msg: family, state, timer, retrans, the 48-byte
# socket id, expires, rqueue, wqueue, *uid*, inode.
_UID_OFFSET = 16 + 4 + 48 + 12


def netlink_owner(family: int, local: Address, remote: Address) -> int | None:
    """The uid owning the TCP socket `local` → `remote`, asked of the kernel by its exact address
    (sock_diag): one lookup, where reading /proc/net/tcp costs time in proportion to every TCP
    socket on the machine (tens of milliseconds per accept with 20,000 in TIME_WAIT). None when
    no such socket exists; OSError when sock_diag cannot be used."""

    def packed(host: str) -> bytes:
        return ipaddress.ip_address(host).packed.ljust(16, b"\0")

    sock_id = (
        struct.pack("!HH", local[1], remote[1])
        + packed(local[0])
        + packed(remote[0])
        + struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE)
    )
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sock_id
    message = struct.pack("=IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + request
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        nl.sendto(message, (0, 0))
        reply = nl.recv(4096)
    if len(reply) < 20:
        raise OSError(f"sock_diag: short reply ({len(reply)} bytes)")
    (kind,) = struct.unpack_from("=H", reply, 4)
    if kind == NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", reply, 16)
        if code == -errno.ENOENT:
            return None
        raise OSError(-code, f"sock_diag: {os.strerror(-code)}")
    if len(reply) < _UID_OFFSET + 4:
        raise OSError(f"sock_diag: short reply ({len(reply)} bytes)")
    return int(struct.unpack_from("=I", reply, _UID_OFFSET)[0])


def unix_socket_peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a connected Unix socket (None: cannot tell here)."""
    return _unix_peer_uid(sock)


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
