"""The TLS pipe's rules, by feeding it bytes: no sockets.

The server side of each conversation is OpenSSL itself (an `ssl.SSLObject` over memory BIOs),
so every byte the pipe reads is what a real server would send.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.causes import Cause, cause_of, fault_from
from sidecar.tlspipe import (
    CertificateRejected,
    CloseNotify,
    Event,
    Failed,
    Flow,
    HandshakeDone,
    Received,
    TLSPipe,
    Truncated,
)
from tests.pki import CA

# Runs anywhere: pure logic, or loopback sockets only (the macOS and Windows CI jobs run it).
pytestmark = pytest.mark.portable

TLS12 = ssl.TLSVersion.TLSv1_2
TLS13 = ssl.TLSVersion.TLSv1_3


@dataclass
class Lab:
    client_ctx: ssl.SSLContext
    server_ctx: ssl.SSLContext
    other_client_ctx: ssl.SSLContext  # a client certificate the server does not trust


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    folder: Path = tmp_path_factory.mktemp("pipe")
    ca, stranger = CA("Pipe CA"), CA("Stranger CA")
    server_cert, server_key = ca.server("localhost").write_pair(folder, "server")
    client_cert, client_key = ca.client("dev").write_pair(folder, "client")
    other_cert, other_key = stranger.client("dev").write_pair(folder, "other")
    root = ca.write_root(folder / "root.pem")

    def client(cert: Path, key: Path) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(root)
        return ctx

    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(server_cert, server_key)
    server.load_verify_locations(root)
    server.verify_mode = ssl.CERT_REQUIRED
    return Lab(client(client_cert, client_key), server, client(other_cert, other_key))


class Server:
    """OpenSSL as the server, over memory BIOs."""

    def __init__(self, ctx: ssl.SSLContext, version: ssl.TLSVersion) -> None:
        ctx.maximum_version = version
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.error: ssl.SSLError | None = None

    def feed(self, data: bytes) -> bytes:
        """Take the client's bytes, advance, and return what the server sends back."""
        self.incoming.write(data)
        if self.error is None:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                self.error = exc  # its alert is in `outgoing`
        return self.outgoing.read()

    def send(self, data: bytes) -> bytes:
        self.tls.write(data)
        return self.outgoing.read()

    def read(self) -> bytes:
        try:
            return self.tls.read(65536)
        except ssl.SSLWantReadError:
            return b""

    def close_notify(self) -> bytes:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.unwrap()
        return self.outgoing.read()


def connect(
    lab: Lab, version: ssl.TLSVersion = TLS13, client: ssl.SSLContext | None = None
) -> tuple[TLSPipe, Server, list[Event]]:
    """Run the handshake through the pipe; return the pipe, the server and every event seen."""
    pipe = TLSPipe(client or lab.client_ctx, "localhost")
    server = Server(lab.server_ctx, version)
    seen: list[Event] = list(pipe.events())
    for _ in range(10):
        to_server = pipe.data_to_send()
        if not to_server:
            break
        answer = server.feed(to_server)
        if answer:
            pipe.receive_data(answer)
        seen += pipe.events()
        if any(isinstance(e, HandshakeDone | Failed | CertificateRejected) for e in seen):
            break
    # Whatever the server had left to say (TLS 1.3 tickets, an alert) after our last flight.
    tail = server.feed(pipe.data_to_send())
    if tail:
        pipe.receive_data(tail)
    return pipe, server, seen


def kinds(events: list[Event]) -> list[str]:
    return [type(e).__name__ for e in events]


def received(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Received))


@pytest.fixture(params=[TLS12, TLS13], ids=["tls1.2", "tls1.3"])
def version(request: pytest.FixtureRequest) -> Iterator[ssl.TLSVersion]:
    yield request.param


def test_handshake_then_data_both_ways(lab: Lab, version: ssl.TLSVersion) -> None:
    pipe, server, seen = connect(lab, version)
    assert kinds(seen) == ["HandshakeDone"] and pipe.handshake_complete and pipe.flow == Flow.BOTH
    assert pipe.events() == []  # nothing to read yet (tickets are not data)
    pipe.send(b"ping")
    server.feed(pipe.data_to_send())
    assert server.read() == b"ping"
    pipe.receive_data(server.send(b"pong"))
    assert kinds(pipe.events()) == ["Received"] and pipe.received == 4


# (what the server does after the handshake, the events, the flow left, can we still send?)
CLOSING_RULES = [
    ("close_notify", ["Received", "CloseNotify"], Flow.CAN_SEND, True),
    ("fin_without_close_notify", ["Received", "Truncated"], Flow.CAN_SEND, True),
    ("reset", ["Received", "Reset"], Flow.NONE, False),
]


@pytest.mark.parametrize(("how", "expected", "flow_left", "can_send"), CLOSING_RULES, ids=[r[0] for r in CLOSING_RULES])
def test_the_server_ends_its_direction(
    lab: Lab, version: ssl.TLSVersion, how: str, expected: list[str], flow_left: Flow, can_send: bool
) -> None:
    pipe, server, _ = connect(lab, version)
    pipe.receive_data(server.send(b"answer"))
    if how == "close_notify":
        pipe.receive_data(server.close_notify())
        pipe.receive_eof()
    elif how == "fin_without_close_notify":
        pipe.receive_eof()  # a TCP FIN alone
    else:
        pipe.receive_reset(ConnectionResetError(104, "Connection reset by peer"))
    events = pipe.events()
    assert kinds(events) == expected and received(events) == b"answer"
    assert pipe.flow == flow_left
    # A half-close is a half-close: what the local client still sends reaches the server.
    assert pipe.send(b"more") == []
    sent = pipe.data_to_send()
    if can_send:
        server.feed(sent)
        assert server.read() == b"more"
    else:
        assert sent == b""
    assert pipe.events() == []  # each end is reported once


def test_truncation_counts_what_came_before(lab: Lab) -> None:
    pipe, server, _ = connect(lab)
    pipe.receive_data(server.send(b"x" * 73))
    pipe.receive_eof()
    events = pipe.events()
    assert events[-1] == Truncated(received=73)


def test_our_eof_is_close_notify_and_we_keep_reading(lab: Lab, version: ssl.TLSVersion) -> None:
    pipe, server, _ = connect(lab, version)
    pipe.send_eof()
    assert pipe.flow == Flow.CAN_RECEIVE
    server.feed(pipe.data_to_send())
    assert server.tls.read(10) == b""  # the server saw our close_notify (Python's b"" for it)
    pipe.receive_data(server.send(b"late answer") + server.close_notify())
    events = pipe.events()
    # With both close_notifies, OpenSSL raises instead of returning b"": still a clean end.
    assert kinds(events) == ["Received", "CloseNotify"] and received(events) == b"late answer"
    assert pipe.flow == Flow.NONE
    assert pipe.send(b"too late") == [] and pipe.data_to_send() == b""


def test_a_reset_after_an_alert_is_explained_by_the_alert(lab: Lab) -> None:
    """TLS 1.3: the client's handshake completes; the server rejects the certificate with an
    alert and resets at once. The alert is the news, not the reset."""
    pipe, server, seen = connect(lab, TLS13, client=lab.other_client_ctx)
    assert kinds(seen) == ["HandshakeDone"]  # our side is done before the server judged us
    assert server.error is not None  # the server refused; its alert was fed to the pipe
    pipe.receive_reset(ConnectionResetError(104, "Connection reset by peer"))
    events = pipe.events()
    assert kinds(events) == ["CertificateRejected"]
    rejected = events[0]
    assert isinstance(rejected, CertificateRejected) and not rejected.during_handshake
    assert rejected.alert in ("unknown ca", "certificate unknown", "bad certificate")
    assert cause_of(fault_from("after_handshake", rejected.error)) == Cause.SERVER_REJECTED_CERT
    assert pipe.flow == Flow.NONE and pipe.events() == []


def test_rejection_during_a_tls12_handshake(lab: Lab) -> None:
    pipe, _server, seen = connect(lab, TLS12, client=lab.other_client_ctx)
    assert kinds(seen) == ["CertificateRejected"]
    event = seen[0]
    assert isinstance(event, CertificateRejected) and event.during_handshake
    assert not pipe.handshake_complete and pipe.flow == Flow.NONE


def test_our_verification_of_the_server_fails(lab: Lab, tmp_path: Path) -> None:
    strict = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    strict.load_verify_locations(CA("Unrelated CA").write_root(tmp_path / "unrelated.pem"))
    _pipe, server, seen = connect(lab, TLS13, client=strict)
    assert kinds(seen) == ["Failed"]
    failed = seen[0]
    assert isinstance(failed, Failed) and isinstance(failed.error, ssl.SSLCertVerificationError)
    assert cause_of(fault_from("handshake", failed.error)) == Cause.SERVER_UNTRUSTED
    assert server.error is not None and "ALERT" in str(server.error.reason)  # we told the server why


@pytest.mark.parametrize("end", ["eof", "reset"])
def test_the_server_hangs_up_during_the_handshake(lab: Lab, end: str) -> None:
    pipe = TLSPipe(lab.client_ctx, "localhost")
    assert pipe.events() == [] and pipe.data_to_send()  # the ClientHello
    if end == "eof":
        pipe.receive_eof()
    else:
        pipe.receive_reset(ConnectionResetError(104, "Connection reset by peer"))
    events = pipe.events()
    assert kinds(events) == ["Failed"]
    failed = events[0]
    assert isinstance(failed, Failed) and failed.during_handshake
    assert cause_of(fault_from("handshake", failed.error)) == Cause.CONNECT


def test_a_plaintext_server_is_not_tls(lab: Lab) -> None:
    pipe = TLSPipe(lab.client_ctx, "localhost")
    pipe.events()
    pipe.receive_data(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    events = pipe.events()
    assert kinds(events) == ["Failed"] and pipe.first_bytes.startswith(b"HTTP/1.1 400")
    failed = events[0]
    assert isinstance(failed, Failed)
    fault = fault_from("handshake", failed.error, first_bytes=pipe.first_bytes)
    assert cause_of(fault) == Cause.NOT_TLS


def test_nothing_is_read_until_asked_after_the_handshake(lab: Lab) -> None:
    """The tunnel checks the server (pins, revocation) between HandshakeDone and its first read:
    what the server sent with its last flight waits in the pipe until the next call."""
    pipe = TLSPipe(lab.client_ctx, "localhost")
    server = Server(lab.server_ctx, TLS12)  # TLS 1.2: the server's Finished ends the handshake
    pipe.events()
    pipe.receive_data(server.feed(pipe.data_to_send()))  # ServerHello … ServerHelloDone
    assert pipe.events() == []
    server_finished = server.feed(pipe.data_to_send())  # our Finished → the server's
    pipe.receive_data(server_finished + server.send(b"early words"))
    assert kinds(pipe.events()) == ["HandshakeDone"]
    assert received(pipe.events()) == b"early words"  # only on the next call


def test_close_notify_event_is_not_data(lab: Lab) -> None:
    pipe, server, _ = connect(lab)
    pipe.receive_data(server.close_notify())
    assert pipe.events() == [CloseNotify()]
