"""Where things live: `Places`, the control socket, the runtime folder."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sidecar.control.server import own_private_folder
from sidecar.errors import LocalSetupError
from sidecar.paths import APP_NAME, HOME_ENV, RUNTIME_ENV, resolve_places, runtime_folder
from tests.test_cli import LogFollower


def test_the_control_socket_is_a_place(isolated_home: Path) -> None:
    places = resolve_places()
    assert places.run == isolated_home / "run"
    assert places.control_socket == isolated_home / "run" / "control.sock"


def test_clients_find_the_socket_without_the_control_server() -> None:
    """The tray and the CLI's client commands get the path from `Places`, not from the server module."""
    probe = (
        "import sys, tray.app, sidecar.cli.control; "
        "print(sorted(m for m in ('sidecar.control.server', 'sidecar.daemon') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


# -- the runtime folder when $XDG_RUNTIME_DIR is unset ---------------------------------------


def test_runtime_folder_from_xdg_runtime_dir(tmp_path: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "xdg-run"), "HOME": str(tmp_path / "user")}
    assert runtime_folder(env, platform="linux", login_root=tmp_path / "login") == (tmp_path / "xdg-run" / APP_NAME, "")


def test_runtime_folder_falls_back_to_the_login_managers_folder(tmp_path: Path) -> None:
    login = tmp_path / "login" / str(os.getuid())
    login.mkdir(parents=True, mode=0o700)
    env = {"HOME": str(tmp_path / "user")}
    folder, why = runtime_folder(env, platform="linux", login_root=tmp_path / "login")
    assert (folder, why) == (login / APP_NAME, "XDG_RUNTIME_DIR is not set")


def test_runtime_folder_falls_back_to_the_cache_folder(tmp_path: Path) -> None:
    login = tmp_path / "login" / str(os.getuid())
    login.mkdir(parents=True)
    login.chmod(0o755)  # not a login manager's private folder: not used
    home = {"HOME": str(tmp_path / "user")}
    folder, why = runtime_folder(home, platform="linux", login_root=tmp_path / "login")
    assert (folder, why) == (tmp_path / "user" / ".cache" / APP_NAME / "run", "XDG_RUNTIME_DIR is not set")
    cache = {**home, "XDG_CACHE_HOME": str(tmp_path / "cache"), "XDG_RUNTIME_DIR": "relative/run"}
    folder, why = runtime_folder(cache, platform="linux", login_root=tmp_path / "login")
    assert folder == tmp_path / "cache" / APP_NAME / "run"
    assert why == "XDG_RUNTIME_DIR is not an absolute path ('relative/run')"


def test_resolving_places_without_xdg_runtime_dir_warns_nothing(tmp_path: Path) -> None:
    """In a fresh interpreter, with every warning an error: platformdirs' RuntimeDirWarning warns once per process."""
    env = _no_runtime_dir_env(tmp_path / "cache")
    code = f"import sidecar.paths as p; p.LOGIN_RUNTIME_ROOT = p.Path({str(tmp_path / 'no-login')!r}); "
    code += "print(p.resolve_places().run)"
    command = [sys.executable, "-W", "error", "-c", code]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert done.stdout.strip() == str(tmp_path / "cache" / APP_NAME / "run")


def test_run_without_xdg_runtime_dir_says_where_in_one_line_and_makes_it_private(tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="c") as short:  # a socket path has ~100 bytes at most
        env = _no_runtime_dir_env(Path(short))
        folder = Path(short) / APP_NAME / "run"
        command = [sys.executable, "-c", _WITH_LOGIN_ROOT, str(tmp_path / "no-login"), "run"]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        log = LogFollower(proc)
        try:
            log.wait_for(r"control API on ")
            said = [line for line in log.lines if str(folder) in line]
            assert len(said) == 2, log.text  # the fallback, then the control API on its socket
            fallback = f"XDG_RUNTIME_DIR is not set: the runtime folder (control socket) is {folder}, yours only (0700)"
            assert said[0].rstrip().endswith(f"sidecar.cli: {fallback}")
            assert said[1].rstrip().endswith(f"control API on {folder / 'control.sock'}")
            info = folder.stat()
            assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o700, os.getuid())

            status = subprocess.run(
                [sys.executable, "-c", _WITH_LOGIN_ROOT, str(tmp_path / "no-login"), "status", "--json"],
                capture_output=True, text=True, env=env, timeout=60,
            )  # fmt: skip
            assert (status.returncode, status.stderr) == (0, ""), status.stderr
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, log.text
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            log.join()
            for stream in (proc.stdout, proc.stderr):
                assert stream is not None
                stream.close()
        assert "Warning" not in log.text, log.text


def test_a_client_command_without_xdg_runtime_dir_names_the_socket_and_warns_nothing(tmp_path: Path) -> None:
    env = _no_runtime_dir_env(tmp_path / "cache")
    command = [sys.executable, "-c", _WITH_LOGIN_ROOT, str(tmp_path / "no-login"), "status"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    socket = tmp_path / "cache" / APP_NAME / "run" / "control.sock"
    assert done.returncode == 3
    assert done.stderr == (
        f"mtls-sidecar: the mtls-sidecar daemon is not running (no control socket at {socket}); "
        "start it with `mtls-sidecar run`\n"
    )


def test_the_runtime_folder_is_made_private_and_a_foreign_one_refused(tmp_path: Path) -> None:
    made = tmp_path / "made" / "run"
    own_private_folder(made)
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o755)
    own_private_folder(loose)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700  # repaired

    link = tmp_path / "link"
    link.symlink_to(made)
    with pytest.raises(LocalSetupError, match="is a symlink or a file, not a folder; move it away"):
        own_private_folder(link)

    if os.getuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o755)
        os.chown(foreign, 65534, 65534)
    else:
        foreign = Path("/")  # root's
    with pytest.raises(LocalSetupError, match=r"belongs to another user \(uid \d+\); refusing to use it"):
        own_private_folder(foreign)
    assert stat.S_IMODE(foreign.stat().st_mode) == 0o755  # not touched


# Runs the CLI with the login manager's folder (/run/user) moved, so the test sees the same
# fallback on every machine and never touches a real session's runtime folder.
_WITH_LOGIN_ROOT = (
    "import sys; from pathlib import Path; import sidecar.paths as p; "
    "p.LOGIN_RUNTIME_ROOT = Path(sys.argv[1]); from sidecar.cli import main; sys.exit(main(sys.argv[2:]))"
)


def _no_runtime_dir_env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (RUNTIME_ENV, HOME_ENV)}
    env["XDG_CACHE_HOME"] = str(cache)
    return env
