"""Connection stages: the small, sans-I/O steps a tunnelled connection is made of.

A connection is a chain (the picture is in docs/architecture.md):

    local client ─▶ protocol stage ─▶ TLS pipe ─▶ remote stage ─▶ remote socket

A stage is told what happens on either side of it (`connected`, `tls_established`,
`from_local`, `from_remote`, `local_eof`, `remote_eof`, `remote_failed`) and answers with
commands for the connection to carry out (`SendLocal`, `SendRemote`, `EndLocal`,
`EndRemote`, `StartTLS`, `Refuse`, `Close`, `Count`, `Handoff`). It never touches a socket, so every protocol is
testable by feeding it bytes.

Order of calls: the local client's bytes reach a non-transparent stage from the start
(`from_local`, before the remote is even connected: an HTTP stage reads the request, a
PostgreSQL stage answers the client's SSLRequest); `connected` when the remote's TCP is up;
the stage says `StartTLS` when the remote is ready for the handshake; `tls_established` once
the handshake and the route's checks passed (only then may it send what the client said
through TLS); `remote_failed` instead, when connecting, the handshake or the checks failed
(an HTTP stage answers 502 then; the default is to close).

- The **protocol stage** sits between the local client and the TLS pipe. Its "remote" side is
  the socket itself until it says `StartTLS`, and the TLS pipe's plaintext after: so it may
  speak before TLS starts (PostgreSQL's SSLRequest and the `N` a local client is told,
  MySQL's greeting and its in-band SSL switch) and rewrite bytes after (HTTP headers).
- The **remote stage** sits between the TLS pipe and the remote socket and may speak on the
  socket before TLS starts; its `StartTLS` means "the socket is ready: start the chain above".
  None is configured today. A route's upstream proxy (HTTP CONNECT, SOCKS5) does not need one:
  its dialogue runs before the chain exists (`sidecar.upstreamdial.open_to_target`, driving the
  sans-I/O `sidecar.upstreamproxy`), and hands the chain a socket already tunnelled to the
  target, with the bytes the proxy sent past its answer delivered first.

Once a stage has nothing left to do it sets `transparent`, and from then on the connection
does not call it: bytes flow untouched and cost nothing extra. `PassThrough`, the `tcp`
protocol, is transparent from the start: TLS at once, bytes untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sidecar.causes import Cause, Fault


@dataclass(frozen=True)
class SendLocal:
    data: bytes


@dataclass(frozen=True)
class SendRemote:
    """To the remote: raw on the socket before `StartTLS`, through the TLS pipe after."""

    data: bytes


@dataclass(frozen=True)
class EndLocal:
    """No more bytes for the local client (a half-close: it may go on sending)."""


@dataclass(frozen=True)
class EndRemote:
    """No more bytes for the remote (TLS close_notify and a TCP half-close)."""


@dataclass(frozen=True)
class StartTLS:
    """Start the TLS handshake with the remote now (the protocol stage), or: the socket is
    ready for the stages above (the remote stage). `leftover`: bytes read past the stage's
    own prelude, which belong to the next step."""

    leftover: bytes = b""


@dataclass(frozen=True)
class StartLocalTLS:
    """From here on the local client speaks TLS to us (after we agreed, e.g. PostgreSQL's `S`):
    the connection decrypts what it sends and encrypts what it gets, with the route's local
    certificate (`local_tls`), and the stage keeps seeing plaintext. `leftover`: bytes the
    client sent past its request for TLS (MySQL clients send their hello without waiting)."""

    leftover: bytes = b""


@dataclass(frozen=True)
class Close:
    """End the connection once what was sent to the local client is flushed."""


@dataclass(frozen=True)
class Refuse:
    """End the connection: the stage cannot go on. `fault` says why, as data."""

    fault: Fault
    message: str


@dataclass(frozen=True)
class Count:
    """Count a failure for the route and go on: the remote's answer is one (an HTTP server's 400
    "The SSL certificate error" after a handshake that passed), and the local client still gets
    it as it is. `fault` says why, as data."""

    fault: Fault
    message: str


@dataclass(frozen=True)
class Handoff:
    """The local client now asks for something this connection does not serve (an HTTP proxy
    client's next request names another host): end the remote side, and give the local client
    back to whoever accepted it, `data` first (what it sent that this stage did not use)."""

    data: bytes


Command = SendLocal | SendRemote | EndLocal | EndRemote | StartTLS | StartLocalTLS | Refuse | Close | Count | Handoff


class Stage(Protocol):
    @property
    def transparent(self) -> bool:
        """Nothing left to do: the connection stops calling the stage, bytes pass untouched."""
        ...

    def connected(self) -> list[Command]:
        """The TCP connection to the remote is up (nothing has been sent on it yet)."""
        ...

    def tls_established(self) -> list[Command]:
        """The handshake and the route's checks passed: `SendRemote` now goes through TLS."""
        ...

    def remote_failed(self, cause: Cause, message: str) -> list[Command]:
        """The remote could not be reached, or refused us, or failed the route's checks (the
        failure is already counted). Without a `Close` the local side stays open for the stage."""
        ...

    def from_local(self, data: bytes) -> list[Command]: ...

    def local_eof(self) -> list[Command]: ...

    def from_remote(self, data: bytes) -> list[Command]:
        """Raw socket bytes before this stage said StartTLS; the TLS pipe's plaintext after."""
        ...

    def remote_eof(self) -> list[Command]: ...


class PassThrough:
    """The `tcp` protocol: TLS at once, then every byte passes untouched in both directions."""

    transparent = True

    def connected(self) -> list[Command]:
        return [StartTLS()]

    def tls_established(self) -> list[Command]:
        return []

    def remote_failed(self, cause: Cause, message: str) -> list[Command]:
        return [Close()]

    def from_local(self, data: bytes) -> list[Command]:
        return [SendRemote(data)]

    def local_eof(self) -> list[Command]:
        return [EndRemote()]

    def from_remote(self, data: bytes) -> list[Command]:
        return [SendLocal(data)]

    def remote_eof(self) -> list[Command]:
        return [EndLocal()]
