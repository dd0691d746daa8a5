"""The protocol lines: pgbench through a `postgres` route, wrk through an `http` route.

    python3 -m bench --tests pg,http [--quick] [--reps N]

- **pg**: a PostgreSQL started here (initdb as the `postgres` user in a /tmp folder, TLS with
  the bench's server certificate, `hostssl all all 127.0.0.1/32 cert`, the client CA as
  `ssl_ca_file`, a role named after the client certificate's CN), `pgbench -i` once over the
  Unix socket, then `pgbench -S` three ways: through `mtls-sidecar tunnel --protocol postgres`
  and through stunnel `protocol = pgsql` (both `sslmode=disable`), and straight to the server
  with libpq's own TLS (`sslmode=verify-full`, the client certificate and key). Persistent
  connections, and again with `-C` (a new connection per transaction).
- **http**: nginx as the mTLS HTTP backend (a named virtual host `localhost` that answers a
  small fixed body, and a default site that answers 404), then wrk (HTTP/1.1 keep-alive)
  through `mtls-sidecar tunnel --protocol http` and through nginx as the same HTTP → mTLS
  proxy (`proxy_pass https://…`, client certificate, verification, `Host`, keep-alive
  upstream connections).

The config texts, command lines, output parsers and tables are pure (tests/test_bench_harness.py);
`run` below does the I/O.
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import json
import math
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import peers, pki, procs, stats

TESTS = ("pg", "http")
PG_CONTENDERS = ("mtls-sidecar", "stunnel", "direct")
HTTP_CONTENDERS = ("mtls-sidecar", "nginx")
PG_USER = "postgres"  # the OS user the server runs as (Debian's `postgresql` creates it)
ROLE = pki.CLIENT_CN  # `cert` authentication: the certificate's CN is the role
DATABASE = "bench"
PG_SCALE = 10
PG_CLIENTS = 8
PG_THREADS = 2
HTTP_THREADS = 2
HTTP_CONNECTIONS = 16
BODY = "mtls-sidecar bench: hello from the named site\n"
# Neither nginx closes a kept-alive connection during a run (its default is after 1,000 requests).
KEEPALIVE_REQUESTS = 1_000_000

# Outside programs per line, each with the Debian package that brings it.
PG_PACKAGES = {
    "/usr/lib/postgresql/*/bin/postgres": "postgresql",
    "/usr/lib/postgresql/*/bin/pgbench": "postgresql",
    "setpriv": "util-linux",
    "stunnel4": "stunnel4",
}
HTTP_PACKAGES = {"nginx": "nginx", "wrk": "wrk"}


def missing_programs(tests: set[str]) -> list[str]:
    """What the chosen protocol lines need and is not here, with its apt package."""
    needed: dict[str, str] = {}
    if "pg" in tests:
        needed.update(PG_PACKAGES)
    if "http" in tests:
        needed.update(HTTP_PACKAGES)
    missing = []
    for program, package in needed.items():
        found = glob.glob(program) if program.startswith("/") else shutil.which(program)
        if not found:
            missing.append(f"{program} (apt package {package})")
    if "pg" in tests:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            missing.append(f"the `{PG_USER}` user (apt package postgresql)")
    return missing


# --- pure: PostgreSQL ---------------------------------------------------------------------


def postgres_settings(folder: Path, port: int) -> str:
    """Lines appended to postgresql.conf: loopback only, TLS with the bench's certificates."""
    return "\n".join(
        [
            f"port = {port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{folder}'",
            "max_connections = 40",
            "shared_buffers = 256MB",  # scale 10 (~160 MB) stays in PostgreSQL's own cache
            "fsync = off",
            "synchronous_commit = off",
            "ssl = on",
            f"ssl_cert_file = '{folder}/server.crt'",
            f"ssl_key_file = '{folder}/server.key'",
            f"ssl_ca_file = '{folder}/client-ca.pem'",
            "",
        ]
    )


def postgres_hba() -> str:
    """The Unix socket is trusted (set-up only); TCP must be TLS with a client certificate."""
    return "local all all trust\nhostssl all all 127.0.0.1/32 cert\n"


def pgbench_command(pgbench: str, port: int, seconds: int, *, connect_each: bool, host: str = "127.0.0.1") -> list[str]:
    """Select-only, no vacuum before (the same table state for every contender)."""
    cmd = [pgbench, "-n", "-S", "-c", str(PG_CLIENTS), "-j", str(PG_THREADS), "-T", str(seconds)]
    cmd += ["-h", host, "-p", str(port), "-U", ROLE]
    if connect_each:
        cmd.append("-C")
    return [*cmd, DATABASE]


def pgbench_env(base: dict[str, str], files: peers.Files | None) -> dict[str, str]:
    """libpq's settings: `files` None → plaintext to a tunnel; else its own TLS, verify-full."""
    env = {k: v for k, v in base.items() if not k.startswith("PG")}
    if files is None:
        env["PGSSLMODE"] = "disable"
        return env
    env.update(
        PGSSLMODE="verify-full",
        PGSSLCERT=str(files.cert),
        PGSSLKEY=str(files.key),
        PGSSLROOTCERT=str(files.server_ca),
        PGHOSTADDR="127.0.0.1",  # with host=localhost: the name checked, the address used
    )
    return env


_NUMBER = r"([0-9]+(?:\.[0-9]+)?)"


def parse_pgbench(text: str) -> dict[str, float]:
    """tps, average latency and failed transactions from pgbench's report."""
    out: dict[str, float] = {}
    for key, pattern in (
        ("tps", rf"^tps = {_NUMBER}"),
        ("latency_ms", rf"^latency average = {_NUMBER} ms"),
        ("transactions", r"^number of transactions actually processed: ([0-9]+)"),
        ("failed", r"^number of failed transactions: ([0-9]+)"),
    ):
        match = re.search(pattern, text, re.MULTILINE)
        if match:
            out[key] = float(match.group(1))
    if "tps" not in out:
        raise ValueError(f"no tps in pgbench's output: {text.strip()[-400:]!r}")
    return out


# --- pure: HTTP ---------------------------------------------------------------------------


def _http_head(folder: Path, as_root: bool) -> list[str]:
    # As root nginx's workers would run as `nobody`, who cannot enter the bench's 0700 folder.
    return [*(["user root;"] if as_root else []), *peers.nginx_head(folder, "auto", stream=False)]


def nginx_http_backend_config(
    folder: Path, server_cert: Path, server_key: Path, client_ca: Path, listen: int, *, as_root: bool
) -> str:
    """The mTLS HTTP backend: a named virtual host `localhost` with a fixed body, a default site."""
    return "\n".join(
        [
            *_http_head(folder, as_root),
            "http {",
            "    access_log off;",
            f"    keepalive_requests {KEEPALIVE_REQUESTS};",
            f"    ssl_certificate {server_cert};",
            f"    ssl_certificate_key {server_key};",
            f"    ssl_client_certificate {client_ca};",
            "    ssl_verify_client on;",
            "    ssl_verify_depth 2;",
            "    ssl_protocols TLSv1.2 TLSv1.3;",
            "    ssl_session_cache shared:benchhttp:10m;",
            "    server {",
            f"        listen 127.0.0.1:{listen} ssl default_server reuseport backlog=4096;",
            "        server_name _;",
            '        return 404 "default site\\n";',
            "    }",
            "    server {",
            f"        listen 127.0.0.1:{listen} ssl;",
            f"        server_name {peers.SERVER_NAME};",
            "        default_type text/plain;",
            f"        location / {{ return 200 {json.dumps(BODY)}; }}",
            "    }",
            "}",
            "",
        ]
    )


def host_header(backend: int) -> str:
    """What both contenders send as `Host`: the target's name with its port (not 443)."""
    return f"{peers.SERVER_NAME}:{backend}"


def nginx_http_proxy_config(files: peers.Files, folder: Path, listen: int, backend: int, *, as_root: bool) -> str:
    """nginx as the same HTTP → mTLS proxy as an `http` route: plaintext HTTP/1.1 in, mTLS out."""
    return "\n".join(
        [
            *_http_head(folder, as_root),
            "http {",
            "    access_log off;",
            f"    keepalive_requests {KEEPALIVE_REQUESTS};",
            "    upstream backend {",
            f"        server 127.0.0.1:{backend};",
            "        keepalive 32;",
            f"        keepalive_requests {KEEPALIVE_REQUESTS};",
            "    }",
            "    server {",
            f"        listen 127.0.0.1:{listen} reuseport backlog=4096;",
            "        location / {",
            "            proxy_pass https://backend;",
            "            proxy_http_version 1.1;",
            '            proxy_set_header Connection "";',
            f"            proxy_set_header Host {host_header(backend)};",
            f"            proxy_ssl_certificate {files.cert};",
            f"            proxy_ssl_certificate_key {files.key};",
            f"            proxy_ssl_trusted_certificate {files.server_ca};",
            "            proxy_ssl_verify on;",
            "            proxy_ssl_verify_depth 2;",
            f"            proxy_ssl_name {peers.SERVER_NAME};",
            "            proxy_ssl_server_name on;",
            "            proxy_ssl_session_reuse on;",
            "        }",
            "    }",
            "}",
            "",
        ]
    )


def wrk_command(port: int, seconds: int) -> list[str]:
    """HTTP/1.1 with keep-alive (wrk's way), latency percentiles on."""
    return [
        "wrk",
        "-t",
        str(HTTP_THREADS),
        "-c",
        str(HTTP_CONNECTIONS),
        "-d",
        f"{seconds}s",
        "--latency",
        f"http://127.0.0.1:{port}/",
    ]


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def parse_wrk(text: str) -> dict[str, float]:
    """Requests/s, p50/p99 latency (ms), requests, non-2xx/3xx answers and socket errors."""
    match = re.search(rf"^Requests/sec:\s+{_NUMBER}", text, re.MULTILINE)
    if not match:
        raise ValueError(f"no Requests/sec in wrk's output: {text.strip()[-400:]!r}")
    out = {"req_per_s": float(match.group(1)), "non_2xx": 0.0, "errors": 0.0}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.0+)?%\s+{_NUMBER}(us|ms|s|m)\b", text, re.MULTILINE)
        if m:
            out[f"p{pct}_ms"] = float(m.group(1)) * _UNITS[m.group(2)]
    m = re.search(r"^\s*([0-9]+) requests in", text, re.MULTILINE)
    if m:
        out["requests"] = float(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+([0-9]+)", text)
    if m:
        out["non_2xx"] = float(m.group(1))
    m = re.search(r"Socket errors: connect ([0-9]+), read ([0-9]+), write ([0-9]+), timeout ([0-9]+)", text)
    if m:
        out["errors"] = float(sum(int(g) for g in m.groups()))
    return out


# --- pure: tables and ratios --------------------------------------------------------------

PG_LABELS = {
    "mtls-sidecar": "mtls-sidecar (`--protocol postgres`)",
    "stunnel": "stunnel (`protocol = pgsql`)",
    "direct": "direct (libpq's own TLS)",
}
HTTP_LABELS = {"mtls-sidecar": "mtls-sidecar (`--protocol http`)", "nginx": "nginx (HTTP → mTLS proxy)"}


def _cpu(c: dict[str, float] | None) -> str:
    if not c:
        return "–"
    return " / ".join("–" if math.isnan(c.get(k, math.nan)) else f"{c[k]:.0f}" for k in ("load", "tunnel", "server"))


def pg_table(rows: dict[str, dict[str, float]], cpu: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [
        "| pgbench -S | TPS | latency ms | CPU pgbench / tunnel / postgres % "
        "| TPS, -C | latency ms, -C | CPU -C pgbench / tunnel / postgres % |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in PG_CONTENDERS:
        if name not in rows:
            continue
        r, c = rows[name], cpu.get(name, {})
        cells = [
            stats.fmt(r.get("tps")),
            stats.fmt(r.get("latency_ms"), 3),
            _cpu(c.get("pg")),
            stats.fmt(r.get("tps_C")),
            stats.fmt(r.get("latency_C_ms"), 3),
            _cpu(c.get("pg_C")),
        ]
        lines.append(f"| {PG_LABELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def http_table(rows: dict[str, dict[str, float]], cpu: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [
        "| wrk, keep-alive | requests/s | p50 ms | p99 ms | non-2xx, errors | CPU wrk / tunnel / nginx backend % |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in HTTP_CONTENDERS:
        if name not in rows:
            continue
        r = rows[name]
        cells = [
            stats.fmt(r.get("req_per_s")),
            stats.fmt(r.get("p50_ms"), 2),
            stats.fmt(r.get("p99_ms"), 2),
            f"{stats.fmt(r.get('non_2xx'))}, {stats.fmt(r.get('errors'))}",
            _cpu(cpu.get(name, {}).get("http")),
        ]
        lines.append(f"| {HTTP_LABELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# (what, figure, other contender, line, goal as a least ratio or None)
RATIOS: list[tuple[str, str, str, str, float | None]] = [
    ("pgbench -S TPS, sidecar / stunnel", "tps", "stunnel", "pg", 1.0),
    ("pgbench -S TPS, sidecar / direct", "tps", "direct", "pg", None),
    ("pgbench -S -C TPS, sidecar / stunnel", "tps_C", "stunnel", "pg", None),
    ("pgbench -S -C TPS, sidecar / direct", "tps_C", "direct", "pg", None),
    ("wrk requests/s, sidecar / nginx", "req_per_s", "nginx", "http", 0.5),
]


def ratios(lines: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """The sidecar's median over the other's, with the issue's goal where it sets one."""
    out: list[dict[str, Any]] = []
    for what, key, other, line, goal in RATIOS:
        rows = lines.get(line, {})
        if not rows:
            continue  # the line did not run
        mine = rows.get("mtls-sidecar", {}).get(key, math.nan)
        theirs = rows.get(other, {}).get(key, math.nan)
        ratio = mine / theirs if theirs and not (math.isnan(mine) or math.isnan(theirs)) else math.nan
        met = None if goal is None or math.isnan(ratio) else ratio >= goal
        out.append({"what": what, "sidecar": mine, "other": theirs, "ratio": ratio, "goal": goal, "met": met})
    return out


def ratios_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| ratio | sidecar | other | ratio | goal | verdict |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if math.isnan(r["ratio"]):
            ratio, verdict = "–", "not measured"
        else:
            ratio = f"{r['ratio']:.2f}×"
            verdict = "–" if r["met"] is None else ("met" if r["met"] else "missed")
        goal = "–" if r["goal"] is None else f"≥ {r['goal']:.2f}×"
        lines.append(
            f"| {r['what']} | {stats.fmt(r['sidecar'])} | {stats.fmt(r['other'])} | {ratio} | {goal} | {verdict} |"
        )
    return "\n".join(lines)


# --- I/O ----------------------------------------------------------------------------------


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(f"{name} not found: apt-get install postgresql")
    return found[-1]


def _as_postgres(argv: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={PG_USER}", f"--regid={PG_USER}", "--init-groups", "--", *argv]


def _check(argv: list[str], timeout: float = 300, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} … failed ({done.returncode}): {(done.stdout + done.stderr)[-800:]}")
    return done.stdout


@dataclass(frozen=True)
class PgServer:
    folder: Path
    port: int
    pid: int


@contextlib.contextmanager
def postgres(server_cert: Path, server_key: Path, client_ca: Path) -> Iterator[PgServer]:
    """A PostgreSQL demanding client certificates, with pgbench's tables (scale PG_SCALE).

    It refuses to run as root, so its folder is a fresh one in /tmp owned by `postgres`.
    """
    folder = Path(tempfile.mkdtemp(prefix="mtls-bench-pg-", dir="/tmp"))
    try:
        os.chmod(folder, 0o755)
        for name, source in (("server.crt", server_cert), ("server.key", server_key), ("client-ca.pem", client_ca)):
            shutil.copyfile(source, folder / name)
        os.chmod(folder / "server.key", 0o600)
        for path in (folder, *folder.iterdir()):
            shutil.chown(path, PG_USER, PG_USER)
        data = folder / "data"
        _check(_as_postgres([_pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", PG_USER, "--no-sync"]))
        port = procs.free_port()
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(postgres_settings(folder, port))
        (data / "pg_hba.conf").write_text(postgres_hba())
        log = folder / "postgres.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                _as_postgres([_pg_bin("postgres"), "-D", str(data)]), stdout=out, stderr=out, stdin=subprocess.DEVNULL
            )
        try:
            procs.wait_port(port, proc, timeout=60)
            psql = [_pg_bin("psql"), "-h", str(folder), "-p", str(port), "-U", PG_USER, "-v", "ON_ERROR_STOP=1"]
            _check([*psql, "-c", f'create role "{ROLE}" login'])
            _check([*psql, "-c", f'create database {DATABASE} owner "{ROLE}"'])
            pgbench = _pg_bin("pgbench")
            # As the role itself, so that it owns the tables; over the (trusted) Unix socket.
            _check([pgbench, "-i", "-q", "-s", str(PG_SCALE), "-h", str(folder), "-p", str(port), "-U", ROLE, DATABASE])
            # Warm PostgreSQL's and the kernel's caches before anyone is measured.
            _check(pgbench_command(pgbench, port, 3, connect_each=False, host=str(folder)))
            yield PgServer(folder, port, proc.pid)
        finally:
            proc.send_signal(signal.SIGINT)  # PostgreSQL's "fast" shutdown
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _timed(cmd: list[str], env: dict[str, str], tunnel: list[int], server: list[int]) -> tuple[str, dict[str, float]]:
    """Run a load program; its CPU (from wait4), and the tunnel's and server's over its wall time."""
    t0, s0 = procs.cpu_seconds(_trees(tunnel)), procs.cpu_seconds(_trees(server))
    t_seen = set(_trees(tunnel))
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        time.sleep(0.3)  # server processes of closed connections exit and are reaped (their CPU joins the parent's)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}: {text.strip()[-600:]}")
    cpu = {
        "load": 100 * (usage.ru_utime + usage.ru_stime) / wall,
        "tunnel": 100 * (procs.cpu_seconds(sorted(t_seen | set(_trees(tunnel)))) - t0) / wall if tunnel else math.nan,
        "server": 100 * (procs.cpu_seconds(_trees(server)) - s0) / wall,
    }
    return text, cpu


def _trees(pids: list[int]) -> list[int]:
    return [p for pid in pids for p in procs.tree(pid)]


@contextlib.contextmanager
def _tunnel(cmd: list[str] | None, port: int, log: Path, env: dict[str, str]) -> Iterator[list[int]]:
    if cmd is None:
        yield []
        return
    with procs.process(cmd, port, log, env) as proc:
        time.sleep(0.2)
        yield [proc.pid]


class Runner:
    def __init__(self, args: Any, files: peers.Files, folder: Path) -> None:
        self.args = args
        self.files = files
        self.folder = folder
        self.sidecar_args = tuple(args.sidecar_arg)
        self.sidecar_env = {**os.environ, "MTLS_SIDECAR_HOME": str(folder / "sidecar-home")}
        for item in args.sidecar_env:
            key, _, value = item.partition("=")
            self.sidecar_env[key] = value

    def _command(self, name: str, listen: int, target: int, protocol: str) -> list[str] | None:
        if name == "mtls-sidecar":
            return peers.sidecar_command(self.files, listen, target, ("--protocol", protocol, *self.sidecar_args))
        if name == "stunnel":
            path = self.folder / "stunnel-pgsql.conf"
            path.write_text(peers.stunnel_config(self.files, listen, target, protocol="pgsql"))
            return ["stunnel4", str(path)]
        if name == "nginx":
            sub = self.folder / "nginx-proxy"
            sub.mkdir(exist_ok=True)
            path = sub / "nginx.conf"
            as_root = os.geteuid() == 0
            path.write_text(nginx_http_proxy_config(self.files, sub, listen, target, as_root=as_root))
            return ["nginx", "-p", str(sub), "-c", str(path), "-e", str(sub / "error.log")]
        return None  # direct

    def pg(self, name: str, server: PgServer) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        seconds = self.args.pg_seconds
        pgbench = _pg_bin("pgbench")
        listen = procs.free_port()
        cmd = self._command(name, listen, server.port, "postgres")
        env = self.sidecar_env if name == "mtls-sidecar" else dict(os.environ)
        figures: dict[str, float] = {}
        cpu: dict[str, dict[str, float]] = {}
        with _tunnel(cmd, listen, self.folder / f"pg-{name}.log", env) as tunnel:
            if name == "direct":
                port, host, lib_env = server.port, peers.SERVER_NAME, pgbench_env(dict(os.environ), self.files)
            else:
                port, host, lib_env = listen, "127.0.0.1", pgbench_env(dict(os.environ), None)
            for suffix, each in (("", False), ("_C", True)):
                command = pgbench_command(pgbench, port, seconds, connect_each=each, host=host)
                text, cpu[f"pg{suffix}"] = _timed(command, lib_env, tunnel, [server.pid])
                got = parse_pgbench(text)
                figures[f"tps{suffix}"] = got["tps"]
                figures[f"latency{suffix}_ms"] = got.get("latency_ms", math.nan)
                figures[f"failed{suffix}"] = got.get("failed", 0.0)
        return figures, cpu

    def http(self, name: str, backend: int, backend_pid: int) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        listen = procs.free_port()
        cmd = self._command(name, listen, backend, "http")
        env = self.sidecar_env if name == "mtls-sidecar" else dict(os.environ)
        with _tunnel(cmd, listen, self.folder / f"http-{name}.log", env) as tunnel:
            check_answer(listen)
            text, cpu = _timed(wrk_command(listen, self.args.http_seconds), dict(os.environ), tunnel, [backend_pid])
        return parse_wrk(text), {"http": cpu}


def check_answer(port: int) -> None:
    """Before timing: the named site's body comes back (the Host reached the backend right)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
    finally:
        conn.close()
    if resp.status != 200 or body != BODY:
        raise RuntimeError(f"GET / answered {resp.status} {body[:200]!r}, not the named site's body")


def _order(names: Sequence[str], rep: int) -> list[str]:
    shift = rep % len(names) if names else 0
    return [*names[shift:], *names[:shift]]


def run(args: Any, files: peers.Files, server_cert: Path, server_key: Path, client_ca: Path) -> dict[str, Any]:
    """Every chosen protocol line, `args.reps` times (order rotated), medians and ratios."""
    folder = files.folder / "protocols"
    folder.mkdir(exist_ok=True)
    runner = Runner(args, files, folder)
    wanted = set(args.contenders) if args.only else None
    names = {
        "pg": [n for n in PG_CONTENDERS if wanted is None or n in wanted],
        "http": [n for n in HTTP_CONTENDERS if wanted is None or n in wanted],
    }
    raw: dict[str, dict[str, list[dict[str, float]]]] = {line: {n: [] for n in names[line]} for line in TESTS}
    cpu_raw: dict[str, dict[str, list[dict[str, dict[str, float]]]]] = {
        line: {n: [] for n in names[line]} for line in TESTS
    }
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(postgres(server_cert, server_key, client_ca)) if "pg" in args.tests else None
        http_port, http_pid = 0, 0
        if "http" in args.tests:
            sub = folder / "nginx-backend"
            sub.mkdir()
            http_port = procs.free_port()
            conf = sub / "nginx.conf"
            text = nginx_http_backend_config(
                sub, server_cert, server_key, client_ca, http_port, as_root=os.geteuid() == 0
            )
            conf.write_text(text)
            backend = stack.enter_context(
                procs.process(
                    ["nginx", "-p", str(sub), "-c", str(conf), "-e", str(sub / "error.log")],
                    http_port,
                    sub / "nginx.log",
                )
            )
            http_pid = backend.pid
        for rep in range(args.reps):
            for line in TESTS:
                if line not in args.tests:
                    continue
                for name in _order(names[line], rep):
                    print(f"rep {rep + 1}/{args.reps}: {line} {name} …", file=sys.stderr, flush=True)
                    try:
                        if line == "pg":
                            assert pg is not None
                            figures, cpu = runner.pg(name, pg)
                        else:
                            figures, cpu = runner.http(name, http_port, http_pid)
                    except Exception as exc:
                        print(f"  {name} failed: {exc}", file=sys.stderr)
                        figures, cpu = {"failed_run": 1.0}, {}
                    print(f"  {json.dumps({k: round(v, 2) for k, v in figures.items()})}", file=sys.stderr)
                    raw[line][name].append(figures)
                    cpu_raw[line][name].append(cpu)
    medians = {line: {n: stats.summarise(reps) for n, reps in raw[line].items() if reps} for line in TESTS}
    cpu_medians = {
        line: {
            n: {t: stats.summarise([r[t] for r in reps if t in r]) for t in {t for r in reps for t in r}}
            for n, reps in cpu_raw[line].items()
        }
        for line in TESTS
    }
    return {
        "settings": {
            "pg_seconds": args.pg_seconds,
            "pg_scale": PG_SCALE,
            "pg_clients": PG_CLIENTS,
            "pg_threads": PG_THREADS,
            "http_seconds": args.http_seconds,
            "http_threads": HTTP_THREADS,
            "http_connections": HTTP_CONNECTIONS,
        },
        "medians": medians,
        "cpu_percent_medians": cpu_medians,
        "ratios": ratios(medians),
        "raw": raw,
        "cpu_raw": cpu_raw,
    }


def tables(result: dict[str, Any], reps: int) -> str:
    s = result["settings"]
    parts = []
    if result["medians"].get("pg"):
        parts += [
            f"pgbench -S, scale {s['pg_scale']}, {s['pg_clients']} clients, {s['pg_threads']} threads, "
            f"{s['pg_seconds']} s each; medians of {reps}:",
            "",
            pg_table(result["medians"]["pg"], result["cpu_percent_medians"]["pg"]),
            "",
        ]
    if result["medians"].get("http"):
        parts += [
            f"wrk, {s['http_threads']} threads, {s['http_connections']} keep-alive connections, "
            f"{s['http_seconds']} s each; medians of {reps}:",
            "",
            http_table(result["medians"]["http"], result["cpu_percent_medians"]["http"]),
            "",
        ]
    parts.append(ratios_table(result["ratios"]))
    return "\n".join(parts)
