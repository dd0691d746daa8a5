"""Where things live: `Places`, the control socket, the runtime folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sidecar.paths import resolve_places


def test_the_control_socket_is_a_place(isolated_home: Path) -> None:
    places = resolve_places()
    assert places.run == isolated_home / "run"
    assert places.control_socket == isolated_home / "run" / "control.sock"


def test_clients_find_the_socket_without_the_control_server() -> None:
    """The tray and the CLI's client commands get the path from `Places`, not from the server module."""
    probe = (
        "import sys, tray.app, sidecar.cli_control; "
        "print(sorted(m for m in ('sidecar.control.server', 'sidecar.daemon') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"
