"""A selected credential plus a route's server policy → `ssl.SSLContext`, cached.

Building a context (parsing the trust store, loading the key) costs milliseconds; a route
makes one per credential and reuses it for every connection until the selection changes.
"""

from __future__ import annotations

import logging
import os
import secrets
import ssl
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sidecar.config import RouteSpec
from sidecar.credentials import Candidate
from sidecar.errors import ConfigError
from sidecar.tlspipe import Prepared, prepare

log = logging.getLogger("sidecar.tlsctx")

# A resumed connection takes the server's newer ticket only once the kept one is this old (s).
SESSION_REFRESH = 60.0


@dataclass(frozen=True)
class ServerPolicy:
    """How a route checks the server: trust, ALPN, and the loudly named escape hatch."""

    ca_file: Path | None = None
    ca_dir: Path | None = None
    alpn: tuple[str, ...] = ()
    skip_verify: bool = False
    # Routes with pins, URI SANs or revocation checks get contexts (and so TLS sessions) of
    # their own: a session made on a route without them is never resumed on one with them.
    checks_after_handshake: bool = False

    @classmethod
    def for_route(cls, route: RouteSpec) -> ServerPolicy:
        return cls(route.ca_file, route.ca_dir, route.alpn, route.unsafe_skip_verify, route.checks_after_handshake)

    def describe_trust(self) -> str:
        if self.ca_file:
            return f"ca_file {self.ca_file}"
        if self.ca_dir:
            return f"ca_dir {self.ca_dir}"
        return "the system trust store"


def build_client_context(credential: Candidate | None, policy: ServerPolicy) -> ssl.SSLContext:
    """A TLS ≥ 1.2 client context that verifies servers strictly (RFC 6125, never the CN)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # A TLS 1.2 server may not start a second handshake: its new certificate would never meet
    # the route's pins, URI SANs or revocation check, which run once, after the first.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    if policy.skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        # OpenSSL otherwise falls back to the subject CN when a certificate has no DNS SAN.
        ctx.hostname_checks_common_name = False
        _load_trust(ctx, policy)
    if policy.alpn:
        ctx.set_alpn_protocols(list(policy.alpn))
    if credential is not None:
        load_credential(ctx, credential)
    return ctx


def check_trust_files(fields: Mapping[str, Any], *, source: str, base_dir: Path) -> None:
    """Refuse a route's `ca_file` / `ca_dir` that could not be loaded, before the route is saved.

    Otherwise the route would be written and only its first connection would find out. Relative
    paths count from `base_dir` (the config file's folder), as in config.toml.
    """
    for key in ("ca_file", "ca_dir"):
        value = fields.get(key)
        if not isinstance(value, str):  # absent; or not a path at all, which the config parser words
            continue
        path = Path(value).expanduser()
        problem = _ca_file_problem(base_dir / path) if key == "ca_file" else _ca_dir_problem(base_dir / path)
        if problem:
            hint = "give a PEM file of the CA certificate(s) that issued the server's certificate"
            raise ConfigError(problem, source=source, field=key, value=str(value), hint=hint)


def _ca_file_problem(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "no such file"
    except IsADirectoryError:
        return "a folder, not a file"
    except OSError as exc:
        return f"cannot read the file: {exc.strerror or exc}"
    if b"-----BEGIN CERTIFICATE-----" not in data:
        return "holds no certificate (no -----BEGIN CERTIFICATE----- block)" if data.strip() else "the file is empty"
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        return "a certificate in it is malformed"
    return None


def _ca_dir_problem(path: Path) -> str | None:
    return None if path.is_dir() else "no such folder"


def _load_trust(ctx: ssl.SSLContext, policy: ServerPolicy) -> None:
    if policy.ca_file is None and policy.ca_dir is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        return
    try:
        ctx.load_verify_locations(
            cafile=str(policy.ca_file) if policy.ca_file else None,
            capath=str(policy.ca_dir) if policy.ca_dir else None,
        )
    except (OSError, ssl.SSLError) as exc:
        where = policy.ca_file or policy.ca_dir
        field = "ca_file" if policy.ca_file else "ca_dir"
        raise ConfigError(
            f"cannot load trusted CA certificates: {getattr(exc, 'strerror', None) or exc}",
            source=str(where),
            field=field,
            hint="point it at a PEM file (or folder) of CA certificates",
        ) from exc


def load_credential(ctx: ssl.SSLContext, credential: Candidate) -> None:
    """Load certificate, chain and key into `ctx` without the clear key touching the disk.

    `ssl` loads keys only from files. The key is re-encrypted with a one-time password
    and handed over through an anonymous memory file where the OS has one.
    """
    assert credential.cert is not None and credential.key is not None
    password = secrets.token_bytes(32)
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (credential.cert, *credential.chain))
    key_pem = credential.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    with _transient_file(chain_pem + key_pem) as path:
        ctx.load_cert_chain(path, password=password)


@contextmanager
def _transient_file(data: bytes) -> Iterator[str]:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("mtls-sidecar-credential", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="mtls-sidecar-") as folder:
        path = os.path.join(folder, "credential.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        yield path


class ContextCache:
    """One context per (credential, policy); a small LRU so renewals don't accumulate.

    It also keeps the newest TLS session per context and server (`session`/`remember`), so a
    route's next connection resumes instead of repeating the full handshake. A session never
    crosses identities or policies: it is filed under the very context that made it, and
    dropped with it.
    """

    def __init__(self, size: int = 32) -> None:
        self._size = size
        self._contexts: OrderedDict[tuple[str, ServerPolicy], ssl.SSLContext] = OrderedDict()
        self._sessions: dict[tuple[int, str, str], tuple[ssl.SSLContext, ssl.SSLSession, float]] = {}
        # The next connection's SSLObject, made ahead with the session it will offer (tlspipe.prepare).
        self._prepared: dict[tuple[int, str, str], tuple[ssl.SSLContext, Prepared]] = {}
        self.builds = 0

    def session(self, ctx: ssl.SSLContext, server_name: str, target: str) -> ssl.SSLSession | None:
        """The session to offer for a new connection made with `ctx` to `server_name` at `target`."""
        entry = self._sessions.get((id(ctx), server_name, target))
        return entry[1] if entry is not None and entry[0] is ctx else None

    def session_is_fresh(self, ctx: ssl.SSLContext, server_name: str, target: str) -> bool:
        """True while the kept session is younger than SESSION_REFRESH: no need to read a new one.

        Reading a session out of a connection costs about as much as a resumed handshake
        (Python copies it through DER), so resumed connections skip it while this holds.
        """
        entry = self._sessions.get((id(ctx), server_name, target))
        return entry is not None and entry[0] is ctx and time.monotonic() - entry[2] < SESSION_REFRESH

    def remember(self, ctx: ssl.SSLContext, server_name: str, target: str, session: ssl.SSLSession) -> None:
        if len(self._sessions) >= 4 * self._size:
            self._sessions.clear()
            self._prepared.clear()
        self._sessions[(id(ctx), server_name, target)] = (ctx, session, time.monotonic())

    def take_prepared(self, ctx: ssl.SSLContext, server_name: str, target: str) -> Prepared | None:
        """The SSLObject made ahead for the next connection, if it offers the session kept now."""
        entry = self._prepared.pop((id(ctx), server_name, target), None)
        if entry is None or entry[0] is not ctx:
            return None
        if entry[1].session is not self.session(ctx, server_name, target):
            return None  # a newer session came meanwhile: offer that one
        return entry[1]

    def prepare(self, ctx: ssl.SSLContext, server_name: str, target: str) -> None:
        """Make the next connection's SSLObject now (worth it only when a session is offered)."""
        key = (id(ctx), server_name, target)
        session = self.session(ctx, server_name, target)
        if session is None or key in self._prepared:
            return
        self._prepared[key] = (ctx, prepare(ctx, server_name, session))

    def _forget_sessions(self, ctx: ssl.SSLContext) -> None:
        for key in [k for k, (c, _, _) in self._sessions.items() if c is ctx]:
            del self._sessions[key]
        for key in [k for k, (c, _) in self._prepared.items() if c is ctx]:
            del self._prepared[key]

    def forget_trust(self) -> None:
        """A trust file (ca_file, ca_dir) changed: drop every context and its sessions, so the
        next connection builds its context from the files as they are now. A resumed session
        would skip verification, so sessions go with their contexts."""
        self._contexts.clear()
        self._sessions.clear()
        self._prepared.clear()

    def peek(self, credential: Candidate | None, policy: ServerPolicy) -> ssl.SSLContext | None:
        """The context a new connection would use now, if it is built (None: it would be a new one)."""
        return self._contexts.get((credential.fingerprint if credential else "", policy))

    def get(self, credential: Candidate | None, policy: ServerPolicy) -> ssl.SSLContext:
        """The client context for `credential` (None: present no client certificate) under `policy`."""
        key = (credential.fingerprint if credential else "", policy)
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = build_client_context(credential, policy)
            self.builds += 1
            self._contexts[key] = ctx
            while len(self._contexts) > self._size:
                self._forget_sessions(self._contexts.popitem(last=False)[1])
        else:
            self._contexts.move_to_end(key)
        return ctx
