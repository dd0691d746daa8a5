"""The stages of a proxied connection, fed events: `ProxyTunnelStage` in front of a CONNECT or
SOCKS tunnel's protocol stage, and the http stage serving an HTTP proxy's client (`Proxied`).
Pure: no sockets (real clients and servers: tests/test_e2e_proxy.py)."""

from __future__ import annotations

import h11
import pytest

from sidecar.causes import Cause, Fault, cause_of
from sidecar.config import ListenAddress, ProxyRuleSpec, ProxySpec, RouteSpec
from sidecar.protocols.http import HTTPStage, Proxied
from sidecar.proxy.greeting import Asked, ForProxy, Greeting, failed, granted
from sidecar.proxy.hosts import parse_host_pattern
from sidecar.proxy.listener import _same_port
from sidecar.proxy.rules import CONNECT, HTTP, SOCKS, Destination, destination_route, http_base, match, normal_host
from sidecar.proxy.stage import ProxyTunnelStage, Relay
from sidecar.stages import (
    Close,
    Command,
    EndLocal,
    EndRemote,
    Handoff,
    PassThrough,
    Refuse,
    SendLocal,
    SendRemote,
    Stage,
    StartTLS,
)

# Runs anywhere: pure logic, or loopback sockets only (the macOS and Windows CI jobs run it).
pytestmark = pytest.mark.portable

ASKED = Asked(CONNECT, "db.example.net", 5432)
GRANT = granted(ASKED)
CLIENT_HELLO = bytes.fromhex("1603010200010001fc0303") + bytes(40)


def fail(cause: Cause, message: str) -> bytes:
    return failed(ASKED, cause, message)


def tunnel(inner: Stage | None = None, *, guard: bool = True, asked: Asked = ASKED) -> ProxyTunnelStage:
    return ProxyTunnelStage(
        inner if inner is not None else PassThrough(),
        granted(asked),
        lambda cause, message: failed(asked, cause, message),
        refuse_client_tls=guard,
        destination="db.example.net:5432",
    )


class Greeter:
    """A protocol stage that speaks to the client before any TLS, as MySQL's does: it waits for
    the server's greeting, passes it on, then starts TLS; transparent once TLS is up."""

    def __init__(self) -> None:
        self.transparent = False
        self.failures: list[tuple[Cause, str]] = []
        self.judging_answer = False

    def connected(self) -> list[Command]:
        return []

    def tls_established(self) -> list[Command]:
        self.transparent = True
        return []

    def remote_failed(self, cause: Cause, message: str) -> list[Command]:
        self.failures.append((cause, message))
        return [SendLocal(b"inner's own failure answer"), Close()]

    def from_local(self, data: bytes) -> list[Command]:
        return [SendRemote(b"client:" + data)]

    def local_eof(self) -> list[Command]:
        return [EndRemote()]

    def from_remote(self, data: bytes) -> list[Command]:
        if data == b"greeting":
            return [SendRemote(b"ack"), SendLocal(b"server says hello"), StartTLS()]
        return [SendLocal(data)]

    def remote_eof(self) -> list[Command]:
        return [EndLocal()]


# --- with a PassThrough inside (protocol tcp) -------------------------------------------------


def test_the_grant_goes_out_once_tls_is_up_then_bytes_pass() -> None:
    stage = tunnel()
    assert not stage.transparent
    assert stage.connected() == [StartTLS()]
    assert not stage.transparent
    assert stage.tls_established() == [SendLocal(GRANT)]
    assert not stage.transparent  # the client's first bytes are still to be looked at
    assert stage.from_local(b"PING\r\n") == [SendRemote(b"PING\r\n")]
    assert stage.transparent  # granted, looked at, and PassThrough has nothing to do
    assert stage.from_local(b"\x16\x03 later bytes are not looked at") == [
        SendRemote(b"\x16\x03 later bytes are not looked at")
    ]
    assert stage.from_remote(b"+PONG\r\n") == [SendLocal(b"+PONG\r\n")]
    assert stage.remote_eof() == [EndLocal()]
    assert stage.local_eof() == [EndRemote()]


@pytest.mark.parametrize(
    ("asked", "grant"),
    [
        (Asked(CONNECT, "a.example", 443), b"HTTP/1.1 200 Connection established\r\n\r\n"),
        (Asked(SOCKS, "a.example", 443, socks_version=5), b"\x05\x00\x00\x01" + bytes(6)),
        (Asked(SOCKS, "a.example", 443, socks_version=4), b"\x00\x5a" + bytes(6)),
    ],
)
def test_the_grant_is_in_the_clients_terms(asked: Asked, grant: bytes) -> None:
    stage = tunnel(asked=asked)
    stage.connected()
    assert stage.tls_established() == [SendLocal(grant)]


def test_client_bytes_before_the_grant_are_held_and_released_after_it() -> None:
    stage = tunnel()
    assert stage.from_local(b"early ") == []
    assert stage.from_local(b"") == []
    assert stage.from_local(b"bytes") == []
    assert stage.connected() == [StartTLS()]
    assert stage.tls_established() == [SendLocal(GRANT), SendRemote(b"early "), SendRemote(b"bytes")]
    assert stage.transparent


def test_a_held_eof_is_released_after_the_held_bytes() -> None:
    stage = tunnel()
    assert stage.from_local(b"QUIT\r\n") == []
    assert stage.local_eof() == []
    stage.connected()
    assert stage.tls_established() == [SendLocal(GRANT), SendRemote(b"QUIT\r\n"), EndRemote()]


def test_an_eof_alone_before_the_grant() -> None:
    stage = tunnel()
    assert stage.local_eof() == []
    stage.connected()
    assert stage.tls_established() == [SendLocal(GRANT), EndRemote()]
    assert stage.transparent  # nothing is left to look at


# --- a ClientHello as the client's first bytes ------------------------------------------------


def refused_for_client_tls(commands: list[Command]) -> Refuse:
    refusal = commands[-1]
    assert isinstance(refusal, Refuse), commands
    assert refusal.fault == Fault("local", "client_tls", "ClientHello inside CONNECT")
    assert cause_of(refusal.fault) is Cause.CLIENT_SPEAKS_TLS
    assert "began its own TLS inside the tunnel to db.example.net:5432" in refusal.message
    assert "passthrough = true" in refusal.message and "http://" in refusal.message
    return refusal


def test_a_client_hello_after_the_grant_is_refused() -> None:
    stage = tunnel()
    stage.connected()
    stage.tls_established()
    commands = stage.from_local(CLIENT_HELLO)
    assert len(commands) == 1
    refused_for_client_tls(commands)
    # over: nothing more is said or passed, either way
    assert stage.from_local(b"more") == []
    assert stage.local_eof() == []
    assert stage.remote_failed(Cause.RESET, "x") == []
    assert stage.tls_established() == []


def test_a_held_client_hello_is_refused_once_granted() -> None:
    stage = tunnel()
    assert stage.from_local(CLIENT_HELLO) == []
    assert stage.from_local(b"rest") == []
    assert stage.local_eof() == []
    stage.connected()
    commands = stage.tls_established()
    assert commands[0] == SendLocal(GRANT)
    refused_for_client_tls(commands[1:])
    assert len(commands) == 2  # neither the rest nor the EOF went to the remote


def test_a_client_hello_whose_first_byte_comes_alone_is_refused() -> None:
    stage = tunnel()
    stage.connected()
    stage.tls_established()
    assert stage.from_local(CLIENT_HELLO[:1]) == []  # one byte cannot tell: held
    refused_for_client_tls(stage.from_local(CLIENT_HELLO[1:]))


def test_a_lone_first_byte_then_eof_is_passed_on() -> None:
    stage = tunnel()
    stage.connected()
    stage.tls_established()
    assert stage.from_local(b"\x16") == []
    assert stage.local_eof() == [SendRemote(b"\x16"), EndRemote()]


@pytest.mark.parametrize("first", [b"\x16\x01", b"\x15\x03\x01", b"\x17\x03\x03", b"GET / HTTP/1.1\r\n", b"\x00"])
def test_first_bytes_that_are_no_client_hello_pass(first: bytes) -> None:
    stage = tunnel()
    stage.connected()
    stage.tls_established()
    assert stage.from_local(first) == [SendRemote(first)]


def test_passthrough_does_not_look_at_the_first_bytes() -> None:
    stage = tunnel(Relay(), guard=False)
    assert stage.connected() == []  # no TLS of ours at all
    assert stage.from_local(CLIENT_HELLO) == []  # held until the grant
    assert stage.tls_established() == [SendLocal(GRANT), SendRemote(CLIENT_HELLO)]
    assert stage.transparent
    assert stage.from_remote(b"\x16\x03\x03 server hello") == [SendLocal(b"\x16\x03\x03 server hello")]


def test_passthrough_is_transparent_as_soon_as_granted() -> None:
    stage = tunnel(Relay(), guard=False)
    assert not stage.transparent
    assert stage.tls_established() == [SendLocal(GRANT)]
    assert stage.transparent


# --- failures before and after the grant --------------------------------------------------


@pytest.mark.parametrize("cause", [Cause.REFUSED, Cause.DNS, Cause.TIMEOUT, Cause.SERVER_UNTRUSTED])
def test_a_failure_before_the_grant_is_answered_in_the_clients_terms(cause: Cause) -> None:
    stage = tunnel()
    assert stage.from_local(b"held") == []
    assert stage.connected() == [StartTLS()]
    assert stage.remote_failed(cause, "db.example.net:5432: went wrong") == [
        SendLocal(fail(cause, "db.example.net:5432: went wrong")),
        Close(),
    ]
    # over: the held bytes never go anywhere, and nothing else is said
    assert stage.tls_established() == []
    assert stage.from_local(b"more") == []
    assert stage.local_eof() == []
    assert stage.remote_failed(cause, "again") == []
    assert not stage.transparent


def test_a_failure_before_the_grant_to_a_socks5_client() -> None:
    asked = Asked(SOCKS, "db.example.net", 5432, socks_version=5)
    stage = tunnel(asked=asked)
    assert stage.remote_failed(Cause.REFUSED, "refused") == [SendLocal(b"\x05\x05\x00\x01" + bytes(6)), Close()]


def test_a_failure_after_the_grant_is_the_inner_stages() -> None:
    inner = Greeter()
    stage = tunnel(inner)
    stage.connected()
    stage.tls_established()
    assert stage.remote_failed(Cause.RESET, "reset") == [SendLocal(b"inner's own failure answer"), Close()]
    assert inner.failures == [(Cause.RESET, "reset")]
    stage = tunnel()
    stage.connected()
    stage.tls_established()
    assert stage.remote_failed(Cause.TRUNCATED, "cut") == [Close()]  # PassThrough: no answer of its own


# --- an inner stage that speaks first (MySQL's greeting comes before any TLS) --------------


def test_the_grant_goes_before_the_inner_stages_first_words() -> None:
    inner = Greeter()
    stage = tunnel(inner)
    assert stage.connected() == []
    assert stage.from_local(b"early") == []  # held: the tunnel is not open yet
    commands = stage.from_remote(b"greeting")
    assert commands == [
        SendRemote(b"ack"),  # to the server: not the client's business, may come first
        SendLocal(GRANT),
        SendLocal(b"server says hello"),
        StartTLS(),
        SendRemote(b"client:early"),  # held bytes, released once granted
    ]
    assert not stage.transparent  # granted and the first bytes looked at, but the inner stage is not done
    assert stage.tls_established() == []  # granted once only
    assert inner.transparent
    assert stage.transparent


def test_the_grant_goes_before_an_inner_stages_end_of_stream() -> None:
    stage = tunnel(Greeter())
    stage.connected()
    assert stage.remote_eof() == [SendLocal(GRANT), EndLocal()]


def test_transparent_only_once_granted_guard_done_and_inner_transparent() -> None:
    inner = Greeter()
    stage = tunnel(inner)
    stage.connected()
    inner.transparent = True
    assert not stage.transparent  # not granted
    stage.from_remote(b"greeting")
    assert not stage.transparent  # the client's first bytes are still to be looked at
    stage.from_local(b"hello")
    assert stage.transparent


def test_judging_answer_is_the_inner_stages() -> None:
    inner = Greeter()
    stage = tunnel(inner)
    assert stage.judging_answer is False
    inner.judging_answer = True
    assert stage.judging_answer is True
    assert tunnel().judging_answer is False  # PassThrough has no such thing


# --- the http stage serving an HTTP proxy's client ---------------------------------------------

LISTEN = ListenAddress("tcp", "127.0.0.1", 18888)


def proxied_stage(url_host: str = "api.one.test", url_port: int | None = None) -> tuple[HTTPStage, RouteSpec]:
    """The stage the proxy gives an absolute-URI request for http://url_host[:url_port]/."""
    rule = ProxyRuleSpec(name="one", hosts=(parse_host_pattern("*.one.test"),), connect=("127.0.0.1", 8443))
    found = match((rule,), url_host, url_port, HTTP)
    assert found is not None
    dest: Destination = found[1]
    route = destination_route(rule, dest, ProxySpec(listen=LISTEN, rules=(rule,)), HTTP)

    def same_destination(target: bytes) -> bool:  # as the proxy's listener decides it
        other = Greeting().receive(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        return isinstance(other, Asked) and normal_host(other.host) == dest.host and _same_port(other.port, url_port)

    stage = HTTPStage(route, LISTEN, Proxied(dest.port, http_base(dest), same_destination))
    assert stage.connected() == [StartTLS()]
    assert stage.tls_established() == []
    return stage, route


def sent(commands: list[Command]) -> bytes:
    assert all(isinstance(c, SendRemote) for c in commands), commands
    return b"".join(c.data for c in commands if isinstance(c, SendRemote))


def request(target: str, *headers: str, body: bytes = b"", method: str = "GET") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_requests_for_the_same_destination_share_the_connection() -> None:
    stage, _ = proxied_stage()
    first = request("http://api.one.test/a?b=1", "Host: api.one.test", "Proxy-Connection: keep-alive", "Accept: */*")
    assert sent(stage.from_local(first)) == (
        b"GET /a?b=1 HTTP/1.1\r\nHost: api.one.test\r\nAccept: */*\r\n\r\n"  # no Proxy-Connection
    )
    assert stage.from_remote(OK) == [SendLocal(OK)]
    second = request("http://API.one.test:80/second", "Host: api.one.test", "Proxy-Authorization: Basic eDp5", "X-Y: z")
    assert sent(stage.from_local(second)) == b"GET /second HTTP/1.1\r\nHost: api.one.test\r\nX-Y: z\r\n\r\n"
    assert stage.from_remote(OK) == [SendLocal(OK)]
    assert not stage.transparent


def test_proxy_headers_never_reach_the_target_in_any_case() -> None:
    stage, _ = proxied_stage()
    out = sent(
        stage.from_local(
            request("http://api.one.test/", "host: api.one.test", "PROXY-CONNECTION: close", "proxy-authorization: x")
        )
    )
    assert b"proxy" not in out.lower()
    assert out.lower() == b"get / http/1.1\r\nhost: api.one.test\r\n\r\n"


def test_the_target_gets_the_destinations_host_and_port() -> None:
    stage, route = proxied_stage("api.one.test", 8443)
    assert route.target == "127.0.0.1:8443" and route.server_name == "api.one.test"
    out = sent(stage.from_local(request("http://api.one.test:8443/x", "Host: api.one.test:8443")))
    assert out == b"GET /x HTTP/1.1\r\nHost: api.one.test:8443\r\n\r\n"


def test_redirects_to_the_destination_come_back_through_the_proxy() -> None:
    stage, _ = proxied_stage()
    stage.from_local(request("http://api.one.test/", "Host: api.one.test"))
    answer = stage.from_remote(
        b"HTTP/1.1 302 Found\r\nLocation: https://api.one.test/next\r\nContent-Length: 0\r\n\r\n"
    )
    assert answer == [
        SendLocal(b"HTTP/1.1 302 Found\r\nLocation: http://api.one.test/next\r\nContent-Length: 0\r\n\r\n")
    ]
    stage.from_local(request("http://api.one.test/next", "Host: api.one.test"))
    answer = stage.from_remote(b"HTTP/1.1 302 Found\r\nLocation: https://127.0.0.1:8443/x\r\nContent-Length: 0\r\n\r\n")
    # the address dialled (`connect`) is not the destination's origin: left as it is
    assert answer == [
        SendLocal(b"HTTP/1.1 302 Found\r\nLocation: https://127.0.0.1:8443/x\r\nContent-Length: 0\r\n\r\n")
    ]


def reparsed(handoff: Handoff) -> tuple[Asked, h11.Request, bytes]:
    """What the proxy reads from a Handoff's bytes: the decision, the request and its body so far."""
    decision = Greeting().receive(handoff.data)
    assert isinstance(decision, Asked), decision
    server = h11.Connection(h11.SERVER)
    server.receive_data(decision.leftover)
    event = server.next_event()
    assert isinstance(event, h11.Request)
    body = b""
    while isinstance(part := server.next_event(), h11.Data):
        body += part.data
    return decision, event, body


@pytest.mark.parametrize(
    ("target", "host", "port"),
    [
        ("http://api.two.test/other?x=1", "api.two.test", None),
        ("http://api.one.test:8080/", "api.one.test", 8080),  # another port is another destination
        ("http://10.1.2.3/", "10.1.2.3", None),
    ],
)
def test_a_request_for_another_destination_is_handed_back(target: str, host: str, port: int | None) -> None:
    stage, _ = proxied_stage()
    assert sent(stage.from_local(request("http://api.one.test/", "Host: api.one.test")))
    assert stage.from_remote(OK) == [SendLocal(OK)]
    other = request(
        target,
        f"Host: {host}",
        "Proxy-Connection: keep-alive",
        "Proxy-Authorization: Basic eDp5",
        "X-Trace: 7",
        body=b"0123456789",
        method="POST",
    )
    commands = stage.from_local(other[:-4])  # the head and 6 of the 10 body bytes so far
    assert len(commands) == 1 and isinstance(commands[0], Handoff), commands
    decision, event, body = reparsed(commands[0])
    assert (decision.how, decision.host, decision.port) == (HTTP, host, port)
    assert (event.method, event.target, event.http_version) == (b"POST", target.encode(), b"1.1")
    assert event.headers == h11.Request(method="POST", target=target, headers=_headers(other)).headers
    assert body == b"012345"  # what arrived of the body: nothing read is lost
    # the connection to the first destination is done: nothing more from this stage
    assert stage.from_local(b"6789") == []
    assert stage.from_remote(b"late") == []


def _headers(raw: bytes) -> list[tuple[bytes, bytes]]:
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    return [tuple(line.split(b": ", 1)) for line in head]  # type: ignore[misc]


def test_a_pipelined_request_for_another_destination_waits_for_the_answer_in_flight() -> None:
    stage, _ = proxied_stage()
    first = request("http://api.one.test/", "Host: api.one.test")
    second = request("http://api.two.test/", "Host: api.two.test")
    assert sent(stage.from_local(first + second)).count(b"GET ") == 1
    commands = stage.from_remote(OK)
    assert commands[0] == SendLocal(OK)  # the answer first, then the client goes back to the proxy
    assert commands[1:] == [Handoff(second)]


def test_a_request_for_the_proxy_itself_is_handed_back() -> None:
    stage, _ = proxied_stage()
    stage.from_local(request("http://api.one.test/", "Host: api.one.test"))
    stage.from_remote(OK)
    commands = stage.from_local(request("/proxy.pac", "Host: 127.0.0.1:18888"))
    assert len(commands) == 1 and isinstance(commands[0], Handoff)
    assert Greeting().receive(commands[0].data) == ForProxy("GET", "/proxy.pac")


def test_a_connect_on_a_kept_alive_proxy_connection_is_handed_back() -> None:
    stage, _ = proxied_stage()
    stage.from_local(request("http://api.one.test/", "Host: api.one.test"))
    stage.from_remote(OK)
    commands = stage.from_local(request("api.one.test:443", "Host: api.one.test:443", method="CONNECT"))
    assert len(commands) == 1 and isinstance(commands[0], Handoff)
    assert Greeting().receive(commands[0].data) == Asked(CONNECT, "api.one.test", 443)


def test_without_proxied_mode_another_host_is_not_handed_off() -> None:
    """A route's http stage serves every request on its own target, whatever the URL says."""
    route = RouteSpec(
        name="api", listen=ListenAddress("tcp", "127.0.0.1", 0), target_host="10.1.2.3", target_port=443,
        server_name="api.internal.test", protocol="http",
    )  # fmt: skip
    stage = HTTPStage(route, ListenAddress("tcp", "127.0.0.1", 18080))
    stage.connected()
    stage.tls_established()
    stage.from_local(request("/", "Host: x"))
    stage.from_remote(OK)
    out = sent(stage.from_local(request("http://elsewhere.test/y", "Host: elsewhere.test", "Proxy-Connection: x")))
    assert out == b"GET /y HTTP/1.1\r\nHost: api.internal.test\r\nProxy-Connection: x\r\n\r\n"


def test_a_chunked_request_for_another_destination_is_handed_back_as_it_came() -> None:
    stage, _ = proxied_stage()
    stage.from_local(request("http://api.one.test/", "Host: api.one.test"))
    stage.from_remote(OK)
    head = request("http://api.two.test/up", "Host: api.two.test", "Transfer-Encoding: chunked", method="PUT")
    commands = stage.from_local(head + b"5\r\nhello\r\n3\r\nwor")  # a chunk and a half so far
    assert len(commands) == 1 and isinstance(commands[0], Handoff)
    decision, event, body = reparsed(commands[0])
    assert (decision.host, event.method, event.target) == ("api.two.test", b"PUT", b"http://api.two.test/up")
    assert (b"transfer-encoding", b"chunked") in list(event.headers)
    assert body == b"hellowor"


def test_an_http10_request_for_another_destination_keeps_its_version() -> None:
    stage, _ = proxied_stage()
    stage.from_local(request("http://api.one.test/", "Host: api.one.test"))
    stage.from_remote(OK)
    commands = stage.from_local(b"GET http://api.two.test/ HTTP/1.0\r\nUser-Agent: old\r\n\r\n")
    assert commands == [Handoff(b"GET http://api.two.test/ HTTP/1.0\r\nUser-Agent: old\r\n\r\n")]
