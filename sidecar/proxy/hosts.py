"""The `hosts` of a proxy rule: names, one-label wildcards, IP addresses and CIDR blocks. Pure.

A destination matches a pattern as the client named it: a name is never resolved to be
matched against an address block (a rule for `10.20.0.0/16` covers clients that ask for an
address in it, not names that happen to resolve there), so matching costs no DNS and cannot
be steered by it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PATTERN_RULE = (
    'a DNS name ("db.example.net"), a wildcard for one left-most label ("*.corp.example"), '
    'an IP address ("10.20.0.5", "::1") or a CIDR block ("10.20.0.0/16")'
)
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


@dataclass(frozen=True)
class HostPattern:
    """One entry of a rule's `hosts`, as written, and what it means."""

    text: str
    name: str | None = None  # an exact DNS name, lower case, no trailing dot
    suffix: str | None = None  # a wildcard: ".corp.example" (exactly one label before it)
    network: IPNetwork | None = None  # an address (as a /32 or /128) or a CIDR block

    def matches(self, host: str) -> bool:
        """Whether a destination named `host` (a DNS name or an IP literal) is covered."""
        address = ip_literal(host)
        if address is not None:
            return self.network is not None and address.version == self.network.version and address in self.network
        name = normal_name(host)
        if self.name is not None:
            return name == self.name
        if self.suffix is not None:
            label, _, rest = name.partition(".")
            return bool(label) and "." + rest == self.suffix
        return False

    @property
    def is_name(self) -> bool:
        return self.network is None


def parse_host_pattern(text: str) -> HostPattern:
    """Raises ValueError, saying why, for anything but a name, `*.name`, an address or a CIDR block."""
    raw = text.strip()
    if not raw:
        raise ValueError("empty host")
    if "/" in raw:
        try:
            return HostPattern(text, network=ipaddress.ip_network(raw, strict=False))
        except ValueError as exc:
            raise ValueError(f"not a CIDR block ({exc})") from None
    address = ip_literal(raw)
    if address is not None:
        return HostPattern(text, network=ipaddress.ip_network(address))
    if re.fullmatch(r"[0-9.]+", raw):
        raise ValueError("not a valid IPv4 address")
    name = normal_name(raw)
    if name.startswith("*."):
        rest = name[2:]
        if "*" in rest or not _NAME.fullmatch(rest) or "." not in rest:
            raise ValueError("a wildcard is '*.' before a name of two labels or more, as in *.corp.example")
        return HostPattern(text, suffix="." + rest)
    if "*" in name:
        raise ValueError("a wildcard stands only for the whole left-most label, as in *.corp.example")
    if len(name) > 253 or not _NAME.fullmatch(name):
        raise ValueError("not a valid host name")
    return HostPattern(text, name=name)


def ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`host` as an IP address when it is one ("[::1]" and a zone-less IPv6 included), else None."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def normal_name(host: str) -> str:
    """A DNS name as rules compare it: lower case, without the root's trailing dot."""
    return host.lower().rstrip(".")
