"""Reaching a route's target through its upstream proxy: the I/O half of `sidecar.upstreamproxy`.

`dial_through(proxy, host, port)` connects to a route's `upstream_proxy`, runs the CONNECT or SOCKS5 dialogue for
the route's target, and returns the connected socket with the bytes the proxy sent past its
answer. `open_to_target(route, factory)` is what the tunnel calls instead of
`loop.create_connection(factory, host, port)`: directly when the route has no upstream proxy,
else over the proxy's tunnel, so the route's TLS (SNI, name checks: the target's) starts inside
it and those leftover bytes reach the protocol first. The caller's timeout (the route's
`connect_timeout`) bounds the whole of it. Credentials are read from the environment variable
that `upstream_proxy_auth_env` names, at each connection, and are never logged.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

from sidecar.config import RouteSpec
from sidecar.upstreamproxy import (
    UpstreamProxy,
    dialogue,
    parse_credentials,
    parse_proxy_url,
    unreachable,
)

_CHUNK = 65536
P = TypeVar("P", bound=asyncio.BaseProtocol)


def proxy_of(route: RouteSpec) -> UpstreamProxy | None:
    """The route's upstream proxy, or None. Config checked the URL; a RouteSpec built in code
    (the tunnel command's flags) is checked here, with the same words."""
    if route.upstream_proxy is None:
        return None
    return parse_proxy_url(route.upstream_proxy, route.upstream_proxy_auth_env)


def credentials_for(proxy: UpstreamProxy) -> tuple[str, str] | None:
    """ "user:password" from the environment variable the route names; None when unset or empty."""
    if proxy.auth_env is None:
        return None
    value = os.environ.get(proxy.auth_env)
    return parse_credentials(value) if value else None


async def dial_through(proxy: UpstreamProxy, host: str, port: int) -> tuple[socket.socket, bytes]:
    """A non-blocking socket tunnelled by `proxy` to host:port, and the bytes read past the
    proxy's answer. Raises UpstreamProxyError (refused, or unreachable)."""
    talk = dialogue(proxy, host, port, credentials_for(proxy))
    sock = await _connect(proxy)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, talk.start())
        while not talk.done:
            data = await loop.sock_recv(sock, _CHUNK)
            if not data:
                talk.receive_eof()
            reply = talk.receive(data)
            if reply:
                await loop.sock_sendall(sock, reply)
    except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as exc:
        sock.close()
        raise unreachable(proxy, f"reset the connection during its dialogue ({exc.strerror or exc})") from None
    except BaseException:
        sock.close()
        raise
    return sock, talk.leftover


async def _connect(proxy: UpstreamProxy) -> socket.socket:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise unreachable(proxy, f"cannot be found: its name does not resolve ({exc.strerror or exc})") from None
    try:
        sock = await connect_first(infos)
    except ConnectionRefusedError:
        raise unreachable(proxy, "refused the connection: nothing listens there") from None
    except OSError as exc:
        raise unreachable(proxy, f"cannot be reached ({exc.strerror or exc})") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def connect_first(infos: Sequence[tuple[Any, ...]]) -> socket.socket:
    """A connected non-blocking socket to the first of `infos` (getaddrinfo's answer) that answers.
    OSError when none does: a refusal if any address refused (nothing listens), else the first error."""
    loop = asyncio.get_running_loop()
    errors: list[OSError] = []
    for family, kind, number, _canon, address in infos:
        sock = socket.socket(family, kind, number)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            errors.append(exc)
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    refused = [e for e in errors if isinstance(e, ConnectionRefusedError)]
    raise (refused[0] if refused else errors[0]) if errors else OSError("the name resolves to no address")


async def open_to_target(route: RouteSpec, factory: Callable[[], P]) -> tuple[asyncio.Transport, P]:
    """`loop.create_connection(factory, target)`, through the route's upstream proxy when it has one."""
    loop = asyncio.get_running_loop()
    proxy = proxy_of(route)
    if proxy is None:
        return await loop.create_connection(factory, route.target_host, route.target_port)
    sock, leftover = await dial_through(proxy, route.target_host, route.target_port)
    try:
        made: list[P] = []

        def first() -> asyncio.BaseProtocol:
            inner = factory()
            made.append(inner)
            return _Leftover(inner, leftover) if leftover else inner

        transport, _ = await loop.create_connection(first, sock=sock)
    except BaseException:
        sock.close()
        raise
    return transport, made[0]


class _Leftover(asyncio.Protocol):
    """Hands the protocol the bytes the proxy sent past its answer, before anything the socket
    brings, then steps aside (the transport talks to the protocol itself from then on)."""

    def __init__(self, inner: asyncio.BaseProtocol, leftover: bytes) -> None:
        self.inner = inner
        self.leftover = leftover

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.set_protocol(self.inner)
        self.inner.connection_made(transport)
        cast(Any, self.inner).data_received(self.leftover)
