"""The control API and the CLI commands that use it, against a running daemon and real nginx."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shlex
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sidecar.cli import main
from sidecar.control.client import ApiCallError, ControlClient
from tests.daemon_runner import DaemonThread
from tests.realservers import free_port, nginx_mtls
from tests.scenario import Pki, curl, http_get_on, mtls_server, recv_all, route_to, write_config
from tests.waiting import wait_until

# The whole suite once per control transport (issue 19): the Unix socket and the loopback port.
pytestmark = pytest.mark.usefixtures("control_transport")


def nginx_dn(text: str | bytes) -> str:
    body = text.decode() if isinstance(text, bytes) else text
    match = re.search(r"client_dn=(\S+) ", body)
    assert match, body
    return match.group(1)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


def two_identities(home: Path, pki: Pki, port: int, **routes: dict[str, Any]) -> Path:
    pki.enroll(home / "keystore", "dev", "dev-1", cn="dev")
    pki.enroll(home / "keystore", "ci-bot", "ci-1", cn="ci-bot")
    return write_config(
        home / "config.toml",
        active="dev",
        identities={"dev": {"renew": "none"}, "ci-bot": {"renew": "none"}},
        routes={"api": route_to(pki, port), **routes},
    )


def test_switching_identity_through_the_api(pki: Pki, isolated_home: Path, tmp_path: Path) -> None:
    with nginx_mtls(
        tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.client_ca_file
    ) as nginx:
        config = two_identities(isolated_home, pki, nginx.port)
        with DaemonThread(config) as daemon:
            assert stat.S_IMODE(daemon.control_path.stat().st_mode) == 0o600
            client = daemon.client()
            seen: list[tuple[float, dict[str, Any]]] = []
            follower = threading.Thread(target=_follow, args=(client, seen), daemon=True)
            follower.start()
            wait_until(lambda: any(e["type"] == "hello" for _, e in seen), timeout=5, what="the events stream")
            with daemon.connect("api") as held:
                assert nginx_dn(http_get_on(held)) == "CN=dev"
                switched_at = time.monotonic()
                status = client.post("/v1/active-identity", {"name": "ci-bot"})
                assert status["active_identity"] == "ci-bot"
                assert nginx_dn(curl(daemon.port("api")).stdout) == "CN=ci-bot"
                assert nginx_dn(http_get_on(held)) == "CN=dev"  # the open connection is undisturbed
            event = wait_until(
                lambda: next((e for t, e in seen if e["type"] == "identity.switched"), None),
                timeout=1,
                what="the identity.switched event within 1 s",
            )
            latency = next(t for t, e in seen if e is event) - switched_at
    assert event["name"] == "ci-bot" and event["previous"] == "dev"
    assert 'active_identity = "ci-bot"' in config.read_text()  # written back
    print(f"\nevents: identity.switched reached a client {latency * 1000:.1f} ms after the API call")


def _follow(client: ControlClient, seen: list[tuple[float, dict[str, Any]]]) -> None:
    try:
        for event in client.events():
            seen.append((time.monotonic(), event))
    except OSError:
        pass  # the daemon stopped


def test_per_route_identity_renew_and_errors(pki: Pki, isolated_home: Path) -> None:
    with mtls_server(pki) as server:
        config = two_identities(isolated_home, pki, server.port)
        with DaemonThread(config) as daemon:
            client = daemon.client()
            status = client.post("/v1/routes/api/identity", {"name": "ci-bot"})
            assert status["routes"]["api"]["identity"] == "ci-bot"
            assert status["active_identity"] == "dev"
            with pytest.raises(ApiCallError) as no_provider:
                client.post("/v1/identities/dev/renew")
            assert no_provider.value.status == 409 and 'renew = "none"' in str(no_provider.value)
            with pytest.raises(ApiCallError) as unknown:
                client.post("/v1/active-identity", {"name": "prod"})
            assert unknown.value.status == 404 and "known: dev, ci-bot" in str(unknown.value)
            with pytest.raises(ApiCallError) as bad_body:
                client.post("/v1/active-identity", {"nom": "dev"})
            assert bad_body.value.status == 400
            with pytest.raises(ApiCallError) as wrong_method:
                client.delete("/v1/status")
            assert wrong_method.value.status == 405
            with pytest.raises(ApiCallError) as nowhere:
                client.get("/v2/anything")
            assert nowhere.value.status == 404
    assert 'identity = "ci-bot"' in config.read_text()


def test_status_document_shape(pki: Pki, isolated_home: Path) -> None:
    with mtls_server(pki) as server:
        config = two_identities(isolated_home, pki, server.port)
        with DaemonThread(config) as daemon:
            status = daemon.client().get("/v1/status")
    assert set(status) >= {"version", "active_identity", "identities", "routes", "warnings"}
    dev = status["identities"]["dev"]
    assert set(dev["selected"]) >= {"serial", "subject", "issuer", "not_before", "not_after", "file"}
    assert re.fullmatch(r"[0-9a-f]+", dev["selected"]["serial"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", dev["selected"]["not_after"])
    assert set(dev["candidates"][0]) == {"file", "usable", "reason"}
    assert set(dev["renewal"]) >= {"state", "provider", "next_renewal_at", "last_renewed_at", "last_error"}
    api = status["routes"]["api"]
    assert set(api) >= {
        "listen",
        "target",
        "server_name",
        "identity",
        "state",
        "active_connections",
        "total_connections",
        "bytes_in",
        "bytes_out",
        "failures",
        "last_error",
    }
    assert "PRIVATE KEY" not in json.dumps(status)


def test_routes_added_and_removed_at_run_time_survive_a_restart(pki: Pki, isolated_home: Path) -> None:
    with mtls_server(pki) as server:
        config = two_identities(isolated_home, pki, server.port)
        port = free_port()
        with DaemonThread(config) as daemon:
            client = daemon.client()
            added = client.post(
                "/v1/routes",
                {
                    "name": "echo",
                    "listen": f"127.0.0.1:{port}",
                    "target": f"127.0.0.1:{server.port}",
                    "server_name": "localhost",
                    "ca_file": str(pki.server_ca_file),
                },
            )
            assert added["state"] == "up"
            assert _echo(port, b"added\n") == b"added\n"
            client.delete("/v1/routes/api")
            assert "api" not in client.get("/v1/routes")
            with pytest.raises(ApiCallError) as clash:
                client.post("/v1/routes", {"name": "again", "listen": f"127.0.0.1:{port}", "target": "x.test:1"})
            assert clash.value.status == 400 and "clash" in str(clash.value).lower()
        with DaemonThread(config) as daemon:  # a restart reads what the API wrote
            assert set(daemon.status()["routes"]) == {"echo"}
            assert _echo(port, b"after restart\n") == b"after restart\n"


def test_adding_a_route_on_a_taken_port_is_refused_and_not_saved(pki: Pki, isolated_home: Path) -> None:
    with mtls_server(pki) as server, socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        config = two_identities(isolated_home, pki, server.port)
        before = config.read_text()
        with DaemonThread(config) as daemon:
            with pytest.raises(ApiCallError) as taken:
                daemon.client().post(
                    "/v1/routes",
                    {
                        "name": "db",
                        "listen": f"127.0.0.1:{squatter.getsockname()[1]}",
                        "target": "db.example.test:5432",
                    },
                )
            assert taken.value.status == 409 and "address already in use" in str(taken.value)
            assert "db" not in daemon.status()["routes"]
    assert config.read_text() == before


def test_a_route_added_through_the_api_takes_every_route_key(pki: Pki, isolated_home: Path) -> None:
    """POST /v1/routes accepts what a [routes.NAME] table does, server policy included."""
    wrong_pin = base64.b64encode(bytes(32)).decode()
    with mtls_server(pki) as server:
        config = two_identities(isolated_home, pki, server.port)
        port = free_port()
        with DaemonThread(config) as daemon:
            client = daemon.client()
            client.post(
                "/v1/routes",
                {
                    "name": "pinned",
                    "listen": f"127.0.0.1:{port}",
                    "target": f"127.0.0.1:{server.port}",
                    "server_name": "localhost",
                    "ca_file": str(pki.server_ca_file),
                    "pin_sha256": [wrong_pin],
                },
            )
            with contextlib.suppress(ConnectionResetError):
                assert _echo(port, b"pinned\n") == b""
            wait_until(
                lambda: daemon.status()["routes"]["pinned"]["failures"] == {"pin_mismatch": 1},
                timeout=10,
                what="the pin to refuse the server",
            )
            with pytest.raises(ApiCallError) as unknown:
                client.post("/v1/routes", {"name": "x", "listen": "127.0.0.1:0", "target": "x.test:1", "pin": []})
            assert unknown.value.status == 400 and "unknown route field(s): pin" in str(unknown.value)
    assert wrong_pin in config.read_text()  # saved like the other keys


def _echo(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def test_a_broken_config_edit_is_rejected_and_the_old_routes_keep_serving(pki: Pki, isolated_home: Path) -> None:
    with mtls_server(pki) as server:
        config = two_identities(isolated_home, pki, server.port)
        with DaemonThread(config) as daemon:
            seen: list[tuple[float, dict[str, Any]]] = []
            threading.Thread(target=_follow, args=(daemon.client(), seen), daemon=True).start()
            wait_until(lambda: seen, timeout=5, what="the events stream")
            text = config.read_text()
            config.write_text(text + "\n[routes.broken\nlisten = 1\n")
            status = wait_until(
                lambda: (s := daemon.status())["config"]["error"] and s, timeout=5, what="the bad edit to be noticed"
            )
            line = len(text.splitlines()) + 2
            assert f"config.toml:{line}" in status["config"]["error"]
            assert any("config.toml was not applied" in w for w in status["warnings"])
            assert _echo(daemon.port("api"), b"still here\n") == b"still here\n"
            rejected = wait_until(
                lambda: next((e for _, e in seen if e["type"] == "config.rejected"), None), 2, what="config.rejected"
            )
            assert rejected["line"] == line
            # fixing the file applies it
            config.write_text(text.replace('active_identity = "dev"', 'active_identity = "ci-bot"'))
            wait_until(lambda: daemon.status()["active_identity"] == "ci-bot", timeout=5, what="the fixed config")
            assert daemon.status()["config"]["error"] is None


def test_a_config_edit_adds_and_changes_routes_without_restart(pki: Pki, isolated_home: Path) -> None:
    with mtls_server(pki) as server:
        config = two_identities(isolated_home, pki, server.port)
        port = free_port()
        with DaemonThread(config) as daemon, daemon.connect("api") as held:
            held.sendall(b"one\n")
            assert held.recv(100) == b"one\n"
            text = config.read_text().replace("[routes.api]", '[routes.api]\nidentity = "ci-bot"')
            config.write_text(
                text + f'\n[routes.extra]\nlisten = "127.0.0.1:{port}"\ntarget = "127.0.0.1:{server.port}"\n'
                f'server_name = "localhost"\nca_file = "{pki.server_ca_file}"\n'
            )
            wait_until(lambda: "extra" in daemon.status()["routes"], timeout=5, what="the new route")
            assert _echo(port, b"extra\n") == b"extra\n"
            assert daemon.status()["routes"]["api"]["identity"] == "ci-bot"
            held.sendall(b"two\n")  # an in-place change leaves open connections alone
            assert held.recv(100) == b"two\n"


# --- the CLI, as a client of the API


def test_cli_commands_against_a_running_daemon(
    pki: Pki, isolated_home: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with mtls_server(pki) as server:
        config = two_identities(isolated_home, pki, server.port)
        with DaemonThread(config):
            assert main(["status"]) == 0
            table = capsys.readouterr().out
            assert re.search(r"\*dev\s+CN=dev, expires in 6 days", table)
            assert re.search(r" api\s+127\.0\.0\.1:\d+ → 127\.0\.0\.1:\d+\s+dev\s+idle", table)  # STATE: health
            assert "\033[" not in table  # no colour when not a terminal

            assert main(["status", "--json"]) == 0
            assert json.loads(capsys.readouterr().out)["active_identity"] == "dev"

            assert main(["use", "ci-bot"]) == 0
            assert "active identity is now ci-bot" in capsys.readouterr().out
            assert main(["use", "dev", "--route", "api"]) == 0
            capsys.readouterr()

            assert main(["identity", "list"]) == 0
            listing = capsys.readouterr().out
            assert re.search(r"\* ci-bot\s+CN=ci-bot expires in", listing)

            port = free_port()
            assert (
                main(
                    [
                        "route",
                        "add",
                        "extra",
                        "--listen",
                        f"127.0.0.1:{port}",
                        "--target",
                        f"127.0.0.1:{server.port}",
                        "--server-name",
                        "localhost",
                        "--ca-file",
                        str(pki.server_ca_file),
                    ]
                )
                == 0
            )
            assert f"listening on 127.0.0.1:{port}" in capsys.readouterr().out
            assert main(["route", "list"]) == 0
            assert "extra" in capsys.readouterr().out
            assert main(["route", "rm", "extra"]) == 0
            capsys.readouterr()

            assert main(["renew", "dev"]) == 1  # renew = "none": the daemon refuses (409)
            assert 'renew = "none"' in capsys.readouterr().err
            assert main(["use", "nobody"]) == 2
            assert "no identity named 'nobody'" in capsys.readouterr().err


def test_cli_says_when_the_daemon_is_not_running(isolated_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status"]) == 3
    err = capsys.readouterr().err
    assert "the mtls-sidecar daemon is not running" in err and "mtls-sidecar run" in err


def test_identity_import_copies_a_usable_credential_and_refuses_a_bad_one(
    pki: Pki, isolated_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    leaf = pki.client_ca.client("imported")
    cert, key = leaf.write_pair(tmp_path / "in", "mine")
    assert main(["identity", "import", str(cert), "--key", str(key), "--name", "dev"]) == 0
    assert "imported CN=imported" in capsys.readouterr().out
    folder = isolated_home / "keystore" / "dev"
    assert {p.name for p in folder.iterdir()} == {"mine.crt", "mine.key"}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in folder.iterdir())
    bad = tmp_path / "in" / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert main(["identity", "import", str(bad), "--name", "dev"]) == 1
    assert "cannot be used: malformed certificate PEM" in capsys.readouterr().err
    assert not (folder / "bad.pem").exists()


def test_renew_endpoint_renews_now(isolated_home: Path, tmp_path: Path) -> None:
    config = write_config(isolated_home / "config.toml", identities={"dev": {"renew": "local-ca"}}, routes={})
    with DaemonThread(config) as daemon:
        client = daemon.client()
        first = client.get("/v1/status")["identities"]["dev"]["selected"]["serial"]
        assert client.post("/v1/identities/dev/renew") == {"renewing": "dev"}
        wait_until(
            lambda: client.get("/v1/status")["identities"]["dev"]["selected"]["serial"] != first,
            timeout=10,
            what="the renewal asked for",
        )
        assert client.get("/v1/status")["identities"]["dev"]["renewal"]["last_renewed_at"] is not None


def test_check_command_through_the_daemon(
    pki: Pki, isolated_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.pki import CA

    rogue = CA("Rogue CA").server("localhost", "127.0.0.1").write_pair(tmp_path / "rogue", "s")
    with mtls_server(pki) as good, mtls_server(pki, cert=rogue[0], key=rogue[1]) as bad:
        config = two_identities(isolated_home, pki, good.port, rogue=route_to(pki, bad.port))
        with DaemonThread(config):
            assert main(["check", "api"]) == 0
            assert capsys.readouterr().out.startswith("ok: ")
            assert main(["check", "rogue"]) == 1
            out = capsys.readouterr().out
            assert out.startswith("problem: ") and "CN=Rogue CA" in out and "\nfix: " in out
            assert main(["check", "rogue", "--json"]) == 1
            result = json.loads(capsys.readouterr().out)
            assert result["cause"] == "server_untrusted" and result["identity"] == "dev"
            assert main(["check", "nope"]) == 2
            assert "no route named 'nope'" in capsys.readouterr().err


def test_status_names_the_daemons_config_and_warns_when_it_is_not_the_clis(
    pki: Pki, isolated_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(isolated_home / "config.toml", identities={"dev": {"renew": "none"}}, routes={})
    other = write_config(tmp_path / "elsewhere" / "config.toml", identities={"dev": {"renew": "none"}}, routes={})
    with DaemonThread(config) as daemon:
        assert main(["status"]) == 0
        same = capsys.readouterr()
        assert f"config: {config} (daemon pid {os.getpid()}, asyncio loop)" in same.out.splitlines()
        assert same.err == ""
        # The same socket, but this CLI reads another config: whoever answers is not "its" daemon.
        assert main(["--config", str(other), "status"]) == 0
        mixed = capsys.readouterr()
        assert f"config: {config} (daemon pid {os.getpid()}, asyncio loop)" in mixed.out
        assert mixed.err.startswith(f"mtls-sidecar: warning: the daemon answering on {daemon.address} ")
        assert f"runs config {config}, not {other} (this command's)" in mixed.err
        assert main(["--config", str(other), "status", "--json"]) == 0
        as_json = capsys.readouterr()
        assert json.loads(as_json.out)["config"]["path"] == str(config)  # stdout stays pure JSON
        assert "warning: the daemon answering on" in as_json.err


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sidecar", *args]


def test_status_piped_to_a_reader_that_goes_away_ends_quietly(pki: Pki, isolated_home: Path) -> None:
    config = write_config(
        isolated_home / "config.toml", identities={"dev": {"renew": "none"}}, routes={"api": route_to(pki, 9)}
    )
    with DaemonThread(config):
        # What a user types: only the first line is read.
        piped = subprocess.run(
            f"{shlex.join(_cli('status'))} | head -1", shell=True, capture_output=True, text=True, timeout=60
        )
        assert piped.returncode == 0 and piped.stdout.startswith("mtls-sidecar "), piped
        assert piped.stderr == "", piped.stderr
        # The reader gone before a byte is written: the write fails for certain, and quietly.
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            closed = subprocess.run(_cli("status"), stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
        finally:
            os.close(write_end)
        assert closed.returncode == 141, closed.stderr
        assert closed.stderr == "", closed.stderr


def test_route_add_checks_the_ca_file_first_and_names_the_flags(
    pki: Pki, isolated_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with mtls_server(pki) as server:
        config = two_identities(isolated_home, pki, server.port)
        before = config.read_text()
        empty = tmp_path / "empty.pem"
        empty.write_text("")
        not_pem = tmp_path / "notes.txt"
        not_pem.write_text("the API team's CA is somewhere on the wiki\n")
        add = ["route", "add", "extra", "--listen", f"127.0.0.1:{free_port()}", "--target", f"127.0.0.1:{server.port}"]
        with DaemonThread(config) as daemon:
            for ca_file, why in (
                (tmp_path / "missing.pem", "no such file"),
                (empty, "the file is empty"),
                (not_pem, "holds no certificate"),
            ):
                assert main([*add, "--ca-file", str(ca_file)]) == 2
                err = capsys.readouterr().err
                assert f"mtls-sidecar: config error: command line: --ca-file = '{ca_file}': {why}" in err, err
                assert "config.toml" not in err and "routes.extra" not in err, err
            bad_target = ["route", "add", "extra", "--listen", "127.0.0.1:0", "--target", "api.example.test"]
            assert main(bad_target) == 2
            err = capsys.readouterr().err
            assert "command line: --target = 'api.example.test': missing port" in err and "config.toml" not in err, err
            assert "extra" not in daemon.status()["routes"]
            # through the API, the same refusal names the request's key
            request = {"name": "x", "listen": "127.0.0.1:0", "target": "a.test:1", "ca_file": str(empty)}
            with pytest.raises(ApiCallError) as refused:
                daemon.client().post("/v1/routes", request)
            assert refused.value.status == 400 and refused.value.body["field"] == "ca_file"
            with pytest.raises(ApiCallError) as not_a_path:
                daemon.client().post("/v1/routes", {**request, "ca_file": 5})
            assert not_a_path.value.status == 400 and not_a_path.value.body["field"] == "ca_file"
    assert config.read_text() == before  # nothing saved


def test_route_set_changes_a_live_route_in_place(
    pki: Pki, isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with mtls_server(pki) as old, mtls_server(pki) as new:
        config = two_identities(isolated_home, pki, old.port)
        with DaemonThread(config) as daemon:
            port = daemon.port("api")
            with daemon.connect("api") as held:
                held.sendall(b"to the old one\n")
                assert held.recv(100) == b"to the old one\n"
                assert main(["route", "set", "api", "--target", f"127.0.0.1:{new.port}"]) == 0
                assert f"route api changed: 127.0.0.1:{port} → 127.0.0.1:{new.port} as dev" in capsys.readouterr().out
                assert _echo(port, b"to the new one\n") == b"to the new one\n"  # same port, new target
                held.sendall(b"still the old one\n")  # the open connection is left alone
                assert held.recv(100) == b"still the old one\n"
            assert b"to the new one\n" in new.app_received and b"to the new one" not in old.app_received
            assert old.app_received == b"to the old one\nstill the old one\n"
            assert main(["route", "set", "api"]) == 2
            assert "nothing to change" in capsys.readouterr().err
            assert main(["route", "set", "nope", "--target", "a.test:1"]) == 2
            assert "no route named 'nope'" in capsys.readouterr().err
            assert main(["route", "set", "api", "--identity", "nobody"]) == 2
            assert "command line: --identity = 'nobody': unknown identity" in capsys.readouterr().err
    saved = config.read_text()
    assert f'target = "127.0.0.1:{new.port}"' in saved and f"127.0.0.1:{old.port}" not in saved


def test_reverting_a_rejected_edit_clears_its_warning(pki: Pki, isolated_home: Path) -> None:
    with mtls_server(pki) as server:
        config = two_identities(isolated_home, pki, server.port)
        text = config.read_text()
        with DaemonThread(config) as daemon:
            seen: list[tuple[float, dict[str, Any]]] = []
            threading.Thread(target=_follow, args=(daemon.client(), seen), daemon=True).start()
            wait_until(lambda: seen, timeout=5, what="the events stream")
            config.write_text(text.replace('active_identity = "dev"', 'active_identity = "nobody"'))
            wait_until(lambda: daemon.status()["config"]["error"], timeout=5, what="the bad edit to be rejected")
            assert any("config.toml was not applied" in w for w in daemon.status()["warnings"])
            config.write_text(text)  # put back exactly as it was: the running config, unchanged
            wait_until(lambda: any(e["type"] == "config.reloaded" for _, e in seen), timeout=5, what="config.reloaded")
            status = daemon.status()
            assert status["config"]["error"] is None
            assert not any("config.toml" in w for w in status["warnings"]), status["warnings"]
            assert status["active_identity"] == "dev"


def test_renew_waits_for_the_outcome_and_prints_it(
    pki: Pki, isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki.enroll(isolated_home / "keystore", "ci", "ci-1", cn="ci")  # usable now: no enrollment at start
    failing = ["sh", "-c", "echo 'the CA is down for maintenance' >&2; exit 3"]
    config = write_config(
        isolated_home / "config.toml",
        active="dev",
        identities={"dev": {"renew": "local-ca"}, "ci": {"renew": "command", "renew_command": failing}},
        routes={},
    )
    with DaemonThread(config) as daemon:
        first = daemon.status()["identities"]["dev"]["selected"]["serial"]
        assert main(["renew", "dev"]) == 0
        out = capsys.readouterr().out
        selected = daemon.status()["identities"]["dev"]["selected"]
        assert selected["serial"] != first  # it returned after the renewal, not before
        expires = selected["not_after"].replace("T", " ").replace("Z", " UTC")
        assert re.fullmatch(rf"renewed dev: serial {selected['serial']}, expires {expires} \(took \d+\.\d s\)\n", out)

        assert main(["renew", "ci"]) == 1
        out = capsys.readouterr().out
        assert out.startswith("renewal of ci failed (command): "), out
        assert "the CA is down for maintenance" in out and "the current certificate stays" in out, out

        assert main(["renew", "dev", "--no-wait"]) == 0  # ask only
        assert "renewal of dev started" in capsys.readouterr().out
        assert main(["renew", "dev", "--wait", "soon"]) == 2
        assert "--wait = 'soon'" in capsys.readouterr().err
