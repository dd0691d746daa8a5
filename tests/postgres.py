"""A real PostgreSQL (Debian's `postgresql`) that requires client certificates, started by tests.

PostgreSQL refuses to run as root, so its folder is a fresh one under /tmp owned by the
`postgres` user, and every server tool runs as that user (setpriv). The server runs in the
foreground (`postgres -D`), listens on 127.0.0.1 only, wants TLS with a client certificate
for TCP (`hostssl all all 127.0.0.1/32 cert`: the certificate's CN is the role), and trusts
its Unix socket for set-up. A missing binary fails the test with the package to install.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.realservers import START_DEADLINE_S, free_port, start_process, stop_process

PG_USER = "postgres"


@dataclass(frozen=True)
class Postgres:
    folder: Path
    port: int
    log: Path

    def psql_admin(self, sql: str) -> str:
        """Run SQL as the superuser over the Unix socket (trusted); returns psql's output."""
        done = run_as_postgres(
            [_binary("psql"), "-h", str(self.folder), "-p", str(self.port), "-U", PG_USER, "-At", "-c", sql], timeout=30
        )
        return done.stdout.strip()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        pytest.fail(
            "PostgreSQL not found: install it with apt-get install postgresql (.ci/run does this)", pytrace=False
        )
    return Path(found[-1]).parent


def _binary(name: str) -> str:
    path = _bindir() / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install postgresql-client", pytrace=False)
    return found


def _as_postgres() -> list[str]:
    return ["setpriv", f"--reuid={PG_USER}", f"--regid={PG_USER}", "--init-groups", "--"]


def run_as_postgres(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*_as_postgres(), *argv], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{argv[0]} failed ({done.returncode}): {done.stdout}{done.stderr}")
    return done


@contextmanager
def postgres_mtls(*, server_cert: Path, server_key: Path, client_ca: Path, ssl: bool = True) -> Iterator[Postgres]:
    """A PostgreSQL server on 127.0.0.1 demanding client certificates (or, ssl=False, no TLS at all)."""
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        pytest.fail("no `postgres` user: install it with apt-get install postgresql", pytrace=False)
    folder = Path(tempfile.mkdtemp(prefix="mtls-sidecar-pg-", dir="/tmp"))
    try:
        os.chmod(folder, 0o755)
        for name, source in (("server.crt", server_cert), ("server.key", server_key), ("client-ca.pem", client_ca)):
            shutil.copyfile(source, folder / name)
        os.chmod(folder / "server.key", 0o600)
        shutil.chown(folder, PG_USER, PG_USER)
        for name in ("server.crt", "server.key", "client-ca.pem"):
            shutil.chown(folder / name, PG_USER, PG_USER)
        data = folder / "data"
        run_as_postgres([_binary("initdb"), "-D", str(data), "-A", "trust", "-U", PG_USER, "--no-sync"], timeout=120)
        port = free_port()
        settings = [
            f"port = {port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{folder}'",
            "fsync = off",
            "max_connections = 30",
        ]
        if ssl:
            settings += [
                "ssl = on",
                f"ssl_cert_file = '{folder}/server.crt'",
                f"ssl_key_file = '{folder}/server.key'",
                f"ssl_ca_file = '{folder}/client-ca.pem'",
            ]
        with (data / "postgresql.conf").open("a") as conf:
            conf.write("\n".join(settings) + "\n")
        hba = "local all all trust\n"
        hba += "hostssl all all 127.0.0.1/32 cert\n" if ssl else "host all all 127.0.0.1/32 trust\n"
        (data / "pg_hba.conf").write_text(hba)
        log = folder / "postgres.log"
        log.touch()
        shutil.chown(log, PG_USER, PG_USER)
        proc = start_process([*_as_postgres(), _binary("postgres"), "-D", str(data)], log)
        try:
            server = Postgres(folder, port, log)
            _wait_ready(server, proc)
            yield server
        finally:
            stop_process(proc, first_signal=2)  # SIGINT: PostgreSQL's "fast" shutdown
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _wait_ready(server: Postgres, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_DEADLINE_S * 3
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"postgres exited with {proc.returncode}:\n{server.log_text()}")
        done = subprocess.run(
            [*_as_postgres(), _binary("pg_isready"), "-h", str(server.folder), "-p", str(server.port), "-q"],
            capture_output=True,
            timeout=10,
        )
        if done.returncode == 0:
            return
        time.sleep(0.1)  # a poll against the deadline
    raise AssertionError(f"postgres did not get ready within {START_DEADLINE_S * 3:g}s:\n{server.log_text()}")
