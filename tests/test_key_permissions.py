"""Keys are secrets: written 0600 in 0700 folders, and a key others can read is refused with
the command that fixes it (as ssh does)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

from sidecar.files import loose_key_problem
from tests.daemon_runner import DaemonThread
from tests.scenario import Pki, mtls_server, one_route_config, recv_all
from tests.waiting import wait_until


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def echo(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"ping\n")
        sock.shutdown(socket.SHUT_WR)
        try:
            return recv_all(sock)
        except ConnectionResetError:
            return b""


def test_loose_key_message_names_the_fix() -> None:
    assert loose_key_problem(Path("/k/dev.key"), 0o100600) is None
    assert loose_key_problem(Path("/k/dev.key"), 0o100400) is None
    problem = loose_key_problem(Path("/k/dev.key"), 0o100644)
    assert problem == (
        "private key file /k/dev.key is readable by other users (mode 0644); it is refused until you run: "
        "chmod 600 '/k/dev.key'"
    )
    assert loose_key_problem(Path("/k/dev.key"), 0o100640) is not None  # group is "others" too


def test_a_key_readable_by_others_is_refused_until_chmod(isolated_home: Path, tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    folder = isolated_home / "keystore" / "dev"
    pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
    key = next(p for p in folder.iterdir() if p.suffix == ".key")
    cert = next(p for p in folder.iterdir() if p.suffix in (".crt", ".pem"))
    cert.chmod(0o644)  # a certificate is public: fine
    key.chmod(0o644)
    with mtls_server(pki, mode="echo") as server, DaemonThread(one_route_config(isolated_home, pki, server.port)) as d:
        identity = d.status()["identities"]["dev"]
        assert identity["selected"] is None
        (candidate,) = identity["candidates"]
        assert f"chmod 600 '{key}'" in candidate["reason"] and "mode 0644" in candidate["reason"]
        assert echo(d.port("svc")) == b""  # closed: nothing reaches the service
        assert d.status()["routes"]["svc"]["failures"] == {"no_usable_certificate": 1}

        key.chmod(0o600)  # the fix the message gave; the keystore watch sees the mode change
        wait_until(lambda: d.status()["identities"]["dev"]["selected"] is not None, timeout=10,
                   what="the key to be accepted after chmod 600")  # fmt: skip
        assert echo(d.port("svc")) == b"ping\n"


def test_files_we_write_are_private(isolated_home: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "identity", "new", "dev"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    folder = isolated_home / "keystore" / "dev"
    assert mode(folder) == 0o700
    files = list(folder.iterdir())
    assert files and all(mode(p) == 0o600 for p in files)
    ca = isolated_home / "ca"
    assert mode(ca) == 0o700
    assert all(mode(p) == 0o600 for p in ca.iterdir() if "key" in p.name)


def test_a_dev_ca_key_readable_by_others_stops_with_the_fix(isolated_home: Path) -> None:
    created = subprocess.run([sys.executable, "-m", "sidecar", "ca", "export"], capture_output=True, timeout=60)
    assert created.returncode == 0
    (key,) = [p for p in (isolated_home / "ca").iterdir() if "key" in p.name]
    key.chmod(0o644)
    refused = subprocess.run(
        [sys.executable, "-m", "sidecar", "ca", "export"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 1
    assert f"chmod 600 '{key}'" in refused.stderr and "dev CA key" in refused.stderr
    assert refused.stdout == ""  # nothing half-done
    key.chmod(0o600)
    assert (
        subprocess.run([sys.executable, "-m", "sidecar", "ca", "export"], capture_output=True, timeout=60).returncode
        == 0
    )
    assert os.stat(key).st_size > 0  # the key was never rewritten or lost
