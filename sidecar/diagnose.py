"""`mtls-sidecar check ROUTE`: one real connection to a route's target, explained.

The I/O half (`check_route` and the private `_handshake`/`_probe`) makes a real TCP
connection and TLS handshake with the identity's selected certificate and records what it
saw as an `Observation`: plain data, no exceptions or sockets. The pure half,
`explain(observation)`, turns that into a `CheckResult`: a stable cause key, one line that
says what happened and where, one line that says what to do next, and JSON-able details.

When our verification of the server fails, a second handshake that verifies nothing and
presents no client certificate fetches the server's certificate, so the explanation can
name its issuer, its names and its dates.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePath
from typing import Any

from cryptography import x509

from sidecar import failures
from sidecar.config import RouteSpec
from sidecar.errors import ConfigError
from sidecar.failures import ssl_reason
from sidecar.keystore import Selection
from sidecar.policy import Verdict, peer_chain, spki_sha256, uri_sans
from sidecar.revocation import RevocationChecker, check_server_policy
from sidecar.tlsctx import ServerPolicy, build_client_context
from sidecar.units import human_duration

# Cause keys: stable, for scripts and the control API.
OK = "ok"
DNS = "dns"
REFUSED = "refused"
TIMEOUT = "timeout"
CONNECT = "connect"
NOT_TLS = "not_tls"
SERVER_UNTRUSTED = "server_untrusted"
NAME_MISMATCH = "name_mismatch"
SERVER_CERT_EXPIRED = "server_cert_expired"
SERVER_CERT_NOT_YET_VALID = "server_cert_not_yet_valid"
SERVER_REJECTED_CERT = "server_rejected_certificate"
NO_USABLE_CERT = "no_usable_certificate"
ALPN_REFUSED = "alpn_refused"
TLS_ERROR = "tls_error"
CONFIG = "config"
# The route's checks after the handshake (pins, URI SANs, revocation): the tunnel's reason keys.
PIN_MISMATCH = failures.PIN_MISMATCH
URI_SAN_NOT_ALLOWED = failures.URI_SAN_NOT_ALLOWED
SERVER_CERT_REVOKED = failures.SERVER_CERT_REVOKED
REVOCATION_UNKNOWN = failures.REVOCATION_UNKNOWN
CAUSES = (
    OK, DNS, REFUSED, TIMEOUT, CONNECT, NOT_TLS, SERVER_UNTRUSTED, NAME_MISMATCH, SERVER_CERT_EXPIRED,
    SERVER_CERT_NOT_YET_VALID, SERVER_REJECTED_CERT, NO_USABLE_CERT, ALPN_REFUSED, TLS_ERROR, CONFIG,
    PIN_MISMATCH, URI_SAN_NOT_ALLOWED, SERVER_CERT_REVOKED, REVOCATION_UNKNOWN,
)  # fmt: skip

# How long to listen after our side of the handshake completes: with TLS 1.3 a server
# rejects our certificate only after that, with an alert on the first read.
AFTER_HANDSHAKE_WAIT = 1.0
EXPIRY_WARNING = timedelta(days=14)

_CHUNK = 65536
_KEEP_FIRST_BYTES = 256  # of the real handshake: enough to show what a plaintext server said
_KEEP_PROBE_BYTES = 256 * 1024  # of the probe: a TLS 1.2 certificate flight, to read the certificate from
_SHOWN_BYTES = 60

# OpenSSL X509_V_ERR_* codes (SSLCertVerificationError.verify_code).
_NOT_YET_VALID = 9
_EXPIRED = 10
_SELF_SIGNED = 18
_HOSTNAME_MISMATCH = 62
_IP_MISMATCH = 64
_UNTRUSTED = {2, 18, 19, 20, 21, 27, 28, 29, 30, 31, 32}

# TLS alerts (as OpenSSL names them, lower case, spaces) that mean "not your certificate".
_REJECTING_ALERTS = (
    "certificate required", "bad certificate", "unknown ca", "certificate expired", "certificate revoked",
    "unsupported certificate", "certificate unknown", "access denied", "handshake failure", "decrypt error",
)  # fmt: skip
_NOT_TLS_REASONS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST")


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    cause: str
    message: str
    fix: str | None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "cause": self.cause, "message": self.message, "fix": self.fix, "details": self.details}


@dataclass(frozen=True)
class Failed:
    """What went wrong, as data.

    stage: "setup", "resolve", "connect", "handshake" or "after_handshake".
    kind:  "config", "credential", "dns", "refused", "timeout", "reset", "closed", "os_error",
           "tls" (an SSLError, `ssl_reason` set) or "verify" (our check of the server failed).
    """

    stage: str
    kind: str
    text: str = ""
    ssl_reason: str | None = None
    verify_code: int | None = None
    verify_message: str | None = None


@dataclass(frozen=True)
class Observation:
    """Everything one check saw. Built by `check_route`; tests build it by hand."""

    route: str
    host: str
    port: int
    server_name: str
    identity: str
    now: datetime
    timeout: float
    ca_file: Path | None = None
    ca_dir: Path | None = None
    alpn_offered: tuple[str, ...] = ()
    skip_verify: bool = False
    client_cert: x509.Certificate | None = None
    # When nothing could be presented: why_unusable(), each (file, reason), and the folder.
    unusable: str | None = None
    rejected: tuple[tuple[str, str], ...] = ()
    identity_folder: str | None = None
    # What the connection did.
    address: str | None = None
    failure: Failed | None = None
    first_bytes: bytes = b""
    tls_version: str | None = None
    cipher: str | None = None
    alpn: str | None = None
    server_cert: x509.Certificate | None = None
    server_cert_verified: bool = False
    after_handshake: str | None = None  # "silent", "data" or "closed"
    probe_error: str | None = None
    # The chain as the handshake verified it (leaf first), and the route's pins/URI SANs/revocation verdict.
    server_chain: tuple[x509.Certificate, ...] = ()
    policy: Verdict | None = None

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# --- I/O ---------------------------------------------------------------------------------


async def check_route(
    route: RouteSpec,
    selection: Selection,
    *,
    timeout: float | None = None,
    after_handshake_wait: float = AFTER_HANDSHAKE_WAIT,
) -> CheckResult:
    """Connect to the route's target as its identity would, and explain what happened.

    `timeout` (default: the route's connect_timeout) bounds DNS, TCP connect and the TLS
    handshake together; the server is then given `after_handshake_wait` seconds to reject
    our certificate (TLS 1.3). A failed verification adds one more bounded handshake.
    """
    observation = observe_start(route, selection, now=datetime.now(UTC), timeout=timeout)
    credential = selection.selected
    if credential is None:
        return explain(observation)  # never contact a server with nothing to present
    try:
        ctx = build_client_context(credential, ServerPolicy.for_route(route))
    except ConfigError as exc:
        return explain(replace(observation, failure=Failed("setup", "config", str(exc))))
    except (ssl.SSLError, OSError, ValueError) as exc:
        return explain(replace(observation, failure=Failed("setup", "credential", _text(exc))))
    observation = await _handshake(observation, ctx, after_handshake_wait)
    if observation.failure is not None and observation.failure.kind == "verify":
        observation = await _probe(observation)
    if observation.server_chain and route.checks_after_handshake:
        verdict = await check_server_policy(
            route,
            observation.server_chain,
            RevocationChecker(),
            now=observation.now,
            verified=not route.unsafe_skip_verify,
        )
        observation = replace(observation, policy=verdict)
    return explain(observation)


def observe_start(route: RouteSpec, selection: Selection, *, now: datetime, timeout: float | None) -> Observation:
    """The part of an observation known before any connection."""
    cert = selection.selected.cert if selection.selected is not None else None
    rejected = tuple((r.candidate.file, r.reason) for r in selection.rejected)
    folders = {str(PurePath(f).parent) for f, _ in rejected if PurePath(f).parent != PurePath(".")}
    return Observation(
        route=route.name,
        host=route.target_host,
        port=route.target_port,
        server_name=route.server_name,
        identity=selection.identity,
        now=now,
        timeout=route.connect_timeout if timeout is None else timeout,
        ca_file=route.ca_file,
        ca_dir=route.ca_dir,
        alpn_offered=route.alpn,
        skip_verify=route.unsafe_skip_verify,
        client_cert=cert,
        unusable=None if selection.selected is not None else selection.why_unusable(),
        rejected=rejected,
        identity_folder=folders.pop() if len(folders) == 1 else None,
    )


class _Wire:
    """TLS over a non-blocking socket through `ssl.MemoryBIO`, keeping the first raw bytes."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_name: str, keep: int) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=_sni(server_name))
        self.received = bytearray()
        self._keep = keep

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
                continue
            except ssl.SSLError:
                with suppress(OSError):
                    await self._flush()  # our alert, so the server's log says why
                raise
            await self._flush()
            return

    async def read(self) -> bytes:
        """Application bytes; b"" at the server's EOF. A TLS alert raises ssl.SSLError."""
        while True:
            try:
                data = self.tls.read(_CHUNK)
            except ssl.SSLWantReadError:
                await self._flush()  # key updates and the like are answered from inside read()
                await self._fill()
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            return data

    async def close_notify(self) -> None:
        with suppress(ssl.SSLError):
            self.tls.unwrap()  # in BIO mode: queues close_notify, then wants the server's
        with suppress(OSError):
            await self._flush()

    async def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            await self.loop.sock_sendall(self.sock, data)

    async def _fill(self) -> None:
        data = await self.loop.sock_recv(self.sock, _CHUNK)
        if len(self.received) < self._keep:
            self.received += data[: self._keep - len(self.received)]
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()


async def _resolve(host: str, port: int) -> list[tuple[Any, ...]]:
    loop = asyncio.get_running_loop()
    return list(await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))


async def _connect_first(infos: list[tuple[Any, ...]], held: list[socket.socket]) -> str:
    """Connect to the first address that answers; the socket goes into `held` (the caller closes it)."""
    loop = asyncio.get_running_loop()
    errors: list[OSError] = []
    for family, kind, proto, _canon, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            errors.append(exc)
            continue
        except BaseException:
            sock.close()
            raise
        held.append(sock)
        return f"[{address[0]}]:{address[1]}" if family == socket.AF_INET6 else f"{address[0]}:{address[1]}"
    refused = [e for e in errors if isinstance(e, ConnectionRefusedError)]
    raise (refused[0] if refused else errors[0]) if errors else OSError("the name resolves to no address")


async def _handshake(obs: Observation, ctx: ssl.SSLContext, after_wait: float) -> Observation:
    held: list[socket.socket] = []
    try:
        return await _handshake_on(obs, ctx, after_wait, held)
    finally:
        for sock in held:
            sock.close()


async def _handshake_on(
    obs: Observation, ctx: ssl.SSLContext, after_wait: float, held: list[socket.socket]
) -> Observation:
    stage = "resolve"
    wire: _Wire | None = None
    address: str | None = None
    try:
        async with asyncio.timeout(obs.timeout):
            infos = await _resolve(obs.host, obs.port)
            stage = "connect"
            address = await _connect_first(infos, held)
            stage = "handshake"
            wire = _Wire(held[0], ctx, obs.server_name, _KEEP_FIRST_BYTES)
            await wire.handshake()
    except Exception as exc:
        first = bytes(wire.received) if wire is not None else b""
        return replace(obs, address=address, failure=_failed(stage, exc), first_bytes=first)
    tls = wire.tls
    der = tls.getpeercert(binary_form=True)
    cipher = tls.cipher()
    done = replace(
        obs,
        server_chain=tuple(peer_chain(tls, verified=not obs.skip_verify)),
        address=address,
        first_bytes=bytes(wire.received),
        tls_version=tls.version(),
        cipher=cipher[0] if cipher else None,
        alpn=tls.selected_alpn_protocol(),
        server_cert=_load_der(der),
        server_cert_verified=not obs.skip_verify,
    )
    # Send nothing and listen: with TLS 1.3 a server that rejects our certificate says so now.
    # Most servers wait for their client to speak first, so silence until the deadline is fine.
    try:
        async with asyncio.timeout(after_wait):
            data = await wire.read()
    except TimeoutError:
        after = "silent"
    except Exception as exc:
        return replace(done, failure=_failed("after_handshake", exc))
    else:
        after = "data" if data else "closed"
    if after != "closed":
        with suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await wire.close_notify()
    return replace(done, after_handshake=after)


async def _probe(obs: Observation) -> Observation:
    """Fetch the server's certificate without verifying it and without presenting ours."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    held: list[socket.socket] = []
    wire: _Wire | None = None
    der: bytes | None = None
    error: str | None = None
    try:
        async with asyncio.timeout(obs.timeout):
            await _connect_first(await _resolve(obs.host, obs.port), held)
            wire = _Wire(held[0], ctx, obs.server_name, _KEEP_PROBE_BYTES)
            await wire.handshake()
            der = wire.tls.getpeercert(binary_form=True)
    except Exception as exc:
        # TLS 1.2 servers that require a client certificate end this handshake, but they
        # sent their certificate in the clear before that.
        der = certificate_from_tls12_flight(bytes(wire.received)) if wire is not None else None
        if der is None:
            error = _text(exc) or type(exc).__name__
    finally:
        for sock in held:
            sock.close()
    cert = _load_der(der)
    if der and cert is None:
        error = "the server's certificate is not readable X.509"
    return replace(obs, server_cert=cert, server_cert_verified=False, probe_error=error)


def _load_der(der: bytes | None) -> x509.Certificate | None:
    if not der:
        return None
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        return None


def _failed(stage: str, exc: BaseException) -> Failed:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Failed(
            stage, "verify", _text(exc), ssl_reason=ssl_reason(exc), verify_code=exc.verify_code,
            verify_message=exc.verify_message,
        )  # fmt: skip
    if isinstance(exc, ssl.SSLZeroReturnError | ssl.SSLEOFError):
        return Failed(stage, "closed", _text(exc), ssl_reason=ssl_reason(exc))
    if isinstance(exc, ssl.SSLError):
        return Failed(stage, "tls", _text(exc), ssl_reason=ssl_reason(exc))
    if isinstance(exc, socket.gaierror):
        return Failed(stage, "dns", exc.strerror or str(exc))
    if isinstance(exc, TimeoutError):
        return Failed(stage, "timeout", _text(exc))
    if isinstance(exc, ConnectionRefusedError):
        return Failed(stage, "refused", exc.strerror or str(exc))
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return Failed(stage, "reset", exc.strerror or str(exc))
    if isinstance(exc, OSError):
        return Failed(stage, "os_error", exc.strerror or str(exc))
    return Failed(stage, "os_error", f"{type(exc).__name__}: {_text(exc)}")


def _text(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def _sni(name: str) -> str:
    return name.strip("[]")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def certificate_from_tls12_flight(data: bytes) -> bytes | None:
    """The server's leaf certificate (DER) from the raw bytes of a TLS ≤ 1.2 handshake.

    Before ChangeCipherSpec, TLS 1.2 handshake records are plaintext; TLS 1.3 encrypts the
    Certificate message, so this returns None for it.
    """
    handshake = bytearray()
    pos = 0
    while pos + 5 <= len(data):
        content_type, length = data[pos], int.from_bytes(data[pos + 3 : pos + 5], "big")
        if content_type == 20 or pos + 5 + length > len(data):
            break
        if content_type == 22:
            handshake += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
    pos = 0
    while pos + 4 <= len(handshake):
        kind, length = handshake[pos], int.from_bytes(handshake[pos + 1 : pos + 4], "big")
        body = bytes(handshake[pos + 4 : pos + 4 + length])
        if kind == 11 and len(body) == length and length >= 6:
            first = int.from_bytes(body[3:6], "big")
            der = body[6 : 6 + first]
            return der if first and len(der) == first else None
        pos += 4 + length
    return None


# --- explanation (pure) --------------------------------------------------------------------


def explain(obs: Observation) -> CheckResult:
    """Turn what a check saw into one line, one fix and the details. Pure."""
    details = _details(obs)
    failure = obs.failure
    if obs.client_cert is None and obs.unusable is not None:
        return _no_usable_certificate(obs, details)
    if obs.policy is not None and not obs.policy.ok:
        return _policy_refused(obs, obs.policy, details)  # the tunnel checks this before anything else
    if obs.policy is not None and obs.policy.warning:
        details["warnings"].append(obs.policy.warning)
    if failure is None and obs.after_handshake == "closed":
        return _hung_up(obs, Failed("after_handshake", "closed"), details)
    if failure is None:
        return _ok(obs, details)
    if failure.stage == "setup":
        return _setup_failed(obs, failure, details)
    if failure.kind == "dns":
        return CheckResult(
            False,
            DNS,
            f"{obs.target}: the name {obs.host} does not resolve ({failure.text})",
            f"check the host in target for route {obs.route}, or your DNS or VPN connection",
            details,
        )
    if failure.kind == "refused":
        where = f" at {obs.address}" if obs.address else ""
        return CheckResult(
            False,
            REFUSED,
            f"{obs.target}: connection refused{where} (nothing is listening on port {obs.port})",
            f"start the service, or correct the port in target for route {obs.route}",
            details,
        )
    if failure.stage in ("handshake", "after_handshake") and obs.first_bytes and not _looks_like_tls(obs.first_bytes):
        return _not_tls(obs, details)
    if failure.kind == "timeout":
        return _timed_out(obs, failure, details)
    if failure.kind == "verify":
        return _verification_failed(obs, failure, details)
    if failure.kind == "tls" and failure.ssl_reason and "ALERT" in failure.ssl_reason.upper():
        return _alert(obs, failure, details)
    if failure.kind == "tls" and (failure.ssl_reason or "").upper() in _NOT_TLS_REASONS:
        return _not_tls(obs, details)
    if failure.kind in ("reset", "closed"):
        return _hung_up(obs, failure, details)
    if failure.kind == "tls":
        reason = (failure.ssl_reason or failure.text).lower().replace("_", " ")
        return CheckResult(
            False,
            TLS_ERROR,
            f"{obs.target}: the TLS handshake failed: {reason}",
            f"compare the server's TLS settings with ours (TLS 1.2 or later, SNI {obs.server_name}); "
            f"`openssl s_client -connect {obs.target} -servername {obs.server_name}` shows more",
            details,
        )
    return CheckResult(
        False,
        CONNECT,
        f"{obs.target}: cannot connect: {failure.text}",
        f"check that {obs.host} is reachable from this machine and the port in target for route {obs.route}",
        details,
    )


def _no_usable_certificate(obs: Observation, details: dict[str, Any]) -> CheckResult:
    folder = obs.identity_folder or f"the keystore folder of {obs.identity}"
    details["unusable"] = [{"file": f, "reason": r} for f, r in obs.rejected]
    return CheckResult(
        False,
        NO_USABLE_CERT,
        f"{obs.target}: not contacted: {obs.unusable}",
        f"put a valid client certificate and key for {obs.identity} in {folder}, "
        f"or run `mtls-sidecar renew {obs.identity}`",
        details,
    )


def _setup_failed(obs: Observation, failure: Failed, details: dict[str, Any]) -> CheckResult:
    if failure.kind == "config":
        field = "ca_dir" if obs.ca_dir is not None and obs.ca_file is None else "ca_file"
        return CheckResult(
            False,
            CONFIG,
            f"{obs.target}: not contacted: {failure.text}",
            f"point {field} for route {obs.route} at a readable PEM file of CA certificates",
            details,
        )
    return CheckResult(
        False,
        TLS_ERROR,
        f"{obs.target}: not contacted: OpenSSL cannot use {obs.identity}'s certificate: {failure.text}",
        f"replace that credential in {obs.identity}'s keystore folder, or run `mtls-sidecar renew {obs.identity}`",
        details,
    )


def _ok(obs: Observation, details: dict[str, Any]) -> CheckResult:
    warnings: list[str] = details["warnings"]
    if obs.alpn_offered and obs.alpn is None:
        warnings.append(f"the server selected no ALPN protocol (we offered {', '.join(obs.alpn_offered)})")
    if obs.skip_verify:
        warnings.append(f"server verification is OFF for route {obs.route} (unsafe_skip_verify): it was not checked")
    if obs.after_handshake == "data":
        details["server_spoke_first"] = True
    server = ""
    if obs.server_cert is not None:
        cert = obs.server_cert
        left = cert.not_valid_after_utc - obs.now
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        if left < min(EXPIRY_WARNING, lifetime / 3):
            warnings.append(
                f"the server certificate expires in {human_duration(left)} ({_when(cert.not_valid_after_utc)})"
            )
        server = (
            f"; server {cert.subject.rfc4514_string() or '(empty subject)'}, issued by {cert.issuer.rfc4514_string()}, "
            f"expires {_when(cert.not_valid_after_utc)}"
        )
    alpn = obs.alpn or "none"
    return CheckResult(
        True,
        OK,
        f"{obs.target}: OK: {obs.tls_version}, {obs.cipher}, ALPN {alpn}{server}",
        None,
        details,
    )


def _policy_refused(obs: Observation, verdict: Verdict, details: dict[str, Any]) -> CheckResult:
    """The handshake passed, the route's own checks did not: the tunnel would refuse here."""
    cause = verdict.reason or TLS_ERROR
    leaf = obs.server_chain[0] if obs.server_chain else obs.server_cert
    if cause == PIN_MISMATCH and leaf is not None:
        details["server_pin"] = spki_sha256(leaf)
        fix = (
            f"if the server's key was changed on purpose, check sha256/{spki_sha256(leaf)} with its owner and add "
            f"it to pin_sha256 for route {obs.route}; otherwise this may not be the real service"
        )
    elif cause == URI_SAN_NOT_ALLOWED:
        held = ", ".join(uri_sans(leaf)) if leaf is not None else ""
        fix = (
            f"if this is the service you meant, add a pattern matching {held} to allowed_uri_sans "
            f"for route {obs.route}; otherwise check target for route {obs.route}"
            if held
            else f"check target for route {obs.route}: this server's certificate carries no URI SAN (SPIFFE ID)"
        )
    elif cause == SERVER_CERT_REVOKED:
        fix = "the service needs a new certificate from its CA; nothing to change on this side"
    else:
        fix = (
            f"make the OCSP responder or CRL distribution point reachable from here, set crl_file, "
            f'or set revocation = "soft" for route {obs.route}'
        )
    return CheckResult(False, cause, f"{obs.target}: {verdict.message}", fix, details)


def _not_tls(obs: Observation, details: dict[str, Any]) -> CheckResult:
    shown = printable(obs.first_bytes)
    return CheckResult(
        False,
        NOT_TLS,
        f'{obs.target} is not a TLS server: it answered in plaintext: "{shown}"',
        f"point target for route {obs.route} at the service's TLS port (this looks like its plaintext one)",
        details,
    )


def _timed_out(obs: Observation, failure: Failed, details: dict[str, Any]) -> CheckResult:
    limit = f"{obs.timeout:g} s"
    raise_it = f"or raise connect_timeout for route {obs.route}"
    if failure.stage == "resolve":
        message = f"{obs.target}: resolving {obs.host} took longer than {limit}"
        fix = f"check your DNS or VPN connection, {raise_it}"
    elif failure.stage == "connect":
        message = f"{obs.target}: no answer to the TCP connection within {limit}"
        fix = f"check that {obs.host} is reachable from here (VPN, firewall) and the port is right, {raise_it}"
    elif not obs.first_bytes:
        message = f"{obs.target} accepted the TCP connection but did not answer our TLS hello within {limit}"
        fix = (
            f"check that port {obs.port} speaks TLS (a plaintext service waiting for its client to speak "
            f"looks like this), {raise_it}"
        )
    else:
        message = f"{obs.target}: the TLS handshake started but did not finish within {limit}"
        fix = f"the server or the network is slow or stuck: look at the server's log, {raise_it}"
    return CheckResult(False, TIMEOUT, message, fix, details)


def _hung_up(obs: Observation, failure: Failed, details: dict[str, Any]) -> CheckResult:
    how = "reset" if failure.kind == "reset" else "closed"
    if failure.stage == "after_handshake":
        message = (
            f"{obs.target} completed the TLS handshake ({obs.tls_version}), then {how} the connection "
            "without a TLS alert"
        )
        fix = f"look in the server's log for why it hung up; it may not accept {obs.identity}'s certificate"
    elif not obs.first_bytes:
        message = f"{obs.target} accepted the TCP connection, then {how} it without answering our TLS hello"
        fix = (
            f"check that port {obs.port} speaks TLS and accepts this client (the server's log says why; "
            f"SNI was {obs.server_name})"
        )
    else:
        message = f"{obs.target} {how} the connection in the middle of the TLS handshake"
        fix = f"look in the server's log for why; it may not accept {obs.identity}'s certificate or our TLS settings"
    return CheckResult(False, CONNECT, message, fix, details)


def _verification_failed(obs: Observation, failure: Failed, details: dict[str, Any]) -> CheckResult:
    code = failure.verify_code
    detail = failure.verify_message or failure.text
    details["verify_error"] = {"code": code, "message": detail}
    cert = obs.server_cert
    if code in (_HOSTNAME_MISMATCH, _IP_MISMATCH):
        return _name_mismatch(obs, cert, detail, details)
    if code == _EXPIRED:
        if cert is not None and cert.not_valid_after_utc <= obs.now:
            ended = cert.not_valid_after_utc
            message = (
                f"{obs.target}: server certificate {cert.subject.rfc4514_string()} expired "
                f"{human_duration(obs.now - ended)} ago ({_when(ended)})"
            )
        else:
            message = f"{obs.target}: a certificate in the server's chain has expired ({detail})"
        return CheckResult(
            False,
            SERVER_CERT_EXPIRED,
            message,
            "have the server's certificate renewed (nothing to change on this side); "
            "if it looks current, check this machine's clock",
            details,
        )
    if code == _NOT_YET_VALID:
        if cert is not None and cert.not_valid_before_utc > obs.now:
            starts = cert.not_valid_before_utc
            message = (
                f"{obs.target}: server certificate {cert.subject.rfc4514_string()} is not valid until "
                f"{_when(starts)} (in {human_duration(starts - obs.now)})"
            )
        else:
            message = f"{obs.target}: a certificate in the server's chain is not valid yet ({detail})"
        return CheckResult(
            False,
            SERVER_CERT_NOT_YET_VALID,
            message,
            "check this machine's clock; if it is right, the server's certificate was issued with a future start",
            details,
        )
    trust = _trust_where(obs)
    set_ca = f"set ca_file for route {obs.route} to the CA that issued the server's certificate"
    if code in _UNTRUSTED:
        if cert is None:
            message = f"{obs.target}: server certificate is not trusted ({detail}); trust in use: {trust}"
        elif code == _SELF_SIGNED or cert.issuer == cert.subject:
            message = (
                f"{obs.target}: server certificate is not trusted: it is self-signed "
                f"({cert.subject.rfc4514_string()}), and not in {trust}"
            )
            set_ca = f"set ca_file for route {obs.route} to that certificate, if you trust it"
        else:
            message = (
                f"{obs.target}: server certificate is not trusted: issued by {cert.issuer.rfc4514_string()}, "
                f"which is not in {trust}"
            )
        return CheckResult(False, SERVER_UNTRUSTED, message, set_ca, details)
    return CheckResult(
        False,
        SERVER_UNTRUSTED,
        f"{obs.target}: server certificate failed verification: {detail}",
        "have the server's certificate fixed (it must be a valid serverAuth certificate from a CA in "
        f"{trust}), or {set_ca}",
        details,
    )


def _name_mismatch(
    obs: Observation, cert: x509.Certificate | None, detail: str, details: dict[str, Any]
) -> CheckResult:
    expected = obs.server_name
    what = "the IP address" if _is_ip(expected) else "the name"
    head = f'{obs.target} does not hold {what} "{expected}"'
    if cert is None:
        return CheckResult(
            False,
            NAME_MISMATCH,
            f"{head} ({detail})",
            f"set server_name for route {obs.route} to a name the server's certificate holds, "
            "or have the certificate reissued",
            details,
        )
    names = [n for n in certificate_names(cert) if n.startswith(("DNS:", "IP:"))]
    if names:
        return CheckResult(
            False,
            NAME_MISMATCH,
            f"{head}: its certificate names {', '.join(names)}",
            f"set server_name for route {obs.route} to one of those names, or have the server certificate "
            f"reissued for {expected}",
            details,
        )
    cn = _common_names(cert)
    only = f"only CN={cn[0]}" if cn else "not even a subject CN"
    return CheckResult(
        False,
        NAME_MISMATCH,
        f"{head}: its certificate has no SANs, {only}",
        f"have the server certificate reissued with a subjectAltName for {expected} "
        "(the subject CN is never checked, per RFC 6125)",
        details,
    )


def _alert(obs: Observation, failure: Failed, details: dict[str, Any]) -> CheckResult:
    alert = alert_name(failure.ssl_reason or "")
    details["alert"] = alert
    after = " after the handshake" if failure.stage == "after_handshake" else ""
    whose = f"{obs.identity}'s"
    if alert == "no application protocol":
        return CheckResult(
            False,
            ALPN_REFUSED,
            f"{obs.target} accepts none of the ALPN protocols we offered ({', '.join(obs.alpn_offered) or 'none'}) "
            f"(TLS alert: {alert})",
            f"set alpn for route {obs.route} to a protocol the server speaks, or remove it",
            details,
        )
    if alert == "protocol version":
        return CheckResult(
            False,
            TLS_ERROR,
            f"{obs.target} and we share no TLS version: we need TLS 1.2 or later (TLS alert: {alert})",
            "the server must be upgraded to TLS 1.2 or later",
            details,
        )
    if alert not in _REJECTING_ALERTS:
        return CheckResult(
            False,
            TLS_ERROR,
            f"{obs.target} ended the TLS connection{after} with alert: {alert}",
            f"look in the server's log for why; `openssl s_client -connect {obs.target} "
            f"-servername {obs.server_name}` shows more",
            details,
        )
    client = obs.client_cert
    subject = client.subject.rfc4514_string() if client is not None else "(none)"
    issuer = client.issuer.rfc4514_string() if client is not None else "(none)"
    head = f"{obs.target} rejected {whose} certificate{after} (TLS alert: {alert})"
    if alert == "unknown ca":
        message = f"{head}: the server does not trust the issuer of {whose} certificate, {issuer}"
        fix = f"have {obs.identity}'s certificate issued by a CA the server trusts, or add {issuer} to its client CAs"
    elif alert == "certificate required":
        message = f"{head}: it wants a client certificate and did not take {subject}"
        fix = f"check which client CAs the server accepts and that {obs.identity}'s certificate is issued by one"
    elif alert == "certificate expired":
        message = f"{head}: the server considers {subject} (or its chain) expired"
        fix = f"run `mtls-sidecar renew {obs.identity}`, and compare the server's clock with this machine's"
    elif alert == "certificate revoked":
        message = f"{head}: {subject} (serial {_serial(client)}) is revoked"
        fix = f"run `mtls-sidecar renew {obs.identity}` to get a new certificate"
    elif alert == "access denied":
        message = f"{head}: it accepted {subject} but does not let it in"
        fix = f"ask the service's owner to allow {subject}, or use another identity for route {obs.route}"
    elif alert == "handshake failure":
        message = f"{head}: most often it does not accept {subject} (issued by {issuer}), or shares no cipher with us"
        fix = "look in the server's log for which; check that it trusts " + issuer
    else:
        message = f"{head}: {subject}, issued by {issuer}"
        fix = (
            f"check that the server trusts {issuer} and that {obs.identity}'s certificate allows clientAuth; "
            "the server's log says why"
        )
    return CheckResult(False, SERVER_REJECTED_CERT, message, fix, details)


def _details(obs: Observation) -> dict[str, Any]:
    details: dict[str, Any] = {
        "route": obs.route,
        "target": obs.target,
        "expected_name": obs.server_name,
        "identity": obs.identity,
        "trust": _trust(obs),
        "alpn_offered": list(obs.alpn_offered),
        "timeout": obs.timeout,
        "checked_at": _rfc3339(obs.now),
        "warnings": [],
    }
    if obs.client_cert is not None:
        details["client_certificate"] = {
            "subject": obs.client_cert.subject.rfc4514_string(),
            "issuer": obs.client_cert.issuer.rfc4514_string(),
            "serial": _serial(obs.client_cert),
            "not_after": _rfc3339(obs.client_cert.not_valid_after_utc),
        }
    if obs.address is not None:
        details["address"] = obs.address
    if obs.failure is not None:
        details["stage"] = obs.failure.stage
        if obs.failure.ssl_reason:
            details["openssl_reason"] = obs.failure.ssl_reason
    if obs.first_bytes and not _looks_like_tls(obs.first_bytes):
        details["first_bytes"] = printable(obs.first_bytes)
    if obs.tls_version is not None:
        details["tls_version"] = obs.tls_version
        details["cipher"] = obs.cipher
        details["alpn"] = obs.alpn
    if obs.server_cert is not None:
        details["server_certificate"] = describe_server_certificate(obs.server_cert, verified=obs.server_cert_verified)
    if obs.probe_error is not None:
        details["probe_error"] = obs.probe_error
    return details


def describe_server_certificate(cert: x509.Certificate, *, verified: bool) -> dict[str, Any]:
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "sans": certificate_names(cert),
        "not_before": _rfc3339(cert.not_valid_before_utc),
        "not_after": _rfc3339(cert.not_valid_after_utc),
        "serial": _serial(cert),
        "verified": verified,
    }


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The subjectAltName entries as "DNS:…", "IP:…", "URI:…", "email:…"."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    names = [f"DNS:{n}" for n in sans.get_values_for_type(x509.DNSName)]
    names += [f"IP:{n}" for n in sans.get_values_for_type(x509.IPAddress)]
    names += [f"URI:{n}" for n in sans.get_values_for_type(x509.UniformResourceIdentifier)]
    names += [f"email:{n}" for n in sans.get_values_for_type(x509.RFC822Name)]
    return names


def _common_names(cert: x509.Certificate) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]


def alert_name(reason: str) -> str:
    """OpenSSL's "TLSV1_ALERT_UNKNOWN_CA" → "unknown ca"; "" when it is no alert."""
    upper = reason.upper()
    if "ALERT_" not in upper:
        return ""
    return upper.split("ALERT_", 1)[1].lower().replace("_", " ")


def printable(data: bytes, limit: int = _SHOWN_BYTES) -> str:
    """The first line of what a server sent, as printable text, truncated."""
    line = data.split(b"\n", 1)[0].rstrip(b"\r") or data
    text = "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in line[:limit])
    return text + ("…" if len(line) > limit else "")


def _looks_like_tls(data: bytes) -> bool:
    """A TLS record starts with a content type 20..23 and protocol major version 3."""
    return data[0] in (20, 21, 22, 23) and (len(data) < 2 or data[1] == 3)


def _trust(obs: Observation) -> dict[str, Any]:
    if obs.skip_verify:
        return {"source": "none (unsafe_skip_verify)", "path": None}
    if obs.ca_file is not None:
        return {"source": "ca_file", "path": str(obs.ca_file)}
    if obs.ca_dir is not None:
        return {"source": "ca_dir", "path": str(obs.ca_dir)}
    return {"source": "system", "path": None}


def _trust_where(obs: Observation) -> str:
    if obs.ca_file is not None:
        return str(obs.ca_file)
    if obs.ca_dir is not None:
        return str(obs.ca_dir)
    return "the system trust store"


def _serial(cert: x509.Certificate | None) -> str:
    return f"{cert.serial_number:x}" if cert is not None else ""


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
