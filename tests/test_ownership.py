"""Folders and sockets are ours, or we refuse (issue 16, point 4).

Real files, real sockets and, where ownership matters, a real second OS user (made as
tests/test_other_user.py makes it, and run under `setpriv`).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.test_cli import LogFollower


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_under_umask_000_every_folder_is_0700_and_the_log_is_0600(tmp_path: Path) -> None:
    home = tmp_path / "not" / "yet" / "home"  # parents the daemon makes too
    env = {**os.environ, "MTLS_SIDECAR_HOME": str(home)}
    env.pop("MTLS_SIDECAR_CONFIG", None)
    proc = subprocess.Popen(
        ["sh", "-c", f"umask 000 && exec {sys.executable} -m sidecar run"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    follower = LogFollower(proc)
    try:
        follower.wait_for(r"control API on")
        follower.wait_for(r"listening on")
        folders = [tmp_path / "not", tmp_path / "not" / "yet", home, home / "keystore", home / "logs", home / "run"]
        folders += [p for p in (home / "keystore").iterdir() if p.is_dir()]
        assert {str(f): oct(_mode(f)) for f in folders} == {str(f): oct(0o700) for f in folders}
        log_file = home / "logs" / "daemon.log"
        assert _mode(log_file) == 0o600
        assert _mode(home / "config.toml") == 0o600
        assert _mode(home / "run" / "control.sock") == 0o600
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        follower.join()
        assert proc.stderr is not None
        proc.stderr.close()
