"""The load generator, run as its own process so that its CPU time is its own.

    python3 -m bench.load TEST --port P [--tls CERT KEY CA] [options]

Prints one JSON object: the test's figures plus `cpu_s` and `wall_s` of this process.
Speaks the backend's protocol (see backend.c): 'E' echo, 'D'+N download, 'U'+N upload.
With --tls it speaks mTLS to the backend itself (the "client does mTLS" limit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

CHUNK = 1 << 20


def _context(tls: list[str] | None) -> ssl.SSLContext | None:
    if not tls:
        return None
    cert, key, ca = tls
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert, key)
    return ctx


def _connect(port: int, ctx: ssl.SSLContext | None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ctx is not None:
        return ctx.wrap_socket(sock, server_hostname="localhost")
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        part = sock.recv(n - len(out))
        if not part:
            raise ConnectionError(f"EOF after {len(out)} of {n} bytes")
        out += part
    return out


def bulk_download(port: int, ctx: ssl.SSLContext | None, size: int) -> dict[str, Any]:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with _connect(port, ctx) as sock:
        start = time.perf_counter()
        sock.sendall(b"D" + struct.pack(">Q", size))
        got = 0
        while got < size:
            n = sock.recv_into(view)
            if n == 0:
                raise ConnectionError(f"EOF after {got} of {size} bytes")
            got += n
        secs = time.perf_counter() - start
    return {"bytes": got, "seconds": secs, "MBps": got / secs / 1e6}


def bulk_upload(port: int, ctx: ssl.SSLContext | None, size: int) -> dict[str, Any]:
    block = memoryview(bytes(CHUNK))
    with _connect(port, ctx) as sock:
        start = time.perf_counter()
        sock.sendall(b"U" + struct.pack(">Q", size))
        left = size
        while left > 0:
            n = min(left, CHUNK)
            sock.sendall(block[:n])
            left -= n
        if _recv_exactly(sock, 1) != b"K":
            raise ConnectionError("no acknowledgement from the backend")
        secs = time.perf_counter() - start
    return {"bytes": size, "seconds": secs, "MBps": size / secs / 1e6}


def fresh_latency(port: int, ctx: ssl.SSLContext | None, count: int, gap_s: float = 0.0) -> dict[str, Any]:
    """`count` new connections one after another, each timed from connect() to the first echoed
    byte. `gap_s`: a pause before each (the WAN line's), in which a tunnel's warm connections
    are replaced, as between the connections of a developer's tools."""
    samples: list[float] = []
    errors = 0
    for _ in range(count):
        if gap_s:
            time.sleep(gap_s)
        start = time.perf_counter()
        try:
            sock = _connect(port, ctx)
            sock.sendall(b"Ex")
            ok = _recv_exactly(sock, 1) == b"x"
            sock.close()
        except OSError:
            ok = False
        if ok:
            samples.append((time.perf_counter() - start) * 1e3)
        else:
            errors += 1
    return {"samples_ms": samples, "errors": errors}


def echo_rtt(port: int, ctx: ssl.SSLContext | None, count: int) -> dict[str, Any]:
    samples: list[float] = []
    with _connect(port, ctx) as sock:
        sock.sendall(b"E")
        for _ in range(50):  # warm up: the handshake and first buffers are T2's business
            sock.sendall(b"x")
            _recv_exactly(sock, 1)
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise ConnectionError("echo lost")
            samples.append((time.perf_counter() - start) * 1e6)
    return {"samples_us": samples}


async def _one_exchange(port: int, ctx: ssl.SSLContext | None) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost" if ctx else None
    )
    try:
        writer.write(b"Ex")
        if await reader.readexactly(1) != b"x":
            raise ConnectionError("echo lost")
    finally:
        writer.transport.abort() if ctx is not None else writer.close()


async def _rate(port: int, ctx: ssl.SSLContext | None, clients: int, seconds: float) -> dict[str, Any]:
    done = 0
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done, errors
        while time.perf_counter() < deadline:
            try:
                await asyncio.wait_for(_one_exchange(port, ctx), 30)
                done += 1
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError):
                errors += 1
                await asyncio.sleep(0.01)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    secs = time.perf_counter() - start
    return {"connections": done, "errors": errors, "seconds": secs, "per_s": done / secs}


async def _hold(port: int, ctx: ssl.SSLContext | None, count: int, timeout: float) -> dict[str, Any]:
    """Open `count` connections, each proven end to end by one echo; report, then wait for stdin."""
    writers: list[asyncio.StreamWriter] = []
    errors: dict[str, int] = {}
    gate = asyncio.Semaphore(200)  # at most this many handshakes in flight

    async def one() -> None:
        async with gate:
            try:
                async with asyncio.timeout(timeout):
                    reader, writer = await asyncio.open_connection(
                        "127.0.0.1", port, ssl=ctx, server_hostname="localhost" if ctx else None
                    )
                    writer.write(b"Ex")
                    if await reader.readexactly(1) != b"x":
                        raise ConnectionError("echo lost")
                writers.append(writer)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError) as exc:
                name = type(exc).__name__
                errors[name] = errors.get(name, 0) + 1

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    setup = time.perf_counter() - start
    print(json.dumps({"held": len(writers)}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    for writer in writers:
        writer.transport.abort()
    return {"held": len(writers), "errors": errors, "setup_seconds": setup}


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _run_async(factory: Callable[[], Any]) -> Any:
    try:
        import uvloop

        return uvloop.run(factory())
    except ImportError:
        return asyncio.run(factory())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.load")
    parser.add_argument("test", choices=["download", "upload", "fresh", "rate", "hold", "rtt"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls", nargs=3, metavar=("CERT", "KEY", "CA"))
    parser.add_argument("--size", type=int, default=1 << 30)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--gap-ms", type=float, default=0.0, help="fresh: pause before each connection")
    args = parser.parse_args(argv)
    _raise_nofile()
    ctx = _context(args.tls)
    before = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter()
    result: dict[str, Any]
    if args.test == "download":
        result = bulk_download(args.port, ctx, args.size)
    elif args.test == "upload":
        result = bulk_upload(args.port, ctx, args.size)
    elif args.test == "fresh":
        result = fresh_latency(args.port, ctx, args.count, args.gap_ms / 1e3)
    elif args.test == "rtt":
        result = echo_rtt(args.port, ctx, args.count)
    elif args.test == "rate":
        result = _run_async(lambda: _rate(args.port, ctx, args.clients, args.seconds))
    else:
        result = _run_async(lambda: _hold(args.port, ctx, args.count, args.timeout))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime
    result["wall_s"] = time.perf_counter() - wall
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
