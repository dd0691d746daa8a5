"""`mtls-sidecar autostart install|uninstall|status`: works without a running daemon."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from sidecar.autostart.manage import Autostart, Report, current_launch, user_folders
from sidecar.paths import CONFIG_ENV, HOME_ENV, Places

EXIT_OK = 0


def autostart_for(places: Places, home: str | None, config: str | None, method: str | None = None) -> Autostart:
    """The autostart of this installation, for the places the caller uses (flags or env)."""
    home = home or os.environ.get(HOME_ENV)
    config = config or os.environ.get(CONFIG_ENV)
    return Autostart(user_folders(places), current_launch(home, config), method=method)


def cmd_autostart(places: Places, args: argparse.Namespace) -> int:
    autostart = autostart_for(places, args.home, args.config, args.method)
    if args.autostart_command == "status":
        status = autostart.status()
        print(json.dumps(status, indent=2) if args.json else format_status(status))
        return EXIT_OK
    report = autostart.install() if args.autostart_command == "install" else autostart.uninstall()
    if args.json:
        print(json.dumps(report_json(report, autostart.status()), indent=2))
    else:
        print(format_report(args.autostart_command, report, places))
    return EXIT_OK


def report_json(report: Report, status: dict[str, Any]) -> dict[str, Any]:
    return {"changed": report.changed, "unchanged": report.unchanged, "notes": report.notes, "status": status}


def format_report(command: str, report: Report, places: Places) -> str:
    lines = [f"autostart {command}ed: {report.plan.description}" if command == "install" else "autostart removed"]
    lines += [f"  {line}" for line in report.changed]
    lines += [f"  unchanged {line}" for line in report.unchanged]
    lines += [f"note: {note}" for note in report.notes]
    if command == "uninstall":
        lines.append(
            "kept (remove by hand if you want them gone): "
            f"config {places.config_file}, keystore {places.keystore}, dev CA {places.ca}, logs {places.logs}"
        )
    return "\n".join(lines)


def format_status(status: dict[str, Any]) -> str:
    if status["installed"]:
        state = "installed, current"
        if not status["current"]:
            state = "installed, NOT current (run: mtls-sidecar autostart install)"
    elif status["partly_installed"]:
        state = "partly installed (run: mtls-sidecar autostart install, or uninstall)"
    else:
        state = "not installed (run: mtls-sidecar autostart install)"
    lines = [f"launch at login: {state}", f"  method: {status['description']}"]
    if status.get("method_from") == "installed" and status["method"] != status["default_method"]:
        lines.append(
            f"  installed with --method {status['method']}; the default here is {status['default_method']} "
            "(`autostart install` without --method would switch to it)"
        )
    lines.append(f"  this version: {status['version']}")
    for entry in status["entries"]:
        if entry["foreign"]:
            what = "a file not written by mtls-sidecar is in the way"
        elif not entry["installed"]:
            what = "not installed"
        else:
            version = entry["written_by_version"] or "?"
            what = f"installed by {version}, " + ("current" if entry["current"] else "differs from this installation")
        lines.append(f"  {entry['role']:<6} {entry['path']}: {what}")
        if not entry["program_exists"]:
            lines.append(f"         its program {entry['program']} does not exist")
    for path in status["other_method_files"]:
        lines.append(f"  also found (other method): {path}")
    return "\n".join(lines)
