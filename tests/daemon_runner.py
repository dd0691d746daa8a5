"""Run a real `Daemon` on its own event loop thread, and talk to it from the test thread."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from sidecar.config import Config, load_config
from sidecar.control.client import ControlClient
from sidecar.control.server import ControlServer
from sidecar.daemon import Daemon
from sidecar.instance import InstanceLock
from sidecar.paths import Places, resolve_places

T = TypeVar("T")


class DaemonThread:
    def __init__(self, config: Config | Path, places: Places | None = None, *, transport: str | None = None) -> None:
        self.places = places or resolve_places(config=config if isinstance(config, Path) else None)
        self.config = load_config(config) if isinstance(config, Path) else config
        self.transport = transport or self.config.control  # as `run` does: config.toml's `control`
        self.loop = asyncio.new_event_loop()
        self.daemon: Daemon | None = None
        self.socket = self.places.control_socket
        self._started: Future[None] = Future()
        self._thread = threading.Thread(target=self._main, name="daemon-under-test", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        lock = InstanceLock(self.places.lock_file)  # as `run` does: first, before anything is opened
        try:
            lock.acquire(self.socket, self.places.config_file)
        except BaseException as exc:
            self._started.set_exception(exc)
            return
        with lock:
            await self._serve_locked(lock)

    async def _serve_locked(self, lock: InstanceLock) -> None:
        self.daemon = Daemon(self.config, self.places)
        self.control = ControlServer(
            self.daemon, self.socket, transport=self.transport, control_file=self.places.control_file
        )
        try:
            await self.control.start()
            lock.record_control(self.control.address)
            await self.daemon.start()
        except BaseException as exc:
            await self.control.stop()
            self._started.set_exception(exc)
            return
        self._started.set_result(None)
        try:
            await self.daemon.run_until_stopped()
        finally:
            await self.control.stop()

    def __enter__(self) -> DaemonThread:
        self._thread.start()
        self._started.result(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.daemon is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.daemon.request_stop)
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "daemon thread did not stop within 30 s"

    def call(self, fn: Callable[[Daemon], T]) -> T:
        """Run `fn(daemon)` on the daemon's loop and return its result."""
        assert self.daemon is not None
        daemon = self.daemon

        async def run() -> T:
            return fn(daemon)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)

    def client(self) -> ControlClient:
        return ControlClient.for_places(self.places)

    @property
    def control_path(self) -> Path:
        """The file that gives the control API away if others can read it: the socket, or control.json."""
        return self.places.control_file if self.transport == "tcp" else self.socket

    @property
    def address(self) -> str:
        """Where the control API answers, as status and the CLI name it."""
        return str(self.control.describe()["address"])

    def status(self) -> dict[str, Any]:
        return self.call(lambda d: d.status())

    def connect(self, route: str, timeout: float = 10) -> socket.socket:
        """A plain TCP client connection to a route's local listener."""
        return socket.create_connection(("127.0.0.1", self.port(route)), timeout=timeout)

    def port(self, route: str) -> int:
        bound = self.call(lambda d: d.listeners[route].bound)
        assert bound is not None, f"route {route} is not listening"
        return bound.port
