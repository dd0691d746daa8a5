"""Server policy beyond names: SPKI pins and the server allow-list. Pure: certificates in, verdicts out.

Checked by the tunnel after the TLS handshake (which already verified trust and the name)
and before any byte crosses the tunnel; `mtls-sidecar check` explains the same verdicts.

- Pins (`pin_sha256`): base64 SHA-256 digests of a SubjectPublicKeyInfo. The server passes
  when any certificate of its *verified* chain (leaf, intermediate or trust anchor) has a
  pinned key; with `unsafe_skip_verify` only the leaf counts, since an unverified chain can
  hold any certificate.
- URI SANs (`allowed_uri_sans`): the leaf must hold at least one URI SAN that matches one
  pattern. In a pattern `*` matches any run of characters except "/", `**` any run at all;
  everything else is literal and case-sensitive.
- The allow-list (`allowed_common_names`, `allowed_ous`, `allowed_dns_sans`, `allowed_ip_sans`
  and `allowed_uri_sans`; ghostunnel's --verify-cn/-ou/-dns/-ip/-uri): when any of them is
  set, the leaf passes when any one entry matches (its CN, one of its OUs, DNS SANs, IP SANs,
  or a URI SAN by the pattern above). `allowed_uri_sans` alone is refused as
  `uri_san_not_allowed`, the others (alone or together) as `server_not_allowed`.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import ssl
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from sidecar.causes import Cause, quoted
from sidecar.policyspec import (
    PIN_HINT,
    REVOCATION_MODES,
    ServerAllowList,
    check_uri_pattern,
    ip_key,
    parse_dns_san,
    parse_ip_san,
    parse_pin,
)

# What config.toml spells (parsed without cryptography); re-exported for the modules that check them.
__all__ = [
    "PIN_HINT",
    "REVOCATION_MODES",
    "ServerAllowList",
    "check_uri_pattern",
    "parse_dns_san",
    "parse_ip_san",
    "parse_pin",
]


@dataclass(frozen=True)
class Verdict:
    """The outcome of a server check: ok, or a failure reason key and a sentence; maybe a warning."""

    ok: bool
    reason: Cause | None = None
    message: str = ""
    warning: str | None = None

    def __post_init__(self) -> None:  # both may name the server's certificate: quoted
        object.__setattr__(self, "message", quoted(self.message))
        if self.warning is not None:
            object.__setattr__(self, "warning", quoted(self.warning))

    @classmethod
    def passed(cls, warning: str | None = None) -> Verdict:
        return cls(True, None, "", warning)

    @classmethod
    def refused(cls, reason: Cause, message: str) -> Verdict:
        return cls(False, reason, message)


PASS = Verdict.passed()


# --- pins -------------------------------------------------------------------------------


def spki_sha256(cert: x509.Certificate) -> str:
    """The base64 SHA-256 of the certificate's SubjectPublicKeyInfo (what `pin_sha256` holds)."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def check_pins(chain: Sequence[x509.Certificate], pins: Sequence[str], *, verified: bool = True) -> Verdict:
    """Pass when a certificate of `chain` (leaf first; only the leaf when not `verified`) is pinned."""
    if not pins:
        return PASS
    if not chain:
        return Verdict.refused(Cause.PIN_MISMATCH, "the server sent no certificate to check against pin_sha256")
    considered = chain if verified else chain[:1]
    if any(spki_sha256(cert) in pins for cert in considered):
        return PASS
    leaf = chain[0]
    return Verdict.refused(
        Cause.PIN_MISMATCH,
        f"server certificate {_subject(leaf)} has key sha256/{spki_sha256(leaf)}, which is not pinned "
        f"(pin_sha256 holds {len(pins)} pin{'s' if len(pins) != 1 else ''}, and no certificate of its chain matches)",
    )


# --- URI SANs ---------------------------------------------------------------------------


def uri_glob(pattern: str) -> re.Pattern[str]:
    """`*` → any run without "/", `**` → any run; the rest literal."""
    parts = re.split(r"(\*\*|\*)", pattern)
    regex = "".join(".*" if p == "**" else "[^/]*" if p == "*" else re.escape(p) for p in parts)
    return re.compile(regex, re.DOTALL)


def uri_matches(pattern: str, uri: str) -> bool:
    return uri_glob(pattern).fullmatch(uri) is not None


def uri_sans(cert: x509.Certificate) -> list[str]:
    return [str(v) for v in _san_values(cert, x509.UniformResourceIdentifier)]


def check_uri_sans(leaf: x509.Certificate | None, allowed: Sequence[str]) -> Verdict:
    """Pass when the leaf holds a URI SAN matching one of `allowed` (or when nothing is configured)."""
    if not allowed:
        return PASS
    if leaf is None:
        return Verdict.refused(Cause.URI_SAN_NOT_ALLOWED, "the server sent no certificate to check URI SANs on")
    held = uri_sans(leaf)
    if any(uri_matches(p, uri) for p in allowed for uri in held):
        return PASS
    wanted = ", ".join(allowed)
    if not held:
        return Verdict.refused(
            Cause.URI_SAN_NOT_ALLOWED,
            f"server certificate {_subject(leaf)} holds no URI SAN; allowed_uri_sans wants one of: {wanted}",
        )
    return Verdict.refused(
        Cause.URI_SAN_NOT_ALLOWED,
        f"server certificate {_subject(leaf)} holds URI SAN {', '.join(held)}, "
        f"which allowed_uri_sans does not allow (allowed: {wanted})",
    )


# --- the allow-list: CN, OU, DNS, IP and URI SANs, OR'ed ----------------------------------


@dataclass(frozen=True)
class ServerNames:
    """What a server certificate says it is, for the allow-list and for messages."""

    common_names: tuple[str, ...]
    ous: tuple[str, ...]
    dns_sans: tuple[str, ...]
    ip_sans: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]
    uri_sans: tuple[str, ...]

    @classmethod
    def of(cls, cert: x509.Certificate) -> ServerNames:
        return cls(
            common_names=_attributes(cert, NameOID.COMMON_NAME),
            ous=_attributes(cert, NameOID.ORGANIZATIONAL_UNIT_NAME),
            dns_sans=tuple(str(v) for v in _san_values(cert, x509.DNSName)),
            ip_sans=tuple(v for v in _san_values(cert, x509.IPAddress) if isinstance(v, _IP_TYPES)),
            uri_sans=tuple(uri_sans(cert)),
        )

    def describe(self) -> str:
        """ "CN api; OU payments; DNS SANs api.example.test; IP SANs none; URI SANs none"."""
        parts = (
            ("CN", self.common_names),
            ("OU", self.ous),
            ("DNS SANs", self.dns_sans),
            ("IP SANs", tuple(str(ip) for ip in self.ip_sans)),
            ("URI SANs", self.uri_sans),
        )
        return "; ".join(f"{label} {', '.join(values) or 'none'}" for label, values in parts)


def allowed_by(names: ServerNames, allow: ServerAllowList) -> str | None:
    """The first allow-list entry that `names` match, as "key: entry"; None when none does."""
    for cn in allow.common_names:
        if cn in names.common_names:
            return f"allowed_common_names: {cn}"
    for ou in allow.ous:
        if ou in names.ous:
            return f"allowed_ous: {ou}"
    held_dns = {name.rstrip(".").lower() for name in names.dns_sans}
    for dns in allow.dns_sans:  # normalised by ServerAllowList: lower case, no final dot
        if dns in held_dns:
            return f"allowed_dns_sans: {dns}"
    held_ips = {ip_key(ip) for ip in names.ip_sans}
    for ip in allow.ip_sans:  # normalised by ServerAllowList: IPv4-mapped as IPv4
        if ipaddress.ip_address(ip) in held_ips:
            return f"allowed_ip_sans: {ip}"
    for pattern in allow.uri_sans:
        if any(uri_matches(pattern, uri) for uri in names.uri_sans):
            return f"allowed_uri_sans: {pattern}"
    return None


def check_allow_list(leaf: x509.Certificate | None, allow: ServerAllowList) -> Verdict:
    """Pass when nothing is configured or the leaf matches one entry of any list.

    `allowed_uri_sans` alone is `check_uri_sans` (cause uri_san_not_allowed, its own sentences);
    with any other list set, a refusal is server_not_allowed and says what the server holds.
    """
    if not allow:
        return PASS
    if allow.uri_only:
        return check_uri_sans(leaf, allow.uri_sans)
    wanted = "; ".join(
        f"{key} = [{', '.join(repr(v) for v in values)}]" for key, values in allow.by_key().items() if values
    )
    if leaf is None:
        return Verdict.refused(
            Cause.SERVER_NOT_ALLOWED, f"the server sent no certificate to check against the allow-list ({wanted})"
        )
    names = ServerNames.of(leaf)
    if allowed_by(names, allow) is not None:
        return PASS
    return Verdict.refused(
        Cause.SERVER_NOT_ALLOWED,
        f"server certificate {_subject(leaf)} matches nothing the route allows: it holds {names.describe()}; "
        f"the route allows {wanted}",
    )


def check_identity(
    chain: Sequence[x509.Certificate],
    *,
    pins: Sequence[str],
    allowed_uri_sans: Sequence[str] = (),
    allow: ServerAllowList | None = None,
    verified: bool = True,
) -> Verdict:
    """Pins, then the allow-list: the first refusal wins.

    `allow` is the whole allow-list; `allowed_uri_sans` alone is the same as
    `allow=ServerAllowList(uri_sans=...)` (one of the two, not both).
    """
    if allow is not None and allowed_uri_sans:
        raise TypeError("give allowed_uri_sans inside allow, not beside it")
    verdict = check_pins(chain, pins, verified=verified)
    if not verdict.ok:
        return verdict
    return check_allow_list(chain[0] if chain else None, allow or ServerAllowList(uri_sans=tuple(allowed_uri_sans)))


# --- the peer's chain, from an ssl object ----------------------------------------------


def peer_chain(tls: ssl.SSLObject | ssl.SSLSocket, *, verified: bool = True) -> list[x509.Certificate]:
    """The server's chain after a handshake, leaf first.

    The verified chain (ending at the trust anchor) when `verified`, else what the server
    sent. Python 3.13 has public methods; 3.11 and 3.12 have the same on the private object.
    """
    name = "get_verified_chain" if verified else "get_unverified_chain"
    getter: Any = getattr(tls, name, None) or getattr(getattr(tls, "_sslobj", None), name, None)
    items: list[Any] = (getter() if getter is not None else None) or []
    chain: list[x509.Certificate] = []
    for item in items:
        der = item if isinstance(item, bytes) else item.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]
        try:
            chain.append(x509.load_der_x509_certificate(der))
        except ValueError:
            break
    if not chain:
        der_leaf = tls.getpeercert(binary_form=True)
        if der_leaf:
            chain.append(x509.load_der_x509_certificate(der_leaf))
    return chain


class ChainMemory:
    """Verified chains from full handshakes, for connections that resume a TLS session.

    A resumed session carries the leaf but no verified chain (nothing was verified again),
    yet pins may name a CA key and revocation needs the issuer. Keys are (the leaf's SHA-256,
    the trust it was verified under), so a chain is only reused under the same trust.
    """

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._chains: OrderedDict[tuple[bytes, object], tuple[x509.Certificate, ...]] = OrderedDict()

    def remember(self, trust: object, chain: Sequence[x509.Certificate]) -> None:
        if len(chain) < 2:
            return
        key = (chain[0].fingerprint(hashes.SHA256()), trust)
        self._chains[key] = tuple(chain)
        self._chains.move_to_end(key)
        while len(self._chains) > self._size:
            self._chains.popitem(last=False)

    def recall(self, trust: object, leaf: x509.Certificate) -> list[x509.Certificate] | None:
        chain = self._chains.get((leaf.fingerprint(hashes.SHA256()), trust))
        return list(chain) if chain is not None else None


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def _san_values(cert: x509.Certificate, kind: Any) -> list[Any]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    return list(sans.get_values_for_type(kind))


def _attributes(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> tuple[str, ...]:
    try:
        attributes = cert.subject.get_attributes_for_oid(oid)
    except ValueError:
        return ()
    return tuple(a.value for a in attributes if isinstance(a.value, str))


_IP_TYPES = (ipaddress.IPv4Address, ipaddress.IPv6Address)
