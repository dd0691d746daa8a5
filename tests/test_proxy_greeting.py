"""The proxy port's first words: SOCKS5, SOCKS4/4a, CONNECT, absolute-URI and origin-form
requests, and what is none of those; and the proxy's answers. Pure: bytes in, decisions out.

Each request is fed all at once and one byte at a time: the decision must be the same, and
it must come at the byte that completes the request (bytes after it are the tunnel's)."""

from __future__ import annotations

import struct

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.causes import Cause
from sidecar.proxy.greeting import (
    MAX_HEAD,
    SOCKS4_GRANTED,
    SOCKS4_REJECTED,
    SOCKS5_ADDRESS_NOT_SUPPORTED,
    SOCKS5_COMMAND_NOT_SUPPORTED,
    SOCKS5_FAILURE,
    SOCKS5_HOST_UNREACHABLE,
    SOCKS5_NET_UNREACHABLE,
    SOCKS5_NOT_ALLOWED,
    SOCKS5_OK,
    SOCKS5_REFUSED,
    SOCKS5_TTL_EXPIRED,
    Asked,
    Decision,
    ForProxy,
    Greeting,
    Invalid,
    failed,
    granted,
    not_allowed,
    socks4_reply,
    socks5_reply,
)
from sidecar.proxy.rules import CONNECT, HTTP, SOCKS

# Runs anywhere: pure logic, or loopback sockets only (the macOS and Windows CI jobs run it).
pytestmark = pytest.mark.portable

NO_AUTH = b"\x05\x01\x00"  # SOCKS5: one method offered, "no authentication"


def socks5(command: int, kind: int, address: bytes, port: int) -> bytes:
    return bytes([5, command, 0, kind]) + address + struct.pack("!H", port)


def socks5_name(name: bytes, port: int, command: int = 1) -> bytes:
    return socks5(command, 3, bytes([len(name)]) + name, port)


def socks4(port: int, address: bytes, user: bytes = b"", name: bytes | None = None, command: int = 1) -> bytes:
    out = bytes([4, command]) + struct.pack("!H", port) + address + user + b"\0"
    return out + (name + b"\0" if name is not None else b"")


def at_once(data: bytes) -> tuple[Decision | None, bytes]:
    greeting = Greeting()
    decision = greeting.receive(data)
    return decision, greeting.data_to_send()


def byte_by_byte(data: bytes) -> tuple[Decision | None, bytes, int]:
    """The decision, what was sent, and how many bytes it took."""
    greeting = Greeting()
    sent = b""
    for index in range(len(data)):
        decision = greeting.receive(data[index : index + 1])
        sent += greeting.data_to_send()
        if decision is not None:
            assert greeting.receive(b"more") is decision  # decided: nothing more is read
            return decision, sent, index + 1
    return None, sent, len(data)


def decided_the_same(data: bytes, rest: bytes = b"") -> tuple[Decision, bytes]:
    """`data` + `rest` at once and `data` byte by byte decide alike; `rest` is the leftover."""
    whole, sent = at_once(data + rest)
    assert whole is not None
    one, sent_one, used = byte_by_byte(data + rest)
    assert used == len(data), f"decided after {used} of {len(data)} bytes"
    assert sent_one == sent
    if isinstance(whole, Asked):
        assert isinstance(one, Asked)
        if whole.how == HTTP:  # the whole request as it came: the http stage reads it again
            assert (whole.leftover, one.leftover) == (data + rest, data)
        else:
            assert (whole.leftover, one.leftover) == (rest, b"")
        assert one == Asked(whole.how, whole.host, whole.port, one.leftover, whole.socks_version)
    else:
        assert one == whole
    return whole, sent


# --- SOCKS5 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "host", "port"),
    [
        (socks5(1, 1, bytes([10, 20, 0, 5]), 5432), "10.20.0.5", 5432),
        (socks5(1, 4, bytes(15) + b"\x01", 443), "::1", 443),
        (socks5(1, 4, bytes.fromhex("fd000000000000000000000000000005"), 80), "fd00::5", 80),
        (socks5_name(b"api.corp.example", 443), "api.corp.example", 443),
        (socks5_name(b"API.Corp.Example", 65535), "API.Corp.Example", 65535),
    ],
)
def test_socks5_connect(request_: bytes, host: str, port: int) -> None:
    decision, sent = decided_the_same(NO_AUTH + request_, b"first client bytes")
    assert decision == Asked(SOCKS, host, port, b"first client bytes", socks_version=5)
    assert sent == b"\x05\x00"  # no authentication chosen; the reply waits for the destination


def test_socks5_with_several_methods_offered_picks_no_auth() -> None:
    decision, sent = decided_the_same(b"\x05\x03\x02\x01\x00" + socks5_name(b"a.example", 1))
    assert isinstance(decision, Asked) and (decision.host, decision.port) == ("a.example", 1)
    assert sent == b"\x05\x00"


@pytest.mark.parametrize("methods", [b"\x05\x01\x02", b"\x05\x02\x01\x02", b"\x05\x00"])
def test_socks5_without_the_no_auth_method_is_refused_with_ff(methods: bytes) -> None:
    decision, sent = decided_the_same(methods)
    assert isinstance(decision, Invalid)
    assert decision.reply == b"\x05\xff"
    assert "no method without authentication" in decision.message
    assert decision.cause is Cause.PROTOCOL_MISMATCH
    assert sent == b""


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (socks5_name(b"a.example", 443, command=2), SOCKS5_COMMAND_NOT_SUPPORTED, "asked for BIND"),
        (socks5(3, 1, bytes(4), 53), SOCKS5_COMMAND_NOT_SUPPORTED, "asked for UDP ASSOCIATE"),
        (socks5(9, 1, bytes([1, 2, 3, 4]), 53), SOCKS5_COMMAND_NOT_SUPPORTED, "asked for 9"),
        (bytes([5, 1, 0, 2]), SOCKS5_ADDRESS_NOT_SUPPORTED, "unknown SOCKS5 address type 2"),
        (bytes([5, 1, 0, 9]), SOCKS5_ADDRESS_NOT_SUPPORTED, "unknown SOCKS5 address type 9"),
        (socks5(1, 1, bytes([10, 0, 0, 1]), 0), SOCKS5_ADDRESS_NOT_SUPPORTED, "port 0"),
        (socks5_name(b"a.example", 0), SOCKS5_ADDRESS_NOT_SUPPORTED, "port 0"),
        (socks5_name(b"", 443), SOCKS5_ADDRESS_NOT_SUPPORTED, "names no valid host"),
        (socks5_name(b"a b", 443), SOCKS5_ADDRESS_NOT_SUPPORTED, "names no valid host"),
        (socks5_name(b"a\0b", 443), SOCKS5_ADDRESS_NOT_SUPPORTED, "names no valid host"),
        (socks5_name(b"a/b", 443), SOCKS5_ADDRESS_NOT_SUPPORTED, "names no valid host"),
        (socks5_name("bücher.example".encode(), 443), SOCKS5_ADDRESS_NOT_SUPPORTED, "not ASCII"),
        (bytes([4, 1, 0, 1]), SOCKS5_FAILURE, "must begin with 5, not 4"),
    ],
)
def test_socks5_requests_the_proxy_does_not_serve(request_: bytes, code: int, words: str) -> None:
    decision, sent = decided_the_same(NO_AUTH + request_)
    assert isinstance(decision, Invalid)
    assert decision.reply == socks5_reply(code) and decision.reply[1] == code
    assert words in decision.message
    assert sent == b"\x05\x00"  # the method was chosen before the request was read


def test_socks5_incomplete_is_no_decision() -> None:
    whole = NO_AUTH + socks5_name(b"api.corp.example", 443)
    for end in range(len(whole)):
        assert at_once(whole[:end])[0] is None


# --- SOCKS4 and 4a -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "host", "port"),
    [
        (socks4(5432, bytes([10, 20, 0, 5])), "10.20.0.5", 5432),
        (socks4(443, bytes([127, 0, 0, 1]), user=b"alice"), "127.0.0.1", 443),
        (socks4(443, bytes([0, 0, 0, 1]), name=b"api.corp.example"), "api.corp.example", 443),  # 4a
        (socks4(80, bytes([0, 0, 0, 255]), user=b"bob", name=b"db.example.net"), "db.example.net", 80),
    ],
)
def test_socks4_and_4a_connect(request_: bytes, host: str, port: int) -> None:
    decision, sent = decided_the_same(request_, b"\x00tail")
    assert decision == Asked(SOCKS, host, port, b"\x00tail", socks_version=4)
    assert sent == b""  # SOCKS4 has no method exchange


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        (socks4(443, bytes([10, 0, 0, 1]), command=2), "BIND"),
        (socks4(0, bytes([10, 0, 0, 1])), "no port or no host"),
        (socks4(443, bytes([0, 0, 0, 1]), name=b""), "no port or no host"),
        (socks4(443, bytes([0, 0, 0, 1]), name="bücher".encode()), "not ASCII"),
    ],
)
def test_socks4_requests_the_proxy_does_not_serve(request_: bytes, words: str) -> None:
    decision, _ = decided_the_same(request_)
    assert isinstance(decision, Invalid)
    assert decision.reply == socks4_reply(SOCKS4_REJECTED) == b"\x00\x5b" + bytes(6)
    assert words in decision.message


@pytest.mark.parametrize(
    "request_",
    [
        bytes([4, 1, 1, 187, 10, 0, 0, 1]) + b"u" * 1100,  # a user id that never ends
        bytes([4, 1, 1, 187, 0, 0, 0, 1]) + b"\0" + b"n" * 1100,  # a 4a name that never ends
    ],
)
def test_socks4_fields_are_bounded(request_: bytes) -> None:
    decision, _ = at_once(request_)
    assert isinstance(decision, Invalid)
    assert "too long" in decision.message
    assert decision.reply == socks4_reply(SOCKS4_REJECTED)
    assert at_once(request_[:1000])[0] is None  # below the bound: still waiting


# --- HTTP: CONNECT -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authority", "host", "port"),
    [
        ("api.corp.example:443", "api.corp.example", 443),
        ("API.Corp.Example:5432", "api.corp.example", 5432),
        ("10.20.0.5:22", "10.20.0.5", 22),
        ("[::1]:443", "::1", 443),
        ("[fd00::5]:8443", "fd00::5", 8443),
    ],
)
def test_connect(authority: str, host: str, port: int) -> None:
    head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nProxy-Connection: keep-alive\r\n\r\n".encode()
    decision, sent = decided_the_same(head, b"\x16\x03\x01 what the client sends next")
    assert decision == Asked(CONNECT, host, port, b"\x16\x03\x01 what the client sends next")
    assert sent == b""


def test_connect_in_http_1_0_needs_no_host_header() -> None:
    decision, _ = decided_the_same(b"CONNECT db.example.net:5432 HTTP/1.0\r\n\r\n")
    assert decision == Asked(CONNECT, "db.example.net", 5432)


@pytest.mark.parametrize(
    "authority",
    [
        "api.corp.example",  # no port
        "api.corp.example:",
        "api.corp.example:0",
        "api.corp.example:https",
        "api.corp.example:99999",
        "api.corp.example:443/x",
        "::1:443",  # IPv6 without brackets
        "[zz::1]:443",
        "[::1]",
        "http://api.corp.example:443",
    ],
)
def test_connect_with_a_bad_authority_is_a_400(authority: str) -> None:
    head = f"CONNECT {authority} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    decision, sent = decided_the_same(head)
    assert isinstance(decision, Invalid), decision
    assert decision.reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert decision.message.startswith(("CONNECT needs host:port", "the request is not valid HTTP/1.1"))
    assert sent == b""


# --- HTTP: absolute-URI requests (the HTTP proxy) and requests for the proxy itself -------


@pytest.mark.parametrize(
    ("target", "host", "port"),
    [
        ("http://api.corp.example/v1?x=1", "api.corp.example", None),
        ("http://API.Corp.Example/", "api.corp.example", None),
        ("http://api.corp.example", "api.corp.example", None),
        ("http://api.corp.example:80/", "api.corp.example", 80),
        ("http://api.corp.example:8080/x", "api.corp.example", 8080),
        ("HTTP://api.corp.example/", "api.corp.example", None),
        ("https://api.corp.example/", "api.corp.example", 443),
        ("https://api.corp.example:9443/", "api.corp.example", 9443),
        ("http://10.20.0.5/", "10.20.0.5", None),
        ("http://[fd00::5]:8080/", "fd00::5", 8080),
        ("http://user:secret@api.corp.example/", "api.corp.example", None),
    ],
)
def test_absolute_uri_request(target: str, host: str, port: int | None) -> None:
    head = f"GET {target} HTTP/1.1\r\nHost: api.corp.example\r\nProxy-Connection: keep-alive\r\n\r\n".encode()
    decision, _ = decided_the_same(head)
    assert decision == Asked(HTTP, host, port, head)


def test_absolute_uri_request_keeps_its_body_bytes() -> None:
    head = b"POST http://api.corp.example/upload HTTP/1.1\r\nHost: api.corp.example\r\nContent-Length: 10\r\n\r\n"
    decision, _ = decided_the_same(head, b"0123456789GET http://next/ HTTP/1.1\r\n")
    assert isinstance(decision, Asked)
    assert decision.leftover == head + b"0123456789GET http://next/ HTTP/1.1\r\n"


def test_bare_line_feeds_are_taken_as_h11_takes_them() -> None:
    decision, _ = decided_the_same(b"GET http://a.example/ HTTP/1.0\n\n")
    assert decision == Asked(HTTP, "a.example", None, b"GET http://a.example/ HTTP/1.0\n\n")


@pytest.mark.parametrize(
    ("head", "method", "path"),
    [
        (b"GET /proxy.pac HTTP/1.1\r\nHost: 127.0.0.1:18888\r\n\r\n", "GET", "/proxy.pac"),
        (b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1:18888\r\n\r\n", "HEAD", "/"),
        (b"POST /x?y=1 HTTP/1.0\r\n\r\n", "POST", "/x?y=1"),
    ],
)
def test_origin_form_is_for_the_proxy_itself(head: bytes, method: str, path: str) -> None:
    decision, _ = decided_the_same(head)
    assert decision == ForProxy(method, path)


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ("ftp://files.example/x", "the proxy takes http:// URLs, not 'ftp://files.example/x'"),
        ("*", "the proxy takes http:// URLs, not '*'"),
        ("http:///nohost", "the proxy takes http:// URLs"),
        ("http://a.example:99999/", "not a valid URL: 'http://a.example:99999/'"),
        ("http://a.example:x/", "not a valid URL"),
    ],
)
def test_urls_the_proxy_does_not_take(target: str, words: str) -> None:
    decision, _ = decided_the_same(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert isinstance(decision, Invalid)
    assert words in decision.message
    assert decision.reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")


@pytest.mark.parametrize(
    "head",
    [
        b"GET http://a.example/ HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"GET http://a.example/ HTTP/1.1\r\nBad Header\r\n\r\n",
        b"GET\r\n\r\n",
    ],
)
def test_invalid_http_is_a_400_with_h11s_words(head: bytes) -> None:
    decision, _ = decided_the_same(head)
    assert isinstance(decision, Invalid)
    assert decision.message.startswith("the request is not valid HTTP/1.1")
    assert decision.reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert decision.cause is Cause.PROTOCOL_MISMATCH


def test_an_over_long_head_is_a_431() -> None:
    head = b"GET http://a.example/ HTTP/1.1\r\nX: " + b"a" * MAX_HEAD
    decision, _ = at_once(head)
    assert isinstance(decision, Invalid)
    assert decision.message == "the request head is larger than 64 KiB"
    assert decision.reply.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert at_once(head[:MAX_HEAD])[0] is None  # up to the limit it waits for the rest


def test_a_long_head_that_ends_within_the_limit_is_read() -> None:
    head = b"GET http://a.example/ HTTP/1.1\r\nHost: a\r\nCookie: " + b"c" * 40_000 + b"\r\n\r\n"
    decision, _ = at_once(head)
    assert decision == Asked(HTTP, "a.example", None, head)


# --- what is none of those ------------------------------------------------------------------

CLIENT_HELLO = bytes.fromhex("160301002e010000") + bytes(50)


def test_a_tls_client_hello_first_is_a_400_in_plain_http() -> None:
    decision, sent = decided_the_same(CLIENT_HELLO[:1], CLIENT_HELLO[1:])
    assert isinstance(decision, Invalid)
    assert "speaks TLS to the proxy port" in decision.message and "not https://" in decision.message
    assert decision.reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"plain HTTP or SOCKS, not TLS" in decision.reply
    assert decision.cause is Cause.PROTOCOL_MISMATCH
    assert sent == b""


@pytest.mark.parametrize(
    "garbage", [b"\x00\x01\x02\x03", b"\xff\xfe", b"\r\nGET / HTTP/1.1\r\n\r\n", b" GET /", b"\x80"]
)
def test_binary_garbage_is_refused_at_once_without_an_answer(garbage: bytes) -> None:
    decision, sent = at_once(garbage)
    assert isinstance(decision, Invalid)
    assert decision.message == f"the client's first bytes are neither HTTP nor SOCKS: {garbage[:16]!r}"
    assert decision.reply == b"" and sent == b""
    one, _, used = byte_by_byte(garbage)
    assert isinstance(one, Invalid) and used == 1  # the first byte is enough


def test_garbage_is_quoted_short() -> None:
    decision, _ = at_once(b"\x00" * 1000)
    assert isinstance(decision, Invalid)
    assert decision.message.endswith(repr(b"\x00" * 16))


def test_the_request_after_socks5_methods_is_read_as_socks5_whatever_its_first_byte() -> None:
    """A SOCKS5 client waits for the method choice, then sends its request: the request is
    SOCKS5's even when it is wrong (a SOCKS4 request there is not taken as SOCKS4)."""
    greeting = Greeting()
    assert greeting.receive(NO_AUTH) is None
    assert greeting.data_to_send() == b"\x05\x00"
    decision = greeting.receive(socks4(443, bytes([10, 0, 0, 1])))
    assert isinstance(decision, Invalid)
    assert decision.reply == socks5_reply(SOCKS5_FAILURE)
    assert decision.message == "a SOCKS5 request must begin with 5, not 4"
    greeting = Greeting()
    assert greeting.receive(NO_AUTH) is None
    decision = greeting.receive(b"GET http://a.example/ HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(decision, Invalid) and decision.reply == socks5_reply(SOCKS5_FAILURE)


def test_eof_before_anything() -> None:
    greeting = Greeting()
    assert greeting.receive(b"") is None
    decision = greeting.receive_eof()
    assert decision == Invalid("the client closed the connection before it asked for a destination", counted=False)
    assert decision.reply == b""


def test_eof_midway_and_after_a_decision() -> None:
    greeting = Greeting()
    assert greeting.receive(b"CONNECT a.example:443 HTTP/1.1\r\n") is None
    assert isinstance(greeting.receive_eof(), Invalid)
    decided = Greeting()
    asked = decided.receive(b"CONNECT a.example:443 HTTP/1.0\r\n\r\n")
    assert isinstance(asked, Asked)
    assert decided.receive_eof() is asked


# --- the proxy's answers -----------------------------------------------------------------------

ASKED_CONNECT = Asked(CONNECT, "api.corp.example", 443)
ASKED_HTTP = Asked(HTTP, "api.corp.example", None)
ASKED_SOCKS5 = Asked(SOCKS, "api.corp.example", 443, socks_version=5)
ASKED_SOCKS4 = Asked(SOCKS, "10.0.0.1", 443, socks_version=4)


def parsed(answer: bytes) -> tuple[h11.Response, bytes]:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(answer)
    response = client.next_event()
    assert isinstance(response, h11.Response)
    body = b""
    while isinstance(event := client.next_event(), h11.Data):
        body += event.data
    assert isinstance(event, h11.EndOfMessage)
    return response, body


def header(response: h11.Response, name: bytes) -> bytes | None:
    return next((value for key, value in response.headers if key == name), None)


def test_granted() -> None:
    assert granted(ASKED_CONNECT) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert granted(ASKED_SOCKS5) == bytes([5, SOCKS5_OK, 0, 1, 0, 0, 0, 0, 0, 0])
    assert granted(ASKED_SOCKS4) == bytes([0, SOCKS4_GRANTED, 0, 0, 0, 0, 0, 0])
    assert granted(ASKED_HTTP) == b""  # the target's answer is the answer


def test_not_allowed() -> None:
    assert not_allowed(ASKED_SOCKS5, "no rule") == socks5_reply(SOCKS5_NOT_ALLOWED) == b"\x05\x02\x00\x01" + bytes(6)
    assert not_allowed(ASKED_SOCKS4, "no rule") == socks4_reply(SOCKS4_REJECTED)
    for asked in (ASKED_CONNECT, ASKED_HTTP):
        response, body = parsed(not_allowed(asked, "a.example:443 is not in the proxy's rules"))
        assert response.status_code == 403
        assert header(response, b"mtls-sidecar-cause") == b"proxy_not_allowed"
        assert header(response, b"connection") == b"close"
        assert body == b"mtls-sidecar: a.example:443 is not in the proxy's rules\n"


@pytest.mark.parametrize(
    ("cause", "code"),
    [
        (Cause.REFUSED, SOCKS5_REFUSED),
        (Cause.DNS, SOCKS5_HOST_UNREACHABLE),
        (Cause.TIMEOUT, SOCKS5_TTL_EXPIRED),
        (Cause.CONNECT, SOCKS5_NET_UNREACHABLE),
        (Cause.SERVER_UNTRUSTED, SOCKS5_FAILURE),
        (Cause.SERVER_REJECTED_CERT, SOCKS5_FAILURE),
        (Cause.NO_USABLE_CERT, SOCKS5_FAILURE),
    ],
)
def test_failed_socks5_code_by_cause(cause: Cause, code: int) -> None:
    assert (SOCKS5_REFUSED, SOCKS5_HOST_UNREACHABLE, SOCKS5_TTL_EXPIRED, SOCKS5_NET_UNREACHABLE) == (5, 4, 6, 3)
    assert failed(ASKED_SOCKS5, cause, "whatever") == bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])
    assert failed(ASKED_SOCKS4, cause, "whatever") == socks4_reply(SOCKS4_REJECTED)


@pytest.mark.parametrize(
    ("cause", "status"),
    [(Cause.TIMEOUT, 504), (Cause.REFUSED, 502), (Cause.DNS, 502), (Cause.SERVER_REJECTED_CERT, 502)],
)
def test_failed_http_answers(cause: Cause, status: int) -> None:
    for asked in (ASKED_CONNECT, ASKED_HTTP):
        response, body = parsed(failed(asked, cause, "api.corp.example:443: it went wrong"))
        assert response.status_code == status
        assert header(response, b"mtls-sidecar-cause") == cause.value.encode()
        assert header(response, b"content-type") == b"text/plain; charset=utf-8"
        assert body == f"mtls-sidecar: api.corp.example:443: it went wrong\nfix: {cause.fix}\n".encode()


# --- any bytes, in any pieces ----------------------------------------------------------------

_STARTS = [b"", NO_AUTH, NO_AUTH + b"\x05\x01\x00", b"\x04\x01", b"CONNECT ", b"GET http://", b"GET /",
           b"\x05\x02\x00\x01"]  # fmt: skip


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.sampled_from(_STARTS), st.binary(max_size=200), st.integers(1, 7))
def test_any_bytes_in_any_pieces_decide_alike_and_never_raise(start: bytes, rest: bytes, step: int) -> None:
    data = start + rest
    whole, _ = at_once(data)
    greeting, one = Greeting(), None
    for index in range(0, len(data), step):
        one = greeting.receive(data[index : index + step])
        if one is not None:
            break
    if whole is None:
        assert one is None
        assert isinstance(greeting.receive_eof(), Invalid)
        return
    assert one is not None and type(one) is type(whole)
    if isinstance(whole, Asked):
        assert isinstance(one, Asked)
        assert one == Asked(whole.how, whole.host, whole.port, one.leftover, whole.socks_version)
    elif isinstance(whole, ForProxy):
        assert one == whole
