"""One default logging configuration, applied by `main()` only."""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
import sys
from pathlib import Path

from sidecar.files import PRIVATE_FILE_MODE, make_private_dirs

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure(level: str = "info", log_file: Path | None = None) -> None:
    root = logging.getLogger("sidecar")
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
    root.addHandler(stream)
    if log_file is not None:
        try:
            make_private_dirs(log_file.parent)
            handler = _PrivateRotatingFileHandler(log_file, maxBytes=1 << 20, backupCount=3, encoding="utf-8")
        except OSError as exc:
            root.warning("cannot write the log file %s (%s); logging to stderr only", log_file, exc)
        else:
            handler.setFormatter(logging.Formatter(FORMAT))
            root.addHandler(handler)


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log whose every file is 0600 whatever the umask, and never opened through a symlink.

    The log names routes, identities and peers: it is the user's alone. O_NOFOLLOW keeps a
    symlink planted in the log folder from sending our lines (or our appends) somewhere else.
    """

    def _open(self) -> io.TextIOWrapper:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.baseFilename, flags, PRIVATE_FILE_MODE)
        try:
            if os.name == "posix":
                os.fchmod(fd, PRIVATE_FILE_MODE)
            return open(fd, "a", encoding=self.encoding, errors=self.errors)
        except BaseException:
            os.close(fd)
            raise
