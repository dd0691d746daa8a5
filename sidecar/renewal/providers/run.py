"""Run a program a provider setting names (`renew_command`, `step_ca_token_command`): no shell,
in a process group of its own, killed whole on timeout or cancellation; failures are one line."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence

from sidecar.renewal.providers.base import ProviderError

_STDERR_TAIL = 300


async def run_setting_command(
    argv: Sequence[str], *, setting: str, timeout: float, env: Mapping[str, str] | None = None
) -> bytes:
    """Run `argv` and return its stdout; ProviderError names `setting` and says what went wrong."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env) if env is not None else None,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise ProviderError(f"cannot run {setting} {argv[0]!r}: {exc.strerror or exc}") from exc
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError) as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: scripts leave children behind
        await proc.wait()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise ProviderError(f"{setting} {argv[0]!r} did not finish within {timeout:g}s") from None
    if proc.returncode != 0:
        raise ProviderError(f"{setting} {argv[0]!r} exited with status {proc.returncode}: {stderr_tail(stderr)}")
    return stdout


def stderr_tail(stderr: bytes) -> str:
    """The program's last words, short, and never a key it may have printed."""
    text = stderr.decode(errors="replace").strip()
    if "PRIVATE KEY" in text:
        return "(its error output mentions a private key and is not shown)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "no error output")[-_STDERR_TAIL:]
