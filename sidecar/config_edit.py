"""Changes made at run time, written back into the user's config.toml.

Pure text → text with tomlkit, so the user's comments and layout survive. The caller
validates the result with `parse_config` before writing it (atomically) and applying it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tomlkit
from tomlkit.items import Table


def set_active_identity(text: str, name: str) -> str:
    doc = tomlkit.parse(text)
    doc["active_identity"] = name
    return tomlkit.dumps(doc)


def set_route_identity(text: str, route: str, identity: str | None) -> str:
    doc = tomlkit.parse(text)
    table = _route_table(doc, route)
    if identity is None:
        table.pop("identity", None)
    else:
        table["identity"] = identity
    return tomlkit.dumps(doc)


def add_route(text: str, name: str, fields: Mapping[str, Any]) -> str:
    doc = tomlkit.parse(text)
    routes = doc.get("routes")
    if routes is None:
        routes = tomlkit.table(is_super_table=True)
        doc["routes"] = routes
    if name in routes:
        raise KeyError(f"a route named {name!r} exists already")
    table = tomlkit.table()
    for key, value in fields.items():
        if value is not None:
            table[key] = value
    routes[name] = table
    return tomlkit.dumps(doc)


def set_route(text: str, name: str, fields: Mapping[str, Any]) -> str:
    """Change some keys of route `name` in place; a None value removes that key (its default applies)."""
    doc = tomlkit.parse(text)
    table = _route_table(doc, name)
    for key, value in fields.items():
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    return tomlkit.dumps(doc)


def remove_route(text: str, name: str) -> str:
    doc = tomlkit.parse(text)
    routes = doc.get("routes")
    if routes is None or name not in routes:
        raise KeyError(f"no route named {name!r}")
    del routes[name]
    return tomlkit.dumps(doc)


def _route_table(doc: tomlkit.TOMLDocument, route: str) -> Table:
    routes = doc.get("routes")
    if routes is None or route not in routes:
        raise KeyError(f"no route named {route!r}")
    table = routes[route]
    assert isinstance(table, Table)
    return table
