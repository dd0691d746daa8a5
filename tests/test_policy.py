"""Server policy beyond names, as pure functions: pins, URI SAN patterns, OCSP and CRL judgement,
the decision per revocation mode, the answer cache (time injected), and the new config keys."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from sidecar.causes import Cause
from sidecar.config import parse_config
from sidecar.errors import ConfigError
from sidecar.policy import (
    PIN_HINT,
    ChainMemory,
    check_identity,
    check_pins,
    check_uri_sans,
    parse_pin,
    spki_sha256,
    uri_matches,
)
from sidecar.revocation import checker as revocation
from sidecar.revocation.checker import FetchError, RevocationChecker
from sidecar.revocation.judge import (
    DEFAULT_TTL,
    FAILURE_TTL,
    GOOD,
    MAX_TTL,
    REVOKED,
    UNKNOWN,
    Answer,
    AnswerCache,
    cache_until,
    decide,
    judge_crl,
    judge_ocsp,
)
from tests.pki import CA, Leaf, key_pem
from tests.revocation_fixtures import issue, make_crl, responder_leaf

# Runs anywhere: pure logic, or loopback sockets only (the macOS and Windows CI jobs run it).
pytestmark = pytest.mark.portable

NOW = datetime.now(UTC).replace(second=0, microsecond=0)  # test certificates are valid around now


def when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA("Unit Server CA", with_intermediate=True)


@pytest.fixture(scope="module")
def leaf(ca: CA) -> Leaf:
    return issue(ca, "api", uris=["spiffe://example.test/api/orders"], ocsp_url="http://ocsp.test/")


def chain_of(ca: CA, leaf: Leaf) -> list[x509.Certificate]:
    assert ca.intermediate is not None
    return [leaf.cert, ca.intermediate, ca.root]


# --- pins ---------------------------------------------------------------------------------


def test_spki_pin_is_what_the_documented_openssl_pipeline_prints(tmp_path: Path, leaf: Leaf) -> None:
    path = tmp_path / "server.pem"
    path.write_bytes(leaf.cert.public_bytes(serialization.Encoding.PEM))
    shell = PIN_HINT.replace("server.pem", str(path))
    printed = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, check=True).stdout.strip()
    assert printed == spki_sha256(leaf.cert)


def test_parse_pin_accepts_base64_and_curl_style_and_refuses_the_rest(leaf: Leaf) -> None:
    pin = spki_sha256(leaf.cert)
    assert parse_pin(pin) == pin
    assert parse_pin(f"sha256//{pin}") == pin
    assert parse_pin(f"  {pin} ") == pin
    with pytest.raises(ValueError, match="not base64"):
        parse_pin("not a pin!")
    with pytest.raises(ValueError, match="decodes to 20 bytes"):
        parse_pin("AAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    with pytest.raises(ValueError):
        parse_pin("é" * 44)


@pytest.mark.parametrize(
    ("pinned", "verified", "ok"),
    [
        ("leaf", True, True),
        ("intermediate", True, True),
        ("root", True, True),
        ("other", True, False),
        ("leaf", False, True),
        ("intermediate", False, False),  # an unverified chain may hold anything: only the leaf counts
    ],
)
def test_pins_match_any_certificate_of_the_verified_chain(
    ca: CA, leaf: Leaf, pinned: str, verified: bool, ok: bool
) -> None:
    other = issue(ca, "other")
    cert = {"leaf": leaf.cert, "intermediate": ca.intermediate, "root": ca.root, "other": other.cert}[pinned]
    assert cert is not None
    verdict = check_pins(chain_of(ca, leaf), [spki_sha256(cert)], verified=verified)
    assert verdict.ok is ok
    if not ok:
        assert verdict.reason == Cause.PIN_MISMATCH
        assert f"sha256/{spki_sha256(leaf.cert)}" in verdict.message
        assert "CN=api" in verdict.message and "not pinned" in verdict.message


def test_no_pins_pass_and_no_certificate_fails(ca: CA, leaf: Leaf) -> None:
    assert check_pins(chain_of(ca, leaf), []).ok
    assert check_pins([], [spki_sha256(leaf.cert)]).reason == Cause.PIN_MISMATCH


# --- URI SANs -----------------------------------------------------------------------------

URI_CASES = [
    ("spiffe://example.test/api/*", "spiffe://example.test/api/orders", True),
    ("spiffe://example.test/api/*", "spiffe://example.test/api/", True),  # * may match nothing
    ("spiffe://example.test/api/*", "spiffe://example.test/api/orders/v2", False),  # * stops at "/"
    ("spiffe://example.test/api/**", "spiffe://example.test/api/orders/v2", True),
    ("spiffe://example.test/**", "spiffe://example.test/api/orders", True),
    ("spiffe://*/api/orders", "spiffe://example.test/api/orders", True),
    ("spiffe://*/api/orders", "spiffe://a/b/api/orders", False),
    ("spiffe://example.test/api/orders", "spiffe://example.test/api/orders", True),
    ("spiffe://example.test/api/orders", "spiffe://example.test/api/orders2", False),  # whole URI
    ("spiffe://example.test/api/orders", "SPIFFE://example.test/api/orders", False),  # case-sensitive
    ("spiffe://example.test/a?c", "spiffe://example.test/abc", False),  # ? is literal
    ("spiffe://example.test/[ab]", "spiffe://example.test/a", False),  # [] are literal
    ("spiffe://example.test/a.c", "spiffe://example.test/abc", False),  # . is literal
    ("https://*.example.test/x", "https://api.example.test/x", True),
]


@pytest.mark.parametrize(("pattern", "uri", "expected"), URI_CASES)
def test_uri_glob(pattern: str, uri: str, expected: bool) -> None:
    assert uri_matches(pattern, uri) is expected


def test_uri_san_verdicts(ca: CA, leaf: Leaf) -> None:
    assert check_uri_sans(leaf.cert, []).ok
    assert check_uri_sans(leaf.cert, ["spiffe://other.test/**", "spiffe://example.test/api/*"]).ok
    refused = check_uri_sans(leaf.cert, ["spiffe://example.test/db/*"])
    assert refused.reason == Cause.URI_SAN_NOT_ALLOWED
    assert "spiffe://example.test/api/orders" in refused.message and "spiffe://example.test/db/*" in refused.message
    bare = check_uri_sans(issue(ca, "bare").cert, ["spiffe://example.test/**"])
    assert bare.reason == Cause.URI_SAN_NOT_ALLOWED and "holds no URI SAN" in bare.message
    assert check_uri_sans(None, ["spiffe://x/*"]).reason == Cause.URI_SAN_NOT_ALLOWED


def test_check_identity_pins_first_then_uri_sans(ca: CA, leaf: Leaf) -> None:
    chain = chain_of(ca, leaf)
    other = spki_sha256(issue(ca, "o").cert)
    assert check_identity(chain, pins=[other], allowed_uri_sans=["x:*"]).reason == Cause.PIN_MISMATCH
    ok_pin = [spki_sha256(ca.root)]
    assert check_identity(chain, pins=ok_pin, allowed_uri_sans=["x:*"]).reason == Cause.URI_SAN_NOT_ALLOWED
    assert check_identity(chain, pins=ok_pin, allowed_uri_sans=["spiffe://example.test/api/*"]).ok


def test_chain_memory_only_reuses_a_chain_under_the_same_trust(ca: CA, leaf: Leaf) -> None:
    memory = ChainMemory(size=2)
    memory.remember("trust-a", chain_of(ca, leaf))
    memory.remember("trust-a", [leaf.cert])  # a leaf alone teaches nothing
    assert memory.recall("trust-a", leaf.cert) == chain_of(ca, leaf)
    assert memory.recall("trust-b", leaf.cert) is None
    for n in range(2):
        other = issue(ca, f"other-{n}")
        memory.remember("trust-a", [other.cert, ca.root])
    assert memory.recall("trust-a", leaf.cert) is None  # evicted, oldest first


# --- OCSP ---------------------------------------------------------------------------------


def ocsp_response(
    ca: CA,
    cert: x509.Certificate,
    *,
    status: ocsp.OCSPCertStatus = ocsp.OCSPCertStatus.GOOD,
    signer: Leaf | None = None,
    by_key: bool = False,
    this_update: datetime = NOW - timedelta(hours=1),
    next_update: datetime | None = NOW + timedelta(hours=1),
    serial_of: x509.Certificate | None = None,
    include: bool = True,
) -> bytes:
    """An OCSP response built with cryptography: signed by the issuer, or by `signer`."""
    revoked_at = NOW - timedelta(days=1) if status == ocsp.OCSPCertStatus.REVOKED else None
    reason = x509.ReasonFlags.key_compromise if revoked_at else None
    builder = ocsp.OCSPResponseBuilder().add_response(
        cert=serial_of or cert,
        issuer=ca.signing_cert,
        algorithm=hashes.SHA1(),
        cert_status=status,
        this_update=this_update,
        next_update=next_update,
        revocation_time=revoked_at,
        revocation_reason=reason,
    )
    encoding = ocsp.OCSPResponderEncoding.HASH if by_key else ocsp.OCSPResponderEncoding.NAME
    if signer is None:
        builder = builder.responder_id(encoding, ca.signing_cert)
        signing_key = ca.signing_key
    else:
        builder = builder.responder_id(encoding, signer.cert)
        if include:
            builder = builder.certificates([signer.cert])
        signing_key = signer.key
    return builder.sign(signing_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def judge(ca: CA, leaf: Leaf, data: bytes, now: datetime = NOW) -> Answer:
    assert ca.intermediate is not None
    return judge_ocsp(data, leaf.cert, ca.intermediate, now, source="OCSP http://ocsp.test/")


def test_ocsp_good_revoked_and_unknown(ca: CA, leaf: Leaf) -> None:
    good = judge(ca, leaf, ocsp_response(ca, leaf.cert))
    assert (good.status, good.next_update) == (GOOD, NOW + timedelta(hours=1))
    revoked = judge(ca, leaf, ocsp_response(ca, leaf.cert, status=ocsp.OCSPCertStatus.REVOKED))
    assert revoked.status == REVOKED
    assert revoked.detail == f"revoked on {when(NOW - timedelta(days=1))}, reason keyCompromise"
    unknown = judge(ca, leaf, ocsp_response(ca, leaf.cert, status=ocsp.OCSPCertStatus.UNKNOWN))
    assert (unknown.status, unknown.detail) == (UNKNOWN, "the responder does not know this certificate")


def test_ocsp_signers_issuer_by_name_or_key_and_delegated(ca: CA, leaf: Leaf) -> None:
    assert judge(ca, leaf, ocsp_response(ca, leaf.cert, by_key=True)).status == GOOD
    delegated = responder_leaf(ca)
    assert judge(ca, leaf, ocsp_response(ca, leaf.cert, signer=delegated)).status == GOOD
    assert judge(ca, leaf, ocsp_response(ca, leaf.cert, signer=delegated, by_key=True)).status == GOOD


@pytest.mark.parametrize(
    ("case", "detail"),
    [
        ("forged", "signature does not verify"),
        ("nobody", "signed by neither the issuer nor a responder it authorised"),
        ("no_eku", "lacks extendedKeyUsage OCSPSigning"),
        ("other_ca_responder", "not issued by the server certificate's issuer"),
        ("stale", f"stale (its nextUpdate was {when(NOW - timedelta(hours=1))})"),
        ("future", "dated in the future"),
        ("other_serial", "about another certificate"),
        ("unauthorized", "the responder answered unauthorized"),
        ("garbage", "not an OCSP response"),
    ],
)
def test_ocsp_answers_that_prove_nothing_are_unknown(ca: CA, leaf: Leaf, case: str, detail: str) -> None:
    stranger_ca = CA("Stranger", with_intermediate=True)
    if case == "forged":  # names the issuer as responder (by name), signed with another key
        twin = CA(ca.signing_cert.subject.rfc4514_string().removeprefix("CN="))
        data = ocsp_response(ca, leaf.cert, signer=Leaf(twin.root, twin.root_key), include=False)
    elif case == "nobody":  # names a responder whose certificate it does not carry
        data = ocsp_response(ca, leaf.cert, signer=stranger_ca.server("x"), include=False)
    elif case == "no_eku":
        data = ocsp_response(ca, leaf.cert, signer=issue(ca, "not-a-responder"))
    elif case == "other_ca_responder":
        impostor = responder_leaf(stranger_ca)
        # same subject as a real delegated responder, issued by another CA
        data = ocsp_response(ca, leaf.cert, signer=impostor)
    elif case == "stale":
        data = ocsp_response(ca, leaf.cert, this_update=NOW - timedelta(days=1), next_update=NOW - timedelta(hours=1))
    elif case == "future":
        data = ocsp_response(ca, leaf.cert, this_update=NOW + timedelta(hours=1), next_update=NOW + timedelta(days=1))
    elif case == "other_serial":
        data = ocsp_response(ca, leaf.cert, serial_of=issue(ca, "someone-else").cert)
    elif case == "unauthorized":
        data = ocsp.OCSPResponseBuilder.build_unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED).public_bytes(
            serialization.Encoding.DER
        )
    else:
        data = b"<html>proxy login</html>"
    answer = judge(ca, leaf, data)
    assert answer.status == UNKNOWN
    assert detail in answer.detail


def test_ocsp_request_is_parseable_and_names_the_certificate(ca: CA, leaf: Leaf) -> None:
    assert ca.intermediate is not None
    request = ocsp.load_der_ocsp_request(revocation.ocsp_request(leaf.cert, ca.intermediate))
    assert request.serial_number == leaf.cert.serial_number


# --- CRL ----------------------------------------------------------------------------------


def test_crl_good_revoked_and_unusable(ca: CA, leaf: Leaf) -> None:
    assert ca.intermediate is not None
    issuer = ca.intermediate
    now = datetime.now(UTC)

    def crl_answer(data: bytes, at: datetime = now) -> Answer:
        return judge_crl(revocation.load_crls(data), leaf.cert, issuer, at, source="CRL file x")

    good = crl_answer(make_crl(ca, [issue(ca, "someone").cert]))
    assert good.status == GOOD and good.next_update is not None
    revoked = crl_answer(make_crl(ca, [leaf.cert], encoding=serialization.Encoding.DER))
    assert revoked.status == REVOKED and "keyCompromise" in revoked.detail
    forged = crl_answer(make_crl(ca, [], signer=ec.generate_private_key(ec.SECP256R1())))
    assert (forged.status, forged.detail) == (UNKNOWN, "the CRL's signature does not verify with the issuer's key")
    stale = crl_answer(make_crl(ca, []), at=now + timedelta(days=2))
    assert stale.status == UNKNOWN and "stale" in stale.detail
    other = crl_answer(make_crl(CA("Other CA"), [leaf.cert]))
    assert other.status == UNKNOWN and "holds no CRL from CN=Unit Server CA Intermediate" in other.detail
    # a PEM file may hold several CRLs: the issuer's one counts
    both = crl_answer(make_crl(CA("Other CA"), []) + make_crl(ca, [leaf.cert]))
    assert both.status == REVOKED
    with pytest.raises(ValueError):
        revocation.load_crls(b"not a crl")


# --- the decision -------------------------------------------------------------------------


def test_decide_per_mode(leaf: Leaf) -> None:
    good = Answer(GOOD, "OCSP u", "good")
    revoked = Answer(REVOKED, "CRL file f", "revoked on X")
    down = Answer(UNKNOWN, "OCSP u", "the responder is unreachable: connection refused")
    for mode in ("soft", "hard"):
        assert decide(mode, leaf.cert, [down, revoked]).reason == Cause.SERVER_CERT_REVOKED
        assert decide(mode, leaf.cert, [down, good]) == decide(mode, leaf.cert, [good])
        assert decide(mode, leaf.cert, [good]).ok and decide(mode, leaf.cert, [good]).warning is None
    hard = decide("hard", leaf.cert, [down])
    assert hard.reason == Cause.REVOCATION_UNKNOWN
    assert "connection refused" in hard.message and 'revocation = "hard"' in hard.message
    soft = decide("soft", leaf.cert, [down])
    assert soft.ok and soft.warning is not None and "connection refused" in soft.warning
    assert f"serial {leaf.cert.serial_number:x}" in soft.warning


# --- the cache ----------------------------------------------------------------------------


def test_cache_keeps_answers_until_next_update_and_failures_briefly() -> None:
    cache = AnswerCache()
    soon = Answer(GOOD, "s", next_update=NOW + timedelta(hours=2))
    cache.put("k", soon, NOW)
    assert cache.get("k", NOW + timedelta(hours=2) - timedelta(seconds=1)) is soon
    assert cache.get("k", NOW + timedelta(hours=2)) is None
    assert len(cache) == 0
    assert cache_until(Answer(GOOD, "s"), NOW) == NOW + DEFAULT_TTL
    assert cache_until(Answer(REVOKED, "s", next_update=NOW + timedelta(days=90)), NOW) == NOW + MAX_TTL
    assert cache_until(Answer(UNKNOWN, "s", next_update=NOW + timedelta(days=1)), NOW) == NOW + FAILURE_TTL
    small = AnswerCache(size=2)
    for n in range(3):
        small.put(n, soon, NOW)
    assert small.get(0, NOW) is None and small.get(2, NOW) is soon


class FakeFetch:
    """Answers by URL from a table; counts calls; can be told to fail or to wait."""

    def __init__(self, table: dict[str, bytes | Exception]) -> None:
        self.table = table
        self.calls: list[str] = []
        self.gate: threading.Event | None = None

    def __call__(self, url: str, body: bytes | None, timeout: float, limit: int) -> bytes:
        self.calls.append(url)
        if self.gate is not None:
            self.gate.wait(5)
        answer = self.table[url]
        if isinstance(answer, Exception):
            raise answer
        return answer


def run_check(
    checker: RevocationChecker,
    chain: Sequence[x509.Certificate],
    mode: str = "hard",
    now: datetime = NOW,
    crl_file: Path | None = None,
) -> revocation.Verdict:
    return asyncio.run(checker.check(chain, mode=mode, crl_file=crl_file, now=now, timeout=1.0))


def test_checker_asks_once_until_next_update(ca: CA, leaf: Leaf) -> None:
    fetch = FakeFetch({"http://ocsp.test/": ocsp_response(ca, leaf.cert)})
    checker = RevocationChecker(fetch)
    chain = chain_of(ca, leaf)
    assert run_check(checker, chain).ok
    assert run_check(checker, chain, now=NOW + timedelta(minutes=59)).ok
    assert len(fetch.calls) == 1
    # past nextUpdate (NOW + 1 h) the cached answer is gone; the responder now says revoked
    fetch.table["http://ocsp.test/"] = ocsp_response(
        ca, leaf.cert, status=ocsp.OCSPCertStatus.REVOKED, next_update=NOW + timedelta(hours=3)
    )
    verdict = run_check(checker, chain, now=NOW + timedelta(hours=1))
    assert verdict.reason == Cause.SERVER_CERT_REVOKED and "OCSP http://ocsp.test/" in verdict.message
    assert len(fetch.calls) == 2


def test_checker_unreachable_responder_is_retried_after_the_failure_ttl(ca: CA, leaf: Leaf) -> None:
    fetch = FakeFetch({"http://ocsp.test/": FetchError("unreachable: connection refused")})
    checker = RevocationChecker(fetch)
    chain = chain_of(ca, leaf)
    soft = run_check(checker, chain, mode="soft")
    assert soft.ok and soft.warning and "the responder is unreachable: connection refused" in soft.warning
    assert run_check(checker, chain, mode="hard", now=NOW + FAILURE_TTL / 2).reason == Cause.REVOCATION_UNKNOWN
    assert len(fetch.calls) == 1
    fetch.table["http://ocsp.test/"] = ocsp_response(ca, leaf.cert)
    assert run_check(checker, chain, now=NOW + FAILURE_TTL).ok
    assert len(fetch.calls) == 2


def test_concurrent_connections_share_one_request(ca: CA, leaf: Leaf) -> None:
    fetch = FakeFetch({"http://ocsp.test/": ocsp_response(ca, leaf.cert)})
    fetch.gate = threading.Event()
    checker = RevocationChecker(fetch)
    chain = chain_of(ca, leaf)

    async def many() -> list[revocation.Verdict]:
        tasks = [asyncio.create_task(checker.check(chain, mode="hard", crl_file=None, now=NOW)) for _ in range(5)]
        await asyncio.sleep(0)  # let every task reach the in-flight request before it is answered
        assert fetch.gate is not None
        fetch.gate.set()
        return await asyncio.gather(*tasks)

    assert all(v.ok for v in asyncio.run(many()))
    assert len(fetch.calls) == 1


def test_a_caller_that_goes_away_cancels_nobody_else(ca: CA, leaf: Leaf) -> None:
    """A local client hanging up mid-check cancels its own wait, not the shared request."""
    fetch = FakeFetch({"http://ocsp.test/": ocsp_response(ca, leaf.cert)})
    fetch.gate = threading.Event()
    checker = RevocationChecker(fetch)
    chain = chain_of(ca, leaf)

    async def scenario() -> revocation.Verdict:
        first = asyncio.create_task(checker.check(chain, mode="hard", crl_file=None, now=NOW))
        second = asyncio.create_task(checker.check(chain, mode="hard", crl_file=None, now=NOW))
        await asyncio.sleep(0)  # a yield, not a wait: both tasks reach the shared request
        first.cancel()
        assert fetch.gate is not None
        fetch.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await first
        return await second

    assert asyncio.run(scenario()).ok
    assert len(fetch.calls) == 1 and len(checker.ocsp_cache) == 1


def test_checker_sources_in_order(tmp_path: Path, ca: CA) -> None:
    url_ocsp, url_crl = "http://ocsp.test/", "http://crl.test/ca.crl"
    both = issue(ca, "both", ocsp_url=url_ocsp, crl_url=url_crl)
    chain = chain_of(ca, both)
    # crl_file answers: OCSP is not asked
    crl_file = tmp_path / "ca.crl"
    crl_file.write_bytes(make_crl(ca, [both.cert]))
    fetch = FakeFetch({url_ocsp: FetchError("unreachable: connection refused"), url_crl: make_crl(ca, [])})
    checker = RevocationChecker(fetch)
    now = datetime.now(UTC)
    assert run_check(checker, chain, now=now, crl_file=crl_file).reason == Cause.SERVER_CERT_REVOKED
    assert fetch.calls == []
    # OCSP unreachable: the distribution point answers
    assert run_check(checker, chain, now=now).ok
    assert fetch.calls == [url_ocsp, url_crl]
    # a changed crl_file is read again (size and mtime)
    crl_file.write_bytes(make_crl(ca, []) + b"\n")
    assert run_check(checker, chain, now=now, crl_file=crl_file).ok


def test_checker_without_any_source_or_issuer(ca: CA) -> None:
    bare = issue(ca, "bare")
    checker = RevocationChecker(FakeFetch({}))
    verdict = run_check(checker, chain_of(ca, bare))
    assert verdict.reason == Cause.REVOCATION_UNKNOWN and "no OCSP responder" in verdict.message
    orphan = run_check(checker, [bare.cert], mode="hard")
    assert orphan.reason == Cause.REVOCATION_UNKNOWN and "issuer is not in its verified chain" in orphan.message
    assert run_check(checker, [bare.cert], mode="off").ok
    missing = run_check(checker, chain_of(ca, bare), crl_file=Path("/nonexistent/ca.crl"))
    assert "cannot read it: no such file or directory" in missing.message


def test_http_fetch_words_for_a_closed_port() -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(FetchError, match="unreachable: connection refused"):
        revocation.http_fetch(f"http://127.0.0.1:{port}/", b"x", 2.0, 100)


# --- config -------------------------------------------------------------------------------

ROUTE = """\
[identities.dev]

[routes.api]
listen = "127.0.0.1:8443"
target = "api.example.test:443"
"""


def test_config_reads_the_policy_keys(tmp_path: Path, leaf: Leaf) -> None:
    pin = spki_sha256(leaf.cert)
    text = ROUTE + (
        f'pin_sha256 = ["{pin}", "sha256//{pin}"]\n'
        'allowed_uri_sans = ["spiffe://example.test/api/*"]\n'
        'revocation = "soft"\n'
        'crl_file = "ca.crl"\n'
    )
    route = parse_config(text, base_dir=tmp_path).routes["api"]
    assert route.pin_sha256 == (pin, pin)
    assert route.allowed_uri_sans == ("spiffe://example.test/api/*",)
    assert (route.revocation, route.crl_file) == ("soft", tmp_path / "ca.crl")
    assert route.checks_after_handshake
    plain = parse_config(ROUTE).routes["api"]
    assert (plain.pin_sha256, plain.allowed_uri_sans, plain.revocation, plain.crl_file) == ((), (), "off", None)
    assert not plain.checks_after_handshake


BAD_POLICY = [
    (
        'pin_sha256 = "abc"',
        "routes.api.pin_sha256 = 'abc': expected an array of strings such as [\"Base64SHA256OfTheServerKey=\"], "
        "got a string",
    ),
    ("pin_sha256 = [1]", "routes.api.pin_sha256 = 1: expected an array of strings, found an integer"),
    (
        'pin_sha256 = ["abc"]',
        "routes.api.pin_sha256 = 'abc': not a SHA-256 SPKI pin (not base64): a pin is 44 characters of base64 "
        "(get one from the server certificate with: openssl x509",
    ),
    (
        'pin_sha256 = ["AAAA"]',
        "routes.api.pin_sha256 = 'AAAA': not a SHA-256 SPKI pin (decodes to 3 bytes, a SHA-256 digest has 32)",
    ),
    (
        'allowed_uri_sans = ["example.test/api/*"]',
        "routes.api.allowed_uri_sans = 'example.test/api/*': a URI pattern starts with a scheme, such as "
        'spiffe:// or https:// (for example "spiffe://example.test/api/*"',
    ),
    (
        'allowed_uri_sans = ["spiffe://example.test/a b"]',
        "routes.api.allowed_uri_sans = 'spiffe://example.test/a b': a URI pattern has no blanks",
    ),
    (
        'revocation = "strict"',
        "routes.api.revocation = 'strict': unknown revocation mode (use one of: off, soft, hard)",
    ),
    ("revocation = true", "routes.api.revocation = True: expected a string, got a boolean"),
    (
        'crl_file = "ca.crl"',
        "routes.api.crl_file = 'ca.crl': crl_file is only read when revocation checking is on "
        '(add revocation = "soft" or revocation = "hard" to this route)',
    ),
    ('revocation = "hard"\ncrl_file = 3', "routes.api.crl_file = 3: expected a string, got an integer"),
    ('revoction = "hard"', 'routes.api.revoction: unknown key (did you mean "revocation"?)'),
]


@pytest.mark.parametrize(("line", "message"), BAD_POLICY, ids=[b[0] for b in BAD_POLICY])
def test_config_errors_for_the_policy_keys(line: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(ROUTE + line + "\n", source="config.toml")
    text = str(caught.value)
    assert text.startswith(f"config.toml:{6 + line.count(chr(10))}: "), text
    assert message in text, text


def test_default_config_documents_the_policy_keys() -> None:
    from sidecar.config import default_config_text

    text = default_config_text(user="dev", ca_file=Path("/ca.pem"), route_port=1, demo_port=2)
    for key in ("pin_sha256", "allowed_uri_sans", "revocation", "crl_file"):
        assert f"# {key} = " in text


def test_private_keys_stay_out_of_policy_messages(ca: CA, leaf: Leaf) -> None:
    """Verdicts name certificates, keys' public hashes and sources; never private key material."""
    secret = key_pem(leaf.key).decode()
    body = secret.split("\n")[1]
    texts = [
        check_pins(chain_of(ca, leaf), [spki_sha256(ca.root)], verified=False).message,
        check_uri_sans(leaf.cert, ["x:*"]).message,
        decide("soft", leaf.cert, [Answer(UNKNOWN, "OCSP u", "down")]).warning or "",
    ]
    assert all(body not in t for t in texts)


# --- `check ROUTE` explains a policy verdict (pure) ---------------------------------------


def test_explain_policy_verdicts_in_one_line(ca: CA, leaf: Leaf) -> None:
    from sidecar.check.explain import Observation, explain
    from sidecar.policy import Verdict

    base = Observation(
        route="api",
        host="api.example.test",
        port=443,
        server_name="api.example.test",
        identity="dev",
        now=NOW,
        timeout=5.0,
        client_cert=leaf.cert,
        tls_version="TLSv1.3",
        cipher="TLS_AES_128_GCM_SHA256",
        server_cert=leaf.cert,
        server_chain=tuple(chain_of(ca, leaf)),
        after_handshake="silent",
    )
    cases = {
        Cause.PIN_MISMATCH: f"sha256/{spki_sha256(leaf.cert)}",
        Cause.URI_SAN_NOT_ALLOWED: "spiffe://example.test/api/orders",
        Cause.SERVER_CERT_REVOKED: "nothing to change on this side",
        Cause.REVOCATION_UNKNOWN: 'revocation = "soft"',
    }
    for reason, in_fix in cases.items():
        result = explain(dataclasses.replace(base, policy=Verdict.refused(reason, "it said no")))
        assert (result.ok, result.cause) == (False, reason)
        assert result.message == "api.example.test:443: it said no"
        assert in_fix in (result.fix or ""), (reason, result.fix)
    warned = explain(dataclasses.replace(base, policy=Verdict.passed(warning="revocation status … unknown")))
    assert warned.ok and warned.details["warnings"] == ["revocation status … unknown"]
