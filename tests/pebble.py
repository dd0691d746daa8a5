"""A real ACME server for tests: Debian's `pebble`, started from a folder the test owns.

Pebble listens on 127.0.0.1 only, over HTTPS with a listener certificate made here (Debian
ships none), and keeps all state in memory: every start is a fresh CA with a **new root**,
so fetch `roots_pem()` after each start. With `PEBBLE_VA_ALWAYS_VALID=1` it still needs the
client to *answer* a challenge, but does not connect back to check it; `always_valid=False`
makes its validation authority really fetch http-01 answers from `127.0.0.1:http_port`
(only for IP identifiers: DNS lookups go to a resolver that does not exist).

A missing `pebble` binary fails the test (with what to install) rather than skipping it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.pki import CA, key_pem
from tests.realservers import start_process, stop_process
from tests.waiting import wait_until

LOOPBACK = "127.0.0.1"
START_DEADLINE_S = 15.0
# Below Linux's ephemeral range here (32768-60999), so no outgoing connection can hold them.
_PORT_RANGE = (20000, 32767)
_PORT_ATTEMPTS = 50
_LOG_TAIL = 4000


class PebbleError(RuntimeError):
    """Pebble did not come up; the message carries its output."""


def require_pebble() -> str:
    path = shutil.which("pebble")
    if path is None:
        pytest.fail(
            "pebble not found: install Debian's ACME test server with apt-get install pebble (.ci/run does this)",
            pytrace=False,
        )
    return path


def pick_port(exclude: set[int] | None = None) -> int:
    """A loopback TCP port below the ephemeral range that is free right now."""
    taken = exclude or set()
    rng = random.Random()
    for _ in range(_PORT_ATTEMPTS):
        port = rng.randint(*_PORT_RANGE)
        if port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PORT_RANGE} after {_PORT_ATTEMPTS} tries")


@dataclass
class Pebble:
    workdir: Path
    port: int
    mgmt_port: int
    http_port: int
    validity_seconds: int
    always_valid: bool
    listener_ca_file: Path
    config_file: Path
    log_file: Path
    binary: str
    starts: int = 0
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def directory_url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}/dir"

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.listener_ca_file))

    def _get(self, url: str, timeout: float = 5.0) -> bytes:
        with urllib.request.urlopen(url, timeout=timeout, context=self._context()) as response:
            body: bytes = response.read()
            return body

    def roots_pem(self) -> bytes:
        """Pebble's current root and intermediate (PEM): what a server should trust for its leaves."""
        base = f"https://{LOOPBACK}:{self.mgmt_port}"
        root = self._get(f"{base}/roots/0").strip() + b"\n"
        intermediate = self._get(f"{base}/intermediates/0").strip() + b"\n"
        return root + intermediate

    def log_tail(self) -> str:
        try:
            data = self.log_file.read_bytes()
        except FileNotFoundError:
            return ""
        return data[-_LOG_TAIL:].decode(errors="replace")

    def start(self) -> None:
        """Start (or restart, on the same ports) and wait until the directory answers."""
        if self.is_running:
            return
        env = {
            **os.environ,
            "PEBBLE_VA_NOSLEEP": "1",
            "PEBBLE_WFE_NONCEREJECT": "0",
        }
        if self.always_valid:
            env["PEBBLE_VA_ALWAYS_VALID"] = "1"
        else:
            env.pop("PEBBLE_VA_ALWAYS_VALID", None)
        self.starts += 1
        self._proc = start_process(
            [self.binary, "-config", str(self.config_file), "-dnsserver", f"{LOOPBACK}:1"],
            self.log_file,
            cwd=self.workdir,
            env=env,
            header=f"--- start {self.starts}\n",
        )
        try:
            wait_until(self._directory_answers, timeout=START_DEADLINE_S, what=f"pebble at {self.directory_url}")
        except BaseException:
            self.stop()
            raise

    def _directory_answers(self) -> bool:
        proc = self._proc
        assert proc is not None
        if proc.poll() is not None:
            raise PebbleError(f"pebble exited with status {proc.returncode} before answering:\n{self.log_tail()}")
        try:
            directory = json.loads(self._get(self.directory_url, timeout=1.0))
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return "newOrder" in directory

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stop_process(proc)


def _write_listener_certificate(workdir: Path) -> tuple[Path, Path, Path]:
    """Our own small CA and a 127.0.0.1/localhost certificate for pebble's HTTPS listeners."""
    ca = CA("pebble listener test CA")
    leaf = ca.server(LOOPBACK, "localhost")
    ca_file = ca.write_root(workdir / "listener-ca.pem")
    cert_file = workdir / "listener-cert.pem"
    key_file = workdir / "listener-key.pem"
    cert_file.write_bytes(leaf.chain_pem())
    key_file.write_bytes(key_pem(leaf.key))
    key_file.chmod(0o600)
    return ca_file, cert_file, key_file


@contextmanager
def pebble_server(
    workdir: Path,
    *,
    validity_seconds: int = 120,
    port: int | None = None,
    mgmt_port: int | None = None,
    http_port: int | None = None,
    always_valid: bool = True,
) -> Iterator[Pebble]:
    """Run pebble for the duration of the `with` block; stopped (killed if need be) on exit."""
    binary = require_pebble()
    workdir.mkdir(parents=True, exist_ok=True)
    ca_file, cert_file, key_file = _write_listener_certificate(workdir)
    used: set[int] = set()
    ports = []
    for wanted in (port, mgmt_port, http_port):
        chosen = wanted if wanted is not None else pick_port(used)
        used.add(chosen)
        ports.append(chosen)
    acme_port, management_port, challenge_port = ports
    config = {
        "pebble": {
            "listenAddress": f"{LOOPBACK}:{acme_port}",
            "managementListenAddress": f"{LOOPBACK}:{management_port}",
            "certificate": str(cert_file),
            "privateKey": str(key_file),
            "httpPort": challenge_port,
            "tlsPort": pick_port(used | {challenge_port}),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
            "certificateValidityPeriod": validity_seconds,
        }
    }
    config_file = workdir / "pebble-config.json"
    config_file.write_text(json.dumps(config, indent=2))
    server = Pebble(
        workdir=workdir,
        port=acme_port,
        mgmt_port=management_port,
        http_port=challenge_port,
        validity_seconds=validity_seconds,
        always_valid=always_valid,
        listener_ca_file=ca_file,
        config_file=config_file,
        log_file=workdir / "pebble.log",
        binary=binary,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
