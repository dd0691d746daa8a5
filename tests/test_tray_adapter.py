"""The pystray adapter against a real daemon, with a recording pystray backend (no display).

pystray's dummy backend raises on run/notify/update_menu, so the icon here subclasses
pystray.Icon and records what the adapter asks of it: what a real backend would draw.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sidecar.paths import resolve_places
from tests.daemon_runner import DaemonThread
from tests.scenario import Pki, mtls_server, route_to, write_config
from tests.waiting import wait_until
from tray.model import IconState

# The whole suite once per control transport (issue 19): the Unix socket and the loopback port.
pytestmark = pytest.mark.usefixtures("control_transport")


@pytest.fixture(scope="module")
def pystray(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import os

    os.environ["PYSTRAY_BACKEND"] = "dummy"
    from tray.app import load_pystray

    return load_pystray()


def recording_icon_class(pystray: Any) -> type:
    class RecordingIcon(pystray.Icon):  # type: ignore[misc,name-defined]
        HAS_MENU = True
        HAS_NOTIFICATION = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.calls: list[str] = []
            self.notified: list[tuple[str, str | None]] = []
            super().__init__(*args, **kwargs)

        def _show(self) -> None:
            self.calls.append("show")

        def _hide(self) -> None:
            self.calls.append("hide")

        def _update_icon(self) -> None:
            self.calls.append("icon")

        def _update_title(self) -> None:
            self.calls.append("title")

        def _update_menu(self) -> None:
            self.calls.append("menu")

        def _run(self) -> None:
            self.calls.append("run")

        def _run_detached(self) -> None:
            self.calls.append("run_detached")

        def _stop(self) -> None:
            self.calls.append("stop")

        def _notify(self, message: str, title: str | None = None) -> None:
            self.notified.append((message, title))

        def _remove_notification(self) -> None:
            pass

    return RecordingIcon


def menu_item(menu: Any, *path: str) -> Any:
    """Find an item by the start of its text, through submenus."""
    items = list(menu.items)
    for depth, prefix in enumerate(path):
        item = next(i for i in items if str(i.text).startswith(prefix))
        if depth == len(path) - 1:
            return item
        items = list(item.submenu.items)
    raise AssertionError(path)


def test_switch_identity_from_the_menu_and_follow_events(pystray: Any, isolated_home: Path, tmp_path: Path) -> None:
    from tray.app import TrayApp

    pki = Pki.create(tmp_path / "pki")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
    pki.enroll(isolated_home / "keystore", "ci-bot", "ci-1", cn="ci-bot")
    with mtls_server(pki) as server:
        config = write_config(
            isolated_home / "config.toml",
            active="dev",
            identities={"dev": {"renew": "none"}, "ci-bot": {"renew": "none"}},
            routes={"api": route_to(pki, server.port)},
        )
        with DaemonThread(config) as daemon:
            app = TrayApp(resolve_places(), pystray, icon_factory=recording_icon_class(pystray))
            app.fetch_status()
            assert app._view is not None and app._view.state is IconState.OK
            assert app.icon.title.startswith("dev · expires in")
            item = menu_item(app.icon.menu, "Switch identity", "ci-bot")
            assert item.checked is False and item.radio
            item(app.icon)  # what a click does
            assert daemon.status()["active_identity"] == "ci-bot"
            assert menu_item(app.icon.menu, "Switch identity", "ci-bot").checked is True

            # a switch made elsewhere (CLI, API) shows in the tray in well under a second
            follower = threading.Thread(target=app.follow, daemon=True)
            follower.start()
            wait_until(lambda: app.status is not None, timeout=5, what="the tray to connect")
            started = time.monotonic()
            daemon.client().post("/v1/active-identity", {"name": "dev"})
            wait_until(lambda: app.icon.title.startswith("dev ·"), timeout=1, what="the tray to follow the switch")
            latency = time.monotonic() - started
            menu_item(app.icon.menu, "Routes", "api", "as ci-bot")(app.icon)
            assert daemon.status()["routes"]["api"]["identity"] == "ci-bot"
        # the daemon went away: disconnected, and reconnect attempts back off
        wait_until(
            lambda: app._view is not None and app._view.state is IconState.DISCONNECTED,
            timeout=5,
            what="the tray to show the daemon is gone",
        )
        assert menu_item(app.icon.menu, "Start daemon").default
        with DaemonThread(config) as daemon:
            wait_until(lambda: app.status is not None, timeout=10, what="the tray to reconnect")
        app.stop()
        follower.join(timeout=5)
        assert not follower.is_alive()
    print(f"\ntray: followed a switch made through the API in {latency * 1000:.0f} ms")


def test_reconnect_does_not_busy_loop(pystray: Any, isolated_home: Path) -> None:
    from tray.app import TrayApp

    app = TrayApp(resolve_places(), pystray, icon_factory=recording_icon_class(pystray))
    attempts: list[float] = []
    original = app.client.events

    def counting_events(*args: Any, **kwargs: Any) -> Any:
        attempts.append(time.monotonic())
        return original(*args, **kwargs)

    app.client.events = counting_events  # type: ignore[method-assign]
    follower = threading.Thread(target=app.follow, daemon=True)
    follower.start()
    wait_until(lambda: len(attempts) >= 4, timeout=10, what="four reconnect attempts")
    app.stop()
    follower.join(timeout=5)
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.45 and gaps[1] >= 0.95 and gaps[2] >= 1.95  # 0.5 s, 1 s, 2 s, ...
    assert app._view is not None and app._view.state is IconState.DISCONNECTED


def test_renewal_notification_is_shown(pystray: Any, isolated_home: Path) -> None:
    from tray.app import TrayApp

    config = write_config(isolated_home / "config.toml", identities={"dev": {"renew": "local-ca"}}, routes={})
    with DaemonThread(config):
        app = TrayApp(resolve_places(), pystray, icon_factory=recording_icon_class(pystray))
        follower = threading.Thread(target=app.follow, daemon=True)
        follower.start()
        wait_until(lambda: app.status is not None, timeout=5, what="the tray to connect")
        menu_item(app.icon.menu, "Renew dev now")(app.icon)
        wait_until(
            lambda: any(title == "Certificate renewed" for _, title in app.icon.notified),
            timeout=10,
            what="the renewal notification",
        )
        app.stop()
    follower.join(timeout=5)


def test_no_display_names_the_backends_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    result = subprocess.run([sys.executable, "-m", "tray"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1
    assert "no system tray available (display: none)" in result.stderr
    for backend in ("appindicator", "gtk", "xorg"):
        assert f"{backend}:" in result.stderr


def fake_program(folder: Path, name: str, script: str) -> Path:
    """An executable shell script called `name` in `folder` (put first in PATH by the caller)."""
    folder.mkdir(parents=True, exist_ok=True)
    program = folder / name
    program.write_text(f"#!/bin/sh\n{script}\n")
    program.chmod(0o755)
    return program


def test_a_failing_route_is_told_and_its_check_item_checks_it(
    pystray: Any, isolated_home: Path, tmp_path: Path
) -> None:
    from tests.realservers import free_port
    from tray.app import TrayApp

    pki = Pki.create(tmp_path / "pki")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
    config = write_config(
        isolated_home / "config.toml",
        identities={"dev": {"renew": "none"}},
        routes={"api": route_to(pki, free_port())},  # nothing listens there
    )
    with DaemonThread(config) as daemon:
        app = TrayApp(resolve_places(), pystray, icon_factory=recording_icon_class(pystray))
        follower = threading.Thread(target=app.follow, daemon=True)
        follower.start()
        wait_until(lambda: app.status is not None, timeout=5, what="the tray to connect")
        with daemon.connect("api") as sock:
            assert sock.recv(10) == b""  # the tunnel could not reach the target: it closes
        wait_until(
            lambda: app._view is not None and app._view.state is IconState.ERROR,
            timeout=5,
            what="the icon to turn red",
        )
        assert app.icon.title.endswith("1 of 1 route failing: nothing listens at the target's port")
        assert str(app.icon.menu.items[0].text) == "1 of 1 route failing: nothing listens at the target's port"
        told = wait_until(
            lambda: [(t, m) for m, t in app.icon.notified if t == "Route api is failing"], timeout=5, what="the news"
        )
        assert told[0][1].endswith(
            "refused (is the service running?). Fix: start the service, or correct the target's port"
        )

        menu_item(app.icon.menu, "Routes", "api", "Check api now")(app.icon)
        checked = wait_until(
            lambda: [(t, m) for m, t in app.icon.notified if t and t.startswith("Check api")], timeout=15, what="check"
        )
        assert checked[0][0] == "Check api: nothing listens at the target's port"
        assert "connection refused" in checked[0][1] and "\nFix: start the service" in checked[0][1]
        app.stop()
    follower.join(timeout=5)


def test_copy_address_copies_or_says_it_could_not_and_shows_it(
    pystray: Any, isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tray.app import TrayApp

    pki = Pki.create(tmp_path / "pki")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
    with mtls_server(pki) as server:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={"api": route_to(pki, server.port)},
        )
        with DaemonThread(config) as daemon:
            app = TrayApp(resolve_places(), pystray, icon_factory=recording_icon_class(pystray))
            app.fetch_status()
            address = f"127.0.0.1:{daemon.port('api')}"
            # no clipboard program and no GTK (a dummy backend, no display): said, with the address
            monkeypatch.setenv("PATH", str(tmp_path / "empty"))
            monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
            monkeypatch.setenv("DISPLAY", ":99")
            menu_item(app.icon.menu, "Routes", "api", "Copy address")(app.icon)
            assert app.icon.notified == [
                (
                    f"{address} (it could not be copied: GTK is not in use, and no clipboard program is installed "
                    "(install xclip, or wl-clipboard on Wayland))",
                    f"Address of route api: {address}",
                )
            ]
            # with xclip (a stand-in that keeps what it is given): copied, and nothing to say
            pasted = tmp_path / "clipboard"
            fake_program(tmp_path / "bin", "xclip", f'[ "$*" = "-selection clipboard" ] && /bin/cat > {pasted}')
            monkeypatch.setenv("PATH", str(tmp_path / "bin"))
            menu_item(app.icon.menu, "Routes", "api", "Copy address")(app.icon)
            assert pasted.read_text() == address
            assert len(app.icon.notified) == 1


def test_open_config_and_logs_say_where_they_are_when_nothing_opens_them(
    pystray: Any, isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tray.app import TrayApp

    places = resolve_places()
    config = write_config(isolated_home / "config.toml", identities={"dev": {"renew": "none"}}, routes={})
    app = TrayApp(places, pystray, icon_factory=recording_icon_class(pystray))
    # xdg-open with no application for the file exits 3 at once
    fake_program(tmp_path / "bin", "xdg-open", "exit 3")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    menu_item(app.icon.menu, "Open config")(app.icon)
    wait_until(lambda: app.icon.notified, timeout=10, what="a notification")
    assert app.icon.notified[-1] == (
        f"xdg-open found nothing to open it with (exit code 3). The config file is {config}",
        "Open config file",
    )
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    menu_item(app.icon.menu, "Open logs folder")(app.icon)
    wait_until(lambda: len(app.icon.notified) == 2, timeout=10, what="a second notification")
    assert app.icon.notified[-1] == (
        f"xdg-open is not installed (apt install xdg-utils). The logs folder is {places.logs}",
        "Open logs folder",
    )
    # an opener that takes the file (it is still running after a moment): nothing to say
    opened = tmp_path / "opened"
    fake_program(tmp_path / "bin", "xdg-open", f'echo "$1" > {opened}; exec /bin/sleep 6')
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    menu_item(app.icon.menu, "Open config")(app.icon)
    wait_until(lambda: opened.exists() and opened.read_text() == f"{config}\n", timeout=10, what="the opener")
    wait_until(
        lambda: not any(t.name == "tray: open config" for t in threading.enumerate()),
        timeout=10,
        what="the tray to decide that the opener took the file",
    )
    assert len(app.icon.notified) == 2


def test_the_xorg_backend_notice_names_what_to_install() -> None:
    from tray.app import backend_notice

    assert backend_notice("gtk", []) is None
    assert backend_notice("xorg", []) is None  # chosen on purpose (PYSTRAY_BACKEND=xorg): nothing missing
    notice = backend_notice("xorg", ["appindicator: ImportError: no gi", "gtk: ImportError: no gi"])
    assert notice is not None
    assert notice.startswith("the tray icon has no menu and shows no notifications: GTK for Python is missing")
    assert "(appindicator: ImportError: no gi; gtk: ImportError: no gi)" in notice
    assert "gir1.2-gtk-3.0" in notice


def _counting_events(app: Any) -> list[float]:
    """Record each time the tray's follower tries to connect."""
    attempts: list[float] = []
    original = app.client.events

    def counting(*args: Any, **kwargs: Any) -> Any:
        attempts.append(time.monotonic())
        return original(*args, **kwargs)

    app.client.events = counting
    return attempts


def _stop_daemon_of(places: Any) -> None:
    from sidecar.instance import read_holder

    holder = read_holder(places.lock_file)
    assert holder is not None and holder.pid is not None
    os.kill(holder.pid, signal.SIGTERM)
    wait_until(lambda: read_holder(places.lock_file) is None, timeout=20, what="the daemon to stop")


def test_start_daemon_reconnects_as_soon_as_it_answers(
    pystray: Any, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tray.app
    from tray.app import TrayApp

    monkeypatch.setattr(tray.app, "RECONNECT_DELAYS", (60.0,))  # the back-off alone would wait a minute
    write_config(isolated_home / "config.toml", identities={"dev": {"renew": "none"}}, routes={})
    places = resolve_places()
    app = TrayApp(places, pystray, icon_factory=recording_icon_class(pystray))
    attempts = _counting_events(app)
    follower = threading.Thread(target=app.follow, daemon=True)
    follower.start()
    try:
        wait_until(lambda: attempts, timeout=5, what="the first attempt, which finds no daemon")
        clicked = time.monotonic()
        menu_item(app.icon.menu, "Start daemon")(app.icon)
        wait_until(lambda: app.status is not None, timeout=20, what="the tray to connect to the daemon it started")
        took = time.monotonic() - clicked
        assert len(attempts) == 2  # woken at once, not after the minute's back-off
        assert app._view is not None and app._view.state is not IconState.DISCONNECTED
    finally:
        app.stop()
        _stop_daemon_of(places)  # first: the follower reads its events stream until it goes
        follower.join(timeout=5)
    print(f"\ntray: connected to the daemon it started {took * 1000:.0f} ms after the click")


def test_start_daemon_cannot_start_a_second_one_and_follows_the_running_one(
    pystray: Any, isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, control_transport: str
) -> None:
    import tray.app
    from sidecar.instance import read_holder
    from tests.test_cli import sidecar_process
    from tray.app import TrayApp

    # No MTLS_SIDECAR_HOME: the data folder comes from XDG_DATA_HOME, the socket from
    # XDG_RUNTIME_DIR, which differs between the running daemon and the tray.
    monkeypatch.delenv("MTLS_SIDECAR_HOME")
    monkeypatch.setattr(tray.app, "RECONNECT_DELAYS", (60.0,))
    write_config(resolve_places().config_file, identities={"dev": {"renew": "none"}}, routes={})
    runtime_a, runtime_b = tmp_path / "run-a", tmp_path / "run-b"
    with sidecar_process("run", env={"XDG_RUNTIME_DIR": str(runtime_a)}) as (first, log):
        log.wait_for(r"control API on ")
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime_b))
        places = resolve_places()
        assert places.control_socket.parent == runtime_b / "mtls-sidecar"
        app = TrayApp(places, pystray, icon_factory=recording_icon_class(pystray))
        attempts = _counting_events(app)
        follower = threading.Thread(target=app.follow, daemon=True)
        follower.start()
        try:
            wait_until(lambda: attempts, timeout=5, what="the first attempt, on the tray's own socket")
            menu_item(app.icon.menu, "Start daemon")(app.icon)
            note = wait_until(
                lambda: next((m for m, _ in app.icon.notified if "already runs" in m), None),
                timeout=20,
                what="the tray to say a daemon already runs",
            )
            first_socket = runtime_a / "mtls-sidecar" / "control.sock"
            recorded = first_socket.with_name("control.json") if control_transport == "tcp" else first_socket
            assert f"pid {first.pid}, control API on {recorded}" in note, note
            wait_until(lambda: app.status is not None, timeout=10, what="the tray to follow the running daemon")
            assert app.client.path == first_socket
            holder = read_holder(places.lock_file)
            assert holder is not None and holder.pid == first.pid  # still the only daemon
            assert not (runtime_b / "mtls-sidecar" / "control.sock").exists()
            assert not (runtime_b / "mtls-sidecar" / "control.json").exists()
        finally:
            app.stop()
            first.send_signal(signal.SIGTERM)  # first: the follower reads its events stream until it goes
            follower.join(timeout=5)
        assert first.wait(timeout=20) == 0, log.text


def test_where_the_tray_cannot_notify_the_menu_says_it(pystray: Any, isolated_home: Path) -> None:
    """pystray's macOS backend has no notifications (HAS_NOTIFICATION is False): mocked here, since
    macOS cannot run on this machine. What would have been a notification is the menu's first line."""
    from tray.app import TrayApp

    class SilentIcon(recording_icon_class(pystray)):  # type: ignore[misc]
        HAS_NOTIFICATION = False

    app = TrayApp(resolve_places(), pystray, icon_factory=SilentIcon)
    app.fetch_status()  # no daemon: the menu offers to start one
    app._tell("Check api", "problem: the server refused our certificate")
    first = next(iter(app.icon.menu.items))
    assert str(first.text) == "Check api: problem: the server refused our certificate"
    assert not first.enabled
    assert app.icon.notified == []


def test_the_tray_runs_pystray_on_the_calling_thread(pystray: Any, isolated_home: Path) -> None:
    """macOS needs pystray's loop on the main thread: `run()` calls Icon.run there, never a thread."""
    from tray.app import TrayApp

    app = TrayApp(resolve_places(), pystray, icon_factory=recording_icon_class(pystray))
    seen: list[str] = []

    def run(setup: Any = None) -> None:
        # not pystray's own run: its setup thread would wait for a backend that never starts here
        seen.append(threading.current_thread().name)

    app.icon.run = run
    app.run()
    assert seen == [threading.current_thread().name]
