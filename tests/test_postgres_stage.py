"""PostgresStage fed bytes, no sockets: what it answers, holds, sends and refuses."""

from __future__ import annotations

import struct

import pytest

from sidecar.causes import Cause, cause_of
from sidecar.config import ListenAddress, RouteSpec
from sidecar.protocols.postgres import (
    SSL_REQUEST,
    PostgresStage,
    error_response,
    first_message,
    looks_like_postgres_client,
)
from sidecar.stages import Close, Refuse, SendLocal, SendRemote, StartLocalTLS, StartTLS

# Runs anywhere: pure logic, or loopback sockets only (the macOS and Windows CI jobs run it).
pytestmark = pytest.mark.portable

GSSENC = struct.pack("!ii", 8, 80877104)
CANCEL = struct.pack("!iiii", 16, 80877102, 4242, 99)


def startup(user: str = "dev") -> bytes:
    body = struct.pack("!i", 196608) + f"user\0{user}\0database\0postgres\0\0".encode()
    return struct.pack("!i", len(body) + 4) + body


def route(**extra: object) -> RouteSpec:
    fields: dict[str, object] = dict(
        name="pg", listen=ListenAddress("tcp", "127.0.0.1", 15432), target_host="db.example.test",
        target_port=5432, server_name="db.example.test", protocol="postgres",
    )  # fmt: skip
    fields.update(extra)
    return RouteSpec(**fields)  # type: ignore[arg-type]


def test_sslmode_prefer_gets_n_and_its_startup_waits_for_tls() -> None:
    stage = PostgresStage(route())
    assert stage.from_local(GSSENC + SSL_REQUEST) == [SendLocal(b"N"), SendLocal(b"N")]
    assert stage.from_local(startup()[:5]) == []  # a packet in pieces
    assert stage.from_local(startup()[5:]) == []  # held: TLS is not up yet
    assert stage.connected() == [SendRemote(SSL_REQUEST)]
    assert stage.from_remote(b"S") == [StartTLS()]
    assert not stage.transparent
    assert stage.tls_established() == [SendRemote(startup())]
    assert stage.transparent  # bytes pass untouched from here


def test_tls_before_the_client_spoke() -> None:
    stage = PostgresStage(route())
    stage.connected()
    stage.from_remote(b"S")
    assert stage.tls_established() == []
    assert stage.from_local(startup() + b"Q\0\0\0\x0dselect 1\0") == [SendRemote(startup() + b"Q\0\0\0\x0dselect 1\0")]


def test_a_cancel_request_goes_through_the_same_negotiation() -> None:
    stage = PostgresStage(route())
    assert stage.from_local(CANCEL) == []
    stage.connected()
    stage.from_remote(b"S")
    assert stage.tls_established() == [SendRemote(CANCEL)]


def test_direct_negotiation_starts_tls_at_once_and_offers_alpn_postgresql() -> None:
    from sidecar.config import parse_config

    config = parse_config(
        '[identities.dev]\nrenew = "none"\n[routes.pg]\nlisten = "127.0.0.1:15432"\ntarget = "db:5432"\n'
        'protocol = "postgres"\npostgres_negotiation = "direct"\n'
    )
    spec = config.routes["pg"]
    assert spec.alpn == ("postgresql",)
    assert PostgresStage(spec).connected() == [StartTLS()]


@pytest.mark.parametrize(
    ("answer", "cause", "words"),
    [
        (b"N", Cause.SERVER_NO_TLS, "does not offer TLS"),
        (b"E", Cause.PROTOCOL_MISMATCH, "is it PostgreSQL?"),
        (b"S\x16\x03", Cause.PROTOCOL_MISMATCH, "sent data after agreeing to TLS"),
    ],
)
def test_what_the_server_answers_to_our_sslrequest(answer: bytes, cause: Cause, words: str) -> None:
    stage = PostgresStage(route())
    stage.connected()
    [refused] = stage.from_remote(answer)
    assert isinstance(refused, Refuse) and cause_of(refused.fault) == cause and words in refused.message


def test_a_client_that_does_not_speak_postgres_is_refused() -> None:
    [refused] = PostgresStage(route()).from_local(b"GET / HTTP/1.1\r\n\r\n")
    assert isinstance(refused, Refuse) and cause_of(refused.fault) == Cause.PROTOCOL_MISMATCH
    assert refused.fault.stage == "local"


def test_a_failure_is_told_to_the_client_once_it_has_said_who_it_is() -> None:
    stage = PostgresStage(route())
    assert stage.remote_failed(Cause.REFUSED, "connection to db:5432 refused") == []  # it has not spoken yet
    out = stage.from_local(SSL_REQUEST + startup())
    assert out[0] == SendLocal(b"N")
    assert out[1] == SendLocal(error_response("mtls-sidecar: connection to db:5432 refused", Cause.REFUSED.fix))
    assert out[2] == Close()


def test_local_tls_answers_s_and_hands_the_socket_to_tls() -> None:
    stage = PostgresStage(route(local_tls=True))
    assert stage.from_local(SSL_REQUEST) == [SendLocal(b"S"), StartLocalTLS()]
    assert stage.from_local(startup()) == []  # now decrypted by the connection, held until upstream TLS


def test_error_response_fields() -> None:
    packet = error_response("boom", "do this")
    assert packet[:1] == b"E" and struct.unpack("!i", packet[1:5])[0] == len(packet) - 1
    assert b"SFATAL\0" in packet and b"C08006\0" in packet and b"Mboom\0" in packet and b"Hdo this\0" in packet


def test_first_message_kinds() -> None:
    assert first_message(SSL_REQUEST) == ("ssl", 8)
    assert first_message(CANCEL) == ("cancel", 16)
    assert first_message(startup()[:7]) is None
    assert first_message(startup()) == ("startup", len(startup()))
    with pytest.raises(ValueError):
        first_message(b"\x16\x03\x01\x02\x00\x01\x00\x01")  # a TLS ClientHello
    assert looks_like_postgres_client(SSL_REQUEST) and not looks_like_postgres_client(CANCEL)
    assert not looks_like_postgres_client(b"\x16\x03\x01\x02\x00\x01\x00\x01")
