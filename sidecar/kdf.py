"""How much key derivation a PKCS#12 file or an encrypted PKCS#8 key asks for, before any is done.

A password-protected file names its own iteration counts (the PKCS#12 MAC, PBES2's PBKDF2,
PKCS#12 PBE, scrypt's cost), and deriving the key costs that much CPU at every read: a
20,000,000-iteration file took seconds per keystore re-read. cryptography does not show the
counts, so this is a small DER walk that finds them; the keystore refuses a file above the cap.

The cap is 2,000,000 PBKDF2-style iterations per derivation: OpenSSL's default is 2,048, Java's
keytool 10,000, and OWASP's current advice for PBKDF2-HMAC-SHA256 is 600,000, so this leaves
room above the strictest advice, while one derivation stays near a quarter of a second on a
laptop core (a PKCS#12 file has up to three: MAC, key, certificates). scrypt's N is capped at
2**20 (1 GiB of memory at r=8 would already be too much; OpenSSL's own limit is 32 MiB).

Pure: bytes in, a number or a refusal out.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

MAX_ITERATIONS = 2_000_000
MAX_SCRYPT_N = 1 << 20
_MAX_DEPTH = 24  # DER inside DER inside DER: real files nest about ten levels

# Algorithm identifiers whose parameters are SEQUENCE { salt, iterationCount INTEGER, ... }:
# PBKDF2 (1.2.840.113549.1.5.12), PBES1 (1.2.840.113549.1.5.1 .. 11) and PKCS#12 PBE
# (1.2.840.113549.1.12.1.1 .. 6).
_PBKDF2 = bytes.fromhex("2a864886f70d01050c")
_PBES1 = tuple(bytes.fromhex("2a864886f70d0105") + bytes([n]) for n in (1, 3, 4, 6, 10, 11))
_PKCS12_PBE = tuple(bytes.fromhex("2a864886f70d010c01") + bytes([n]) for n in range(1, 7))
_ITERATION_ALGORITHMS = (_PBKDF2, *_PBES1, *_PKCS12_PBE)
_SCRYPT = bytes.fromhex("2b06010401da47040b")  # 1.3.6.1.4.1.11591.4.11: { salt, N, r, p, ... }

_SEQUENCE, _INTEGER, _OCTET_STRING, _OID = 0x30, 0x02, 0x04, 0x06


@dataclass(frozen=True)
class _Node:
    tag: int
    content: bytes


class _NotDER(ValueError):
    pass


def _children(data: bytes) -> Iterator[_Node]:
    pos = 0
    while pos < len(data):
        if len(data) - pos < 2:
            raise _NotDER
        tag, first = data[pos], data[pos + 1]
        if tag & 0x1F == 0x1F:
            raise _NotDER  # high tag numbers: not in the structures we read
        pos += 2
        if first < 0x80:
            length = first
        else:
            count = first & 0x7F
            if count == 0 or count > 4 or pos + count > len(data):
                raise _NotDER
            length = int.from_bytes(data[pos : pos + count], "big")
            pos += count
        if pos + length > len(data):
            raise _NotDER
        yield _Node(tag, data[pos : pos + length])
        pos += length


def _parse(data: bytes) -> list[_Node] | None:
    try:
        return list(_children(data))
    except _NotDER:
        return None


def _integer(node: _Node) -> int | None:
    if node.tag != _INTEGER or not node.content or len(node.content) > 16:
        return None
    return int.from_bytes(node.content, "big", signed=True)


def kdf_costs(der: bytes) -> list[tuple[str, int]]:
    """Every (what, count) a DER structure asks a key derivation for: ("iterations", n) and
    ("scrypt N", n). The PKCS#12 MAC's iterations come out as ("MAC iterations", n)."""
    found: list[tuple[str, int]] = []
    top = _parse(der)
    if top is None:
        return found
    # PFX: SEQUENCE { version, authSafe, MacData { DigestInfo, salt, iterations DEFAULT 1 } }
    if len(top) == 1 and top[0].tag == _SEQUENCE:
        pfx = _parse(top[0].content) or []
        if len(pfx) == 3 and pfx[2].tag == _SEQUENCE:
            mac = _parse(pfx[2].content) or []
            if len(mac) == 3 and (count := _integer(mac[2])) is not None:
                found.append(("MAC iterations", count))
    _walk(top, found, 0)
    return found


def _walk(nodes: list[_Node], found: list[tuple[str, int]], depth: int) -> None:
    if depth > _MAX_DEPTH:
        return
    if len(nodes) >= 2 and nodes[0].tag == _OID and nodes[1].tag == _SEQUENCE:
        params = _parse(nodes[1].content) or []
        if nodes[0].content in _ITERATION_ALGORITHMS and len(params) >= 2:
            if (count := _integer(params[1])) is not None:
                found.append(("iterations", count))
        elif nodes[0].content == _SCRYPT and len(params) >= 2 and (cost := _integer(params[1])) is not None:
            found.append(("scrypt N", cost))
    for node in nodes:
        constructed = node.tag & 0x20 or node.tag == _OCTET_STRING  # an OCTET STRING may wrap DER
        if constructed and (inner := _parse(node.content)) is not None:
            _walk(inner, found, depth + 1)


def kdf_refusal(der: bytes) -> str | None:
    """Why deriving a key from `der` costs too much to try, or None when it is within the caps."""
    for what, count in kdf_costs(der):
        if what == "scrypt N":
            if count > MAX_SCRYPT_N:
                return f"its key derivation asks for scrypt N = {count}; more than {MAX_SCRYPT_N} is refused"
        elif count > MAX_ITERATIONS:
            return (
                f"its key derivation asks for {count:,} {what}; more than {MAX_ITERATIONS:,} are refused "
                "(each read would take seconds of CPU)"
            )
    return None
