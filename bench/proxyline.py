"""The proxy line: what a connection through `[proxy]` costs against one through a route.

One daemon (`mtls-sidecar run`), one nginx mTLS HTTP backend (the http line's), and four ways
in: a `tcp` route, an `http` route, and the proxy port spoken to by CONNECT, SOCKS5 and as an
HTTP proxy (`GET http://localhost/`). Measured in the same run:

- new connection: from `connect()` to the first line of the backend's answer, one connection
  at a time (the client's own proxy handshake included: CONNECT's `200`, SOCKS5's two round
  trips), median and p90;
- requests/s: wrk through the http route and through the proxy as an HTTP proxy (a wrk script
  writes the absolute URI a proxy client sends).

    python3 -m bench --tests proxy [--quick] [--reps N]
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import peers, procs, protocols, stats

TESTS = ("proxy",)
NAME = peers.SERVER_NAME
REQUEST = f"GET / HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode()
PROXY_REQUEST = f"GET http://{NAME}/ HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode()
WAYS = ("route tcp", "proxy CONNECT", "proxy SOCKS5", "route http", "proxy HTTP")


def config_text(files: peers.Files, backend: int, tcp: int, http: int, proxy: int) -> str:
    ca = files.server_ca
    return f"""\
active_identity = "bench"
log_level = "warning"

[identities.bench]
renew = "none"

[routes.tcp]
listen = "127.0.0.1:{tcp}"
target = "127.0.0.1:{backend}"
server_name = "{NAME}"
ca_file = "{ca}"

[routes.http]
listen = "127.0.0.1:{http}"
target = "127.0.0.1:{backend}"
server_name = "{NAME}"
ca_file = "{ca}"
protocol = "http"

[proxy]
listen = "127.0.0.1:{proxy}"

[[proxy.rules]]
hosts = ["{NAME}"]
ca_file = "{ca}"
connect = "127.0.0.1:{backend}"
"""


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError(f"closed before {marker!r}: {data[:200]!r}")
        data += chunk
    return data


def _connect_prelude(sock: socket.socket) -> None:
    sock.sendall(f"CONNECT {NAME}:443 HTTP/1.1\r\nHost: {NAME}:443\r\n\r\n".encode())
    head = _read_until(sock, b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"CONNECT answered {head[:80]!r}")


def _socks5_prelude(sock: socket.socket) -> None:
    sock.sendall(b"\x05\x01\x00")
    if _read_exactly(sock, 2) != b"\x05\x00":
        raise RuntimeError("SOCKS5: no method accepted")
    name = NAME.encode()
    sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", 443))
    reply = _read_exactly(sock, 10)
    if reply[1] != 0:
        raise RuntimeError(f"SOCKS5 reply {reply[1]}")


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise RuntimeError("closed mid-reply")
        data += chunk
    return data


def first_answer_ms(port: int, prelude: Callable[[socket.socket], None] | None, request: bytes) -> float:
    """Milliseconds from connect() to the first line of the backend's answer."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if prelude is not None:
            prelude(sock)
        sock.sendall(request)
        line = _read_until(sock, b"\r\n")
        elapsed = (time.perf_counter() - start) * 1000
    if not line.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"answered {line[:80]!r}")
    return elapsed


def new_connections(ports: dict[str, int], count: int) -> dict[str, dict[str, float]]:
    ways: dict[str, tuple[int, Callable[[socket.socket], None] | None, bytes]] = {
        "route tcp": (ports["tcp"], None, REQUEST),
        "proxy CONNECT": (ports["proxy"], _connect_prelude, REQUEST),
        "proxy SOCKS5": (ports["proxy"], _socks5_prelude, REQUEST),
        "route http": (ports["http"], None, REQUEST),
        "proxy HTTP": (ports["proxy"], None, PROXY_REQUEST),
    }
    out: dict[str, dict[str, float]] = {}
    for way in WAYS:
        port, prelude, request = ways[way]
        for _ in range(5):  # warm: sessions to resume, contexts built
            first_answer_ms(port, prelude, request)
        times = sorted(first_answer_ms(port, prelude, request) for _ in range(count))
        out[way] = {"p50_ms": statistics.median(times), "p90_ms": times[int(len(times) * 0.9)]}
    return out


def wrk_proxy_script(folder: Path) -> Path:
    path = folder / "proxy.lua"
    path.write_text(f'wrk.path = "http://{NAME}/"\nwrk.headers["Host"] = "{NAME}"\n')
    return path


def run(args: Any, files: peers.Files, server_cert: Path, server_key: Path, client_ca: Path) -> dict[str, Any]:
    folder = files.folder / "proxyline"
    folder.mkdir(exist_ok=True)
    count = 100 if args.quick else 300
    raw: list[dict[str, dict[str, float]]] = []
    with contextlib.ExitStack() as stack:
        backend = stack.enter_context(_backend(folder, server_cert, server_key, client_ca))
        for rep in range(args.reps):
            print(f"rep {rep + 1}/{args.reps}: proxy …", file=sys.stderr, flush=True)
            with _daemon(folder / f"rep{rep}", files, backend) as ports:
                protocols.check_answer(ports["http"])
                figures = new_connections(ports, count)
                seconds = args.http_seconds
                for way, port, extra in (
                    ("route http", ports["http"], []),
                    ("proxy HTTP", ports["proxy"], ["-s", str(wrk_proxy_script(folder))]),
                ):
                    command = protocols.wrk_command(port, seconds)
                    command[-1:-1] = extra
                    text = procs_run(command)
                    got = protocols.parse_wrk(text)
                    if got.get("non_2xx") or got.get("errors"):
                        raise RuntimeError(f"wrk through {way}: {got}")
                    figures[way]["req_per_s"] = got["req_per_s"]
                raw.append(figures)
                print(f"  {figures}", file=sys.stderr)
    medians = {way: stats.summarise([r[way] for r in raw]) for way in WAYS}
    return {"settings": {"connections": count, "http_seconds": args.http_seconds}, "medians": medians, "raw": raw}


def procs_run(command: list[str]) -> str:
    import subprocess

    out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{command[0]} failed: {out.stderr[-400:]}")
    return out.stdout


@contextlib.contextmanager
def _backend(folder: Path, server_cert: Path, server_key: Path, client_ca: Path) -> Iterator[int]:
    sub = folder / "nginx-backend"
    sub.mkdir()
    port = procs.free_port()
    conf = sub / "nginx.conf"
    as_root = os.geteuid() == 0
    conf.write_text(protocols.nginx_http_backend_config(sub, server_cert, server_key, client_ca, port, as_root=as_root))
    cmd = ["nginx", "-p", str(sub), "-c", str(conf), "-e", str(sub / "error.log")]
    with procs.process(cmd, port, sub / "nginx.log"):
        yield port


@contextlib.contextmanager
def _daemon(folder: Path, files: peers.Files, backend: int) -> Iterator[dict[str, int]]:
    home = folder / "home"
    keystore = home / "keystore" / "bench"
    keystore.mkdir(parents=True)
    bundle = keystore / "bench.pem"
    shutil.copyfile(files.bundle, bundle)
    bundle.chmod(0o600)
    ports = {"tcp": procs.free_port(), "http": procs.free_port(), "proxy": procs.free_port()}
    config = home / "config.toml"
    config.write_text(config_text(files, backend, ports["tcp"], ports["http"], ports["proxy"]))
    env = {**os.environ, "MTLS_SIDECAR_HOME": str(home)}
    cmd = [sys.executable, "-m", "sidecar", "run", "--config", str(config)]
    with procs.process(cmd, ports["proxy"], folder / "daemon.log", env):
        for port in ports.values():
            procs.wait_port(port, None)
        yield ports


def table(result: dict[str, Any], reps: int) -> str:
    medians = result["medians"]
    base_new = medians["route tcp"]["p50_ms"]
    base_http = medians["route http"]["p50_ms"]
    base_rps = medians["route http"].get("req_per_s", math.nan)
    lines = [
        f"new connection to first answer ({result['settings']['connections']} one at a time) and wrk requests/s; "
        f"medians of {reps}:",
        "",
        "| way in | new connection p50 ms | p90 ms | vs route | requests/s | vs route |",
        "|---|---|---|---|---|---|",
    ]
    for way in WAYS:
        row = medians[way]
        base = base_http if way in ("route http", "proxy HTTP") else base_new
        rps = row.get("req_per_s")
        rps_text = f"{rps:,.0f} | {rps / base_rps:.2f}×" if rps else "– | –"
        lines.append(
            f"| {way} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | {row['p50_ms'] / base:.2f}× | {rps_text} |"
        )
    return "\n".join(lines)
