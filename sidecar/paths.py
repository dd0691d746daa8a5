"""Where things live: config, keystore, dev CA, logs, the runtime folder and its control socket.

Everything sits under `$MTLS_SIDECAR_HOME` when it is set (or `--home`); otherwise in the
folders `platformdirs` gives for the app name. `$MTLS_SIDECAR_CONFIG` (or `--config`)
moves just the config file.

The runtime folder (the control socket's home) is `$XDG_RUNTIME_DIR/mtls-sidecar` when that
variable is set. Where it is not (a `su` shell, a container, cron), Linux and the BSDs fall
back without a Python warning: to `/run/user/<uid>/mtls-sidecar` when the login manager made
that folder for this user (0700, owned by them: where a daemon started by systemd has its
socket), else to `$XDG_CACHE_HOME/mtls-sidecar/run` (`~/.cache/mtls-sidecar/run`), which the
daemon creates 0700 and refuses when it is another user's. `Places.run_fallback` says why,
for the daemon's log.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

APP_NAME = "mtls-sidecar"
HOME_ENV = "MTLS_SIDECAR_HOME"
CONFIG_ENV = "MTLS_SIDECAR_CONFIG"
RUNTIME_ENV = "XDG_RUNTIME_DIR"
CONTROL_SOCKET_NAME = "control.sock"
CONTROL_FILE_NAME = "control.json"
LOCK_FILE_NAME = "daemon.lock"
# Where logind makes each logged-in user's runtime folder, /run/user/<uid>.
LOGIN_RUNTIME_ROOT = Path("/run/user")


@dataclass(frozen=True)
class Places:
    config_file: Path
    keystore: Path
    ca: Path
    logs: Path
    run: Path
    # Why `run` is a fallback rather than $XDG_RUNTIME_DIR or $MTLS_SIDECAR_HOME ("" when it is not).
    run_fallback: str = ""

    def identity_folder(self, identity: str) -> Path:
        return self.keystore / identity

    @property
    def control_socket(self) -> Path:
        """The daemon's control API (a Unix socket, 0600, in the 0700 runtime folder)."""
        return self.run / CONTROL_SOCKET_NAME

    @property
    def control_file(self) -> Path:
        """With the loopback transport (`control = "tcp"`): the port, token, pid and version (0600)."""
        return self.run / CONTROL_FILE_NAME

    @property
    def scratch(self) -> Path:
        """Short-lived private files (a renew_command's decrypted key), in the runtime folder;
        emptied at every daemon start."""
        return self.run / "scratch"

    @property
    def lock_file(self) -> Path:
        """The daemon's lock, in the data folder beside the keystore: one daemon per data folder."""
        return self.keystore.parent / LOCK_FILE_NAME


def resolve_places(
    home: Path | str | None = None,
    config: Path | str | None = None,
    env: Mapping[str, str] | None = None,
) -> Places:
    """Flags win over environment variables, which win over platform defaults."""
    environ: Mapping[str, str] = os.environ if env is None else env
    home_text = str(home) if home else environ.get(HOME_ENV)
    config_text = str(config) if config else environ.get(CONFIG_ENV)
    if home_text:
        base = Path(home_text).expanduser().absolute()
        places = Places(
            config_file=base / "config.toml",
            keystore=base / "keystore",
            ca=base / "ca",
            logs=base / "logs",
            run=base / "run",
        )
    else:
        import platformdirs  # deferred: it reads the environment when called

        data = Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))
        run, why = runtime_folder(environ)
        places = Places(
            config_file=Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)) / "config.toml",
            keystore=data / "keystore",
            ca=data / "ca",
            logs=Path(platformdirs.user_log_dir(APP_NAME, appauthor=False)),
            run=run,
            run_fallback=why,
        )
    if config_text:
        places = replace(places, config_file=Path(config_text).expanduser().absolute())
    return places


def runtime_folder(
    environ: Mapping[str, str],
    platform: str = sys.platform,
    login_root: Path | None = None,
) -> tuple[Path, str]:
    """The runtime folder, and why it is a fallback ("" when $XDG_RUNTIME_DIR gave it).

    Never asks platformdirs on Linux/BSD: there it warns (a raw `RuntimeDirWarning` on every
    command) when $XDG_RUNTIME_DIR is unset, and its last resort is a folder in /tmp, which
    other users can take first and tmp cleaners empty under a long-running daemon.
    """
    xdg = environ.get(RUNTIME_ENV, "")
    if os.path.isabs(xdg):
        return Path(xdg) / APP_NAME, ""
    if platform in ("darwin", "win32"):  # no runtime-dir variable there: the platform's own place
        import platformdirs

        return Path(platformdirs.user_runtime_dir(APP_NAME, appauthor=False)), ""
    why = f"{RUNTIME_ENV} is not set" if not xdg else f"{RUNTIME_ENV} is not an absolute path ({xdg!r})"
    login = (login_root or LOGIN_RUNTIME_ROOT) / str(os.getuid())
    if _is_own_private_dir(login):
        return login / APP_NAME, why
    cache_text = environ.get("XDG_CACHE_HOME", "")  # the XDG rule platformdirs follows for its cache folder
    cache = Path(cache_text) if os.path.isabs(cache_text) else Path(environ.get("HOME") or Path.home()) / ".cache"
    return cache / APP_NAME / "run", why


def runtime_folder_problem(folder: Path) -> str | None:
    """Why the existing runtime folder `folder` must not be used, or None (also when it is not there yet).

    The control socket lives there: a folder another user owns, or may write into, lets them
    put their own socket in its place, answer our commands and read what we send.
    """
    try:
        info = folder.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(info.st_mode):  # lstat: a symlink is not a folder here
        return f"the runtime folder {folder} is a symlink or a file, not a folder; move it away"
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return (
            f"the runtime folder {folder} belongs to another user (uid {info.st_uid}); refusing to use it. "
            "Point MTLS_SIDECAR_HOME (or XDG_RUNTIME_DIR) at a folder of your own"
        )
    if info.st_mode & 0o022:
        return (
            f"the runtime folder {folder} is writable by other users (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"refusing to use it until you run: chmod 700 '{folder}'"
        )
    return None


def _is_own_private_dir(path: Path) -> bool:
    """A real folder (not a symlink) of this user that nobody else can enter."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077
