"""The upstream proxy's URL and dialogues (sidecar/upstreamproxy.py), fed bytes: no sockets."""

from __future__ import annotations

import base64

import pytest

from sidecar.causes import Cause, cause_of, fault_from
from sidecar.failures import classify
from sidecar.upstreamproxy import (
    HttpConnect,
    ProxyURLError,
    Socks5,
    UpstreamProxy,
    UpstreamProxyError,
    dialogue,
    parse_credentials,
    parse_proxy_url,
)

HTTP_PROXY = UpstreamProxy("http", "proxy.corp.example", 3128, "CORP_PROXY_AUTH")
SOCKS_PROXY = UpstreamProxy("socks5", "127.0.0.1", 1080, "CORP_PROXY_AUTH")


# --- the URL


@pytest.mark.parametrize(
    ("url", "kind", "host", "port"),
    [
        ("http://proxy.corp.example", "http", "proxy.corp.example", 3128),
        ("http://proxy.corp.example:8080/", "http", "proxy.corp.example", 8080),
        ("HTTP://10.0.0.1:3128", "http", "10.0.0.1", 3128),
        ("socks5://127.0.0.1", "socks5", "127.0.0.1", 1080),
        ("socks5h://socks.corp.example:1081", "socks5", "socks.corp.example", 1081),
        ("socks5://[::1]:9050", "socks5", "::1", 9050),
    ],
)
def test_proxy_urls_that_work(url: str, kind: str, host: str, port: int) -> None:
    proxy = parse_proxy_url(url, "ENV")
    assert (proxy.kind, proxy.host, proxy.port, proxy.auth_env) == (kind, host, port, "ENV")


def test_the_address_of_an_ipv6_proxy_is_bracketed() -> None:
    assert parse_proxy_url("socks5://[::1]:9050").url == "socks5://[::1]:9050"


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://user:secret@proxy.corp.example:3128", "credentials do not belong in the config file"),
        ("https://proxy.corp.example:3128", "TLS to the proxy itself is not supported"),
        ("socks4://proxy.corp.example:1080", "unsupported proxy scheme 'socks4'"),
        ("ftp://proxy.corp.example", "unsupported proxy scheme 'ftp'"),
        ("proxy.corp.example:3128", "not a proxy URL"),
        ("http://proxy.corp.example:99999", "not a proxy URL"),
        ("http://proxy.corp.example:3128/path", "only scheme://host:port"),
        ("http://:3128", "names no host"),
        ("http://proxy corp:3128", "no spaces"),
    ],
)
def test_proxy_urls_that_are_refused_say_why(url: str, words: str) -> None:
    with pytest.raises(ProxyURLError) as caught:
        parse_proxy_url(url)
    assert words in caught.value.message
    assert caught.value.hint


def test_a_url_with_credentials_points_at_the_environment_variable() -> None:
    with pytest.raises(ProxyURLError) as caught:
        parse_proxy_url("socks5://user:secret@127.0.0.1:1080")
    assert "upstream_proxy_auth_env" in caught.value.hint
    assert "secret" not in caught.value.message + caught.value.hint


def test_credentials_split_at_the_first_colon() -> None:
    assert parse_credentials("alice:pa:ss") == ("alice", "pa:ss")
    assert parse_credentials("alice") == ("alice", "")


# --- HTTP CONNECT


def test_connect_request_with_basic_credentials() -> None:
    talk = HttpConnect(HTTP_PROXY, "api.corp.example", 443, ("alice", "s3cret"))
    request = talk.start()
    assert request.startswith(b"CONNECT api.corp.example:443 HTTP/1.1\r\nHost: api.corp.example:443\r\n")
    token = base64.b64encode(b"alice:s3cret")
    assert b"Proxy-Authorization: Basic " + token + b"\r\n" in request
    assert request.endswith(b"\r\n\r\n")


def test_connect_request_to_an_ipv6_target_brackets_it_and_sends_no_credentials_without_them() -> None:
    request = HttpConnect(HTTP_PROXY, "::1", 8443, None).start()
    assert request.startswith(b"CONNECT [::1]:8443 HTTP/1.1\r\n")
    assert b"Proxy-Authorization" not in request


def test_a_200_in_pieces_opens_the_tunnel_and_keeps_the_bytes_past_it() -> None:
    talk = HttpConnect(HTTP_PROXY, "db.corp.example", 3306, None)
    answer = b"HTTP/1.1 200 Connection established\r\nVia: squid\r\n\r\nTARGET-GREETING"
    head = len(answer) - len(b"TARGET-GREETING")
    for i in range(head - 1):
        assert talk.receive(answer[i : i + 1]) == b""
        assert not talk.done
    talk.receive(answer[head - 1 : head + 6])
    talk.receive(answer[head + 6 :])
    assert talk.done and talk.status == 200
    assert talk.leftover == b"TARGET-GREETING"


def test_a_bare_lf_answer_is_understood() -> None:
    talk = HttpConnect(HTTP_PROXY, "a.example", 443, None)
    talk.receive(b"HTTP/1.0 200 OK\n\nrest")
    assert talk.done and talk.leftover == b"rest"


def test_an_informational_answer_before_the_real_one_is_passed_over() -> None:
    talk = HttpConnect(HTTP_PROXY, "a.example", 443, None)
    talk.receive(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\nearly")
    assert talk.done and talk.status == 200 and talk.leftover == b"early"


@pytest.mark.parametrize(("status", "words"), [(403, "Forbidden"), (502, "Bad Gateway"), (503, "")])
def test_a_refusal_carries_the_status_and_reason(status: int, words: str) -> None:
    talk = HttpConnect(HTTP_PROXY, "api.corp.example", 443, None)
    with pytest.raises(UpstreamProxyError) as caught:
        talk.receive(f"HTTP/1.1 {status} {words}\r\nContent-Length: 0\r\n\r\n".encode())
    error = caught.value
    assert (error.refused, error.status, error.reason) == (True, status, words)
    assert "proxy.corp.example:3128" in error.message and "api.corp.example:443" in error.message
    assert f"HTTP {status}" in error.message
    assert cause_of(fault_from("connect", error)) == Cause.UPSTREAM_PROXY_REFUSED


def test_407_without_the_variable_set_names_it() -> None:
    talk = HttpConnect(HTTP_PROXY, "api.corp.example", 443, None)
    with pytest.raises(UpstreamProxyError) as caught:
        talk.receive(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
    error = caught.value
    assert error.status == 407 and error.needs_credentials and not error.credentials
    assert "CORP_PROXY_AUTH" in error.message and "is not set" in error.message
    assert "CORP_PROXY_AUTH" in error.fix


def test_407_with_credentials_sent_says_they_were_refused() -> None:
    talk = HttpConnect(HTTP_PROXY, "api.corp.example", 443, ("alice", "wrong"))
    with pytest.raises(UpstreamProxyError) as caught:
        talk.receive(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
    assert "did not accept the credentials in the environment variable CORP_PROXY_AUTH" in caught.value.message
    assert "wrong" not in caught.value.message + caught.value.fix


def test_407_with_no_variable_configured_says_to_configure_one() -> None:
    proxy = UpstreamProxy("http", "proxy.corp.example", 3128)
    with pytest.raises(UpstreamProxyError) as caught:
        HttpConnect(proxy, "a.example", 443, None).receive(b"HTTP/1.1 407 Auth\r\n\r\n")
    assert "upstream_proxy_auth_env" in caught.value.fix


def test_an_answer_that_is_not_http_is_unreachable_not_refused() -> None:
    talk = HttpConnect(HTTP_PROXY, "a.example", 443, None)
    with pytest.raises(UpstreamProxyError) as caught:
        talk.receive(b"\x16\x03\x01\x00\x05hello\r\n\r\n")
    assert not caught.value.refused
    assert "did not answer CONNECT in HTTP" in caught.value.message
    assert cause_of(fault_from("connect", caught.value)) == Cause.UPSTREAM_PROXY_UNREACHABLE


def test_an_endless_head_is_bounded() -> None:
    talk = HttpConnect(HTTP_PROXY, "a.example", 443, None)
    talk.receive(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(UpstreamProxyError) as caught:
        for _ in range(200):
            talk.receive(b"X-Filler: " + b"a" * 100 + b"\r\n")
    assert "more than" in caught.value.message


def test_the_proxy_closing_before_its_answer_is_unreachable() -> None:
    talk = HttpConnect(HTTP_PROXY, "a.example", 443, None)
    talk.receive(b"HTTP/1.1 200")
    with pytest.raises(UpstreamProxyError) as caught:
        talk.receive_eof()
    assert not caught.value.refused and "closed the connection" in caught.value.message


# --- SOCKS5


def test_socks5_without_credentials_by_name() -> None:
    talk = Socks5(SOCKS_PROXY, "api.corp.example", 443, None)
    assert talk.start() == b"\x05\x01\x00"
    request = talk.receive(b"\x05\x00")
    assert request == b"\x05\x01\x00\x03\x10api.corp.example\x01\xbb"
    assert talk.receive(b"\x05\x00\x00\x01" + bytes(4) + b"\x00\x00" + b"early") == b""
    assert talk.done and talk.leftover == b"early"


def test_socks5_with_credentials_in_one_read_each() -> None:
    talk = Socks5(SOCKS_PROXY, "10.1.2.3", 5432, ("alice", "s3cret"))
    assert talk.start() == b"\x05\x02\x00\x02"
    assert talk.receive(b"\x05\x02") == b"\x01\x05alice\x06s3cret"
    assert talk.receive(b"\x01\x00") == b"\x05\x01\x00\x01\x0a\x01\x02\x03\x15\x38"
    # a domain-name bound address, delivered a byte at a time
    reply = b"\x05\x00\x00\x03\x05proxy\x04\x38"
    for i in range(len(reply)):
        talk.receive(reply[i : i + 1])
    assert talk.done and talk.leftover == b""


def test_socks5_ipv6_target() -> None:
    talk = Socks5(SOCKS_PROXY, "::1", 8443, None)
    talk.start()
    assert talk.receive(b"\x05\x00") == b"\x05\x01\x00\x04" + bytes(15) + b"\x01" + (8443).to_bytes(2, "big")
    talk.receive(b"\x05\x00\x00\x04" + bytes(16) + b"\x00\x00")
    assert talk.done


@pytest.mark.parametrize("code", range(1, 9))
def test_socks5_reply_codes_become_words(code: int) -> None:
    talk = Socks5(SOCKS_PROXY, "api.corp.example", 443, None)
    talk.start()
    talk.receive(b"\x05\x00")
    with pytest.raises(UpstreamProxyError) as caught:
        talk.receive(bytes([5, code, 0, 1]) + bytes(6))
    error = caught.value
    assert error.refused and error.reply_code == code and error.reason
    assert f"SOCKS5 reply {code:#04x}" in error.message
    assert cause_of(fault_from("connect", error)) == Cause.UPSTREAM_PROXY_REFUSED


def test_socks5_wanting_credentials_we_do_not_have_names_the_variable() -> None:
    talk = Socks5(SOCKS_PROXY, "a.example", 443, None)
    talk.start()
    with pytest.raises(UpstreamProxyError) as caught:
        talk.receive(b"\x05\xff")
    assert caught.value.refused and caught.value.needs_credentials
    assert "CORP_PROXY_AUTH" in caught.value.message and "is not set" in caught.value.message


def test_socks5_refusing_our_credentials() -> None:
    talk = Socks5(SOCKS_PROXY, "a.example", 443, ("alice", "wrong"))
    talk.start()
    talk.receive(b"\x05\x02")
    with pytest.raises(UpstreamProxyError) as caught:
        talk.receive(b"\x01\x01")
    assert caught.value.needs_credentials and caught.value.credentials
    assert "did not accept the credentials" in caught.value.message


def test_something_that_is_not_socks5_is_unreachable() -> None:
    talk = Socks5(SOCKS_PROXY, "a.example", 443, None)
    talk.start()
    with pytest.raises(UpstreamProxyError) as caught:
        talk.receive(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    assert not caught.value.refused and "not a SOCKS5 proxy" in caught.value.message


def test_dialogue_picks_by_kind() -> None:
    assert isinstance(dialogue(HTTP_PROXY, "a", 1, None), HttpConnect)
    assert isinstance(dialogue(SOCKS_PROXY, "a", 1, None), Socks5)


# --- the tunnel's sentences


def test_the_tunnel_says_the_proxy_and_what_to_do() -> None:
    talk = HttpConnect(HTTP_PROXY, "api.corp.example", 443, None)
    with pytest.raises(UpstreamProxyError) as caught:
        talk.receive(b"HTTP/1.1 403 Forbidden\r\n\r\n")
    failure = classify(caught.value, target="api.corp.example:443", server_name="api.corp.example", trust="x")
    assert failure.reason == Cause.UPSTREAM_PROXY_REFUSED
    assert failure.message.startswith("cannot reach api.corp.example:443: the upstream proxy http://proxy.corp")
    assert "HTTP 403 Forbidden" in failure.message and "administrators" in failure.message


def test_a_timeout_through_a_proxy_names_it() -> None:
    failure = classify(
        TimeoutError(), target="api.corp.example:443", server_name="x", trust="x", timeout=5, via="http://p:3128"
    )
    assert failure.reason == Cause.TIMEOUT
    assert "through the upstream proxy http://p:3128" in failure.message and "5s" in failure.message
