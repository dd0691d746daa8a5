"""The CLI's client commands start fast: what they import, checked without a clock (issue 18, item 7).

Each command runs in a fresh interpreter, so its start-up is mostly imports. A command that finds
no daemon needs argparse, the paths and a socket; the event loop, TLS, HTTP, json, the status
table and the config parser (with cryptography) are imported only by the commands that use them,
and only once they need them (http.client once a daemon answers). These fail when an eager
import comes back; tests/test_architecture.py keeps the daemon's modules out of the same path.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Not loaded by a client command that finds no daemon (each name covers its submodules too).
HEAVY = (
    "asyncio",
    "concurrent",
    "ssl",
    "_ssl",
    "http",  # http.client: only once a daemon answers (it imports ssl and email)
    "email",
    "logging",
    "cryptography",
    "h11",
    "tomllib",
    "platformdirs",  # MTLS_SIDECAR_HOME is set (conftest): nothing to ask it
    "sidecar.config",
    "sidecar.statusview",
    "sidecar.causes",
    "sidecar.peercred",
    "sidecar.eventloop",
    "sidecar.daemon",
    "sidecar.tunnel",
)

# Runs `main(argv)`, then prints (after what the command printed) its exit code and every module it
# loaded that the bare interpreter (site, .pth files) had not.
PROBE = """
import sys
before = set(sys.modules)
from sidecar.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
loaded = sorted(set(sys.modules) - before)
print("---", code)
print("\\n".join(loaded))
"""


def _loads(argv: list[str]) -> tuple[int, str, list[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60, check=False)
    _, _, probed = ("\n" + done.stdout).rpartition("\n--- ")
    code, *loaded = probed.splitlines()
    return int(code), done.stderr, loaded


def _heavy(loaded: list[str], heavy: tuple[str, ...] = HEAVY) -> list[str]:
    return [m for m in loaded if any(m == name or m.startswith(name + ".") for name in heavy)]


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["status", "--json"],
        ["identity", "list"],
        ["use", "dev"],
        ["use", "dev", "--route", "web"],
        ["renew", "dev"],
        ["renew", "dev", "--no-wait"],
        ["check", "web"],
        ["check", "--via-proxy", "db.corp.example:5432"],
        ["route", "list"],
        ["route", "rm", "web"],
        ["route", "add", "web", "--listen", "127.0.0.1:15432", "--target", "db.corp.example:5432"],
    ],
    ids=" ".join,
)
def test_a_client_command_that_finds_no_daemon_imports_nothing_heavy(argv: list[str], isolated_home: Path) -> None:
    code, stderr, loaded = _loads(argv)
    socket = isolated_home / "run" / "control.sock"
    assert (code, stderr) == (
        3,
        f"mtls-sidecar: the mtls-sidecar daemon is not running (no control socket at {socket}); "
        "start it with `mtls-sidecar run`\n",
    )
    assert "sidecar.control.client" in loaded  # the probe saw the command's imports
    assert _heavy(loaded) == []


def test_status_needs_no_json_until_a_daemon_answers() -> None:
    code, _, loaded = _loads(["status", "--json"])
    assert code == 3
    assert _heavy(loaded, ("json",)) == []


def test_help_imports_no_command() -> None:
    code, _, loaded = _loads(["--help"])
    assert code == 0
    assert _heavy(loaded, (*HEAVY, "sidecar.cli.control", "sidecar.control", "socket")) == []


def test_a_stale_control_json_is_not_running_and_imports_only_json(isolated_home: Path) -> None:
    """A control.json left by a killed daemon (the loopback transport): exit 3, and json is all it adds."""
    run = isolated_home / "run"
    run.mkdir(mode=0o700)
    control_file = run / "control.json"
    control_file.write_text('{"port": 1, "token": "x", "pid": 2147483646, "version": "0"}')
    code, stderr, loaded = _loads(["status"])
    assert (code, stderr) == (
        3,
        "mtls-sidecar: the mtls-sidecar daemon is not running (control.json was left by a daemon that is gone "
        f"(pid 2147483646) at {control_file}); start it with `mtls-sidecar run`\n",
    )
    assert _heavy(loaded) == []
