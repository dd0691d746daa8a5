"""A first run with no config: write a working default config (dev CA, an identity, a demo route)."""

from __future__ import annotations

import getpass
import logging
import socket

from sidecar.config import Config, default_config_text, load_config
from sidecar.devca import ca_paths
from sidecar.files import atomic_write, ensure_private_dir
from sidecar.paths import Places

log = logging.getLogger("sidecar.daemon")

PREFERRED_ROUTE_PORT = 18080
PREFERRED_DEMO_PORT = 18443


def load_or_create_config(places: Places) -> tuple[Config, bool]:
    """Load the config, or write the default one first; returns (config, created)."""
    if places.config_file.exists():
        return load_config(places.config_file), False
    ensure_private_dir(places.config_file.parent)
    atomic_write(places.config_file, default_config_for(places).encode(), 0o600)
    log.info("first run: wrote a default config to %s", places.config_file)
    return load_config(places.config_file), True


def default_config_for(places: Places) -> str:
    """The text a first run writes: an identity for this user, the demo service and its route."""
    route_port = pick_port(PREFERRED_ROUTE_PORT)
    demo_port = pick_port(PREFERRED_DEMO_PORT, avoid={route_port})
    return default_config_text(
        user=current_user(), ca_file=ca_paths(places.ca)[0], route_port=route_port, demo_port=demo_port
    )


def current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in the environment or the password database
        return "dev"


def pick_port(preferred: int, avoid: set[int] | None = None) -> int:
    """`preferred` when it is free on 127.0.0.1, else any free port."""
    for candidate in (preferred, 0):
        if candidate and avoid and candidate in avoid:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            port: int = sock.getsockname()[1]
            if not avoid or port not in avoid:
                return port
    raise OSError("no free port on 127.0.0.1")
