"""Small upstream proxies for the tests: HTTP CONNECT and SOCKS5, on loopback, in a thread.

`UpstreamProxyServer("http")` answers `CONNECT host:port` with 200 and relays bytes both ways;
`UpstreamProxyServer("socks5")` does RFC 1928 (no auth, or RFC 1929 username/password) with
domain-name, IPv4 and IPv6 requests. Either can require credentials (`credentials=("u", "p")`:
HTTP 407 / SOCKS5 "no acceptable method" or a failed sub-negotiation without them), refuse every
request (`refuse=403` for HTTP, `refuse=0x02` for SOCKS5), or send its answer and the target's
first bytes in one write (`coalesce=True`: the target must speak first), as a real proxy may.
`requests` lists what was asked, as "host:port"; `authorizations` what credentials came
("user:password", or None).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import threading
from concurrent.futures import Future
from types import TracebackType
from typing import Self


class UpstreamProxyServer:
    def __init__(
        self,
        kind: str,
        *,
        credentials: tuple[str, str] | None = None,
        refuse: int | None = None,
        coalesce: bool = False,
    ) -> None:
        assert kind in ("http", "socks5")
        self.kind = kind
        self.credentials = credentials
        self.refuse = refuse
        self.coalesce = coalesce
        self.port = 0
        self.requests: list[str] = []
        self.authorizations: list[str | None] = []
        self.tunnels = 0  # tunnels opened to a target
        self._loop = asyncio.new_event_loop()
        self._ready: Future[None] = Future()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name=f"{kind}-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"{self.kind}://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        self._ready.result(timeout=10)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the test proxy did not stop"

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        handler = self._http if self.kind == "http" else self._socks
        tasks: set[asyncio.Task[None]] = set()

        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError, OSError):
                pass
            finally:
                tasks.discard(task)
                writer.close()

        server = await asyncio.start_server(client, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set_result(None)
        async with server:
            await self._stop.wait()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- HTTP CONNECT

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        line, *header_lines = head.split("\r\n")
        method, target, _ = line.split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
        self.requests.append(target)
        auth = headers.get("proxy-authorization")
        given = base64.b64decode(auth.split(" ", 1)[1]).decode() if auth and auth.startswith("Basic ") else None
        self.authorizations.append(given)
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return
        if self.credentials is not None and given != ":".join(self.credentials):
            writer.write(
                b'HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="test"\r\n'
                b"Content-Length: 0\r\n\r\n"
            )
            await writer.drain()
            return
        if self.refuse is not None:
            writer.write(f"HTTP/1.1 {self.refuse} Forbidden by test policy\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
            return
        host, _, port = target.rpartition(":")
        try:
            up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return
        answer = b"HTTP/1.1 200 Connection established\r\nVia: test-proxy\r\n\r\n"
        await self._relay(reader, writer, up_reader, up_writer, answer)

    # --- SOCKS5

    async def _socks(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        version, count = await reader.readexactly(2)
        if version != 5:  # not SOCKS5 (an HTTP client, say): hang up, as real ones do
            return
        methods = await reader.readexactly(count)
        given: str | None = None
        if self.credentials is not None:
            if 2 not in methods:
                writer.write(b"\x05\xff")
                self.authorizations.append(None)
                await writer.drain()
                return
            writer.write(b"\x05\x02")
            _, size = await reader.readexactly(2)
            user = (await reader.readexactly(size)).decode()
            size = (await reader.readexactly(1))[0]
            password = (await reader.readexactly(size)).decode()
            given = f"{user}:{password}"
            self.authorizations.append(given)
            if given != ":".join(self.credentials):
                writer.write(b"\x01\x01")
                await writer.drain()
                return
            writer.write(b"\x01\x00")
        else:
            writer.write(b"\x05\x00")
            self.authorizations.append(None)
        _, command, _, kind = await reader.readexactly(4)
        if kind == 1:
            host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
        elif kind == 4:
            host = f"[{ipaddress.IPv6Address(await reader.readexactly(16))}]"
        else:
            size = (await reader.readexactly(1))[0]
            host = (await reader.readexactly(size)).decode()
        port = int.from_bytes(await reader.readexactly(2), "big")
        self.requests.append(f"{host}:{port}")
        reply_tail = b"\x00\x01" + bytes(4) + bytes(2)  # RSV, IPv4 0.0.0.0:0
        if command != 1 or self.refuse is not None:
            code = 0x07 if command != 1 else self.refuse
            assert code is not None
            writer.write(bytes([5, code]) + reply_tail)
            await writer.drain()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), port)
        except OSError:
            writer.write(b"\x05\x05" + reply_tail)
            await writer.drain()
            return
        await self._relay(reader, writer, up_reader, up_writer, b"\x05\x00" + reply_tail)

    # --- both

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        answer: bytes,
    ) -> None:
        self.tunnels += 1
        if self.coalesce:  # the answer and the target's first words in one write
            answer += await up_reader.read(65536)
        writer.write(answer)
        await writer.drain()

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()
            except (ConnectionError, OSError):
                dst.transport.abort()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            up_writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await up_writer.wait_closed()
