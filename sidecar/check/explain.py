"""`check`'s explanation: what one real connection saw, in one line and one fix. Pure.

`explain(observation)` turns an `Observation` (plain data, built by `sidecar.check.observe`
or by hand in tests) into a `CheckResult`: a cause key from `sidecar.causes` (decided by
`cause_of`, as the tunnel decides it), one line that says what happened and where, one line
that says what to do next, and JSON-able details.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from sidecar.causes import (
    REJECTING_ALERTS,
    VERIFY_SELF_SIGNED,
    VERIFY_UNTRUSTED,
    Cause,
    Fault,
    cause_of,
    http_certificate_refusal,
    looks_like_tls,
    printable,
    quoted,
    quoted_all,
)
from sidecar.hostport import host_port
from sidecar.policy import ServerNames, Verdict, spki_sha256, uri_sans
from sidecar.units import human_duration, rfc3339

OK = Cause.OK
DNS = Cause.DNS
REFUSED = Cause.REFUSED
TIMEOUT = Cause.TIMEOUT
CONNECT = Cause.CONNECT
NOT_TLS = Cause.NOT_TLS
SERVER_UNTRUSTED = Cause.SERVER_UNTRUSTED
NAME_MISMATCH = Cause.NAME_MISMATCH
SERVER_CERT_EXPIRED = Cause.SERVER_CERT_EXPIRED
SERVER_CERT_NOT_YET_VALID = Cause.SERVER_CERT_NOT_YET_VALID
SERVER_REJECTED_CERT = Cause.SERVER_REJECTED_CERT
SERVER_REJECTED_CERT_HTTP = Cause.SERVER_REJECTED_CERT_HTTP
NO_USABLE_CERT = Cause.NO_USABLE_CERT
ALPN_REFUSED = Cause.ALPN_REFUSED
TLS_ERROR = Cause.TLS_ERROR
CONFIG = Cause.CONFIG
PIN_MISMATCH = Cause.PIN_MISMATCH
URI_SAN_NOT_ALLOWED = Cause.URI_SAN_NOT_ALLOWED
SERVER_NOT_ALLOWED = Cause.SERVER_NOT_ALLOWED
SERVER_CERT_REVOKED = Cause.SERVER_CERT_REVOKED
REVOCATION_UNKNOWN = Cause.REVOCATION_UNKNOWN
PROTOCOL_MISMATCH = Cause.PROTOCOL_MISMATCH
SERVER_NO_TLS = Cause.SERVER_NO_TLS
UPSTREAM_PROXY_REFUSED = Cause.UPSTREAM_PROXY_REFUSED
UPSTREAM_PROXY_UNREACHABLE = Cause.UPSTREAM_PROXY_UNREACHABLE
# The causes `check` can report (the tunnel adds other_user, reset and truncated, which need a
# local client or an established tunnel).
CAUSES = (
    OK, DNS, REFUSED, TIMEOUT, CONNECT, NOT_TLS, SERVER_UNTRUSTED, NAME_MISMATCH, SERVER_CERT_EXPIRED,
    SERVER_CERT_NOT_YET_VALID, SERVER_REJECTED_CERT, NO_USABLE_CERT, ALPN_REFUSED, TLS_ERROR, CONFIG,
    PIN_MISMATCH, URI_SAN_NOT_ALLOWED, SERVER_CERT_REVOKED, REVOCATION_UNKNOWN, PROTOCOL_MISMATCH, SERVER_NO_TLS,
    SERVER_REJECTED_CERT_HTTP, SERVER_NOT_ALLOWED, UPSTREAM_PROXY_REFUSED, UPSTREAM_PROXY_UNREACHABLE,
)  # fmt: skip

EXPIRY_WARNING = timedelta(days=14)


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    cause: Cause
    message: str
    fix: str | None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:  # the server's names and words reach a terminal: quoted
        object.__setattr__(self, "message", quoted(self.message))
        if self.fix is not None:
            object.__setattr__(self, "fix", quoted(self.fix))
        object.__setattr__(self, "details", quoted_all(self.details))

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "cause": self.cause, "message": self.message, "fix": self.fix, "details": self.details}


@dataclass(frozen=True)
class Observation:
    """Everything one check saw. Built by `check_route`; tests build it by hand."""

    route: str
    host: str
    port: int
    server_name: str
    identity: str
    now: datetime
    timeout: float
    ca_file: Path | None = None
    ca_dir: Path | None = None
    alpn_offered: tuple[str, ...] = ()
    skip_verify: bool = False
    client_cert: x509.Certificate | None = None
    client_chain: tuple[x509.Certificate, ...] = ()  # the intermediates presented with it
    client_file: str | None = None  # the keystore file it came from
    renew: str | None = None  # the identity's `renew` setting: "none" means the sidecar never renews it
    # When nothing could be presented: why_unusable(), each (file, reason), and the folder.
    unusable: str | None = None
    rejected: tuple[tuple[str, str], ...] = ()
    identity_folder: str | None = None
    # What the connection did.
    address: str | None = None
    failure: Fault | None = None
    first_bytes: bytes = b""
    tls_version: str | None = None
    cipher: str | None = None
    alpn: str | None = None
    server_cert: x509.Certificate | None = None
    server_cert_verified: bool = False
    after_handshake: str | None = None  # "silent", "data" or "closed"
    probe_error: str | None = None
    # The chain as the handshake verified it (leaf first), and the route's pins/URI SANs/revocation verdict.
    server_chain: tuple[x509.Certificate, ...] = ()
    policy: Verdict | None = None
    # The route's protocol, and what it saw: the Host an http route gives requests and the
    # status line they get; why a protocol's own negotiation failed; what a tcp route's
    # target turned out to speak ("postgres").
    protocol: str = "tcp"
    local_tls: bool = False
    http_host: str | None = None
    http_status: str | None = None
    http_method: str = "HEAD"  # HEAD; GET when a 400 or 403 to HEAD came without the body that says why
    http_body: bytes = b""  # the start of the answer's body
    # The issuers the server's CertificateRequest names (None: not seen, (): any issuer), and
    # why they could not be read.
    acceptable_issuers: tuple[x509.Name, ...] | None = None
    acceptable_issuers_unknown: str | None = None
    prelude_error: str | None = None
    speaks: str | None = None
    # The daemon's warning about the identity's certificate: it expires soon and will not be
    # renewed in time (sidecar/expiry.py). Shown whatever the connection did.
    identity_warning: str | None = None
    # The route's upstream proxy (its URL as configured) and its credentials' variable: the
    # connections are made through it.
    upstream_proxy: str | None = None
    upstream_proxy_auth_env: str | None = None

    @property
    def target(self) -> str:
        return host_port(self.host, self.port)


def explain(obs: Observation) -> CheckResult:
    """Turn what a check saw into one line, one fix and the details. Pure."""
    details = _details(obs)
    failure = obs.failure
    if obs.client_cert is None and obs.unusable is not None:
        return _no_usable_certificate(obs, details)
    if obs.policy is not None and not obs.policy.ok:
        return _policy_refused(obs, obs.policy, details)  # the tunnel checks this before anything else
    if obs.policy is not None and obs.policy.warning:
        details["warnings"].append(obs.policy.warning)
    if failure is None and obs.http_status is not None:
        refusal = http_refusal(obs)
        if refusal is not None:
            return _http_rejected(obs, refusal, details)
    if failure is None and obs.after_handshake == "closed":
        return _hung_up(obs, Fault("after_handshake", "closed"), details)
    if failure is None:
        return _ok(obs, details)
    if failure.stage == "setup":
        return _setup_failed(obs, failure, details)
    cause = cause_of(replace(failure, first_bytes=obs.first_bytes))
    if obs.prelude_error is not None:
        return CheckResult(False, cause, f"{obs.target}: {obs.prelude_error}", cause.fix, details)
    if cause in (UPSTREAM_PROXY_REFUSED, UPSTREAM_PROXY_UNREACHABLE):
        return CheckResult(False, cause, f"{obs.target}: {failure.text}", failure.fix or cause.fix, details)
    if obs.speaks == "postgres" or cause == PROTOCOL_MISMATCH:
        return _wrong_protocol(obs, "postgres" if obs.speaks == "postgres" else "mysql", details)
    if cause == DNS:
        return CheckResult(
            False,
            DNS,
            f"{obs.target}: the name {obs.host} does not resolve ({failure.text})",
            f"check the host in target for route {obs.route}, or your DNS or VPN connection",
            details,
        )
    if cause == REFUSED:
        where = f" at {obs.address}" if obs.address else ""
        return CheckResult(
            False,
            REFUSED,
            f"{obs.target}: connection refused{where} (nothing is listening on port {obs.port})",
            f"start the service, or correct the port in target for route {obs.route}",
            details,
        )
    if cause == NOT_TLS:
        return _not_tls(obs, details)
    if cause == TIMEOUT:
        return _timed_out(obs, failure, details)
    if failure.kind == "verify":
        return _verification_failed(obs, failure, cause, details)
    if failure.alert:
        return _alert(obs, failure, cause, details)
    if failure.kind in ("reset", "closed"):
        return _hung_up(obs, failure, details)
    if cause == TLS_ERROR:
        reason = (failure.ssl_reason or failure.text).lower().replace("_", " ")
        return CheckResult(
            False,
            TLS_ERROR,
            f"{obs.target}: the TLS handshake failed: {reason}",
            f"compare the server's TLS settings with ours (TLS 1.2 or later, SNI {obs.server_name}); "
            f"`openssl s_client -connect {obs.target} -servername {obs.server_name}` shows more",
            details,
        )
    return CheckResult(
        False,
        CONNECT,
        f"{obs.target}: cannot connect: {failure.text}",
        f"check that {obs.host} is reachable from this machine and the port in target for route {obs.route}",
        details,
    )


def _wrong_protocol(obs: Observation, speaks: str, details: dict[str, Any]) -> CheckResult:
    details["server_speaks"] = speaks
    if speaks == "postgres":
        message = (
            f"{obs.target} is a PostgreSQL server: it hung up on our TLS hello and answers PostgreSQL's "
            "SSLRequest (TLS starts inside its own protocol)"
        )
    else:
        message = (
            f"{obs.target} is a MySQL or MariaDB server: it greeted us in plaintext (TLS starts inside its handshake)"
        )
    return CheckResult(
        False,
        PROTOCOL_MISMATCH,
        message,
        f'set protocol = "{speaks}" for route {obs.route} (mtls-sidecar route add … --protocol {speaks})',
        details,
    )


def _no_usable_certificate(obs: Observation, details: dict[str, Any]) -> CheckResult:
    folder = obs.identity_folder or f"the keystore folder of {obs.identity}"
    details["unusable"] = [{"file": f, "reason": r} for f, r in obs.rejected]
    return CheckResult(
        False,
        NO_USABLE_CERT,
        f"{obs.target}: not contacted: {obs.unusable}",
        f"put a valid client certificate and key for {obs.identity} in {folder}, or {_renew_hint(obs)}",
        details,
    )


def _setup_failed(obs: Observation, failure: Fault, details: dict[str, Any]) -> CheckResult:
    if failure.kind == "config":
        field = "ca_dir" if obs.ca_dir is not None and obs.ca_file is None else "ca_file"
        return CheckResult(
            False,
            CONFIG,
            f"{obs.target}: not contacted: {failure.text}",
            f"point {field} for route {obs.route} at a readable PEM file of CA certificates",
            details,
        )
    return CheckResult(
        False,
        TLS_ERROR,
        f"{obs.target}: not contacted: OpenSSL cannot use {obs.identity}'s certificate: {failure.text}",
        f"replace that credential in {obs.identity}'s keystore folder, or {_renew_hint(obs)}",
        details,
    )


def _ok(obs: Observation, details: dict[str, Any]) -> CheckResult:
    warnings: list[str] = details["warnings"]
    if obs.alpn_offered and obs.alpn is None:
        warnings.append(f"the server selected no ALPN protocol (we offered {', '.join(obs.alpn_offered)})")
    if obs.skip_verify:
        warnings.append(f"server verification is OFF for route {obs.route} (unsafe_skip_verify): it was not checked")
    if obs.after_handshake == "data":
        details["server_spoke_first"] = True
    server = ""
    if obs.server_cert is not None:
        cert = obs.server_cert
        left = cert.not_valid_after_utc - obs.now
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        if left < min(EXPIRY_WARNING, lifetime / 3):
            warnings.append(
                f"the server certificate expires in {human_duration(left)} ({_when(cert.not_valid_after_utc)})"
            )
        server = (
            f"; server {cert.subject.rfc4514_string() or '(empty subject)'}, issued by {cert.issuer.rfc4514_string()}, "
            f"expires {_when(cert.not_valid_after_utc)}"
        )
    if obs.protocol == "postgres":
        warnings.append(
            "channel binding (SCRAM-SHA-256-PLUS) cannot cross a tunnel that ends TLS: "
            "clients must not set channel_binding=require on this route"
        )
    answer = ""
    if obs.http_status is not None:
        details["http_host"] = obs.http_host
        details["http_status"] = obs.http_status
        answer = f'; {obs.http_method} / with Host: {obs.http_host} → "{obs.http_status}"'
    alpn = obs.alpn or "none"
    return CheckResult(
        True,
        OK,
        f"{obs.target}: OK: {obs.tls_version}, {obs.cipher}, ALPN {alpn}{server}{answer}",
        None,
        details,
    )


def _policy_refused(obs: Observation, verdict: Verdict, details: dict[str, Any]) -> CheckResult:
    """The handshake passed, the route's own checks did not: the tunnel would refuse here."""
    cause = verdict.reason or TLS_ERROR
    leaf = obs.server_chain[0] if obs.server_chain else obs.server_cert
    if cause == PIN_MISMATCH and leaf is not None:
        details["server_pin"] = spki_sha256(leaf)
        fix = (
            f"if the server's key was changed on purpose, check sha256/{spki_sha256(leaf)} with its owner and add "
            f"it to pin_sha256 for route {obs.route}; otherwise this may not be the real service"
        )
    elif cause == URI_SAN_NOT_ALLOWED:
        held = ", ".join(uri_sans(leaf)) if leaf is not None else ""
        fix = (
            f"if this is the service you meant, add a pattern matching {held} to allowed_uri_sans "
            f"for route {obs.route}; otherwise check target for route {obs.route}"
            if held
            else f"check target for route {obs.route}: this server's certificate carries no URI SAN (SPIFFE ID)"
        )
    elif cause == SERVER_NOT_ALLOWED:
        fix = _not_allowed_fix(obs.route, leaf, details)
    elif cause == SERVER_CERT_REVOKED:
        fix = "the service needs a new certificate from its CA; nothing to change on this side"
    else:
        fix = (
            f"make the OCSP responder or CRL distribution point reachable from here, set crl_file, "
            f'or set revocation = "soft" for route {obs.route}'
        )
    return CheckResult(False, cause, f"{obs.target}: {verdict.message}", fix, details)


def _not_allowed_fix(route: str, leaf: x509.Certificate | None, details: dict[str, Any]) -> str:
    """For server_not_allowed: which key would take which of the server's names (the first it holds)."""
    if leaf is None:
        return f"check target for route {route}: the server sent no certificate"
    names = ServerNames.of(leaf)
    details["server_names"] = {
        "common_names": list(names.common_names),
        "ous": list(names.ous),
        "dns_sans": list(names.dns_sans),
        "ip_sans": [str(ip) for ip in names.ip_sans],
        "uri_sans": list(names.uri_sans),
    }
    offers = [
        (key, values[0])
        for key, values in (
            ("allowed_dns_sans", names.dns_sans),
            ("allowed_uri_sans", names.uri_sans),
            ("allowed_ip_sans", tuple(str(ip) for ip in names.ip_sans)),
            ("allowed_common_names", names.common_names),
            ("allowed_ous", names.ous),
        )
        if values
    ]
    if not offers:
        return f"check target for route {route}: this server's certificate has no CN, OU or SAN to allow"
    add = " or ".join(f'"{value}" to {key}' for key, value in offers[:2])
    return f"if this is the service you meant, add {add} for route {route}; otherwise check target for route {route}"


def _not_tls(obs: Observation, details: dict[str, Any]) -> CheckResult:
    shown = printable(obs.first_bytes)
    return CheckResult(
        False,
        NOT_TLS,
        f'{obs.target} is not a TLS server: it answered in plaintext: "{shown}"',
        f"point target for route {obs.route} at the service's TLS port (this looks like its plaintext one)",
        details,
    )


def _timed_out(obs: Observation, failure: Fault, details: dict[str, Any]) -> CheckResult:
    limit = f"{obs.timeout:g} s"
    raise_it = f"or raise connect_timeout for route {obs.route}"
    if failure.stage == "resolve":
        message = f"{obs.target}: resolving {obs.host} took longer than {limit}"
        fix = f"check your DNS or VPN connection, {raise_it}"
    elif failure.stage == "connect" and obs.upstream_proxy is not None:
        message = f"{obs.target}: the upstream proxy {obs.upstream_proxy} gave no tunnel to it within {limit}"
        fix = f"check that the proxy runs and can reach {obs.host}, {raise_it}"
    elif failure.stage == "connect":
        message = f"{obs.target}: no answer to the TCP connection within {limit}"
        fix = f"check that {obs.host} is reachable from here (VPN, firewall) and the port is right, {raise_it}"
    elif not obs.first_bytes:
        message = f"{obs.target} accepted the TCP connection but did not answer our TLS hello within {limit}"
        fix = (
            f"check that port {obs.port} speaks TLS (a plaintext service waiting for its client to speak "
            f"looks like this), {raise_it}"
        )
    else:
        message = f"{obs.target}: the TLS handshake started but did not finish within {limit}"
        fix = f"the server or the network is slow or stuck: look at the server's log, {raise_it}"
    return CheckResult(False, TIMEOUT, message, fix, details)


def _hung_up(obs: Observation, failure: Fault, details: dict[str, Any]) -> CheckResult:
    how = "reset" if failure.kind == "reset" else "closed"
    if failure.stage == "after_handshake":
        message = (
            f"{obs.target} completed the TLS handshake ({obs.tls_version}), then {how} the connection "
            "without a TLS alert"
        )
        fix = f"look in the server's log for why it hung up; it may not accept {obs.identity}'s certificate"
        elsewhere = _issuers_elsewhere(obs)
        if elsewhere is not None:
            message, fix = f"{message}; {elsewhere}", _issuers_fix(obs)
    elif not obs.first_bytes:
        message = f"{obs.target} accepted the TCP connection, then {how} it without answering our TLS hello"
        fix = (
            f"check that port {obs.port} speaks TLS and accepts this client (the server's log says why; "
            f"SNI was {obs.server_name})"
        )
    else:
        message = f"{obs.target} {how} the connection in the middle of the TLS handshake"
        fix = f"look in the server's log for why; it may not accept {obs.identity}'s certificate or our TLS settings"
        elsewhere = _issuers_elsewhere(obs)
        if elsewhere is not None:
            message, fix = f"{message}; {elsewhere}", _issuers_fix(obs)
    return CheckResult(False, CONNECT, message, fix, details)


def _verification_failed(obs: Observation, failure: Fault, cause: Cause, details: dict[str, Any]) -> CheckResult:
    code = failure.verify_code
    detail = failure.verify_message or failure.text
    details["verify_error"] = {"code": code, "message": detail}
    cert = obs.server_cert
    if cause == NAME_MISMATCH:
        return _name_mismatch(obs, cert, detail, details)
    if cause == SERVER_CERT_EXPIRED:
        if cert is not None and cert.not_valid_after_utc <= obs.now:
            ended = cert.not_valid_after_utc
            message = (
                f"{obs.target}: server certificate {cert.subject.rfc4514_string()} expired "
                f"{human_duration(obs.now - ended)} ago ({_when(ended)})"
            )
        else:
            message = f"{obs.target}: a certificate in the server's chain has expired ({detail})"
        return CheckResult(
            False,
            SERVER_CERT_EXPIRED,
            message,
            "have the server's certificate renewed (nothing to change on this side); "
            "if it looks current, check this machine's clock",
            details,
        )
    if cause == SERVER_CERT_NOT_YET_VALID:
        if cert is not None and cert.not_valid_before_utc > obs.now:
            starts = cert.not_valid_before_utc
            message = (
                f"{obs.target}: server certificate {cert.subject.rfc4514_string()} is not valid until "
                f"{_when(starts)} (in {human_duration(starts - obs.now)})"
            )
        else:
            message = f"{obs.target}: a certificate in the server's chain is not valid yet ({detail})"
        return CheckResult(
            False,
            SERVER_CERT_NOT_YET_VALID,
            message,
            "check this machine's clock; if it is right, the server's certificate was issued with a future start",
            details,
        )
    trust = _trust_where(obs)
    set_ca = f"set ca_file for route {obs.route} to the CA that issued the server's certificate"
    if code in VERIFY_UNTRUSTED:
        if cert is None:
            message = f"{obs.target}: server certificate is not trusted ({detail}); trust in use: {trust}"
        elif code == VERIFY_SELF_SIGNED or cert.issuer == cert.subject:
            message = (
                f"{obs.target}: server certificate is not trusted: it is self-signed "
                f"({cert.subject.rfc4514_string()}), and not in {trust}"
            )
            set_ca = f"set ca_file for route {obs.route} to that certificate, if you trust it"
        else:
            message = (
                f"{obs.target}: server certificate is not trusted: issued by {cert.issuer.rfc4514_string()}, "
                f"which is not in {trust}"
            )
        return CheckResult(False, SERVER_UNTRUSTED, message, set_ca, details)
    return CheckResult(
        False,
        SERVER_UNTRUSTED,
        f"{obs.target}: server certificate failed verification: {detail}",
        "have the server's certificate fixed (it must be a valid serverAuth certificate from a CA in "
        f"{trust}), or {set_ca}",
        details,
    )


def _name_mismatch(
    obs: Observation, cert: x509.Certificate | None, detail: str, details: dict[str, Any]
) -> CheckResult:
    expected = obs.server_name
    what = "the IP address" if is_ip_address(expected) else "the name"
    head = f'{obs.target} does not hold {what} "{expected}"'
    if cert is None:
        return CheckResult(
            False,
            NAME_MISMATCH,
            f"{head} ({detail})",
            f"set server_name for route {obs.route} to a name the server's certificate holds, "
            "or have the certificate reissued",
            details,
        )
    names = [n for n in certificate_names(cert) if n.startswith(("DNS:", "IP:"))]
    if names:
        return CheckResult(
            False,
            NAME_MISMATCH,
            f"{head}: its certificate names {', '.join(names)}",
            f"set server_name for route {obs.route} to one of those names, or have the server certificate "
            f"reissued for {expected}",
            details,
        )
    cn = _common_names(cert)
    only = f"only CN={cn[0]}" if cn else "not even a subject CN"
    return CheckResult(
        False,
        NAME_MISMATCH,
        f"{head}: its certificate has no SANs, {only}",
        f"have the server certificate reissued with a subjectAltName for {expected} "
        "(the subject CN is never checked, per RFC 6125)",
        details,
    )


def _alert(obs: Observation, failure: Fault, cause: Cause, details: dict[str, Any]) -> CheckResult:
    alert = failure.alert
    details["alert"] = alert
    after = " after the handshake" if failure.stage == "after_handshake" else ""
    whose = f"{obs.identity}'s"
    if alert == "no application protocol":
        return CheckResult(
            False,
            ALPN_REFUSED,
            f"{obs.target} accepts none of the ALPN protocols we offered ({', '.join(obs.alpn_offered) or 'none'}) "
            f"(TLS alert: {alert})",
            f"set alpn for route {obs.route} to a protocol the server speaks, or remove it",
            details,
        )
    if alert == "protocol version":
        return CheckResult(
            False,
            TLS_ERROR,
            f"{obs.target} and we share no TLS version: we need TLS 1.2 or later (TLS alert: {alert})",
            "the server must be upgraded to TLS 1.2 or later",
            details,
        )
    if alert not in REJECTING_ALERTS:
        return CheckResult(
            False,
            TLS_ERROR,
            f"{obs.target} ended the TLS connection{after} with alert: {alert}",
            f"look in the server's log for why; `openssl s_client -connect {obs.target} "
            f"-servername {obs.server_name}` shows more",
            details,
        )
    client = obs.client_cert
    subject = client.subject.rfc4514_string() if client is not None else "(none)"
    issuer = client.issuer.rfc4514_string() if client is not None else "(none)"
    head = f"{obs.target} rejected {whose} certificate{after} (TLS alert: {alert})"
    if alert == "unknown ca":
        message = f"{head}: the server does not trust the issuer of {whose} certificate, {issuer}"
        fix = f"have {obs.identity}'s certificate issued by a CA the server trusts, or add {issuer} to its client CAs"
    elif alert == "certificate required":
        message = f"{head}: it wants a client certificate and did not take {subject}"
        fix = f"check which client CAs the server accepts and that {obs.identity}'s certificate is issued by one"
    elif alert == "certificate expired":
        message = f"{head}: the server considers {subject} (or its chain) expired"
        fix = f"{_renew_hint(obs)}, and compare the server's clock with this machine's"
    elif alert == "certificate revoked":
        message = f"{head}: {subject} (serial {_serial(client)}) is revoked"
        fix = _renew_hint(obs, " to get a new certificate")
    elif alert == "access denied":
        message = f"{head}: it accepted {subject} but does not let it in"
        fix = f"ask the service's owner to allow {subject}, or use another identity for route {obs.route}"
    elif alert == "handshake failure":
        message = f"{head}: most often it does not accept {subject} (issued by {issuer}), or shares no cipher with us"
        fix = "look in the server's log for which; check that it trusts " + issuer
    else:
        message = f"{head}: {subject}, issued by {issuer}"
        fix = (
            f"check that the server trusts {issuer} and that {obs.identity}'s certificate allows clientAuth; "
            "the server's log says why"
        )
    elsewhere = _issuers_elsewhere(obs)
    if elsewhere is not None and alert not in ("certificate expired", "certificate revoked", "access denied"):
        message = f"{message}; {elsewhere}"
        fix = _issuers_fix(obs)
    return CheckResult(False, SERVER_REJECTED_CERT, message, fix, details)


def http_refusal(obs: Observation) -> str | None:
    """The server's words when its HTTP answer says it does not take our certificate."""
    if obs.http_status is None:
        return None
    parts = obs.http_status.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    reason = parts[2] if len(parts) > 2 else ""
    return http_certificate_refusal(int(parts[1]), reason.encode("latin-1", "replace"), obs.http_body)


def _http_rejected(obs: Observation, words: str, details: dict[str, Any]) -> CheckResult:
    """The handshake passed, and the HTTP server then said it does not take our certificate
    (nginx verifies client certificates after the handshake and answers 400)."""
    details["stage"] = "after_handshake"
    details["http_host"] = obs.http_host
    details["http_status"] = obs.http_status
    details["http_says"] = words
    client = obs.client_cert
    subject = client.subject.rfc4514_string() if client is not None else "(none)"
    issuer = client.issuer.rfc4514_string() if client is not None else "(none)"
    head = (
        f"{obs.target} completed the TLS handshake ({obs.tls_version}), then answered {obs.http_method} / "
        f'with "{obs.http_status}": "{words}"'
    )
    if "no required" in words.lower() or " 496" in f" {obs.http_status}":
        message = f"{head}: it says it got no client certificate, though {obs.identity}'s {subject} was presented"
        fix = (
            f"check that the server asks for client certificates for {obs.server_name} (nginx: ssl_verify_client "
            "in the server block that this SNI selects); its error log says why"
        )
        return CheckResult(False, SERVER_REJECTED_CERT_HTTP, message, fix, details)
    message = f"{head}: it does not accept {obs.identity}'s certificate {subject}, issued by {issuer}"
    elsewhere = _issuers_elsewhere(obs)
    if elsewhere is not None:
        return CheckResult(False, SERVER_REJECTED_CERT_HTTP, f"{message}; {elsewhere}", _issuers_fix(obs), details)
    fix = (
        f"check that the server's client CAs (nginx: ssl_client_certificate) hold {issuer} or a CA above it, "
        f"and that {obs.identity}'s certificate allows clientAuth; the server's error log says why"
    )
    return CheckResult(False, SERVER_REJECTED_CERT_HTTP, message, fix, details)


def issuers_accepted(obs: Observation) -> bool | None:
    """Whether the server's list of acceptable issuers holds one of ours (the issuer of our
    certificate, or a CA of the chain we present); None when no list was seen or it is empty."""
    if not obs.acceptable_issuers or obs.client_cert is None:
        return None
    ours = {obs.client_cert.issuer} | {c.issuer for c in obs.client_chain} | {c.subject for c in obs.client_chain}
    return any(name in ours for name in obs.acceptable_issuers)


def _issuers_elsewhere(obs: Observation) -> str | None:
    """'The server asks for a certificate from X; identity dev presents one from Y', when ours is not among X."""
    if issuers_accepted(obs) is not False:
        return None
    assert obs.acceptable_issuers is not None and obs.client_cert is not None
    return (
        f"the server asks for a certificate from {_names(obs.acceptable_issuers)}; identity {obs.identity} "
        f"presents one from {short_name(obs.client_cert.issuer)}"
    )


def _issuers_fix(obs: Observation) -> str:
    assert obs.acceptable_issuers and obs.client_cert is not None
    return (
        f"present a certificate from {_names(obs.acceptable_issuers)} on route {obs.route} (another identity, "
        f"or one issued to {obs.identity} by that CA), or have the server's client CAs include "
        f"{short_name(obs.client_cert.issuer)}"
    )


def short_name(name: x509.Name) -> str:
    """A CA's common name ("Example Corp Issuing CA 1"), else its whole RFC 4514 name."""
    cn = [str(a.value) for a in name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    return cn[-1] if cn else (name.rfc4514_string() or "(empty name)")


def _names(names: tuple[x509.Name, ...]) -> str:
    shown = [short_name(n) for n in names[:3]]
    if len(names) > 3:
        shown.append(f"{len(names) - 3} other CA{'s' if len(names) > 4 else ''}")
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


def _renew_hint(obs: Observation, why: str = "") -> str:
    """What gets the identity a new certificate: `renew`, unless its renew setting is "none"."""
    if obs.renew == "none":
        return (
            f"get a new certificate for {obs.identity} from its issuer and add it with "
            f"`mtls-sidecar identity import FILE --name {obs.identity}` "
            f'({obs.identity} has renew = "none": the sidecar does not renew it)'
        )
    return f"run `mtls-sidecar renew {obs.identity}`{why}"


def _details(obs: Observation) -> dict[str, Any]:
    details: dict[str, Any] = {
        "route": obs.route,
        "target": obs.target,
        "expected_name": obs.server_name,
        "identity": obs.identity,
        "trust": _trust(obs),
        "alpn_offered": list(obs.alpn_offered),
        "timeout": obs.timeout,
        "checked_at": rfc3339(obs.now),
        "warnings": [obs.identity_warning] if obs.identity_warning else [],
    }
    if obs.client_cert is not None:
        details["client_certificate"] = {
            "subject": obs.client_cert.subject.rfc4514_string(),
            "issuer": obs.client_cert.issuer.rfc4514_string(),
            "serial": _serial(obs.client_cert),
            "not_before": rfc3339(obs.client_cert.not_valid_before_utc),
            "not_after": rfc3339(obs.client_cert.not_valid_after_utc),
            "file": obs.client_file,
        }
    if obs.acceptable_issuers is not None:
        details["acceptable_issuers"] = [n.rfc4514_string() for n in obs.acceptable_issuers]
    elif obs.acceptable_issuers_unknown is not None:
        details["acceptable_issuers_unknown"] = obs.acceptable_issuers_unknown
    if obs.address is not None:
        details["address"] = obs.address
    if obs.upstream_proxy is not None:
        details["upstream_proxy"] = obs.upstream_proxy
    if obs.failure is not None:
        details["stage"] = obs.failure.stage
        if obs.failure.ssl_reason:
            details["openssl_reason"] = obs.failure.ssl_reason
    if obs.first_bytes and not looks_like_tls(obs.first_bytes):
        details["first_bytes"] = printable(obs.first_bytes)
    if obs.tls_version is not None:
        details["tls_version"] = obs.tls_version
        details["cipher"] = obs.cipher
        details["alpn"] = obs.alpn
    if obs.server_cert is not None:
        details["server_certificate"] = describe_server_certificate(obs.server_cert, verified=obs.server_cert_verified)
    if obs.probe_error is not None:
        details["probe_error"] = obs.probe_error
    return details


def describe_server_certificate(cert: x509.Certificate, *, verified: bool) -> dict[str, Any]:
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "sans": certificate_names(cert),
        "not_before": rfc3339(cert.not_valid_before_utc),
        "not_after": rfc3339(cert.not_valid_after_utc),
        "serial": _serial(cert),
        "verified": verified,
    }


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The subjectAltName entries as "DNS:…", "IP:…", "URI:…", "email:…"."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    names = [f"DNS:{n}" for n in sans.get_values_for_type(x509.DNSName)]
    names += [f"IP:{n}" for n in sans.get_values_for_type(x509.IPAddress)]
    names += [f"URI:{n}" for n in sans.get_values_for_type(x509.UniformResourceIdentifier)]
    names += [f"email:{n}" for n in sans.get_values_for_type(x509.RFC822Name)]
    return names


def _common_names(cert: x509.Certificate) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]


def _trust(obs: Observation) -> dict[str, Any]:
    if obs.skip_verify:
        return {"source": "none (unsafe_skip_verify)", "path": None}
    if obs.ca_file is not None:
        return {"source": "ca_file", "path": str(obs.ca_file)}
    if obs.ca_dir is not None:
        return {"source": "ca_dir", "path": str(obs.ca_dir)}
    return {"source": "system", "path": None}


def _trust_where(obs: Observation) -> str:
    if obs.ca_file is not None:
        return str(obs.ca_file)
    if obs.ca_dir is not None:
        return str(obs.ca_dir)
    return "the system trust store"


def _serial(cert: x509.Certificate | None) -> str:
    return f"{cert.serial_number:x}" if cert is not None else ""


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def is_ip_address(host: str) -> bool:
    """An IP literal (brackets allowed, as in "[::1]"), not a DNS name."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True
