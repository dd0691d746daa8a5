"""`renew = "acme"`: a certificate from an ACME server (RFC 8555), http-01 answered on loopback.

The protocol is certbot's `acme` library; this module only chooses what to ask for and turns
what goes wrong into one readable line. The library is synchronous, so one issuance (account,
order, challenges, finalisation, download) runs in a worker thread while the http-01
responder answers on the daemon's event loop; every wait is bounded by `acme_timeout`.

Options (`identities.NAME.*`, parsed and checked at load into `settings.AcmeSettings`):

- `acme_directory` (required): the directory URL, https only.
- `acme_ca_file`: trust for the ACME server's HTTPS; default the system trust store.
- `acme_email`: account contact (optional).
- `acme_identifiers`: DNS names (or IP addresses) to certify; default the DNS SANs of the
  certificate in use, else the CN of `subject`.
- `acme_challenge`: only "http-01".
- `acme_http_port`: where the responder listens, on 127.0.0.1 (default 5002). A public CA
  validates on port 80 of each name: forward that port here.
- `rekey`: a new ECDSA P-256 key per certificate (default) or, when false, the current key.
- `acme_timeout`: bound on one whole issuance (default 90 s).

The account key lives in `<identity folder>/.acme-account.json` (mode 0600, hidden, so the
keystore rule never reads it) and is reused: registering an existing key returns its account.
Registration agrees to the CA's terms of service: naming a directory in the config is taken
as that consent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import ipaddress
import json
import logging
import math
import os
import re
import ssl
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar, cast

import requests
from acme import challenges, client, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.x509.oid import NameOID
from josepy.errors import DeserializationError
from josepy.jwa import ES256
from josepy.jwk import JWK, JWKEC

from sidecar import __version__
from sidecar.config import IdentitySpec
from sidecar.credentials import PrivateKey
from sidecar.files import PRIVATE_FILE_MODE, atomic_write, ensure_private_dir
from sidecar.renewal.http01 import LOOPBACK, Http01Responder
from sidecar.renewal.providers.base import NewCredential, ProviderContext, ProviderError, RenewalRequest, settings_of
from sidecar.renewal.settings import AcmeSettings, acme_identifier

log = logging.getLogger("sidecar.renewal.acme")

ACCOUNT_FILE = ".acme-account.json"
MAX_REQUEST_TIMEOUT_S = 30.0
USER_AGENT = f"mtls-sidecar/{__version__} acme-python"

_POLL_FIRST_S = 0.2
_POLL_MAX_S = 2.0
_ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")
_VERIFY_TEXT = re.compile(r"certificate verify failed: ([^'\")(]+)")

T = TypeVar("T")

# ACME problem codes that point at one of our options.
_HINTS = {
    "invalidContact": "acme_email",
    "unsupportedContact": "acme_email",
    "rejectedIdentifier": "acme_identifiers",
    "unsupportedIdentifier": "acme_identifiers",
    "caa": "acme_identifiers",
}


class _Cancelled(Exception):
    """The coroutine waiting for the worker thread went away; stop at the next step."""


def check_files(settings: AcmeSettings, where: str) -> None:
    """What the config cannot check without the file system: acme_ca_file is there."""
    if settings.ca_file is not None and not settings.ca_file.is_file():
        raise ProviderError(f"{where}.acme_ca_file: no such file: {settings.ca_file}")


def _identifier(value: object, where: str) -> str:
    try:
        return acme_identifier(value)
    except ValueError as exc:
        raise ProviderError(f"{where}: {value!r}: {exc}") from None


def _is_ip(identifier: str) -> bool:
    try:
        ipaddress.ip_address(identifier)
    except ValueError:
        return False
    return True


# --- what to ask for (pure)


def default_identifiers(spec: IdentitySpec, current: x509.Certificate | None) -> tuple[str, ...]:
    """The DNS SANs of the certificate in use, else the CN of `spec.subject` when it is a host name."""
    where = f"identities.{spec.name}"
    if current is not None:
        try:
            sans = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            names: list[str] = []
        else:
            names = sans.get_values_for_type(x509.DNSName)
        if names:
            return tuple(
                dict.fromkeys(_identifier(n, f"{where} (a DNS name of the current certificate)") for n in names)
            )
    subject = _parse_subject(spec.subject)
    cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME) if subject is not None else []
    # Only a CN that looks like a host name: the usual `CN=<identity name>` is not one.
    if cns and isinstance(cns[0].value, str) and "." in cns[0].value.strip("."):
        try:
            return (_identifier(cns[0].value, f"{where}.subject CN"),)
        except ProviderError:
            pass
    raise ProviderError(f'{where}: no DNS name to certify: set {where}.acme_identifiers, e.g. ["dev.example.com"]')


def _parse_subject(text: str) -> x509.Name | None:
    if not text:
        return None
    try:
        return x509.Name.from_rfc4514_string(text)
    except ValueError:
        return None


def csr_subject(subject_text: str, identifiers: Sequence[str]) -> x509.Name:
    """`subject` when it parses (else just a CN), with a CN that is one of the DNS identifiers.

    ACME servers read the CSR's CN as one more DNS name to certify, so a CN that is not one of
    the identifiers (the usual `CN=<identity>`) becomes the first DNS identifier, and is left
    out when all identifiers are IP addresses.
    """
    dns = [i for i in identifiers if not _is_ip(i)]
    subject = _parse_subject(subject_text)
    cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME) if subject is not None else []
    kept = next((a.value for a in cns if a.value in dns), None)
    cn_value = str(kept) if kept is not None else (dns[0] if dns else None)
    rdns = []
    placed = False
    for rdn in subject.rdns if subject is not None else ():
        attributes = []
        for attribute in rdn:
            if attribute.oid == NameOID.COMMON_NAME:
                if placed or cn_value is None:
                    continue
                attribute = x509.NameAttribute(NameOID.COMMON_NAME, cn_value)
                placed = True
            attributes.append(attribute)
        if attributes:
            rdns.append(x509.RelativeDistinguishedName(attributes))
    if not placed and cn_value is not None:
        rdns.append(x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, cn_value)]))
    return x509.Name(rdns)


def build_csr(key: PrivateKey, subject: x509.Name, identifiers: Sequence[str]) -> bytes:
    """A PEM CSR for `identifiers` (DNS or IP SANs), signed by `key`."""
    sans: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(i)) if _is_ip(i) else x509.DNSName(i) for i in identifiers
    ]
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


# --- the provider


class AcmeProvider:
    name = "acme"

    def __init__(self, spec: IdentitySpec, context: ProviderContext) -> None:
        self.spec = spec
        self.context = context
        self.settings = settings_of(spec, AcmeSettings)
        check_files(self.settings, f"identities.{spec.name}")

    async def issue(self, request: RenewalRequest) -> NewCredential:
        settings = self.settings
        where = f"identities.{self.spec.name}"
        current_cert = request.current.cert if request.current is not None else None
        identifiers = settings.identifiers or default_identifiers(self.spec, current_cert)
        reuse = None if settings.rekey or request.current is None else request.current.key
        key: PrivateKey = reuse if reuse is not None else ec.generate_private_key(ec.SECP256R1())
        csr_pem = build_csr(key, csr_subject(self.spec.subject, identifiers), identifiers)
        responder = Http01Responder(settings.http_port)
        try:
            await responder.start()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ProviderError(
                f"cannot answer ACME http-01 challenges on {LOOPBACK}:{settings.http_port} ({reason}): "
                f"free that port or set {where}.acme_http_port to another one"
            ) from None
        cancel = threading.Event()
        started = time.monotonic()
        log.info(
            "identity %s: ACME order for %s at %s (http-01 on %s:%d)",
            self.spec.name,
            ", ".join(identifiers),
            settings.directory,
            LOOPBACK,
            responder.port,
        )
        exchange = _Exchange(settings, request.folder, csr_pem, identifiers, responder, cancel)
        # A hard bound even if a request hangs past the exchange's own deadline.
        limit = settings.timeout + _request_timeout(settings.timeout) + 5
        scope = asyncio.timeout(limit)
        try:
            async with scope:
                fullchain = await _in_worker_thread(exchange.run, f"acme issuance for {self.spec.name}")
        except ProviderError:
            raise
        except Exception as exc:
            if scope.expired() or isinstance(exc, errors.TimeoutError):
                raise ProviderError(
                    f"the ACME server at {settings.directory} did not issue within {settings.timeout:g}s"
                ) from None
            raise ProviderError(explain(exc, settings.directory, where)) from None
        finally:
            cancel.set()
            await responder.stop()
        chain = fullchain.encode()
        if b"-----BEGIN CERTIFICATE-----" not in chain:
            raise ProviderError(f"the ACME server at {settings.directory} returned no certificate")
        log.info(
            "identity %s: ACME certificate issued in %.1fs (%d http-01 answers served)",
            self.spec.name,
            time.monotonic() - started,
            responder.answered,
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return NewCredential(cert_chain_pem=chain, key_pem=key_pem)


async def _in_worker_thread(fn: Callable[[], T], name: str) -> T:
    """Run `fn` in a daemon thread of its own and await its result.

    Not `asyncio.to_thread`: the default executor's threads are joined when the loop shuts
    down, so a stopping daemon would wait for an ACME server to answer. A daemon thread is
    left behind instead; `fn` stops itself at its next step once its result is not wanted.
    """
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def work() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn()
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)

    threading.Thread(target=work, name=name, daemon=True).start()
    return await asyncio.wrap_future(future)


def _request_timeout(total: float) -> int:
    return max(1, math.ceil(min(MAX_REQUEST_TIMEOUT_S, total)))


class _Exchange:
    """One synchronous ACME issuance, run in a worker thread; returns the full chain PEM."""

    def __init__(
        self,
        settings: AcmeSettings,
        folder: Path,
        csr_pem: bytes,
        identifiers: Sequence[str],
        responder: Http01Responder,
        cancel: threading.Event,
    ) -> None:
        self.settings = settings
        self.folder = folder
        self.csr_pem = csr_pem
        self.identifiers = identifiers
        self.responder = responder
        self.cancel = cancel
        self.deadline = time.monotonic() + settings.timeout

    def _check(self) -> None:
        if self.cancel.is_set():
            raise _Cancelled
        if time.monotonic() >= self.deadline:
            raise errors.TimeoutError()

    def run(self) -> str:
        account_key = load_or_create_account_key(self.folder)
        self._check()
        net = client.ClientNetwork(
            account_key,
            alg=ES256,
            user_agent=USER_AGENT,
            timeout=_request_timeout(self.settings.timeout),
        )
        # requests takes a CA bundle path where `acme` types a bool.
        net.verify_ssl = cast(bool, trust_for(self.settings.ca_file))
        try:
            return self._issue(net, account_key)
        finally:
            net.session.close()

    def _issue(self, net: client.ClientNetwork, account_key: JWK) -> str:
        directory = client.ClientV2.get_directory(self.settings.directory, net)
        acme_client = client.ClientV2(directory, net)
        if acme_client.external_account_required():
            raise ProviderError(
                f"the ACME server at {self.settings.directory} requires external account binding, "
                "which mtls-sidecar does not support"
            )
        self._check()
        registration = messages.NewRegistration.from_data(email=self.settings.email, terms_of_service_agreed=True)
        try:
            acme_client.new_account(registration)
        except errors.ConflictError as exc:  # this key already has an account: use it
            net.account = messages.RegistrationResource(uri=exc.location, body=messages.Registration())
        self._check()
        order = acme_client.new_order(self.csr_pem)
        tokens = []
        try:
            for authzr in order.authorizations:
                if authzr.body.status == messages.STATUS_VALID:
                    continue  # the server reused an earlier authorization
                challb = _http01_challenge(authzr, self.settings.directory)
                response, validation = challb.response_and_validation(account_key)
                token = challb.chall.encode("token")
                self.responder.publish(token, validation)
                tokens.append(token)
                self._check()
                acme_client.answer_challenge(challb, response)
            order = self._wait_for_authorizations(acme_client, order)
            self._check()
            remaining = max(0.0, self.deadline - time.monotonic())
            finalized = acme_client.finalize_order(order, dt.datetime.now() + dt.timedelta(seconds=remaining))
        finally:
            for token in tokens:
                self.responder.withdraw(token)
        return str(finalized.fullchain_pem)

    def _wait_for_authorizations(
        self, acme_client: client.ClientV2, order: messages.OrderResource
    ) -> messages.OrderResource:
        """Poll each authorization (backing off) until it is no longer pending."""
        done = []
        for authzr in order.authorizations:
            delay = _POLL_FIRST_S
            while authzr.body.status in (messages.STATUS_PENDING, messages.STATUS_PROCESSING):
                self._check()
                authzr, _ = acme_client.poll(authzr)
                if authzr.body.status not in (messages.STATUS_PENDING, messages.STATUS_PROCESSING):
                    break
                # Polling a remote server: the pause is the protocol's, bounded by the deadline.
                if self.cancel.wait(min(delay, max(0.0, self.deadline - time.monotonic()))):
                    raise _Cancelled
                delay = min(delay * 2, _POLL_MAX_S)
            if authzr.body.status != messages.STATUS_VALID:
                raise ProviderError(_authorization_failure(authzr, self.settings.directory))
            done.append(authzr)
        updated: messages.OrderResource = order.update(authorizations=done)
        return updated


def _http01_challenge(authzr: messages.AuthorizationResource, directory: str) -> messages.ChallengeBody:
    for challb in authzr.body.challenges:
        if isinstance(challb.chall, challenges.HTTP01):
            return challb
    offered = ", ".join(str(c.chall.typ) for c in authzr.body.challenges) or "none"
    raise ProviderError(
        f"the ACME server at {directory} offers no http-01 challenge for {authzr.body.identifier.value} "
        f"(offered: {offered})"
    )


def _authorization_failure(authzr: messages.AuthorizationResource, directory: str) -> str:
    name = authzr.body.identifier.value
    problems = [_problem(c.error) for c in authzr.body.challenges if c.error is not None]
    detail = "; ".join(problems) if problems else f"authorization is {authzr.body.status}"
    return f"the ACME server at {directory} could not validate {name}: {detail}"


# --- the account key


def load_or_create_account_key(folder: Path) -> JWK:
    """The account key kept in `folder/.acme-account.json`, created (0600) on first use."""
    path = folder / ACCOUNT_FILE
    try:
        info = path.stat()
    except FileNotFoundError:
        key = JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
        document = {"kind": "mtls-sidecar ACME account key", "key": key.to_json()}
        ensure_private_dir(folder)
        atomic_write(path, json.dumps(document, indent=2).encode() + b"\n", PRIVATE_FILE_MODE)
        log.info("created an ACME account key in %s", path)
        return key
    if os.name == "posix" and stat.S_IMODE(info.st_mode) & 0o077:
        raise ProviderError(
            f"the ACME account key {path} is readable by others (mode {stat.S_IMODE(info.st_mode):o}): "
            f"run chmod 600 {path}"
        )
    try:
        document = json.loads(path.read_bytes())
        loaded = JWK.from_json(document["key"])
    except (OSError, ValueError, KeyError, TypeError, DeserializationError) as exc:
        raise ProviderError(
            f"cannot read the ACME account key {path} ({type(exc).__name__}); remove the file to register a new account"
        ) from None
    if not isinstance(loaded, JWKEC):
        raise ProviderError(f"the ACME account key {path} is not an EC key; remove the file to register a new account")
    return loaded


def trust_for(ca_file: Path | None) -> str | bool:
    """What requests should verify the ACME server with: the given file, else the system store."""
    if ca_file is not None:
        return str(ca_file)
    paths = ssl.get_default_verify_paths()
    if paths.cafile and os.path.isfile(paths.cafile):
        return paths.cafile
    if paths.capath and os.path.isdir(paths.capath):
        return paths.capath
    return True  # requests' own bundle (certifi)


# --- errors → one line


def _problem(error: messages.Error) -> str:
    parts = [str(error.typ)]
    if error.detail:
        parts.append(str(error.detail))
    for sub in error.subproblems or ():
        ident = f" ({sub.identifier.value})" if sub.identifier is not None else ""
        parts.append(f"{sub.typ}{ident}: {sub.detail or ''}".rstrip(": "))
    return _one_line(": ".join(parts[:2]) + "".join(f"; {p}" for p in parts[2:]))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _network_reason(exc: BaseException) -> str:
    text = str(exc)
    match = _VERIFY_TEXT.search(text)
    if match:
        return f"certificate verify failed: {match.group(1).strip()}"
    match = _ERRNO_TEXT.search(text)
    if match:
        return match.group(1).strip().lower()
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "unknown host name"
    return type(exc).__name__


def explain(exc: BaseException, directory: str, where: str) -> str:
    """One line for status and logs: what failed and against which server; no traceback."""
    if isinstance(exc, messages.Error):
        hint = _HINTS.get(exc.code or "")
        return f"the ACME server at {directory} refused: {_problem(exc)}" + (f"; check {where}.{hint}" if hint else "")
    if isinstance(exc, errors.IssuanceError):
        return f"the ACME server at {directory} would not issue: {_problem(exc.error)}"
    if isinstance(exc, errors.ValidationError):
        names = ", ".join(str(a.body.identifier.value) for a in exc.failed_authzrs)
        return f"the ACME server at {directory} could not validate {names}"
    if isinstance(exc, requests.exceptions.SSLError):
        return (
            f"cannot verify the ACME server at {directory}: {_network_reason(exc)}; "
            f"set {where}.acme_ca_file to the CA that signed its certificate"
        )
    if isinstance(exc, requests.exceptions.Timeout):
        return f"the ACME server at {directory} did not answer in time"
    if isinstance(exc, requests.exceptions.RequestException):
        return f"cannot reach the ACME server at {directory}: {_network_reason(exc)}"
    if isinstance(exc, DeserializationError):
        return f"{directory} does not look like an ACME directory (unexpected answer); check {where}.acme_directory"
    if isinstance(exc, errors.ClientError):
        response = exc.args[0] if exc.args else None
        if isinstance(response, requests.Response):
            status = f" (HTTP {response.status_code})"
        elif isinstance(response, str):
            status = f" ({_one_line(response)[:200]})"
        else:
            status = ""
        return f"unexpected answer from the ACME server at {directory}{status}; check {where}.acme_directory"
    if isinstance(exc, errors.Error):
        return f"ACME error with the server at {directory}: {_one_line(str(exc)) or type(exc).__name__}"
    if isinstance(exc, OSError):
        return f"ACME issuance failed: {exc.strerror or type(exc).__name__}" + (
            f" ({exc.filename})" if exc.filename else ""
        )
    return f"ACME issuance with {directory} failed: {type(exc).__name__}: {_one_line(str(exc))}"
