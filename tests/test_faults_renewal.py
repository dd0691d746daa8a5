"""Renewal that cannot finish: the CA is down, the disk is full, the keystore is read-only.

For each fault, with a real nginx behind a route:
- the renewal state says `failing`, and `renewal.last_error` says why in words;
- the current certificate keeps serving (curl through the route, nginx names its serial);
- nothing in the keystore is lost, truncated or left behind (every file's bytes compared);
- once the fault is gone, "renew now" succeeds and the new certificate is used.

The faults are made so that they also work in CI containers, which run as root without the
right to mount: "disk full" is RLIMIT_FSIZE on a daemon subprocess (writes past 1 KiB fail
with EFBIG, as they fail with ENOSPC on a full disk); "read-only" is chmod 0500 with the
daemon started by `setpriv` without CAP_DAC_OVERRIDE, so that root obeys the permission bits
(root otherwise writes anywhere). The ACME server being down is tested in test_e2e_acme.py;
here the CA behind a `command` provider is down.
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sidecar.control.client import ControlClient, DaemonNotRunning
from sidecar.devca import DevCA, ca_paths, load_or_create_ca, write_credential
from sidecar.paths import resolve_places
from sidecar.renewal import store
from tests.daemon_runner import DaemonThread
from tests.realservers import NginxServer, nginx_mtls
from tests.scenario import Pki, curl, route_to, write_config
from tests.test_e2e_renewal import nginx_serial
from tests.waiting import wait_until

FSIZE_LIMIT = 1024  # bytes; a credential bundle from the dev CA is about 1.6 KiB

# A company's renewal script, in short: ask the CA over HTTP, write what it answers.
CA_CLIENT = """
import json, sys, urllib.error, urllib.request, os
url = sys.argv[1]
try:
    with urllib.request.urlopen(url, timeout=5) as answer:
        issued = json.load(answer)
except (urllib.error.URLError, OSError) as exc:
    sys.exit(f"cannot reach the CA at {url}: {getattr(exc, 'reason', exc)}")
with open(os.environ["MTLS_SIDECAR_OUT_CERT"], "w") as out:
    out.write(issued["cert"])
with open(os.environ["MTLS_SIDECAR_OUT_KEY"], "w") as out:
    out.write(issued["key"])
"""


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) → SHA-256 of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def renewal_of(status: dict[str, Any]) -> dict[str, Any]:
    renewal: dict[str, Any] = status["identities"]["dev"]["renewal"]
    return renewal


def serial_of(status: dict[str, Any]) -> int:
    return int(status["identities"]["dev"]["selected"]["serial"], 16)


class Setup:
    """The dev CA, one enrolled credential, nginx trusting the dev CA, config with route `api`."""

    def __init__(self, home: Path, tmp: Path, nginx: NginxServer, pki: Pki, ca: DevCA) -> None:
        self.home, self.tmp, self.nginx, self.pki, self.ca = home, tmp, nginx, pki, ca
        self.places = resolve_places()
        self.keystore = self.places.keystore
        self.folder = self.keystore / "dev"

    def config(self, identity: dict[str, Any]) -> Path:
        return write_config(
            self.home / "config.toml",
            identities={"dev": {"lifetime": "1h", **identity}},
            routes={"api": route_to(self.pki, self.nginx.port)},
        )


@pytest.fixture
def setup(isolated_home: Path, tmp_path: Path) -> Iterator[Setup]:
    places = resolve_places()
    now = datetime.now(UTC)
    ca = load_or_create_ca(places.ca, now)  # made here, so that the daemon writes nothing but renewals
    write_credential(places.keystore / "dev", ca.issue_client("CN=dev", timedelta(hours=1), now), now)
    pki = Pki.create(tmp_path / "pki")
    with nginx_mtls(
        tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=ca_paths(places.ca)[0]
    ) as nginx:
        yield Setup(isolated_home, tmp_path, nginx, pki, ca)


@contextmanager
def daemon_process(
    setup: Setup, *, wrapper: Sequence[str] = ()
) -> Iterator[tuple[subprocess.Popen[bytes], ControlClient]]:
    """`mtls-sidecar run` as a child process (faults are set on a process), and its control client."""
    stderr = (setup.tmp / "daemon.stderr").open("wb")
    proc = subprocess.Popen(
        [*wrapper, sys.executable, "-m", "sidecar", "run", "--log-level", "info"],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    client = ControlClient(setup.places.control_socket, timeout=10)

    def up() -> bool:
        assert proc.poll() is None, f"the daemon exited: {(setup.tmp / 'daemon.stderr').read_text()[-2000:]}"
        try:
            return client.get("/v1/status")["routes"]["api"]["state"] == "up"
        except (DaemonNotRunning, OSError):
            return False

    try:
        wait_until(up, timeout=30, what="the daemon to serve route api")
        yield proc, client
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        stderr.close()


def port_of(client: ControlClient) -> int:
    return int(client.get("/v1/status")["routes"]["api"]["listen"].rsplit(":", 1)[1])


def renew_and_wait(client: ControlClient, state: str) -> dict[str, Any]:
    client.post("/v1/identities/dev/renew")
    seen: list[dict[str, Any]] = []

    def settled() -> dict[str, Any] | None:
        status: dict[str, Any] = client.get("/v1/status")
        seen[:] = [renewal_of(status)]
        return status if renewal_of(status)["state"] == state else None

    try:
        return wait_until(settled, timeout=30, what=f"renewal state {state!r}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; renewal is {seen}") from None


def check_fault_then_recovery(
    setup: Setup,
    client: ControlClient,
    expected_error: tuple[str, ...],
    inject_fault: Callable[[], None],
    remove_fault: Callable[[], None],
) -> str:
    """The common part: serve; fault; fail, keep serving, lose nothing; recover.

    Returns last_error while failing."""
    before = client.get("/v1/status")
    assert renewal_of(before)["state"] == "valid", renewal_of(before)
    old = serial_of(before)
    files = snapshot(setup.keystore)
    assert nginx_serial(curl(port_of(client)).stdout) == old
    inject_fault()

    failing = renew_and_wait(client, "failing")
    error = renewal_of(failing)["last_error"]
    assert error is not None and all(words in error for words in expected_error), error
    assert renewal_of(failing)["consecutive_failures"] >= 1
    assert serial_of(failing) == old
    result = curl(port_of(client))
    assert nginx_serial(result.stdout) == old, result  # the current certificate keeps serving
    assert snapshot(setup.keystore) == files, "the keystore changed while renewal failed"

    remove_fault()
    valid = renew_and_wait(client, "valid")
    new = serial_of(valid)
    assert new != old and renewal_of(valid)["last_error"] is None
    assert nginx_serial(curl(port_of(client)).stdout) == new
    after = snapshot(setup.keystore)
    assert {name: after.get(name) for name in files} == files, "a file from before the fault was lost or changed"
    assert len(after) == len(files) + 1  # the new credential
    print(f"\nserial {old:x} kept serving while failing; {new:x} after recovery")
    return str(error)


def test_disk_full_during_the_credential_write(setup: Setup) -> None:
    setup.config({"renew": "local-ca"})

    with daemon_process(setup) as (proc, client):
        # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG instead of killing it
        status = (Path("/proc") / str(proc.pid) / "status").read_text()
        ignored = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
        assert ignored & (1 << (signal.SIGXFSZ - 1)), "the daemon does not ignore SIGXFSZ"

        def fill_disk() -> None:  # while it runs, as a disk fills up
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (FSIZE_LIMIT, resource.RLIM_INFINITY))

        def free_space() -> None:
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

        error = check_fault_then_recovery(
            setup, client, ("cannot write the new certificate into", "file size limit"), fill_disk, free_space
        )
        assert proc.poll() is None
    print(f"\ndisk full (RLIMIT_FSIZE {FSIZE_LIMIT} B): state failing, last_error: {error}")


def test_read_only_keystore(setup: Setup) -> None:
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv is missing: install util-linux (it runs the daemon without CAP_DAC_OVERRIDE)"
    setup.config({"renew": "local-ca"})
    no_override = "-dac_override,-dac_read_search"
    try:
        with daemon_process(
            setup, wrapper=[setpriv, f"--inh-caps={no_override}", f"--bounding-set={no_override}", "--"]
        ) as (proc, client):
            # prove the fault: this daemon really cannot write there (root with the capability could)
            status = (Path("/proc") / str(proc.pid) / "status").read_text()
            bounding = int(next(line for line in status.splitlines() if line.startswith("CapBnd:")).split()[1], 16)
            assert not bounding & (1 << 1), "the daemon still has CAP_DAC_OVERRIDE"

            def make_read_only() -> None:
                for folder in (setup.keystore, setup.folder):
                    folder.chmod(0o500)

            def make_writable() -> None:
                for folder in (setup.keystore, setup.folder):
                    folder.chmod(0o700)

            error = check_fault_then_recovery(setup, client, ("permission denied",), make_read_only, make_writable)
    finally:
        for folder in (setup.keystore, setup.folder):
            folder.chmod(0o700)
    print(f"\nread-only keystore: state failing, last_error: {error}")


class _CA(http.server.BaseHTTPRequestHandler):
    """GET /issue: a new client certificate and key from the dev CA, as JSON."""

    ca: DevCA

    def do_GET(self) -> None:
        # 2 h: a later notAfter than the credential in use, which wins even a same-second notBefore tie
        issued = self.ca.issue_client("CN=dev", timedelta(hours=2), datetime.now(UTC))
        body = json.dumps({"cert": issued.cert_pem().decode(), "key": issued.key_pem().decode()}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_ca_down_for_the_command_provider(setup: Setup) -> None:
    # The CA's port is bound but not listening (connections are refused) until it comes up.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/issue"
    script = setup.tmp / "ca_client.py"
    script.write_text(CA_CLIENT)
    config = setup.config({"renew": "command", "renew_command": [sys.executable, str(script), url]})
    handler = type("Handler", (_CA,), {"ca": setup.ca})
    server = http.server.HTTPServer(("127.0.0.1", port), handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    thread = threading.Thread(target=server.serve_forever, name="test-ca", daemon=True)
    try:
        with DaemonThread(config) as daemon:

            def ca_comes_up() -> None:
                server.server_activate()  # listen() on the bound socket
                thread.start()

            error = check_fault_then_recovery(
                setup, daemon.client(), ("cannot reach the CA", url), lambda: None, ca_comes_up
            )
            assert "Connection refused" in error
    finally:
        if thread.is_alive():
            server.shutdown()
        server.server_close()
    print(f"\nCA down (command provider): state failing, last_error: {error}")


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.ENOSPC, "the disk is full (no space left on device); free some space"),
        (errno.EROFS, "the file system is read-only; make it writable"),
        (errno.EDQUOT, "the disk quota is used up; free some space"),
    ],
)
def test_write_failures_are_named(tmp_path: Path, code: int, words: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The errors a real full or read-only disk gives (not made here: that needs mount rights)."""

    def failing_write(path: Path, data: bytes, mode: int = 0o644) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(store, "atomic_write", failing_write)
    issued = load_or_create_ca(tmp_path / "ca", datetime.now(UTC)).issue_client(
        "CN=dev", timedelta(hours=1), datetime.now(UTC)
    )
    with pytest.raises(store.CredentialNotWritten) as caught:
        store.write_credential(tmp_path / "dev", issued.cert, issued.cert_pem(), issued.key_pem(), datetime.now(UTC))
    assert str(caught.value) == f"cannot write the new certificate into {tmp_path / 'dev'}: {words}"
