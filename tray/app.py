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
from sidecar.instance import READY_FD_ENV, read_holder
from sidecar.paths import Places, resolve_places
from tray.icons import icon_image
from tray.model import (
    MenuItem,
    Notification,
    NotificationMemory,
    TrayView,
    check_notification,
    notifications_for,
    utc_now,
    view,
)

log = logging.getLogger("tray")

# Reconnect back-off after the daemon goes away: never a busy loop.
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
LINUX_BACKENDS = ("appindicator", "gtk", "xorg")
# A check connects, handshakes and waits for the server's verdict: up to the route's
# connect_timeout (10 s by default) and a few seconds more.
CHECK_TIMEOUT = 60.0
# How long an opener (xdg-open) has to fail before we take it that it opened the file.
OPEN_WAIT = 3.0


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
            pystray = importlib.import_module("pystray")
        except Exception as exc:
            failures.append(f"{backend or 'default'}: {type(exc).__name__}: {exc}")
            continue
        notice = backend_notice(backend, failures)
        if notice is not None:
            log.warning("%s", notice)  # once: the tray loads its backend once
        return pystray
    display = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or "none"
    raise NoTrayBackend(
        f"no system tray available (display: {display}); tried "
        + "; ".join(failures)
        + ". Run it inside a desktop session, or set PYSTRAY_BACKEND to a working backend"
    )


def backend_notice(backend: str, failures: list[str]) -> str | None:
    """What to say when the tray runs on pystray's xorg backend because GTK is missing: that
    icon has no menu and shows no notifications, and the line that installs what is missing."""
    if backend != "xorg" or not failures:
        return None
    if sys.prefix == sys.base_prefix == "/usr":  # Debian's own Python: its package has GTK's bindings
        install = "sudo apt install python3-gi gir1.2-gtk-3.0 gir1.2-ayatanaappindicator3-0.1"
    else:  # a virtual environment (or another Python) sees only what pip put there
        install = (
            "sudo apt install gir1.2-gtk-3.0 gir1.2-ayatanaappindicator3-0.1 libgirepository1.0-dev "
            f'libcairo2-dev pkg-config, then {sys.executable} -m pip install "PyGObject<3.51"'
        )
    return (
        "the tray icon has no menu and shows no notifications: GTK for Python is missing, so it runs on "
        f"pystray's xorg backend ({'; '.join(failures)}). For the full tray: {install}"
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
        home: str | None = None,
    ) -> None:
        self.places = places
        self.home = home  # passed on to a daemon the tray starts, as `--home`
        self.autostart = autostart  # None: no "Start at login" item (unsupported here)
        self.client = ControlClient.for_places(places, timeout=10)
        self.pystray = pystray
        self.status: dict[str, Any] | None = None
        self.error: str | None = None
        self.memory = NotificationMemory()
        self.notice: str | None = None  # the latest notification, where the tray cannot notify (macOS)
        self._stop = threading.Event()
        self._wake = threading.Event()  # cuts a reconnect wait short: a daemon was just started
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
            if self._wake.wait(delay):
                self._wake.clear()
                attempt = 0

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
            self._tell_note(note, level=logging.INFO)

    # --- showing

    def refresh_view(self) -> None:
        with self._lock:  # the follower thread and pystray's menu thread both come here
            self._refresh_view()

    def _refresh_view(self) -> None:
        new = view(self.status, utc_now(), error=self.error, autostart=self._autostart_installed(), notice=self.notice)
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
            self.copy_address(rest)
        elif kind == "copy-proxy":
            self.copy_proxy_address(rest)
        elif kind == "check":
            self._in_background(f"check {rest}", self.check_route, rest)
        elif kind == "open-config":
            self._in_background("open config", self.open_file, "config file", self.places.config_file)
        elif kind == "open-logs":
            self.places.logs.mkdir(parents=True, exist_ok=True)
            self._in_background("open logs", self.open_file, "logs folder", self.places.logs)
        elif kind == "start-daemon":
            self.start_daemon()
        elif kind == "toggle-autostart" and self.autostart is not None:
            # The same code as `mtls-sidecar autostart install|uninstall`.
            if self.autostart.is_installed():
                self.autostart.uninstall()
            else:
                self.autostart.install()
        elif kind == "quit":
            self.stop()

    def copy_address(self, route: str) -> None:
        address = (self.status or {}).get("routes", {}).get(route, {}).get("listen")
        if not address:
            self._tell(f"Route {route}", "its address is not known: is the daemon running?")
            return
        problem = copy_to_clipboard(address)
        if problem is None:
            log.info("copied the address of route %s: %s", route, address)
        else:  # then at least show it
            self._tell(f"Address of route {route}: {address}", f"{address} (it could not be copied: {problem})")

    def copy_proxy_address(self, which: str) -> None:
        """Copy the proxy's URL ("url") or its PAC file's URL ("pac_url")."""
        address = ((self.status or {}).get("proxy") or {}).get(which)
        if not address:
            self._tell("Proxy", "its address is not known: is the daemon running with [[proxy.rules]]?")
            return
        problem = copy_to_clipboard(address)
        if problem is None:
            log.info("copied the proxy's %s: %s", which, address)
        else:
            self._tell(f"Proxy: {address}", f"{address} (it could not be copied: {problem})")

    def check_route(self, route: str) -> None:
        """Ask the daemon to check a route (what `mtls-sidecar check ROUTE` does) and tell the result."""
        client = self.client.with_timeout(CHECK_TIMEOUT)
        try:
            result = client.post(f"/v1/routes/{route}/check")
        except (ApiCallError, DaemonNotRunning, OSError) as exc:
            self._tell(f"Check {route}", f"could not check it: {exc}")
            return
        self._tell_note(check_notification(route, result), level=logging.INFO if result.get("ok") else logging.WARNING)
        self.fetch_status()

    def open_file(self, what: str, path: Path) -> None:
        """Open a file or folder with the desktop's application; when nothing can, say where it is."""
        problem = open_path(path)
        if problem is not None:
            self._tell(f"Open {what}", f"{problem}. The {what} is {path}")

    def _in_background(self, name: str, work: Callable[..., None], *args: Any) -> None:
        """Menu actions that wait (a check, an opener) run on their own thread: the menu stays live."""
        threading.Thread(target=work, args=args, name=f"tray: {name}", daemon=True).start()

    def _tell_note(self, note: Notification, level: int = logging.WARNING) -> None:
        self._tell(note.title, note.message, level)

    def _tell(self, title: str, message: str, level: int = logging.WARNING) -> None:
        log.log(level, "%s: %s", title, message)
        if getattr(self.icon, "HAS_NOTIFICATION", False):
            try:
                self.icon.notify(message, title)
                return
            except Exception as exc:
                log.debug("notification failed: %s", exc)
        # No notifications here (pystray's macOS backend has none): the menu's first line says it.
        self.notice = f"{title}: {message}"
        self.refresh_view()

    def start_daemon(self) -> None:
        """Start `mtls-sidecar run`; reconnect the moment it answers, or say why it did not start.

        The daemon itself refuses to be a second one on this data folder (its lock); the tray then
        names the one that runs and follows it, wherever its control socket is.
        """
        process, ready = start_daemon(self.home)
        threading.Thread(
            target=self._await_daemon, args=(process, ready), name="tray-start-daemon", daemon=True
        ).start()

    def _await_daemon(self, process: subprocess.Popen[bytes], ready: int | None) -> None:
        said = b"ready"  # without a readiness pipe (not POSIX): try at once, then back off as usual
        if ready is not None:
            with os.fdopen(ready, "rb") as pipe:
                said = pipe.readline()  # "ready" once its control API answers; nothing if it exits first
        if said.strip() != b"ready":
            self._daemon_did_not_start(process.wait())
            return
        self._follow_daemon_at(self.places.control_file)  # ours: it has our environment and --home
        process.wait()  # reap it whenever it ends: no zombie left behind

    def _daemon_did_not_start(self, code: int) -> None:
        holder = read_holder(self.places.lock_file)
        if holder is None or not holder.control:
            self._tell(
                "mtls-sidecar",
                f"the daemon stopped at once (exit code {code}); run `mtls-sidecar run` in a terminal to see why",
            )
            return
        # It may answer elsewhere (started with another XDG_RUNTIME_DIR): follow it there.
        self._tell("mtls-sidecar", f"a daemon already runs on this keystore ({holder.describe()}): following it")
        self._follow_daemon_at(Path(holder.control))

    def _follow_daemon_at(self, address: Path) -> None:
        """Connect to the daemon at `address` (its socket or control.json) now, without waiting out the back-off."""
        if address.parent != self.client.path.parent:
            self.client = ControlClient.for_address(address, timeout=self.client.timeout)
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.icon.stop()

    def run(self) -> None:
        """Show the icon; follow the daemon on a thread (pystray's loop owns this one)."""

        def setup(icon: Any) -> None:
            icon.visible = True
            threading.Thread(target=self.follow, name="tray-follow", daemon=True).start()

        self.icon.run(setup=setup)


def clipboard_tools() -> list[list[str]]:
    """Clipboard programs for this session, most fitting first."""
    if sys.platform == "darwin":
        return [["pbcopy"]]
    if os.name == "nt":
        return [["clip"]]
    tools = []
    if os.environ.get("WAYLAND_DISPLAY"):
        tools.append(["wl-copy"])
    if os.environ.get("DISPLAY"):
        tools += [["xclip", "-selection", "clipboard"], ["xsel", "--clipboard", "--input"]]
    return tools


def copy_to_clipboard(text: str) -> str | None:
    """Put `text` on the clipboard: None when it is there, else why not, in words.

    A clipboard program if one is installed (wl-copy, xclip, xsel, pbcopy, clip), else GTK's own
    clipboard when the tray runs on GTK (the tray process then holds the text while it runs).
    """
    tried: list[str] = []
    for tool in clipboard_tools():
        if shutil.which(tool[0]) is None:
            continue
        try:
            # No pipes but stdin: xclip and wl-copy leave a child behind that serves the clipboard.
            done = subprocess.run(
                tool, input=text.encode(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=5
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            tried.append(f"{tool[0]}: {exc}")
            continue
        if done.returncode == 0:
            return None
        tried.append(f"{tool[0]} exited with code {done.returncode}")
    gtk = _copy_with_gtk(text)
    if gtk is None:
        return None
    if not tried:
        return f"{gtk}, and no clipboard program is installed (install xclip, or wl-clipboard on Wayland)"
    return f"{'; '.join(tried)}; {gtk}"


def _copy_with_gtk(text: str) -> str | None:
    """GTK's clipboard, when pystray's gtk or appindicator backend has loaded GTK: None when copied."""
    if "gi.repository.Gtk" not in sys.modules:
        return "GTK is not in use"
    gi: Any = importlib.import_module("gi.repository")
    done = threading.Event()

    def put() -> bool:
        gi.Gtk.Clipboard.get(gi.Gdk.SELECTION_CLIPBOARD).set_text(text, -1)
        done.set()
        return False  # once (as a GLib idle callback)

    if threading.current_thread() is threading.main_thread():  # GTK's loop runs here: menu clicks come on it
        put()
    else:
        gi.GLib.idle_add(put)
        if not done.wait(5):
            return "GTK's main loop did not answer"
    return None


def open_path(path: Path) -> str | None:
    """Open a file or folder with the desktop's application for it: None when one took it, else why not.

    xdg-open exits at once when it has nothing to open the file with (code 3): wait that long,
    not for the application (an editor runs until it is closed).
    """
    if not path.exists():
        return f"{path} does not exist (yet)"
    if os.name == "nt":
        try:
            os.startfile(str(path))  # type: ignore[attr-defined]  # Windows only
        except OSError as exc:
            return f"Windows cannot open it ({exc.strerror})"
        return None
    opener = "open" if sys.platform == "darwin" else "xdg-open"
    if shutil.which(opener) is None:
        return f"{opener} is not installed" + (" (apt install xdg-utils)" if opener == "xdg-open" else "")
    try:
        process = subprocess.Popen(
            [opener, str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as exc:
        return f"{opener} did not start ({exc.strerror})"
    try:
        code = process.wait(OPEN_WAIT)
    except subprocess.TimeoutExpired:
        threading.Thread(target=process.wait, name="tray: reap opener", daemon=True).start()
        return None  # still running: an application is showing it
    return None if code == 0 else f"{opener} found nothing to open it with (exit code {code})"


def start_daemon(home: str | None = None) -> tuple[subprocess.Popen[bytes], int | None]:
    """Start `mtls-sidecar run` detached from the tray, with the same environment.

    Returns the process and, on POSIX, the read end of a pipe on which the daemon writes "ready"
    once its control API answers (it closes without a word when the daemon stops first).
    """
    command = [sys.executable, "-m", "sidecar", "run", *(["--home", home] if home else [])]
    if os.name != "posix":
        quiet = subprocess.DEVNULL
        return subprocess.Popen(command, stdin=quiet, stdout=quiet, stderr=quiet), None
    read_end, write_end = os.pipe()
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            pass_fds=(write_end,),
            env={**os.environ, READY_FD_ENV: str(write_end)},
        )
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)  # the daemon holds the only write end now: its exit means EOF here
    return process, read_end


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
    TrayApp(places, pystray, autostart=autostart_or_none(places, args.home), home=args.home).run()
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
