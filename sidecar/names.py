"""Names are names, not paths: the one rule for identities, routes and dev-CA server names.

An identity's name is also its keystore folder, a dev-CA server name is also a file name:
a name that may hold `/`, `..` or 300 bytes would write outside its folder or past what a
filesystem takes. Every place a name enters (config.toml, the CLI, the control API) checks
it here, and a path is built from a checked name only through `inside`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

from sidecar.errors import LocalSetupError

NAME_RULE = "1 to 64 characters: letters, digits, '_', '.' and '-', beginning with a letter or digit"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

DNS_RULE = (
    "a DNS name (labels of letters, digits and '-', 63 characters each, 253 in all; '*.' may begin it) or an IP address"
)
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def name_problem(name: object) -> str | None:
    """Why `name` cannot name an identity or a route, or None."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        return f"invalid name: {NAME_RULE}"
    return None


def server_name_problem(name: str) -> str | None:
    """Why `name` cannot be a dev-CA server certificate's name (a DNS name or IP address), or None."""
    try:
        ipaddress.ip_address(name)
        return None
    except ValueError:
        pass
    labels = name.removeprefix("*.").split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return f"not a server name: use {DNS_RULE}"
    return None


def inside(folder: Path, name: str) -> Path:
    """`folder / name`, after checking that it lies in `folder`: no `..`, no absolute name.

    The folder is resolved, the name is not followed: an identity folder the user made a
    symlink on purpose stays theirs to make.
    """
    base = folder.resolve()
    path = Path(os.path.normpath(base / name))
    if path == base or not path.is_relative_to(base):
        raise LocalSetupError(f"{name!r} would lead outside {folder}; a name is {NAME_RULE}")
    return folder / name
