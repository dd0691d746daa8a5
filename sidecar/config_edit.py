"""Changes made at run time, written back into the user's config.toml.

Pure text → text with tomlkit, so the user's comments and layout survive. The caller
validates the result with `parse_config` before writing it (atomically) and applying it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tomlkit
from tomlkit.items import Comment, InlineTable, Table, Whitespace


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


def add_identity(text: str, name: str, fields: Mapping[str, Any], comment: str | None = None) -> str:
    """Add [identities.NAME] after the last identity, with `comment` on the line above it.

    Comments and blank lines that closed the previous last identity (they introduce whatever
    table follows) move below the new one, so they stay with what they describe.
    """
    doc = tomlkit.parse(text)
    identities = doc.get("identities")
    if identities is None:
        identities = tomlkit.table(is_super_table=True)
        doc["identities"] = identities
    if name in identities:
        raise KeyError(f"an identity named {name!r} exists already")
    if "active_identity" not in doc and len(identities) == 1:
        # One identity was the active one without saying so; with two, the config must say which.
        doc["active_identity"] = next(iter(identities))
    last = next(reversed(list(identities.values())), None)
    if isinstance(identities, InlineTable) or isinstance(last, InlineTable):
        inline = tomlkit.inline_table()
        inline.update({key: value for key, value in fields.items() if value is not None})
        identities[name] = inline
        return tomlkit.dumps(doc)
    table = tomlkit.table()
    for key, value in fields.items():
        if value is not None:
            table[key] = value
    if isinstance(last, Table):
        for item in _pop_trailing_trivia(last):
            table.add(item)
        last.add(tomlkit.nl())
        if comment:
            last.add(tomlkit.comment(comment))
    identities[name] = table
    identities[name].trivia.indent = ""  # the blank line is already there, above the comment
    return tomlkit.dumps(doc)


def set_identity_fields(text: str, name: str, fields: Mapping[str, Any]) -> str:
    """Set keys of [identities.NAME]; a None value removes that key."""
    doc = tomlkit.parse(text)
    identities = doc.get("identities")
    if identities is None or name not in identities:
        raise KeyError(f"no identity named {name!r}")
    table = identities[name]
    trailing = _pop_trailing_trivia(table) if isinstance(table, Table) else []
    for key, value in fields.items():
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    for item in trailing:  # new keys go above the comments that introduce the next table
        table.add(item)
    return tomlkit.dumps(doc)


def _pop_trailing_trivia(table: Table) -> list[Comment | Whitespace]:
    """Remove the comments and blank lines at the end of `table`'s body; return them in order."""
    body = table.value.body
    trailing: list[Comment | Whitespace] = []
    while body and body[-1][0] is None and isinstance(item := body[-1][1], Comment | Whitespace):
        body.pop()
        trailing.insert(0, item)
    return trailing


def _route_table(doc: tomlkit.TOMLDocument, route: str) -> Table:
    routes = doc.get("routes")
    if routes is None or route not in routes:
        raise KeyError(f"no route named {route!r}")
    table = routes[route]
    assert isinstance(table, Table)
    return table
