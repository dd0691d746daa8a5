"""Is the server's certificate revoked? OCSP and CRLs, judged purely, fetched in a thread.

The pure half takes bytes, certificates and `now` and returns an `Answer` ("good",
"revoked" or "unknown", with plain words): `judge_ocsp` checks that the response is about
our certificate and is signed by its issuer or by a responder the issuer delegated
(extendedKeyUsage OCSPSigning), and that it is current; `judge_crl` checks the CRL's issuer,
signature and nextUpdate. `decide` turns the answers and the route's mode into a `Verdict`.

The I/O half, `RevocationChecker`, asks in order: the route's `crl_file`, the OCSP
responders of the certificate's Authority Information Access, then its CRL distribution
points, and stops at the first definite answer. OCSP answers are cached per (issuer key,
serial) until their nextUpdate (`DEFAULT_TTL` when they have none), CRLs per URL likewise,
failures for `FAILURE_TTL`. HTTP runs in a worker thread with a short timeout.

Only the leaf is checked; intermediates, delta CRLs, indirect CRLs and OCSP stapling are not.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

from sidecar.causes import Cause
from sidecar.config import RouteSpec
from sidecar.policy import Verdict, check_identity

log = logging.getLogger("sidecar.revocation")

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


class FetchError(Exception):
    """A responder or distribution point could not be reached; the message is plain words."""


Fetch = Callable[[str, bytes | None, float, int], bytes]


def http_fetch(url: str, body: bytes | None, timeout: float, limit: int) -> bytes:
    """GET `url` (or POST an OCSP request `body`); blocking, for a worker thread."""
    headers = {"User-Agent": "mtls-sidecar"}
    if body is not None:
        headers["Content-Type"] = "application/ocsp-request"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data: bytes = response.read(limit + 1)
    except urllib.error.HTTPError as exc:
        raise FetchError(f"it answered HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        raise FetchError(f"unreachable: {_reason_words(exc.reason)}") from None
    except TimeoutError:
        raise FetchError(f"no answer within {timeout:g} s") from None
    except OSError as exc:
        raise FetchError(f"unreachable: {_reason_words(exc)}") from None
    if len(data) > limit:
        raise FetchError(f"its answer is larger than {limit} bytes")
    return data


def _reason_words(reason: object) -> str:
    if isinstance(reason, TimeoutError | socket.timeout):
        return "no answer in time"
    if isinstance(reason, OSError):
        return (reason.strerror or str(reason)).lower()
    return str(reason)


class RevocationChecker:
    """Answers "is this server certificate revoked?" for the tunnel, with caches. One per route."""

    def __init__(self, fetch: Fetch = http_fetch) -> None:
        self._fetch = fetch
        self.ocsp_cache = AnswerCache()
        self.crl_cache: dict[str, tuple[list[x509.CertificateRevocationList] | str, datetime]] = {}
        self._crl_files: dict[Path, tuple[tuple[int, int], list[x509.CertificateRevocationList] | str]] = {}
        self._inflight: dict[object, asyncio.Task[Any]] = {}
        self.fetches = 0

    async def check(
        self,
        chain: Sequence[x509.Certificate],
        *,
        mode: str,
        crl_file: Path | None,
        now: datetime,
        timeout: float = FETCH_TIMEOUT,
    ) -> Verdict:
        if mode == "off" or not chain:
            return Verdict.passed()
        return decide(mode, chain[0], await self.answers(chain, crl_file=crl_file, now=now, timeout=timeout))

    async def answers(
        self, chain: Sequence[x509.Certificate], *, crl_file: Path | None, now: datetime, timeout: float
    ) -> list[Answer]:
        """Ask each source in turn until one answers definitely; every answer, in order."""
        leaf = chain[0]
        issuer = find_issuer(leaf, chain[1:])
        if issuer is None:
            return [Answer(UNKNOWN, "", "the server certificate's issuer is not in its verified chain")]
        answers: list[Answer] = []
        if crl_file is not None:
            answers.append(await self._from_crl_file(crl_file, leaf, issuer, now))
        for url in ocsp_urls(leaf):
            if any(a.definite for a in answers):
                break
            answers.append(await self._from_ocsp(url, leaf, issuer, now, timeout))
        for url in crl_urls(leaf):
            if any(a.definite for a in answers):
                break
            answers.append(await self._from_crl_url(url, leaf, issuer, now, timeout))
        if not answers:
            answers.append(
                Answer(
                    UNKNOWN,
                    "",
                    "the certificate names no OCSP responder and no CRL distribution point, "
                    "and the route has no crl_file",
                )
            )
        return answers

    async def _from_ocsp(
        self, url: str, leaf: x509.Certificate, issuer: x509.Certificate, now: datetime, timeout: float
    ) -> Answer:
        key = ("ocsp", url, _spki_digest(issuer), leaf.serial_number)
        cached = self.ocsp_cache.get(key, now)
        if cached is not None:
            return cached

        async def ask() -> Answer:
            source = f"OCSP {url}"
            try:
                data = await self._get(url, ocsp_request(leaf, issuer), timeout, MAX_OCSP_BYTES)
            except FetchError as exc:
                answer = Answer(UNKNOWN, source, f"the responder is {exc}" if "unreachable" in str(exc) else str(exc))
            else:
                answer = judge_ocsp(data, leaf, issuer, now, source=source)
            self.ocsp_cache.put(key, answer, now)
            if not answer.definite:
                log.warning("%s: %s", answer.source, answer.detail)
            return answer

        return await self._once(key, ask)

    async def _from_crl_url(
        self, url: str, leaf: x509.Certificate, issuer: x509.Certificate, now: datetime, timeout: float
    ) -> Answer:
        source = f"CRL {url}"
        cached = self.crl_cache.get(url)
        if cached is None or now >= cached[1]:

            async def download() -> tuple[list[x509.CertificateRevocationList] | str, datetime]:
                crls: list[x509.CertificateRevocationList] | str
                try:
                    crls = load_crls(await self._get(url, None, timeout, MAX_CRL_BYTES))
                except FetchError as exc:
                    crls = f"the distribution point is {exc}" if "unreachable" in str(exc) else str(exc)
                except ValueError:
                    crls = "the distribution point's answer is not a CRL"
                answer = judge_crl(crls, leaf, issuer, now, source=source) if isinstance(crls, list) else None
                entry = (crls, cache_until(answer or Answer(UNKNOWN, source), now))
                self.crl_cache[url] = entry
                return entry

            cached = await self._once(("crl", url), download)
        crls = cached[0]
        if isinstance(crls, str):
            return Answer(UNKNOWN, source, crls)
        return judge_crl(crls, leaf, issuer, now, source=source)

    async def _from_crl_file(
        self, path: Path, leaf: x509.Certificate, issuer: x509.Certificate, now: datetime
    ) -> Answer:
        source = f"CRL file {path}"
        crls = await asyncio.to_thread(self._read_crl_file, path)
        if isinstance(crls, str):
            return Answer(UNKNOWN, source, crls)
        return judge_crl(crls, leaf, issuer, now, source=source)

    def _read_crl_file(self, path: Path) -> list[x509.CertificateRevocationList] | str:
        """The file's CRLs, parsed again only when its size or modification time changes."""
        try:
            info = os.stat(path)
        except OSError as exc:
            return f"cannot read it: {(exc.strerror or str(exc)).lower()}"
        stamp = (info.st_mtime_ns, info.st_size)
        known = self._crl_files.get(path)
        if known is not None and known[0] == stamp:
            return known[1]
        try:
            result: list[x509.CertificateRevocationList] | str = load_crls(path.read_bytes())
        except OSError as exc:
            result = f"cannot read it: {(exc.strerror or str(exc)).lower()}"
        except ValueError:
            result = "it holds no readable CRL (PEM or DER)"
        self._crl_files[path] = (stamp, result)
        return result

    async def _get(self, url: str, body: bytes | None, timeout: float, limit: int) -> bytes:
        self.fetches += 1
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._fetch, url, body, timeout, limit), timeout + 1.0)
        except TimeoutError:
            raise FetchError(f"no answer within {timeout:g} s") from None

    async def _once(self, key: object, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run `make()` once for concurrent callers with the same key, in a task of its own, so
        that a caller who goes away (its local client hung up) cancels nobody else's wait."""
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(make(), name=f"revocation check {key!r:.80}")
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        return cast(T, await asyncio.shield(task))

    def _finished(self, key: object, task: asyncio.Task[Any]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("revocation check failed: %s", task.exception())


async def check_server_policy(
    route: RouteSpec,
    chain: Sequence[x509.Certificate],
    checker: RevocationChecker,
    *,
    now: datetime,
    verified: bool = True,
) -> Verdict:
    """A route's checks after the handshake: pins, then URI SANs, then revocation."""
    verdict = check_identity(chain, pins=route.pin_sha256, allowed_uri_sans=route.allowed_uri_sans, verified=verified)
    if verdict.ok and route.revocation != "off":
        verdict = await checker.check(
            chain,
            mode=route.revocation,
            crl_file=route.crl_file,
            now=now,
            timeout=min(FETCH_TIMEOUT, route.connect_timeout),
        )
    return verdict


def _spki_digest(cert: x509.Certificate) -> bytes:
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()
