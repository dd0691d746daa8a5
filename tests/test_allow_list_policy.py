"""The server allow-list as pure functions: `allowed_common_names`, `allowed_ous`,
`allowed_dns_sans`, `allowed_ip_sans` and `allowed_uri_sans` (ghostunnel's --verify-cn/-ou/
-dns/-ip/-uri), one OR over all of them; their config keys; ghostunnel's "sha256:" pins;
`check`'s explanation of a refusal. Certificates are made here, at test time."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.causes import Cause
from sidecar.config import ROUTE_KEYS, RouteSpec, parse_config
from sidecar.errors import ConfigError
from sidecar.policy import (
    ServerAllowList,
    ServerNames,
    allowed_by,
    check_allow_list,
    check_identity,
    parse_pin,
    spki_sha256,
)
from sidecar.policyspec import ALLOW_LIST_KEYS, parse_dns_san, parse_ip_san
from tests.pki import CA, Leaf

pytestmark = pytest.mark.portable

NOW = datetime.now(UTC)


def server_leaf(
    ca: CA,
    cn: str | None = "api.example.test",
    *,
    ous: Sequence[str] = (),
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    uris: Sequence[str] = (),
) -> Leaf:
    """A serverAuth leaf from `ca` with exactly this subject (CN, OUs) and these SANs."""
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou) for ou in ous]
    if cn is not None:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca.signing_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(minutes=5))
        .not_valid_after(NOW + timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    chain = [ca.intermediate] if ca.intermediate is not None else []
    return Leaf(builder.sign(ca.signing_key, hashes.SHA256()), key, chain)


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA("Allow-list Unit CA")


@pytest.fixture(scope="module")
def full(ca: CA) -> x509.Certificate:
    """A server that holds one of everything."""
    return server_leaf(
        ca,
        "orders",
        ous=("Payments", "Ops"),
        dns=("orders.example.test", "*.orders.example.test"),
        ips=("10.0.0.5", "fd00::5"),
        uris=("spiffe://example.test/api/orders",),
    ).cert


def verdict(cert: x509.Certificate | None, **lists: Sequence[str]) -> tuple[bool, Cause | None]:
    result = check_allow_list(cert, ServerAllowList(**{k: tuple(v) for k, v in lists.items()}))
    return result.ok, result.reason


# --- each list: one match, one miss ---------------------------------------------------------

REFUSED = (False, Cause.SERVER_NOT_ALLOWED)
PASSED = (True, None)


@pytest.mark.parametrize(
    ("lists", "expected"),
    [
        ({"common_names": ["orders"]}, PASSED),
        ({"common_names": ["Orders"]}, REFUSED),  # a CN is compared exactly, as ghostunnel does
        ({"common_names": ["orders.example.test"]}, REFUSED),  # a DNS SAN is not a CN
        ({"ous": ["Ops"]}, PASSED),  # any one of the subject's OUs
        ({"ous": ["Payments"]}, PASSED),
        ({"ous": ["payments"]}, REFUSED),
        ({"ous": ["orders"]}, REFUSED),  # the CN is not an OU
        ({"dns_sans": ["orders.example.test"]}, PASSED),
        ({"dns_sans": ["ORDERS.example.test."]}, PASSED),  # DNS: case and the root's dot do not count
        ({"dns_sans": ["*.orders.example.test"]}, PASSED),  # the very wildcard the certificate holds
        ({"dns_sans": ["api.orders.example.test"]}, REFUSED),  # a held wildcard is not expanded
        ({"dns_sans": ["orders"]}, REFUSED),  # the CN is not a DNS SAN
        ({"ip_sans": ["10.0.0.5"]}, PASSED),
        ({"ip_sans": ["10.0.0.6"]}, REFUSED),
        ({"ip_sans": ["fd00:0:0:0:0:0:0:5"]}, PASSED),  # IPv6 in another spelling
        ({"ip_sans": ["FD00::0005"]}, PASSED),
        ({"ip_sans": ["::ffff:10.0.0.5"]}, PASSED),  # IPv4-mapped: the IPv4 address (as Go's net.IP.Equal)
        ({"ip_sans": ["fd00::6"]}, REFUSED),
        ({"uri_sans": ["spiffe://example.test/api/*"], "common_names": ["x"]}, PASSED),
        ({"uri_sans": ["spiffe://example.test/**"], "common_names": ["x"]}, PASSED),
        ({"uri_sans": ["spiffe://example.test/*"], "common_names": ["x"]}, REFUSED),  # * stops at "/"
    ],
)
def test_each_list_matches_its_own_kind_of_name(
    full: x509.Certificate, lists: dict[str, list[str]], expected: tuple[bool, Cause | None]
) -> None:
    assert verdict(full, **lists) == expected


def test_the_lists_are_one_or(full: x509.Certificate) -> None:
    misses = {
        "common_names": ["billing"],
        "ous": ["Billing"],
        "dns_sans": ["billing.example.test"],
        "ip_sans": ["10.0.0.9"],
        "uri_sans": ["spiffe://example.test/api/billing"],
    }
    assert verdict(full, **misses) == REFUSED
    hits = {"common_names": "orders", "ous": "Ops", "dns_sans": "orders.example.test", "ip_sans": "::ffff:a00:5",
            "uri_sans": "spiffe://*/api/orders"}  # fmt: skip
    for key, hit in hits.items():  # any one hit in any one list lets the server in
        assert verdict(full, **{**misses, key: [*misses[key], hit]}) == PASSED, key
    first = allowed_by(ServerNames.of(full), ServerAllowList(ous=("x", "Ops"), ip_sans=("10.0.0.5",)))
    assert first == "allowed_ous: Ops"


def test_nothing_configured_lets_any_server_in(ca: CA, full: x509.Certificate) -> None:
    assert verdict(full) == PASSED
    assert verdict(None) == PASSED
    assert not ServerAllowList()
    assert verdict(server_leaf(ca, None).cert) == PASSED


def test_ipv6_sans_in_the_certificate_match_any_spelling(ca: CA) -> None:
    loopback = server_leaf(ca, "v6", ips=("::1", "::ffff:192.0.2.7")).cert
    for spelling in ("::1", "0:0:0:0:0:0:0:1", "0000::0001"):
        assert verdict(loopback, ip_sans=[spelling]) == PASSED, spelling
    assert verdict(loopback, ip_sans=["192.0.2.7"]) == PASSED  # held as IPv4-mapped IPv6
    assert verdict(loopback, ip_sans=["127.0.0.1"]) == REFUSED  # ::1 is not 127.0.0.1


def test_uri_sans_alone_keep_their_own_cause_and_words(full: x509.Certificate, ca: CA) -> None:
    refused = check_allow_list(full, ServerAllowList(uri_sans=("spiffe://example.test/db/*",)))
    assert refused.reason == Cause.URI_SAN_NOT_ALLOWED
    assert "which allowed_uri_sans does not allow" in refused.message
    bare = check_allow_list(server_leaf(ca, "bare").cert, ServerAllowList(uri_sans=("spiffe://x/*",)))
    assert bare.reason == Cause.URI_SAN_NOT_ALLOWED and "holds no URI SAN" in bare.message
    assert check_identity([full], pins=[], allowed_uri_sans=["spiffe://x/*"]).reason == Cause.URI_SAN_NOT_ALLOWED


def test_a_refusal_says_what_the_server_holds_and_what_is_allowed(full: x509.Certificate, ca: CA) -> None:
    refused = check_allow_list(
        full, ServerAllowList(common_names=("billing",), ip_sans=("10.0.0.9",), uri_sans=("spiffe://x/*",))
    )
    assert refused.reason == Cause.SERVER_NOT_ALLOWED
    message = refused.message
    assert message.startswith("server certificate CN=orders,OU=Ops,OU=Payments matches nothing the route allows")
    for held in ("CN orders", "OU Payments, Ops", "DNS SANs orders.example.test, *.orders.example.test",
                 "IP SANs 10.0.0.5, fd00::5", "URI SANs spiffe://example.test/api/orders"):  # fmt: skip
        assert held in message, held
    assert "allowed_common_names = ['billing']" in message
    assert "allowed_ip_sans = ['10.0.0.9']" in message and "allowed_uri_sans = ['spiffe://x/*']" in message
    assert "allowed_ous" not in message  # not configured: not listed
    bare = check_allow_list(server_leaf(ca, None).cert, ServerAllowList(common_names=("x",)))
    assert "(empty subject)" in bare.message and "CN none; OU none; DNS SANs none; IP SANs none" in bare.message
    nothing = check_allow_list(None, ServerAllowList(dns_sans=("a.test",)))
    assert nothing.reason == Cause.SERVER_NOT_ALLOWED and "no certificate" in nothing.message


def test_a_subject_with_control_characters_is_quoted_in_the_refusal(ca: CA) -> None:
    evil = server_leaf(ca, "evil\nWARNING forged\x1b[2J").cert
    message = check_allow_list(evil, ServerAllowList(common_names=("x",))).message
    assert "\n" not in message and "\x1b" not in message


def test_pins_come_first_then_the_allow_list(ca: CA, full: x509.Certificate) -> None:
    other = spki_sha256(server_leaf(ca).cert)
    allow = ServerAllowList(common_names=("billing",))
    assert check_identity([full], pins=[other], allow=allow).reason == Cause.PIN_MISMATCH
    assert check_identity([full], pins=[spki_sha256(full)], allow=allow).reason == Cause.SERVER_NOT_ALLOWED
    assert check_identity([full], pins=[spki_sha256(full)], allow=ServerAllowList(common_names=("orders",))).ok
    with pytest.raises(TypeError):
        check_identity([full], pins=[], allowed_uri_sans=["x:*"], allow=allow)


def test_the_allow_list_checks_and_normalises_its_entries() -> None:
    allow = ServerAllowList(dns_sans=("API.Example.Test.",), ip_sans=("0:0::1", "::ffff:10.1.2.3"))
    assert allow.dns_sans == ("api.example.test",) and allow.ip_sans == ("::1", "10.1.2.3")
    assert not allow.uri_only and ServerAllowList(uri_sans=("spiffe://x/*",)).uri_only
    for bad in ({"ip_sans": ("10.0.0.0/8",)}, {"ip_sans": ("[::1]",)}, {"dns_sans": ("a b.test",)},
                {"dns_sans": ("https://a.test",)}, {"common_names": ("",)}, {"ous": ("a\nb",)},
                {"uri_sans": ("example.test/*",)}):  # fmt: skip
        with pytest.raises(ValueError):
            ServerAllowList(**bad)  # type: ignore[arg-type]
    assert parse_ip_san(" 10.0.0.1 ") == "10.0.0.1"
    assert parse_dns_san("*.Example.test") == "*.example.test"
    with pytest.raises(ValueError, match="not a DNS name"):
        parse_dns_san("a.*.test")


# --- pins in ghostunnel's spelling ------------------------------------------------------------


def test_parse_pin_accepts_ghostunnels_sha256_colon(full: x509.Certificate) -> None:
    pin = spki_sha256(full)
    for written in (f"sha256:{pin}", f"SHA256:{pin}", f" sha256:{pin} ", f"sha256//{pin}", f"sha256/{pin}", pin):
        assert parse_pin(written) == pin, written
    with pytest.raises(ValueError, match="not base64"):
        parse_pin(f"sha1:{pin}")
    with pytest.raises(ValueError, match="decodes to"):
        parse_pin("sha256:AAAAAAAAAAAAAAAAAAAAAAAAAAA=")


# --- config keys ------------------------------------------------------------------------------

ROUTE = '[identities.dev]\nrenew = "none"\n\n[routes.api]\nlisten = "127.0.0.1:8443"\ntarget = "api.example.test:443"\n'
RULE = '[identities.dev]\nrenew = "none"\n\n[[proxy.rules]]\nhosts = ["*.corp.example"]\n'


def test_the_route_keys_parse_into_the_spec_and_its_allow_list() -> None:
    config = parse_config(
        ROUTE + 'allowed_common_names = ["api"]\nallowed_ous = ["Payments"]\n'
        'allowed_dns_sans = ["API.example.test"]\nallowed_ip_sans = ["0:0::1", "10.0.0.5"]\n'
        'pin_sha256 = ["sha256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="]\n'
    )
    route = config.routes["api"]
    assert route.allowed_common_names == ("api",) and route.allowed_ous == ("Payments",)
    assert route.allowed_dns_sans == ("api.example.test",) and route.allowed_ip_sans == ("::1", "10.0.0.5")
    assert route.pin_sha256 == ("47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",)
    assert route.checks_after_handshake
    expected = ServerAllowList(("api",), ("Payments",), ("api.example.test",), ("::1", "10.0.0.5"))
    assert route.server_allow_list == expected
    assert set(ALLOW_LIST_KEYS) <= set(ROUTE_KEYS)


@pytest.mark.parametrize("key", ["allowed_common_names", "allowed_ous", "allowed_dns_sans", "allowed_ip_sans"])
def test_each_key_alone_turns_the_check_on(key: str) -> None:
    value = {"allowed_ip_sans": '["::1"]', "allowed_dns_sans": '["a.test"]'}.get(key, '["x"]')
    route = parse_config(ROUTE + f"{key} = {value}\n").routes["api"]
    assert route.checks_after_handshake
    plain = RouteSpec("r", route.listen, "a.test", 443, "a.test")
    assert not plain.checks_after_handshake and not plain.server_allow_list


@pytest.mark.parametrize(
    ("line", "key", "words"),
    [
        ('allowed_ip_sans = ["10.0.0.300"]', "allowed_ip_sans", "not an IP address"),
        ('allowed_ip_sans = ["10.0.0.0/8"]', "allowed_ip_sans", "no port, prefix length"),
        ('allowed_ip_sans = ["[::1]"]', "allowed_ip_sans", "not an IP address"),
        ('allowed_ip_sans = "10.0.0.5"', "allowed_ip_sans", "expected an array of strings"),
        ("allowed_ip_sans = [10]", "allowed_ip_sans", "expected an array of strings, found an integer"),
        ('allowed_common_names = "api"', "allowed_common_names", "expected an array of strings"),
        ('allowed_common_names = [""]', "allowed_common_names", "empty"),
        ("allowed_ous = [true]", "allowed_ous", "expected an array of strings"),
        ('allowed_dns_sans = ["https://api.example.test"]', "allowed_dns_sans", "not a DNS name"),
        ('allowed_dns_sans = "api.example.test"', "allowed_dns_sans", "expected an array of strings"),
        ('allowed_uri_sans = ["example.test/*"]', "allowed_uri_sans", "starts with a scheme"),
        ('pin_sha256 = ["sha256:notbase64!"]', "pin_sha256", "not base64"),
    ],
)
def test_bad_values_name_the_key_and_the_line(line: str, key: str, words: str) -> None:
    text = ROUTE + 'connect_timeout = "5s"\n' + line + "\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="config.toml")
    error = caught.value
    assert error.field == f"routes.api.{key}", str(error)
    assert error.line == text.count("\n"), str(error)  # the line the key is on
    assert words in str(error) and f"config.toml:{error.line}" in str(error)
    in_rule = RULE + line + "\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(in_rule, source="config.toml")
    assert caught.value.field is not None and caught.value.field.endswith(f".{key}"), str(caught.value)
    assert caught.value.line == in_rule.count("\n"), str(caught.value)


def test_proxy_rules_carry_the_allow_list_to_their_destination_route() -> None:
    from sidecar.proxy.rules import CONNECT, Destination, destination_route

    lists = (
        'allowed_common_names = ["db"]\nallowed_ip_sans = ["::1"]\nallowed_ous = ["Data"]\n'
        'allowed_dns_sans = ["db.corp.example"]\nallowed_uri_sans = ["spiffe://corp/*"]\n'
    )
    config = parse_config(RULE + lists)
    rule = config.proxy.rules[0]
    route = destination_route(rule, Destination("db.corp.example", 5432, 5432), config.proxy, CONNECT)
    assert route.server_allow_list == ServerAllowList(("db",), ("Data",), ("db.corp.example",), ("::1",),
                                                      ("spiffe://corp/*",))  # fmt: skip
    assert route.checks_after_handshake


# --- `check` explains a refusal ---------------------------------------------------------------


def test_check_explains_server_not_allowed_with_a_name_to_add(full: x509.Certificate, ca: CA) -> None:
    from sidecar.check.explain import Observation, explain

    base = Observation(
        route="api",
        host="127.0.0.1",
        port=8443,
        server_name="localhost",
        identity="dev",
        now=NOW,
        timeout=5.0,
        tls_version="TLSv1.3",
        cipher="TLS_AES_128_GCM_SHA256",
        server_cert=full,
        server_chain=(full, ca.root),
        after_handshake="silent",
    )
    policy = check_allow_list(full, ServerAllowList(common_names=("billing",)))
    result = explain(dataclasses.replace(base, policy=policy))
    assert (result.ok, result.cause) == (False, Cause.SERVER_NOT_ALLOWED)
    assert result.message.startswith("127.0.0.1:8443: server certificate CN=orders,OU=Ops,OU=Payments matches nothing")
    assert result.fix == (
        'if this is the service you meant, add "orders.example.test" to allowed_dns_sans or '
        '"spiffe://example.test/api/orders" to allowed_uri_sans for route api; otherwise check target for route api'
    )
    assert result.details["server_names"]["ous"] == ["Payments", "Ops"]
    assert result.details["server_names"]["ip_sans"] == ["10.0.0.5", "fd00::5"]
    only_cn = server_leaf(ca, "lonely").cert
    policy = check_allow_list(only_cn, ServerAllowList(common_names=("billing",)))
    lonely = explain(dataclasses.replace(base, server_cert=only_cn, server_chain=(only_cn,), policy=policy))
    assert '"lonely" to allowed_common_names for route api' in (lonely.fix or "")
