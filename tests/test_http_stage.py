"""The `http` protocol stage, fed bytes: what it sends each way, and its own answers. Pure.

Real nginx through a real daemon is tests/test_e2e_http.py; here each rule is one table row.
"""

from __future__ import annotations

import pytest

from sidecar.causes import Cause, cause_of
from sidecar.config import ListenAddress, RouteSpec
from sidecar.protocols import make_stage
from sidecar.protocols.http import HTTPStage, OriginRewriter
from sidecar.protocols.http_host import http_host
from sidecar.stages import Close, Command, EndLocal, EndRemote, Refuse, SendLocal, SendRemote, StartTLS

# Runs anywhere: pure logic, or loopback sockets only (the macOS and Windows CI jobs run it).
pytestmark = pytest.mark.portable

LOCAL = ListenAddress("tcp", "127.0.0.1", 18080)


def route(**extra: object) -> RouteSpec:
    fields: dict[str, object] = {
        "name": "api",
        "listen": ListenAddress("tcp", "127.0.0.1", 0),
        "target_host": "10.1.2.3",
        "target_port": 8443,
        "server_name": "api.internal.test",
        "protocol": "http",
        **extra,
    }
    return RouteSpec(**fields)  # type: ignore[arg-type]


def up(r: RouteSpec | None = None, local: ListenAddress = LOCAL) -> HTTPStage:
    """A stage whose remote is connected and through TLS."""
    stage = HTTPStage(r or route(), local)
    assert stage.connected() == [StartTLS()]
    assert stage.tls_established() == []
    return stage


def to_remote(commands: list[Command]) -> bytes:
    assert all(isinstance(c, SendRemote) for c in commands), commands
    return b"".join(c.data for c in commands if isinstance(c, SendRemote))


def to_local(commands: list[Command]) -> bytes:
    assert all(isinstance(c, SendLocal) for c in commands), commands
    return b"".join(c.data for c in commands if isinstance(c, SendLocal))


def answer_and_end(commands: list[Command]) -> tuple[bytes, type]:
    """What the local client is told, and the last command (Close or Refuse)."""
    *sends, last = commands
    return to_local(sends), type(last)


def body_of(answer: bytes) -> bytes:
    return answer.split(b"\r\n\r\n", 1)[1]


GET = b"GET /a?b=1 HTTP/1.1\r\nHost: 127.0.0.1:18080\r\nAccept: */*\r\n\r\n"


def test_make_stage_picks_http() -> None:
    assert isinstance(make_stage(route(), LOCAL), HTTPStage)


@pytest.mark.parametrize(
    ("extra", "host"),
    [
        ({}, "api.internal.test:8443"),
        ({"target_port": 443}, "api.internal.test"),
        ({"server_name": "10.1.2.3"}, "10.1.2.3:8443"),
        ({"server_name": "fd00::5", "target_port": 443}, "[fd00::5]"),
        ({"host_header": "public.example.test"}, "public.example.test"),
        ({"host_header": "public.example.test:9000", "target_port": 443}, "public.example.test:9000"),
    ],
)
def test_host_header(extra: dict[str, object], host: str) -> None:
    assert http_host(route(**extra)) == host


def test_every_request_gets_the_targets_host_and_keeps_its_other_headers() -> None:
    stage = up()
    sent = to_remote(stage.from_local(GET))
    assert sent == b"GET /a?b=1 HTTP/1.1\r\nHost: api.internal.test:8443\r\nAccept: */*\r\n\r\n"


def test_host_header_overrides_server_name() -> None:
    stage = up(route(host_header="public.example.test"))
    assert b"\r\nHost: public.example.test\r\n" in to_remote(stage.from_local(GET))


def test_an_http10_request_without_host_gets_one() -> None:
    stage = up()
    sent = to_remote(stage.from_local(b"GET / HTTP/1.0\r\nUser-Agent: old\r\n\r\n"))
    assert sent == b"GET / HTTP/1.1\r\nHost: api.internal.test:8443\r\nUser-Agent: old\r\n\r\n"


@pytest.mark.parametrize(
    ("target", "sent"),
    [
        (b"http://127.0.0.1:18080/x/y?z=1", b"/x/y?z=1"),
        (b"http://127.0.0.1:18080", b"/"),
        (b"http://127.0.0.1:18080?q", b"/?q"),
        (b"/plain", b"/plain"),
    ],
)
def test_an_absolute_form_target_becomes_origin_form(target: bytes, sent: bytes) -> None:
    stage = up()
    out = to_remote(stage.from_local(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1:18080\r\n\r\n"))
    assert out.startswith(b"GET " + sent + b" HTTP/1.1\r\nHost: api.internal.test:8443\r\n")


def test_the_request_waits_for_tls_and_goes_in_one_piece() -> None:
    stage = HTTPStage(route(), LOCAL)
    assert stage.from_local(GET[:10]) == []
    assert stage.from_local(GET[10:]) == []  # the head is complete, but TLS is not up yet
    assert stage.connected() == [StartTLS()]
    assert to_remote(stage.tls_established()).startswith(b"GET /a?b=1 HTTP/1.1\r\nHost: api.internal.test:8443")


ORIGIN_ROWS = [
    # (route fields, Location from the target, what the local client gets)
    ({}, b"https://api.internal.test:8443/next", b"http://127.0.0.1:18080/next"),
    ({}, b"https://API.Internal.Test:8443/a/b?c=d#e", b"http://127.0.0.1:18080/a/b?c=d#e"),
    ({}, b"http://api.internal.test:8443/next", b"http://127.0.0.1:18080/next"),
    ({}, b"https://10.1.2.3:8443/next", b"http://127.0.0.1:18080/next"),
    ({}, b"https://api.internal.test:8443", b"http://127.0.0.1:18080/"),
    ({}, b"https://api.internal.test:8443?x", b"http://127.0.0.1:18080/?x"),
    ({}, b"//api.internal.test:8443/p", b"http://127.0.0.1:18080/p"),
    ({}, b"https://api.internal.test/next", b"https://api.internal.test/next"),  # 443: another service
    ({}, b"https://api.internal.test:9443/next", b"https://api.internal.test:9443/next"),
    ({}, b"https://elsewhere.test:8443/next", b"https://elsewhere.test:8443/next"),
    ({}, b"ftp://api.internal.test:8443/f", b"ftp://api.internal.test:8443/f"),
    ({}, b"/relative/stays", b"/relative/stays"),
    ({}, b"next", b"next"),
    ({}, b"https://api.internal.test:notaport/x", b"https://api.internal.test:notaport/x"),
    ({"target_port": 443}, b"https://api.internal.test/next", b"http://127.0.0.1:18080/next"),
    ({"target_port": 443}, b"http://api.internal.test/next", b"http://127.0.0.1:18080/next"),
    ({"target_port": 443}, b"https://api.internal.test:443/next", b"http://127.0.0.1:18080/next"),
    ({"host_header": "public.example.test"}, b"https://public.example.test:8443/p", b"http://127.0.0.1:18080/p"),
    ({"host_header": "public.example.test:9000"}, b"https://public.example.test:9000/p", b"http://127.0.0.1:18080/p"),
]


@pytest.mark.parametrize(("extra", "location", "rewritten"), ORIGIN_ROWS)
def test_origin_rewrite(extra: dict[str, object], location: bytes, rewritten: bytes) -> None:
    assert OriginRewriter(route(**extra), LOCAL)(location) == rewritten


def test_origin_rewrite_for_ipv6_and_unix_listeners() -> None:
    location = b"https://api.internal.test:8443/next?a"
    assert OriginRewriter(route(), ListenAddress("tcp", "::1", 18081))(location) == b"http://[::1]:18081/next?a"
    # A Unix socket has no URL: a path-absolute reference keeps the client on the same socket.
    assert OriginRewriter(route(), ListenAddress("unix", path="/run/api.sock"))(location) == b"/next?a"


def test_location_and_content_location_come_back_on_the_tunnel() -> None:
    stage = up()
    stage.from_local(GET)
    answer = to_local(
        stage.from_remote(
            b"HTTP/1.1 302 Found\r\nServer: nginx\r\nLocation: https://api.internal.test:8443/next\r\n"
            b"Content-Location: https://api.internal.test:8443/a\r\nLink: <https://api.internal.test:8443/l>\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
    )
    assert answer == (
        b"HTTP/1.1 302 Found\r\nServer: nginx\r\nLocation: http://127.0.0.1:18080/next\r\n"
        b"Content-Location: http://127.0.0.1:18080/a\r\nLink: <https://api.internal.test:8443/l>\r\n"
        b"Content-Length: 0\r\n\r\n"
    )


def test_two_requests_on_one_connection() -> None:
    stage = up()
    assert to_remote(stage.from_local(GET)).startswith(b"GET /a?b=1 ")
    first = to_local(stage.from_remote(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"))
    assert first == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"
    second = GET.replace(b"/a?b=1", b"/second")
    assert to_remote(stage.from_local(second)).startswith(b"GET /second HTTP/1.1\r\nHost: api.internal.test:8443")
    assert to_local(stage.from_remote(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")).endswith(b"second")
    assert not stage.transparent


def test_a_pipelined_request_waits_for_the_answer_before_it() -> None:
    stage = up()
    second = GET.replace(b"/a?b=1", b"/second")
    assert to_remote(stage.from_local(GET + second)).count(b"GET ") == 1
    commands = stage.from_remote(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert commands == [
        SendLocal(b"HTTP/1.1 204 No Content\r\n\r\n"),
        SendRemote(second.replace(b"127.0.0.1:18080", b"api.internal.test:8443")),
    ]


def test_a_head_response_has_no_body_and_the_connection_goes_on() -> None:
    stage = up()
    stage.from_local(GET.replace(b"GET", b"HEAD"))
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    assert to_local(stage.from_remote(head)) == head
    assert to_remote(stage.from_local(GET)).startswith(b"GET /a?b=1 ")


def test_chunked_bodies_stream_both_ways_piece_by_piece() -> None:
    stage = up()
    sent = stage.from_local(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert to_remote(sent).endswith(b"Transfer-Encoding: chunked\r\n\r\n")
    # each piece leaves at once: nothing is gathered into a whole body
    assert stage.from_local(b"5\r\nhello\r\n") == [SendRemote(b"5\r\nhello\r\n")]
    assert stage.from_local(b"6\r\n world\r\n") == [SendRemote(b"6\r\n world\r\n")]
    assert stage.from_local(b"0\r\nX-Sum: 11\r\n\r\n") == [SendRemote(b"0\r\nX-Sum: 11\r\n\r\n")]
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert to_local(stage.from_remote(head)) == head
    assert stage.from_remote(b"3\r\nabc\r\n") == [SendLocal(b"3\r\nabc\r\n")]
    assert stage.from_remote(b"0\r\n\r\n") == [SendLocal(b"0\r\n\r\n")]
    assert to_remote(stage.from_local(GET)).startswith(b"GET /a?b=1 ")  # and the connection goes on


def test_content_length_bodies_pass_each_piece_as_it_comes() -> None:
    stage = up()
    stage.from_local(b"PUT /f HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\nabc")
    assert stage.from_local(b"defgh") == [SendRemote(b"defgh")]
    stage.from_remote(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
    assert stage.from_remote(b"123") == [SendLocal(b"123")]
    assert stage.from_remote(b"456") == [SendLocal(b"456")]


def test_an_http10_client_gets_a_chunked_answer_unchunked_then_the_connection_ends() -> None:
    stage = up()
    stage.from_local(b"GET / HTTP/1.0\r\n\r\n")
    answer = to_local(stage.from_remote(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"))
    assert answer == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc"
    assert stage.from_remote(b"0\r\n\r\n") == [Close()]


def test_the_target_saying_close_ends_the_local_connection_after_the_answer() -> None:
    stage = up()
    stage.from_local(GET)
    commands = stage.from_remote(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    assert commands == [SendLocal(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"), Close()]


def test_a_close_delimited_answer_ends_at_the_targets_eof() -> None:
    stage = up()
    stage.from_local(GET)
    assert to_local(stage.from_remote(b"HTTP/1.0 200 OK\r\n\r\nsome")).startswith(b"HTTP/1.1 200 OK\r\n")
    assert stage.remote_eof() == [SendLocal(b"0\r\n\r\n"), Close()]


def test_an_idle_connection_whose_target_closes_is_closed() -> None:
    stage = up()
    stage.from_local(GET)
    stage.from_remote(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert stage.remote_eof() == [Close()]


def test_the_local_client_half_closing_still_gets_its_answer() -> None:
    stage = up()
    stage.from_local(GET)
    assert stage.local_eof() == []
    commands = stage.from_remote(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert commands == [SendLocal(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), Close()]


def test_100_continue_passes() -> None:
    stage = up()
    stage.from_local(b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    assert to_local(stage.from_remote(b"HTTP/1.1 100 Continue\r\n\r\n")) == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert stage.from_local(b"abc") == [SendRemote(b"abc")]


def test_101_upgrade_then_bytes_pass_untouched() -> None:
    stage = up()
    request = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    # the client's first frame comes right behind its request
    assert to_remote(stage.from_local(request + b"\x81\x85early")).endswith(b"Upgrade: websocket\r\n\r\n")
    switching = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    commands = stage.from_remote(switching + b"\x81\x02hi")
    assert commands == [SendLocal(switching + b"\x81\x02hi"), SendRemote(b"\x81\x85early")]
    assert stage.transparent


def test_a_refused_upgrade_is_an_ordinary_answer() -> None:
    stage = up()
    stage.from_local(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    stage.from_remote(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    assert not stage.transparent
    assert to_remote(stage.from_local(GET)).startswith(b"GET /a?b=1 ")


@pytest.mark.parametrize(
    ("garbage", "status", "says"),
    [
        (b"hello there\r\n\r\n", 400, b"not valid HTTP/1.1"),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400, b"not valid HTTP/1.1"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, b"use http://127.0.0.1:18080/, not https://"),
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", 400, b"not an HTTP request line"),  # psql's SSLRequest
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000, 431, b"not valid HTTP/1.1"),
    ],
)
def test_a_malformed_request_gets_an_http_answer(garbage: bytes, status: int, says: bytes) -> None:
    stage = HTTPStage(route(), LOCAL)  # before the remote is even connected
    answer, last = answer_and_end(stage.from_local(garbage))
    assert answer.startswith(b"HTTP/1.1 %d " % status)
    assert b"\r\nContent-Type: text/plain; charset=utf-8\r\n" in answer and b"\r\nConnection: close\r\n" in answer
    assert says in answer
    assert last is Refuse  # counted under the route's failures, as protocol_mismatch
    assert stage.from_local(b"more") == [] and stage.tls_established() == []


def test_a_target_that_is_down_gets_a_502_once_the_request_is_here() -> None:
    stage = HTTPStage(route(), LOCAL)
    assert stage.remote_failed(Cause.REFUSED, "connection to 10.1.2.3:8443 refused (is the service running?)") == []
    answer, last = answer_and_end(stage.from_local(GET))
    assert last is Close
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"\r\nMtls-Sidecar-Cause: refused" in head
    assert body == (
        b"mtls-sidecar: connection to 10.1.2.3:8443 refused (is the service running?)\n"
        b"fix: " + Cause.REFUSED.fix.encode() + b"\n"
    )
    assert int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) == len(body)


def test_a_failure_after_the_request_is_answered_at_once() -> None:
    stage = HTTPStage(route(), LOCAL)
    assert stage.from_local(GET) == []
    answer, last = answer_and_end(stage.remote_failed(Cause.SERVER_UNTRUSTED, "untrusted"))
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and answer.endswith(
        b"fix: " + Cause.SERVER_UNTRUSTED.fix.encode() + b"\n"
    )
    assert last is Close


def test_a_handshake_timeout_is_a_504() -> None:
    stage = HTTPStage(route(), LOCAL)
    stage.from_local(GET)
    answer, _ = answer_and_end(stage.remote_failed(Cause.TIMEOUT, "timed out connecting to 10.1.2.3:8443"))
    assert answer.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
    assert b"mtls-sidecar: timed out connecting to 10.1.2.3:8443\nfix: " in answer


def test_a_502_to_head_has_no_body() -> None:
    stage = HTTPStage(route(), LOCAL)
    stage.from_local(GET.replace(b"GET", b"HEAD"))
    answer, _ = answer_and_end(stage.remote_failed(Cause.REFUSED, "refused"))
    assert answer.startswith(b"HTTP/1.1 502 ") and answer.endswith(b"\r\n\r\n")


def test_a_client_that_leaves_before_asking_is_closed_quietly() -> None:
    stage = HTTPStage(route(), LOCAL)
    assert stage.remote_failed(Cause.REFUSED, "refused") == []
    assert stage.local_eof() == [Close()]


def test_a_target_that_does_not_speak_http_gets_a_502() -> None:
    stage = up()
    stage.from_local(GET)
    commands = stage.from_remote(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    answer, _ = answer_and_end(commands)
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and b"Mtls-Sidecar-Cause: protocol_mismatch" in answer
    assert b"mtls-sidecar: 10.1.2.3:8443 does not answer in HTTP/1.1 (" in answer
    refusal = commands[-1]
    assert isinstance(refusal, Refuse) and cause_of(refusal.fault) == Cause.PROTOCOL_MISMATCH


def test_a_target_that_closes_without_answering_gets_a_502() -> None:
    stage = up()
    stage.from_local(GET)
    commands = stage.remote_eof()
    answer, last = answer_and_end(commands)
    assert answer.startswith(b"HTTP/1.1 502 ") and b"Mtls-Sidecar-Cause: connect\r\n" in answer
    assert body_of(answer) == (
        b"mtls-sidecar: 10.1.2.3:8443 closed the connection without answering the request "
        b"(did it refuse our client certificate? its log says why)\nfix: " + Cause.CONNECT.fix.encode() + b"\n"
    )
    assert last is Refuse


def test_a_kept_alive_target_connection_closing_under_a_request_closes_the_local_one_without_an_answer() -> None:
    stage = up()
    stage.from_local(GET)
    stage.from_remote(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    stage.from_local(GET)  # the second request goes out as the target closes its idle connection
    assert stage.remote_eof() == [Close()]  # the client repeats it on a new connection


def test_a_truncated_answer_ends_the_local_connection_without_a_second_head() -> None:
    stage = up()
    stage.from_local(GET)
    stage.from_remote(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    assert stage.remote_eof() == [Close()]


def test_a_target_closing_halfway_through_its_head_gets_a_502() -> None:
    stage = up()
    stage.from_local(GET)
    assert stage.from_remote(b"HTTP/1.1 200 OK\r\nContent-Le") == []
    answer, last = answer_and_end(stage.remote_eof())
    assert answer.startswith(b"HTTP/1.1 502 ") and b"closed the connection mid-answer" in answer
    assert last is Refuse


def test_upgrade_with_eof_on_both_sides_passes_the_eofs() -> None:
    stage = up()
    stage.from_local(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    stage.local_eof()
    commands = stage.from_remote(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    assert commands[-1] == EndRemote() and stage.transparent
    assert EndLocal() not in commands
