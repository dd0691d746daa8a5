"""Process limits the daemon needs: enough file descriptors for its connections."""

from __future__ import annotations

import logging

log = logging.getLogger("sidecar.daemon")

# Each tunnelled connection holds two descriptors (local client, remote service). Many desktops
# start programs with a soft limit of 1024, which would cap a route near 500 connections.
WANTED_OPEN_FILES = 65536


def raise_open_file_limit(wanted: int = WANTED_OPEN_FILES) -> tuple[int, int] | None:
    """Raise the soft RLIMIT_NOFILE towards `wanted`, within the hard limit (no privilege needed).

    Returns (before, after) soft limits, or None where the platform has no such limit.
    """
    try:
        import resource
    except ImportError:  # Windows: no per-process descriptor limit of this kind
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
            return soft, soft
        log.debug("open-file limit raised from %d to %d", soft, target)
        return soft, target
    return soft, soft
