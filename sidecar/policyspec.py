"""The route policy's settings as config.toml spells them: pins, the server allow-list, revocation modes.

Parsing only, no certificates: `config` reads these without loading `cryptography` (the CLI's
client commands read config.toml too, and start faster without it). `policy` checks them.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass

REVOCATION_MODES = ("off", "soft", "hard")
PIN_HINT = (
    "openssl x509 -in server.pem -pubkey -noout | openssl pkey -pubin -outform der "
    "| openssl dgst -sha256 -binary | base64"
)


def parse_pin(text: str) -> str:
    """Normalise a pin to plain base64 of 32 bytes. ValueError if not.

    Accepts curl's "sha256//" prefix, "sha256/" (how `check` and the refusals print a key) and
    ghostunnel's "sha256:" (its --verify-spki-pin; base64 never holds a ":").
    """
    body = text.strip()
    for prefix in ("sha256//", "sha256/", "sha256:"):
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


# --- the server allow-list (ghostunnel's --verify-cn/-ou/-dns/-ip/-uri) ---------------------

# The route keys of the allow-list, in the order a refusal lists them.
ALLOW_LIST_KEYS = ("allowed_common_names", "allowed_ous", "allowed_dns_sans", "allowed_ip_sans", "allowed_uri_sans")


@dataclass(frozen=True)
class ServerAllowList:
    """Who the server may be, beyond a trusted chain and the route's name: one list per key.

    Empty lists allow anyone. Otherwise the server's leaf passes when any one entry matches:
    its subject CN equals a common name, OR a subject OU equals an OU, OR a DNS SAN equals a
    DNS name (case-insensitive), OR an IP SAN is an IP address, OR a URI SAN matches a pattern.
    """

    common_names: tuple[str, ...] = ()
    ous: tuple[str, ...] = ()
    dns_sans: tuple[str, ...] = ()
    ip_sans: tuple[str, ...] = ()
    uri_sans: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Each entry checked and normalised (DNS names lower-cased, IP addresses in one form): ValueError if bad."""
        for key in ("common_names", "ous", "uri_sans"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        for name in (*self.common_names, *self.ous):
            check_name_value(name)
        for pattern in self.uri_sans:
            check_uri_pattern(pattern)
        object.__setattr__(self, "dns_sans", tuple(parse_dns_san(d) for d in self.dns_sans))
        object.__setattr__(self, "ip_sans", tuple(parse_ip_san(i) for i in self.ip_sans))

    def __bool__(self) -> bool:
        return any((self.common_names, self.ous, self.dns_sans, self.ip_sans, self.uri_sans))

    @property
    def uri_only(self) -> bool:
        """Only `allowed_uri_sans` is set: refusals keep their own cause, uri_san_not_allowed."""
        return bool(self.uri_sans) and not (self.common_names or self.ous or self.dns_sans or self.ip_sans)

    def by_key(self) -> dict[str, tuple[str, ...]]:
        """The lists under their config keys (ALLOW_LIST_KEYS), for status and messages."""
        values = (self.common_names, self.ous, self.dns_sans, self.ip_sans, self.uri_sans)
        return dict(zip(ALLOW_LIST_KEYS, values, strict=True))


def parse_ip_san(text: str) -> str:
    """An IP address as written in `allowed_ip_sans`, normalised ("0:0::1" → "::1"). ValueError if not.

    An IPv4-mapped IPv6 address ("::ffff:10.0.0.1") is its IPv4 address, as Go's net.IP.Equal
    (which ghostunnel compares with) has it.
    """
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        raise ValueError("not an IP address (a single address: no port, prefix length or brackets)") from None
    return str(ip_key(ip))


def ip_key(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """What two IP addresses compare by: an IPv4-mapped IPv6 address as its IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


_DNS_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"(?:\*\.)?{_DNS_LABEL}(?:\.{_DNS_LABEL})*\.?")


def parse_dns_san(text: str) -> str:
    """A DNS name as written in `allowed_dns_sans`, lower-cased without a final dot. ValueError if not.

    Compared with the certificate's DNS SANs as equal strings (case-insensitive): "*.example.test"
    matches only a certificate holding that very wildcard, as in ghostunnel.
    """
    name = text.strip()
    if not _DNS_NAME.fullmatch(name) or len(name.rstrip(".")) > 253:
        raise ValueError("not a DNS name (labels of letters, digits and hyphens; a leading *. at most)")
    return name.rstrip(".").lower()


def check_name_value(text: str) -> None:
    """ValueError when `text` cannot be a CN or OU to compare with (empty, control characters)."""
    if not text:
        raise ValueError("empty: a common name or OU to allow has at least one character")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError("holds a control character")
