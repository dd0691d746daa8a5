"""Install, remove and inspect launch at login for the current user (the I/O around `plan`).

Only files that carry our marker are replaced or removed: a file someone else put at one
of our paths is reported, never overwritten.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar import __version__
from sidecar.autostart.plan import (
    LINUX_METHODS,
    Folders,
    Launch,
    Plan,
    PlannedFile,
    plan_for,
    written_by_us,
    written_by_version,
)
from sidecar.errors import SidecarError
from sidecar.files import atomic_write
from sidecar.paths import Places

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


class AutostartError(SidecarError):
    pass


def run_quietly(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)


def current_launch(home: str | None, config: str | None, platform: str = sys.platform) -> Launch:
    """The daemon and tray commands of *this* installation (venv, pipx or system), with the
    home and config the caller uses, so what starts at login sees the same files."""
    places_flags: list[str] = []
    if home:
        places_flags += ["--home", str(Path(home).expanduser().absolute())]
    daemon_flags = [*places_flags]
    if config:
        daemon_flags += ["--config", str(Path(config).expanduser().absolute())]
    if platform == "win32":
        # pythonw: no console window at logon. The module entry points equal the scripts.
        pythonw = Path(sys.executable).with_name("pythonw.exe")
        python = str(pythonw if pythonw.exists() else Path(sys.executable))
        return Launch((python, "-m", "sidecar", *daemon_flags, "run"), (python, "-m", "tray", *places_flags))
    scripts = Path(sysconfig.get_path("scripts"))
    daemon_script, tray_script = scripts / "mtls-sidecar", scripts / "mtls-sidecar-tray"
    daemon = (
        (str(daemon_script), *daemon_flags, "run")
        if _is_executable(daemon_script)
        else (sys.executable, "-m", "sidecar", *daemon_flags, "run")
    )
    tray = (
        (str(tray_script), *places_flags)
        if _is_executable(tray_script)
        else (sys.executable, "-m", "tray", *places_flags)
    )
    return Launch(daemon, tray)


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def user_folders(places: Places, env: dict[str, str] | None = None) -> Folders:
    environ = os.environ if env is None else env
    home = Path(environ.get("HOME") or Path.home())
    xdg_config = Path(environ["XDG_CONFIG_HOME"]) if environ.get("XDG_CONFIG_HOME") else home / ".config"
    return Folders(home=home, xdg_config=xdg_config, data=places.keystore.parent, logs=places.logs)


def systemd_available() -> bool:
    """Booted with systemd (sd_booted's test) and systemctl present."""
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


@dataclass
class Report:
    """What install/uninstall did, for the user; `notes` are things to know or do next."""

    plan: Plan
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Autostart:
    def __init__(
        self,
        folders: Folders,
        launch: Launch,
        *,
        platform: str = sys.platform,
        method: str | None = None,
        runner: Runner = run_quietly,
        systemd: bool | None = None,
    ) -> None:
        self.folders = folders
        self.launch = launch
        self.platform = platform
        self.runner = runner
        self.systemd = systemd_available() if systemd is None else systemd
        self.default_method = self._default_method()
        self.method_given = method is not None  # `--method`: status reports that method, installed or not
        self.method = method or self.default_method

    def _default_method(self) -> str:
        if self.platform == "darwin":
            return "launchd"
        if self.platform == "win32":
            return "run-key"
        return "systemd" if self.systemd else "xdg"

    def plan(self, method: str | None = None) -> Plan:
        return plan_for(self.platform, method or self.method, self.launch, self.folders)

    def _other_plans(self, method: str | None = None) -> list[Plan]:
        method = method or self.method
        if method in LINUX_METHODS:
            return [self.plan(m) for m in LINUX_METHODS if m != method]
        return []

    def installed_method(self) -> str | None:
        """The Linux method whose daemon file is ours (this one first), or None when neither is."""
        for method in (self.method, *(m for m in LINUX_METHODS if m != self.method)):
            if method in LINUX_METHODS and self._daemon_file_is_ours(self.plan(method)):
                return method
        return None

    def _daemon_file_is_ours(self, plan: Plan) -> bool:
        return any(
            planned.role == "daemon" and (text := _read(planned.path)) is not None and written_by_us(text)
            for planned in plan.files
        )

    # -- install -------------------------------------------------------------------------

    def install(self) -> Report:
        plan = self.plan()
        report = Report(plan)
        for planned in plan.files:
            self._refuse_foreign(planned.path)
        for other in self._other_plans():  # switching methods: no second daemon at login
            self._remove(other, report, keep={planned.path for planned in plan.files})
        for planned in plan.files:
            if _read(planned.path) == planned.content:
                report.unchanged.append(str(planned.path))
                continue
            planned.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(planned.path, planned.content.encode(), mode=0o644)
            report.changed.append(str(planned.path))
        for link, target in plan.links:
            if link.is_symlink() and Path(os.readlink(link)) == target:
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink():
                link.unlink()
            link.symlink_to(target)
            report.changed.append(f"{link} -> {target}")
        self._activate(plan, report)
        return report

    def _refuse_foreign(self, path: Path) -> None:
        text = _read(path)
        if text is not None and not written_by_us(text):
            raise AutostartError(
                f"{path} exists and was not written by mtls-sidecar; "
                "move it away (or remove it) and run `mtls-sidecar autostart install` again"
            )

    def _activate(self, plan: Plan, report: Report) -> None:
        if plan.method == "systemd":
            if self._user_manager_reachable():
                self._run(["systemctl", "--user", "daemon-reload"], report)
                report.notes.append("starts at next login; to start it now: systemctl --user start mtls-sidecar")
            else:
                report.notes.append("no systemd user manager reachable now: the unit is enabled for the next login")
        elif plan.method == "xdg":
            report.notes.append("your desktop starts the daemon and the tray at the next login")
        elif plan.method == "launchd":
            report.notes.append(
                f"loaded at next login; to start now: launchctl bootstrap gui/$(id -u) {plan.files[0].path}"
            )
        elif plan.method == "run-key":
            script = plan.files[0].path
            self._run(["powershell.exe", "-NoProfile", "-ExecutionPolicy", "Bypass", "-File", str(script)], report)

    def _user_manager_reachable(self) -> bool:
        if not self.systemd:
            return False
        try:
            return self.runner(["systemctl", "--user", "show-environment"]).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    def _run(self, argv: list[str], report: Report) -> None:
        try:
            done = self.runner(argv)
        except (OSError, subprocess.SubprocessError) as exc:
            report.notes.append(f"could not run {' '.join(argv)}: {exc}")
            return
        if done.returncode != 0:
            report.notes.append(f"{' '.join(argv)} exited with {done.returncode}: {done.stderr.strip()}")

    # -- uninstall -----------------------------------------------------------------------

    def uninstall(self) -> Report:
        plan = self.plan()
        report = Report(plan)
        if plan.method == "systemd" and self._user_manager_reachable():
            self._run(["systemctl", "--user", "disable", "--now", "mtls-sidecar.service"], report)
        if plan.method == "run-key" and plan.files[0].path.exists():
            script = plan.files[0].path
            self._run(
                ["powershell.exe", "-NoProfile", "-ExecutionPolicy", "Bypass", "-File", str(script), "-Uninstall"],
                report,
            )
        for each in (plan, *self._other_plans()):
            self._remove(each, report, keep=set())
        if plan.method == "systemd" and self._user_manager_reachable():
            self._run(["systemctl", "--user", "daemon-reload"], report)
        return report

    def _remove(self, plan: Plan, report: Report, keep: set[Path]) -> None:
        """Remove `plan`'s files that are ours, except those in `keep` (shared by two methods)."""
        for link, target in plan.links:
            if link.is_symlink() and Path(os.readlink(link)) == target:
                link.unlink()
                report.changed.append(f"removed {link}")
        for planned in plan.files:
            text = _read(planned.path)
            if text is None or planned.path in keep:
                continue
            if not written_by_us(text):
                report.notes.append(f"left {planned.path} alone: it was not written by mtls-sidecar")
                continue
            planned.path.unlink()
            report.changed.append(f"removed {planned.path}")

    # -- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What is installed: by `--method` when one was given, else by whichever method installed it
        (`install --method systemd` where systemd does not run now is reported as the systemd install)."""
        found = None if self.method_given else self.installed_method()
        plan = self.plan(found)
        entries = [self._entry(planned) for planned in plan.files]
        links_ok = all(link.is_symlink() and Path(os.readlink(link)) == target for link, target in plan.links)
        installed = all(e["installed"] for e in entries) and links_ok
        others = [
            str(planned.path)
            for other in self._other_plans(plan.method)
            for planned in other.files
            if (text := _read(planned.path)) is not None and written_by_us(text) and planned.role == "daemon"
        ]
        return {
            "platform": self.platform,
            "method": plan.method,
            # "--method" (asked for), "installed" (found by its files) or "default" (nothing found)
            "method_from": "--method" if self.method_given else ("installed" if found else "default"),
            "default_method": self.default_method,
            "description": plan.description,
            "installed": installed,
            "partly_installed": not installed and (any(e["installed"] for e in entries) or bool(others)),
            "current": installed and all(e["current"] for e in entries),
            "version": __version__,
            "enabled_link": [str(link) for link, _ in plan.links],
            "other_method_files": others,
            "entries": entries,
        }

    def _entry(self, planned: PlannedFile) -> dict[str, Any]:
        text = _read(planned.path)
        ours = text is not None and written_by_us(text)
        return {
            "role": planned.role,
            "path": str(planned.path),
            "installed": ours,
            "foreign": text is not None and not ours,
            # current: byte for byte what this version, with these paths, would write
            "current": text == planned.content,
            "written_by_version": written_by_version(text) if ours and text else None,
            "program": planned.program,
            "program_exists": _is_executable(Path(planned.program)),
        }

    def is_installed(self) -> bool:
        return bool(self.status()["installed"])


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, IsADirectoryError):
        return ""  # exists, not ours
