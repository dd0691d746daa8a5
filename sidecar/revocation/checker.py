"""Is the server's certificate revoked? The I/O half: `RevocationChecker` fetches and caches.

It asks in order: the route's `crl_file`, the OCSP responders of the certificate's
Authority Information Access, then its CRL distribution points, and stops at the first
definite answer (judged by `sidecar.revocation.judge`, which is pure). OCSP answers are
cached per (issuer key, serial) until their nextUpdate (`DEFAULT_TTL` when they have none),
CRLs per URL likewise, failures for `FAILURE_TTL`. HTTP runs in a worker thread with a
short timeout.
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
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sidecar.config import RouteSpec
from sidecar.policy import Verdict, check_identity
from sidecar.revocation.judge import (
    FETCH_TIMEOUT,
    MAX_CRL_BYTES,
    MAX_OCSP_BYTES,
    UNKNOWN,
    Answer,
    AnswerCache,
    T,
    cache_until,
    crl_urls,
    decide,
    find_issuer,
    judge_crl,
    judge_ocsp,
    load_crls,
    ocsp_request,
    ocsp_urls,
)

log = logging.getLogger("sidecar.revocation")


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
    """A route's checks after the handshake: pins, then the allow-list, then revocation."""
    verdict = check_identity(chain, pins=route.pin_sha256, allow=route.server_allow_list, verified=verified)
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
