"""`renew = "command"`: run the user's program (argv, no shell), then take what it wrote.

The program gets `MTLS_SIDECAR_IDENTITY`, `MTLS_SIDECAR_CURRENT_CERT` and `MTLS_SIDECAR_CURRENT_KEY`
(the credential in use as plain PEM files; absent when enrolling), and `MTLS_SIDECAR_OUT_CERT` and
`MTLS_SIDECAR_OUT_KEY` (where to write). All four live in a private temporary folder removed
afterwards, inside the daemon's scratch folder (emptied at every start, should a renewal be
killed). The daemon validates the result before accepting it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from sidecar.config import IdentitySpec
from sidecar.credentials import Candidate
from sidecar.files import make_private_dirs
from sidecar.renewal.providers.base import NewCredential, ProviderContext, ProviderError, RenewalRequest, settings_of
from sidecar.renewal.providers.run import clean_environment, run_setting_command
from sidecar.renewal.settings import CommandSettings


class CommandProvider:
    name = "command"

    def __init__(self, spec: IdentitySpec, context: ProviderContext) -> None:
        self.spec = spec
        self.settings = settings_of(spec, CommandSettings)
        self.scratch = context.scratch

    async def issue(self, request: RenewalRequest) -> NewCredential:
        if self.scratch is not None:
            make_private_dirs(self.scratch)
        # in the daemon's scratch folder, not /tmp: a renewal killed midway leaves the decrypted
        # key there, and the daemon empties that folder at start
        with tempfile.TemporaryDirectory(prefix="renew-", dir=self.scratch) as out_dir:
            out_cert, out_key = Path(out_dir) / "cert.pem", Path(out_dir) / "key.pem"
            # a clean environment: the basics, this identity's own password variables and what
            # renew_env names; never another identity's password
            own = [v for v in (self.spec.pkcs12_password_env, self.spec.key_password_env) if v]
            env = {
                **clean_environment([*own, *self.settings.env]),
                "MTLS_SIDECAR_IDENTITY": self.spec.name,
                "MTLS_SIDECAR_OUT_CERT": str(out_cert),
                "MTLS_SIDECAR_OUT_KEY": str(out_key),
            }
            if request.current is not None:
                current_cert, current_key = _write_current(request.current, Path(out_dir))
                env["MTLS_SIDECAR_CURRENT_CERT"] = str(current_cert)
                env["MTLS_SIDECAR_CURRENT_KEY"] = str(current_key)
            await run_setting_command(
                self.settings.argv,
                setting="renew_command",
                timeout=self.settings.timeout,
                env=env,
                secrets=[os.environ[v] for v in own if os.environ.get(v)],
            )
            missing = [
                f"{var} ({path})"
                for var, path in (("MTLS_SIDECAR_OUT_CERT", out_cert), ("MTLS_SIDECAR_OUT_KEY", out_key))
                if not path.exists()
            ]
            if missing:
                raise ProviderError(f"renew_command finished but did not write {' and '.join(missing)}")
            return NewCredential(cert_chain_pem=_read_output(out_cert), key_pem=_read_output(out_key))


MAX_OUTPUT_FILE = 1 << 20  # a certificate chain or a key is a few KiB; the keystore refuses more too


def _read_output(path: Path) -> bytes:
    with path.open("rb") as fh:
        data = fh.read(MAX_OUTPUT_FILE + 1)
    if len(data) > MAX_OUTPUT_FILE:
        raise ProviderError(
            f"renew_command wrote more than {MAX_OUTPUT_FILE} bytes to {path.name}; a credential is a few KiB"
        )
    return data


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
