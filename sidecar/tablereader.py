"""Read TOML tables with errors that point at the file, the line, the dotted field and the value.

`config` reads the whole document with it, and each renewal provider's settings class reads its
own keys with it, so every config error has one shape:
`config.toml:12: identities.dev.acme_http_port = 99999: must be a port number 1-65535`.

Pure apart from expanding `~` in paths: no files, sockets or clocks.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sidecar.errors import ConfigError
from sidecar.names import name_problem
from sidecar.units import parse_duration

MAX_DURATION = 100 * 365 * 86400.0  # beyond this, datetime arithmetic downstream overflows

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_INDEX = re.compile(r"\[[0-9]+\]")  # a path part that is an item of an array of tables

T = TypeVar("T")


class Document:
    """The raw text (to find a field's line), the source name and the folder for relative paths."""

    def __init__(self, text: str, source: str, base_dir: Path | None) -> None:
        self.lines = text.split("\n")
        self.headers = [i for i, line in enumerate(self.lines) if re.match(r"\s*\[", line)]
        self.source, self.base_dir = source, base_dir

    def error(self, path: tuple[str, ...], message: str, value: object = None, hint: str | None = None) -> ConfigError:
        return ConfigError(
            message, source=self.source, line=self.line(path), field=dotted(path), value=value, hint=hint
        )

    def line(self, path: tuple[str, ...]) -> int | None:
        """The table's header, else the key's line in the nearest table, else the nearest header."""
        header = self._header(path)
        if header is not None:
            return header + 1
        for split in range(len(path) - 1, -1, -1):
            start = self._header(path[:split]) if split else -1
            if start is None:
                continue
            end = next((i for i in self.headers if i > start), len(self.lines))
            key = re.compile(rf"\s*{_dotted_pattern(path[split:])}\s*=")
            found = next((i for i in range(start + 1, end) if key.match(self.lines[i])), None)
            if found is not None:
                return found + 1
        headers = (self._header(path[:split]) for split in range(len(path) - 1, 0, -1))
        return next((h + 1 for h in headers if h is not None), None)

    def _header(self, table: tuple[str, ...]) -> int | None:
        if table and _INDEX.fullmatch(table[-1]):  # [[array.of.tables]]: its n-th header
            pattern = re.compile(rf"\s*\[\[\s*{_dotted_pattern(table[:-1])}\s*\]\]")
            found = [i for i in self.headers if pattern.match(self.lines[i])]
            index = int(table[-1][1:-1])
            return found[index] if index < len(found) else None
        pattern = re.compile(rf"\s*\[\[?\s*{_dotted_pattern(table)}\s*\]")
        return next((i for i in self.headers if pattern.match(self.lines[i])), None)


class Table:
    """One TOML table with its dotted path, and getters that raise precise ConfigErrors.

    A getter returns the default (or None) for an absent key and raises for a present key
    with a wrong value; it never reports a key twice in one message.
    """

    def __init__(self, doc: Document, data: dict[str, Any], path: tuple[str, ...]) -> None:
        self.doc, self.data, self.path = doc, data, path

    @property
    def name(self) -> str:
        return self.path[-1]

    def error(self, key: str, message: str, value: object = None, hint: str | None = None) -> ConfigError:
        return self.doc.error((*self.path, key), message, value, hint)

    def check_keys(self, known: Sequence[str]) -> None:
        for key in self.data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f'did you mean "{close[0]}"?' if close else "known keys: " + ", ".join(known)
                raise self.error(key, "unknown key", hint=hint)

    def typed(self, key: str, kind: type[T], expected: str) -> T | None:
        value = self.data.get(key)
        if value is None or isinstance(value, kind):
            return value
        raise self.error(key, f"expected {expected}, got {toml_type(value)}", value)

    def string(self, key: str) -> str | None:
        return self.typed(key, str, "a string")

    def boolean(self, key: str) -> bool:
        return self.typed(key, bool, "true or false") or False

    def choice(self, key: str, choices: Sequence[str], what: str, default: str) -> str:
        value = self.string(key) or default
        if value not in choices:
            raise self.error(key, f"unknown {what}", value, hint="use one of: " + ", ".join(choices))
        return value

    def port(self, key: str, default: int) -> int:
        """A TCP port number, 1 to 65535."""
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise self.error(key, "must be a port number 1-65535", value)
        return value

    def strings(self, key: str, example: str) -> list[str]:
        """An array of strings (empty when absent)."""
        items = self.typed(key, list, f"an array of strings such as {example}") or []
        for item in items:
            if not isinstance(item, str):
                raise self.error(
                    key, f"expected an array of strings, found {toml_type(item)}", item, hint=f"for example {example}"
                )
        return items

    def address(self, key: str, parser: Callable[..., T], example: str) -> T:
        text = self.string(key)
        if text is None:
            raise self.error(key, "required key is missing", hint=f'add {key} = "{example}"')
        line = self.doc.line((*self.path, key))
        return parser(text, field=dotted((*self.path, key)), source=self.doc.source, line=line)

    def duration(self, key: str, default: float, *, positive: bool) -> float:
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.error(key, f'expected a duration such as "10s" or "7d", got {toml_type(value)}', value)
        try:
            seconds = parse_duration(value)
        except (ValueError, OverflowError) as exc:
            raise self.error(key, str(exc), value) from None
        if not math.isfinite(seconds) or seconds > MAX_DURATION:
            raise self.error(key, "duration is too long (at most 100 years)", value)
        if positive and seconds <= 0:
            raise self.error(key, "duration must be longer than zero", value)
        return seconds

    def file(self, key: str) -> Path | None:
        """A path; `~` expanded, relative ones resolved against the config file's folder."""
        text = self.string(key)
        if text is None:
            return None
        if not text or "\0" in text:
            raise self.error(key, "expected a file path", text)
        expanded = os.path.expanduser(text)
        if expanded.startswith("~"):
            raise self.error(key, "cannot expand ~: no such user", text)
        path = Path(expanded)
        base = self.doc.base_dir
        return base / path if base is not None and not path.is_absolute() else path

    def tables(self, key: str) -> dict[str, Table]:
        """The named sub-tables [KEY.NAME], each NAME checked by the one rule for names (sidecar.names)."""
        outer = self.typed(key, dict, f"tables written as [{key}.NAME]") or {}
        result: dict[str, Table] = {}
        for name, value in outer.items():
            path = (*self.path, key, name)
            problem = name_problem(name)
            if problem is not None:
                raise self.doc.error(path, problem)
            if not isinstance(value, dict):
                raise self.doc.error(path, f"expected a table [{dotted(path)}], got {toml_type(value)}", value)
            result[name] = Table(self.doc, value, path)
        return result

    def array_tables(self, key: str, example: str) -> list[Table]:
        """The tables of an array of tables [[KEY]], each with the path (..., KEY, "[i]")."""
        items = self.typed(key, list, f"tables written as [[{dotted((*self.path, key))}]]") or []
        result = []
        for index, value in enumerate(items):
            path = (*self.path, key, f"[{index}]")
            if not isinstance(value, dict):
                raise self.doc.error(path, f"expected a table, got {toml_type(value)}", value, hint=example)
            result.append(Table(self.doc, value, path))
        return result


def dotted(path: Sequence[str]) -> str:
    """`identities.dev.renew`, with keys that need it quoted as TOML would; an item of an array
    of tables is `proxy.rules[0].hosts`."""
    out = ""
    for part in path:
        if _INDEX.fullmatch(part):
            out += part
        else:
            out += ("." if out else "") + toml_key(part)
    return out


def _dotted_pattern(parts: tuple[str, ...]) -> str:
    quoted = (f"(?:{re.escape(p)}|\"{re.escape(p)}\"|'{re.escape(p)}')" for p in parts)
    return r"\s*\.\s*".join(quoted)


def toml_type(value: object) -> str:
    names = {bool: "a boolean", str: "a string", int: "an integer", float: "a float",
             list: "an array", dict: "a table"}  # fmt: skip
    return names.get(type(value), "a date/time")


def toml_key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else toml_string(name)


def toml_string(text: str) -> str:
    escapes = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
               "\r": "\\r"}  # fmt: skip
    out = (escapes.get(c) or (f"\\u{ord(c):04x}" if c < " " or c == "\x7f" else c) for c in text)
    return '"' + "".join(out) + '"'
