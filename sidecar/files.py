"""Writing files the careful way: atomically, and private when they hold secrets."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def loose_key_problem(path: Path | str, mode: int) -> str | None:
    """Why a private key file with permission bits `mode` must not be used, or None.

    As ssh does: a key that group or others can read may already be someone else's, and
    quietly using it would hide that. The message says the command that fixes it.
    """
    if os.name != "posix" or not mode & 0o077:
        return None
    return (
        f"private key file {path} is readable by other users (mode {mode & 0o777:04o}); "
        f"it is refused until you run: chmod 600 '{path}'"
    )


def make_private_dirs(path: Path) -> list[Path]:
    """Create `path` and its missing parents, each 0700 whatever the umask; the ones made, outermost first.

    `mkdir(parents=True)` gives the parents the umask's mode (0777 under umask 000), and a
    umask like 0277 would leave even the last folder unusable: each folder made here is set
    to 0700 by chmod. Folders that were already there are left as they are.
    """
    missing: list[Path] = []
    for folder in (path, *path.parents):
        if os.path.lexists(folder):
            break
        missing.append(folder)
    made: list[Path] = []
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile by someone else: theirs, not ours to chmod
        if os.name == "posix":
            os.chmod(folder, PRIVATE_DIR_MODE)
        made.append(folder)
    return made


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) owner-only. A folder that was there already keeps its mode:
    it may be /tmp or another program's, and never ours to tighten."""
    make_private_dirs(path)
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)  # a file in the way still raises
    return path


def atomic_write(path: Path, data: bytes, mode: int = 0o644, *, through_symlink: bool = False) -> None:
    """Write `data` to `path` so readers see the old file or the new one, never half of one.

    Temporary file in the same folder (so the rename stays on one filesystem), fsync, rename,
    then fsync the folder so the rename itself survives a crash. `through_symlink`: when
    `path` is a symlink (a config.toml kept in a dotfiles repository), the file it points to
    is replaced and the link stays a link.
    """
    if through_symlink and path.is_symlink():
        path = Path(os.path.realpath(path))
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        else:  # Windows before Python 3.13: chmod sets only the read-only flag; the folder's ACL decides who reads
            os.chmod(tmp_name, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temp_files(root: Path) -> list[Path]:
    """Remove the temporary files an interrupted `atomic_write` left behind (run at start-up).

    They are hidden, so the keystore rule never reads them; this only keeps folders tidy.
    """
    removed = []
    for path in walk_files(root):
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def empty_private_dir(folder: Path) -> None:
    """Make `folder` an empty 0700 folder of ours: what an earlier run left there is removed.

    Only a real folder of this user is emptied; a symlink or another user's folder there is
    refused with an OSError naming it, never followed or emptied."""
    try:
        info = folder.lstat()
    except FileNotFoundError:
        make_private_dirs(folder)
        return
    if not stat.S_ISDIR(info.st_mode) or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
        raise OSError(errno.EEXIST, "not a folder of ours; move it away", str(folder))
    shutil.rmtree(folder)
    make_private_dirs(folder)


def walk_files(root: Path) -> Iterator[Path]:
    """Every file under `root`, at any depth, without recursion (Path.rglob and os.walk recurse
    on Python 3.11: a folder nested ~1,000 levels deep raised RecursionError and stopped the
    daemon's start). Symlinks are not followed; folders that cannot be read are skipped."""
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    yield Path(entry.path)
            except OSError:
                continue
