"""Imports follow the arrows: the import-linter contracts in pyproject.toml, and what really loads.

`lint-imports` reads every import statement (lazy ones inside functions too); the second test
checks at run time what importing the tray and the CLI's client side pulls in.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Modules that do asyncio I/O or run the daemon: a client (tray, `status`, `use`, `route`, `check`)
# talks to the daemon over its socket and needs none of them.
DAEMON_SIDE = (
    "sidecar.daemon",
    "sidecar.tunnel",
    "sidecar.control.server",
    "sidecar.control.api",
    "sidecar.check.observe",
    "sidecar.revocation.checker",
    "sidecar.renewal.scheduler",
    "sidecar.watch",
    "sidecar.eventloop",
)


def test_import_contracts_hold() -> None:
    lint = shutil.which("lint-imports")
    assert lint is not None, "import-linter is not installed: pip install -e '.[test]'"
    done = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout


def test_the_tray_and_the_client_commands_load_no_daemon_side_module() -> None:
    probe = (
        "import sys, tray.app, sidecar.cli, sidecar.cli.control; "
        f"print(sorted(m for m in {DAEMON_SIDE!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


def test_the_pure_core_loads_no_event_loop() -> None:
    pure = "sidecar.causes, sidecar.tlspipe, sidecar.stages, sidecar.config, sidecar.keystore, tray.model"
    probe = (
        f"import sys, {pure}; print('asyncio' in sys.modules, 'threading' in sys.modules and 'watchdog' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["False", "False"]
