"""`protocol = "http"`: HTTP/1.1 on both sides, each request's Host set to the target's name. Pure.

A server behind virtual hosting (nginx `server_name`, an ingress, an API gateway) picks the
site by `Host`; through a plain tunnel it would see `Host: 127.0.0.1:18080` and answer its
default site (nginx answers 421 when SNI and Host disagree). This stage reads HTTP/1.1 from
the local client with one `h11.Connection` (we are its server) and writes it to the target
with another (we are its client), so that:

- every request's `Host` becomes the target's name: `server_name`, with `:port` unless the
  port is 443, or the route's `host_header`; an absolute-form target (`GET http://…`) becomes
  origin-form, so the server cannot take its host from there either;
- `Location` and `Content-Location` in responses that point at the target's origin
  (`https://server_name[:port]/…`, also `http://` and the target's host) come back as the
  local listener's URL, so redirects stay on the tunnel;
- many requests go over one kept-alive connection; bodies stream both ways, chunked or with
  Content-Length, one piece at a time as they arrive (never a whole body in memory);
- after a `101 Switching Protocols` (WebSocket) or a `2xx` to CONNECT the stage steps aside
  and bytes pass untouched;
- the sidecar's own answers are real HTTP: `400` for a request that is not HTTP/1.x (with h11's
  hint: 431 for a head too large), `502` with the reason and the fix when the target is down,
  refuses us or does not speak HTTP, `504` when connecting timed out;
- an answer from the target that says it does not take our client certificate (nginx's 400
  "The SSL certificate error" or "No required SSL certificate was sent", a 495 or 496; see
  `causes.http_certificate_refusal`) reaches the client as it is and is counted for the route
  as `server_rejected_certificate_http`, once per connection. A 400 or 403 is judged by the
  first 4 KiB of its body, so one to a HEAD request (no body) is not counted.

One remote connection per local connection: when the target closes, the local connection
closes after the answer in flight (an HTTP client then opens a new one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

from sidecar.causes import (
    CERTIFICATE_STATUSES,
    MAYBE_CERTIFICATE_STATUSES,
    Cause,
    Fault,
    cause_of,
    http_certificate_refusal,
)
from sidecar.config import ListenAddress, RouteSpec
from sidecar.protocols.http_host import http_host
from sidecar.stages import Close, Command, Count, EndLocal, EndRemote, Handoff, Refuse, SendLocal, SendRemote, StartTLS

# The largest request or response head accepted (h11's default is 16 KiB; cookies and bearer
# tokens can be larger, nginx takes up to 4 x 8 KiB lines).
MAX_HEAD = 64 * 1024
# A request line starts with a method (a token) or, tolerated, an empty line.
_REQUEST_START = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\r\n")
_TLS_HANDSHAKE = 0x16
_REASONS = {400: b"Bad Request", 431: b"Request Header Fields Too Large", 502: b"Bad Gateway", 504: b"Gateway Timeout"}
# h11 states in which no response head has gone to the local client yet
_NOT_ANSWERED = (h11.IDLE, h11.SEND_RESPONSE)
_OVER = (h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)
_JUDGED_BODY = 4096  # of a 400 or 403 answer: where a server says it is about our certificate


def local_base(local: ListenAddress) -> str:
    """The local listener's origin, `http://127.0.0.1:PORT`; "" for a Unix socket (whose
    clients follow a path-absolute `Location` on the same socket)."""
    if local.kind == "unix":
        return ""
    host = f"[{local.host}]" if ":" in local.host else local.host
    return f"http://{host}:{local.port}"


class OriginRewriter:
    """Turns a URL on the target's origin into the same URL on the local listener.

    The target's origin: scheme http or https; host the route's `server_name`, its target host
    or the host of `host_header`; port the target's port, or no port at all when the target's
    port is 443 or 80 (a server behind a TLS terminator often writes `http://name/…`). Anything
    else (relative references, other hosts, other ports) passes unchanged.
    """

    def __init__(self, route: RouteSpec, local: ListenAddress, proxied: Proxied | None = None) -> None:
        port = proxied.port if proxied is not None else route.target_port
        origins: set[tuple[str, int | None]] = {(route.server_name.lower(), port)}
        if proxied is None:
            origins.add((route.target_host.lower(), port))
        if route.host_header:
            try:
                parts = urlsplit("//" + route.host_header)
                if parts.hostname:
                    origins.add((parts.hostname, parts.port or port))
            except ValueError:
                pass  # not host[:port]: it can name no origin
        if port in (80, 443):
            origins |= {(host, None) for host, _ in origins}
        self.origins = frozenset(origins)
        self.base = proxied.base if proxied is not None else local_base(local)

    def __call__(self, value: bytes) -> bytes:
        head = value[:8].lower()
        if not (head.startswith((b"https://", b"http://")) or value.startswith(b"//")):
            return value  # relative: it stays on the tunnel by itself
        text = value.decode("latin-1")
        try:
            parts = urlsplit(text)
            origin = (parts.hostname or "", parts.port)
        except ValueError:  # a port that is no number
            return value
        if parts.scheme.lower() not in ("", "http", "https") or origin not in self.origins:
            return value
        rest = text[text.index("//") + 2 + len(parts.netloc) :]
        if not rest.startswith("/"):
            rest = "/" + rest  # "https://name?x" is "/?x"
        return (self.base + rest).encode("latin-1")


def error_response(status: int, text: str, *, cause: str | None = None, head_only: bool = False) -> bytes:
    """One of the sidecar's own answers: text/plain, and the connection closes after it."""
    body = text.encode()
    lines = [
        b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Error")),
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
    ]
    if cause:
        lines.append(b"Mtls-Sidecar-Cause: " + cause.encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head_only else body)


@dataclass(frozen=True)
class Proxied:
    """The stage serves an HTTP proxy's client (`sidecar.proxy`) for one destination.

    `port`: where TLS goes; `base`: the origin the client asked for (`http://name[:port]`), where
    the target's redirects to itself are pointed, so that they come through the proxy again;
    `same_destination(target)`: whether an absolute-URI request target is for this destination."""

    port: int
    base: str
    same_destination: Callable[[bytes], bool]


# Headers meant for a proxy, never passed on to the target.
_PROXY_HEADERS = frozenset({b"proxy-connection", b"proxy-authorization"})


class HTTPStage:
    """One local connection: h11 towards the local client (we serve) and towards the target (we ask).

    Until TLS is up, what the client sends is parsed and kept (its head, and what of a body
    arrives meanwhile: a stage cannot pause the client's reading); after, each piece is passed
    on in the call that brought it.
    """

    def __init__(self, route: RouteSpec, local: ListenAddress, proxied: Proxied | None = None) -> None:
        self.route = route
        self.transparent = False
        self._proxied = proxied
        self._local = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)  # the local client
        self._target = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)  # the target
        self._host = http_host(route).encode()  # the same as `check` asks with
        self._rewrite = OriginRewriter(route, local, proxied)
        self._first = True  # no byte from the local client yet
        self._requests = 0
        self._method = b""  # of the request being answered
        self._established = False
        self._failure: tuple[Cause, str] | None = None
        self._over = False  # the stage said Close or Refuse: nothing more
        # An answer of the target's that may say it does not take our certificate: its status,
        # reason and the start of its body, until judged. Counted once per connection.
        self._judging: tuple[int, bytes] | None = None
        self._judged_body = bytearray()
        self._counted = False
        self._counts: list[Command] = []
        # What one call produces, turned into commands at its end: bytes for the local client,
        # bytes for the target (kept in _held until TLS is up), and the last word.
        self._to_local: list[bytes] = []
        self._to_target: list[bytes] = []
        self._held: list[bytes] = []
        self._end: list[Command] = []

    # --- the remote

    def connected(self) -> list[Command]:
        return [StartTLS()]

    def tls_established(self) -> list[Command]:
        self._established = True
        if not self._held or self._over:
            return []
        held, self._held = self._held, []
        return [SendRemote(b"".join(held))]

    def remote_failed(self, cause: Cause, message: str) -> list[Command]:
        if self._over:
            return []
        self._failure = (cause, message)
        if self._requests == 0:
            return []  # answered when the request head arrives (from_local)
        self._answer_failure()
        return self._commands()

    def from_remote(self, data: bytes) -> list[Command]:
        if self._over:
            return []
        self._target.receive_data(data)
        self._pump_target()
        return self._commands()

    def remote_eof(self) -> list[Command]:
        if self._over:
            return []
        if self._target.their_state is h11.SEND_RESPONSE and not self._target.trailing_data[0]:
            self._unanswered()
            return self._commands()
        self._target.receive_data(b"")
        self._pump_target()
        return self._commands()

    # --- the local client

    def from_local(self, data: bytes) -> list[Command]:
        if self._over:
            return []
        if self._first and data:
            self._first = False
            if data[0] not in _REQUEST_START:
                self._bad_request(_not_http(data, self._rewrite.base))
                return self._commands()
        self._local.receive_data(data)
        self._pump_local()
        return self._commands()

    def local_eof(self) -> list[Command]:
        if self._over:
            return []
        self._local.receive_data(b"")
        self._pump_local()
        return self._commands()

    # --- local client → target

    def _pump_local(self) -> None:
        local = self._local
        while not self._over:
            try:
                event = local.next_event()
            except h11.RemoteProtocolError as exc:
                self._bad_request(f"the local client's request is not valid HTTP/1.1 ({exc})", exc.error_status_hint)
                return
            if isinstance(event, h11.Data):
                self._send_target(event)
            elif isinstance(event, h11.Request):
                self._request(event)
            elif isinstance(event, h11.EndOfMessage):
                self._send_target(event)
                self._after_message()
            elif isinstance(event, h11.ConnectionClosed):
                if local.our_state not in (h11.SEND_RESPONSE, h11.SEND_BODY):
                    self._close()  # between requests: nothing is waiting for an answer
                return
            else:  # NEED_DATA, or PAUSED until the answer in flight is done
                return

    def _request(self, event: h11.Request) -> None:
        if self._proxied is not None and self._requests and not self._same_destination(event):
            self._hand_off(event)
            return
        self._requests += 1
        self._method = event.method
        if self._failure is not None:
            self._answer_failure()
            return
        headers = []
        host_seen = False
        for name, value in event.headers.raw_items():
            if self._proxied is not None and name.lower() in _PROXY_HEADERS:
                continue
            if name.lower() == b"host":
                if host_seen:
                    continue
                host_seen, value = True, self._host
            headers.append((name, value))
        if not host_seen:  # HTTP/1.0 may leave it out
            headers.insert(0, (b"Host", self._host))
        target = event.target
        if target[:1] != b"/" and target != b"*" and event.method != b"CONNECT":
            target = _origin_form(target)
        self._send_target(h11.Request(method=event.method, target=target, headers=headers))

    def _same_destination(self, event: h11.Request) -> bool:
        assert self._proxied is not None
        target = event.target
        return event.method != b"CONNECT" and target[:1] != b"/" and self._proxied.same_destination(target)

    def _hand_off(self, event: h11.Request) -> None:
        """A proxy client's next request is for another destination (or for the proxy itself):
        it goes back to the proxy as it came, and this connection to the target ends."""
        version = event.http_version
        head = [b"%s %s HTTP/%s" % (event.method, event.target, version)]
        head += [name + b": " + value for name, value in event.headers.raw_items()]
        rest, _ = self._local.trailing_data
        self._over = True
        self._end.append(Handoff(b"\r\n".join(head) + b"\r\n\r\n" + rest))

    def _send_target(self, event: h11.Request | h11.Data | h11.EndOfMessage) -> None:
        pieces = self._target.send_with_data_passthrough(event)
        assert pieces is not None
        self._to_target.append(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    # --- target → local client

    def _pump_target(self) -> None:
        target, local = self._target, self._local
        while not self._over:
            try:
                event = target.next_event()
            except h11.RemoteProtocolError as exc:
                self._target_broke(exc)
                return
            if isinstance(event, h11.Data):
                if self._judging is not None:
                    self._judge_body(bytes(event.data))
                pieces = local.send_with_data_passthrough(event)
                assert pieces is not None
                self._to_local.append(pieces[0] if len(pieces) == 1 else b"".join(pieces))
            elif isinstance(event, h11.Response):
                self._judge_answer(event)
                self._to_local.append(local.send(self._rewritten(event)))
                if local.our_state is h11.SWITCHED_PROTOCOL:  # a 2xx to CONNECT
                    self._step_aside()
                    return
            elif isinstance(event, h11.InformationalResponse):
                self._informational(event)
                if local.our_state is h11.SWITCHED_PROTOCOL:  # 101
                    self._step_aside()
                    return
            elif isinstance(event, h11.EndOfMessage):
                if self._judging is not None:
                    self._judge_body(b"", last=True)
                trailers = event.headers.raw_items() if local.their_http_version == b"1.1" else []
                self._to_local.append(local.send(h11.EndOfMessage(headers=trailers)))
                self._after_message()
            elif isinstance(event, h11.ConnectionClosed):
                self._close()  # idle, or after the whole answer: the local client reconnects
                return
            else:  # NEED_DATA, or PAUSED until the next request
                return

    @property
    def judging_answer(self) -> bool:
        """An answer has begun, but not enough of its body is here yet to tell whether it refuses our
        certificate: the tunnel waits before it calls the connection a success."""
        return self._judging is not None

    def _judge_answer(self, event: h11.Response) -> None:
        """Does this answer say the target does not take our certificate? At once for 495/496
        (and a reason phrase that says so); for a 400 or 403, once the start of its body is here."""
        self._judging = None
        if self._counted or event.status_code not in CERTIFICATE_STATUSES | MAYBE_CERTIFICATE_STATUSES:
            return
        words = http_certificate_refusal(event.status_code, event.reason, b"")
        if words is not None:
            self._count_refusal(event.status_code, words)
        elif self._method != b"HEAD":
            self._judging = (event.status_code, event.reason)
            self._judged_body.clear()

    def _judge_body(self, data: bytes, *, last: bool = False) -> None:
        assert self._judging is not None
        status, reason = self._judging
        self._judged_body += data[: _JUDGED_BODY - len(self._judged_body)]
        words = http_certificate_refusal(status, reason, bytes(self._judged_body))
        if words is not None:
            self._count_refusal(status, words)
        if words is not None or last or len(self._judged_body) >= _JUDGED_BODY:
            self._judging = None
            self._judged_body.clear()

    def _count_refusal(self, status: int, words: str) -> None:
        self._counted = True
        name = _target_name(self.route)
        message = f'{name} answered HTTP {status} "{words}": it does not take our client certificate'
        self._counts.append(Count(Fault("established", "http_refused", words), message))

    def _rewritten(self, event: h11.Response) -> h11.Response:
        headers = event.headers
        if event.http_version == b"1.1" and not any(name in (b"location", b"content-location") for name, _ in headers):
            return event  # as it is (h11 writes only HTTP/1.1)
        out = []
        for name, value in headers.raw_items():
            if name.lower() in (b"location", b"content-location"):
                value = self._rewrite(value)
            out.append((name, value))
        return h11.Response(status_code=event.status_code, headers=out, reason=event.reason)

    def _informational(self, event: h11.InformationalResponse) -> None:
        if event.status_code != 101 and self._local.their_http_version != b"1.1":
            return  # no 1xx to an HTTP/1.0 client
        rewritten = h11.InformationalResponse(
            status_code=event.status_code, headers=event.headers.raw_items(), reason=event.reason
        )
        self._to_local.append(self._local.send(rewritten))

    def _step_aside(self) -> None:
        """The protocol switched (101 Upgrade, CONNECT): from here on bytes pass untouched."""
        self.transparent = True
        to_target, local_closed = self._local.trailing_data
        to_local, target_closed = self._target.trailing_data
        if to_local:
            self._to_local.append(to_local)
        if to_target:
            self._to_target.append(to_target)
        if target_closed:
            self._end.append(EndLocal())
        if local_closed:
            self._end.append(EndRemote())

    # --- the cycle

    def _after_message(self) -> None:
        """One side finished a message: start the next request when both are done, or close."""
        local, target = self._local, self._target
        if local.our_state in _OVER:
            self._close()  # the answer is out, and the connection ends with it
        elif local.our_state is h11.DONE and (target.our_state in _OVER or target.their_state in _OVER):
            self._close()  # the target will take no further request
        elif (local.states, target.states) == (_BOTH_DONE, _BOTH_DONE):
            local.start_next_cycle()
            target.start_next_cycle()
            self._pump_local()  # a request that came early (pipelined) waits in the buffer
        elif local.our_state is h11.DONE and local.their_state is h11.CLOSED:
            self._close()

    # --- the sidecar's own answers

    def _awaiting_answer(self) -> bool:
        """A request head has arrived and no answer has started: the sidecar may still answer."""
        return self._local.their_state is not h11.IDLE and self._local.our_state in _NOT_ANSWERED

    def _answer_failure(self) -> None:
        assert self._failure is not None
        cause, message = self._failure
        if not self._awaiting_answer():
            self._close()  # an answer is under way: all the client can be told is that it ends
            return
        status = 504 if cause == Cause.TIMEOUT else 502
        text = f"mtls-sidecar: {message}\nfix: {cause.fix}\n"
        self._to_local.append(error_response(status, text, cause=str(cause), head_only=self._method == b"HEAD"))
        self._close()

    def _bad_request(self, reason: str, status: int = 400) -> None:
        if self._local.our_state in _NOT_ANSWERED:
            text = f"mtls-sidecar: {reason}\n"
            cause = str(Cause.PROTOCOL_MISMATCH)
            self._to_local.append(error_response(status, text, cause=cause, head_only=self._method == b"HEAD"))
        self._refuse(Refuse(Fault("local", "protocol", reason), reason))

    def _unanswered(self) -> None:
        """The target closed its connection with our request unanswered."""
        if self._requests > 1:
            # Most likely it closed an idle kept-alive connection as the request went out: end
            # ours the same way, without an answer, so that the client repeats the request on a
            # new connection (as HTTP clients do when a reused connection closes).
            self._close()
            return
        fault = Fault("after_handshake", "closed", "closed without answering")
        name = _target_name(self.route)
        self._target_failed(
            fault,
            f"{name} closed the connection without answering the request "
            "(did it refuse our client certificate? its log says why)",
        )

    def _target_broke(self, exc: h11.RemoteProtocolError) -> None:
        name = _target_name(self.route)
        if not self._target.trailing_data[1]:
            self._target_failed(
                Fault("established", "protocol", str(exc)), f"{name} does not answer in HTTP/1.1 ({exc})"
            )
        elif self._awaiting_answer():  # it closed halfway through the head of its answer
            self._target_failed(
                Fault("after_handshake", "closed", str(exc)), f"{name} closed the connection mid-answer"
            )
        else:
            # Halfway through a body: the local client sees its answer end short. (A close without
            # TLS close_notify, the usual way a server dies mid-answer, the tunnel counts itself.)
            self._close()

    def _target_failed(self, fault: Fault, message: str) -> None:
        cause = cause_of(fault)
        if self._awaiting_answer():
            text = f"mtls-sidecar: {message}\nfix: {cause.fix}\n"
            self._to_local.append(error_response(502, text, cause=str(cause), head_only=self._method == b"HEAD"))
        self._refuse(Refuse(fault, message))

    def _close(self) -> None:
        self._refuse(Close())

    def _refuse(self, command: Close | Refuse) -> None:
        self._over = True
        self._end.append(command)

    def _commands(self) -> list[Command]:
        out: list[Command] = []
        if self._counts:
            out.extend(self._counts)
            self._counts = []
        if self._to_local:
            data = self._to_local[0] if len(self._to_local) == 1 else b"".join(self._to_local)
            if data:  # an EndOfMessage to an HTTP/1.0 client is no bytes at all
                out.append(SendLocal(data))
            self._to_local = []
        if self._to_target:
            if self._established:
                data = self._to_target[0] if len(self._to_target) == 1 else b"".join(self._to_target)
                out.append(SendRemote(data))
            elif not self._over:
                self._held.extend(self._to_target)
            self._to_target = []
        if self._end:
            out.extend(self._end)
            self._end = []
        return out


_BOTH_DONE = {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE}


def _origin_form(target: bytes) -> bytes:
    """`http://host/path?q` → `/path?q` (the Host header names the site, not the target)."""
    after_scheme = target.find(b"://")
    if after_scheme < 0:
        return target
    slash = target.find(b"/", after_scheme + 3)
    query = target.find(b"?", after_scheme + 3)
    if slash < 0 or (0 <= query < slash):
        return b"/" + target[query:] if query >= 0 else b"/"
    return target[slash:]


def _not_http(data: bytes, base: str) -> str:
    if data[0] == _TLS_HANDSHAKE:
        where = f"{base}/" if base else "a plain http:// URL"
        return f"the local client speaks TLS, but this port speaks plain HTTP: use {where}, not https://"
    return f"the local client's first bytes are not an HTTP request line: {data[:40]!r}"


def _target_name(route: RouteSpec) -> str:
    return route.target
