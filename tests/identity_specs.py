"""An IdentitySpec from plain keys, parsed as the daemon parses config.toml (so checked too)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomlkit

from sidecar.config import IdentitySpec, parse_config


def identity_spec(name: str, *, base_dir: Path | None = None, **keys: Any) -> IdentitySpec:
    """The spec of `[identities.NAME]` with `keys` (None values left out)."""
    table = {key: value for key, value in keys.items() if value is not None}
    text = tomlkit.dumps({"identities": {name: table}})
    return parse_config(text, source="config.toml", base_dir=base_dir).identities[name]
