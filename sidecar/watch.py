"""File events → a debounced callback on the daemon's event loop (the keystore, the config file).

watchdog delivers events on its own thread; we hop onto the loop and wait for the burst of
events one write makes (temp file, rename, chmod) to settle before re-reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from sidecar.files import make_private_dirs

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
        self._observer: BaseObserver | None = None
        self._parent_observer: BaseObserver | None = None
        self._shallow = False  # the tree was too deep to watch whole: top two levels only
        self._subfolders: list[Path] = []  # watched one by one when shallow
        self._pending: asyncio.TimerHandle | None = None

    def start(self) -> None:
        make_private_dirs(self.folder)
        self._parent_observer = _observe(
            _Handler(self._parent_changed, self.folder), self.folder.parent, recursive=False
        )
        self._arm()
        log.debug("watching %s", self.folder)

    def stop(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        for observer in (self._parent_observer, self._observer):
            _stop(observer)
        self._observer = self._parent_observer = None

    def _arm(self) -> None:
        """(Re)start the watch on the folder as it is now: after it was deleted, or replaced
        by another folder (a rename), the old watch sees nothing any more."""
        _stop(self._observer)
        self._observer = None
        if not self.folder.is_dir():
            return  # gone: the parent's watch re-arms us when it comes back
        handler = _Handler(self._from_thread, self._only)
        try:
            self._observer = _observe(handler, self.folder, recursive=self._recursive)
            self._shallow = False
            return
        except RecursionError:
            # watchdog walks the tree recursively: a folder nested ~1,000 levels deep. The
            # keystore is read two levels deep (identity folders, their files); watch those.
            if not self._shallow:
                log.warning(
                    "the folder tree under %s is too deep to watch whole; watching its first two levels", self.folder
                )
            self._shallow = True
        self._observer = _observe(handler, self.folder, recursive=False)
        self._subfolders = _subfolders(self.folder)
        for sub in self._subfolders:
            with contextlib.suppress(OSError):
                self._observer.schedule(handler, str(sub), recursive=False)

    def _parent_changed(self) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._rearm)

    def _rearm(self) -> None:
        self._arm()
        self._schedule()  # what was in the old folder may differ from the new one: re-read

    def _from_thread(self) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._shallow_rearm if self._shallow else self._schedule)

    def _shallow_rearm(self) -> None:
        """Two-level watching: a new identity folder needs its own watch."""
        if _subfolders(self.folder) != self._subfolders:
            self._arm()
        self._schedule()

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


def _observe(handler: FileSystemEventHandler, folder: Path, *, recursive: bool) -> BaseObserver:
    observer = Observer()
    observer.daemon = True
    try:
        observer.schedule(handler, str(folder), recursive=recursive)
        observer.start()
    except BaseException:
        _stop(observer)
        raise
    return observer


def _stop(observer: BaseObserver | None) -> None:
    if observer is None:
        return
    with contextlib.suppress(Exception):
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=5)


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(Path(e.path) for e in os.scandir(folder) if e.is_dir(follow_symlinks=False))
    except OSError:
        return []
