"""A real MariaDB (Debian's `mariadb-server`) that requires client certificates, started by tests.

The server's folder is a fresh one under /tmp owned by the `mysql` user (pytest's own temp
folders are private to root), and `mariadbd --user=mysql` drops to that user. It listens on
127.0.0.1 only, with the test PKI's server certificate and the client CA as `--ssl-ca`
(or, ssl=False, with no TLS at all); its Unix socket is for set-up as root. Users are made by
the caller with `sql()`. A missing binary fails the test with the package to install.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from tests.realservers import START_DEADLINE_S, free_port, start_process, stop_process, wait_for_port

DB_USER = "mysql"
PORT_ATTEMPTS = 3


@dataclass(frozen=True)
class MariaDB:
    folder: Path
    port: int
    log: Path

    @property
    def socket(self) -> Path:
        return self.folder / "mariadb.sock"

    def sql(self, statements: str) -> str:
        """Run SQL as root over the Unix socket; returns the client's tab-separated output."""
        done = subprocess.run(
            [binary("mariadb"), "--no-defaults", "-S", str(self.socket), "-uroot", "-N", "-B", "-e", statements],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode != 0:
            raise AssertionError(f"mariadb -e {statements!r} failed ({done.returncode}): {done.stderr}")
        return done.stdout.strip()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


_PACKAGE = {"mariadbd": "mariadb-server", "mariadb-install-db": "mariadb-server", "mariadb": "mariadb-client"}


def binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        package = _PACKAGE.get(name, name)
        pytest.fail(f"{name} not found: install it with apt-get install {package} (.ci/run does this)", pytrace=False)
    return path


@contextmanager
def mariadb_mtls(*, server_cert: Path, server_key: Path, client_ca: Path, ssl: bool = True) -> Iterator[MariaDB]:
    """A MariaDB server on 127.0.0.1 that offers TLS and checks client certificates against
    `client_ca` (users say what they require), or, ssl=False, one without TLS."""
    try:
        pwd.getpwnam(DB_USER)
    except KeyError:
        pytest.fail("no `mysql` user: install it with apt-get install mariadb-server", pytrace=False)
    folder = Path(tempfile.mkdtemp(prefix="mtls-sidecar-mariadb-", dir="/tmp"))
    try:
        os.chmod(folder, 0o755)
        for name, source in (("server.crt", server_cert), ("server.key", server_key), ("client-ca.pem", client_ca)):
            shutil.copyfile(source, folder / name)
        os.chmod(folder / "server.key", 0o600)
        for path in (folder, folder / "server.crt", folder / "server.key", folder / "client-ca.pem"):
            shutil.chown(path, DB_USER, DB_USER)
        data = folder / "data"
        install = subprocess.run(
            [
                binary("mariadb-install-db"), "--no-defaults", f"--user={DB_USER}", f"--datadir={data}",
                "--auth-root-authentication-method=normal", "--skip-test-db",
            ],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if install.returncode != 0:
            raise AssertionError(f"mariadb-install-db failed ({install.returncode}): {install.stdout}{install.stderr}")
        log = folder / "error.log"
        tls = (
            [f"--ssl-cert={folder}/server.crt", f"--ssl-key={folder}/server.key", f"--ssl-ca={folder}/client-ca.pem"]
            if ssl
            else ["--skip-ssl"]
        )
        for attempt in range(PORT_ATTEMPTS):
            port = free_port()
            offset = log.stat().st_size if log.exists() else 0
            argv = [
                binary("mariadbd"), "--no-defaults", f"--user={DB_USER}", f"--datadir={data}", f"--port={port}",
                "--bind-address=127.0.0.1", f"--socket={folder}/mariadb.sock", f"--pid-file={folder}/mariadb.pid",
                f"--log-error={log}", "--skip-name-resolve", "--plugin-load-add=auth_ed25519",
                "--innodb-buffer-pool-size=16M", "--innodb-log-file-size=8M", "--innodb-flush-log-at-trx-commit=0",
                "--skip-log-bin", *tls,
            ]  # fmt: skip
            proc = start_process(argv, folder / "stdout.log")
            server = MariaDB(folder, port, log)
            try:
                wait_for_port(
                    "127.0.0.1",
                    port,
                    deadline_s=START_DEADLINE_S * 3,
                    proc=proc,
                    ready=partial(_says, log, offset, "ready for connections"),
                )
            except Exception as exc:
                stop_process(proc)
                text = _text_from(log, offset)
                if "Address already in use" in text and attempt + 1 < PORT_ATTEMPTS:
                    continue  # another process took the port between free_port() and the bind
                raise AssertionError(f"mariadbd did not start: {exc}\n{text}") from exc
            try:
                server.sql("DELETE FROM mysql.global_priv WHERE User = ''; FLUSH PRIVILEGES;")
                yield server
            finally:
                stop_process(proc)
            return
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _says(path: Path, offset: int, text: str) -> bool:
    return text in _text_from(path, offset)


def _text_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
