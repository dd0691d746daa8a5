"""Run a program a provider setting names (`renew_command`, `step_ca_token_command`): no shell,
in a process group of its own, killed whole on timeout or cancellation; failures are one line."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Iterable, Mapping, Sequence

from sidecar.renewal.providers.base import ProviderError

_STDERR_TAIL = 300
# What we keep of a program's output, per stream: its last bytes (a token is its last line, an
# error its last words); the rest is read and dropped, so a chatty program costs no memory.
OUTPUT_KEPT = 64 * 1024
_CHUNK = 64 * 1024
# What a program gets of the daemon's environment whatever the config says: where programs and
# home are, the user, the language and time zone, the temporary and runtime folders.
BASIC_ENVIRONMENT = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
                     "XDG_RUNTIME_DIR", "SSL_CERT_FILE", "SSL_CERT_DIR")  # fmt: skip
# A PEM private key block (any kind: PKCS#8, encrypted, RSA, EC), to its END line or the end.
_PRIVATE_KEY_BLOCK = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.S
)


def clean_environment(names: Iterable[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The basics (`BASIC_ENVIRONMENT`, `LC_*`) and `names` from `environ` (the daemon's own):
    another identity's password variable, a token or a cloud key it happens to hold stays out."""
    environ = os.environ if environ is None else environ
    wanted = {*BASIC_ENVIRONMENT, *names}
    return {k: v for k, v in environ.items() if k in wanted or k.startswith("LC_")}


async def run_setting_command(
    argv: Sequence[str],
    *,
    setting: str,
    timeout: float,
    env: Mapping[str, str] | None = None,
    secrets: Sequence[str] = (),
) -> bytes:
    """Run `argv` and return its stdout; ProviderError names `setting` and says what went wrong
    (in the program's last words, without private keys or the `secrets` it was given)."""
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
        raise ProviderError(
            f"{setting} {argv[0]!r} exited with status {proc.returncode}: {stderr_tail(stderr, secrets)}"
        )
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


def stderr_tail(stderr: bytes, secrets: Sequence[str] = ()) -> str:
    """The program's last words, short, and never a key or a password it may have printed."""
    text = _PRIVATE_KEY_BLOCK.sub("[private key removed]", stderr.decode(errors="replace"))
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "[password removed]")
    text = text.strip()
    if "PRIVATE KEY" in text:
        return "(its error output mentions a private key and is not shown)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "no error output")[-_STDERR_TAIL:]
