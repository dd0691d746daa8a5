"""Staged shutdown and Unix-socket listeners, against a live daemon."""

from __future__ import annotations

import os
import signal
import socket
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from sidecar.instance import AlreadyRunning, Holder, InstanceLock, read_holder
from sidecar.paths import resolve_places
from tests.daemon_runner import DaemonThread
from tests.scenario import Pki, mtls_server, one_route_config, recv_all, write_config
from tests.test_cli import sidecar_process
from tests.waiting import wait_until


def test_stop_refuses_new_connections_and_lets_open_ones_finish(isolated_home: Path, tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    with mtls_server(pki, mode="echo") as server:
        runner = DaemonThread(one_route_config(isolated_home, pki, server.port, shutdown_grace="20s"))
        with runner:
            port = runner.port("svc")
            held = runner.connect("svc")
            held.sendall(b"before\n")
            assert held.recv(100) == b"before\n"
            runner.loop.call_soon_threadsafe(runner.daemon.request_stop)  # type: ignore[union-attr]

            def refused() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except ConnectionRefusedError:
                    return True
                return False

            wait_until(refused, timeout=5, what="the listener to stop accepting")
            held.sendall(b"during drain\n")  # the open connection still works
            assert held.recv(100) == b"during drain\n"
            held.shutdown(socket.SHUT_WR)
            assert recv_all(held) == b""
            held.close()
    # leaving the `with` joined the daemon thread: it stopped once the connection finished


def test_a_second_ctrl_c_during_the_grace_cuts_open_connections_and_exits_130(
    isolated_home: Path, tmp_path: Path
) -> None:
    pki = Pki.create(tmp_path / "pki")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    with mtls_server(pki, mode="echo") as server:
        one_route_config(isolated_home, pki, server.port, shutdown_grace="10m")
        with sidecar_process("run") as (proc, log):
            port = int(log.wait_for(r"listening on 127\.0\.0\.1:(\d+) → ").group(1))
            held = socket.create_connection(("127.0.0.1", port), timeout=10)
            held.sendall(b"before\n")
            assert held.recv(100) == b"before\n"

            proc.send_signal(signal.SIGINT)
            log.wait_for(r"stopping: no new connections; open ones have 600s to finish \(Ctrl-C again to cut them")
            log.wait_for(r"route svc: waiting up to 600s for 1 connection\(s\) to finish")
            held.sendall(b"during the grace\n")  # still carried
            assert held.recv(100) == b"during the grace\n"

            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=20) == 130, log.text  # at once, not after the 10-minute grace
            assert recv_all(held) == b""  # cut: EOF or reset, never more data
            held.close()
        warned = [line for line in log.lines if "second Ctrl-C" in line]
        assert len(warned) == 1 and warned[0].rstrip().endswith(
            "sidecar.daemon: second Ctrl-C (or stop signal): cutting open connections now instead of waiting for them"
        ), log.text
        assert "Traceback" not in log.text, log.text


def test_unix_socket_route_is_owner_only(isolated_home: Path, tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    path = tmp_path / "run" / "svc.sock"
    path.parent.mkdir()
    with mtls_server(pki, mode="echo") as server:
        with DaemonThread(one_route_config(isolated_home, pki, server.port, listen=f"unix:{path}")):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(str(path))
                sock.sendall(b"over unix\n")
                sock.shutdown(socket.SHUT_WR)
                assert recv_all(sock) == b"over unix\n"
        assert not path.exists()  # removed on stop


def test_a_second_daemon_on_the_same_data_folder_exits_1_naming_the_first_whatever_its_runtime_folder(
    isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The platform folders, as without MTLS_SIDECAR_HOME: data and config from XDG_*, the socket
    # from XDG_RUNTIME_DIR, which differs between the two (a tray and a login-started daemon, say).
    monkeypatch.delenv("MTLS_SIDECAR_HOME")
    places = resolve_places()
    write_config(places.config_file, identities={"dev": {"renew": "none"}}, routes={})
    runtime_a, runtime_b = tmp_path / "run-a", tmp_path / "run-b"
    with sidecar_process("run", env={"XDG_RUNTIME_DIR": str(runtime_a)}) as (first, first_log):
        first_log.wait_for(r"control API on ")
        with sidecar_process("run", env={"XDG_RUNTIME_DIR": str(runtime_b)}) as (second, second_log):
            assert second.wait(timeout=30) == 1, second_log.text
            second_log.join()
        text = second_log.text
        assert f"pid {first.pid}," in text and str(runtime_a / "mtls-sidecar" / "control.sock") in text, text
        assert f"another mtls-sidecar daemon already uses the data folder {places.lock_file.parent}" in text, text
        assert "Traceback" not in text, text
        assert not (runtime_b / "mtls-sidecar").exists()  # it stopped before it opened anything
        assert first.poll() is None  # the first one is untouched
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=20) == 0, first_log.text
    assert places.lock_file.read_text() == ""  # let go, and no stale pid left in it
    with sidecar_process("run", env={"XDG_RUNTIME_DIR": str(runtime_b)}) as (third, third_log):
        third_log.wait_for(r"control API on ")  # once the first has stopped, another may start
        third.send_signal(signal.SIGTERM)
        assert third.wait(timeout=20) == 0, third_log.text


def test_the_lock_is_per_open_file_so_even_one_process_cannot_take_it_twice(isolated_home: Path) -> None:
    places = resolve_places()
    first, second = InstanceLock(places.lock_file), InstanceLock(places.lock_file)
    with first.hold(places.control_socket, places.config_file):
        with pytest.raises(AlreadyRunning) as refused:
            second.acquire("elsewhere.sock", "other.toml")
        assert refused.value.holder == Holder(os.getpid(), str(places.control_socket), str(places.config_file))
        assert not second.held
    assert read_holder(places.lock_file) is None
    with second.hold("elsewhere.sock", "other.toml"):  # released: free for the next one
        assert read_holder(places.lock_file) == Holder(os.getpid(), "elsewhere.sock", "other.toml")


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX reload signals")
@pytest.mark.parametrize("sig", ["SIGHUP", "SIGUSR1"])
def test_a_reload_signal_rereads_config_and_keystore_and_the_daemon_keeps_serving(
    isolated_home: Path, tmp_path: Path, sig: str
) -> None:
    """The daemon's reload signals: config.toml is read again at once (a route added to it starts),
    and the open connection is untouched."""
    pki = Pki.create(tmp_path / "pki")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    with mtls_server(pki, mode="echo") as server:
        config = one_route_config(isolated_home, pki, server.port)
        with sidecar_process("run") as (proc, log):
            port = int(log.wait_for(r"listening on 127\.0\.0\.1:(\d+) → ").group(1))
            held = socket.create_connection(("127.0.0.1", port), timeout=10)
            held.sendall(b"before\n")
            assert held.recv(100) == b"before\n"
            config.write_text(config.read_text().replace("[routes.svc]", '[routes.svc]\nidle_timeout = "1h"', 1))
            proc.send_signal(getattr(signal, sig))
            log.wait_for(rf"{sig}: reloading config\.toml, the keystore and the trust files")
            log.wait_for(r"config reloaded from ")
            assert proc.poll() is None, log.text
            held.sendall(b"after\n")
            assert held.recv(100) == b"after\n"
            held.close()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0, log.text


def test_a_broken_replacement_of_a_credential_file_keeps_the_last_good_one(isolated_home: Path, tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    leaf = pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    with (
        mtls_server(pki, mode="echo") as server,
        DaemonThread(one_route_config(isolated_home, pki, server.port)) as daemon,
    ):
        (isolated_home / "keystore" / "dev" / "dev-1.crt").write_text("-----BEGIN CERTIFICATE-----\nbroken\n")
        daemon.call(lambda d: d.keystore_changed())
        wait_until(
            lambda: daemon.status()["identities"]["dev"]["kept_last_good"] is not None,
            timeout=10,
            what="the broken file noticed",
        )
        status = daemon.status()
        identity = status["identities"]["dev"]
        assert identity["kept_last_good"]["file"].endswith("dev-1.crt"), identity
        assert identity["kept_last_good"]["reason"], identity
        assert identity["selected"]["serial"] == f"{leaf.cert.serial_number:x}", identity
        assert any("dev-1.crt is broken now" in w and "still presenting" in w for w in status["warnings"]), status
        with daemon.connect("svc") as sock:  # new connections still work, with the last good certificate
            sock.sendall(b"still here\n")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"still here\n"
        assert server.peer_certs[-1] == leaf.cert.public_bytes(serialization.Encoding.DER)
