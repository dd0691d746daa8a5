"""Trust follows its files (issue 16, point 3): a route's ca_file is watched like the keystore,
and a change rebuilds the route's context, so connections made after it use the new trust."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from tests.daemon_runner import DaemonThread
from tests.pki import CA
from tests.scenario import Pki, mtls_server, route_to, write_config
from tests.waiting import wait_until


def echoes(daemon: DaemonThread, route: str) -> bool:
    """A new connection through `route`: True when it echoes, False when the tunnel ends it."""
    with daemon.connect(route) as client:
        client.settimeout(10)
        with contextlib.suppress(OSError):
            client.sendall(b"ping")
            return client.recv(4) == b"ping"
    return False


def replace_file(path: Path, data: bytes) -> None:
    """As an editor or a config tool saves: a new file renamed over the old one."""
    temp = path.with_name(path.name + ".new")
    temp.write_bytes(data)
    os.replace(temp, path)


def test_new_connections_use_the_ca_file_as_it_is_now(tmp_path: Path, isolated_home: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    trust = tmp_path / "trust"
    trust.mkdir()
    ca_file = trust / "server-ca.pem"
    ca_file.write_bytes(pki.server_ca_file.read_bytes())
    other_root = CA("Another Server CA").root_pem()
    with mtls_server(pki, mode="echo") as server:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={"api": route_to(pki, server.port, ca_file=str(ca_file))},
        )
        with DaemonThread(config) as daemon:
            client = daemon.client()
            assert echoes(daemon, "api")
            with daemon.connect("api") as held:  # a tunnel open before the change
                held.settimeout(10)
                held.sendall(b"a")
                assert held.recv(1) == b"a"

                replace_file(ca_file, other_root)
                wait_until(lambda: not echoes(daemon, "api"), timeout=10, what="the new ca_file to be used")
                failures = daemon.status()["routes"]["api"]["failures"]
                assert set(failures) == {"server_untrusted"}, daemon.status()["routes"]["api"]["last_error"]
                assert client.post("/v1/routes/api/check")["cause"] == "server_untrusted"

                replace_file(ca_file, pki.server_ca_file.read_bytes())
                wait_until(lambda: echoes(daemon, "api"), timeout=10, what="the restored ca_file to be used")
                assert client.post("/v1/routes/api/check")["ok"] is True

                held.sendall(b"b")  # already verified: a tunnel made before a change carries on
                assert held.recv(1) == b"b"
