"""File events → a debounced callback on the daemon's event loop (the keystore, the config file).

watchdog delivers events on its own thread; we hop onto the loop and wait for the burst of
events one write makes (temp file, rename, chmod) to settle before re-reading.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

log = logging.getLogger("sidecar.watch")

DEBOUNCE_SECONDS = 0.2


class _Handler(FileSystemEventHandler):
    def __init__(self, notify: Callable[[], None], only: Path | None) -> None:
        self._notify = notify
        self._only = str(only) if only else None

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return  # reads (ours included) are not changes
        if self._only is not None and self._only not in (_text(event.src_path), _text(getattr(event, "dest_path", ""))):
            return
        self._notify()


def _text(path: str | bytes) -> str:
    return path.decode() if isinstance(path, bytes) else path


class FolderWatch:
    """Watch a folder tree; call `on_change` on `loop` once a burst of changes settles."""

    def __init__(
        self,
        folder: Path,
        loop: asyncio.AbstractEventLoop,
        on_change: Callable[[], None],
        *,
        only: Path | None = None,
        recursive: bool = True,
    ) -> None:
        self.folder = folder
        self._only = only  # watch just this file in `folder` (an atomic replace arrives as a move)
        self._recursive = recursive
        self._loop = loop
        self._on_change = on_change
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._pending: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        observer = Observer()
        observer.schedule(_Handler(self._from_thread, self._only), str(self.folder), recursive=self._recursive)
        observer.daemon = True
        observer.start()
        self._observer = observer
        log.debug("watching %s", self.folder)

    def stop(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def _from_thread(self) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._schedule)

    def _schedule(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        self._pending = self._loop.call_later(DEBOUNCE_SECONDS, self._fire)

    def _fire(self) -> None:
        self._pending = None
        try:
            self._on_change()
        except Exception:
            log.exception("error while handling a change in %s", self.folder)
