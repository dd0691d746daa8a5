"""The signals that stop `run` and `tunnel` (and, where they exist, reload them), on every platform.

POSIX: SIGINT (Ctrl-C) and SIGTERM (systemd, `kill`), through the event loop's own handlers.
Windows has no loop signal handlers: Ctrl-C arrives as SIGINT and Ctrl-Break (what
`CTRL_BREAK_EVENT` sends to a process group, the way a service manager or a test stops a
console program) as SIGBREAK, both on Python's own handler, which hands them to the loop.
Off the main thread (the test suite's daemon thread) no handler can be set: the caller stops
the loop another way (`request_stop()`).

Reload: SIGHUP and SIGUSR1 re-read the keystore, the trust files and the config, as ghostunnel
does on both (`systemctl reload` sends SIGHUP). Windows has neither: `--timed-reload` there.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable


def stop_signals() -> tuple[signal.Signals, ...]:
    if sys.platform == "win32":
        return (signal.SIGINT, signal.SIGBREAK)  # type: ignore[attr-defined,unused-ignore]
    return (signal.SIGINT, signal.SIGTERM)


def on_stop_signals(loop: asyncio.AbstractEventLoop, handler: Callable[[signal.Signals], None]) -> None:
    """Call `handler(sig)` on the loop for each stop signal; quietly nothing where none can be set."""
    for sig in stop_signals():
        try:
            loop.add_signal_handler(sig, handler, sig)
        except NotImplementedError:  # Windows: Python's own handler, passed on to the loop
            with contextlib.suppress(ValueError):  # ValueError: not the main thread
                signal.signal(sig, lambda signum, _frame: loop.call_soon_threadsafe(handler, signal.Signals(signum)))
        except RuntimeError:  # not the main thread
            pass


def reload_signals() -> tuple[signal.Signals, ...]:
    if sys.platform == "win32":
        return ()
    return (signal.SIGHUP, signal.SIGUSR1)


def on_reload_signals(loop: asyncio.AbstractEventLoop, handler: Callable[[signal.Signals], None]) -> None:
    """Call `handler(sig)` on the loop for SIGHUP and SIGUSR1; quietly nothing where none can be set."""
    for sig in reload_signals():
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(sig, handler, sig)
