"""What launch at login installs, per platform: file paths and their rendered content (pure).

The templates live in `installers/` (shipped as `sidecar.installers`); this module fills in
absolute commands, each quoted the way its file format wants, and says where each file
goes. Writing the files is `manage.py`'s job.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from string import Template
from xml.sax.saxutils import escape as xml_escape

from sidecar import __version__

MARKER_PREFIX = "Written by mtls-sidecar autostart"
_MARKER_VERSION = re.compile(re.escape(MARKER_PREFIX) + r" ([^\s;]+)")

SYSTEMD_UNIT = "mtls-sidecar.service"
MACOS_LABELS = {"daemon": "dev.mtls-sidecar.daemon", "tray": "dev.mtls-sidecar.tray"}

# Linux ways to start the daemon at login; macOS and Windows have one way each.
LINUX_METHODS = ("systemd", "xdg")
METHOD_TEXT = {
    "systemd": "systemd user unit (daemon) + XDG autostart entry (tray)",
    "xdg": "XDG autostart entries (daemon and tray), for desktops without systemd",
    "launchd": "LaunchAgents in ~/Library/LaunchAgents",
    "run-key": r"HKCU\Software\Microsoft\Windows\CurrentVersion\Run values, set by a PowerShell script",
}


@dataclass(frozen=True)
class Launch:
    """The commands that start the daemon and the tray (absolute program paths first)."""

    daemon: tuple[str, ...]
    tray: tuple[str, ...]


@dataclass(frozen=True)
class Folders:
    """Where per-user launch files go. Only the ones the platform uses need be right."""

    home: Path  # the user's home folder (macOS: ~/Library/LaunchAgents under it)
    xdg_config: Path  # $XDG_CONFIG_HOME, else ~/.config
    data: Path  # mtls-sidecar's data folder (the Windows script is kept there)
    logs: Path  # mtls-sidecar's logs folder (launchd writes the processes' output there)


@dataclass(frozen=True)
class PlannedFile:
    role: str  # "daemon" or "tray"
    path: Path
    content: str
    program: str  # the executable the file starts: status checks it exists


@dataclass(frozen=True)
class Plan:
    method: str  # "systemd" | "xdg" | "launchd" | "run-key"
    files: tuple[PlannedFile, ...]
    # (link, target): what `systemctl --user enable` would create, made by us so it works
    # without a running user manager.
    links: tuple[tuple[Path, Path], ...] = ()

    @property
    def description(self) -> str:
        return METHOD_TEXT[self.method]


def marker(version: str = __version__) -> str:
    return f"{MARKER_PREFIX} {version}; edits are overwritten by `mtls-sidecar autostart install`."


def written_by_us(text: str) -> bool:
    return MARKER_PREFIX in text


def written_by_version(text: str) -> str | None:
    found = _MARKER_VERSION.search(text)
    return found.group(1) if found else None


def plan_for(platform: str, method: str, launch: Launch, folders: Folders) -> Plan:
    """The files for `platform` ("linux", "darwin", "win32") installed the `method` way."""
    if platform.startswith("linux") or platform.startswith("freebsd"):
        if method not in LINUX_METHODS:
            raise ValueError(f"unknown Linux method {method!r}: use one of {', '.join(LINUX_METHODS)}")
        return _linux(method, launch, folders)
    if platform == "darwin":
        return _macos(launch, folders)
    if platform == "win32":
        return _windows(launch, folders)
    raise ValueError(f"launch at login is not supported on {platform}")


def _linux(method: str, launch: Launch, folders: Folders) -> Plan:
    autostart = folders.xdg_config / "autostart"
    tray = PlannedFile(
        "tray",
        autostart / "mtls-sidecar-tray.desktop",
        _render("linux/mtls-sidecar-tray.desktop", tray_command=desktop_exec(launch.tray)),
        launch.tray[0],
    )
    if method == "xdg":
        daemon = PlannedFile(
            "daemon",
            autostart / "mtls-sidecar-daemon.desktop",
            _render("linux/mtls-sidecar-daemon.desktop", daemon_command=desktop_exec(launch.daemon)),
            launch.daemon[0],
        )
        return Plan("xdg", (daemon, tray))
    units = folders.xdg_config / "systemd" / "user"
    unit = units / SYSTEMD_UNIT
    daemon = PlannedFile(
        "daemon",
        unit,
        _render("linux/mtls-sidecar.service", daemon_command=systemd_exec(launch.daemon)),
        launch.daemon[0],
    )
    return Plan("systemd", (daemon, tray), links=((units / "default.target.wants" / SYSTEMD_UNIT, unit),))


def _macos(launch: Launch, folders: Folders) -> Plan:
    agents = folders.home / "Library" / "LaunchAgents"
    planned = []
    for role, argv in (("daemon", launch.daemon), ("tray", launch.tray)):
        label = MACOS_LABELS[role]
        content = _render(
            f"macos/{role}.plist",
            label=xml_escape(label),
            log_file=xml_escape(str(folders.logs / f"launchd-{role}.log")),
            **{f"{role}_arguments": plist_arguments(argv)},
        )
        planned.append(PlannedFile(role, agents / f"{label}.plist", content, argv[0]))
    return Plan("launchd", tuple(planned))


def _windows(launch: Launch, folders: Folders) -> Plan:
    content = _render(
        "windows/autostart.ps1",
        daemon_command=powershell_single_quoted(subprocess.list2cmdline(launch.daemon)),
        tray_command=powershell_single_quoted(subprocess.list2cmdline(launch.tray)),
    )
    # One script sets both Run values; it is the daemon's file, and the tray's program is
    # checked through the same entry.
    return Plan("run-key", (PlannedFile("daemon", folders.data / "autostart.ps1", content, launch.daemon[0]),))


def _render(template: str, **values: str) -> str:
    text = (files("sidecar.installers") / template).read_text(encoding="utf-8")
    return Template(text).substitute(marker=marker(), **values)


# -- quoting, one function per file format -------------------------------------------------

_SYSTEMD_PLAIN = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def systemd_exec(argv: tuple[str, ...]) -> str:
    """An `ExecStart=` value: `%` and `$` doubled (specifiers, variables); words with
    anything beyond a safe set double-quoted with C escapes (systemd.service(5), "Command lines")."""
    words = []
    for arg in argv:
        text = arg.replace("%", "%%").replace("$", "$$")
        if not _SYSTEMD_PLAIN.fullmatch(text):
            # a newline would end the line (the rest a key of its own): inside quotes, C escapes
            text = '"' + "".join(_SYSTEMD_ESCAPES.get(ch) or _c_escape(ch) for ch in text) + '"'
        words.append(text)
    return " ".join(words)


_SYSTEMD_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _c_escape(ch: str) -> str:
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch


_DESKTOP_RESERVED = set(" \t\n\"'\\><~|&;$*?#()`")


def desktop_exec(argv: tuple[str, ...]) -> str:
    """An `Exec=` value per the Desktop Entry spec: an argument with a reserved character is
    double-quoted with `"`, `` ` ``, `$` and `\\` backslash-escaped inside; `%` is doubled
    (field codes); then the string-value escaping doubles every backslash again."""
    words = []
    for arg in argv:
        text = arg.replace("%", "%%")
        if not text or any(ch in _DESKTOP_RESERVED for ch in text):
            text = '"' + "".join("\\" + ch if ch in '"`$\\' else ch for ch in text) + '"'
        # the string-value escapes: backslash, and the line breaks a value cannot hold raw
        words.append(text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t"))
    return " ".join(words)


def plist_arguments(argv: tuple[str, ...]) -> str:
    return "\n".join(f"    <string>{xml_escape(arg)}</string>" for arg in argv)


def powershell_single_quoted(text: str) -> str:
    """The inside of a PowerShell '...' literal: only the quote itself is special (doubled)."""
    return text.replace("'", "''")
