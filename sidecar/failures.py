"""The tunnel's sentences for a failed or broken connection. Pure.

The key of every failure is a `Cause`, decided by `causes.cause_of` exactly as `check`
decides it; this module only words the tunnel's one-line `last_error` for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.causes import (
    VERIFY_UNTRUSTED,
    Cause,
    Fault,
    cause_of,
    fault_from,
    looks_like_mysql_greeting,
    printable,
    quoted,
)


@dataclass(frozen=True)
class Failure:
    reason: Cause
    message: str  # quoted: it may hold a server's words or names (status, events and the log show it)

    def __post_init__(self) -> None:
        object.__setattr__(self, "message", quoted(self.message))


def classify(
    exc: BaseException,
    *,
    target: str,
    server_name: str,
    trust: str,
    connected: bool = False,
    timeout: float | None = None,
    first_bytes: bytes = b"",
    via: str | None = None,
) -> Failure:
    """Turn an exception from connecting or handshaking into a cause and a sentence.

    `connected`: the TCP connection was made (a timeout then means no TLS answer); `timeout`:
    the route's connect_timeout in seconds, named in the message; `first_bytes`: the start of
    what the server sent (a plaintext answer means it is not a TLS port); `via`: the route's
    upstream proxy, named in a timeout's sentence (its refusals name it themselves).
    """
    fault = fault_from("handshake" if connected else "connect", exc, first_bytes=first_bytes)
    failure = describe(fault, target=target, server_name=server_name, trust=trust, timeout=timeout)
    if via is not None and failure.reason == Cause.TIMEOUT:
        if connected:
            return Failure(failure.reason, f"{failure.message}; it is reached through the upstream proxy {via}")
        within = f" within {timeout:g}s (connect_timeout)" if timeout is not None else ""
        return Failure(
            failure.reason,
            f"timed out connecting to {target} through the upstream proxy {via}: no tunnel{within} "
            "(is the proxy slow to reach the target, or is a firewall dropping packets to the proxy?)",
        )
    return failure


def describe(
    fault: Fault, *, target: str, server_name: str = "", trust: str = "", timeout: float | None = None
) -> Failure:
    cause = cause_of(fault)
    if cause in (Cause.UPSTREAM_PROXY_REFUSED, Cause.UPSTREAM_PROXY_UNREACHABLE):
        return Failure(cause, f"cannot reach {target}: {fault.text}; {fault.fix}" if fault.fix else fault.text)
    if cause == Cause.TIMEOUT:
        within = f" within {timeout:g}s (connect_timeout)" if timeout is not None else ""
        if fault.stage != "connect":
            return Failure(
                cause,
                f"timed out connecting to {target}: it accepted the TCP connection but did not "
                f"complete the TLS handshake{within} (is it overloaded, or not a TLS port?)",
            )
        return Failure(
            cause,
            f"timed out connecting to {target}: no TCP connection{within} "
            "(is it overloaded, or is a firewall dropping packets?)",
        )
    if cause == Cause.REFUSED:
        return Failure(cause, f"connection to {target} refused (is the service running?)")
    if cause == Cause.DNS:
        return Failure(cause, f"cannot resolve the name in {target} ({fault.text})")
    if cause in (
        Cause.NAME_MISMATCH,
        Cause.SERVER_CERT_EXPIRED,
        Cause.SERVER_CERT_NOT_YET_VALID,
        Cause.SERVER_UNTRUSTED,
    ):
        return _verification_failure(cause, fault, target=target, server_name=server_name, trust=trust)
    if cause == Cause.SERVER_REJECTED_CERT:
        return Failure(cause, f"{target} rejected our client certificate (TLS alert: {fault.alert})")
    if cause == Cause.PROTOCOL_MISMATCH and looks_like_mysql_greeting(fault.first_bytes):
        return Failure(
            cause,
            f"{target} is a MySQL or MariaDB server (it greeted us in plaintext): "
            'set protocol = "mysql" for this route',
        )
    if cause == Cause.NOT_TLS:
        said = f': it answered "{printable(fault.first_bytes)}"' if fault.first_bytes else ""
        return Failure(cause, f"{target} did not answer with TLS (is it a plaintext port?){said}")
    if cause == Cause.ALPN_REFUSED:
        return Failure(cause, f"{target} accepts none of the configured ALPN protocols")
    if cause == Cause.TLS_ERROR:
        return Failure(cause, f"TLS error with {target}: {fault.ssl_reason or fault.text}")
    if fault.kind in ("reset", "closed") and fault.stage in ("connect", "handshake"):
        return Failure(cause, f"{target} reset the connection during the TLS handshake")
    if fault.kind in ("reset", "closed"):
        return Failure(cause, f"{target} closed the connection right after the TLS handshake")
    return Failure(cause, f"cannot connect to {target}: {fault.text}")


def classify_ssl_error(exc: BaseException, *, target: str) -> Failure:
    """An error after the handshake; with TLS 1.3 this is how a server rejects our certificate."""
    return describe(fault_from("after_handshake", exc), target=target)


def broken_stream(exc: BaseException | None, *, target: str, received: int) -> Failure:
    """The remote ended an established tunnel abnormally (`exc` None: TCP closed without close_notify)."""
    after = f"after {received} byte{'' if received == 1 else 's'} of its answer"
    if exc is None:
        return Failure(
            Cause.TRUNCATED,
            f"{target} closed the connection without TLS close_notify {after}; the answer may be cut short",
        )
    fault = fault_from("established", exc)
    if fault.kind == "reset":
        return Failure(Cause.RESET, f"{target} reset the connection {after}; the local connection was reset too")
    if isinstance(exc, OSError):
        return Failure(Cause.RESET, f"the connection to {target} broke {after}: {exc.strerror or exc}")
    return Failure(Cause.RESET, f"the connection to {target} broke {after}: {type(exc).__name__}: {exc}")


def _verification_failure(cause: Cause, fault: Fault, *, target: str, server_name: str, trust: str) -> Failure:
    detail = fault.verify_message or fault.text
    if cause == Cause.NAME_MISMATCH:
        return Failure(
            cause,
            f"{target}'s certificate is not valid for {server_name!r} ({detail}); "
            "set server_name to a name the certificate holds, or fix the server certificate",
        )
    if cause in (Cause.SERVER_CERT_EXPIRED, Cause.SERVER_CERT_NOT_YET_VALID):
        return Failure(cause, f"{target}'s certificate is not valid now ({detail})")
    if fault.verify_code is not None and fault.verify_code in VERIFY_UNTRUSTED:
        return Failure(
            cause,
            f"{target}'s certificate is not trusted by {trust} ({detail}); "
            "set ca_file to the CA that issued the server's certificate",
        )
    return Failure(cause, f"{target}'s certificate failed verification ({detail})")
