"""One default logging configuration, applied by `main()` only."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

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
            log_file.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=1 << 20, backupCount=3, encoding="utf-8")
        except OSError as exc:
            root.warning("cannot write the log file %s (%s); logging to stderr only", log_file, exc)
        else:
            handler.setFormatter(logging.Formatter(FORMAT))
            root.addHandler(handler)
