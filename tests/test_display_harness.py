"""The display harness itself: a real pystray app (gtk backend) docks in trayer on Xvfb, shows
its icon, opens its menu on a right-click, runs menu items and sends a notification to dunst.

Screenshots and logs are copied to test-artifacts/display/<test name>/ (printed, gitignored).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from tests.display import Display, Geometry, tray_display
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts" / "display"
RED = (255, 0, 0)

# A tray app as small as can be: a solid red 64x64 icon and a menu of two items. The first
# sends a notification, the second writes "clicked" to the file named by argv[1].
SMOKE_APP = """\
import sys
from pathlib import Path

import pystray
from PIL import Image

marker = Path(sys.argv[1])


def notify(icon, item):
    icon.notify("the display harness works", "Smoke test")


def write_marker(icon, item):
    marker.write_text("clicked")


icon = pystray.Icon(
    "display-smoke",
    Image.new("RGB", (64, 64), (255, 0, 0)),
    "Display smoke test",
    menu=pystray.Menu(pystray.MenuItem("Notify", notify), pystray.MenuItem("Write marker", write_marker)),
)
print("backend:", type(icon).__module__, flush=True)
icon.run()
"""


# A menu like the real tray's: a disabled status line, separators, a submenu with a disabled
# item. Each enabled leaf writes its own name to argv[1].
NESTED_APP = """\
import sys
from pathlib import Path

import pystray
from PIL import Image

out = Path(sys.argv[1])


def choose(name):
    return lambda icon, item: out.write_text(name)


icon = pystray.Icon(
    "display-nested",
    Image.new("RGB", (64, 64), (0, 0, 255)),
    "Display nested menu test",
    menu=pystray.Menu(
        pystray.MenuItem("status: ok", None, enabled=False),
        pystray.Menu.SEPARATOR,
        pystray.MenuItem(
            "Switch identity",
            pystray.Menu(
                pystray.MenuItem("dev", choose("dev"), checked=lambda item: True, radio=True),
                pystray.MenuItem("retired", choose("retired"), enabled=False),
                pystray.MenuItem("ci-bot", choose("ci-bot"), checked=lambda item: False, radio=True),
            ),
        ),
        pystray.Menu.SEPARATOR,
        pystray.MenuItem("Quit", choose("quit")),
    ),
)
icon.run()
"""


def _require_python_packages() -> None:
    missing = [
        name for name, module in (("pystray", "pystray"), ("pillow", "PIL")) if not importlib.util.find_spec(module)
    ]
    if missing:
        pytest.fail(f"not installed: {', '.join(missing)}: python3 -m pip install {' '.join(missing)}", pytrace=False)


@contextmanager
def _app(display: Display, script: str, marker: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run `script` (a pystray app) with `marker` as its argument, on the display, logging to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(marker)],
            env=display.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _reddish(rgb: tuple[int, int, int]) -> bool:
    r, g, b = rgb
    return r >= 200 and g <= 60 and b <= 60


def _inner_points(geo: Geometry, margin: int = 4) -> list[tuple[int, int]]:
    """A 3x3 grid of points inside `geo`, `margin` px in from its edges."""
    xs = (geo.x + margin, geo.x + geo.w // 2, geo.x + geo.w - 1 - margin)
    ys = (geo.y + margin, geo.y + geo.h // 2, geo.y + geo.h - 1 - margin)
    return [(x, y) for x in xs for y in ys]


def test_tray_icon_menu_and_notification_on_a_real_display(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    _require_python_packages()
    artifacts = ARTIFACTS / request.node.name
    print(f"display screenshots and logs: {artifacts}")
    marker = tmp_path / "marker"
    app_log = tmp_path / "display" / "logs" / "smoke-app.log"

    with (
        tray_display(tmp_path / "display", artifacts=artifacts) as display,
        _app(display, SMOKE_APP, marker, app_log) as app,
    ):

        def app_says() -> str:
            return f"app exit code {app.poll()}, its log:\n{app_log.read_text(errors='replace')}"

        try:
            icon = Geometry(*display.wait_for_tray_icon(timeout=20))
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {app_says()}") from None
        # The socket is 32x30 in a 32 px panel at the top right; pystray scales the icon to it.
        assert icon.w >= 20 and icon.h >= 20 and icon.y < 32 and icon.x + icon.w <= 800, icon

        def icon_is_red(png: Path) -> bool:
            return all(_reddish(display.pixel(png, x, y)) for x, y in _inner_points(icon))

        shot = display.screenshot_until(Path("1-icon.png"), icon_is_red, what=f"a red icon at {icon}")
        assert not _reddish(display.pixel(shot, 10, 300)), "the rest of the screen should not be red"

        # Right-click: the menu opens below the icon, as an override-redirect popup window.
        display.click(*icon.center, button=3)
        menu = display.wait_for_menu()
        menu_geo = Geometry(*display.window_geometry(menu))
        assert menu_geo.y >= icon.y + icon.h - 1 and menu_geo.h >= 40, (menu_geo, icon)
        display.screenshot_until(
            Path("2-menu.png"),
            lambda png: display.pixel(png, *menu_geo.center) != (0, 0, 0),
            what=f"the menu drawn at {menu_geo}",
        )

        # First item: notify() goes over D-Bus to dunst, which shows it.
        display.key("Down", "Return")
        display.wait_for_no_menu()
        wait_until(lambda: display.notifications_displayed() >= 1, timeout=10, what="dunst to show the notification")
        display.screenshot(Path("3-notification.png"))
        assert not marker.exists(), "the first item must not run the second item's action"

        # Second item by mouse: with two items of equal height, 3/4 down the menu is the second.
        menu_geo = Geometry(*display.window_geometry(display.open_tray_menu(icon)))
        display.click(menu_geo.x + menu_geo.w // 2, menu_geo.y + menu_geo.h * 3 // 4)
        wait_until(marker.exists, timeout=10, what=f"the second menu item (clicked) to write {marker}")
        assert marker.read_text() == "clicked"
        display.wait_for_no_menu()
        display.screenshot(Path("4-after-second-item.png"))

        # Second item by keyboard, through the harness's shorthand for the steps above.
        marker.unlink()
        display.open_tray_menu(icon)
        display.choose_menu_item(2)
        wait_until(marker.exists, timeout=10, what=f"the second menu item (by keyboard) to write {marker}")

        assert app.poll() is None, app_says()
        assert "backend: pystray._gtk" in app_log.read_text(), app_says()


def test_choose_menu_path_skips_disabled_items_and_opens_submenus(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    _require_python_packages()
    artifacts = ARTIFACTS / request.node.name
    print(f"display screenshots and logs: {artifacts}")
    chosen = tmp_path / "chosen"
    app_log = tmp_path / "display" / "logs" / "nested-app.log"
    with (
        tray_display(tmp_path / "display", artifacts=artifacts) as display,
        _app(display, NESTED_APP, chosen, app_log),
    ):
        icon = Geometry(*display.wait_for_tray_icon())
        # Enabled items: "Switch identity" (1) and "Quit" (2); in the submenu "dev" (1), "ci-bot" (2).
        for path, expected in (([1, 2], "ci-bot"), ([1, 1], "dev"), ([2], "quit")):
            chosen.unlink(missing_ok=True)
            display.open_menu(*icon.center)
            display.choose_menu_path(path)
            wait_until(chosen.exists, timeout=10, what=f"menu path {path} to choose {expected!r}")
            assert chosen.read_text() == expected, path

        # With the submenu open there are two menu windows; Escape closes one at a time.
        display.open_menu(*icon.center)
        display.key("Down", "Right")
        wait_until(lambda: len(display.menus()) == 2, timeout=10, what="the submenu to open beside the menu")
        display.screenshot(Path("submenu.png"))
        display.key("Escape", "Escape")
        display.wait_for_no_menu()
        with pytest.raises(ValueError, match="not labels"):
            display.choose_menu_path(["Switch identity", "ci-bot"])  # type: ignore[list-item]


def test_tray_display_leaves_nothing_running(tmp_path: Path) -> None:
    with tray_display(tmp_path / "display") as display:
        pids = dict(display.pids)
        socket = Path("/tmp/.X11-unix") / f"X{display.display.lstrip(':')}"
        assert socket.exists(), socket
        assert set(pids) == {"Xvfb", "dbus-daemon", "dunst", "trayer"}, pids
        assert display.tray_icons() == [], "no app yet, so no icon"
    still_running = {name: pid for name, pid in pids.items() if _running(pid)}
    assert still_running == {}, f"left running after the display closed: {still_running}"
    assert not socket.exists(), f"Xvfb left its socket {socket}"


def test_a_missing_program_fails_naming_its_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing to be found
    with (
        pytest.raises(pytest.fail.Exception, match=r"Xvfb.*trayer.*apt-get install .*xvfb") as failure,
        tray_display(tmp_path / "display"),
    ):
        raise AssertionError("the display must not start without its programs")
    assert "dbus-x11" in str(failure.value) and "imagemagick" in str(failure.value)


def _running(pid: int) -> bool:
    with suppress(FileNotFoundError, ProcessLookupError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False
