"""Is the server's certificate revoked? The pure half: bytes, certificates and `now` in, answers out.

`judge_ocsp` checks that an OCSP response is about our certificate, is signed by its issuer
or by a responder the issuer delegated (extendedKeyUsage OCSPSigning), and is current;
`judge_crl` checks a CRL's issuer, signature and nextUpdate. Each returns an `Answer`
("good", "revoked" or "unknown", with plain words). `decide` turns the answers and the
route's mode into a `Verdict`; `AnswerCache` and `cache_until` say how long an answer holds.
`sidecar.revocation.checker` does the fetching.

Only the leaf is checked; intermediates, delta CRLs, indirect CRLs and OCSP stapling are not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

from sidecar.causes import Cause, quoted
from sidecar.policy import Verdict

GOOD, REVOKED, UNKNOWN = "good", "revoked", "unknown"
DEFAULT_TTL = timedelta(minutes=5)  # an answer without nextUpdate
MAX_TTL = timedelta(days=7)  # a nextUpdate further away than this is re-asked sooner
FAILURE_TTL = timedelta(seconds=15)  # an unreachable responder is not asked again for this long
CLOCK_SKEW = timedelta(minutes=5)
FETCH_TIMEOUT = 5.0
MAX_OCSP_BYTES = 1 << 20
MAX_CRL_BYTES = 32 << 20

T = TypeVar("T")


@dataclass(frozen=True)
class Answer:
    """One source's answer about one certificate."""

    status: str  # GOOD, REVOKED or UNKNOWN
    source: str  # "OCSP http://…", "CRL file /…", "CRL http://…"; "" when no source was asked
    detail: str = ""  # plain words: why unknown, or when and why revoked
    next_update: datetime | None = None

    def __post_init__(self) -> None:  # a URL from the certificate, a responder's words: quoted for the log
        object.__setattr__(self, "source", quoted(self.source))
        object.__setattr__(self, "detail", quoted(self.detail))

    @property
    def definite(self) -> bool:
        return self.status in (GOOD, REVOKED)


# --- where to ask ------------------------------------------------------------------------


def ocsp_urls(cert: x509.Certificate) -> list[str]:
    """HTTP(S) OCSP responder URLs from the certificate's Authority Information Access."""
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    return [
        d.access_location.value
        for d in aia
        if d.access_method == AuthorityInformationAccessOID.OCSP
        and isinstance(d.access_location, x509.UniformResourceIdentifier)
        and d.access_location.value.lower().startswith(("http://", "https://"))
    ]


def crl_urls(cert: x509.Certificate) -> list[str]:
    """HTTP(S) URLs from the certificate's CRL distribution points (LDAP ones are skipped)."""
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    return [
        name.value
        for point in points
        for name in point.full_name or ()
        if isinstance(name, x509.UniformResourceIdentifier) and name.value.lower().startswith(("http://", "https://"))
    ]


def find_issuer(leaf: x509.Certificate, chain: Sequence[x509.Certificate]) -> x509.Certificate | None:
    """The certificate in `chain` that signed `leaf`, if any."""
    for cand in chain:
        if cand.subject != leaf.issuer or cand == leaf:
            continue
        try:
            leaf.verify_directly_issued_by(cand)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return cand
    return None


# --- OCSP (pure) -------------------------------------------------------------------------


def ocsp_request(cert: x509.Certificate, issuer: x509.Certificate) -> bytes:
    """A DER OCSP request for `cert` (SHA-1 CertID, what every responder understands)."""
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())
    return builder.build().public_bytes(serialization.Encoding.DER)


def _key_hash(cert: x509.Certificate) -> bytes:
    """SHA-1 of the certificate's public key bits (an OCSP ResponderID byKey)."""
    request = ocsp.OCSPRequestBuilder().add_certificate(cert, cert, hashes.SHA1()).build()
    return request.issuer_key_hash


def _same_cert_id(single: ocsp.OCSPSingleResponse, cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if single.serial_number != cert.serial_number:
        return False
    try:
        ours = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, single.hash_algorithm).build()
    except (ValueError, TypeError):
        return False
    return single.issuer_name_hash == ours.issuer_name_hash and single.issuer_key_hash == ours.issuer_key_hash


def judge_ocsp(data: bytes, cert: x509.Certificate, issuer: x509.Certificate, now: datetime, *, source: str) -> Answer:
    """What an OCSP response says about `cert`, after checking who signed it and when."""

    def unknown(detail: str) -> Answer:
        return Answer(UNKNOWN, source, detail)

    try:
        resp = ocsp.load_der_ocsp_response(data)
    except ValueError:
        return unknown("the answer is not an OCSP response")
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return unknown(f"the responder answered {resp.response_status.name.lower()}")
    try:
        single = next((s for s in resp.responses if _same_cert_id(s, cert, issuer)), None)
    except ValueError:
        return unknown("the OCSP response cannot be read")
    if single is None:
        return unknown("the OCSP response is about another certificate")
    problem = _ocsp_signature_problem(resp, issuer, now)
    if problem:
        return unknown(problem)
    if single.this_update_utc > now + CLOCK_SKEW:
        return unknown(f"the OCSP response is dated in the future ({_when(single.this_update_utc)})")
    next_update = single.next_update_utc
    if next_update is not None and next_update < now - CLOCK_SKEW:
        return unknown(f"the OCSP response is stale (its nextUpdate was {_when(next_update)})")
    status = single.certificate_status
    if status == ocsp.OCSPCertStatus.GOOD:
        return Answer(GOOD, source, "good", next_update)
    if status == ocsp.OCSPCertStatus.REVOKED:
        when = single.revocation_time_utc
        reason = single.revocation_reason
        return Answer(REVOKED, source, _revoked_words(when, reason), next_update)
    return Answer(UNKNOWN, source, "the responder does not know this certificate", next_update)


def _ocsp_signature_problem(resp: ocsp.OCSPResponse, issuer: x509.Certificate, now: datetime) -> str | None:
    """None when the issuer, or a responder it delegated, signed `resp`; else why not."""
    signer: x509.Certificate | None = None
    if _is_responder(resp, issuer):
        signer = issuer
    else:
        for cand in resp.certificates:
            if not _is_responder(resp, cand):
                continue
            try:
                cand.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature):
                return "the OCSP responder's certificate is not issued by the server certificate's issuer"
            try:
                usages = cand.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            except (x509.ExtensionNotFound, ValueError):
                usages = x509.ExtendedKeyUsage([])
            if ExtendedKeyUsageOID.OCSP_SIGNING not in usages:
                return "the OCSP responder's certificate lacks extendedKeyUsage OCSPSigning"
            if not cand.not_valid_before_utc - CLOCK_SKEW <= now <= cand.not_valid_after_utc + CLOCK_SKEW:
                return "the OCSP responder's certificate is not valid now"
            signer = cand
            break
    if signer is None:
        return "the OCSP response is signed by neither the issuer nor a responder it authorised"
    if resp.signature_hash_algorithm is None and not isinstance(
        signer.public_key(), ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
    ):
        return "the OCSP response's signature algorithm is not supported"
    if not verify_signature(
        signer.public_key(), resp.signature, resp.tbs_response_bytes, resp.signature_hash_algorithm
    ):
        return "the OCSP response's signature does not verify"
    return None


def _is_responder(resp: ocsp.OCSPResponse, cert: x509.Certificate) -> bool:
    if resp.responder_name is not None:
        return resp.responder_name == cert.subject
    return resp.responder_key_hash == _key_hash(cert)


def verify_signature(key: object, signature: bytes, data: bytes, algorithm: hashes.HashAlgorithm | None) -> bool:
    """True when `signature` over `data` verifies with `key` (RSA PKCS#1 v1.5, ECDSA, DSA, EdDSA)."""
    try:
        if isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
            key.verify(signature, data, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
            key.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(key, dsa.DSAPublicKey) and algorithm is not None:
            key.verify(signature, data, algorithm)
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(signature, data)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


# --- CRL (pure) --------------------------------------------------------------------------


def load_crls(data: bytes) -> list[x509.CertificateRevocationList]:
    """Every CRL in `data`: one DER CRL, or any number of PEM ones. ValueError if none."""
    if b"-----BEGIN X509 CRL-----" in data:
        crls = []
        for block in data.split(b"-----BEGIN X509 CRL-----")[1:]:
            body = block.split(b"-----END X509 CRL-----", 1)[0]
            crls.append(x509.load_pem_x509_crl(b"-----BEGIN X509 CRL-----" + body + b"-----END X509 CRL-----\n"))
        return crls
    return [x509.load_der_x509_crl(data)]


def judge_crl(
    crls: Sequence[x509.CertificateRevocationList],
    cert: x509.Certificate,
    issuer: x509.Certificate,
    now: datetime,
    *,
    source: str,
) -> Answer:
    """What the CRLs say about `cert`: only a current CRL signed by its issuer counts."""
    theirs = [c for c in crls if c.issuer == issuer.subject]
    if not theirs:
        return Answer(UNKNOWN, source, f"it holds no CRL from {issuer.subject.rfc4514_string()}")
    signed = [c for c in theirs if _crl_signed_by(c, issuer)]
    if not signed:
        return Answer(UNKNOWN, source, "the CRL's signature does not verify with the issuer's key")
    crl = max(signed, key=lambda c: c.last_update_utc)
    if crl.last_update_utc > now + CLOCK_SKEW:
        return Answer(UNKNOWN, source, f"the CRL is dated in the future ({_when(crl.last_update_utc)})")
    next_update = crl.next_update_utc
    if next_update is not None and next_update < now - CLOCK_SKEW:
        return Answer(UNKNOWN, source, f"the CRL is stale (its nextUpdate was {_when(next_update)})")
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    if entry is None:
        return Answer(GOOD, source, "not listed", next_update)
    try:
        reason: x509.ReasonFlags | None = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except (x509.ExtensionNotFound, ValueError):
        reason = None
    return Answer(REVOKED, source, _revoked_words(entry.revocation_date_utc, reason), next_update)


def _crl_signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


# --- the decision (pure) -----------------------------------------------------------------


def decide(mode: str, leaf: x509.Certificate, answers: Sequence[Answer]) -> Verdict:
    """The route's verdict: revoked refuses; good passes; unknown refuses when "hard", warns when "soft"."""
    who = f"server certificate {leaf.subject.rfc4514_string() or '(empty subject)'} (serial {leaf.serial_number:x})"
    for answer in answers:
        if answer.status == REVOKED:
            return Verdict.refused(
                Cause.SERVER_CERT_REVOKED, f"{who} is revoked: {answer.detail} (according to {answer.source})"
            )
    if any(a.status == GOOD for a in answers):
        return Verdict.passed()
    why = "; ".join(f"{a.source}: {a.detail}" if a.source else a.detail for a in answers) or "nowhere to ask"
    if mode == "hard":
        return Verdict.refused(
            Cause.REVOCATION_UNKNOWN,
            f'cannot tell whether {who} is revoked ({why}); revocation = "hard" refuses it',
        )
    return Verdict.passed(warning=f'revocation status of {who} is unknown ({why}); allowed because revocation = "soft"')


def _revoked_words(when: datetime | None, reason: x509.ReasonFlags | None) -> str:
    words = f"revoked on {_when(when)}" if when else "revoked"
    if reason is not None and reason != x509.ReasonFlags.unspecified:
        words += f", reason {reason.value}"
    return words


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


# --- the cache (pure: takes `now`) -------------------------------------------------------


def cache_until(answer: Answer, now: datetime) -> datetime:
    """How long an answer may be reused."""
    if not answer.definite:
        return now + FAILURE_TTL
    if answer.next_update is None:
        return now + DEFAULT_TTL
    return max(now, min(answer.next_update, now + MAX_TTL))


class AnswerCache:
    """Answers per key until their nextUpdate (capped at MAX_TTL), DEFAULT_TTL without one;
    answers that are not definite for FAILURE_TTL."""

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._items: dict[object, tuple[Answer, datetime]] = {}

    def put(self, key: object, answer: Answer, now: datetime) -> None:
        self._items.pop(key, None)
        self._items[key] = (answer, cache_until(answer, now))
        while len(self._items) > self._size:
            self._items.pop(next(iter(self._items)))

    def get(self, key: object, now: datetime) -> Answer | None:
        item = self._items.get(key)
        if item is None:
            return None
        answer, expires = item
        if now >= expires:
            del self._items[key]
            return None
        return answer

    def __len__(self) -> int:
        return len(self._items)


# --- I/O ---------------------------------------------------------------------------------
