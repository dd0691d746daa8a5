"""Distinguished names as a TLS CertificateRequest carries them (DER), read into `x509.Name`. Pure.

cryptography parses names only inside certificates; OpenSSL hands `check` the issuers a
server asks for as bare DER Names (`sidecar.check.observe`), so this reads one: a SEQUENCE
of SETs of (OID, string) pairs, the string types X.520 allows.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier


def name_from_der(der: bytes) -> x509.Name:
    """An X.501 Name (SEQUENCE OF SET OF AttributeTypeAndValue) from DER. ValueError if malformed."""
    tag, content, rest = _tlv(der)
    if tag != 0x30 or rest:
        raise ValueError("a distinguished name is a SEQUENCE")
    rdns = []
    while content:
        tag, members, content = _tlv(content)
        if tag != 0x31:
            raise ValueError("a relative distinguished name is a SET")
        attributes = []
        while members:
            tag, pair, members = _tlv(members)
            if tag != 0x30:
                raise ValueError("an attribute is a SEQUENCE")
            oid_tag, oid, pair = _tlv(pair)
            value_tag, value, pair = _tlv(pair)
            if oid_tag != 0x06 or pair:
                raise ValueError("an attribute is an OID and one value")
            attributes.append(_attribute(_oid(oid), value_tag, value))
        if not attributes:
            raise ValueError("an empty relative distinguished name")
        rdns.append(x509.RelativeDistinguishedName(attributes))
    return x509.Name(rdns)


def _attribute(oid: ObjectIdentifier, tag: int, value: bytes) -> x509.NameAttribute[str]:
    if tag == 0x1E:  # BMPString
        text = value.decode("utf-16-be")
    elif tag == 0x1C:  # UniversalString
        text = value.decode("utf-32-be")
    elif tag == 0x0C:  # UTF8String
        text = value.decode("utf-8")
    elif tag in (0x13, 0x16, 0x14, 0x1A):  # Printable, IA5, Teletex, Visible
        text = value.decode("latin-1")
    else:
        raise ValueError(f"unsupported string type {tag:#x} in a distinguished name")
    # Only shown and compared (Name equality ignores the string type): the default type will do.
    return x509.NameAttribute(oid, text)


def _tlv(data: bytes) -> tuple[int, bytes, bytes]:
    """(tag, content, what follows) of one DER element."""
    if len(data) < 2:
        raise ValueError("cut off")
    tag, length, pos = data[0], data[1], 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 3 or len(data) < 2 + count:
            raise ValueError("bad length")
        length, pos = int.from_bytes(data[2 : 2 + count], "big"), 2 + count
    if pos + length > len(data):
        raise ValueError("cut off")
    return tag, data[pos : pos + length], data[pos + length :]


def _oid(content: bytes) -> ObjectIdentifier:
    if not content:
        raise ValueError("empty OID")
    arcs: list[int] = []
    value = 0
    for byte in content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if value or content[-1] & 0x80:
        raise ValueError("cut-off OID")
    first = arcs[0]
    head = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    return ObjectIdentifier(".".join(str(a) for a in head + arcs[1:]))
