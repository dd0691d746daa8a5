"""Staged shutdown and Unix-socket listeners, against a live daemon."""

from __future__ import annotations

import signal
import socket
import stat
from pathlib import Path

from tests.daemon_runner import DaemonThread
from tests.scenario import Pki, mtls_server, one_route_config, recv_all
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
            "sidecar.daemon: second Ctrl-C: cutting open connections now instead of waiting for them"
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
