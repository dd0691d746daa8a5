"""The stage in front of a CONNECT or SOCKS tunnel's protocol stage. Pure.

It answers the client's CONNECT or SOCKS request at the right moment: the granted answer
(`200 Connection established`, SOCKS `0x00`) goes out once the destination is reached over mTLS
and checked, or just before the protocol stage first speaks to the client (a MySQL server's
greeting comes before any TLS), and a failure before that is answered in the client's own
terms (`502` with the reason, a SOCKS error code) instead of a bare close. Then it looks at the
client's first bytes: a TLS ClientHello means the client does its own TLS, to which our client
certificate cannot be added, and is refused with that reason, unless the rule says
`passthrough` (no TLS of ours at all). From there on it steps aside when the protocol stage does.
"""

from __future__ import annotations

from collections.abc import Callable

from sidecar.causes import Cause, Fault
from sidecar.stages import Close, Command, EndLocal, PassThrough, Refuse, SendLocal, Stage

_TLS_RECORD = b"\x16\x03"  # a TLS handshake record (a ClientHello) of any version


class Relay(PassThrough):
    """`passthrough = true`: the client's bytes go to the destination as they are, with no TLS of
    ours (the connection opens no TLS at all and never says StartTLS)."""

    def connected(self) -> list[Command]:
        return []


class ProxyTunnelStage:
    def __init__(
        self,
        inner: Stage,
        granted: bytes,
        failed: Callable[[Cause, str], bytes],
        *,
        refuse_client_tls: bool,
        destination: str,
    ) -> None:
        self.inner = inner
        self._granted = granted
        self._failed = failed
        self._guard = refuse_client_tls  # the client's first bytes are still to be looked at
        self._first = b""  # a first byte alone, held until the next says whether it is a ClientHello
        self._destination = destination
        self._opened = False  # the granted answer went out
        self._held: list[bytes] = []  # what the client sent before it (clients wait; a few do not)
        self._held_eof = False
        self._over = False

    @property
    def transparent(self) -> bool:
        return self._opened and not self._guard and self.inner.transparent

    @property
    def judging_answer(self) -> bool:
        return bool(getattr(self.inner, "judging_answer", False))

    # --- the remote

    def connected(self) -> list[Command]:
        return self._wrap(self.inner.connected())

    def tls_established(self) -> list[Command]:
        if self._over:
            return []
        out = self._wrap(self.inner.tls_established())
        if not self._opened:
            out = [SendLocal(self._granted), *out]
            self._opened = True
        return out + self._release_held()

    def remote_failed(self, cause: Cause, message: str) -> list[Command]:
        if self._over:
            return []
        if not self._opened:
            self._over = True
            return [SendLocal(self._failed(cause, message)), Close()]
        return self.inner.remote_failed(cause, message)

    def from_remote(self, data: bytes) -> list[Command]:
        return self._wrap(self.inner.from_remote(data))

    def remote_eof(self) -> list[Command]:
        return self._wrap(self.inner.remote_eof())

    # --- the local client

    def from_local(self, data: bytes) -> list[Command]:
        if self._over or not data:
            return []
        if not self._opened:
            self._held.append(data)
            return []
        if self._guard:
            data = self._first + data
            if data == _TLS_RECORD[:1]:  # one byte so far, the start of a TLS record: wait for the next
                self._first = data
                return []
            self._guard, self._first = False, b""
            if data.startswith(_TLS_RECORD):
                self._over = True
                message = (
                    f"the client began its own TLS inside the tunnel to {self._destination}: our client "
                    "certificate cannot be added to it; use http:// (the sidecar adds the TLS), or set "
                    "passthrough = true on the rule if this host needs no client certificate"
                )
                return [Refuse(Fault("local", "client_tls", "ClientHello inside CONNECT"), message)]
        return self._wrap(self.inner.from_local(data))

    def local_eof(self) -> list[Command]:
        if self._over:
            return []
        if not self._opened:
            self._held_eof = True
            return []
        out: list[Command] = []
        if self._guard and self._first:  # a lone first byte, then EOF: it was not a ClientHello
            out = self._wrap(self.inner.from_local(self._first))
        self._guard, self._first = False, b""
        return out + self._wrap(self.inner.local_eof())

    # --- internals

    def _wrap(self, commands: list[Command]) -> list[Command]:
        """The granted answer goes before the first thing the protocol stage says to the client."""
        if self._opened or self._over:
            return commands
        for index, command in enumerate(commands):
            if isinstance(command, SendLocal | EndLocal):
                self._opened = True
                return [*commands[:index], SendLocal(self._granted), *commands[index:], *self._release_held()]
        return commands

    def _release_held(self) -> list[Command]:
        held, self._held = self._held, []
        out: list[Command] = []
        for data in held:
            out += self.from_local(data)
        if self._held_eof:
            self._held_eof = False
            out += self.local_eof()
        return out
