"""`mtls-sidecar autostart install|uninstall|status`: works without a running daemon."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from sidecar.autostart.manage import Autostart, Report, current_launch, user_folders
from sidecar.config import Config, load_config
from sidecar.errors import ConfigError
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
    warnings = login_environment_warnings(places) if args.autostart_command == "install" else []
    if args.json:
        print(json.dumps(report_json(report, autostart.status(), warnings), indent=2))
    else:
        print(format_report(args.autostart_command, report, places))
        for warning in warnings:
            print(f"warning: {warning}")
    return EXIT_OK


def report_json(report: Report, status: dict[str, Any], warnings: list[str] | None = None) -> dict[str, Any]:
    return {
        "changed": report.changed,
        "unchanged": report.unchanged,
        "notes": report.notes,
        "warnings": warnings or [],
        "status": status,
    }


def login_environment_warnings(places: Places) -> list[str]:
    """What a daemon started at login will miss: passwords in environment variables."""
    if not places.config_file.exists():
        return []
    try:
        config = load_config(places.config_file)
    except ConfigError as exc:
        return [f"config.toml cannot be read ({exc}): the daemon started at login will not start until it is fixed"]
    return env_password_warnings(config)


def env_password_warnings(config: Config) -> list[str]:
    """One warning per password an identity takes from an environment variable with no keyring
    entry to fall back on: a daemon started at login (systemd, launchd, the desktop's autostart)
    does not read your shell's profile, so the variable is not there and the credential does not open."""
    warnings = []
    for name, spec in config.identities.items():
        for kind, env, keyring, what in (
            ("pkcs12", spec.pkcs12_password_env, spec.pkcs12_password_keyring, "PKCS#12 password"),
            ("key", spec.key_password_env, spec.key_password_keyring, "key password"),
        ):
            if env is None or keyring is not None:
                continue
            warnings.append(
                f"identity {name} takes its {what} from the environment variable {env}, which a daemon started at "
                f"login does not have (it does not read your shell's profile), so its credential will not open. "
                f"Keep the password in the OS keyring instead: pip install 'mtls-sidecar[keyring]', run "
                f"`keyring set mtls-sidecar {name}`, and in config.toml under [identities.{name}] replace "
                f'{kind}_password_env = "{env}" with {kind}_password_keyring = "mtls-sidecar/{name}"'
            )
    return warnings


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
