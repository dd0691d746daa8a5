"""Upstream proxies: a route reaches its target through an HTTP CONNECT or SOCKS5 proxy. Pure.

A route (or a proxy rule) with `upstream_proxy = "http://proxy.corp:3128"` or
`"socks5://proxy.corp:1080"` opens its TCP connection to the proxy, asks it for a tunnel to the
target, and then speaks to the target through that tunnel exactly as it would directly: the
route's protocol prelude, TLS with the target's SNI and name checks. This module holds the parts
that are plain data and bytes, with no sockets: reading the proxy URL, and the two dialogues
(`HttpConnect`, RFC 7231 section 4.3.6; `Socks5`, RFC 1928 with RFC 1929 username/password).
`sidecar.upstreamdial` drives them over a socket.

Choices, as the README says them:
- `http://HOST[:PORT]`, port 3128 when left out (Squid's, the usual corporate one); the route's
  TLS goes inside the CONNECT tunnel, so plain http:// to the proxy is what is wanted.
- `socks5://HOST[:PORT]` and `socks5h://HOST[:PORT]`, port 1080 when left out. Both send the
  target's *name* to the proxy, which resolves it (an IP target is sent as an address): the
  target's name often resolves only inside the network the proxy is in. `socks5h` is accepted
  because curl spells it so.
- Credentials never sit in the config: a URL with `user:password@` is refused, and the route's
  `upstream_proxy_auth_env` names an environment variable that holds "user:password" (HTTP:
  `Proxy-Authorization: Basic`; SOCKS5: RFC 1929).

A dialogue: `start()` gives the first bytes to send; `receive(data)` takes what the proxy sent
and gives what to send next (often b""); once `done`, `leftover` holds the bytes read past the
proxy's answer (the target's own first words, which must not be lost); `receive_eof()` says the
proxy closed. Every refusal or misunderstanding raises `UpstreamProxyError`, which carries the
proxy's answer as data (`status`, `reply_code`, `reason`) and a sentence with what to do.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

from sidecar.hostport import host_port

HTTP = "http"
SOCKS5 = "socks5"
DEFAULT_PORTS = {"http": 3128, "socks5": 1080, "socks5h": 1080}
SCHEMES = tuple(DEFAULT_PORTS)
MAX_ANSWER_HEAD = 16 * 1024  # an HTTP proxy's answer up to its blank line, at most
_REASON_LIMIT = 120
_OPENING_KEPT = _REASON_LIMIT + 1  # enough to quote, and to show it went on

# RFC 1928 section 6: what a SOCKS5 server's REP field means.
SOCKS_REPLIES = {
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by the proxy's rules",
    0x03: "network unreachable from the proxy",
    0x04: "host unreachable from the proxy",
    0x05: "the target refused the proxy's connection",
    0x06: "TTL expired",
    0x07: "command not supported by the proxy",
    0x08: "address type not supported by the proxy",
}
_NO_AUTH, _USER_PASSWORD, _NO_ACCEPTABLE = 0x00, 0x02, 0xFF


class ProxyURLError(ValueError):
    """`upstream_proxy` cannot be used; `hint` says what to write instead."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


@dataclass(frozen=True)
class UpstreamProxy:
    """A parsed `upstream_proxy`: "http" or "socks5", where, and the credentials' variable."""

    kind: str
    host: str
    port: int
    auth_env: str | None = None

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)

    @property
    def url(self) -> str:
        return f"{self.kind}://{self.address}"


def parse_proxy_url(text: str, auth_env: str | None = None) -> UpstreamProxy:
    """`http://host[:port]`, `socks5://host[:port]` or `socks5h://host[:port]`; raises ProxyURLError."""
    example = 'for example "http://proxy.corp.example:3128" or "socks5://127.0.0.1:1080"'
    if not isinstance(text, str) or "://" not in text:
        raise ProxyURLError("not a proxy URL", example)
    if any(c.isspace() or ord(c) < 0x20 for c in text):
        raise ProxyURLError("a proxy URL has no spaces or control characters", example)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ProxyURLError(f"not a proxy URL ({exc})", example) from None
    scheme = parts.scheme.lower()
    if scheme == "https":
        raise ProxyURLError(
            "TLS to the proxy itself is not supported", 'use "http://" (the route\'s own TLS goes inside the tunnel)'
        )
    if scheme not in DEFAULT_PORTS:
        raise ProxyURLError(f"unsupported proxy scheme {scheme!r}", f"use http://, socks5:// or socks5h://; {example}")
    if "@" in parts.netloc:
        raise ProxyURLError(
            "credentials do not belong in the config file",
            'remove "user:password@" and put "user:password" in an environment variable named by '
            "upstream_proxy_auth_env",
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ProxyURLError("a proxy URL is only scheme://host:port", example)
    host = parts.hostname or ""
    if not host:
        raise ProxyURLError("the proxy URL names no host", example)
    if port == 0:
        raise ProxyURLError("port 0 is no proxy port", example)
    return UpstreamProxy(SOCKS5 if scheme.startswith("socks5") else HTTP, host, port or DEFAULT_PORTS[scheme], auth_env)


def parse_credentials(value: str) -> tuple[str, str]:
    """The environment variable's "user:password" (no colon: a user with an empty password)."""
    user, _, password = value.partition(":")
    return user, password


class UpstreamProxyError(Exception):
    """The upstream proxy did not give us a tunnel to the target.

    `refused`: the proxy answered no (an HTTP status, a SOCKS reply code, no credentials it
    accepts); otherwise it could not be reached, closed, or spoke something we do not understand.
    `status` (HTTP) or `reply_code` (SOCKS5) and `reason` (the proxy's own words, or ours) are the
    answer; `credentials` says whether credentials were sent. `fix` is what to do.
    """

    def __init__(
        self,
        proxy: UpstreamProxy,
        message: str,
        fix: str,
        *,
        refused: bool,
        status: int | None = None,
        reply_code: int | None = None,
        reason: str = "",
        credentials: bool = False,
    ) -> None:
        super().__init__(message)
        self.proxy = proxy
        self.message = message
        self.fix = fix
        self.refused = refused
        self.status = status
        self.reply_code = reply_code
        self.reason = reason
        self.credentials = credentials

    @property
    def needs_credentials(self) -> bool:
        return self.status == 407 or self.reply_code == _NO_ACCEPTABLE or self.reason == "credentials refused"


def unreachable(proxy: UpstreamProxy, what: str) -> UpstreamProxyError:
    """We could not talk to the proxy: `what` says how (refused, no such name, closed, nonsense)."""
    return UpstreamProxyError(
        proxy,
        f"the upstream proxy {proxy.url} {what}",
        f"check upstream_proxy ({proxy.url}): is the proxy running, and reachable from this machine?",
        refused=False,
        reason=what,
    )


def _credentials_refusal(proxy: UpstreamProxy, answer: str, sent: bool, **data: int) -> UpstreamProxyError:
    env = proxy.auth_env
    if env is None:
        fix = (
            'put "user:password" in an environment variable and name it in upstream_proxy_auth_env '
            "(the daemon must be started with it set)"
        )
        said = "wants credentials and none are configured"
    elif not sent:
        fix = f'set the environment variable {env} to "user:password" where the daemon starts, then restart it'
        said = f"wants credentials, and the environment variable {env} (upstream_proxy_auth_env) is not set"
    else:
        fix = f"check the user and password in the environment variable {env}"
        said = f"did not accept the credentials in the environment variable {env} (upstream_proxy_auth_env)"
    return UpstreamProxyError(
        proxy,
        f"the upstream proxy {proxy.url} {said} ({answer})",
        fix,
        refused=True,
        reason="credentials refused" if sent else answer,
        credentials=sent,
        **data,
    )


class HttpConnect:
    """`CONNECT host:port HTTP/1.1` and the proxy's answer, framed by h11: any 2xx opens the tunnel."""

    def __init__(
        self, proxy: UpstreamProxy, target_host: str, target_port: int, credentials: tuple[str, str] | None
    ) -> None:
        self.proxy = proxy
        self.target = host_port(target_host, target_port)
        self.credentials = credentials
        self.done = False
        self.leftover = b""
        self.status: int | None = None
        self.reason = ""
        self._opening = b""  # the answer's first bytes, quoted when it is not HTTP
        self._http = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_ANSWER_HEAD)
        headers = [("Host", self.target)]
        if credentials is not None:
            token = base64.b64encode(":".join(credentials).encode()).decode("ascii")
            headers.append(("Proxy-Authorization", f"Basic {token}"))
        self._request = self._http.send(h11.Request(method="CONNECT", target=self.target, headers=headers)) or b""
        self._http.send(h11.EndOfMessage())  # no body: the tunnel follows the answer

    def start(self) -> bytes:
        return self._request

    def receive(self, data: bytes) -> bytes:
        if self.done:  # the target's bytes: past the answer
            self.leftover += data
            return b""
        self._opening += data[: _OPENING_KEPT - len(self._opening)]
        self._http.receive_data(data)
        while True:
            try:
                event = self._http.next_event()
            except h11.RemoteProtocolError as exc:
                raise self._not_http(exc) from exc
            if event is h11.NEED_DATA:
                return b""
            if isinstance(event, h11.Response):
                break
            # an InformationalResponse (1xx): the answer itself follows
        self.status = event.status_code
        self.reason = _printable(event.reason)
        if 200 <= self.status < 300:
            self.done = True
            self.leftover = self._http.trailing_data[0]
            return b""
        answer = f"HTTP {self.status}{' ' + self.reason if self.reason else ''}"
        if self.status == 407:
            raise _credentials_refusal(self.proxy, answer, self.credentials is not None, status=407)
        raise UpstreamProxyError(
            self.proxy,
            f"the upstream proxy {self.proxy.url} refused CONNECT to {self.target} ({answer})",
            _refusal_fix(self.proxy, self.target, self.status),
            refused=True,
            status=self.status,
            reason=self.reason,
            credentials=self.credentials is not None,
        )

    def receive_eof(self) -> None:
        raise unreachable(self.proxy, f"closed the connection before answering CONNECT to {self.target}")

    def _not_http(self, exc: h11.RemoteProtocolError) -> UpstreamProxyError:
        if exc.error_status_hint == 431:  # h11's max_incomplete_event_size: no blank line in sight
            return unreachable(self.proxy, f"answered CONNECT with more than {MAX_ANSWER_HEAD} bytes of headers")
        line = self._opening.split(b"\n", 1)[0].rstrip(b"\r")
        return unreachable(self.proxy, f'did not answer CONNECT in HTTP: "{_printable(line)}"')


def _refusal_fix(proxy: UpstreamProxy, target: str, status: int) -> str:
    if status in (502, 503, 504):
        return f"the proxy could not reach {target}: check the target, or ask the proxy's administrators"
    if status == 403:
        return f"ask the proxy's administrators to allow {target}, or reach it without upstream_proxy"
    return f"ask the proxy's administrators why {proxy.url} refuses {target}"


class Socks5:
    """RFC 1928: greeting, optional RFC 1929 username/password, CONNECT, reply."""

    def __init__(
        self, proxy: UpstreamProxy, target_host: str, target_port: int, credentials: tuple[str, str] | None
    ) -> None:
        self.proxy = proxy
        self.target = host_port(target_host, target_port)
        self.credentials = credentials
        self.done = False
        self.leftover = b""
        self.reply_code: int | None = None
        self._request = _socks_connect(target_host, target_port)
        self._state = "greeting"  # → "auth" → "connect" → done
        self._buffer = bytearray()
        if credentials is not None and (len(credentials[0].encode()) > 255 or len(credentials[1].encode()) > 255):
            raise _credentials_refusal(proxy, "SOCKS5 user and password are 255 bytes at most", True)

    def start(self) -> bytes:
        methods = bytes([_NO_AUTH, _USER_PASSWORD]) if self.credentials is not None else bytes([_NO_AUTH])
        return bytes([5, len(methods)]) + methods

    def receive(self, data: bytes) -> bytes:
        if self.done:
            self.leftover += data
            return b""
        self._buffer += data
        out = bytearray()
        while not self.done:
            step = self._step()
            if step is None:
                break
            out += step
        return bytes(out)

    def receive_eof(self) -> None:
        raise unreachable(self.proxy, f"closed the connection during the SOCKS5 dialogue (at its {self._state})")

    def _take(self, size: int) -> bytes | None:
        if len(self._buffer) < size:
            return None
        taken = bytes(self._buffer[:size])
        del self._buffer[:size]
        return taken

    def _step(self) -> bytes | None:
        """One step when its bytes are all there: what to send next, or None to wait for more."""
        if self._state == "greeting":
            answer = self._take(2)
            if answer is None:
                return None
            if answer[0] != 5:
                raise unreachable(self.proxy, f"is not a SOCKS5 proxy (it answered {_printable(answer)!r})")
            if answer[1] == _USER_PASSWORD and self.credentials is not None:
                self._state = "auth"
                user, password = (part.encode() for part in self.credentials)
                return bytes([1, len(user)]) + user + bytes([len(password)]) + password
            if answer[1] == _NO_AUTH:
                self._state = "connect"
                return self._request
            if answer[1] in (_NO_ACCEPTABLE, _USER_PASSWORD):
                raise _credentials_refusal(
                    self.proxy, "no acceptable SOCKS5 authentication method", self.credentials is not None,
                    reply_code=_NO_ACCEPTABLE,
                )  # fmt: skip
            raise unreachable(self.proxy, f"chose SOCKS5 authentication method {answer[1]:#04x}, not one we offered")
        if self._state == "auth":
            answer = self._take(2)
            if answer is None:
                return None
            if answer[1] != 0:
                raise _credentials_refusal(self.proxy, "SOCKS5 username/password refused", True)
            self._state = "connect"
            return self._request
        return self._reply()

    def _reply(self) -> bytes | None:
        if len(self._buffer) < 5:
            return None
        version, code, _, kind, first = self._buffer[:5]
        if version != 5:
            raise unreachable(self.proxy, "answered CONNECT with something that is not SOCKS5")
        if code != 0:
            self.reply_code = code
            words = SOCKS_REPLIES.get(code, "unknown SOCKS5 reply")
            raise UpstreamProxyError(
                self.proxy,
                f"the upstream proxy {self.proxy.url} refused CONNECT to {self.target} "
                f"(SOCKS5 reply {code:#04x}: {words})",
                _socks_fix(self.proxy, self.target, code),
                refused=True,
                reply_code=code,
                reason=words,
                credentials=self.credentials is not None,
            )
        sizes = {1: 4, 4: 16, 3: 1 + first}
        if kind not in sizes:
            raise unreachable(self.proxy, f"answered CONNECT with an unknown address type {kind:#04x}")
        if self._take(4 + sizes[kind] + 2) is None:
            return None
        self.done = True
        self.leftover = bytes(self._buffer)
        self._buffer.clear()
        return b""


def _socks_fix(proxy: UpstreamProxy, target: str, code: int) -> str:
    if code == 0x02:
        return f"ask the proxy's administrators to allow {target}, or reach it without upstream_proxy"
    if code in (0x03, 0x04, 0x05, 0x06):
        return f"the proxy could not reach {target}: check the target's host and port"
    return f"ask the proxy's administrators why {proxy.url} refuses {target}"


def _socks_connect(host: str, port: int) -> bytes:
    """RFC 1928 CONNECT: an IPv4 or IPv6 address as itself, any other name as a domain name."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        name = host.rstrip(".").encode("idna")
        if not 0 < len(name) <= 255:
            raise ValueError(f"a SOCKS5 proxy takes host names of 1 to 255 bytes, not {host!r}") from None
        address = bytes([3, len(name)]) + name
    else:
        address = (bytes([1]) if ip.version == 4 else bytes([4])) + ip.packed
    return bytes([5, 1, 0]) + address + port.to_bytes(2, "big")


def _printable(data: bytes) -> str:
    text = "".join(chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}" for b in data[:_REASON_LIMIT])
    return text + ("…" if len(data) > _REASON_LIMIT else "")


def dialogue(
    proxy: UpstreamProxy, target_host: str, target_port: int, credentials: tuple[str, str] | None
) -> HttpConnect | Socks5:
    """The dialogue that asks `proxy` for a tunnel to the target."""
    kind = HttpConnect if proxy.kind == HTTP else Socks5
    return kind(proxy, target_host, target_port, credentials)
