"""Why a connection to a remote service failed: the one vocabulary. Pure.

Every cause key that the tunnel counts, `status` shows, `check` reports, events carry and the
tray reads is a `Cause` here, with its plain-words meaning and the usual fix. The decision
"which cause is this?" is made once, by `cause_of(fault)`, from a `Fault`: what went wrong
as data (the stage, what kind of error, OpenSSL's reason and verify code, the first bytes the
server sent). The tunnel and `check` build a `Fault` from what they saw and ask the same
question, so the same real failure gets the same key in both. Their sentences differ (`check`
knows more, the tunnel says it shorter), their keys do not.
"""

from __future__ import annotations

import re
import socket
import ssl
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sidecar.upstreamproxy import UpstreamProxyError


class Cause(StrEnum):
    OK = "ok"
    DNS = "dns"
    REFUSED = "refused"
    CONNECT = "connect"
    TIMEOUT = "timeout"
    NOT_TLS = "not_tls"
    SERVER_UNTRUSTED = "server_untrusted"
    NAME_MISMATCH = "name_mismatch"
    SERVER_CERT_EXPIRED = "server_certificate_expired"
    SERVER_CERT_NOT_YET_VALID = "server_certificate_not_yet_valid"
    SERVER_REJECTED_CERT = "server_rejected_certificate"
    # The TLS handshake passed, then an HTTP server answered that it does not take our
    # certificate (nginx's 400 "The SSL certificate error"): no TLS alert ever comes.
    SERVER_REJECTED_CERT_HTTP = "server_rejected_certificate_http"
    NO_USABLE_CERT = "no_usable_certificate"
    ALPN_REFUSED = "alpn_refused"
    TLS_ERROR = "tls_error"
    CONFIG = "config"
    # A route's protocol (sidecar/protocols/): one side does not speak it; a database server
    # that does not offer TLS inside its own handshake.
    PROTOCOL_MISMATCH = "protocol_mismatch"
    SERVER_NO_TLS = "server_offers_no_tls"
    LOCAL_TLS = "local_tls_failed"  # `local_tls`: the local client's own TLS to us failed
    # The route's own checks after the handshake (sidecar/policy.py, sidecar/revocation.py).
    PIN_MISMATCH = "pin_mismatch"
    URI_SAN_NOT_ALLOWED = "uri_san_not_allowed"
    # The allow-list with more than URI SANs: allowed_common_names, _ous, _dns_sans, _ip_sans.
    SERVER_NOT_ALLOWED = "server_not_allowed"
    SERVER_CERT_REVOKED = "server_certificate_revoked"
    REVOCATION_UNKNOWN = "revocation_unknown"
    # Only a running tunnel sees these: a local client from another OS user, refused before any
    # TLS; the remote breaking an established tunnel with a reset, or with a TCP close that
    # came without TLS close_notify.
    OTHER_USER = "other_user"
    # A loopback peer whose owner could not be found (it was gone before we asked, or the
    # process is out of descriptors): refused, but not said to be another user.
    PEER_UNKNOWN = "peer_unknown"
    # The route's, or the whole daemon's, `max_connections` tunnels were already open.
    TOO_MANY_CONNECTIONS = "too_many_connections"
    RESET = "reset"
    TRUNCATED = "truncated"
    # The proxy (sidecar/proxy/): a destination no rule covers; a client that began its own TLS
    # inside CONNECT or SOCKS, where our client certificate cannot be added.
    PROXY_NOT_ALLOWED = "proxy_not_allowed"
    CLIENT_SPEAKS_TLS = "client_speaks_tls"
    # A route's `upstream_proxy` (sidecar/upstreamproxy.py): it answered no to our CONNECT (an HTTP
    # status, a SOCKS5 reply, credentials it wants or does not accept); or we could not talk to it.
    UPSTREAM_PROXY_REFUSED = "upstream_proxy_refused"
    UPSTREAM_PROXY_UNREACHABLE = "upstream_proxy_unreachable"

    @property
    def text(self) -> str:
        """What it means, in plain words (the README's table of reasons is this)."""
        return _ABOUT[self][0]

    @property
    def fix(self) -> str:
        """What to do about it, in general (`check` says it for the route at hand)."""
        return _ABOUT[self][1]


_ABOUT: dict[Cause, tuple[str, str]] = {
    Cause.OK: ("the connection and the TLS handshake worked", "nothing"),
    Cause.DNS: ("the target's name does not resolve", "check the target's host name, your DNS or your VPN"),
    Cause.REFUSED: ("nothing listens at the target's port", "start the service, or correct the target's port"),
    Cause.CONNECT: (
        "the target reset or closed the connection before TLS was set up, or cannot be reached",
        "check that the target's port speaks TLS and accepts this client; the server's log says why",
    ),
    Cause.TIMEOUT: (
        "TCP connect plus TLS handshake took longer than `connect_timeout`",
        "check that the target is reachable and speaks TLS, or raise connect_timeout",
    ),
    Cause.NOT_TLS: (
        "the target answered, but not with TLS",
        "point the route's target at the service's TLS port",
    ),
    Cause.SERVER_UNTRUSTED: (
        "the server certificate does not chain to the route's trust",
        "set ca_file to the CA that issued the server's certificate",
    ),
    Cause.NAME_MISMATCH: (
        "the server certificate does not hold `server_name`",
        "set server_name to a name the server's certificate holds, or have it reissued",
    ),
    Cause.SERVER_CERT_EXPIRED: (
        "the server certificate (or one in its chain) has expired",
        "have the server's certificate renewed; if it looks current, check this machine's clock",
    ),
    Cause.SERVER_CERT_NOT_YET_VALID: (
        "the server certificate (or one in its chain) is not valid yet",
        "check this machine's clock",
    ),
    Cause.SERVER_REJECTED_CERT: (
        "the server refused our client certificate (TLS alert, also the TLS 1.3 post-handshake one)",
        "check that the server trusts the identity's issuer and that the certificate allows clientAuth",
    ),
    Cause.SERVER_REJECTED_CERT_HTTP: (
        "the TLS handshake passed, then the HTTP server answered 400, 403, 495 or 496 naming our client "
        'certificate (nginx: "The SSL certificate error")',
        "check that the server's client CAs (nginx: ssl_client_certificate) hold the identity's issuer, "
        "and that the certificate allows clientAuth",
    ),
    Cause.NO_USABLE_CERT: (
        "the route's identity has nothing usable: refused locally",
        "put a valid certificate and key in the identity's keystore folder (`mtls-sidecar identity import FILE "
        "--name IDENTITY`); `mtls-sidecar status` says whether its renewal can get one",
    ),
    Cause.ALPN_REFUSED: (
        "the server accepts none of the route's `alpn` protocols",
        "set alpn to a protocol the server speaks, or remove it",
    ),
    Cause.TLS_ERROR: (
        "any other TLS failure, with OpenSSL's reason",
        "compare the server's TLS settings with ours (TLS 1.2 or later, SNI)",
    ),
    Cause.CONFIG: (
        "the route's settings cannot be used (an unreadable `ca_file`, say): nothing was contacted",
        "fix the field the message names",
    ),
    Cause.PROTOCOL_MISMATCH: (
        "the local client or the target does not speak the route's `protocol`",
        "set the route's protocol to what the client and the server speak (tcp, postgres, mysql or http)",
    ),
    Cause.SERVER_NO_TLS: (
        "the database server does not offer TLS in its handshake (PostgreSQL answered N, MySQL lacks CLIENT_SSL)",
        "turn TLS on in the server (PostgreSQL: ssl = on; MySQL/MariaDB: ssl_cert, ssl_key, ssl_ca)",
    ),
    Cause.LOCAL_TLS: (
        "with `local_tls`, the local client's TLS to the sidecar failed",
        "make the client trust the dev CA (`mtls-sidecar ca export`) and connect to localhost, 127.0.0.1 or ::1",
    ),
    Cause.PIN_MISMATCH: (
        "no certificate of the server's verified chain has a key in `pin_sha256`",
        "check the server's new key with its owner before adding it to pin_sha256",
    ),
    Cause.URI_SAN_NOT_ALLOWED: (
        "the server certificate holds no URI SAN that `allowed_uri_sans` allows",
        "check the route's target, or extend allowed_uri_sans",
    ),
    Cause.SERVER_NOT_ALLOWED: (
        "the server certificate's CN, OUs and SANs match none of the route's `allowed_common_names`, "
        "`allowed_ous`, `allowed_dns_sans`, `allowed_ip_sans` or `allowed_uri_sans`",
        "check the route's target, or add one of the server's names to the route's allow-list",
    ),
    Cause.SERVER_CERT_REVOKED: (
        "OCSP or a CRL says the server certificate is revoked",
        "the service needs a new certificate from its CA",
    ),
    Cause.REVOCATION_UNKNOWN: (
        '`revocation = "hard"` and no source said whether it is revoked',
        'make the OCSP responder or CRL reachable, set crl_file, or use revocation = "soft"',
    ),
    Cause.OTHER_USER: (
        "a local connection from another OS user: refused before any TLS",
        "nothing: only you may use your identity; run your own sidecar as that user",
    ),
    Cause.PEER_UNKNOWN: (
        "a local connection whose owner could not be found (it closed at once): refused before any TLS",
        "nothing, if it was a port scan or a client that gave up; otherwise check the client",
    ),
    Cause.TOO_MANY_CONNECTIONS: (
        "the route's `max_connections` (or the daemon's) tunnels were already open: refused before any TLS",
        "close idle clients, or raise max_connections on the route (or at the top of the config)",
    ),
    Cause.RESET: (
        "the server reset an established tunnel; the local connection was reset too",
        "look in the server's log for why it dropped the connection",
    ),
    Cause.TRUNCATED: (
        "the server closed TCP without TLS close_notify: its answer may be cut short",
        "look in the server's log; some servers always close this way",
    ),
    Cause.PROXY_NOT_ALLOWED: (
        "the proxy was asked for a destination (or a port) that no `[[proxy.rules]]` covers: refused, "
        "the sidecar is no open relay",
        "add a [[proxy.rules]] whose hosts (and ports) cover the destination, or reach it without the proxy",
    ),
    Cause.CLIENT_SPEAKS_TLS: (
        "through the proxy, the client began its own TLS (a ClientHello after CONNECT or SOCKS): our client "
        "certificate cannot be added to it",
        "have the client use http:// (the sidecar adds the TLS), or set passthrough = true on the rule for "
        "hosts that need no client certificate",
    ),
    Cause.UPSTREAM_PROXY_REFUSED: (
        "the route's `upstream_proxy` refused to connect us to the target (HTTP 403, 407 or 502; a SOCKS5 reply "
        "code; credentials it wants or does not accept)",
        "407 or a SOCKS5 authentication failure: set the environment variable named by upstream_proxy_auth_env to "
        '"user:password"; otherwise ask the proxy\'s administrators to allow the target',
    ),
    Cause.UPSTREAM_PROXY_UNREACHABLE: (
        "the route's `upstream_proxy` could not be reached, closed the connection, or did not speak HTTP CONNECT "
        "or SOCKS5",
        "check upstream_proxy's host, port and scheme (http://, socks5://), and that the proxy runs",
    ),
}

# OpenSSL X509_V_ERR_* codes (SSLCertVerificationError.verify_code).
VERIFY_NOT_YET_VALID = 9
VERIFY_EXPIRED = 10
VERIFY_SELF_SIGNED = 18
VERIFY_HOSTNAME_MISMATCH = 62
VERIFY_IP_MISMATCH = 64
VERIFY_UNTRUSTED = frozenset({2, 18, 19, 20, 21, 27, 28, 29, 30, 31, 32})

# TLS alerts (as `alert_name` gives them) with which a server says "not your certificate".
REJECTING_ALERTS = frozenset({
    "certificate required", "bad certificate", "unknown ca", "certificate expired", "certificate revoked",
    "unsupported certificate", "certificate unknown", "access denied", "handshake failure", "decrypt error",
})  # fmt: skip
# OpenSSL reasons for records that are not TLS at all.
NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"})

STAGES = ("setup", "resolve", "connect", "handshake", "after_handshake", "established", "local")
KINDS = ("config", "credential", "dns", "refused", "timeout", "reset", "closed", "os_error", "tls", "verify",
         "protocol", "no_tls", "http_refused", "not_allowed", "client_tls", "proxy_refused",
         "proxy_unreachable")  # fmt: skip


@dataclass(frozen=True)
class Fault:
    """What went wrong, as data.

    stage: "setup" (before any connection), "resolve", "connect", "handshake",
           "after_handshake" (the handshake passed, then the server spoke or hung up before
           any byte was carried), "established" (while carrying bytes) or "local" (the
           local client's side).
    kind:  "config", "credential", "dns", "refused", "timeout", "reset", "closed", "os_error",
           "tls" (an SSLError, `ssl_reason` set), "verify" (our check of the server failed),
           "protocol" (a side does not speak the route's protocol), "no_tls" (a database
           server offers no TLS in its handshake) or "http_refused" (an HTTP server's answer
           says it does not take our certificate: `http_certificate_refusal`), "not_allowed"
           (the proxy's rules do not cover the destination) or "client_tls" (a proxy client
           began its own TLS), "proxy_refused" or "proxy_unreachable" (the route's upstream proxy
           said no, or could not be talked to: `text` says what it answered, `fix` what to do).
    first_bytes: the start of what the server sent, when it is worth judging (not TLS?).
    """

    stage: str
    kind: str
    text: str = ""
    ssl_reason: str | None = None
    verify_code: int | None = None
    verify_message: str | None = None
    first_bytes: bytes = b""
    fix: str = ""  # what to do, when the fault itself knows it better than its cause (an upstream proxy's)

    @property
    def alert(self) -> str:
        """The TLS alert's name ("unknown ca"), or "" when this is no alert."""
        return alert_name(self.ssl_reason or "") if self.kind == "tls" else ""


def cause_of(fault: Fault) -> Cause:
    """The one decision: which cause a fault is. Used by the tunnel and by `check`."""
    if fault.stage == "setup":
        return Cause.CONFIG if fault.kind == "config" else Cause.TLS_ERROR
    if fault.kind == "http_refused":
        return Cause.SERVER_REJECTED_CERT_HTTP
    if fault.kind == "not_allowed":
        return Cause.PROXY_NOT_ALLOWED
    if fault.kind == "client_tls":
        return Cause.CLIENT_SPEAKS_TLS
    if fault.kind == "proxy_refused":
        return Cause.UPSTREAM_PROXY_REFUSED
    if fault.kind == "proxy_unreachable":
        return Cause.UPSTREAM_PROXY_UNREACHABLE
    if fault.kind == "protocol":
        return Cause.PROTOCOL_MISMATCH
    if fault.kind == "no_tls":
        return Cause.SERVER_NO_TLS
    if fault.kind == "dns":
        return Cause.DNS
    if fault.kind == "refused":
        return Cause.REFUSED
    if fault.stage in ("handshake", "after_handshake") and looks_like_mysql_greeting(fault.first_bytes):
        return Cause.PROTOCOL_MISMATCH  # a MySQL/MariaDB server greets first, in plaintext
    if fault.stage in ("handshake", "after_handshake") and fault.first_bytes and not looks_like_tls(fault.first_bytes):
        return Cause.NOT_TLS
    if fault.kind == "timeout":
        return Cause.TIMEOUT
    if fault.kind == "verify":
        return _verify_cause(fault.verify_code)
    if fault.kind == "tls":
        alert = fault.alert
        if alert == "no application protocol":
            return Cause.ALPN_REFUSED
        if alert in REJECTING_ALERTS:
            return Cause.SERVER_REJECTED_CERT
        if alert:
            return Cause.TLS_ERROR
        if (fault.ssl_reason or "").upper() in NOT_TLS_REASONS:
            return Cause.NOT_TLS
        if "NO_APPLICATION_PROTOCOL" in (fault.ssl_reason or "").upper():
            return Cause.ALPN_REFUSED
        return Cause.TLS_ERROR
    if fault.stage == "established":
        return Cause.TRUNCATED if fault.kind == "closed" else Cause.RESET
    return Cause.CONNECT  # reset, closed, other OS errors before anything was carried


# HTTP statuses with which a server that completed TLS may say "not your certificate":
# nginx's 495 (certificate error) and 496 (no certificate) always mean it, and reach clients as
# themselves when an `error_page` keeps them; its default is 400 with the reason in the body.
# 400 and 403 mean it only when the answer says "certificate".
CERTIFICATE_STATUSES = frozenset({495, 496})
MAYBE_CERTIFICATE_STATUSES = frozenset({400, 403})
_CERTIFICATE_WORD = re.compile(rb"certificate", re.IGNORECASE)
_TAG = re.compile(rb"<[^>]*>")


def http_certificate_refusal(status: int, reason: bytes, body: bytes) -> str | None:
    """The server's own words when an HTTP answer says it does not take our certificate, else None.

    `reason` is the status line's reason phrase, `body` the start of the answer's body (b"" for
    an answer to HEAD, which then cannot tell a 400 about the certificate from any other 400).
    nginx: `400` with "The SSL certificate error" (a certificate it does not accept) or "No
    required SSL certificate was sent"; `495`/`496` where an error_page keeps them.
    """
    if status in CERTIFICATE_STATUSES:
        words = _certificate_line(reason + b"\n" + body)
        return words or reason.decode("latin-1").strip() or f"HTTP {status}"
    if status in MAYBE_CERTIFICATE_STATUSES:
        return _certificate_line(reason + b"\n" + body)
    return None


def _certificate_line(text: bytes) -> str | None:
    """The first line of an answer (HTML tags taken out) that says "certificate", bounded."""
    for raw in _TAG.sub(b"\n", text[:4096]).splitlines():
        if _CERTIFICATE_WORD.search(raw):
            line = raw.decode("latin-1").strip()
            line = re.sub(r"^\d{3}\s+", "", line)  # nginx's <title>400 The SSL certificate error</title>
            return printable(line.encode("latin-1"), 120)
    return None


def _verify_cause(code: int | None) -> Cause:
    if code in (VERIFY_HOSTNAME_MISMATCH, VERIFY_IP_MISMATCH):
        return Cause.NAME_MISMATCH
    if code == VERIFY_EXPIRED:
        return Cause.SERVER_CERT_EXPIRED
    if code == VERIFY_NOT_YET_VALID:
        return Cause.SERVER_CERT_NOT_YET_VALID
    return Cause.SERVER_UNTRUSTED


def fault_from(stage: str, exc: BaseException, *, first_bytes: bytes = b"") -> Fault:
    """A Fault from an exception raised at `stage`."""
    if isinstance(exc, UpstreamProxyError):
        return Fault(stage, "proxy_refused" if exc.refused else "proxy_unreachable", exc.message, fix=exc.fix)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Fault(
            stage, "verify", error_text(exc), ssl_reason=ssl_reason(exc), verify_code=exc.verify_code,
            verify_message=exc.verify_message, first_bytes=first_bytes,
        )  # fmt: skip
    if isinstance(exc, ssl.SSLZeroReturnError | ssl.SSLEOFError):
        return Fault(stage, "closed", error_text(exc), ssl_reason=ssl_reason(exc), first_bytes=first_bytes)
    if isinstance(exc, ssl.SSLError):
        return Fault(stage, "tls", error_text(exc), ssl_reason=ssl_reason(exc), first_bytes=first_bytes)
    if isinstance(exc, socket.gaierror):
        return Fault(stage, "dns", exc.strerror or str(exc))
    if isinstance(exc, TimeoutError):
        return Fault(stage, "timeout", error_text(exc), first_bytes=first_bytes)
    if isinstance(exc, ConnectionRefusedError):
        return Fault(stage, "refused", exc.strerror or str(exc))
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return Fault(stage, "reset", exc.strerror or str(exc), first_bytes=first_bytes)
    if isinstance(exc, OSError):
        return Fault(stage, "os_error", exc.strerror or str(exc), first_bytes=first_bytes)
    return Fault(stage, "os_error", f"{type(exc).__name__}: {error_text(exc)}", first_bytes=first_bytes)


_SSL_TEXT = re.compile(r"(?:\[[^\]]*\]\s*)?([a-z0-9 ]+?)\s*(?:\(_ssl\.c:\d+\))?$")


def ssl_reason(exc: ssl.SSLError) -> str | None:
    """OpenSSL's reason code name, e.g. "TLSV1_ALERT_UNKNOWN_CA".

    Python 3.11 knows no name for reasons newer than its table (it then writes
    "[SSL] tlsv1 alert no application protocol (_ssl.c:1006)"): rebuild it from the text.
    """
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason)
    match = _SSL_TEXT.match(str(exc.args[1]) if len(exc.args) > 1 else str(exc))
    if match is None:
        return None
    return match.group(1).strip().upper().replace(" ", "_") or None


def alert_name(reason: str) -> str:
    """OpenSSL's "TLSV1_ALERT_UNKNOWN_CA" → "unknown ca"; "" when it is no alert."""
    upper = reason.upper()
    if "ALERT_" not in upper:
        return ""
    return upper.split("ALERT_", 1)[1].lower().replace("_", " ")


def looks_like_tls(data: bytes) -> bool:
    """A TLS record starts with a content type 20..23 and protocol major version 3."""
    return data[0] in (20, 21, 22, 23) and (len(data) < 2 or data[1] == 3)


def looks_like_mysql_greeting(data: bytes) -> bool:
    """A MySQL/MariaDB initial handshake packet: 3-byte length, sequence 0, protocol version 10,
    then a NUL-terminated server version."""
    if len(data) < 6 or data[3] != 0 or data[4] != 10:
        return False
    length = int.from_bytes(data[:3], "little")
    return 30 <= length <= 512 and 0 in data[5 : 5 + 64]


def error_text(exc: BaseException) -> str:
    """An exception's first line, bounded."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def quoted(text: str) -> str:
    """`text` from a peer (a certificate's subject, a server's error) safe for a terminal, a log
    line or a table: every character that is not printable (control characters, newlines,
    escape sequences' ESC, bidirectional overrides, other format characters) is written as an
    escape (\\n, \\x1b, \\u202e). Quoting quoted text changes nothing."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else _ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        for c in text
    )


def quoted_all(value: Any) -> Any:
    """`value` (JSON-like: dicts, lists, strings) with every string in it `quoted`."""
    if isinstance(value, str):
        return quoted(value)
    if isinstance(value, dict):
        return {k: quoted_all(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(quoted_all(v) for v in value)
    return value


def printable(data: bytes, limit: int = 60) -> str:
    """The first line of what a server sent, as printable text, truncated."""
    line = data.split(b"\n", 1)[0].rstrip(b"\r") or data
    text = "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in line[:limit])
    return text + ("…" if len(line) > limit else "")
