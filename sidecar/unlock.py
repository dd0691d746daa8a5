"""Key derivation in a child process with a time bound: `credentials.Unlockers` for the daemon.

cryptography holds Python's interpreter lock while it derives a key from a password (PKCS#12,
encrypted PKCS#8), so even on a worker thread a costly file would stall the event loop. A child
(`python -m sidecar.unlock`) takes the file and password on stdin and answers with the
unencrypted PEM on stdout, which the parent parses at no cost. Nothing touches the disk; the
child is killed when it runs past `UNLOCK_TIMEOUT`.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from sidecar.credentials import Pkcs12Contents, Unlockers

UNLOCK_TIMEOUT = 20.0  # a file within the caps derives in well under a second


class UnlockFailed(Exception):
    """The child did not answer: killed on timeout, or it crashed."""


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _ask(op: str, data: bytes, password: bytes | None) -> dict[str, Any]:
    request = json.dumps({"op": op, "data": _b64(data), "password": _b64(password)}).encode()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sidecar.unlock"],
            input=request,
            capture_output=True,
            timeout=UNLOCK_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise UnlockFailed(f"key derivation did not finish within {UNLOCK_TIMEOUT:g}s") from None
    try:
        answer: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        raise UnlockFailed(f"key derivation failed (worker exit status {done.returncode})") from None
    if "error" in answer:
        if answer["error"] == "ValueError":
            raise ValueError(answer["message"])
        if answer["error"] == "TypeError":
            raise TypeError(answer["message"])
        raise UnlockFailed(answer["message"])
    return answer


def _key(pem: str | None) -> object:
    return None if pem is None else serialization.load_pem_private_key(pem.encode(), password=None)


def load_pkcs12(data: bytes, password: bytes | None) -> Pkcs12Contents:
    answer = _ask("pkcs12", data, password)
    cert = None if answer["cert"] is None else x509.load_pem_x509_certificate(answer["cert"].encode())
    return _key(answer["key"]), cert, [x509.load_pem_x509_certificate(c.encode()) for c in answer["extra"]]


def load_key(data: bytes, password: bytes | None) -> object:
    return _key(_ask("key", data, password)["key"])


IN_CHILD = Unlockers(pkcs12=load_pkcs12, key=load_key)


# -- the child


def _pem_key(key: object) -> str | None:
    if key is None:
        return None
    private_bytes = getattr(key, "private_bytes", None)
    if private_bytes is None:
        raise TypeError(f"unsupported private key type {type(key).__name__}")
    pem: bytes = private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem.decode()


def _pem_cert(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _answer(request: dict[str, Any]) -> dict[str, Any]:
    data = base64.b64decode(request["data"])
    password = None if request["password"] is None else base64.b64decode(request["password"])
    try:
        if request["op"] == "pkcs12":
            key, cert, extra = pkcs12.load_key_and_certificates(data, password)
            return {
                "key": _pem_key(key),
                "cert": None if cert is None else _pem_cert(cert),
                "extra": [_pem_cert(c) for c in extra],
            }
        return {"key": _pem_key(serialization.load_pem_private_key(data, password=password))}
    except (ValueError, TypeError) as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    except Exception as exc:
        return {"error": "other", "message": str(exc) or type(exc).__name__}


def main() -> None:
    sys.stdout.write(json.dumps(_answer(json.loads(sys.stdin.buffer.read()))))


if __name__ == "__main__":
    main()
