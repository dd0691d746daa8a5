"""Real mutual-TLS servers (nginx, redis-server) started and stopped by tests.

Every server runs in the foreground from a folder the test owns, listens on 127.0.0.1 only,
and is stopped (and, if it will not stop, killed with its whole process group) when the
context manager exits. Certificates are PEM files the caller made; nothing here makes keys.

Missing binaries are a test *failure* with a message that says what to install: a skipped
mTLS test would let a broken tunnel pass unnoticed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"
START_DEADLINE_S = 10.0
STOP_DEADLINE_S = 10.0
PORT_ATTEMPTS = 5
_POLL_S = 0.05

# apt package that provides each binary; named in the failure message.
_APT_PACKAGE = {
    "nginx": "nginx",
    "redis-server": "redis-server",
    "redis-cli": "redis-tools",
    "curl": "curl",
    "openssl": "openssl",
}

# The body nginx answers on `location /`: what the server saw of the client.
NGINX_ECHO_BODY = (
    "client_dn=$ssl_client_s_dn serial=$ssl_client_serial verify=$ssl_client_verify "
    "proto=$server_protocol alpn=$ssl_alpn_protocol\\n"
)


class ServerStartError(RuntimeError):
    """A real server did not come up; the message carries its log."""


def require_binary(name: str) -> str:
    """Return the path of `name`, or fail the test saying which package to install."""
    path = shutil.which(name)
    if path is None:
        package = _APT_PACKAGE.get(name, name)
        pytest.fail(
            f"{name} not found: install it with apt-get install {package} (.ci/run does this)",
            pytrace=False,
        )
    return path


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on `host` a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_text(path: Path, offset: int = 0, limit: int = 20_000) -> str:
    """The text of `path` from byte `offset` on, at most its last `limit` bytes."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return ""
    if len(data) > limit:
        data = b"...\n" + data[-limit:]
    return data.decode(errors="replace")


def _pid_file_says(path: Path, pid: int) -> bool:
    return _read_text(path).strip() == str(pid)


def _log_says(path: Path, offset: int, text: str) -> bool:
    return text in _read_text(path, offset)


def wait_for_port(
    host: str,
    port: int,
    deadline_s: float = START_DEADLINE_S,
    proc: subprocess.Popen[bytes] | None = None,
    ready: Callable[[], bool] | None = None,
) -> None:
    """Wait until `host:port` accepts TCP connections (and `ready()`, if given, is true).

    `ready` tells our server from anything else that may hold the port (e.g. "the pid file
    is written"). Raises ServerStartError if `proc` exits first, TimeoutError after
    `deadline_s` seconds. Between attempts it waits on the process itself, so an exit is
    seen at once.
    """
    deadline = time.monotonic() + deadline_s
    last_error: str = "not tried yet"
    while True:
        if proc is not None and proc.poll() is not None:
            raise ServerStartError(
                f"process {proc.args!r} exited with {proc.returncode} before {host}:{port} was ready"
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{host}:{port} was not ready within {deadline_s:.1f} s (last check: {last_error})")
        if ready is not None and not ready():
            last_error = "the server has not said it is ready"
        else:
            try:
                with socket.create_connection((host, port), timeout=min(1.0, remaining)):
                    return
            except OSError as exc:
                last_error = f"connect: {exc}"
        pause = min(_POLL_S, max(0.0, deadline - time.monotonic()))
        if proc is not None:
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=pause)
        else:
            # Nothing to wait on but the clock: a bounded pause between connection attempts.
            time.sleep(pause)


def start_process(
    argv: list[str],
    log: Path,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
    header: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start a server with its output appended to `log` (after `header`, if given), in a session
    of its own so that `stop_process` can stop it with everything it started."""
    with log.open("ab") as out:
        if header is not None:
            out.write(header.encode())
            out.flush()
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            pass_fds=pass_fds,
            start_new_session=True,
        )


def stop_process(proc: subprocess.Popen[bytes], first_signal: int = signal.SIGTERM) -> None:
    """Signal, wait, then kill the whole process group (nginx workers included).

    The group is killed only while its leader is unreaped, so its id cannot have been reused.
    """
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            proc.send_signal(first_signal)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_DEADLINE_S)
    if proc.poll() is None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_DEADLINE_S)


def _is_address_in_use(text: str) -> bool:
    return "Address already in use" in text or "address already in use" in text


# --------------------------------------------------------------------------------------------
# nginx


@dataclass(frozen=True)
class NginxServer:
    host: str
    port: int
    workdir: Path
    error_log: Path
    access_log: Path
    data_dir: Path
    pid: int

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}/"

    def write_data_file(self, name: str, size: int) -> Path:
        """Write `size` deterministic bytes to data/NAME, served at /bytes/NAME."""
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"data file name must be a plain file name, got {name!r}")
        path = self.data_dir / name
        path.write_bytes(pattern_bytes(size))
        return path


def pattern_bytes(size: int) -> bytes:
    """`size` bytes that differ along the stream (so a dropped or repeated chunk shows)."""
    block = bytes(range(256)) * 16  # 4096 bytes
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += counter.to_bytes(8, "big") + block[8:]
        counter += 1
    return bytes(out[:size])


def _nginx_conf(
    workdir: Path,
    *,
    port: int,
    server_cert: Path,
    server_key: Path,
    client_ca: Path | None,
    verify_client: str,
    http2: bool,
    protocols: str | None = None,
) -> str:
    w = workdir
    listen = f"{LOOPBACK}:{port} ssl" + (" http2" if http2 else "")
    client_auth = ""
    if client_ca is not None:
        client_auth = (
            f"        ssl_client_certificate {client_ca};\n"
            f"        ssl_verify_client {verify_client};\n"
            "        ssl_verify_depth 3;\n"
        )
    if protocols is not None:  # nginx 1.22's default is TLSv1 TLSv1.1 TLSv1.2
        client_auth += f"        ssl_protocols {protocols};\n"
    # Workers would drop to `nobody` and then could not read pytest's 0700 tmp_path: as root,
    # keep them root. As another user nginx ignores `user` anyway, so leave it out.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""\
{user}daemon off;
master_process on;
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/error.log info;

events {{
    worker_connections 256;
}}

http {{
    default_type text/plain;
    access_log {w}/access.log;
    client_body_temp_path {w}/tmp/client_body;
    proxy_temp_path {w}/tmp/proxy;
    fastcgi_temp_path {w}/tmp/fastcgi;
    uwsgi_temp_path {w}/tmp/uwsgi;
    scgi_temp_path {w}/tmp/scgi;
    client_max_body_size 0;
    keepalive_timeout 30s;

    # /upload's body is buffered whole by the proxy module, then handed to this server,
    # which answers with the byte count it was given.
    server {{
        listen unix:{w}/upload.sock;
        location / {{
            return 200 "received=$http_content_length\\n";
        }}
    }}

    server {{
        listen {listen};
        server_name localhost;
        ssl_certificate {server_cert};
        ssl_certificate_key {server_key};
{client_auth}
        location / {{
            return 200 "{NGINX_ECHO_BODY}";
        }}
        location /bytes/ {{
            alias {w}/data/;
        }}
        location = /upload {{
            proxy_request_buffering on;
            proxy_http_version 1.1;
            proxy_pass http://unix:{w}/upload.sock:/;
        }}
    }}
}}
"""


@contextmanager
def nginx_mtls(
    workdir: Path,
    *,
    server_cert: Path,
    server_key: Path,
    client_ca: Path | None,
    verify_client: str = "on",
    http2: bool = False,
    port: int | None = None,
    protocols: str | None = None,
) -> Iterator[NginxServer]:
    """Run nginx with TLS (and client-certificate checks when `client_ca` is given).

    `server_cert` is a full chain (leaf first). Locations:
    - `/`            200 "client_dn=... serial=... verify=... proto=... alpn=...\\n"
    - `/bytes/NAME`  the file written by `NginxServer.write_data_file(NAME, size)`
    - `/upload`      reads the whole request body, answers "received=N\\n"
    With no client certificate (or an untrusted one) and `verify_client on`, nginx answers
    HTTP 400, it does not fail the handshake. `protocols`: its `ssl_protocols` (nginx 1.22
    speaks up to TLS 1.2 unless told "TLSv1.2 TLSv1.3").
    """
    nginx = require_binary("nginx")
    # nginx reads relative paths from its prefix (workdir): make every path absolute.
    workdir = workdir.resolve()
    server_cert, server_key = server_cert.resolve(), server_key.resolve()
    client_ca = client_ca.resolve() if client_ca is not None else None
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tmp").mkdir(exist_ok=True)
    data_dir = workdir / "data"
    data_dir.mkdir(exist_ok=True)
    sock_path = workdir / "upload.sock"
    if len(str(sock_path)) >= 100:
        raise ValueError(f"workdir too long for a unix socket path: {workdir}")
    error_log = workdir / "error.log"
    conf = workdir / "nginx.conf"
    stderr_path = workdir / "nginx.stderr"
    pid_file = workdir / "nginx.pid"

    attempts = 1 if port is not None else PORT_ATTEMPTS
    failures: list[str] = []
    for _attempt in range(attempts):
        chosen = port if port is not None else free_port()
        conf.write_text(
            _nginx_conf(
                workdir,
                port=chosen,
                server_cert=server_cert,
                server_key=server_key,
                client_ca=client_ca,
                verify_client=verify_client,
                http2=http2,
                protocols=protocols,
            )
        )
        sock_path.unlink(missing_ok=True)
        pid_file.unlink(missing_ok=True)
        log_offset = _file_size(error_log)
        with stderr_path.open("wb") as stderr_file:
            proc = subprocess.Popen(
                [nginx, "-p", str(workdir), "-c", str(conf), "-e", str(error_log)],
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=stderr_file,
                stderr=stderr_file,
                start_new_session=True,
            )
        try:
            try:
                # nginx writes its pid file only once every listening socket is bound.
                ready = partial(_pid_file_says, pid_file, proc.pid)
                wait_for_port(LOOPBACK, chosen, START_DEADLINE_S, proc, ready=ready)
            except (ServerStartError, TimeoutError) as exc:
                stop_process(proc)
                log = _read_text(error_log, log_offset) + _read_text(stderr_path)
                if port is None and _is_address_in_use(log):
                    failures.append(f"port {chosen}: address in use")
                    continue
                raise ServerStartError(
                    f"nginx did not start on {LOOPBACK}:{chosen}: {exc}\n--- {error_log} / stderr ---\n{log}"
                ) from exc
            server = NginxServer(
                host=LOOPBACK,
                port=chosen,
                workdir=workdir,
                error_log=error_log,
                access_log=workdir / "access.log",
                data_dir=data_dir,
                pid=proc.pid,
            )
            yield server
            return
        finally:
            stop_process(proc)
    raise ServerStartError(f"nginx: no free port after {attempts} attempts: {failures}")


# --------------------------------------------------------------------------------------------
# redis


@dataclass(frozen=True)
class RedisServer:
    host: str
    port: int
    workdir: Path
    log: Path
    pid: int


@contextmanager
def redis_tls(
    workdir: Path,
    *,
    server_cert: Path,
    server_key: Path,
    client_ca: Path,
    port: int | None = None,
) -> Iterator[RedisServer]:
    """Run redis-server with TLS only (no plaintext port) and client certificates required.

    Without a client certificate redis resets the connection during the handshake.
    """
    redis_server = require_binary("redis-server")
    # redis changes into --dir before it loads the certificates: make every path absolute.
    workdir = workdir.resolve()
    server_cert, server_key, client_ca = server_cert.resolve(), server_key.resolve(), client_ca.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "redis.log"
    attempts = 1 if port is not None else PORT_ATTEMPTS
    failures: list[str] = []
    for _attempt in range(attempts):
        chosen = port if port is not None else free_port()
        log_offset = _file_size(log)
        argv = [
            redis_server,
            "--port", "0",
            "--bind", LOOPBACK,
            "--tls-port", str(chosen),
            "--tls-cert-file", str(server_cert),
            "--tls-key-file", str(server_key),
            "--tls-ca-cert-file", str(client_ca),
            "--tls-auth-clients", "yes",
            "--dir", str(workdir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--protected-mode", "no",
        ]  # fmt: skip
        proc = start_process(argv, log, cwd=workdir)
        try:
            try:
                ready = partial(_log_says, log, log_offset, "Ready to accept connections")
                wait_for_port(LOOPBACK, chosen, START_DEADLINE_S, proc, ready=ready)
            except (ServerStartError, TimeoutError) as exc:
                stop_process(proc)
                text = _read_text(log, log_offset)
                if port is None and _is_address_in_use(text):
                    failures.append(f"port {chosen}: address in use")
                    continue
                raise ServerStartError(
                    f"redis-server did not start on {LOOPBACK}:{chosen}: {exc}\n--- {log} ---\n{text}"
                ) from exc
            yield RedisServer(host=LOOPBACK, port=chosen, workdir=workdir, log=log, pid=proc.pid)
            return
        finally:
            stop_process(proc)
    raise ServerStartError(f"redis-server: no free port after {attempts} attempts: {failures}")


# --------------------------------------------------------------------------------------------
# openssl s_server


@dataclass(frozen=True)
class OpenSSLServer:
    host: str
    port: int
    log: Path
    pid: int


@contextmanager
def openssl_s_server(
    workdir: Path,
    *,
    server_cert: Path,
    server_key: Path,
    client_ca: Path,
    tls: str | None = None,
    port: int | None = None,
) -> Iterator[OpenSSLServer]:
    """Run `openssl s_server -www` that requires a client certificate from `client_ca` and ends
    the handshake with an alert when it gets another (`-Verify 3 -verify_return_error`): the
    TLS-alert way of saying no, where nginx says it in HTTP. With TLS 1.3 the client sees the
    alert only after its side of the handshake. `tls`: "1.2" or "1.3" to speak only that.
    Its client CA list (what its CertificateRequest names) is `client_ca`'s subjects.
    """
    openssl = require_binary("openssl")
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "s_server.log"
    only = {"1.2": ["-tls1_2"], "1.3": ["-tls1_3"], None: []}[tls]
    attempts = 1 if port is not None else PORT_ATTEMPTS
    failures: list[str] = []
    for _attempt in range(attempts):
        chosen = port if port is not None else free_port()
        log_offset = _file_size(log)
        argv = [
            openssl, "s_server", "-accept", f"{LOOPBACK}:{chosen}", "-www",
            "-cert", str(server_cert.resolve()), "-key", str(server_key.resolve()),
            "-CAfile", str(client_ca.resolve()), "-Verify", "3", "-verify_return_error", *only,
        ]  # fmt: skip
        proc = start_process(argv, log, cwd=workdir)
        try:
            try:
                ready = partial(_log_says, log, log_offset, "ACCEPT")
                wait_for_port(LOOPBACK, chosen, START_DEADLINE_S, proc, ready=ready)
            except (ServerStartError, TimeoutError) as exc:
                stop_process(proc)
                text = _read_text(log, log_offset)
                if port is None and _is_address_in_use(text):
                    failures.append(f"port {chosen}: address in use")
                    continue
                raise ServerStartError(
                    f"openssl s_server did not start on {LOOPBACK}:{chosen}: {exc}\n--- {log} ---\n{text}"
                ) from exc
            yield OpenSSLServer(host=LOOPBACK, port=chosen, log=log, pid=proc.pid)
            return
        finally:
            stop_process(proc)
    raise ServerStartError(f"openssl s_server: no free port after {attempts} attempts: {failures}")
