"""Which asyncio event loop runs the tunnels: uvloop where it exists (a dependency except on
Windows), else asyncio's own.

`MTLS_SIDECAR_LOOP` picks one: `auto` (the default), `uvloop` (fail if missing) or `asyncio`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

from sidecar.errors import ConfigError

log = logging.getLogger("sidecar.tunnel")

T = TypeVar("T")
ENV = "MTLS_SIDECAR_LOOP"
CHOICES = ("auto", "uvloop", "asyncio")


def running_loop_name() -> str:
    """ "uvloop" or "asyncio": which loop runs the caller (status shows it)."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, T], choice: str | None = None) -> T:
    """`asyncio.run(main)` on the chosen loop."""
    choice = (choice or os.environ.get(ENV) or "auto").strip().lower()
    if choice not in CHOICES:
        main.close()
        raise ConfigError(
            f"unknown event loop {choice!r}", source="environment", field=ENV, hint="auto, uvloop or asyncio"
        )
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                main.close()
                raise ConfigError(
                    "uvloop is not installed", source="environment", field=ENV, hint="pip install uvloop"
                ) from None
        else:
            log.debug("event loop: uvloop")
            result: T = uvloop.run(main)
            return result
    return asyncio.run(main)
