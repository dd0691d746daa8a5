"""The proxy as the CLI, the control API and the tray show and steer it, against a real nginx."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import tomlkit

from sidecar.cli import main
from tests.daemon_runner import DaemonThread
from tests.realservers import nginx_mtls, require_binary
from tests.scenario import Pki
from tray.model import build_menu

NAME = "api.one.test"


@pytest.fixture
def daemon(isolated_home: Path, tmp_path: Path) -> Iterator[DaemonThread]:
    require_binary("curl")
    pki = Pki.create(tmp_path / "pki", NAME)
    pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev-cn")
    with nginx_mtls(
        tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.client_ca_file
    ) as nginx:
        doc = {
            "identities": {"dev": {"renew": "none"}},
            "proxy": {
                "listen": "127.0.0.1:0",
                "rules": [
                    {
                        "name": "one",
                        "hosts": [NAME, "*.one.test"],
                        "ports": [443],
                        "ca_file": str(pki.server_ca_file),
                        "connect": f"127.0.0.1:{nginx.port}",
                    },
                    {"name": "wrong-ca", "hosts": ["bad.two.test"], "connect": f"127.0.0.1:{nginx.port}"},
                ],
            },
        }
        config = isolated_home / "config.toml"
        config.write_text(tomlkit.dumps(doc))
        with DaemonThread(config) as running:
            yield running


def proxy_url(daemon: DaemonThread) -> str:
    return str(daemon.status()["proxy"]["url"])


def test_status_shows_the_proxy_its_rules_and_destinations(
    daemon: DaemonThread, capsys: pytest.CaptureFixture[str]
) -> None:
    url = proxy_url(daemon)
    got = subprocess.run(["curl", "-sS", "-x", url, f"http://{NAME}/"], capture_output=True, text=True, timeout=20)
    assert "CN=dev-cn" in got.stdout, got.stderr
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert f"PROXY {url} (up) · PAC {url}/proxy.pac · 1 connections" in out
    assert " one " in out and f"{NAME}, *.one.test" in out
    assert f" {NAME}:443" in out and "ok" in out

    assert main(["status", "--json"]) == 0
    proxy = json.loads(capsys.readouterr().out)["proxy"]
    assert proxy["rules"][0]["connections"] == 1 and proxy["rules"][0]["bytes_in"] > 0
    assert proxy["destinations"][0]["host"] == NAME and proxy["destinations"][0]["identity"] == "dev"


def test_proxy_env_and_pac_name_the_bound_port(daemon: DaemonThread, capsys: pytest.CaptureFixture[str]) -> None:
    url = proxy_url(daemon)
    assert main(["proxy", "env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"export http_proxy={url}" in lines and f"export HTTP_PROXY={url}" in lines
    assert f"export ALL_PROXY={url.replace('http://', 'socks5h://')}" in lines
    assert any(line.startswith("export NO_PROXY=localhost,127.0.0.1") for line in lines)
    assert not any("https_proxy" in line for line in lines)  # a CONNECT with the client's own TLS cannot work
    assert main(["proxy", "env", "--shell", "fish"]) == 0
    assert f"set -gx http_proxy {url}" in capsys.readouterr().out

    assert main(["proxy", "pac"]) == 0
    pac = capsys.readouterr().out
    assert f'"PROXY {url.removeprefix("http://")}"' in pac and f'host == "{NAME}"' in pac and '"DIRECT"' in pac
    served = subprocess.run(["curl", "-sS", f"{url}/proxy.pac"], capture_output=True, text=True, timeout=20)
    assert served.stdout == pac


def test_check_via_proxy_explains_in_one_line(daemon: DaemonThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--via-proxy", f"{NAME}:443"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("ok: ") and first.endswith("(proxy rule one, as dev)")

    assert main(["check", "--via-proxy", "bad.two.test"]) == 1  # port 443 by default; no ca_file: system trust
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("problem: ") and "(proxy rule wrong-ca, as dev)" in first

    assert main(["check", "--via-proxy", "elsewhere.example:443", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["cause"] == "proxy_not_allowed" and result["rule"] is None

    assert main(["check", "--via-proxy", f"{NAME}:8443"]) == 1
    assert "only on port(s) 443" in capsys.readouterr().out

    assert main(["check"]) == 2
    assert "needs a ROUTE or --via-proxy" in capsys.readouterr().err


def test_the_tray_menu_shows_the_proxy_and_its_rules(daemon: DaemonThread) -> None:
    status = daemon.status()
    menu = build_menu(status, datetime.now(UTC))
    proxy = next(item for item in menu if item.text.startswith("Proxy "))
    assert proxy.text == f"Proxy {status['proxy']['listen']} · 2 rules"
    texts = [item.text for item in proxy.submenu]
    assert f"one: {NAME}, *.one.test · as dev · 0 connections" in texts
    assert any(item.action == "copy-proxy:pac_url" and item.text.endswith("/proxy.pac") for item in proxy.submenu)
