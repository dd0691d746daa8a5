"""The tray on a real X display: Xvfb, a tray host (trayer), the gtk backend, a real daemon.

Open the menu with a real right-click, choose another identity, check through the API that
it switched; watch the icon turn red when the keystore holds only expired certificates.
Screenshots are kept under test-artifacts/tray/ (the path is printed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from tests.daemon_runner import DaemonThread
from tests.display import tray_display
from tests.pki import now
from tests.scenario import Pki, mtls_server, route_to, write_config
from tests.waiting import wait_until
from tray.icons import COLOURS
from tray.model import IconState, MenuItem, build_menu, utc_now

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "tray"


def close_to(pixel: tuple[int, int, int], colour: tuple[int, int, int], tolerance: int = 60) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour, strict=True))


def icon_colour(display, shot: Path, geometry: tuple[int, int, int, int]) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    """The colour of the padlock's body: a point low in the middle of the docked icon."""
    x, y, w, h = geometry
    return display.pixel(shot, x + int(w * 0.35), y + int(h * 0.8))


def menu_path(menu: tuple[MenuItem, ...], *prefixes: str) -> list[int]:
    """Keyboard positions (enabled items only, from 1) of the items whose text starts with each prefix.

    X cannot read GTK's drawn labels, so the labels are looked up in the tray's own model.
    """
    positions: list[int] = []
    items = menu
    for prefix in prefixes:
        enabled = [item for item in items if item.enabled and item.text != "-"]
        matches = [i for i, item in enumerate(enabled, start=1) if item.text.startswith(prefix)]
        assert len(matches) == 1, f"expected one enabled menu item starting {prefix!r} in {[i.text for i in enabled]}"
        positions.append(matches[0])
        items = enabled[matches[0] - 1].submenu
    return positions


def test_tray_menu_switches_identity_and_icon_turns_red_on_expiry(isolated_home: Path, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {ARTIFACTS}")
    pki = Pki.create(tmp_path / "pki")
    keystore = isolated_home / "keystore"
    pki.enroll(keystore, "dev", "dev-1", cn="dev")
    pki.enroll(keystore, "ci-bot", "ci-1", cn="ci-bot")
    with mtls_server(pki) as server, tray_display(tmp_path / "display") as display:
        config = write_config(
            isolated_home / "config.toml",
            active="dev",
            identities={"dev": {"renew": "none"}, "ci-bot": {"renew": "none"}},
            routes={"api": route_to(pki, server.port)},
        )
        with DaemonThread(config) as daemon:
            env = {**os.environ, **display.env, "MTLS_SIDECAR_HOME": str(isolated_home)}
            with (tmp_path / "tray.log").open("wb") as tray_log:
                tray = subprocess.Popen(
                    [sys.executable, "-m", "tray", "--log-level", "debug"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=tray_log,
                )
            try:
                geometry = display.wait_for_tray_icon(timeout=30)
                x, y, w, h = geometry
                # the icon is green once the tray has the daemon's status
                shot = ARTIFACTS / "tray-icon-ok.png"

                def green() -> bool:
                    display.screenshot(shot)
                    return close_to(icon_colour(display, shot, geometry), COLOURS[IconState.OK])

                wait_until(green, timeout=15, what="a green (ok) tray icon")

                display.open_menu(x + w // 2, y + h // 2)
                display.screenshot(ARTIFACTS / "tray-menu.png")
                # Switch identity ▸ ci-bot: the first item is a label, then "Switch identity"
                display.choose_menu_path(menu_path(build_menu(daemon.status(), utc_now()), "Switch identity", "ci-bot"))
                wait_until(
                    lambda: daemon.status()["active_identity"] == "ci-bot",
                    timeout=10,
                    what="the daemon to report ci-bot active after the menu click",
                )

                # only expired certificates left for the active identity: the icon turns red
                for credential in (keystore / "ci-bot").iterdir():
                    credential.unlink()
                pki.enroll(
                    keystore,
                    "ci-bot",
                    "old",
                    cn="ci-bot",
                    not_before=now() - timedelta(days=3),
                    not_after=now() - timedelta(days=1),
                )
                red_shot = ARTIFACTS / "tray-icon-error.png"

                def red() -> bool:
                    display.screenshot(red_shot)
                    return close_to(icon_colour(display, red_shot, geometry), COLOURS[IconState.ERROR])

                wait_until(red, timeout=15, what="the tray icon to turn red")
            finally:
                tray.terminate()
                tray.wait(timeout=10)
    print((tmp_path / "tray.log").read_text()[-2000:])


def start_tray(display, home: Path, log: Path, **env: str) -> subprocess.Popen[bytes]:  # type: ignore[no-untyped-def]
    """`python -m tray` on the display (gtk backend unless `env` says otherwise), its stderr to `log`."""
    environment = {**os.environ, **display.env, "MTLS_SIDECAR_HOME": str(home), **env}
    environment = {k: v for k, v in environment.items() if v}  # "" removes a variable
    with log.open("wb") as out:
        command = [sys.executable, "-m", "tray", "--log-level", "debug"]
        return subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=out)


def test_expiring_certificate_turns_the_icon_amber_with_a_notification_and_copy_address_copies(
    isolated_home: Path, tmp_path: Path
) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pki = Pki.create(tmp_path / "pki")
    # a 10-day certificate with 2 days left and renew = "none": inside the 7-day warning horizon
    pki.enroll(
        isolated_home / "keystore",
        "dev",
        "dev-1",
        cn="dev",
        not_before=now() - timedelta(days=8),
        not_after=now() + timedelta(days=2),
    )
    with mtls_server(pki) as server, tray_display(tmp_path / "display") as display:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={"api": route_to(pki, server.port)},
        )
        with DaemonThread(config) as daemon:
            tray = start_tray(display, isolated_home, tmp_path / "tray.log")
            try:
                geometry = display.wait_for_tray_icon(timeout=30)
                x, y, w, h = geometry
                shot = ARTIFACTS / "tray-icon-expiring.png"

                def amber() -> bool:
                    display.screenshot(shot)
                    return close_to(icon_colour(display, shot, geometry), COLOURS[IconState.WARNING])

                wait_until(amber, timeout=15, what="an amber (warning) tray icon")
                # the notification, through dunst: it names the identity and what to do
                warning = daemon.status()["identities"]["dev"]["expiry_warning"]
                assert warning and "put a new certificate and key in" in warning
                shown = wait_until(
                    lambda: [body for title, body in display.read_notifications() if title.endswith("expires soon")],
                    timeout=15,
                    what="the expiry notification in dunst",
                )
                assert shown == [warning]

                # Routes ▸ api ▸ Copy address: another X client pastes the address
                display.open_menu(x + w // 2, y + h // 2)
                display.choose_menu_path(
                    menu_path(build_menu(daemon.status(), utc_now()), "Routes", "api", "Copy address")
                )
                address = f"127.0.0.1:{daemon.port('api')}"
                wait_until(lambda: display.clipboard_text() == address, timeout=10, what=f"{address} on the clipboard")
            finally:
                tray.terminate()
                tray.wait(timeout=10)
    log = (tmp_path / "tray.log").read_text()
    assert "could not be copied" not in log
    print(log[-2000:])


def test_without_gtk_the_tray_says_once_what_to_install(isolated_home: Path, tmp_path: Path) -> None:
    """No GTK for Python: pystray falls back to its xorg backend (an icon, no menu, no notifications),
    and the tray says so once, with the line that installs what is missing."""
    hidden = tmp_path / "no-gtk" / "gi"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text('raise ImportError("gi hidden by the test: no GTK for Python here")\n')
    log = tmp_path / "tray.log"
    with tray_display(tmp_path / "display") as display:
        tray = start_tray(
            display, isolated_home, log, PYSTRAY_BACKEND="", PYTHONPATH=str(hidden.parent), GDK_BACKEND=""
        )
        try:
            display.wait_for_tray_icon(timeout=30)  # the xorg backend docks an icon all the same
            wait_until(lambda: "GTK for Python is missing" in log.read_text(), timeout=10, what="the notice")
        finally:
            tray.terminate()
            tray.wait(timeout=10)
    text = log.read_text()
    assert text.count("GTK for Python is missing") == 1, text
    assert "no menu and shows no notifications" in text and "gir1.2-gtk-3.0" in text and "install" in text
    assert "gtk: ImportError: gi hidden by the test" in text  # why GTK could not be used
