"""Every test runs with its own home: nothing leaks into the real user folders."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "home"
    home.mkdir()
    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME", "XDG_RUNTIME_DIR"):
        folder = tmp_path / "xdg" / var.lower()
        folder.mkdir(parents=True)
        monkeypatch.setenv(var, str(folder))
    monkeypatch.setenv("MTLS_SIDECAR_HOME", str(home))
    monkeypatch.delenv("MTLS_SIDECAR_CONFIG", raising=False)
    yield home


@pytest.fixture(params=["unix", "tcp"])
def control_transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once per control transport: the Unix socket, and the loopback port with its token.

    Configs written by tests.scenario.write_config say `control = ...`; configs parsed without the
    key (first-run ones, hand-written ones) get it as their default."""
    from tests import scenario

    transport: str = request.param
    monkeypatch.setattr("sidecar.config.DEFAULT_CONTROL", transport)
    monkeypatch.setattr(scenario, "CONTROL", [transport])
    return transport


@pytest.fixture(autouse=True)
def sidecar_log_handlers() -> Iterator[None]:
    """`main()` in-process (run, tunnel) sets up logging on the sidecar logger with the stderr of
    the moment, which pytest closes after the test: later log records (a daemon thread of the
    next test) would then print "--- Logging error ---" into another test's stderr. Put the
    handlers back as they were."""
    logger = logging.getLogger("sidecar")
    before = list(logger.handlers)
    level = logger.level
    yield
    for handler in list(logger.handlers):
        if handler not in before:
            logger.removeHandler(handler)
            handler.close()
    logger.setLevel(level)
