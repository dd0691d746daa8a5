"""The contenders and the backend: their config files and command lines (pure), and launching.

Every tunnel listens on 127.0.0.1 in plain TCP and speaks mTLS to the backend: it presents
the client certificate (with its intermediate), checks the backend's chain against the
server CA, and checks the name `localhost`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.procs import free_port, process

NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
SERVER_NAME = "localhost"

# Debian package that provides each outside program the benchmark runs.
PACKAGES = {
    "stunnel4": "stunnel4",
    "haproxy": "haproxy",
    "nginx": "nginx",
    NGINX_STREAM_MODULE: "libnginx-mod-stream",
    "socat": "socat",
    "gcc": "gcc",
}

PEERS = ("mtls-sidecar", "stunnel", "haproxy", "nginx", "socat")
# The sidecar as it also runs, in the tunnel lines beside its default row (uvloop, the bench's
# --sidecar-arg flags): (flags replacing or added to those, environment). Issue 18's table.
SIDECAR_VARIANTS: dict[str, tuple[tuple[str, ...], bool, dict[str, str]]] = {
    # name: (flags, whether they replace the default flags, environment)
    "mtls-sidecar (1 worker)": (("--max-concurrent-conns=20000",), True, {}),
    "mtls-sidecar (asyncio)": ((), False, {"MTLS_SIDECAR_LOOP": "asyncio"}),
    "mtls-sidecar (warm)": (("--preconnect=4",), False, {}),
}
LIMITS = ("plain-tcp", "client-mtls")


@dataclass(frozen=True)
class Files:
    """What every tunnel is given; `bundle` is certificate chain + key in one file (haproxy)."""

    cert: Path
    key: Path
    bundle: Path
    server_ca: Path
    folder: Path


def missing_programs(packages: dict[str, str] | None = None) -> list[str]:
    """Outside programs not found (of `packages`, default the tunnel lines'), each with the
    Debian package that brings it."""
    missing = []
    for program, package in (PACKAGES if packages is None else packages).items():
        found = os.path.exists(program) if program.startswith("/") else shutil.which(program)
        if not found:
            missing.append(f"{program} (apt package {package})")
    return missing


def stunnel_config(files: Files, listen: int, backend: int, protocol: str | None = None) -> str:
    """`protocol`: stunnel's negotiation before TLS (`pgsql`: the SSLRequest to the server)."""
    return "\n".join(
        [
            "foreground = yes",
            "pid =",
            "syslog = no",
            "debug = 3",
            "[bench]",
            "client = yes",
            f"accept = 127.0.0.1:{listen}",
            f"connect = 127.0.0.1:{backend}",
            f"cert = {files.cert}",
            f"key = {files.key}",
            f"CAfile = {files.server_ca}",
            "verifyChain = yes",
            f"checkHost = {SERVER_NAME}",
            f"sni = {SERVER_NAME}",
            *([f"protocol = {protocol}"] if protocol else []),
            "",
        ]
    )


def haproxy_config(files: Files, listen: int, backend: int) -> str:
    return "\n".join(
        [
            "global",
            "    maxconn 9980",
            "    ssl-server-verify required",
            "defaults",
            "    mode tcp",
            "    timeout connect 10s",
            "    timeout client 10m",
            "    timeout server 10m",
            "frontend plain",
            f"    bind 127.0.0.1:{listen}",
            "    default_backend mtls",
            "backend mtls",
            f"    server b1 127.0.0.1:{backend} ssl crt {files.bundle} ca-file {files.server_ca} verify required"
            f" sni str({SERVER_NAME}) verifyhost {SERVER_NAME}",
            "",
        ]
    )


def nginx_head(folder: Path, workers: str, stream: bool = True) -> list[str]:
    return [
        *([f"load_module {NGINX_STREAM_MODULE};"] if stream else []),
        "daemon off;",
        f"worker_processes {workers};",
        "worker_rlimit_nofile 20000;",
        f"pid {folder}/nginx.pid;",
        f"error_log {folder}/error.log warn;",
        "events { worker_connections 20000; }",
    ]


def nginx_tunnel_config(files: Files, listen: int, backend: int) -> str:
    return "\n".join(
        [
            *nginx_head(files.folder, "auto"),
            "stream {",
            "    server {",
            f"        listen 127.0.0.1:{listen};",
            f"        proxy_pass 127.0.0.1:{backend};",
            "        proxy_ssl on;",
            f"        proxy_ssl_certificate {files.cert};",
            f"        proxy_ssl_certificate_key {files.key};",
            f"        proxy_ssl_trusted_certificate {files.server_ca};",
            "        proxy_ssl_verify on;",
            "        proxy_ssl_verify_depth 2;",
            f"        proxy_ssl_name {SERVER_NAME};",
            "        proxy_ssl_server_name on;",
            "        proxy_ssl_session_reuse on;",
            "    }",
            "}",
            "",
        ]
    )


def nginx_backend_config(
    folder: Path, server_cert: Path, server_key: Path, client_ca: Path, listen: int, app: int
) -> str:
    """The mTLS backend: nginx stream terminates TLS, requires a client certificate, passes to the app."""
    return "\n".join(
        [
            *nginx_head(folder, "auto"),
            "stream {",
            "    server {",
            f"        listen 127.0.0.1:{listen} ssl reuseport backlog=4096;",
            f"        ssl_certificate {server_cert};",
            f"        ssl_certificate_key {server_key};",
            f"        ssl_client_certificate {client_ca};",
            "        ssl_verify_client on;",
            "        ssl_verify_depth 2;",
            "        ssl_protocols TLSv1.2 TLSv1.3;",
            "        ssl_session_cache shared:bench:20m;",
            f"        proxy_pass 127.0.0.1:{app};",
            "    }",
            "}",
            "",
        ]
    )


@dataclass(frozen=True)
class Backend:
    """A running backend: the C server's plaintext port, nginx's mTLS port, both processes."""

    app_port: int
    tls_port: int
    pids: list[int]


def build_backend(folder: Path) -> Path:
    exe = folder / "backend"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(Path(__file__).parent / "backend.c")], check=True)
    return exe


@contextlib.contextmanager
def backend(exe: Path, folder: Path, server_cert: Path, server_key: Path, client_ca: Path) -> Iterator[Backend]:
    """The C echo server behind nginx's mTLS on fresh ports, for one repetition (logs in `folder`)."""
    app_port = free_port()
    tls_port = free_port()
    conf = folder / "backend-nginx.conf"
    conf.write_text(nginx_backend_config(folder, server_cert, server_key, client_ca, tls_port, app_port))
    nginx = ["nginx", "-p", str(folder), "-c", str(conf), "-e", str(folder / "error.log")]
    with (
        process([str(exe), str(app_port)], app_port, folder / "app.log") as app,
        process(nginx, tls_port, folder / "backend-nginx.log") as tls,
    ):
        yield Backend(app_port, tls_port, [app.pid, tls.pid])


def socat_command(files: Files, listen: int, backend: int) -> list[str]:
    return [
        "socat",
        f"TCP-LISTEN:{listen},bind=127.0.0.1,reuseaddr,fork,backlog=4096",
        f"OPENSSL:127.0.0.1:{backend},cert={files.cert},key={files.key},cafile={files.server_ca},verify=1,"
        f"commonname={SERVER_NAME},snihost={SERVER_NAME},nodelay",
    ]


def sidecar_command(files: Files, listen: int, backend: int, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sidecar",
        "tunnel",
        "--listen",
        f"127.0.0.1:{listen}",
        "--target",
        f"127.0.0.1:{backend}",
        "--cert",
        str(files.cert),
        "--key",
        str(files.key),
        "--cacert",
        str(files.server_ca),
        "--server-name",
        SERVER_NAME,
        "--log-level",
        "warning",
        *extra,
    ]


def peer_command(name: str, files: Files, listen: int, backend: int, sidecar_extra: tuple[str, ...] = ()) -> list[str]:
    """Write the peer's config file (where it has one) and return its foreground command line."""
    folder = files.folder
    if name == "mtls-sidecar":
        return sidecar_command(files, listen, backend, sidecar_extra)
    if name == "stunnel":
        path = folder / "stunnel.conf"
        path.write_text(stunnel_config(files, listen, backend))
        return ["stunnel4", str(path)]
    if name == "haproxy":
        path = folder / "haproxy.cfg"
        path.write_text(haproxy_config(files, listen, backend))
        return ["haproxy", "-db", "-f", str(path)]
    if name == "nginx":
        path = folder / "nginx-tunnel.conf"
        path.write_text(nginx_tunnel_config(files, listen, backend))
        return ["nginx", "-p", str(folder), "-c", str(path), "-e", str(folder / "error.log")]
    if name == "socat":
        return socat_command(files, listen, backend)
    raise ValueError(f"unknown peer {name!r}")
