"""Why a connection to a remote service failed, in words a developer can act on. Pure."""

from __future__ import annotations

import errno
import re
import ssl
from dataclasses import dataclass

# Reason keys, as counted per route and shown in status.
CONNECT = "connect"
TIMEOUT = "timeout"
SERVER_UNTRUSTED = "server_untrusted"
NAME_MISMATCH = "name_mismatch"
SERVER_CERT_EXPIRED = "server_certificate_expired"
SERVER_REJECTED_CERT = "server_rejected_certificate"
NO_USABLE_CERT = "no_usable_certificate"
NOT_TLS = "not_tls"
ALPN_REFUSED = "alpn_refused"
TLS_ERROR = "tls_error"
ROUTE_ERROR = "route_error"
# Server policy beyond names (sidecar/policy.py, sidecar/revocation.py), after the handshake.
PIN_MISMATCH = "pin_mismatch"
URI_SAN_NOT_ALLOWED = "uri_san_not_allowed"
SERVER_CERT_REVOKED = "server_certificate_revoked"
REVOCATION_UNKNOWN = "revocation_unknown"
OTHER_USER = "other_user"  # a local connection from another OS user, refused before any TLS
# The remote broke an established tunnel: reset (RST), or closed TCP without TLS close_notify.
RESET = "reset"
TRUNCATED = "truncated"

# OpenSSL X509_V_ERR_* codes that Python reports in SSLCertVerificationError.verify_code.
_UNTRUSTED_CODES = {2, 18, 19, 20, 21, 27, 28, 29, 30, 31, 32}
_EXPIRED_CODES = {9, 10}  # not yet valid, expired
_HOSTNAME_MISMATCH = 62
_IP_MISMATCH = 64

# Alerts a server sends when it does not accept the client certificate.
_REJECTED_ALERTS = (
    "CERTIFICATE_REQUIRED",
    "BAD_CERTIFICATE",
    "UNKNOWN_CA",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_REVOKED",
    "UNSUPPORTED_CERTIFICATE",
    "CERTIFICATE_UNKNOWN",
    "ACCESS_DENIED",
    "HANDSHAKE_FAILURE",
    "DECRYPT_ERROR",
)


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


@dataclass(frozen=True)
class Failure:
    reason: str
    message: str


def classify(
    exc: BaseException,
    *,
    target: str,
    server_name: str,
    trust: str,
    connected: bool = False,
    timeout: float | None = None,
) -> Failure:
    """Turn an exception from connecting or handshaking into a reason key and a sentence.

    `connected`: the TCP connection was made (a timeout then means no TLS answer); `timeout`:
    the route's connect_timeout in seconds, named in the message.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _verification_failure(exc, target=target, server_name=server_name, trust=trust)
    if isinstance(exc, ssl.SSLError):
        return classify_ssl_error(exc, target=target)
    if isinstance(exc, TimeoutError):
        within = f" within {timeout:g}s (connect_timeout)" if timeout is not None else ""
        if connected:
            return Failure(
                TIMEOUT,
                f"timed out connecting to {target}: it accepted the TCP connection but did not "
                f"complete the TLS handshake{within} (is it overloaded, or not a TLS port?)",
            )
        return Failure(
            TIMEOUT,
            f"timed out connecting to {target}: no TCP connection{within} "
            "(is it overloaded, or is a firewall dropping packets?)",
        )
    if isinstance(exc, ConnectionRefusedError):
        return Failure(CONNECT, f"connection to {target} refused (is the service running?)")
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return Failure(CONNECT, f"{target} reset the connection during the TLS handshake")
    if isinstance(exc, OSError) and "Name or service not known" in str(exc):
        return Failure(CONNECT, f"cannot resolve the name in {target}")
    if isinstance(exc, OSError):
        return Failure(CONNECT, f"cannot connect to {target}: {exc.strerror or exc}")
    return Failure(TLS_ERROR, f"{type(exc).__name__} talking to {target}: {exc}")


def broken_stream(exc: BaseException | None, *, target: str, received: int) -> Failure:
    """The remote ended an established tunnel abnormally (`exc` None: TCP closed without close_notify)."""
    after = f"after {received} byte{'' if received == 1 else 's'} of its answer"
    if exc is None:
        return Failure(
            TRUNCATED,
            f"{target} closed the connection without TLS close_notify {after}; the answer may be cut short",
        )
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return Failure(RESET, f"{target} reset the connection {after}; the local connection was reset too")
    if isinstance(exc, OSError):
        return Failure(RESET, f"the connection to {target} broke {after}: {exc.strerror or exc}")
    return Failure(RESET, f"the connection to {target} broke {after}: {type(exc).__name__}: {exc}")


def classify_ssl_error(exc: ssl.SSLError, *, target: str) -> Failure:
    """Errors after or during the handshake that are not our verification of the server."""
    reason = (ssl_reason(exc) or "").upper()
    if "ALERT" in reason and any(alert in reason for alert in _REJECTED_ALERTS):
        alert = reason.split("ALERT_", 1)[-1].lower().replace("_", " ")
        return Failure(
            SERVER_REJECTED_CERT,
            f"{target} rejected our client certificate (TLS alert: {alert})",
        )
    if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
        return Failure(NOT_TLS, f"{target} did not answer with TLS (is it a plaintext port?)")
    if "NO_APPLICATION_PROTOCOL" in reason:
        return Failure(ALPN_REFUSED, f"{target} accepts none of the configured ALPN protocols")
    return Failure(TLS_ERROR, f"TLS error with {target}: {exc.reason or exc}")


def _verification_failure(exc: ssl.SSLCertVerificationError, *, target: str, server_name: str, trust: str) -> Failure:
    code = exc.verify_code
    detail = exc.verify_message or str(exc)
    if code in (_HOSTNAME_MISMATCH, _IP_MISMATCH):
        return Failure(
            NAME_MISMATCH,
            f"{target}'s certificate is not valid for {server_name!r} ({detail}); "
            "set server_name to a name the certificate holds, or fix the server certificate",
        )
    if code in _EXPIRED_CODES:
        return Failure(SERVER_CERT_EXPIRED, f"{target}'s certificate is not valid now ({detail})")
    if code in _UNTRUSTED_CODES:
        return Failure(
            SERVER_UNTRUSTED,
            f"{target}'s certificate is not trusted by {trust} ({detail}); "
            "set ca_file to the CA that issued the server's certificate",
        )
    return Failure(SERVER_UNTRUSTED, f"{target}'s certificate failed verification ({detail})")
