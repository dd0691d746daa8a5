"""Launch at login: rendered files checked by the real validators, install/status/uninstall
round trips into temporary folders, and the tray's "Start at login" toggle.

There is no systemd user session here: the unit is checked with `systemd-analyze --user
verify` (exit code *and* empty stderr, since it exits 0 on unknown keys) and enabled by the
symlink `systemctl --user enable` would make. macOS and Windows cannot run here: their files
are rendered for those platforms and checked with plistlib (strict) and by exact content;
launchctl and PowerShell are never run (a recording runner stands in for PowerShell).
"""

from __future__ import annotations

import json
import os
import plistlib
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from sidecar import __version__
from sidecar.autostart.manage import Autostart, AutostartError, current_launch
from sidecar.autostart.plan import (
    Folders,
    Launch,
    desktop_exec,
    marker,
    plan_for,
    powershell_single_quoted,
    systemd_exec,
    written_by_version,
)
from sidecar.cli.autostart import format_status

SCRIPTS = Path(sysconfig.get_path("scripts"))


def folders_in(root: Path) -> Folders:
    return Folders(home=root / "home", xdg_config=root / "config", data=root / "data", logs=root / "logs")


def this_launch(home: Path | None = None) -> Launch:
    return current_launch(str(home) if home else None, None)


def require(program: str, package: str) -> str:
    path = shutil.which(program)
    if path is None:
        pytest.fail(f"{program} not found: apt-get install {package} (.ci/run does this)", pytrace=False)
    return path


def systemd_verify(unit: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    require("systemd-analyze", "systemd")
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "XDG_CONFIG_HOME": str(unit.parents[2])}
    return subprocess.run(
        ["systemd-analyze", "--user", "verify", str(unit)], capture_output=True, text=True, env=env, timeout=60
    )


def desktop_validate(path: Path) -> subprocess.CompletedProcess[str]:
    require("desktop-file-validate", "desktop-file-utils")
    return subprocess.run(["desktop-file-validate", str(path)], capture_output=True, text=True, timeout=30)


def value_of(text: str, key: str) -> str:
    return next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}="))


def desktop_exec_argv(value: str) -> list[str]:
    """Split an Exec= value back into arguments, as the Desktop Entry spec says a launcher does
    (written independently of the renderer, to check it)."""
    string_escapes = {"s": " ", "n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    unescaped = re.sub(r"\\(.)", lambda m: string_escapes.get(m.group(1), m.group(0)), value)  # string level first
    args: list[str] = []
    i, current, in_word = 0, "", False
    while i < len(unescaped):
        ch = unescaped[i]
        if ch == '"':
            i += 1
            while unescaped[i] != '"':
                if unescaped[i] == "\\":
                    i += 1
                current += unescaped[i]
                i += 1
            in_word = True
        elif ch == " ":
            if in_word:
                args.append(current)
            current, in_word = "", False
        else:
            current += ch
            in_word = True
        i += 1
    if in_word:
        args.append(current)
    return [arg.replace("%%", "%") for arg in args]


# -- quoting (pure) ---------------------------------------------------------------------------


def test_systemd_exec_quotes_spaces_and_escapes_specifiers() -> None:
    assert systemd_exec(("/usr/bin/mtls-sidecar", "run")) == "/usr/bin/mtls-sidecar run"
    assert systemd_exec(("/opt/my tools/bin/x", "--home", '/h/a"b', "50%", "$HOME")) == (
        '"/opt/my tools/bin/x" --home "/h/a\\"b" 50%% "$$HOME"'
    )


def test_desktop_exec_round_trips_through_the_spec_parser() -> None:
    argv = ("/opt/my tools/bin/mtls-sidecar-tray", "--home", '/h/we"ird $dir\\x', "100%")
    rendered = desktop_exec(argv)
    assert rendered.startswith('"/opt/my tools/bin/mtls-sidecar-tray" --home "')
    assert desktop_exec_argv(rendered) == list(argv)
    assert desktop_exec(("/usr/bin/mtls-sidecar-tray",)) == "/usr/bin/mtls-sidecar-tray"


def test_a_newline_in_a_path_stays_inside_its_value_in_every_format(tmp_path: Path) -> None:
    home = tmp_path / "odd\nhome\tdir"
    launch = this_launch(home)
    assert "\n" in launch.daemon[-2]  # --home <path with a newline> run
    exec_start = systemd_exec(launch.daemon)
    assert "\n" not in exec_start and "\\n" in exec_start
    folders = folders_in(tmp_path)
    Autostart(folders, launch, platform="linux", method="systemd", systemd=False).install()
    unit = folders.xdg_config / "systemd" / "user" / "mtls-sidecar.service"
    verified = systemd_verify(unit, tmp_path)
    assert (verified.returncode, verified.stderr) == (0, ""), unit.read_text()
    assert value_of(unit.read_text(), "ExecStart") == exec_start  # one line, the whole command
    Autostart(folders, launch, platform="linux", method="xdg", systemd=False).install()
    entry = folders.xdg_config / "autostart" / "mtls-sidecar-daemon.desktop"
    validated = desktop_validate(entry)
    assert validated.returncode == 0, validated.stdout + validated.stderr
    assert desktop_exec_argv(value_of(entry.read_text(), "Exec")) == list(launch.daemon)
    plan = plan_for("darwin", "launchd", launch, folders)
    daemon_plist = plistlib.loads(plan.files[0].content.encode())
    assert daemon_plist["ProgramArguments"] == list(launch.daemon)


def test_powershell_single_quotes_are_doubled() -> None:
    assert powershell_single_quoted(r"C:\Users\O'Brien\x.exe") == r"C:\Users\O''Brien\x.exe"


def test_marker_names_the_version() -> None:
    assert written_by_version("# " + marker("9.8.7")) == "9.8.7"
    assert written_by_version("[Desktop Entry]") is None


# -- Linux ------------------------------------------------------------------------------------


def test_systemd_install_validates_round_trips_and_is_idempotent(tmp_path: Path) -> None:
    folders = folders_in(tmp_path)
    launch = this_launch(tmp_path / "sidecar home with spaces")
    autostart = Autostart(folders, launch, platform="linux", method="systemd", systemd=False)
    assert autostart.status()["installed"] is False

    first = autostart.install()
    unit = folders.xdg_config / "systemd" / "user" / "mtls-sidecar.service"
    entry = folders.xdg_config / "autostart" / "mtls-sidecar-tray.desktop"
    link = folders.xdg_config / "systemd" / "user" / "default.target.wants" / "mtls-sidecar.service"
    assert {str(unit), str(entry)} <= set(first.changed)
    assert link.is_symlink() and link.resolve() == unit.resolve()

    verified = systemd_verify(unit, tmp_path)
    assert (verified.returncode, verified.stderr) == (0, "")
    validated = desktop_validate(entry)
    assert validated.returncode == 0, validated.stdout + validated.stderr

    exec_start = value_of(unit.read_text(), "ExecStart")
    program = Path(exec_start.split(" ")[0])
    assert program.is_absolute() and os.access(program, os.X_OK), exec_start
    assert exec_start.endswith(f'--home "{tmp_path}/sidecar home with spaces" run')
    tray_argv = desktop_exec_argv(value_of(entry.read_text(), "Exec"))
    assert tray_argv == list(launch.tray) and os.access(tray_argv[0], os.X_OK)
    assert "Restart=on-failure" in unit.read_text() and "WantedBy=default.target" in unit.read_text()

    status = autostart.status()
    assert status["installed"] and status["current"] and status["method"] == "systemd"
    assert [e["written_by_version"] for e in status["entries"]] == [__version__, __version__]
    assert all(e["program_exists"] for e in status["entries"])

    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (unit, entry)}
    again = autostart.install()
    assert again.changed == [] and sorted(again.unchanged) == sorted([str(unit), str(entry)])
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (unit, entry)} == before

    removed = autostart.uninstall()
    assert not unit.exists() and not entry.exists() and not link.is_symlink()
    assert f"removed {unit}" in removed.changed
    assert autostart.status()["installed"] is False and autostart.status()["partly_installed"] is False


def test_status_notices_a_file_from_another_installation(tmp_path: Path) -> None:
    folders = folders_in(tmp_path)
    Autostart(folders, Launch(("/old/venv/bin/mtls-sidecar", "run"), ("/old/venv/bin/mtls-sidecar-tray",)),
              platform="linux", method="systemd", systemd=False).install()  # fmt: skip
    status = Autostart(folders, this_launch(), platform="linux", method="systemd", systemd=False).status()
    assert status["installed"] is True and status["current"] is False
    assert all(not e["current"] for e in status["entries"])


def test_xdg_method_starts_the_daemon_from_an_autostart_entry_and_switching_cleans_up(tmp_path: Path) -> None:
    folders = folders_in(tmp_path)
    launch = this_launch()
    Autostart(folders, launch, platform="linux", method="systemd", systemd=False).install()
    xdg = Autostart(folders, launch, platform="linux", method="xdg", systemd=False)
    xdg.install()
    daemon_entry = folders.xdg_config / "autostart" / "mtls-sidecar-daemon.desktop"
    validated = desktop_validate(daemon_entry)
    assert validated.returncode == 0, validated.stdout + validated.stderr
    assert desktop_exec_argv(value_of(daemon_entry.read_text(), "Exec")) == list(launch.daemon)
    assert launch.daemon[-1] == "run"
    # no second daemon at login: the systemd unit and its enable link are gone
    assert not (folders.xdg_config / "systemd" / "user" / "mtls-sidecar.service").exists()
    assert not (folders.xdg_config / "systemd" / "user" / "default.target.wants" / "mtls-sidecar.service").is_symlink()
    assert xdg.status()["installed"] and xdg.status()["other_method_files"] == []


def test_status_reports_what_is_installed_by_whichever_method(tmp_path: Path) -> None:
    """`install --method systemd` where systemd does not run now: status (no --method) reports that install."""
    folders = folders_in(tmp_path)
    launch = this_launch()
    bare = Autostart(folders, launch, platform="linux", systemd=False)  # the default here: xdg
    nothing = bare.status()
    assert (nothing["method"], nothing["method_from"], nothing["installed"]) == ("xdg", "default", False)

    Autostart(folders, launch, platform="linux", method="systemd", systemd=False).install()
    status = bare.status()
    assert (status["method"], status["method_from"], status["default_method"]) == ("systemd", "installed", "xdg")
    assert status["installed"] and status["current"] and not status["partly_installed"]
    assert status["other_method_files"] == [] and bare.is_installed()
    text = format_status(status)
    assert text.startswith("launch at login: installed, current\n  method: systemd user unit")
    assert "installed with --method systemd; the default here is xdg" in text
    assert "partly" not in text and "other method" not in text

    # asked for by name, the other method is what it is: not installed, our unit noticed
    asked = Autostart(folders, launch, platform="linux", method="xdg", systemd=False).status()
    assert (asked["method"], asked["method_from"], asked["installed"]) == ("xdg", "--method", False)
    assert asked["other_method_files"] == [str(folders.xdg_config / "systemd" / "user" / "mtls-sidecar.service")]

    Autostart(folders, launch, platform="linux", method="xdg", systemd=False).install()  # switching
    switched = bare.status()
    assert (switched["method"], switched["method_from"], switched["installed"]) == ("xdg", "installed", True)
    assert "installed with --method" not in format_status(switched)  # it is the default


def test_a_file_not_ours_is_never_overwritten_or_removed(tmp_path: Path) -> None:
    folders = folders_in(tmp_path)
    entry = folders.xdg_config / "autostart" / "mtls-sidecar-tray.desktop"
    entry.parent.mkdir(parents=True)
    entry.write_text("[Desktop Entry]\nName=mine\n")
    autostart = Autostart(folders, this_launch(), platform="linux", method="xdg", systemd=False)
    with pytest.raises(AutostartError, match="was not written by mtls-sidecar; move it away"):
        autostart.install()
    assert entry.read_text() == "[Desktop Entry]\nName=mine\n"
    assert not (folders.xdg_config / "autostart" / "mtls-sidecar-daemon.desktop").exists()
    report = autostart.uninstall()
    assert entry.exists() and any("left" in note for note in report.notes)
    assert autostart.status()["entries"][1]["foreign"] is True


# -- macOS (rendered here, cannot run here: launchctl is never called) --------------------


def test_macos_launch_agents_are_valid_plists(tmp_path: Path) -> None:
    folders = folders_in(tmp_path)
    launch = Launch(("/Users/me/.local/pipx/venvs/mtls-sidecar/bin/mtls-sidecar", "--home", "/a&b <c>", "run"),
                    ("/Users/me/.local/pipx/venvs/mtls-sidecar/bin/mtls-sidecar-tray",))  # fmt: skip
    autostart = Autostart(folders, launch, platform="darwin")
    autostart.install()
    agents = folders.home / "Library" / "LaunchAgents"
    daemon = plistlib.loads((agents / "dev.mtls-sidecar.daemon.plist").read_bytes())
    tray = plistlib.loads((agents / "dev.mtls-sidecar.tray.plist").read_bytes())
    assert daemon["Label"] == "dev.mtls-sidecar.daemon" and daemon["ProgramArguments"] == list(launch.daemon)
    assert daemon["KeepAlive"] is True and daemon["RunAtLoad"] is True
    assert daemon["StandardErrorPath"] == str(folders.logs / "launchd-daemon.log")
    assert tray["ProgramArguments"] == list(launch.tray) and tray["LimitLoadToSessionType"] == "Aqua"
    assert "KeepAlive" not in tray  # quitting the tray from its menu must stick
    assert autostart.status()["installed"] and autostart.status()["method"] == "launchd"
    autostart.uninstall()
    assert list(agents.iterdir()) == []


# -- Windows (rendered here, cannot run here: PowerShell is recorded, not run) ----------------


class RecordingRunner:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        return subprocess.CompletedProcess(list(argv), 0, "", "")


def test_windows_script_content_exactly(tmp_path: Path) -> None:
    folders = folders_in(tmp_path)
    python = r"C:\Users\O'Brien\pipx\venvs\mtls-sidecar\Scripts\pythonw.exe"
    launch = Launch((python, "-m", "sidecar", "--home", r"C:\Users\O'Brien\my sidecar", "run"), (python, "-m", "tray"))
    runner = RecordingRunner()
    autostart = Autostart(folders, launch, platform="win32", runner=runner)
    autostart.install()
    script = folders.data / "autostart.ps1"
    assert script.read_text() == (
        f"# {marker()}\n"
        "# Starts the mtls-sidecar daemon and tray at logon for the current user: two values under\n"
        "# HKCU\\...\\Run. No administrator rights are needed. Run with -Uninstall to remove them.\n"
        "param([switch]$Uninstall)\n"
        "$ErrorActionPreference = 'Stop'\n"
        "$RunKey = 'HKCU:\\Software\\Microsoft\\Windows\\CurrentVersion\\Run'\n"
        "$Entries = [ordered]@{\n"
        "    'mtls-sidecar' = 'C:\\Users\\O''Brien\\pipx\\venvs\\mtls-sidecar\\Scripts\\pythonw.exe -m sidecar "
        "--home \"C:\\Users\\O''Brien\\my sidecar\" run'\n"
        "    'mtls-sidecar-tray' = 'C:\\Users\\O''Brien\\pipx\\venvs\\mtls-sidecar\\Scripts\\pythonw.exe -m tray'\n"
        "}\n"
        "foreach ($Name in $Entries.Keys) {\n"
        "    if ($Uninstall) {\n"
        "        Remove-ItemProperty -Path $RunKey -Name $Name -ErrorAction SilentlyContinue\n"
        "    } else {\n"
        "        Set-ItemProperty -Path $RunKey -Name $Name -Value $Entries[$Name]\n"
        "    }\n"
        "}\n"
    )
    assert runner.calls == [["powershell.exe", "-NoProfile", "-ExecutionPolicy", "Bypass", "-File", str(script)]]
    autostart.uninstall()
    assert runner.calls[-1][-1] == "-Uninstall" and not script.exists()


# -- the command line, as a user runs it --------------------------------------------------


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_cli_install_status_uninstall(tmp_path: Path, isolated_home: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path / "user")}
    installed = cli("autostart", "install", "--method", "systemd", env=env)
    assert installed.returncode == 0, installed.stderr
    assert "autostart installed: systemd user unit" in installed.stdout
    status = json.loads(cli("autostart", "status", "--method", "systemd", "--json", env=env).stdout)
    assert status["installed"] and status["current"] and status["version"] == __version__
    unit = Path(os.environ["XDG_CONFIG_HOME"]) / "systemd" / "user" / "mtls-sidecar.service"
    assert status["entries"][0]["path"] == str(unit)
    exec_start = value_of(unit.read_text(), "ExecStart")
    # the installed console script of this environment, and the home this test runs with
    assert exec_start == f"{SCRIPTS / 'mtls-sidecar'} --home {isolated_home} run"
    assert os.access(SCRIPTS / "mtls-sidecar", os.X_OK)
    assert "installed, current" in cli("autostart", "status", "--method", "systemd", env=env).stdout

    removed = cli("autostart", "uninstall", "--method", "systemd", env=env)
    assert removed.returncode == 0, removed.stderr
    assert f"keystore {isolated_home / 'keystore'}" in removed.stdout  # says what is kept, and where
    assert not unit.exists()
    assert json.loads(cli("autostart", "status", "--method", "systemd", "--json", env=env).stdout)["installed"] is False


def test_cli_status_without_method_reports_the_systemd_install(tmp_path: Path, isolated_home: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path / "user")}
    installed = cli("autostart", "install", "--method", "systemd", env=env)
    assert installed.returncode == 0, installed.stderr
    status = json.loads(cli("autostart", "status", "--json", env=env).stdout)
    assert status["method"] == "systemd" and status["installed"] and status["current"]
    assert not status["partly_installed"] and status["other_method_files"] == []
    text = cli("autostart", "status", env=env).stdout
    assert text.startswith("launch at login: installed, current\n  method: systemd user unit"), text
    assert "partly" not in text and "other method" not in text


# -- the tray's checkbox uses the same code -------------------------------------------------


def test_tray_start_at_login_toggle_changes_autostart_status(
    tmp_path: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYSTRAY_BACKEND", "dummy")
    from sidecar.cli.autostart import autostart_for
    from sidecar.paths import resolve_places
    from tests.test_tray_adapter import menu_item, recording_icon_class
    from tray.app import TrayApp, load_pystray

    places = resolve_places()
    pystray: Any = load_pystray()
    app = TrayApp(
        places,
        pystray,
        icon_factory=recording_icon_class(pystray),
        autostart=autostart_for(places, None, None, method="xdg"),
    )
    env = {**os.environ, "HOME": str(tmp_path / "user")}

    def reported() -> bool:
        done = cli("autostart", "status", "--method", "xdg", "--json", env=env)
        return bool(json.loads(done.stdout)["installed"])

    item = menu_item(app.icon.menu, "Start at login")
    assert item.checked is False and reported() is False
    item(app.icon)  # what a click does
    assert reported() is True
    assert menu_item(app.icon.menu, "Start at login").checked is True
    menu_item(app.icon.menu, "Start at login")(app.icon)
    assert reported() is False
    assert menu_item(app.icon.menu, "Start at login").checked is False


def test_install_warns_about_passwords_a_login_started_daemon_will_not_have(
    tmp_path: Path, isolated_home: Path
) -> None:
    (isolated_home / "config.toml").write_text(
        'active_identity = "dev"\n'
        '[identities.dev]\nrenew = "local-ca"\n'
        '[identities.company]\nrenew = "none"\npkcs12_password_env = "CORP_P12"\n'
        '[identities.vault]\nrenew = "none"\nkey_password_env = "VAULT_KEY"\n'
        'key_password_keyring = "mtls-sidecar/vault"\n'
    )
    env = {**os.environ, "HOME": str(tmp_path / "user"), "CORP_P12": "set in this shell only"}
    installed = cli("autostart", "install", "--method", "xdg", env=env)
    assert installed.returncode == 0, installed.stderr
    warnings = [line for line in installed.stdout.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, installed.stdout  # vault falls back to its keyring entry
    assert warnings[0].startswith(
        "warning: identity company takes its PKCS#12 password from the environment variable CORP_P12, "
        "which a daemon started at login does not have"
    )
    assert "keyring set mtls-sidecar company" in warnings[0]
    assert 'pkcs12_password_keyring = "mtls-sidecar/company"' in warnings[0]
    assert "set in this shell only" not in installed.stdout

    again = json.loads(cli("autostart", "install", "--method", "xdg", "--json", env=env).stdout)
    assert [w.split(",")[0] for w in again["warnings"]] == [
        "identity company takes its PKCS#12 password from the environment variable CORP_P12"
    ]
    (isolated_home / "config.toml").write_text('[identities.dev]\nrenew = "local-ca"\n')
    assert "warning" not in cli("autostart", "install", "--method", "xdg", env=env).stdout
