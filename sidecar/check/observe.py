"""`mtls-sidecar check ROUTE`: one real connection to a route's target, observed.

The I/O half of `check` (`sidecar.check.explain` is the pure half): `check_route` makes a
real TCP connection and TLS handshake, through the same `TLSPipe` the tunnel uses, with the
identity's selected certificate, and records what it saw as an `Observation`: plain data, no
exceptions or sockets. `explain` then says what it means.

When our verification of the server fails, a second handshake that verifies nothing and
presents no client certificate fetches the server's certificate, so the explanation can
name its issuer, its names and its dates.

After the handshake the server gets a short window to reject us: a TLS alert (TLS 1.3 sends
it only now), or, for an HTTP target, its answer to `HEAD /` (nginx checks the certificate
after the handshake and answers 400 "The SSL certificate error"). A 400 or 403 to HEAD has no
body to say why, so one `GET /` on a new connection reads it. When the server refused us, a
handshake that presents nothing reads the issuers its CertificateRequest asks for (through
pyOpenSSL: Python's ssl module does not show them).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from contextlib import suppress
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import PurePath
from typing import Any

from cryptography import x509
from OpenSSL import SSL

from sidecar.causes import MAYBE_CERTIFICATE_STATUSES, Cause, Fault, error_text, fault_from
from sidecar.check.dername import name_from_der
from sidecar.check.explain import CheckResult, Observation, explain, is_ip_address
from sidecar.config import ListenAddress, RouteSpec
from sidecar.errors import ConfigError
from sidecar.hostport import host_port
from sidecar.keystore import Selection
from sidecar.policy import peer_chain
from sidecar.protocols import make_stage
from sidecar.protocols.http_host import http_host
from sidecar.protocols.postgres import SSL_REQUEST
from sidecar.revocation.checker import RevocationChecker, check_server_policy
from sidecar.stages import Refuse, SendLocal, SendRemote, Stage, StartTLS
from sidecar.tlsctx import ServerPolicy, build_client_context
from sidecar.tlspipe import (
    CertificateRejected,
    CloseNotify,
    Event,
    Failed,
    HandshakeDone,
    Received,
    Reset,
    TLSPipe,
    Truncated,
)
from sidecar.upstreamdial import connect_first, dial_through
from sidecar.upstreamproxy import UpstreamProxyError, parse_proxy_url

# How long to listen after our side of the handshake completes: with TLS 1.3 a server
# rejects our certificate only after that, with an alert on the first read.
AFTER_HANDSHAKE_WAIT = 1.0

_CHUNK = 65536
_KEEP_FIRST_BYTES = 256  # of the real handshake: enough to show what a plaintext server said
_KEEP_PROBE_BYTES = 256 * 1024  # of the probe: a TLS 1.2 certificate flight, to read the certificate from
_KEEP_BODY = 4096  # of an HTTP answer's body: where a server says why it refused us
_MAX_HEAD = 64 * 1024
_HTTP_ALPN = frozenset({"http/1.1", "h2"})
_HTTP_PORTS = frozenset({443, 8443})
# After these, ask the server which issuers it wants (a handshake that got somewhere, then failed).
_REFUSALS = frozenset({Cause.SERVER_REJECTED_CERT, Cause.SERVER_REJECTED_CERT_HTTP, Cause.CONNECT})
_NO_LOCAL = ListenAddress("tcp", "127.0.0.1", 0)  # check has no local listener; stages only name it in rewrites


async def check_route(
    route: RouteSpec,
    selection: Selection,
    *,
    timeout: float | None = None,
    after_handshake_wait: float = AFTER_HANDSHAKE_WAIT,
    renew: str | None = None,
    identity_warning: str | None = None,
) -> CheckResult:
    """Connect to the route's target as its identity would, and explain what happened.

    `timeout` (default: the route's connect_timeout) bounds DNS, TCP connect and the TLS
    handshake together; the server is then given `after_handshake_wait` seconds to reject
    our certificate (TLS 1.3), or, for an HTTP target, to answer `HEAD /`. A failed
    verification, an HTTP answer that needs its body, and a refusal each add one more
    bounded handshake. `renew`: the identity's renew setting ("none": fixes never say renew).
    `identity_warning`: the daemon's expiry warning for the identity, a line of the result.
    """
    start = observe_start(route, selection, now=datetime.now(UTC), timeout=timeout, renew=renew)
    start = replace(start, identity_warning=identity_warning)
    credential = selection.selected
    if credential is None:
        return explain(start)  # never contact a server with nothing to present
    policy = ServerPolicy.for_route(route)
    try:
        ctx = build_client_context(credential, policy)
    except ConfigError as exc:
        return explain(replace(start, failure=Fault("setup", "config", str(exc))))
    except (ssl.SSLError, OSError, ValueError) as exc:
        return explain(replace(start, failure=Fault("setup", "credential", error_text(exc))))
    observation = await _handshake(start, ctx, after_handshake_wait, make_stage(route, _NO_LOCAL))
    if observation.http_host is not None and observation.failure is None:
        if observation.alpn == "h2" and observation.after_handshake != "closed":
            # HTTP/1.1 cannot be spoken on an h2 connection: ask on one that offers only http/1.1.
            ctx = build_client_context(credential, replace(policy, alpn=("http/1.1",)))
            again = await _handshake(start, ctx, after_handshake_wait, make_stage(route, _NO_LOCAL))
            observation = _with_http_answer(observation, again)
        if _status_code(observation.http_status) in MAYBE_CERTIFICATE_STATUSES and not observation.http_body:
            # HEAD's answer has no body, and only the body says whether a 400 is about our certificate.
            again = await _handshake(start, ctx, after_handshake_wait, make_stage(route, _NO_LOCAL), "GET")
            observation = _with_http_answer(observation, again)
    if route.protocol == "tcp" and _hung_up_on_our_hello(observation):
        observation = replace(observation, speaks=await _sniff_postgres(observation))
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
    if explain(observation).cause in _REFUSALS and (observation.tls_version or observation.first_bytes):
        observation = await _acceptable_issuers(observation, make_stage(route, _NO_LOCAL))
    return explain(observation)


def is_http_target(route: RouteSpec) -> bool:
    """Where `check` asks `HEAD /`: http routes, and tcp routes to port 443 or 8443 or with ALPN
    http/1.1 or h2 (a local HTTP client behind a plain tunnel)."""
    if route.protocol == "http":
        return True
    return route.protocol == "tcp" and (route.target_port in _HTTP_PORTS or bool(_HTTP_ALPN & set(route.alpn)))


def observe_start(
    route: RouteSpec, selection: Selection, *, now: datetime, timeout: float | None, renew: str | None = None
) -> Observation:
    """The part of an observation known before any connection."""
    selected = selection.selected
    cert = selected.cert if selected is not None else None
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
        client_chain=selected.chain if selected is not None else (),
        client_file=selected.file if selected is not None else None,
        renew=renew,
        unusable=None if selection.selected is not None else selection.why_unusable(),
        rejected=rejected,
        identity_folder=folders.pop() if len(folders) == 1 else None,
        protocol=route.protocol,
        local_tls=route.local_tls,
        http_host=http_host(route) if is_http_target(route) else None,
        upstream_proxy=route.upstream_proxy,
        upstream_proxy_auth_env=route.upstream_proxy_auth_env,
    )


class _Wire:
    """TLS over a non-blocking socket through the sans-I/O `TLSPipe`, keeping the first raw bytes."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_name: str, keep: int) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.pipe = TLSPipe(ctx, _sni(server_name))
        self.tls = self.pipe.tls
        self.received = bytearray()
        self._keep = keep
        self._pending: list[Event] = []

    async def handshake(self) -> None:
        while True:
            for event in self.pipe.events():
                if isinstance(event, HandshakeDone):
                    await self._flush()
                    return
                if isinstance(event, Failed | CertificateRejected):
                    with suppress(OSError):
                        await self._flush()  # our alert, so the server's log says why
                    raise event.error
            await self._flush()
            await self._fill()

    async def read(self) -> bytes:
        """Application bytes; b"" at the server's EOF. A TLS alert raises ssl.SSLError."""
        while True:
            if not self._pending:
                self._pending = self.pipe.events()
                await self._flush()  # key updates and the like are answered from inside read()
            while self._pending:
                event = self._pending.pop(0)
                if isinstance(event, Received):
                    return event.data
                if isinstance(event, CloseNotify | Truncated):
                    return b""
                if isinstance(event, Failed | CertificateRejected | Reset):
                    raise event.error
            await self._fill()

    async def close_notify(self) -> None:
        self.pipe.send_eof()
        with suppress(OSError):
            await self._flush()

    async def _flush(self) -> None:
        data = self.pipe.data_to_send()
        if data:
            await self.loop.sock_sendall(self.sock, data)

    async def _fill(self) -> None:
        data = await self.loop.sock_recv(self.sock, _CHUNK)
        if len(self.received) < self._keep:
            self.received += data[: self._keep - len(self.received)]
        if data:
            self.pipe.receive_data(data)
        else:
            self.pipe.receive_eof()


async def _resolve(host: str, port: int) -> list[tuple[Any, ...]]:
    loop = asyncio.get_running_loop()
    return list(await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))


async def _connect_first(infos: list[tuple[Any, ...]], held: list[socket.socket]) -> str:
    """Connect to the first address that answers; the socket goes into `held` (the caller closes it)."""
    sock = await connect_first(infos)
    held.append(sock)
    host, port = sock.getpeername()[:2]
    return host_port(host, port)


async def _open(obs: Observation, held: list[socket.socket]) -> tuple[str, bytes]:
    """A connection to the target, as the tunnel makes it: directly, or through the route's
    upstream proxy. The socket goes into `held`; returns the address connected to and the bytes
    the proxy sent past its answer (the target's first words)."""
    if obs.upstream_proxy is None:
        return await _connect_first(await _resolve(obs.host, obs.port), held), b""
    proxy = parse_proxy_url(obs.upstream_proxy, obs.upstream_proxy_auth_env)
    sock, leftover = await dial_through(proxy, obs.host, obs.port)
    held.append(sock)
    return f"{obs.target} through {proxy.url}", leftover


async def _handshake(
    obs: Observation, ctx: ssl.SSLContext, after_wait: float, stage: Stage, http_method: str = "HEAD"
) -> Observation:
    held: list[socket.socket] = []
    try:
        return await _handshake_on(obs, ctx, after_wait, held, stage, http_method)
    finally:
        for sock in held:
            sock.close()


async def _handshake_on(
    obs: Observation,
    ctx: ssl.SSLContext,
    after_wait: float,
    held: list[socket.socket],
    stage_: Stage,
    http_method: str,
) -> Observation:
    stage = "resolve"
    wire: _Wire | None = None
    address: str | None = None
    try:
        async with asyncio.timeout(obs.timeout):
            if obs.upstream_proxy is None:
                infos = await _resolve(obs.host, obs.port)
                stage = "connect"
                address = await _connect_first(infos, held)
                leftover = b""
            else:
                stage = "connect"
                address, leftover = await _open(obs, held)
            stage = "handshake"
            if not stage_.transparent:  # the route's protocol speaks before TLS (SSLRequest, a greeting)
                leftover = await _prelude(held[0], stage_, leftover)
            wire = _Wire(held[0], ctx, obs.server_name, _KEEP_FIRST_BYTES)
            if leftover:
                wire.pipe.receive_data(leftover)
            await wire.handshake()
    except _PreludeRefused as refused:
        return replace(obs, address=address, failure=refused.fault, prelude_error=refused.message)
    except Exception as exc:
        first = bytes(wire.received) if wire is not None else b""
        return replace(obs, address=address, failure=fault_from(stage, exc), first_bytes=first)
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
    if obs.http_host is not None and done.alpn != "h2":  # an HTTP target: ask what its requests would get
        return await _http_answer(done, wire, http_method)
    # Send nothing and listen: with TLS 1.3 a server that rejects our certificate says so now.
    # Most servers wait for their client to speak first, so silence until the deadline is fine.
    try:
        async with asyncio.timeout(after_wait):
            data = await wire.read()
    except TimeoutError:
        after = "silent"
    except Exception as exc:
        return replace(done, failure=fault_from("after_handshake", exc))
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
            _, leftover = await _open(obs, held)
            wire = _Wire(held[0], ctx, obs.server_name, _KEEP_PROBE_BYTES)
            if leftover:
                wire.pipe.receive_data(leftover)
            await wire.handshake()
            der = wire.tls.getpeercert(binary_form=True)
    except Exception as exc:
        # TLS 1.2 servers that require a client certificate end this handshake, but they
        # sent their certificate in the clear before that.
        der = certificate_from_tls12_flight(bytes(wire.received)) if wire is not None else None
        if der is None:
            error = error_text(exc)
    finally:
        for sock in held:
            sock.close()
    cert = _load_der(der)
    if der and cert is None:
        error = "the server's certificate is not readable X.509"
    return replace(obs, server_cert=cert, server_cert_verified=False, probe_error=error)


class _PreludeRefused(Exception):
    def __init__(self, fault: Fault, message: str) -> None:
        super().__init__(message)
        self.fault = fault
        self.message = message


async def _prelude(sock: socket.socket, stage: Stage, first: bytes = b"") -> bytes:
    """Run the route's protocol up to TLS, as the tunnel would (the same stage), with no local
    client: what it would tell one is dropped, unless the stage knows what a client would
    answer (`check_reply`: MySQL's greeting needs a HandshakeResponse before the stage asks the
    server for TLS). `first`: what the server already sent (past an upstream proxy's answer).
    Returns bytes read past the prelude."""
    loop = asyncio.get_running_loop()
    commands = stage.connected()
    opening = getattr(stage, "check_opening", None)  # a protocol whose client must speak before TLS
    if callable(opening):
        commands += opening()
    reply_to = getattr(stage, "check_reply", None)  # a protocol whose client answers the server first
    while True:
        for command in commands:
            if isinstance(command, SendLocal) and callable(reply_to):
                reply = reply_to(command.data)
                if reply is not None:
                    commands += stage.from_local(reply)  # in place: this loop goes on to the stage's answer
            elif isinstance(command, SendRemote):
                await loop.sock_sendall(sock, command.data)
            elif isinstance(command, StartTLS):
                return command.leftover
            elif isinstance(command, Refuse):
                raise _PreludeRefused(command.fault, command.message)
        data, first = first or await loop.sock_recv(sock, _CHUNK), b""
        if not data:
            raise ConnectionResetError("the server closed the connection before TLS started")
        commands = stage.from_remote(data)


async def _http_answer(obs: Observation, wire: _Wire, method: str) -> Observation:
    """Send one request (HEAD /, or GET / for the body of a refusal) with the Host the route
    gives requests; keep the status line and the start of the body."""
    assert obs.http_host is not None
    request = (
        f"{method} / HTTP/1.1\r\nHost: {obs.http_host}\r\nUser-Agent: mtls-sidecar-check\r\nAccept: */*\r\n"
        "Connection: close\r\n\r\n"
    )
    answer = bytearray()
    try:
        async with asyncio.timeout(max(obs.timeout, 1.0)):
            wire.pipe.send(request.encode())
            await wire._flush()
            while not _answer_complete(answer, method):
                data = await wire.read()
                if not data:
                    break
                answer += data
    except TimeoutError:
        if not answer:
            return replace(obs, after_handshake="silent")
    except Exception as exc:
        if not answer:
            return replace(obs, failure=fault_from("after_handshake", exc))
    if not answer:
        return replace(obs, after_handshake="closed")
    head, _, body = bytes(answer).partition(b"\r\n\r\n")
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    if not line.startswith("HTTP/") and obs.protocol != "http":
        return replace(obs, after_handshake="data")  # a tcp route's target that is no HTTP server after all
    return replace(obs, after_handshake="data", http_status=line, http_method=method, http_body=body[:_KEEP_BODY])


def _answer_complete(answer: bytearray, method: str) -> bool:
    end = answer.find(b"\r\n\r\n")
    if end < 0:
        return len(answer) >= _MAX_HEAD or (len(answer) >= 5 and not answer.startswith(b"HTTP/"))
    return method == "HEAD" or len(answer) - end - 4 >= _KEEP_BODY


def _status_code(status_line: str | None) -> int | None:
    parts = (status_line or "").split(" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def _with_http_answer(obs: Observation, again: Observation) -> Observation:
    """The HTTP answer a second connection got, when it got one; else what the first one saw."""
    if again.http_status is None:
        return obs
    return replace(obs, http_status=again.http_status, http_method=again.http_method, http_body=again.http_body)


async def _acceptable_issuers(obs: Observation, stage: Stage) -> Observation:
    """Which issuers the server's CertificateRequest asks for, from one more handshake that
    presents no certificate and verifies nothing.

    Python's ssl module does not show them; OpenSSL keeps them for the client
    (SSL_get_client_CA_list), and pyOpenSSL reads them, for TLS 1.3 (where the request is
    encrypted) as for TLS 1.2. Over memory BIOs, on the same event loop.
    """
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_verify(SSL.VERIFY_NONE)
    tls = SSL.Connection(ctx, None)
    tls.set_connect_state()
    if not is_ip_address(_sni(obs.server_name)):
        tls.set_tlsext_host_name(_sni(obs.server_name).encode("idna"))
    loop = asyncio.get_running_loop()
    held: list[socket.socket] = []
    error: BaseException | None = None
    try:
        async with asyncio.timeout(obs.timeout):
            _, leftover = await _open(obs, held)
            if not stage.transparent:
                leftover = await _prelude(held[0], stage, leftover)
            if leftover:
                tls.bio_write(leftover)
            while not _handshake_step(tls):
                outgoing = _drain_bio(tls)
                if outgoing:
                    await loop.sock_sendall(held[0], outgoing)
                data = await loop.sock_recv(held[0], _CHUNK)
                if not data:
                    raise ConnectionResetError("the server closed the connection")
                tls.bio_write(data)
    except Exception as exc:  # a server that requires a certificate ends this handshake: expected
        error = exc
    finally:
        for sock in held:
            sock.close()
    names = []
    for name in tls.get_client_ca_list():
        try:
            names.append(name_from_der(name.der()))
        except ValueError:
            continue  # one name we cannot read; the others still say what the server wants
    if names or tls.get_peer_cert_chain() is not None:  # the server's flight arrived: what it asked for is known
        return replace(obs, acceptable_issuers=tuple(names))
    reason = error_text(error) if error is not None else "no server certificate"
    return replace(obs, acceptable_issuers_unknown=f"a handshake to read them failed: {reason}")


def _handshake_step(tls: SSL.Connection) -> bool:
    """One step of pyOpenSSL's handshake: True when it is done, False when it needs bytes."""
    try:
        tls.do_handshake()
    except SSL.WantReadError:
        return False
    return True


def _drain_bio(tls: SSL.Connection) -> bytes:
    out = bytearray()
    while True:
        try:
            out += tls.bio_read(_CHUNK)
        except SSL.WantReadError:
            return bytes(out)


def _hung_up_on_our_hello(obs: Observation) -> bool:
    failure = obs.failure
    return (
        failure is not None
        and failure.stage == "handshake"
        and failure.kind in ("reset", "closed")
        and not obs.first_bytes
    )


async def _sniff_postgres(obs: Observation) -> str | None:
    """A server that hung up on our TLS hello may be PostgreSQL waiting for its SSLRequest:
    ask it, briefly. "postgres" when it answers like one."""
    held: list[socket.socket] = []
    try:
        async with asyncio.timeout(min(obs.timeout, 2.0)):
            _, leftover = await _open(obs, held)
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(held[0], SSL_REQUEST)
            answer = leftover[:1] or await loop.sock_recv(held[0], 1)
    except (OSError, TimeoutError, UpstreamProxyError):
        return None
    finally:
        for sock in held:
            sock.close()
    return "postgres" if answer in (b"S", b"N") else None


def _load_der(der: bytes | None) -> x509.Certificate | None:
    if not der:
        return None
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        return None


def _sni(name: str) -> str:
    return name.strip("[]")


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
