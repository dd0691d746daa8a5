"""`renew = "command"`: run the user's program (argv, no shell), then take what it wrote.

The program gets `MTLS_SIDECAR_IDENTITY`, `MTLS_SIDECAR_CURRENT_CERT` and `MTLS_SIDECAR_CURRENT_KEY`
(the credential in use as plain PEM files; absent when enrolling), and `MTLS_SIDECAR_OUT_CERT` and
`MTLS_SIDECAR_OUT_KEY` (where to write). All four live in a private temporary folder removed
afterwards. The daemon validates the result before accepting it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from sidecar.config import IdentitySpec
from sidecar.credentials import Candidate
from sidecar.renewal.providers.base import NewCredential, ProviderContext, ProviderError, RenewalRequest
from sidecar.units import parse_duration

DEFAULT_TIMEOUT = 60.0
_STDERR_TAIL = 300


class CommandProvider:
    name = "command"

    def __init__(self, spec: IdentitySpec, context: ProviderContext) -> None:
        self.spec = spec
        field = f"identities.{spec.name}"
        argv = spec.options.get("renew_command")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and a for a in argv):
            raise ProviderError(
                f"{field}.renew_command must be a non-empty list of strings (argv, no shell), "
                'e.g. ["step", "ca", "renew", "--force", "cert.pem", "key.pem"]'
            )
        self.argv: list[str] = argv
        try:
            self.timeout = parse_duration(spec.options.get("renew_timeout", DEFAULT_TIMEOUT))
        except ValueError as exc:
            raise ProviderError(f"{field}.renew_timeout: {exc}") from exc

    async def issue(self, request: RenewalRequest) -> NewCredential:
        with tempfile.TemporaryDirectory(prefix="mtls-sidecar-renew-") as out_dir:
            out_cert, out_key = Path(out_dir) / "cert.pem", Path(out_dir) / "key.pem"
            env = {
                **os.environ,
                "MTLS_SIDECAR_IDENTITY": self.spec.name,
                "MTLS_SIDECAR_OUT_CERT": str(out_cert),
                "MTLS_SIDECAR_OUT_KEY": str(out_key),
            }
            if request.current is not None:
                current_cert, current_key = _write_current(request.current, Path(out_dir))
                env["MTLS_SIDECAR_CURRENT_CERT"] = str(current_cert)
                env["MTLS_SIDECAR_CURRENT_KEY"] = str(current_key)
            await self._run(env)
            missing = [
                f"{var} ({path})"
                for var, path in (("MTLS_SIDECAR_OUT_CERT", out_cert), ("MTLS_SIDECAR_OUT_KEY", out_key))
                if not path.exists()
            ]
            if missing:
                raise ProviderError(f"renew_command finished but did not write {' and '.join(missing)}")
            return NewCredential(cert_chain_pem=out_cert.read_bytes(), key_pem=out_key.read_bytes())

    async def _run(self, env: dict[str, str]) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise ProviderError(f"cannot run renew_command {self.argv[0]!r}: {exc.strerror or exc}") from exc
        try:
            _, stderr = await asyncio.wait_for(proc.communicate(), self.timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group: scripts leave children behind
            await proc.wait()
            raise ProviderError(f"renew_command {self.argv[0]!r} did not finish within {self.timeout:g}s") from None
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        if proc.returncode != 0:
            raise ProviderError(f"renew_command {self.argv[0]!r} exited with status {proc.returncode}: {_tail(stderr)}")


def _write_current(current: Candidate, folder: Path) -> tuple[Path, Path]:
    """The credential in use as plain `current.crt` (chain) and `current.key` (PKCS#8, 0600).

    Tools such as `step ca renew` want a certificate file and a key file, whatever shape the
    keystore holds (a bundle, PKCS#12, an encrypted key); the folder is private and removed after.
    """
    assert current.cert is not None and current.key is not None
    cert_path, key_path = folder / "current.crt", folder / "current.key"
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (current.cert, *current.chain))
    cert_path.write_bytes(chain)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            current.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return cert_path, key_path


def _tail(stderr: bytes) -> str:
    """The program's last words, short, and never a key it may have printed."""
    text = stderr.decode(errors="replace").strip()
    if "PRIVATE KEY" in text:
        return "(its error output mentions a private key and is not shown)"
    lines = [line for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "no error output")[-_STDERR_TAIL:]
