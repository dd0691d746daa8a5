"""The pystray adapter and the events follower. All decisions are in `model`; this only shows
them and turns clicks into control-API calls.

pystray picks its backend when imported (and raises without a display), so it is imported
lazily, after we have tried each backend and can say why each one failed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sidecar.autostart.manage import Autostart
from sidecar.control.client import ApiCallError, ControlClient, DaemonNotRunning
from sidecar.errors import SidecarError
from sidecar.paths import Places, resolve_places
from tray.icons import icon_image
from tray.model import MenuItem, NotificationMemory, TrayView, notifications_for, utc_now, view

log = logging.getLogger("tray")

# Reconnect back-off after the daemon goes away: never a busy loop.
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
LINUX_BACKENDS = ("appindicator", "gtk", "xorg")


class NoTrayBackend(Exception):
    pass


def load_pystray() -> Any:
    """Import pystray with a backend that works here, or say why none does."""
    wanted = os.environ.get("PYSTRAY_BACKEND")
    candidates = (wanted,) if wanted else (LINUX_BACKENDS if sys.platform.startswith("linux") else ("",))
    failures = []
    for backend in candidates:
        if backend:
            try:
                importlib.import_module(f"pystray._{backend}")
            except Exception as exc:  # each backend fails its own way: ImportError, ValueError, Xlib errors
                failures.append(f"{backend}: {type(exc).__name__}: {exc}")
                continue
            os.environ["PYSTRAY_BACKEND"] = backend
        try:
            return importlib.import_module("pystray")
        except Exception as exc:
            failures.append(f"{backend or 'default'}: {type(exc).__name__}: {exc}")
    display = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or "none"
    raise NoTrayBackend(
        f"no system tray available (display: {display}); tried "
        + "; ".join(failures)
        + ". Run it inside a desktop session, or set PYSTRAY_BACKEND to a working backend"
    )


class TrayApp:
    """Follows the daemon's events; rebuilds the view on each one; performs menu actions."""

    def __init__(
        self,
        places: Places,
        pystray: Any,
        *,
        icon_factory: Callable[..., Any] | None = None,
        autostart: Autostart | None = None,
    ) -> None:
        self.places = places
        self.autostart = autostart  # None: no "Start at login" item (unsupported here)
        self.client = ControlClient(places.control_socket, timeout=10)
        self.pystray = pystray
        self.status: dict[str, Any] | None = None
        self.error: str | None = None
        self.memory = NotificationMemory()
        self._stop = threading.Event()
        self._view: TrayView | None = None
        self._lock = threading.Lock()
        factory = icon_factory or pystray.Icon
        self.icon = factory("mtls-sidecar", icon=icon_image(view(None, utc_now()).state), title="mtls-sidecar")
        self.refresh_view()

    # --- following the daemon

    def follow(self) -> None:
        """Runs on its own thread: status, then events, until stopped; reconnects with back-off."""
        attempt = 0
        while not self._stop.is_set():
            try:
                for event in self.client.events():
                    attempt = 0
                    self.fetch_status()
                    self.on_event(event)
                    if self._stop.is_set():
                        return
            except (DaemonNotRunning, ApiCallError, OSError, ValueError) as exc:
                self.error = str(exc) if not isinstance(exc, DaemonNotRunning) else None
            self.status = None
            self.refresh_view()
            delay = RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)]
            attempt += 1
            self._stop.wait(delay)

    def fetch_status(self) -> None:
        try:
            self.status = self.client.get("/v1/status")
            self.error = None
        except (DaemonNotRunning, OSError) as exc:
            self.status, self.error = None, str(exc)
        except ApiCallError as exc:
            self.status, self.error = None, f"the daemon answered an error: {exc}"
        self.refresh_view()

    def on_event(self, event: dict[str, Any]) -> None:
        for note in notifications_for(event, self.status, utc_now(), self.memory):
            if getattr(self.icon, "HAS_NOTIFICATION", False):
                try:
                    self.icon.notify(note.message, note.title)
                except Exception as exc:  # a notification daemon that went away must not stop the tray
                    log.debug("notification failed: %s", exc)
            log.info("%s: %s", note.title, note.message)

    # --- showing

    def refresh_view(self) -> None:
        with self._lock:  # the follower thread and pystray's menu thread both come here
            self._refresh_view()

    def _refresh_view(self) -> None:
        new = view(self.status, utc_now(), error=self.error, autostart=self._autostart_installed())
        if new == self._view:
            return
        old = self._view
        if old is None or old.state != new.state:
            self.icon.icon = icon_image(new.state)
        self.icon.title = new.tooltip
        self.icon.menu = self.pystray.Menu(*[self._item(i) for i in new.menu])
        if getattr(self.icon, "HAS_MENU", True):
            try:
                self.icon.update_menu()
            except Exception as exc:  # some backends cannot update a menu before the icon shows
                log.debug("menu update deferred: %s", exc)
        self._view = new  # last: whoever reads the view finds the icon already showing it

    def _item(self, item: MenuItem) -> Any:
        pystray = self.pystray
        if item.text == "-":
            return pystray.Menu.SEPARATOR
        if item.submenu:
            return pystray.MenuItem(
                item.text, pystray.Menu(*[self._item(i) for i in item.submenu]), enabled=item.enabled
            )
        action = item.action
        callback = (lambda icon, menu_item: self.perform(action)) if action else None
        checked = item.checked
        return pystray.MenuItem(
            item.text,
            callback,
            enabled=item.enabled and action is not None,
            default=item.default,
            radio=item.radio,
            checked=(lambda menu_item: checked) if checked is not None else None,
        )

    def _autostart_installed(self) -> bool | None:
        if self.autostart is None:
            return None
        try:
            return self.autostart.is_installed()
        except (OSError, ValueError) as exc:
            log.debug("autostart status unavailable: %s", exc)
            return None

    # --- doing

    def perform(self, action: str) -> None:
        """Run a menu action; errors become a notification (and a log line), never a crash."""
        try:
            self._perform(action)
        except (ApiCallError, DaemonNotRunning, SidecarError, OSError) as exc:
            self._tell("mtls-sidecar", str(exc))
        self.fetch_status()

    def _perform(self, action: str) -> None:
        kind, _, rest = action.partition(":")
        if kind == "use":
            self.client.post("/v1/active-identity", {"name": rest})
        elif kind == "route-identity":
            route, _, identity = rest.partition(":")
            self.client.post(f"/v1/routes/{route}/identity", {"name": identity})
        elif kind == "renew":
            self.client.post(f"/v1/identities/{rest}/renew")
        elif kind == "copy":
            address = (self.status or {}).get("routes", {}).get(rest, {}).get("listen", "")
            if not copy_to_clipboard(address):
                self._tell("Route address", address)
        elif kind == "open-config":
            open_path(self.places.config_file)
        elif kind == "open-logs":
            self.places.logs.mkdir(parents=True, exist_ok=True)
            open_path(self.places.logs)
        elif kind == "start-daemon":
            start_daemon()
        elif kind == "toggle-autostart" and self.autostart is not None:
            # The same code as `mtls-sidecar autostart install|uninstall`.
            if self.autostart.is_installed():
                self.autostart.uninstall()
            else:
                self.autostart.install()
        elif kind == "quit":
            self.stop()

    def _tell(self, title: str, message: str) -> None:
        log.warning("%s: %s", title, message)
        if getattr(self.icon, "HAS_NOTIFICATION", False):
            try:
                self.icon.notify(message, title)
            except Exception as exc:
                log.debug("notification failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        self.icon.stop()

    def run(self) -> None:
        """Show the icon; follow the daemon on a thread (pystray's loop owns this one)."""

        def setup(icon: Any) -> None:
            icon.visible = True
            threading.Thread(target=self.follow, name="tray-follow", daemon=True).start()

        self.icon.run(setup=setup)


def copy_to_clipboard(text: str) -> bool:
    for tool in (
        ["wl-copy"],
        ["xclip", "-selection", "clipboard"],
        ["xsel", "--clipboard", "--input"],
        ["pbcopy"],
        ["clip"],
    ):
        if shutil.which(tool[0]):
            subprocess.run(tool, input=text.encode(), check=False, timeout=5)
            return True
    return False


def open_path(path: Path) -> None:
    if sys.platform == "darwin":
        subprocess.Popen(["open", str(path)])
    elif os.name == "nt":
        os.startfile(str(path))  # type: ignore[attr-defined]  # Windows only
    else:
        subprocess.Popen(["xdg-open", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_daemon() -> None:
    """Start `mtls-sidecar run` detached from the tray, with the same environment."""
    subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtls-sidecar-tray", description="The mtls-sidecar tray icon.")
    parser.add_argument("--home", help="as for mtls-sidecar: everything under this folder")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    places = resolve_places(home=args.home)
    try:
        pystray = load_pystray()
    except NoTrayBackend as exc:
        print(f"mtls-sidecar-tray: {exc}", file=sys.stderr)
        return 1
    TrayApp(places, pystray, autostart=autostart_or_none(places, args.home)).run()
    return 0


def autostart_or_none(places: Places, home: str | None) -> Autostart | None:
    """Launch at login for this installation, or None where it is not supported."""
    from sidecar.cli.autostart import autostart_for

    try:
        autostart = autostart_for(places, home, None)
        autostart.plan()
    except ValueError as exc:
        log.info("no launch at login here: %s", exc)
        return None
    return autostart
