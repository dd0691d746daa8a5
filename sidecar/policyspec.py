"""The route policy's settings as config.toml spells them: pins, URI patterns, revocation modes.

Parsing only, no certificates: `config` reads these without loading `cryptography` (the CLI's
client commands read config.toml too, and start faster without it). `policy` checks them.
"""

from __future__ import annotations

import base64
import binascii
import re

REVOCATION_MODES = ("off", "soft", "hard")
PIN_HINT = (
    "openssl x509 -in server.pem -pubkey -noout | openssl pkey -pubin -outform der "
    "| openssl dgst -sha256 -binary | base64"
)


def parse_pin(text: str) -> str:
    """Normalise a pin to plain base64 of 32 bytes; accepts curl's "sha256//" prefix. ValueError if not."""
    body = text.strip()
    for prefix in ("sha256//", "sha256/"):
        if body.lower().startswith(prefix):
            body = body[len(prefix) :]
            break
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if len(raw) != 32:
        raise ValueError(f"decodes to {len(raw)} bytes, a SHA-256 digest has 32")
    return base64.b64encode(raw).decode("ascii")


def check_uri_pattern(pattern: str) -> None:
    """ValueError when `pattern` cannot be a URI pattern (no scheme, blanks)."""
    if not re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", pattern):
        raise ValueError("a URI pattern starts with a scheme, such as spiffe:// or https://")
    if any(c.isspace() for c in pattern) or "\0" in pattern:
        raise ValueError("a URI pattern has no blanks")
