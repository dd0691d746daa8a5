"""Error types that say whose fault a failure is.

Only `cli.main()` turns these into one line and an exit code; everything below raises them
with the data needed to act on them.
"""

from __future__ import annotations


class SidecarError(Exception):
    """Base of every error the user is meant to read."""


class ConfigError(SidecarError):
    """The user's configuration is wrong: names the file, line, field and bad value."""

    def __init__(
        self,
        message: str,
        *,
        source: str,
        line: int | None = None,
        field: str | None = None,
        value: object = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.source = source
        self.line = line
        self.field = field
        self.value = value
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        what = ""
        if self.field is not None:
            what = self.field if self.value is None else f"{self.field} = {self.value!r}"
            what += ": "
        text = f"{where}: {what}{self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return text


class LocalSetupError(SidecarError):
    """Something on this machine stops us: a port already taken, a file we cannot write."""


class KeystoreError(SidecarError):
    """A credential file could not be used (names the file and why)."""


class RemoteError(SidecarError):
    """The remote service refused us or could not be trusted."""
