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
# What we keep of a program's output, per stream: its last bytes (a token is its last line, an
# error its last words); the rest is read and dropped, so a chatty program costs no memory.
OUTPUT_KEPT = 64 * 1024
_CHUNK = 64 * 1024


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
        assert proc.stdout is not None and proc.stderr is not None
        stdout, stderr, _ = await asyncio.wait_for(
            asyncio.gather(_tail(proc.stdout), _tail(proc.stderr), proc.wait()), timeout
        )
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


async def _tail(stream: asyncio.StreamReader, keep: int = OUTPUT_KEPT) -> bytes:
    """Read `stream` to its end, keeping only its last `keep` bytes (cut at a line start)."""
    kept = bytearray()
    dropped = False
    while chunk := await stream.read(_CHUNK):
        kept += chunk
        if len(kept) > keep:
            del kept[: len(kept) - keep]
            dropped = True
    if dropped and (newline := kept.find(b"\n")) >= 0:
        del kept[: newline + 1]  # the first kept line is only part of one
    return bytes(kept)


def stderr_tail(stderr: bytes) -> str:
    """The program's last words, short, and never a key it may have printed."""
    text = stderr.decode(errors="replace").strip()
    if "PRIVATE KEY" in text:
        return "(its error output mentions a private key and is not shown)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "no error output")[-_STDERR_TAIL:]
