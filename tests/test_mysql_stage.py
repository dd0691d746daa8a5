"""MySQLStage fed packets, no sockets: the greeting it passes on, the SSLRequest it sends, the
sequence ids it renumbers, what it refuses, and the ERR packets clients read.

Where a real client's own code can judge our bytes, it does: PyMySQL parses our ERR packets
and encrypts a password for the public key the stage hands out (caching_sha2_password).
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from pymysql import _auth as pymysql_auth
from pymysql import err as pymysql_err

from sidecar.causes import Cause, cause_of
from sidecar.check.observe import _prelude, _PreludeRefused
from sidecar.config import ListenAddress, RouteSpec
from sidecar.protocols.mysql import (
    CLIENT_COMPRESS,
    CLIENT_PLUGIN_AUTH,
    CLIENT_PROTOCOL_41,
    CLIENT_SECURE_CONNECTION,
    CLIENT_SSL,
    MySQLStage,
    err_payload,
    packet,
    parse_greeting,
    split_packets,
    without_ssl,
)
from sidecar.stages import (
    Close,
    Command,
    EndLocal,
    EndRemote,
    Refuse,
    SendLocal,
    SendRemote,
    StartLocalTLS,
    StartTLS,
)

# Runs anywhere: pure logic, or loopback sockets only (the macOS and Windows CI jobs run it).
pytestmark = pytest.mark.portable

SCRAMBLE = bytes(range(65, 85))  # 20 bytes, as servers make them (no NUL)
SERVER_FLAGS = 0xF7FF | CLIENT_SSL | (0x81BF << 16)  # what MariaDB 10.11 offers, TLS included
CLIENT_FLAGS = CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH | 0x0000_000F | (1 << 20)
OK_PACKET = b"\x00\x00\x00\x02\x00\x00\x00"


def greeting_payload(flags: int = SERVER_FLAGS, plugin: str = "mysql_native_password") -> bytes:
    return (
        b"\x0a" + b"5.5.5-10.11.19-MariaDB\0" + struct.pack("<I", 42) + SCRAMBLE[:8] + b"\0"
        + struct.pack("<H", flags & 0xFFFF) + b"\x2d" + struct.pack("<H", 2) + struct.pack("<H", flags >> 16)
        + bytes([21]) + b"\0" * 6 + struct.pack("<I", 0x1D) + SCRAMBLE[8:] + b"\0" + plugin.encode() + b"\0"
    )  # fmt: skip


def response_payload(flags: int = CLIENT_FLAGS, user: str = "dev", auth: bytes = b"\x11" * 20) -> bytes:
    return (
        struct.pack("<IIB", flags, 16 * 1024 * 1024, 45) + b"\0" * 19 + struct.pack("<I", 0x1D)
        + user.encode() + b"\0" + bytes([len(auth)]) + auth + b"mysql_native_password\0"
    )  # fmt: skip


def route(**extra: object) -> RouteSpec:
    fields: dict[str, object] = dict(
        name="db", listen=ListenAddress("tcp", "127.0.0.1", 13306), target_host="db.example.test",
        target_port=3306, server_name="db.example.test", protocol="mysql",
    )  # fmt: skip
    fields.update(extra)
    return RouteSpec(**fields)  # type: ignore[arg-type]


def sent_local(commands: list[Command]) -> list[tuple[int, bytes]]:
    """The packets a list of commands sends the local client, as (sequence id, payload)."""
    packets, rest = split_packets(b"".join(c.data for c in commands if isinstance(c, SendLocal)))
    assert rest == b""
    return packets


def sent_remote(commands: list[Command]) -> list[tuple[int, bytes]]:
    packets, rest = split_packets(b"".join(c.data for c in commands if isinstance(c, SendRemote)))
    assert rest == b""
    return packets


def through_tls(stage: MySQLStage, plugin: str = "mysql_native_password") -> None:
    """Greeting, HandshakeResponse, SSLRequest, TLS: the stage is then renumbering."""
    stage.from_remote(packet(0, greeting_payload(plugin=plugin)))
    stage.from_local(packet(1, response_payload()))
    stage.tls_established()


def test_the_client_gets_the_servers_greeting_without_ssl() -> None:
    stage = MySQLStage(route())
    assert stage.connected() == []  # the server speaks first
    [(seq, payload)] = sent_local(stage.from_remote(packet(0, greeting_payload())))
    assert seq == 0
    assert payload == without_ssl(greeting_payload(), parse_greeting(greeting_payload()))
    passed = parse_greeting(payload)
    assert not passed.capabilities & CLIENT_SSL
    assert passed.capabilities == SERVER_FLAGS & ~CLIENT_SSL  # only that bit changed
    assert passed.scramble == SCRAMBLE and passed.plugin == "mysql_native_password"
    assert passed.version == "5.5.5-10.11.19-MariaDB"


def test_handshake_response_becomes_sslrequest_then_goes_through_tls_as_packet_2() -> None:
    stage = MySQLStage(route())
    stage.from_remote(packet(0, greeting_payload()))
    out = stage.from_local(packet(1, response_payload()))
    assert out[-1] == StartTLS()
    [(seq, ssl_request)] = sent_remote(out)
    assert seq == 1 and len(ssl_request) == 32
    assert struct.unpack("<I", ssl_request[:4])[0] == CLIENT_FLAGS | CLIENT_SSL
    assert ssl_request[4:] == response_payload()[4:32]  # max packet, charset, MariaDB's extended flags
    assert stage.from_local(b"") == []  # nothing more until TLS is up
    [(seq, response)] = sent_remote(stage.tls_established())
    assert seq == 2
    assert response == struct.pack("<I", CLIENT_FLAGS | CLIENT_SSL) + response_payload()[4:]
    assert not stage.transparent


def test_greeting_and_response_in_pieces() -> None:
    stage = MySQLStage(route())
    wire = packet(0, greeting_payload())
    out: list[Command] = []
    for i in range(len(wire)):
        out += stage.from_remote(wire[i : i + 1])
    assert [seq for seq, _ in sent_local(out)] == [0]
    response = packet(1, response_payload())
    assert stage.from_local(response[:3]) == []
    assert stage.from_local(response[3:10]) == []
    assert stage.from_local(response[10:])[-1] == StartTLS()


def test_sequence_ids_are_renumbered_through_an_auth_switch_then_bytes_pass_untouched() -> None:
    stage = MySQLStage(route())
    through_tls(stage)
    switch = b"\xfeclient_ed25519\0" + b"N" * 32
    assert sent_local(stage.from_remote(packet(3, switch))) == [(2, switch)]
    signature = b"s" * 64
    answer = packet(3, signature)
    assert stage.from_local(answer[:2]) == []  # a packet in pieces is held until whole
    assert sent_remote(stage.from_local(answer[2:])) == [(4, signature)]
    assert sent_local(stage.from_remote(packet(5, OK_PACKET)[:5])) == []
    out = stage.from_remote(packet(5, OK_PACKET)[5:] + b"\x01\x00\x00\x01\x01")  # OK, and a result's first bytes
    assert out[0] == SendLocal(packet(4, OK_PACKET))
    assert out[1] == SendLocal(b"\x01\x00\x00\x01\x01")  # after OK: untouched
    assert stage.phase == "command"
    assert stage.from_remote(b"\x05\x00\x00\x07anything") == [SendLocal(b"\x05\x00\x00\x07anything")]


def test_more_auth_data_and_ok_in_one_read() -> None:
    stage = MySQLStage(route())
    through_tls(stage, plugin="caching_sha2_password")
    out = stage.from_remote(packet(3, b"\x01\x03") + packet(4, OK_PACKET))  # fast auth success, then OK
    assert sent_local(out) == [(2, b"\x01\x03"), (3, OK_PACKET)]
    assert stage.phase == "command"


def test_an_err_from_the_server_ends_the_connection() -> None:
    stage = MySQLStage(route())
    through_tls(stage)
    denied = b"\xff\x15\x04#28000Access denied for user 'dev'@'127.0.0.1'"
    out = stage.from_remote(packet(3, denied))
    assert sent_local(out) == [(2, denied)] and out[-1] == Close()  # the server hangs up after it: so do we


def test_a_greeting_without_client_ssl_is_server_offers_no_tls_and_the_client_reads_why() -> None:
    stage = MySQLStage(route())
    [refused] = stage.from_remote(packet(0, greeting_payload(flags=SERVER_FLAGS & ~CLIENT_SSL)))
    assert isinstance(refused, Refuse) and cause_of(refused.fault) == Cause.SERVER_NO_TLS
    assert refused.fault.stage == "handshake"  # the tunnel then calls remote_failed
    assert "does not offer TLS" in refused.message
    out = stage.remote_failed(Cause.SERVER_NO_TLS, refused.message)
    assert out[-1] == Close()
    [(seq, err)] = sent_local(out)
    assert seq == 0  # the client has not had a greeting: the ERR is its first packet
    with pytest.raises(pymysql_err.OperationalError) as raised:
        pymysql_err.raise_mysql_exception(err)
    code, text = raised.value.args
    assert code == 1043  # ER_HANDSHAKE_ERROR
    assert raised.value.sqlstate is None  # before the greeting, as servers send it
    assert text.startswith("mtls-sidecar: db.example.test:3306 does not offer TLS")
    assert Cause.SERVER_NO_TLS.fix in text
    assert stage.remote_failed(Cause.SERVER_NO_TLS, "again") == []  # told once


def test_a_target_that_is_down_is_the_clients_first_packet() -> None:
    stage = MySQLStage(route())
    out = stage.remote_failed(Cause.REFUSED, "connection to db.example.test:3306 refused")
    [(seq, err)] = sent_local(out)
    assert seq == 0 and out[-1] == Close()
    assert err == err_payload(
        1043, f"mtls-sidecar: connection to db.example.test:3306 refused; fix: {Cause.REFUSED.fix}", sqlstate=None
    )


def test_a_failure_after_the_greeting_waits_for_the_clients_response() -> None:
    stage = MySQLStage(route())
    stage.from_remote(packet(0, greeting_payload()))
    assert stage.remote_failed(Cause.CONNECT, "db.example.test:3306 reset the connection") == []
    out = stage.from_local(packet(1, response_payload()))
    [(seq, err)] = sent_local(out)
    assert seq == 2 and err[:9] == b"\xff\x13\x04#08S01" and out[-1] == Close()  # 1043, with SQLSTATE now
    assert sent_remote(out) == []  # no SSLRequest for a server that is gone


def test_a_failed_handshake_answers_the_waiting_client_as_packet_2() -> None:
    stage = MySQLStage(route())
    stage.from_remote(packet(0, greeting_payload()))
    stage.from_local(packet(1, response_payload()))
    out = stage.remote_failed(Cause.SERVER_UNTRUSTED, "db.example.test:3306's certificate is not trusted")
    [(seq, err)] = sent_local(out)
    assert seq == 2 and err[:9] == b"\xff\x13\x04#08S01"
    with pytest.raises(pymysql_err.OperationalError) as raised:
        pymysql_err.raise_mysql_exception(err)
    assert raised.value.args[0] == 1043 and raised.value.sqlstate == "08S01"
    assert b"not trusted; fix: set ca_file" in err


def test_a_failure_after_tls_answers_the_client_when_it_reads() -> None:
    """E.g. the server rejects our certificate with a TLS 1.3 alert after the handshake."""
    stage = MySQLStage(route())
    through_tls(stage)  # the client sent packet 1 and waits for packet 2
    [(seq, _)] = sent_local(stage.remote_failed(Cause.SERVER_REJECTED_CERT, "rejected our client certificate"))
    assert seq == 2
    asked = MySQLStage(route())
    through_tls(asked)
    asked.from_remote(packet(3, b"\xfeclient_ed25519\0" + b"N" * 32))  # a question: the client is to answer
    assert asked.remote_failed(Cause.RESET, "reset") == []
    out = asked.from_local(packet(3, b"s" * 64))
    [(seq, err)] = sent_local(out)
    assert seq == 4 and err.startswith(b"\xff\x13\x04#08S01mtls-sidecar: reset") and out[-1] == Close()
    assert sent_remote(out) == []
    fast = MySQLStage(route())
    through_tls(fast, plugin="caching_sha2_password")
    fast.from_remote(packet(3, b"\x01\x03"))  # fast auth passed: OK follows, the client reads
    [(seq, _)] = sent_local(fast.remote_failed(Cause.RESET, "reset"))
    assert seq == 3


def test_a_failure_mid_session_just_closes() -> None:
    stage = in_command_phase()
    assert stage.remote_failed(Cause.RESET, "reset") == [Close()]


def test_a_server_err_before_the_greeting_reaches_the_client_in_its_own_words() -> None:
    stage = MySQLStage(route())
    too_many = b"\xff\x10\x04Too many connections"
    [refused] = stage.from_remote(packet(0, too_many))
    assert isinstance(refused, Refuse) and cause_of(refused.fault) == Cause.CONNECT
    assert refused.message == "db.example.test:3306 refused the connection: Too many connections"
    assert sent_local(stage.remote_failed(Cause.CONNECT, refused.message)) == [(0, too_many)]


def test_a_server_err_right_after_the_greeting_waits_for_the_clients_response() -> None:
    stage = MySQLStage(route())
    timeout = b"\xff\x98\x04#08S01Got timeout reading communication packets"
    out = stage.from_remote(packet(0, greeting_payload()) + packet(1, timeout))
    assert [seq for seq, _ in sent_local(out)] == [0]  # the greeting
    assert isinstance(out[-1], Refuse) and cause_of(out[-1].fault) == Cause.CONNECT
    assert stage.remote_failed(Cause.CONNECT, out[-1].message) == []  # the client is to speak
    answer = stage.from_local(packet(1, response_payload()))
    assert sent_local(answer) == [(2, timeout)] and answer[-1] == Close()


@pytest.mark.parametrize(
    "first",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"HTTP/1.1 400 Bad Request\r\n",
        b"\x15\x03\x03\x00\x02\x02\x46",
        b"\x05\x00\x00\x00\x09",
    ],
)
def test_a_server_that_does_not_greet_as_mysql_is_refused_at_once(first: bytes) -> None:
    [refused] = MySQLStage(route()).from_remote(first)
    assert isinstance(refused, Refuse) and cause_of(refused.fault) == Cause.PROTOCOL_MISMATCH
    assert "did not greet as a MySQL server" in refused.message


def test_a_client_that_speaks_first_is_not_a_mysql_client() -> None:
    [refused] = MySQLStage(route()).from_local(b"GET / HTTP/1.1\r\n\r\n")
    assert isinstance(refused, Refuse) and cause_of(refused.fault) == Cause.PROTOCOL_MISMATCH
    assert refused.fault.stage == "local"


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (response_payload()[:32].replace(struct.pack("<I", CLIENT_FLAGS), struct.pack("<I", CLIENT_FLAGS | CLIENT_SSL)),
         "asked for TLS"),
        (response_payload(flags=CLIENT_FLAGS & ~CLIENT_PROTOCOL_41), "not a 4.1+ HandshakeResponse"),
        (b"\x03select 1", "not a 4.1+ HandshakeResponse"),
    ],
)  # fmt: skip
def test_what_the_stage_refuses_from_the_local_client(payload: bytes, words: str) -> None:
    stage = MySQLStage(route())
    stage.from_remote(packet(0, greeting_payload()))
    [refused] = stage.from_local(packet(1, payload))
    assert isinstance(refused, Refuse) and refused.fault.stage == "local" and words in refused.message


@pytest.mark.parametrize("first", [b"GET / HTTP/1.1\r\n", packet(0, b"\x03select 1")[:4], b"\xff\xff\xff\x01"])
def test_a_client_whose_answer_is_no_handshake_response_is_refused_from_its_header(first: bytes) -> None:
    stage = MySQLStage(route())
    stage.from_remote(packet(0, greeting_payload()))
    [refused] = stage.from_local(first)  # the header says enough: wrong sequence id, or far too long
    assert isinstance(refused, Refuse) and "does not speak MySQL" in refused.message


def test_caching_sha2_full_auth_gets_the_password_to_the_server_through_tls() -> None:
    """The server (on TLS) wants the password in cleartext; the client (on plaintext) asks for a
    public key and encrypts: it gets the stage's key, and the stage sends the server the password."""
    stage = MySQLStage(route())
    through_tls(stage, plugin="caching_sha2_password")
    assert sent_local(stage.from_remote(packet(3, b"\x01\x04"))) == [(2, b"\x01\x04")]  # perform full auth
    out = stage.from_local(packet(3, b"\x02"))  # request public key
    assert sent_remote(out) == []  # answered here: the server on TLS would take \x02 for the password
    [(seq, key_packet)] = sent_local(out)
    assert seq == 4 and key_packet.startswith(b"\x01-----BEGIN PUBLIC KEY-----")
    encrypted = pymysql_auth.sha2_rsa_encrypt(b"s3cret pw", SCRAMBLE, key_packet[1:])
    assert sent_remote(stage.from_local(packet(5, encrypted))) == [(4, b"s3cret pw\0")]
    assert sent_local(stage.from_remote(packet(5, OK_PACKET))) == [(6, OK_PACKET)]
    assert stage.phase == "command"


def test_caching_sha2_after_an_auth_switch_uses_the_switchs_challenge() -> None:
    stage = MySQLStage(route())
    through_tls(stage)
    challenge = bytes(range(100, 120))
    stage.from_remote(packet(3, b"\xfecaching_sha2_password\0" + challenge + b"\0"))
    stage.from_local(packet(3, b"\x22" * 32))  # the client's scramble for the new plugin
    stage.from_remote(packet(5, b"\x01\x04"))
    key_packet = sent_local(stage.from_local(packet(5, b"\x02")))[0][1]
    encrypted = pymysql_auth.sha2_rsa_encrypt(b"pw", challenge, key_packet[1:])
    assert sent_remote(stage.from_local(packet(7, encrypted))) == [(6, b"pw\0")]


def test_caching_sha2_cleartext_or_a_foreign_key_passes_as_it_is() -> None:
    stage = MySQLStage(route())
    through_tls(stage, plugin="caching_sha2_password")
    stage.from_remote(packet(3, b"\x01\x04"))
    foreign = b"\x99" * 256  # encrypted for the server's own key: not ours to read
    assert sent_remote(stage.from_local(packet(3, foreign))) == [(4, foreign)]


def test_a_password_that_does_not_decrypt_is_refused() -> None:
    stage = MySQLStage(route())
    through_tls(stage, plugin="caching_sha2_password")
    stage.from_remote(packet(3, b"\x01\x04"))
    stage.from_local(packet(3, b"\x02"))
    [refused] = stage.from_local(packet(5, b"\x00" * 256))
    assert isinstance(refused, Refuse) and refused.fault.stage == "local"


def test_split_packets_frames_whole_packets_only() -> None:
    wire = packet(0, b"abc") + packet(1, b"") + packet(2, b"x" * 300)
    assert split_packets(wire) == ([(0, b"abc"), (1, b""), (2, b"x" * 300)], b"")
    assert split_packets(wire[:-1]) == ([(0, b"abc"), (1, b"")], packet(2, b"x" * 300)[:-1])
    assert split_packets(b"\x03\x00") == ([], b"\x03\x00")
    assert packet(256, b"") == b"\x00\x00\x00\x00"  # sequence ids wrap at 256


def test_make_stage_picks_mysql() -> None:
    from sidecar.protocols import make_stage

    assert isinstance(make_stage(route(), ListenAddress("tcp", "127.0.0.1", 13306)), MySQLStage)


def in_command_phase(flags: int = CLIENT_FLAGS) -> MySQLStage:
    stage = MySQLStage(route())
    stage.from_remote(packet(0, greeting_payload()))
    stage.from_local(packet(1, response_payload(flags=flags)))
    stage.tls_established()
    stage.from_remote(packet(3, OK_PACKET))
    return stage


def test_after_com_quit_the_stage_closes_the_connection_itself() -> None:
    """Servers close TCP without close_notify after COM_QUIT: the stage ends the connection
    first, so that is not counted as a cut-off answer."""
    stage = in_command_phase()
    query = packet(0, b"\x03select 1")
    assert stage.from_local(query) == [SendRemote(query)]
    quit_ = packet(0, bytes([0x01]))
    assert stage.from_local(quit_) == [SendRemote(quit_), Close()]
    assert stage.from_local(b"more") == []


@pytest.mark.parametrize("cut", [1, 3, 4])
def test_com_quit_in_pieces_and_after_a_long_packet(cut: int) -> None:
    stage = in_command_phase()
    big = packet(0, b"\x03" + b"\x01\x00\x00\x00\x01" * 30_000)  # COM_QUIT's bytes inside a query do not count
    quit_ = packet(0, b"\x01")
    wire = big + quit_
    split = len(big) + cut
    assert stage.from_local(wire[:1000]) == [SendRemote(wire[:1000])]
    assert stage.from_local(wire[1000:split]) == [SendRemote(wire[1000:split])]
    assert stage.from_local(wire[split:]) == [SendRemote(wire[split:]), Close()]


def test_a_one_byte_packet_that_is_not_quit_passes() -> None:
    stage = in_command_phase()
    ping = packet(0, b"\x0e")  # COM_PING
    assert stage.from_local(ping) == [SendRemote(ping)]
    file_end = packet(1, b"\x01")  # a one-byte packet inside a command (sequence id 1) is no COM_QUIT
    assert stage.from_local(file_end) == [SendRemote(file_end)]
    assert stage.local_eof() == [EndRemote()]  # a half-close passes on, as on a tcp route
    assert stage.remote_eof() == [EndLocal()]


def compressed_frame(seq: int, payload: bytes, uncompressed_length: int = 0) -> bytes:
    return struct.pack("<I", len(payload))[:3] + bytes([seq]) + struct.pack("<I", uncompressed_length)[:3] + payload


def test_with_the_compressed_protocol_com_quit_is_seen_in_its_frame() -> None:
    stage = in_command_phase(flags=CLIENT_FLAGS | CLIENT_COMPRESS)
    query = compressed_frame(0, packet(0, b"\x03select 1"))
    assert stage.from_local(query) == [SendRemote(query)]
    squeezed = compressed_frame(0, b"\x78\x9c\x63\x64\x00", uncompressed_length=5)  # compressed: not read
    assert stage.from_local(squeezed) == [SendRemote(squeezed)]
    plain_quit = packet(0, b"\x01")  # an uncompressed COM_QUIT is not a frame here: no quit
    assert stage.from_local(plain_quit + b"\x00\x00\x00") == [SendRemote(plain_quit + b"\x00\x00\x00")]
    quit_ = compressed_frame(0, packet(0, b"\x01"))
    assert stage.from_local(quit_[:6]) == [SendRemote(quit_[:6])]
    assert stage.from_local(quit_[6:]) == [SendRemote(quit_[6:]), Close()]


def test_compression_counts_only_when_the_server_offers_it_too() -> None:
    stage = MySQLStage(route())
    stage.from_remote(packet(0, greeting_payload(flags=SERVER_FLAGS & ~CLIENT_COMPRESS)))
    stage.from_local(packet(1, response_payload(flags=CLIENT_FLAGS | CLIENT_COMPRESS)))
    stage.tls_established()
    stage.from_remote(packet(3, OK_PACKET))
    assert stage.from_local(packet(0, b"\x01")) == [SendRemote(packet(0, b"\x01")), Close()]


# --- local_tls: the local client's own TLS ends in the sidecar


def ssl_request_payload(flags: int = CLIENT_FLAGS | CLIENT_SSL) -> bytes:
    return struct.pack("<I", flags) + response_payload()[4:32]


CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"r" * 32  # the start of one: opaque to the stage


def asked_for_local_tls(stage: MySQLStage) -> list[Command]:
    """Greeting, then the client's SSLRequest followed at once by its ClientHello (one read)."""
    stage.from_remote(packet(0, greeting_payload()))
    return stage.from_local(packet(1, ssl_request_payload()) + CLIENT_HELLO)


def test_local_tls_keeps_client_ssl_in_the_greeting() -> None:
    [(seq, payload)] = sent_local(MySQLStage(route(local_tls=True)).from_remote(packet(0, greeting_payload())))
    assert seq == 0 and payload == greeting_payload()  # untouched: TLS is offered, by the sidecar
    assert parse_greeting(payload).capabilities & CLIENT_SSL


def test_local_tls_sslrequest_starts_both_tls_and_hands_the_clients_hello_to_its_tls() -> None:
    stage = MySQLStage(route(local_tls=True))
    out = asked_for_local_tls(stage)
    [(seq, ssl_request)] = sent_remote(out)
    assert seq == 1 and ssl_request == ssl_request_payload()
    assert out[-2:] == [StartTLS(), StartLocalTLS(leftover=CLIENT_HELLO)]  # the server's TLS first, then the client's
    assert sent_local(out) == []  # no answer in plaintext: the client starts TLS at once


def test_local_tls_response_before_our_tls_is_held_then_sequence_ids_pass_as_they_are() -> None:
    stage = MySQLStage(route(local_tls=True))
    asked_for_local_tls(stage)
    response = struct.pack("<I", CLIENT_FLAGS | CLIENT_SSL) + response_payload()[4:]
    assert stage.from_local(packet(2, response)) == []  # decrypted, packet 2: held until our TLS is up
    assert sent_remote(stage.tls_established()) == [(2, response)]  # as it is: same number on both links
    switch = b"\xfeclient_ed25519\0" + b"N" * 32
    assert sent_local(stage.from_remote(packet(3, switch))) == [(3, switch)]
    assert sent_remote(stage.from_local(packet(4, b"s" * 64))) == [(4, b"s" * 64)]
    assert sent_local(stage.from_remote(packet(5, OK_PACKET))) == [(5, OK_PACKET)]
    assert stage.phase == "command"
    assert stage.from_local(packet(0, b"\x01")) == [SendRemote(packet(0, b"\x01")), Close()]  # COM_QUIT seen


def test_local_tls_response_after_our_tls_goes_on_at_once_even_in_pieces() -> None:
    stage = MySQLStage(route(local_tls=True))
    asked_for_local_tls(stage)
    assert stage.tls_established() == []  # the client's TLS handshake is still running
    response = struct.pack("<I", CLIENT_FLAGS | CLIENT_SSL) + response_payload(user="someone")[4:]
    wire = packet(2, response)
    assert stage.from_local(wire[:3]) == [] and stage.from_local(wire[3:40]) == []
    assert sent_remote(stage.from_local(wire[40:])) == [(2, response)]
    out = stage.from_remote(packet(3, b"\x01\x03") + packet(4, OK_PACKET))  # caching_sha2 fast auth, OK
    assert sent_local(out) == [(3, b"\x01\x03"), (4, OK_PACKET)]


def test_local_tls_caching_sha2_full_auth_passes_the_clients_cleartext_password() -> None:
    """On its own TLS the client answers "perform full auth" with the password in cleartext,
    as towards a TLS server: the stage passes it as it is, numbers unchanged."""
    stage = MySQLStage(route(local_tls=True))
    stage.from_remote(packet(0, greeting_payload(plugin="caching_sha2_password")))
    stage.from_local(packet(1, ssl_request_payload()) + CLIENT_HELLO)
    stage.from_local(packet(2, struct.pack("<I", CLIENT_FLAGS | CLIENT_SSL) + response_payload()[4:]))
    stage.tls_established()
    assert sent_local(stage.from_remote(packet(3, b"\x01\x04"))) == [(3, b"\x01\x04")]
    assert sent_remote(stage.from_local(packet(4, b"s3cret\0"))) == [(4, b"s3cret\0")]
    assert sent_local(stage.from_remote(packet(5, OK_PACKET))) == [(5, OK_PACKET)]


def test_local_tls_client_that_does_not_ask_for_tls_is_served_in_plaintext() -> None:
    stage = MySQLStage(route(local_tls=True))
    stage.from_remote(packet(0, greeting_payload()))
    out = stage.from_local(packet(1, response_payload()))
    assert out[-1] == StartTLS() and not any(isinstance(c, StartLocalTLS) for c in out)
    assert sent_remote(stage.tls_established()) == [
        (2, struct.pack("<I", CLIENT_FLAGS | CLIENT_SSL) + response_payload()[4:])
    ]
    assert sent_local(stage.from_remote(packet(3, OK_PACKET))) == [(2, OK_PACKET)]  # renumbered, as without local_tls


def test_without_local_tls_a_client_asking_for_tls_is_refused_and_told_of_local_tls() -> None:
    stage = MySQLStage(route())
    stage.from_remote(packet(0, greeting_payload()))
    [refused] = stage.from_local(packet(1, ssl_request_payload()) + CLIENT_HELLO)
    assert isinstance(refused, Refuse) and refused.fault.stage == "local"
    assert "asked for TLS" in refused.message and "local_tls = true" in refused.message


@pytest.mark.parametrize(
    ("first", "then"),
    [
        (packet(1, response_payload(flags=CLIENT_FLAGS | CLIENT_SSL)), None),  # TLS asked in a whole response
        (packet(1, ssl_request_payload()), packet(1, response_payload())),  # through TLS: packet 1 again
        (packet(1, ssl_request_payload()), packet(2, ssl_request_payload())),  # through TLS: a second SSLRequest
    ],
)
def test_local_tls_what_the_stage_refuses_from_the_client(first: bytes, then: bytes | None) -> None:
    stage = MySQLStage(route(local_tls=True))
    stage.from_remote(packet(0, greeting_payload()))
    out = stage.from_local(first)
    if then is not None:
        assert isinstance(out[-1], StartLocalTLS)
        out = stage.from_local(then)
    [refused] = out
    assert isinstance(refused, Refuse) and refused.fault.stage == "local"
    assert "does not speak MySQL" in refused.message


def test_local_tls_a_failure_before_the_sslrequest_is_told_through_the_clients_tls() -> None:
    stage = MySQLStage(route(local_tls=True))
    stage.from_remote(packet(0, greeting_payload()))
    assert stage.remote_failed(Cause.SERVER_UNTRUSTED, "db.example.test:3306's certificate is not trusted") == []
    out = stage.from_local(packet(1, ssl_request_payload()) + CLIENT_HELLO)
    assert out == [StartLocalTLS(leftover=CLIENT_HELLO)]  # no SSLRequest to a server that is gone
    out = stage.from_local(packet(2, response_payload(flags=CLIENT_FLAGS | CLIENT_SSL)))
    [(seq, err)] = sent_local(out)  # SendLocal: encrypted by the connection
    assert seq == 3 and out[-1] == Close() and sent_remote(out) == []
    with pytest.raises(pymysql_err.OperationalError) as raised:
        pymysql_err.raise_mysql_exception(err)
    assert raised.value.args[0] == 1043 and "not trusted; fix: " in raised.value.args[1]


def test_local_tls_a_failure_during_the_handshakes_answers_the_clients_response() -> None:
    waiting = MySQLStage(route(local_tls=True))
    asked_for_local_tls(waiting)
    assert waiting.remote_failed(Cause.SERVER_REJECTED_CERT, "rejected our client certificate") == []
    out = waiting.from_local(packet(2, response_payload(flags=CLIENT_FLAGS | CLIENT_SSL)))
    assert [seq for seq, _ in sent_local(out)] == [3] and out[-1] == Close() and sent_remote(out) == []
    held = MySQLStage(route(local_tls=True))
    asked_for_local_tls(held)
    assert held.from_local(packet(2, response_payload(flags=CLIENT_FLAGS | CLIENT_SSL))) == []
    out = held.remote_failed(Cause.RESET, "reset")  # the client waits for the answer to packet 2: it is told now
    [(seq, err)] = sent_local(out)
    assert seq == 3 and err.startswith(b"\xff\x13\x04#08S01mtls-sidecar: reset") and out[-1] == Close()


# --- check: the stage driven with no local client


def test_check_reply_answers_the_greeting_with_a_minimal_handshake_response() -> None:
    stage = MySQLStage(route(local_tls=True))  # check asks for no TLS of its own, local_tls or not
    [greeting] = stage.from_remote(packet(0, greeting_payload()))
    assert isinstance(greeting, SendLocal)
    reply = stage.check_reply(greeting.data)
    assert reply is not None
    [(seq, response)] = split_packets(reply)[0]
    flags = struct.unpack("<I", response[:4])[0]
    assert seq == 1 and flags & CLIENT_PROTOCOL_41 and not flags & CLIENT_SSL
    assert response[32:] == b"mtls-sidecar-check\0\0"  # the user; an empty auth response
    out = stage.from_local(reply)
    [(seq, ssl_request)] = sent_remote(out)
    assert out[-1] == StartTLS() and seq == 1 and len(ssl_request) == 32
    assert struct.unpack("<I", ssl_request[:4])[0] == flags | CLIENT_SSL


def test_check_reply_has_nothing_to_say_to_anything_but_a_greeting() -> None:
    stage = MySQLStage(route())
    err = sent_local(stage.remote_failed(Cause.REFUSED, "refused"))
    assert stage.check_reply(packet(*err[0])) is None
    assert stage.check_reply(packet(2, OK_PACKET)) is None
    assert stage.check_reply(b"\x4a\x00") is None


def prelude_against(first: bytes, stage: MySQLStage) -> tuple[bytes, bytes]:
    """check's prelude over a socket pair whose other end sent `first`: (its leftover, what that end read)."""

    async def run(ours: socket.socket) -> bytes:
        return await asyncio.wait_for(_prelude(ours, stage), 5)

    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        theirs.sendall(first)
        try:
            leftover = asyncio.run(run(ours))
        finally:
            theirs.settimeout(0.5)
            try:
                got = theirs.recv(1024)
            except TimeoutError:
                got = b""
    return leftover, got


def test_checks_prelude_drives_the_stage_to_tls_against_a_greeting_server() -> None:
    """`check`'s prelude on a socket: the server greets, check's stand-in answer becomes the
    SSLRequest the server reads, and nothing reaches the (absent) local client."""
    leftover, got = prelude_against(packet(0, greeting_payload()), MySQLStage(route()))
    [(seq, ssl_request)], rest = split_packets(got)
    assert leftover == b"" and rest == b""
    assert seq == 1 and len(ssl_request) == 32
    assert struct.unpack("<I", ssl_request[:4])[0] & CLIENT_SSL


def test_checks_prelude_reports_a_server_without_tls() -> None:
    with pytest.raises(_PreludeRefused) as refused:
        prelude_against(packet(0, greeting_payload(flags=SERVER_FLAGS & ~CLIENT_SSL)), MySQLStage(route()))
    assert cause_of(refused.value.fault) == Cause.SERVER_NO_TLS
