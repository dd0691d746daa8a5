"""The loopback control transport (`control = "tcp"`, Windows' default): control.json, the token, 401.

The CLI and tray suites run over both transports (the `control_transport` fixture); these are the
checks only the loopback transport has: the token file, the header, a stale file, another user.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sidecar.cli import main
from sidecar.config import parse_config
from sidecar.errors import ConfigError
from sidecar.instance import read_holder
from sidecar.paths import resolve_places
from tests.controlhttp import request
from tests.daemon_runner import DaemonThread
from tests.scenario import write_config
from tests.test_cli import sidecar_process
from tests.test_other_user import make_other_user
from tests.waiting import wait_until


def _tcp_config(home: Path) -> Path:
    return write_config(
        home / "config.toml",
        control="tcp",
        active="dev",
        identities={"dev": {"renew": "local-ca"}, "ci-bot": {"renew": "local-ca"}},
        routes={},
    )


def _record() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(resolve_places().control_file.read_text())
    return data


def test_control_parses_and_a_wrong_value_names_the_line() -> None:
    assert parse_config('control = "tcp"\n').control == "tcp"
    assert parse_config('control = "unix"\n').control == "unix"
    assert parse_config("").control == ("tcp" if sys.platform == "win32" else "unix")
    with pytest.raises(ConfigError) as info:
        parse_config('log_level = "info"\ncontrol = "pipe"\n', source="config.toml")
    assert (info.value.line, info.value.field) == (2, "control")
    assert "unknown control transport" in str(info.value) and "unix, tcp" in str(info.value)


def test_control_json_is_private_names_the_port_and_the_lock_records_it(isolated_home: Path) -> None:
    places = resolve_places()
    with DaemonThread(_tcp_config(isolated_home)) as daemon:
        info = places.control_file.stat()
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid()
        record = _record()
        assert record["pid"] == os.getpid() and record["port"] == daemon.control.port
        assert len(record["token"]) >= 43  # token_urlsafe(32): 256 bits
        assert set(record) == {"port", "token", "pid", "version"}
        assert not places.control_socket.exists()  # one transport at a time
        holder = read_holder(places.lock_file)
        assert holder is not None and holder.control == str(places.control_file)
        control = daemon.client().get("/v1/status")["daemon"]["control"]
        assert control == {
            "transport": "tcp",
            "address": f"127.0.0.1:{record['port']}",
            "file": str(places.control_file),
            "unauthorized": 0,
        }
    assert not places.control_file.exists()  # a clean stop takes it away


def test_unix_status_names_the_socket(isolated_home: Path) -> None:
    config = write_config(
        isolated_home / "config.toml", control="unix", identities={"dev": {"renew": "none"}}, routes={}
    )
    with DaemonThread(config) as daemon:
        control = daemon.client().get("/v1/status")["daemon"]["control"]
        assert control == {"transport": "unix", "address": str(daemon.socket)}
        assert not resolve_places().control_file.exists()


def test_no_token_or_a_wrong_one_gets_401_is_counted_and_changes_nothing(
    isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with DaemonThread(_tcp_config(isolated_home)) as daemon:
        body = json.dumps({"name": "ci-bot"}).encode()
        wrong = _record()["token"][:-2] + "xx"
        for token in ("", wrong, "Bearer"):
            status, answer = request(daemon.socket, "POST", "/v1/active-identity", body, token=token)
            assert status == 401
            assert "missing or wrong control token" in answer["error"] and "control.json" in answer["error"]
        status, _ = request(daemon.socket, "GET", "/v1/events", b"", token="")
        assert status == 401  # the stream too
        assert daemon.status()["active_identity"] == "dev"  # nothing changed
        assert 'active_identity = "dev"' in (isolated_home / "config.toml").read_text()
        assert daemon.client().get("/v1/status")["daemon"]["control"]["unauthorized"] == 4
        capsys.readouterr()
        assert main(["status"]) == 0
        assert f"control API {daemon.address}: refused 4 request(s) without the token" in capsys.readouterr().out
        ok, answer = request(daemon.socket, "POST", "/v1/active-identity", body)  # with the token from the file
        assert ok == 200 and answer["active_identity"] == "ci-bot"


def test_a_new_token_at_every_start_and_the_file_goes_on_sigterm(isolated_home: Path) -> None:
    _tcp_config(isolated_home)
    control_file = resolve_places().control_file
    tokens = []
    for _ in range(2):
        with sidecar_process("run") as (proc, log):
            log.wait_for(r"control API on 127\.0\.0\.1:\d+")
            record = _record()
            assert record["pid"] == proc.pid
            tokens.append(record["token"])
            assert main(["status", "--json"]) == 0
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        assert not control_file.exists()
    assert tokens[0] != tokens[1]


def test_a_control_json_left_by_a_killed_daemon_means_not_running(
    isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _tcp_config(isolated_home)
    control_file = resolve_places().control_file
    with sidecar_process("run") as (proc, log):
        log.wait_for(r"control API on 127\.0\.0\.1:\d+")
        proc.kill()  # SIGKILL: no clean stop, control.json stays
        proc.wait(timeout=30)
    assert control_file.exists()
    capsys.readouterr()
    for argv in (["status"], ["use", "ci-bot"], ["route", "rm", "x"], ["check", "x"]):
        assert main(argv) == 3, argv
        err = capsys.readouterr().err
        assert "the mtls-sidecar daemon is not running" in err, err
        assert "start it with `mtls-sidecar run`" in err and str(control_file) in err
    # The next daemon clears it and writes its own.
    with sidecar_process("run") as (proc, log):
        log.wait_for(r"control API on 127\.0\.0\.1:\d+")
        assert _record()["pid"] == proc.pid
        assert main(["status"]) == 0


def test_a_control_json_of_a_daemon_whose_port_is_closed_means_not_running(
    isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        places = resolve_places()
        places.run.mkdir(mode=0o700, parents=True, exist_ok=True)
        record = {"port": port, "token": "t", "pid": os.getpid(), "version": "0"}
        places.control_file.write_text(json.dumps(record))
        assert main(["status"]) == 3
    err = capsys.readouterr().err
    assert "not running" in err and f"nobody answers on 127.0.0.1:{port}" in err


OTHER = """
import http.client, json, sys
try:
    open(sys.argv[2]).read()
    print("read control.json")
except OSError as exc:
    print("cannot read control.json:", type(exc).__name__)
for token in ("", "guessed"):
    conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=10)
    conn.request("POST", "/v1/active-identity", body=b'{"name": "ci-bot"}',
                 headers={"Authorization": f"Bearer {token}"} if token else {})
    print("status", conn.getresponse().status)
"""


def test_another_user_cannot_read_control_json_and_gets_401(isolated_home: Path) -> None:
    other: pwd.struct_passwd = make_other_user()
    with DaemonThread(_tcp_config(isolated_home)) as daemon:
        control_file = resolve_places().control_file
        setpriv = ["setpriv", f"--reuid={other.pw_uid}", f"--regid={other.pw_gid}", "--clear-groups"]
        done = subprocess.run(
            [*setpriv, sys.executable, "-c", OTHER, str(daemon.control.port), str(control_file)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split("\n")[:3] == [
            "cannot read control.json: PermissionError",
            "status 401",
            "status 401",
        ], done.stdout
        assert daemon.status()["active_identity"] == "dev"
        wait_until(
            lambda: daemon.client().get("/v1/status")["daemon"]["control"]["unauthorized"] == 2,
            timeout=10,
            what="both refusals counted",
        )


def test_a_broken_control_json_is_replaced_by_the_next_daemon_and_not_used_before(
    isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    places = resolve_places()
    places.run.mkdir(mode=0o700, parents=True, exist_ok=True)
    places.control_file.write_text("not json")
    assert main(["status"]) == 3
    assert "not a control file written by mtls-sidecar" in capsys.readouterr().err
    with DaemonThread(_tcp_config(isolated_home)) as daemon:
        assert _record()["port"] == daemon.control.port


def test_a_unix_daemon_clears_a_control_json_a_killed_tcp_daemon_left(isolated_home: Path) -> None:
    """Otherwise clients, which try control.json first, would not find the daemon on the socket."""
    places = resolve_places()
    places.run.mkdir(mode=0o700, parents=True, exist_ok=True)
    places.control_file.write_text(json.dumps({"port": 1, "token": "t", "pid": 2147483646, "version": "0"}))
    config = write_config(
        isolated_home / "config.toml", control="unix", identities={"dev": {"renew": "none"}}, routes={}
    )
    with DaemonThread(config) as daemon:
        assert not places.control_file.exists()
        assert main(["status"]) == 0
        assert daemon.client().get("/v1/status")["daemon"]["control"]["transport"] == "unix"


def test_a_tcp_daemon_will_not_start_beside_a_live_unix_one_on_the_same_runtime_folder(
    isolated_home: Path, tmp_path: Path
) -> None:
    from dataclasses import replace

    from sidecar.errors import LocalSetupError

    unix = write_config(isolated_home / "config.toml", control="unix", identities={"dev": {"renew": "none"}}, routes={})
    places = resolve_places()
    other = replace(places, keystore=tmp_path / "other-data" / "keystore")  # another data folder, the same run/
    tcp = write_config(tmp_path / "other.toml", control="tcp", identities={"dev": {"renew": "none"}}, routes={})
    with DaemonThread(unix):
        with pytest.raises(LocalSetupError, match="another mtls-sidecar daemon is running"), DaemonThread(tcp, other):
            pass
        assert not places.control_file.exists()
        assert main(["status"]) == 0


def test_where_there_are_no_unix_sockets_no_control_json_means_not_running(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    monkeypatch.delattr(socket, "AF_UNIX")  # as on Windows
    assert main(["status"]) == 3
    err = capsys.readouterr().err
    assert f"not running (no control.json at {resolve_places().control_file})" in err
    assert "start it with `mtls-sidecar run`" in err
