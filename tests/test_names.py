"""Names are names, not paths: identities, routes and dev-CA server names follow one rule
wherever they enter (config.toml, the CLI, the control API), nothing is written outside its
folder, and a folder the sidecar did not create is never chmodded.

The real CLI (`main`), real files, a real daemon on its control socket.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.config import parse_config
from sidecar.errors import ConfigError, LocalSetupError
from sidecar.files import ensure_private_dir
from sidecar.names import NAME_RULE, inside, name_problem, server_name_problem
from tests.controlhttp import request
from tests.daemon_runner import DaemonThread
from tests.pki import CA
from tests.realservers import free_port
from tests.scenario import Pki, one_route_config

# Runs anywhere: pure logic, or loopback sockets only (the macOS and Windows CI jobs run it).
pytestmark = pytest.mark.portable


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def test_the_rule() -> None:
    for good in ("dev", "ci-bot", "corp.2026", "a", "A_b-c.d", "x" * 64):
        assert name_problem(good) is None, good
    for bad in ("", ".", "..", "../x", "/tmp", "a/b", ".hidden", "-x", "_x", "x" * 65, "é", "a b", "a\0b", 7):
        assert name_problem(bad) == f"invalid name: {NAME_RULE}", bad
    for good in ("localhost", "api.example.test", "*.example.test", "127.0.0.1", "::1", "a-b.c"):
        assert server_name_problem(good) is None, good
    for bad in ("../../x", "/x", "a..b", "-a.test", "a-.test", "a_b.test", "x" * 64 + ".test", ".test", "a*.test", ""):
        assert server_name_problem(bad) is not None, bad


def test_inside_refuses_what_leads_out(tmp_path: Path) -> None:
    assert inside(tmp_path, "dev") == tmp_path / "dev"
    for name in ("..", "../x", "/tmp", "a/../../x", ".", ""):
        with pytest.raises(LocalSetupError, match="would lead outside"):
            inside(tmp_path, name)


def test_identity_names_that_are_paths_are_refused(
    isolated_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    public = tmp_path / "public"  # a folder like /tmp: sticky, world-writable, not ours to tighten
    public.mkdir()
    public.chmod(0o1777)
    before = files_under(tmp_path)
    for name in ("../../x", "../x", str(public), "..", "x" * 65):
        assert main(["identity", "new", name]) == 2, name
        err = capsys.readouterr().err
        assert f"NAME = {name!r}: invalid name: {NAME_RULE}" in err, err
    corp = CA("Example Corp Issuing CA 1")
    p12 = corp.client("alice").write_p12(tmp_path / "in", "alice.p12", b"pw")
    for name in ("../../x", str(public)):
        assert main(["identity", "import", str(p12), "--name", name, "--password-env", "CORP_P12"]) == 2
        err = capsys.readouterr().err
        assert f"--name = {name!r}: invalid name: {NAME_RULE}" in err, err
    assert files_under(tmp_path) - before == {p12}  # nothing written anywhere, outside or in
    assert stat.S_IMODE(public.stat().st_mode) == 0o1777


def test_ca_server_names_are_dns_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a" / "D"
    for name in ("../../x", "/etc/x", "a..b", "x_y.test"):
        assert main(["ca", "server", name, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"NAME = {name!r}: not a server name: use a DNS name" in err, err
    assert not [p for p in files_under(tmp_path) if p.suffix in (".crt", ".key") and p.parent.name != "ca"]
    assert not out.exists()
    assert main(["ca", "server", "localhost", "*.svc.test", "--out", str(out)]) == 0
    assert {p.name for p in files_under(out)} == {"localhost.crt", "localhost.key"}


def test_a_long_identity_name_in_config_is_refused() -> None:
    name = "a" * 256
    text = f'active_identity = "{name}"\n[identities.{name}]\nrenew = "none"\n'
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="config.toml")
    assert caught.value.field == f"identities.{name}"
    assert caught.value.message == f"invalid name: {NAME_RULE}"


def test_a_folder_not_made_here_is_never_chmodded(tmp_path: Path) -> None:
    public = tmp_path / "public"
    public.mkdir()
    public.chmod(0o1777)
    assert ensure_private_dir(public) == public
    assert stat.S_IMODE(public.stat().st_mode) == 0o1777
    made = ensure_private_dir(public / "ours" / "deeper")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    assert stat.S_IMODE(public.stat().st_mode) == 0o1777


def test_a_huge_route_name_through_the_api_is_refused(tmp_path: Path, isolated_home: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    config = one_route_config(isolated_home, pki, free_port())
    before = config.read_text()
    with DaemonThread(config) as daemon:
        body = {"name": "r" * 100_000, "listen": "127.0.0.1:0", "target": "127.0.0.1:9"}
        status, answer = request(daemon.socket, "POST", "/v1/routes", json.dumps(body).encode())
        assert (status, answer["field"]) == (400, "name")
        assert answer["error"] == f"name = '{'r' * 40}…(100000 characters)': invalid name: {NAME_RULE}"
        for bad in ("../x", ".hidden"):
            status, answer = request(daemon.socket, "POST", "/v1/routes", json.dumps({**body, "name": bad}).encode())
            assert (status, answer["field"]) == (400, "name"), answer
        assert set(daemon.status()["routes"]) == {"svc"}
    assert config.read_text() == before
