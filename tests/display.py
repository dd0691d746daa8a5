"""A real X display with a system tray, for tests of the tray app.

`tray_display(workdir)` starts, in this order, and stops in reverse on exit:

- `Xvfb` on a free display number (`-displayfd`), 800x600x24, no TCP;
- a D-Bus session bus (`dbus-launch --sh-syntax`; its daemon is killed by its pid at the end);
- `dunst`, the notification daemon (pystray's `notify()` talks to it over D-Bus);
- `trayer`, a system-tray host docked at the top right, whose window is named `panel`.

`Display.env` is a whole environment for a tray app subprocess (`python -m tray`,
`mtls-sidecar-tray`, or a test's own script): `Popen(cmd, env=display.env)`.

Every wait has a deadline, and a missing program is a test *failure* that names what to
install: a skipped display test would let a broken tray pass unnoticed.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.realservers import start_process, stop_process
from tests.waiting import wait_until

SCREEN = "800x600x24"
START_DEADLINE_S = 15.0
STOP_DEADLINE_S = 5.0
COMMAND_DEADLINE_S = 10.0
TRAYER_ARGS = ("--edge", "top", "--align", "right", "--widthtype", "request", "--height", "32", "--SetDockType", "true")
# A docked icon's socket window in trayer's panel is at least this wide; smaller children are
# trayer's own 1x1 helper windows, or a socket not yet resized to its icon.
MIN_ICON_PX = 20
# What GTK (and most toolkits) set on a popped-up menu's window.
MENU_WINDOW_TYPES = frozenset(
    {"_NET_WM_WINDOW_TYPE_POPUP_MENU", "_NET_WM_WINDOW_TYPE_DROPDOWN_MENU", "_NET_WM_WINDOW_TYPE_MENU"}
)

# Program -> Debian package that provides it; named in the failure message.
_APT_PACKAGE = {
    "Xvfb": "xvfb",
    "xdpyinfo": "x11-utils",
    "xwininfo": "x11-utils",
    "xprop": "x11-utils",
    "xdotool": "xdotool",
    "import": "imagemagick",
    "dbus-launch": "dbus-x11",
    "dbus-send": "dbus-x11",
    "dunst": "dunst",
    "dunstctl": "dunst",
    "trayer": "trayer",
}

# Notifications at the bottom right, away from the tray and its menus at the top right.
_DUNSTRC = """\
[global]
    origin = bottom-right
    offset = 10x10
    width = 300
    font = Monospace 9
"""

_CLIPBOARD_READ = (
    "import gi; gi.require_version('Gtk', '3.0'); from gi.repository import Gdk, Gtk; "
    "text = Gtk.Clipboard.get(Gdk.SELECTION_CLIPBOARD).wait_for_text(); print('<empty>' if text is None else text)"
)
_GTK_CHECK = (
    "import gi; gi.require_version('Gtk', '3.0'); from gi.repository import Gtk; print(Gtk.get_major_version())"
)

# `xwininfo -children` / `-root -children` line: `0x400026 "name": ("inst" "Class")  32x30+1+1  +767+1`
_CHILD_LINE = re.compile(r"^\s*(0x[0-9a-f]+) .*?\s(\d+)x(\d+)[+-]-?\d+[+-]-?\d+\s+\+?(-?\d+)\+?(-?\d+)\s*$")


class Geometry(NamedTuple):
    """A window's rectangle in root (screen) coordinates."""

    x: int
    y: int
    w: int
    h: int

    @property
    def center(self) -> tuple[int, int]:
        return (self.x + self.w // 2, self.y + self.h // 2)


class DisplayError(RuntimeError):
    """Part of the display stack did not start or answer; the message carries its log."""


def require_programs(*names: str) -> dict[str, str]:
    """Paths of `names`, or fail the test naming every missing program and its package."""
    found: dict[str, str] = {}
    missing: list[str] = []
    for name in names:
        path = shutil.which(name)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if missing:
        packages = sorted({_APT_PACKAGE.get(name, name) for name in missing})
        pytest.fail(
            f"not found: {', '.join(missing)}: install with apt-get install {' '.join(packages)} (.ci/run does this)",
            pytrace=False,
        )
    return found


def _log_tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "(no log)"
    text = data[-limit:].decode(errors="replace").strip()
    return text or "(empty log)"


class Display:
    """A running X display with a tray host and a notification daemon (see `tray_display`)."""

    def __init__(self, *, env: dict[str, str], workdir: Path, display: str, pids: dict[str, int]) -> None:
        self.env = env  # a whole environment for a tray app: Popen(cmd, env=display.env)
        self.workdir = workdir
        self.shots = workdir / "shots"
        self.display = display  # ":N"
        self.pids = pids  # what the harness started: Xvfb, dbus-daemon, dunst, trayer

    # -- running X clients -----------------------------------------------------------------

    def run(self, *args: str, check: bool = True, timeout: float = COMMAND_DEADLINE_S) -> str:
        """Run an X client on this display; return its stdout. A failure raises with its stderr."""
        proc = subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if check and proc.returncode != 0:
            raise DisplayError(
                f"{' '.join(args)} exited with {proc.returncode} on display {self.display}: {proc.stderr.strip()}"
            )
        return proc.stdout

    # -- screen ----------------------------------------------------------------------------

    def screenshot(self, path: Path) -> Path:
        """Save the whole screen as PNG (ImageMagick `import -window root`); a relative path is
        taken under `workdir/shots`. Returns the absolute path."""
        target = self._shot_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        self.run("import", "-window", "root", str(target))
        return target

    def screenshot_until(
        self, path: Path, predicate: Callable[[Path], bool], timeout: float = 10.0, what: str = "the screen"
    ) -> Path:
        """Take screenshots to `path` until `predicate(path)` holds (a drawn icon, an open menu)."""
        target = self._shot_path(path)
        wait_until(
            lambda: predicate(self.screenshot(target)), timeout=timeout, what=f"{what} (last screenshot: {target})"
        )
        return target

    def _shot_path(self, path: Path) -> Path:
        return path if path.is_absolute() else self.shots / path

    @staticmethod
    def pixel(png: Path, x: int, y: int) -> tuple[int, int, int]:
        """The RGB colour of one pixel of a screenshot."""
        from PIL import Image  # lazily: only display tests need Pillow

        with Image.open(png) as image:
            r, g, b = image.convert("RGB").getpixel((x, y))  # type: ignore[misc]
        return (int(r), int(g), int(b))

    # -- input -----------------------------------------------------------------------------

    def click(self, x: int, y: int, button: int = 1) -> None:
        """Move the pointer to (x, y), then press and release `button`.

        No `mousemove --sync`: xdotool 3.2016 then waits forever when the pointer is already at
        (x, y). Not needed either: the server handles XTEST events in order, motion first.
        """
        self.run("xdotool", "mousemove", str(x), str(y), "click", str(button))

    def key(self, *keys: str) -> None:
        """Type X keysyms (`Down`, `Return`, `Escape`) to whatever holds the keyboard, e.g. an open menu."""
        self.run("xdotool", "key", *keys)

    # -- windows ---------------------------------------------------------------------------

    def find_windows(self, name_regex: str) -> list[int]:
        """Ids of windows whose name matches `name_regex` (`xdotool search --name`); none is []."""
        out = self.run("xdotool", "search", "--name", name_regex, check=False)
        return [int(line) for line in out.split()]

    def window_geometry(self, wid: int) -> tuple[int, int, int, int]:
        """(x, y, width, height) of window `wid`, x and y in root coordinates."""
        out = self.run("xwininfo", "-id", str(wid))
        fields = dict(
            re.findall(r"^\s*(Absolute upper-left X|Absolute upper-left Y|Width|Height):\s*(-?\d+)", out, re.M)
        )
        return Geometry(
            int(fields["Absolute upper-left X"]),
            int(fields["Absolute upper-left Y"]),
            int(fields["Width"]),
            int(fields["Height"]),
        )

    def children(self, wid: int | None = None) -> list[tuple[int, Geometry]]:
        """Direct children of `wid` (default: the root window), mapped or not, with root-relative geometry."""
        target = ["-root"] if wid is None else ["-id", str(wid)]
        out = self.run("xwininfo", *target, "-children", check=False)
        found: list[tuple[int, Geometry]] = []
        for line in out.splitlines():
            match = _CHILD_LINE.match(line)
            if match:
                child, w, h, x, y = match.groups()
                found.append((int(child, 16), Geometry(int(x), int(y), int(w), int(h))))
        return found

    def is_viewable(self, wid: int) -> bool:
        out = self.run("xwininfo", "-id", str(wid), check=False)
        return "Map State: IsViewable" in out

    def window_types(self, wid: int) -> set[str]:
        """The window's `_NET_WM_WINDOW_TYPE` atoms (empty if it has none or is gone)."""
        out = self.run("xprop", "-id", str(wid), "_NET_WM_WINDOW_TYPE", check=False)
        return set(re.findall(r"_NET_WM_WINDOW_TYPE_[A-Z_]+", out))

    # -- the tray --------------------------------------------------------------------------

    def panel(self) -> int:
        """trayer's window (named `panel`)."""
        ids = self.find_windows("^panel$")
        if len(ids) != 1:
            raise DisplayError(f"expected one trayer window named 'panel', found {ids}")
        return ids[0]

    def tray_icons(self) -> list[Geometry]:
        """Docked icons, left to right: the children of trayer's panel at least MIN_ICON_PX wide.

        trayer wraps each docked icon in a socket window that is a direct child of `panel`
        (with `--widthtype request` the panel itself grows from 2 px as icons dock).
        """
        icons = [geo for _, geo in self.children(self.panel()) if geo.w >= MIN_ICON_PX and geo.h >= MIN_ICON_PX]
        return sorted(icons)

    def wait_for_tray_icon(self, timeout: float = 20) -> tuple[int, int, int, int]:
        """The geometry of the docked icon (the leftmost, if several), once one is docked."""
        icons: list[Geometry] = wait_until(
            self.tray_icons, timeout=timeout, what=f"an icon >= {MIN_ICON_PX} px wide in trayer's panel"
        )
        return icons[0]

    def wait_for_no_tray_icon(self, timeout: float = 10) -> None:
        wait_until(lambda: not self.tray_icons(), timeout=timeout, what="trayer's panel to have no icon")

    def menus(self) -> list[int]:
        """Viewable top-level windows whose type is a menu (GTK's popups are override-redirect)."""
        found: list[int] = []
        for wid, geo in self.children():
            if geo.w > 1 and geo.h > 1 and self.window_types(wid) & MENU_WINDOW_TYPES and self.is_viewable(wid):
                found.append(wid)
        return found

    def wait_for_menu(self, timeout: float = 10) -> int:
        """The id of the one open menu window, once it is viewable."""
        found: list[int] = wait_until(self.menus, timeout=timeout, what="a menu window to open")
        if len(found) != 1:
            raise DisplayError(f"expected one open menu, found {len(found)}: {found}")
        return found[0]

    def wait_for_no_menu(self, timeout: float = 10) -> None:
        wait_until(lambda: not self.menus(), timeout=timeout, what="every menu window to close")

    def open_menu(self, x: int, y: int, timeout: float = 10) -> int:
        """Right-click (x, y), e.g. a tray icon's centre; return the menu window once it is open."""
        self.click(x, y, button=3)
        return self.wait_for_menu(timeout)

    def open_tray_menu(self, icon: tuple[int, int, int, int] | None = None, timeout: float = 10) -> int:
        """Right-click the centre of `icon` (default: the docked icon); return the menu window once open."""
        geo = Geometry(*(icon if icon is not None else self.wait_for_tray_icon(timeout)))
        return self.open_menu(*geo.center, timeout=timeout)

    def choose_menu_path(self, positions: Sequence[int], timeout: float = 10) -> None:
        """Activate a menu item by keyboard, given its position at each level; wait until the menu closes.

        `[3]` is the third item of the open menu; `[2, 1]` the first item of the second item's
        submenu. Positions start at 1 and count only *enabled* items: GTK's Down skips
        separators and disabled items. Labels cannot be read from X (GTK draws the items into
        one window), so map labels to positions from the app's own menu model. The pointer must
        not rest on the menu (hover selects an item); after `open_menu` it is on the icon.
        """
        if not positions or any(not isinstance(p, int) or p < 1 for p in positions):
            raise ValueError(f"menu positions are ints from 1 (enabled items only), not labels: got {positions!r}")
        self.key(*["Down"] * positions[0])
        for depth, position in enumerate(positions[1:], start=1):
            # Right opens the submenu with its first item selected.
            self.key("Right")
            self._wait_for_open_menus(depth + 1, timeout, what=f"submenu {depth} of {list(positions)} to open")
            if position > 1:
                self.key(*["Down"] * (position - 1))
        self.key("Return")
        self.wait_for_no_menu(timeout)

    def _wait_for_open_menus(self, count: int, timeout: float, what: str) -> None:
        wait_until(lambda: len(self.menus()) >= count, timeout=timeout, what=what)

    def choose_menu_item(self, position: int, timeout: float = 10) -> None:
        """Activate item `position` (1 = the first enabled one) of the open menu: `choose_menu_path([position])`."""
        self.choose_menu_path([position], timeout)

    # -- notifications (dunst) -------------------------------------------------------------

    def notifications_displayed(self) -> int:
        """How many notifications dunst shows right now."""
        return int(self.run("dunstctl", "count", "displayed").strip())

    def notifications_history(self) -> int:
        """How many notifications dunst has closed (timed out or dismissed)."""
        return int(self.run("dunstctl", "count", "history").strip())

    def read_notifications(self) -> list[tuple[str, str]]:
        """Close what dunst shows, then read every closed notification as (summary, body), newest first."""
        self.run("dunstctl", "close-all")
        history = json.loads(self.run("dunstctl", "history"))
        return [(n["summary"]["data"], n["body"]["data"]) for group in history["data"] for n in group]

    # -- the clipboard -----------------------------------------------------------------------

    def clipboard_text(self) -> str | None:
        """What the CLIPBOARD selection holds, read by another X client (GTK, as a paste would)."""
        out = self.run(sys.executable, "-c", _CLIPBOARD_READ).strip()
        return None if out == "<empty>" else out


# ------------------------------------------------------------------------------------------
# starting and stopping


def _pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie awaiting its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill_pid(pid: int) -> None:
    """Stop a process that is not our child (the D-Bus daemon that dbus-launch forked)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with suppress(ProcessLookupError):
            os.kill(pid, sig)
        with suppress(AssertionError):
            wait_until(lambda: not _pid_alive(pid), timeout=STOP_DEADLINE_S, what=f"pid {pid} to exit")
            return
    raise DisplayError(f"pid {pid} survived SIGKILL for {STOP_DEADLINE_S} s")


def _read_display_number(fd: int, proc: subprocess.Popen[bytes], log: Path) -> str:
    """Read the display number Xvfb writes to `fd` (`-displayfd`), with a deadline."""
    deadline = time.monotonic() + START_DEADLINE_S
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DisplayError(f"Xvfb wrote no display number within {START_DEADLINE_S} s:\n{_log_tail(log)}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 64)
        if not chunk:
            raise DisplayError(f"Xvfb exited ({proc.poll()}) before it named its display:\n{_log_tail(log)}")
        data += chunk
    return ":" + data.decode().strip()


def _alive_or_raise(proc: subprocess.Popen[bytes], name: str, log: Path) -> None:
    if proc.poll() is not None:
        raise DisplayError(f"{name} exited with {proc.returncode}:\n{_log_tail(log)}")


def _start_xvfb(stack: ExitStack, base_env: dict[str, str], logs: Path, pids: dict[str, int]) -> str:
    log = logs / "xvfb.log"
    read_fd, write_fd = os.pipe()
    try:
        # -noreset: without it the server resets whenever its last client leaves (e.g. between
        # xdpyinfo and trayer), and a client that connects during the reset is refused.
        proc = start_process(
            ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", SCREEN, "-nolisten", "tcp", "-noreset"],
            log,
            env=base_env,
            pass_fds=(write_fd,),
        )
        stack.callback(stop_process, proc)
        pids["Xvfb"] = proc.pid
        os.close(write_fd)
        write_fd = -1
        display = _read_display_number(read_fd, proc, log)
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)

    # The number arrives a moment before the server accepts clients.
    def answers() -> bool:
        _alive_or_raise(proc, "Xvfb", log)
        return (
            subprocess.run(
                ["xdpyinfo"], env={**base_env, "DISPLAY": display}, capture_output=True, timeout=COMMAND_DEADLINE_S
            ).returncode
            == 0
        )

    wait_until(answers, timeout=START_DEADLINE_S, what=f"Xvfb on {display} to answer xdpyinfo")
    return display


def _start_dbus(stack: ExitStack, base_env: dict[str, str], pids: dict[str, int]) -> dict[str, str]:
    # Without DISPLAY: the bus then has nothing to do with X (no autolaunch window or property).
    env = {k: v for k, v in base_env.items() if k not in ("DISPLAY", "DBUS_SESSION_BUS_ADDRESS")}
    proc = subprocess.run(
        ["dbus-launch", "--sh-syntax"],
        env=env,
        capture_output=True,
        text=True,
        timeout=START_DEADLINE_S,
        stdin=subprocess.DEVNULL,
    )
    found = dict(re.findall(r"^(DBUS_SESSION_BUS_ADDRESS|DBUS_SESSION_BUS_PID)='?([^';\n]*)'?;", proc.stdout, re.M))
    if "DBUS_SESSION_BUS_PID" in found:
        pids["dbus-daemon"] = int(found["DBUS_SESSION_BUS_PID"])
        stack.callback(_kill_pid, pids["dbus-daemon"])
    if proc.returncode != 0 or len(found) != 2:
        raise DisplayError(f"dbus-launch --sh-syntax failed ({proc.returncode}): {proc.stdout!r} {proc.stderr!r}")
    return {"DBUS_SESSION_BUS_ADDRESS": found["DBUS_SESSION_BUS_ADDRESS"]}


def _bus_name_has_owner(env: dict[str, str], name: str) -> bool:
    out = subprocess.run(
        [
            "dbus-send",
            "--session",
            "--print-reply",
            "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.NameHasOwner",
            f"string:{name}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_DEADLINE_S,
    ).stdout
    return "boolean true" in out


def _check_gtk(env: dict[str, str]) -> None:
    """pystray's gtk backend needs PyGObject and GTK 3's typelib: fail early, saying which."""
    proc = subprocess.run(
        [sys.executable, "-c", _GTK_CHECK],
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_DEADLINE_S,
    )
    if proc.returncode != 0 or proc.stdout.strip() != "3":
        pytest.fail(
            "GTK 3 from Python is not usable (pystray's gtk backend needs it): "
            'python3 -m pip install "PyGObject<3.51" after apt-get install gir1.2-gtk-3.0 libgirepository1.0-dev '
            f"libcairo2-dev pkg-config (.ci/run does this). It said: {proc.stderr.strip()[-2000:]}",
            pytrace=False,
        )


def _xdg_env(base_env: dict[str, str], workdir: Path) -> dict[str, str]:
    """XDG folders the caller has not set, under the workdir (GLib wants a 0700 runtime dir)."""
    extra: dict[str, str] = {}
    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME", "XDG_RUNTIME_DIR"):
        if not base_env.get(var):
            folder = workdir / "xdg" / var.lower()
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            extra[var] = str(folder)
    return extra


def _keep_artifacts(workdir: Path, artifacts: Path) -> None:
    """Replace `artifacts` with copies of the screenshots and logs, for a person to look at."""
    shutil.rmtree(artifacts, ignore_errors=True)
    artifacts.mkdir(parents=True)
    for folder in ("shots", "logs"):
        source = workdir / folder
        if source.is_dir():
            shutil.copytree(source, artifacts / folder)


@contextmanager
def tray_display(workdir: Path, artifacts: Path | None = None) -> Iterator[Display]:
    """A display with a tray host and a notification daemon.

    Logs go to `workdir/logs`, relative screenshot paths to `workdir/shots`; on exit, pass or
    fail, both are copied to `artifacts` (emptied first) if given. Everything started is
    stopped on exit.
    """
    require_programs(*_APT_PACKAGE)
    workdir = workdir.resolve()
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pids: dict[str, int] = {}

    base_env = {k: v for k, v in os.environ.items() if k not in ("WAYLAND_DISPLAY", "DISPLAY")}
    base_env.update(_xdg_env(base_env, workdir))
    with ExitStack() as stack:
        if artifacts is not None:
            stack.callback(_keep_artifacts, workdir, artifacts)
        display = _start_xvfb(stack, base_env, logs, pids)
        env = {
            **base_env,
            "DISPLAY": display,
            "GDK_BACKEND": "x11",
            "NO_AT_BRIDGE": "1",  # no accessibility bus: GTK would wait for it
            "PYSTRAY_BACKEND": "gtk",
        }
        env.update(_start_dbus(stack, env, pids))
        _check_gtk(env)

        dunstrc = workdir / "dunstrc"
        dunstrc.write_text(_DUNSTRC)
        dunst_log = logs / "dunst.log"
        dunst = start_process(["dunst", "-config", str(dunstrc)], dunst_log, env=env)
        stack.callback(stop_process, dunst)
        pids["dunst"] = dunst.pid

        def dunst_ready() -> bool:
            _alive_or_raise(dunst, "dunst", dunst_log)
            return _bus_name_has_owner(env, "org.freedesktop.Notifications")

        wait_until(dunst_ready, timeout=START_DEADLINE_S, what="dunst to own org.freedesktop.Notifications")

        trayer_log = logs / "trayer.log"
        trayer = start_process(["trayer", *TRAYER_ARGS], trayer_log, env=env)
        stack.callback(stop_process, trayer)
        pids["trayer"] = trayer.pid
        screen = Display(env=env, workdir=workdir, display=display, pids=pids)

        def panel_up() -> bool:
            _alive_or_raise(trayer, "trayer", trayer_log)
            return any(screen.is_viewable(wid) for wid in screen.find_windows("^panel$"))

        wait_until(panel_up, timeout=START_DEADLINE_S, what="trayer's 'panel' window")
        yield screen
