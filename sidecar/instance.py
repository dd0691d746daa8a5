"""One daemon per data folder: an exclusive lock beside the keystore, held for the daemon's life.

The control socket alone cannot guard the keystore: it lives in the runtime folder, which
differs between two shells (or the tray and a login-started daemon) whenever their
`XDG_RUNTIME_DIR` does. The data folder (the keystore's parent) is what two daemons must not
share, so the lock is there: `daemon.lock`, taken before the daemon opens anything else.

The lock is the kernel's (`flock` on POSIX, released when the process ends however it ends);
the file's content only says who holds it: `{"pid", "control", "config"}` as JSON, so a
second daemon, the tray or a user can say where the first one answers. `control` is the Unix
socket, or with the loopback transport the control.json that names its port (rewritten by
`record_control` once the daemon has read its config and knows which). The holder empties
the file when it lets go. On Windows `msvcrt.locking` locks one byte past the content, so
the content stays readable; that path has not been run (the daemon needs a Unix socket).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from sidecar.errors import LocalSetupError
from sidecar.files import PRIVATE_FILE_MODE, make_private_dirs

# Names the write end of a pipe from whoever started the daemon (the tray): "ready" goes there.
READY_FD_ENV = "MTLS_SIDECAR_READY_FD"
_WINDOWS_LOCK_OFFSET = 1 << 20  # msvcrt locks forbid reading the locked bytes: lock one far past the content


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as it wrote itself into the lock file."""

    pid: int | None
    control: str
    config: str

    def describe(self) -> str:
        pid = f"pid {self.pid}" if self.pid is not None else "pid unknown: it is still starting"
        return f"{pid}, control API on {self.control or 'unknown'}, config {self.config or 'unknown'}"


class AlreadyRunning(LocalSetupError):
    """Another daemon holds the lock; `holder` says where it answers (None while it starts)."""

    def __init__(self, lock_file: Path, holder: Holder | None) -> None:
        self.lock_file = lock_file
        self.holder = holder
        about = holder.describe() if holder is not None else "it has not written its pid yet"
        super().__init__(
            f"another mtls-sidecar daemon already uses the data folder {lock_file.parent} ({about}); "
            "stop it first, or give this one its own MTLS_SIDECAR_HOME"
        )


class InstanceLock:
    """`with InstanceLock(places.lock_file).hold(control, config):` or `acquire()` / `release()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._config = ""

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, control: Path | str, config: Path | str) -> None:
        """Take the lock and write who we are into it, or raise AlreadyRunning naming the holder."""
        if self._fd is not None:
            return
        try:
            # A new data folder is made 0700; an existing one is left as it is (it may be a
            # folder the user chose for MTLS_SIDECAR_HOME); the lock file itself is 0600.
            make_private_dirs(self.path.parent)  # 0700 under any umask, parents too
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE)  # never truncate: it may be held
        except OSError as exc:
            raise LocalSetupError(f"cannot open the lock file {self.path}: {exc.strerror or exc}") from exc
        try:
            if not _try_lock(fd):
                raise AlreadyRunning(self.path, read_holder(self.path))
            _write_holder(fd, control, config)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._config = str(config)

    def record_control(self, control: Path | str) -> None:
        """Say where the control API answers, once the transport is known (the socket or control.json)."""
        if self._fd is None:
            return
        try:
            _write_holder(self._fd, control, self._config)
        except OSError as exc:
            raise LocalSetupError(f"cannot write the lock file {self.path}: {exc.strerror or exc}") from exc

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # still ours here: nobody reads a pid that is gone
        os.close(fd)  # closing lets go of the lock

    def hold(self, control: Path | str, config: Path | str) -> InstanceLock:
        self.acquire(control, config)
        return self

    def __enter__(self) -> InstanceLock:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _write_holder(fd: int, control: Path | str, config: Path | str) -> None:
    me = {"pid": os.getpid(), "control": str(control), "config": str(config)}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(me).encode() + b"\n")
    os.fsync(fd)


def read_holder(path: Path) -> Holder | None:
    """What the lock file says about its holder; None when it is empty, absent or unreadable.

    An empty file means nobody holds it (or its holder is between locking and writing).
    """
    try:
        data = json.loads(path.read_bytes() or b"null")
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    pid = data.get("pid")
    return Holder(
        pid=pid if isinstance(pid, int) else None,
        control=str(data.get("control") or ""),
        config=str(data.get("config") or ""),
    )


def tell_starter_ready() -> None:
    """Write "ready" on the pipe named by $MTLS_SIDECAR_READY_FD, once; nothing when it is unset.

    The tray starts the daemon with such a pipe so that it reconnects the moment the control API
    answers; when the daemon stops before (another one holds the lock), the pipe just closes.
    """
    text = os.environ.pop(READY_FD_ENV, "")
    if not text.isdigit():
        return
    with contextlib.suppress(OSError):  # the starter went away: nobody to tell
        os.write(int(text), b"ready\n")
    with contextlib.suppress(OSError):
        os.close(int(text))


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
