"""The first words on the proxy port: what the client asks for, and the proxy's answers. Pure.

One port speaks four ways, told apart by the first byte:

- `0x05`: SOCKS5 (RFC 1928): no authentication, CONNECT, to a name, an IPv4 or an IPv6 address;
- `0x04`: SOCKS4 and SOCKS4a (a name after the user id);
- an HTTP token: `CONNECT host:port`, an absolute-URI request (`GET http://name/…`, the HTTP
  proxy), or an origin-form request for the proxy itself (`GET /proxy.pac`);
- anything else (a TLS ClientHello, binary noise) is refused with a reason.

`Greeting.receive(data)` returns what it could decide; bytes it must answer before the client
says more (SOCKS5's method choice) are in `data_to_send()`.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

from sidecar.causes import Cause
from sidecar.proxy.hosts import ip_literal
from sidecar.proxy.rules import CONNECT, HTTP, SOCKS

MAX_HEAD = 64 * 1024  # of an HTTP request head, as the http stage allows
MAX_SOCKS4_FIELD = 1024  # the user id and the name of a SOCKS4a request
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")

# SOCKS5 replies (RFC 1928, section 6)
SOCKS5_OK, SOCKS5_FAILURE, SOCKS5_NOT_ALLOWED, SOCKS5_NET_UNREACHABLE = 0x00, 0x01, 0x02, 0x03
SOCKS5_HOST_UNREACHABLE, SOCKS5_REFUSED, SOCKS5_TTL_EXPIRED = 0x04, 0x05, 0x06
SOCKS5_COMMAND_NOT_SUPPORTED, SOCKS5_ADDRESS_NOT_SUPPORTED = 0x07, 0x08
SOCKS4_GRANTED, SOCKS4_REJECTED = 0x5A, 0x5B


@dataclass(frozen=True)
class Asked:
    """A destination: CONNECT, SOCKS, or the first absolute-URI request of an HTTP proxy client.

    `port` None: an http:// URL without a port. `leftover`: bytes that belong to the tunnel (for
    the HTTP proxy, the whole request as it came, which the http stage reads again)."""

    how: str
    host: str
    port: int | None
    leftover: bytes = b""
    socks_version: int = 0


@dataclass(frozen=True)
class ForProxy:
    """An origin-form request for the proxy itself (`GET /proxy.pac`)."""

    method: str
    path: str


@dataclass(frozen=True)
class Invalid:
    """Not something the proxy speaks: `reply` (maybe empty) goes out, then the connection ends."""

    message: str
    reply: bytes = b""
    cause: Cause = Cause.PROTOCOL_MISMATCH
    counted: bool = True  # False: nothing was refused (a client that left before it asked)


Decision = Asked | ForProxy | Invalid


class Greeting:
    def __init__(self) -> None:
        self._buffer = bytearray()
        self._out = bytearray()
        self._socks5_methods_done = False
        self._decided: Decision | None = None

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    def receive(self, data: bytes) -> Decision | None:
        """More bytes from the client; a decision once there is one (then nothing more is read)."""
        if self._decided is not None:
            return self._decided
        self._buffer += data
        if not self._buffer:
            return None
        first = self._buffer[0]
        if first == 0x05 or self._socks5_methods_done:  # the request after the methods: SOCKS5's, whatever it says
            decision = self._socks5()
        elif first == 0x04:
            decision = self._socks4()
        elif first in _TOKEN:
            decision = self._http()
        elif first == 0x16:
            decision = Invalid(
                "the client speaks TLS to the proxy port; the proxy itself speaks plain HTTP and SOCKS: "
                "give it as http://HOST:PORT (or socks5h://), not https://",
                http_error(400, "this port is mtls-sidecar's proxy: plain HTTP or SOCKS, not TLS"),
            )
        else:
            decision = Invalid(f"the client's first bytes are neither HTTP nor SOCKS: {bytes(self._buffer[:16])!r}")
        self._decided = decision
        return decision

    def receive_eof(self) -> Decision:
        """The client stopped sending before it asked for anything."""
        if self._decided is None:
            self._decided = Invalid("the client closed the connection before it asked for a destination", counted=False)
        return self._decided

    # --- SOCKS5

    def _socks5(self) -> Decision | None:
        buf = self._buffer
        if not self._socks5_methods_done:
            if len(buf) < 2 or len(buf) < 2 + buf[1]:
                return None
            methods = bytes(buf[2 : 2 + buf[1]])
            del buf[: 2 + len(methods)]
            if 0x00 not in methods:
                return Invalid(
                    "the SOCKS5 client offers no method without authentication (the proxy asks none: "
                    "it listens on loopback for this user only)",
                    b"\x05\xff",
                )
            self._out += b"\x05\x00"
            self._socks5_methods_done = True
        if len(buf) < 4:
            return None
        version, command, _, kind = buf[0], buf[1], buf[2], buf[3]
        if version != 5:
            return Invalid(f"a SOCKS5 request must begin with 5, not {version}", socks5_reply(SOCKS5_FAILURE))
        if kind not in (0x01, 0x03, 0x04):
            return Invalid(f"unknown SOCKS5 address type {kind}", socks5_reply(SOCKS5_ADDRESS_NOT_SUPPORTED))
        if len(buf) < 5:
            return None
        if kind == 0x01:
            end = 4 + 4
            if len(buf) < end + 2:
                return None
            host = str(ipaddress.IPv4Address(bytes(buf[4:end])))
        elif kind == 0x04:
            end = 4 + 16
            if len(buf) < end + 2:
                return None
            host = str(ipaddress.IPv6Address(bytes(buf[4:end])))
        elif kind == 0x03:
            end = 5 + buf[4]
            if len(buf) < end + 2:
                return None
            try:
                host = bytes(buf[5:end]).decode("ascii")
            except UnicodeDecodeError:
                return Invalid(
                    "the SOCKS5 request names a host that is not ASCII", socks5_reply(SOCKS5_ADDRESS_NOT_SUPPORTED)
                )
            if not host or any(c in host for c in "\0/ "):
                return Invalid(
                    f"the SOCKS5 request names no valid host: {host!r}", socks5_reply(SOCKS5_ADDRESS_NOT_SUPPORTED)
                )
        if command != 0x01:
            name = {2: "BIND", 3: "UDP ASSOCIATE"}.get(command, str(command))
            return Invalid(
                f"the SOCKS5 client asked for {name}; the proxy does CONNECT only",
                socks5_reply(SOCKS5_COMMAND_NOT_SUPPORTED),
            )
        (port,) = struct.unpack("!H", buf[end : end + 2])
        if port == 0:
            return Invalid("the SOCKS5 request names port 0", socks5_reply(SOCKS5_ADDRESS_NOT_SUPPORTED))
        return Asked(SOCKS, host, port, bytes(buf[end + 2 :]), socks_version=5)

    # --- SOCKS4 and 4a

    def _socks4(self) -> Decision | None:
        buf = self._buffer
        if len(buf) < 9:
            return None
        command = buf[1]
        (port,) = struct.unpack("!H", buf[2:4])
        address = bytes(buf[4:8])
        user_end = buf.find(b"\0", 8)
        if user_end < 0:
            return self._socks4_too_long(len(buf) - 8)
        host = str(ipaddress.IPv4Address(address))
        end = user_end + 1
        if address[:3] == b"\0\0\0" and address[3] != 0:  # 4a: a name follows
            name_end = buf.find(b"\0", end)
            if name_end < 0:
                return self._socks4_too_long(len(buf) - end)
            try:
                host = bytes(buf[end:name_end]).decode("ascii")
            except UnicodeDecodeError:
                return Invalid("the SOCKS4a request names a host that is not ASCII", socks4_reply(SOCKS4_REJECTED))
            end = name_end + 1
        if command != 0x01:
            return Invalid(
                "the SOCKS4 client asked for BIND; the proxy does CONNECT only", socks4_reply(SOCKS4_REJECTED)
            )
        if port == 0 or not host:
            return Invalid("the SOCKS4 request names no port or no host", socks4_reply(SOCKS4_REJECTED))
        return Asked(SOCKS, host, port, bytes(buf[end:]), socks_version=4)

    def _socks4_too_long(self, size: int) -> Decision | None:
        if size > MAX_SOCKS4_FIELD:
            return Invalid("the SOCKS4 request's user id or host name is too long", socks4_reply(SOCKS4_REJECTED))
        return None

    # --- HTTP

    def _http(self) -> Decision | None:
        buf = self._buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            end = buf.find(b"\n\n")  # h11 takes bare LFs too
            if end < 0:
                if len(buf) > MAX_HEAD:
                    return Invalid("the request head is larger than 64 KiB", http_error(431, "request head too large"))
                return None
            end += 2
        else:
            end += 4
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        parser.receive_data(bytes(buf[:end]))
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as exc:
            return Invalid(f"the request is not valid HTTP/1.1 ({exc})", http_error(400, f"not valid HTTP/1.1: {exc}"))
        if not isinstance(event, h11.Request):
            return Invalid("the request is not valid HTTP/1.1", http_error(400, "not valid HTTP/1.1"))
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("ascii", "replace")
        if method == "CONNECT":
            host, port = _authority(target)
            if host is None or port is None:
                return Invalid(
                    f"CONNECT needs host:port, not {target!r}",
                    http_error(400, f"CONNECT needs host:port, not {target}"),
                )
            return Asked(CONNECT, host, port, bytes(buf[end:]))
        if target.startswith("/"):
            return ForProxy(method, target)
        try:
            url = urlsplit(target)
            port = url.port
        except ValueError:
            return Invalid(f"not a valid URL: {target!r}", http_error(400, f"not a valid URL: {target}"))
        if url.scheme.lower() not in ("http", "https") or not url.hostname:
            return Invalid(
                f"the proxy takes http:// URLs, not {target!r}",
                http_error(400, f"the proxy takes http:// URLs, not {target}"),
            )
        if port is None and url.scheme.lower() == "https":
            port = 443
        return Asked(HTTP, url.hostname, port, bytes(buf))


def _authority(target: str) -> tuple[str | None, int | None]:
    """`host:port` or `[v6]:port` of a CONNECT request."""
    try:
        url = urlsplit("//" + target)
        host, port = url.hostname, url.port
    except ValueError:
        return None, None
    if host is None or port is None or port == 0 or "/" in target:
        return None, None
    if ":" in host and ip_literal(host) is None:
        return None, None
    return host, port


# --- the proxy's answers


def http_error(status: int, text: str, *, cause: str | None = None) -> bytes:
    reasons = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
               431: "Request Header Fields Too Large", 502: "Bad Gateway", 504: "Gateway Timeout"}  # fmt: skip
    body = f"mtls-sidecar: {text}\n".encode()
    head = [
        f"HTTP/1.1 {status} {reasons.get(status, 'Error')}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if cause:
        head.append(f"Mtls-Sidecar-Cause: {cause}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def socks5_reply(code: int) -> bytes:
    return bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])


def socks4_reply(code: int) -> bytes:
    return bytes([0, code, 0, 0, 0, 0, 0, 0])


def granted(asked: Asked) -> bytes:
    """The answer that opens the tunnel (none for the HTTP proxy: the target's answer is the answer)."""
    if asked.how == CONNECT:
        return b"HTTP/1.1 200 Connection established\r\n\r\n"
    if asked.how == SOCKS:
        return socks5_reply(SOCKS5_OK) if asked.socks_version == 5 else socks4_reply(SOCKS4_GRANTED)
    return b""


def not_allowed(asked: Asked, reason: str) -> bytes:
    """The answer to a destination no rule covers (or a rule that cannot serve this way)."""
    if asked.how == SOCKS:
        return socks5_reply(SOCKS5_NOT_ALLOWED) if asked.socks_version == 5 else socks4_reply(SOCKS4_REJECTED)
    return http_error(403, reason, cause=str(Cause.PROXY_NOT_ALLOWED))


def failed(asked: Asked, cause: Cause, message: str) -> bytes:
    """The answer when the destination could not be reached over mTLS (before the tunnel opened)."""
    if asked.how == SOCKS:
        if asked.socks_version == 4:
            return socks4_reply(SOCKS4_REJECTED)
        code = {
            Cause.REFUSED: SOCKS5_REFUSED,
            Cause.DNS: SOCKS5_HOST_UNREACHABLE,
            Cause.TIMEOUT: SOCKS5_TTL_EXPIRED,
            Cause.CONNECT: SOCKS5_NET_UNREACHABLE,
        }.get(cause, SOCKS5_FAILURE)
        return socks5_reply(code)
    status = 504 if cause == Cause.TIMEOUT else 502
    return http_error(status, f"{message}\nfix: {cause.fix}", cause=str(cause))
