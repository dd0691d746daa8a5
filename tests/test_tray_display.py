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
