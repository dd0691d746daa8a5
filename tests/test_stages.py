"""The connection chain with a stage that speaks before TLS and rewrites after, over real sockets.

`StartTLSLine` is a toy protocol in the shape of PostgreSQL's and MySQL's in-band TLS: the
server greets in plaintext ("READY"), the stage asks "STARTTLS" on the raw socket, the server
says "GO" and upgrades the same connection to TLS, and from then on the stage upper-cases what the
local client sends. The server is real (asyncio's start_tls); the tunnel is the real
RouteListener; only the protocol is made up.
"""

from __future__ import annotations

import asyncio
import ssl
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sidecar.causes import Cause, Fault
from sidecar.config import ListenAddress, RouteSpec
from sidecar.credentials import Secrets
from sidecar.keystore import Selection, read_identity_folder, select
from sidecar.stages import Close, Command, EndLocal, EndRemote, PassThrough, Refuse, SendLocal, SendRemote, StartTLS
from sidecar.tlsctx import ContextCache
from sidecar.tunnel import RouteListener
from tests.scenario import Pki

# Runs anywhere: pure logic, or loopback sockets only (the macOS and Windows CI jobs run it).
pytestmark = pytest.mark.portable


class StartTLSLine:
    transparent = False

    def __init__(self) -> None:
        self.buffer = b""
        self.step = "greeting"  # → "asked" → "tls"
        self.held = b""  # the local client's words, until TLS is up

    def tls_established(self) -> list[Command]:
        self.step = "established"
        held, self.held = self.held, b""
        return [SendRemote(held.upper())] if held else []

    def remote_failed(self, cause: Cause, message: str) -> list[Command]:
        return [Close()]

    def connected(self) -> list[Command]:
        return []  # the server speaks first

    def from_local(self, data: bytes) -> list[Command]:
        if self.step != "established":
            self.held += data
            return []
        return [SendRemote(data.upper())]

    def local_eof(self) -> list[Command]:
        return [EndRemote()]

    def from_remote(self, data: bytes) -> list[Command]:
        if self.step in ("tls", "established"):
            return [SendLocal(data)]
        self.buffer += data
        if b"\n" not in self.buffer:
            return []
        line, self.buffer = self.buffer.split(b"\n", 1)
        expected = b"READY" if self.step == "greeting" else b"GO"
        if line != expected:
            fault = Fault("handshake", "protocol", f"no {expected!r}")
            return [Refuse(fault, f"the server said {line!r}, not {expected.decode()}")]
        if self.step == "greeting":
            self.step = "asked"
            return [SendRemote(b"STARTTLS\n")]
        self.step = "tls"
        return [StartTLS(leftover=self.buffer)]

    def remote_eof(self) -> list[Command]:
        return [EndLocal()]


def test_pass_through_is_transparent_and_starts_tls_at_once() -> None:
    stage = PassThrough()
    assert stage.transparent and stage.connected() == [StartTLS()]
    assert stage.from_local(b"x") == [SendRemote(b"x")] and stage.from_remote(b"y") == [SendLocal(b"y")]


def test_a_stage_refuses_a_wrong_greeting() -> None:
    stage = StartTLSLine()
    assert stage.from_remote(b"REA") == []
    assert stage.from_remote(b"DY\n") == [SendRemote(b"STARTTLS\n")]
    assert stage.from_remote(b"GO\n") == [StartTLS(leftover=b"")]
    assert stage.from_local(b"abc") == []  # held until TLS is up
    assert stage.tls_established() == [SendRemote(b"ABC")]
    assert stage.from_local(b"def") == [SendRemote(b"DEF")]
    commands = StartTLSLine().from_remote(b"HELLO\n")
    assert len(commands) == 1 and isinstance(commands[0], Refuse)


async def _starttls_server(pki: Pki, greeting: bytes) -> tuple[asyncio.Server, list[bytes]]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.client_ca_file))
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    got: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        await writer.drain()
        if await reader.readline() != b"STARTTLS\n":
            writer.close()
            return
        writer.write(b"GO\n")
        await writer.drain()
        await writer.start_tls(server_ctx)
        while data := await reader.read(65536):
            got.append(data)
            writer.write(b"echo:" + data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0), got


async def _tunnel(pki: Pki, tmp_path: Path, port: int) -> RouteListener:
    pki.enroll(tmp_path / "keystore", "dev", "dev-1")
    now = datetime.now(UTC)
    selection = select("dev", read_identity_folder(tmp_path / "keystore" / "dev", Secrets()), now)
    route = RouteSpec(
        name="toy",
        listen=ListenAddress("tcp", "127.0.0.1", 0),
        target_host="127.0.0.1",
        target_port=port,
        server_name="localhost",
        ca_file=pki.server_ca_file,
        connect_timeout=5.0,
    )

    async def current(_: RouteSpec) -> Selection:
        return selection

    listener = RouteListener(route, current, ContextCache())
    listener.stage_factory = StartTLSLine
    await listener.start()
    return listener


def test_a_stage_speaks_before_tls_and_rewrites_after(pki_tmp: tuple[Pki, Path]) -> None:
    pki, tmp_path = pki_tmp

    async def scenario() -> None:
        server, got = await _starttls_server(pki, b"READY\n")
        port = server.sockets[0].getsockname()[1]
        listener = await _tunnel(pki, tmp_path, port)
        assert listener.bound is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.bound.port)
        writer.write(b"hello over tls")
        answer = await asyncio.wait_for(reader.readexactly(len(b"echo:HELLO OVER TLS")), 5)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await listener.stop(1)
        server.close()
        await server.wait_closed()
        assert answer == b"echo:HELLO OVER TLS"
        assert b"".join(got) == b"HELLO OVER TLS"
        assert listener.counters.failures == {}

    asyncio.run(scenario())


def test_a_stage_refusal_is_counted_with_its_cause(pki_tmp: tuple[Pki, Path]) -> None:
    pki, tmp_path = pki_tmp

    async def scenario() -> None:
        server, _ = await _starttls_server(pki, b"GO AWAY\n")
        listener = await _tunnel(pki, tmp_path, server.sockets[0].getsockname()[1])
        assert listener.bound is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.bound.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await listener.stop(1)
        server.close()
        await server.wait_closed()
        assert dict(listener.counters.failures) == {"protocol_mismatch": 1}
        assert listener.counters.last_error == "the server said b'GO AWAY', not READY"

    asyncio.run(scenario())


@pytest.fixture
def pki_tmp(tmp_path: Path) -> tuple[Pki, Path]:
    return Pki.create(tmp_path / "pki"), tmp_path
