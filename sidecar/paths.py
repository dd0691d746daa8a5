"""Where things live: config, keystore, dev CA, logs, the runtime folder and its control socket.

Everything sits under `$MTLS_SIDECAR_HOME` when it is set (or `--home`); otherwise in the
folders `platformdirs` gives for the app name. `$MTLS_SIDECAR_CONFIG` (or `--config`)
moves just the config file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

APP_NAME = "mtls-sidecar"
HOME_ENV = "MTLS_SIDECAR_HOME"
CONFIG_ENV = "MTLS_SIDECAR_CONFIG"
CONTROL_SOCKET_NAME = "control.sock"


@dataclass(frozen=True)
class Places:
    config_file: Path
    keystore: Path
    ca: Path
    logs: Path
    run: Path

    def identity_folder(self, identity: str) -> Path:
        return self.keystore / identity

    @property
    def control_socket(self) -> Path:
        """The daemon's control API (a Unix socket, 0600, in the 0700 runtime folder)."""
        return self.run / CONTROL_SOCKET_NAME


def resolve_places(
    home: Path | str | None = None,
    config: Path | str | None = None,
    env: dict[str, str] | None = None,
) -> Places:
    """Flags win over environment variables, which win over platform defaults."""
    environ = os.environ if env is None else env
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
        places = Places(
            config_file=Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)) / "config.toml",
            keystore=data / "keystore",
            ca=data / "ca",
            logs=Path(platformdirs.user_log_dir(APP_NAME, appauthor=False)),
            run=Path(platformdirs.user_runtime_dir(APP_NAME, appauthor=False)),
        )
    if config_text:
        places = replace(places, config_file=Path(config_text).expanduser().absolute())
    return places
