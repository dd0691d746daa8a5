"""`check` cannot say OK when the server refuses our certificate, in any of the ways servers do.

- nginx completes TLS and answers HTTP 400 "The SSL certificate error": `check` asks HTTP
  targets, reads the answer, and fails with `server_rejected_certificate_http`; the tunnel
  counts the same answer on an `http` route under the same key.
- `openssl s_server -verify_return_error` ends TLS with an alert (with TLS 1.3 only after our
  side of the handshake): still `server_rejected_certificate`.
- Both name the issuers the server's CertificateRequest asks for, when ours is not among them.
- The presented client certificate is named in text and JSON; a fix never says `renew` for an
  identity with `renew = "none"`.

Real servers first, then `explain()`, the http stage and the parsers fed by hand.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from sidecar.causes import Cause, Fault, cause_of, http_certificate_refusal
from sidecar.check.dername import name_from_der
from sidecar.check.explain import CAUSES, CheckResult, Observation, explain
from sidecar.check.observe import check_route, is_http_target
from sidecar.cli import main
from sidecar.cli.control import presented_line
from sidecar.config import ListenAddress, RouteSpec
from sidecar.credentials import Secrets
from sidecar.keystore import Selection, read_identity_folder, select
from sidecar.protocols.http import HTTPStage
from sidecar.stages import Close, Command, Count, SendLocal, SendRemote, StartTLS
from tests.daemon_runner import DaemonThread
from tests.pki import CA, now
from tests.realservers import nginx_mtls, openssl_s_server
from tests.scenario import Pki, curl, write_config
from tests.scenario import route_to as config_route

CORP = "Example Corp Issuing CA 1"
NGINX_400 = (
    b"<html>\r\n<head><title>400 The SSL certificate error</title></head>\r\n<body>\r\n"
    b"<center><h1>400 Bad Request</h1></center>\r\n<center>The SSL certificate error</center>\r\n"
    b"<hr><center>nginx/1.22.1</center>\r\n</body>\r\n</html>\r\n"
)
NGINX_NO_CERT = NGINX_400.replace(b"The SSL certificate error", b"No required SSL certificate was sent")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


@pytest.fixture
def corp_ca(tmp_path: Path) -> Path:
    """A client CA that is not ours: what the server trusts and names in its CertificateRequest."""
    return CA(CORP).write_root(tmp_path / "corp-ca.pem")


@pytest.fixture
def dev(pki: Pki, tmp_path: Path) -> Selection:
    pki.enroll(tmp_path / "keystore", "dev", "dev-1")
    selection = select("dev", read_identity_folder(tmp_path / "keystore" / "dev", Secrets()), now())
    assert selection.selected is not None
    return selection


def route_to(pki: Pki, port: int, **extra: Any) -> RouteSpec:
    fields: dict[str, Any] = {
        "name": "api",
        "listen": ListenAddress("tcp", "127.0.0.1", 0),
        "target_host": "127.0.0.1",
        "target_port": port,
        "server_name": "localhost",
        "ca_file": pki.server_ca_file,
        "connect_timeout": 5.0,
        **extra,
    }
    return RouteSpec(**fields)


def check(route: RouteSpec, selection: Selection, **kwargs: Any) -> CheckResult:
    async def bounded() -> CheckResult:
        async with asyncio.timeout(30):
            return await check_route(route, selection, **kwargs)

    result = asyncio.run(bounded())
    assert result.cause in CAUSES
    assert "\n" not in result.message and (result.fix is None or "\n" not in result.fix)
    json.dumps(result.to_json())
    return result


WANTS_CORP = (
    f"the server asks for a certificate from {CORP}; identity dev presents one from Test Client CA Intermediate"
)


# --- nginx: TLS passes, HTTP says no ----------------------------------------------------------


@pytest.mark.parametrize("protocols", ["TLSv1.2", "TLSv1.2 TLSv1.3", "TLSv1.3"])
@pytest.mark.parametrize("how", ["http route", "tcp route with ALPN http/1.1"])
def test_nginx_that_does_not_trust_our_issuer_fails_check_with_the_http_cause(
    pki: Pki, dev: Selection, corp_ca: Path, tmp_path: Path, protocols: str, how: str
) -> None:
    extra: dict[str, Any] = {"protocol": "http"} if how == "http route" else {"alpn": ("http/1.1",)}
    with nginx_mtls(
        tmp_path / "nginx",
        server_cert=pki.server_cert,
        server_key=pki.server_key,
        client_ca=corp_ca,
        protocols=protocols,
    ) as nginx:
        result = check(route_to(pki, nginx.port, **extra), dev)
    assert not result.ok and result.cause == "server_rejected_certificate_http", result
    details = result.details
    assert details["tls_version"] == ("TLSv1.2" if protocols == "TLSv1.2" else "TLSv1.3")
    # HEAD's 400 has no body: a GET on a new connection read nginx's reason
    assert details["http_status"] == "HTTP/1.1 400 Bad Request"
    assert details["http_says"] == "The SSL certificate error"
    assert details["acceptable_issuers"] == [f"CN={CORP}"]  # read for TLS 1.3 too (encrypted there)
    assert result.message == (
        f"127.0.0.1:{nginx.port} completed the TLS handshake ({details['tls_version']}), then answered GET / "
        f'with "HTTP/1.1 400 Bad Request": "The SSL certificate error": it does not accept dev\'s certificate '
        f"CN=dev, issued by CN=Test Client CA Intermediate; {WANTS_CORP}"
    )
    assert result.fix == (
        f"present a certificate from {CORP} on route api (another identity, or one issued to dev by that CA), "
        "or have the server's client CAs include Test Client CA Intermediate"
    )
    assert details["client_certificate"]["subject"] == "CN=dev"
    assert details["client_certificate"]["issuer"] == "CN=Test Client CA Intermediate"


def test_nginx_that_trusts_our_issuer_is_ok_and_shows_its_answer(pki: Pki, dev: Selection, tmp_path: Path) -> None:
    with nginx_mtls(
        tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.client_ca_file
    ) as nginx:
        result = check(route_to(pki, nginx.port, protocol="http"), dev)
    assert result.ok and result.cause == "ok", result
    assert result.message.endswith(f'; HEAD / with Host: localhost:{nginx.port} → "HTTP/1.1 200 OK"')
    assert "acceptable_issuers" not in result.details  # asked only after a refusal


def test_a_route_to_port_443_is_an_http_target_and_other_tcp_routes_are_not(pki: Pki) -> None:
    assert is_http_target(route_to(pki, 443))
    assert is_http_target(route_to(pki, 8443))
    assert is_http_target(route_to(pki, 9000, alpn=("h2",)))
    assert is_http_target(route_to(pki, 9000, protocol="http"))
    assert not is_http_target(route_to(pki, 9000))
    assert not is_http_target(route_to(pki, 443, protocol="postgres"))


# --- openssl s_server: the TLS alert ------------------------------------------------------------


@pytest.mark.parametrize(("tls", "stage"), [("1.3", "after_handshake"), ("1.2", "handshake")])
def test_openssl_s_server_verify_return_error_is_still_the_tls_alert_cause(
    pki: Pki, dev: Selection, corp_ca: Path, tmp_path: Path, tls: str, stage: str
) -> None:
    """On an http route too: the alert arrives before (or instead of) any HTTP answer."""
    with openssl_s_server(
        tmp_path / "s_server", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=corp_ca, tls=tls
    ) as server:
        result = check(route_to(pki, server.port, protocol="http"), dev)
    assert not result.ok and result.cause == "server_rejected_certificate", result
    assert result.details["alert"] == "unknown ca"
    assert result.details["stage"] == stage
    assert result.details["acceptable_issuers"] == [f"CN={CORP}"]
    assert result.message.endswith(
        f"(TLS alert: unknown ca): the server does not trust the issuer of dev's certificate, "
        f"CN=Test Client CA Intermediate; {WANTS_CORP}"
    )
    assert result.fix is not None and result.fix.startswith(f"present a certificate from {CORP} on route api")


def test_an_issuer_the_server_asks_for_through_our_intermediate_is_not_called_wrong(pki: Pki, tmp_path: Path) -> None:
    """nginx names our root; we present a leaf from its intermediate: that is among them."""
    expired = pki.client_ca.client("dev", not_before=now() - timedelta(days=9), not_after=now() - timedelta(days=2))
    expired.write_pair(tmp_path / "stale", "dev")
    # OpenSSL's client sends what it has; nginx then says the certificate is bad: not the issuer's fault.
    stale = Selection("dev", read_identity_folder(tmp_path / "stale", Secrets())[0], (), now())
    with nginx_mtls(
        tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.client_ca_file
    ) as nginx:
        result = check(route_to(pki, nginx.port, protocol="http"), stale)
    assert result.cause == "server_rejected_certificate_http", result
    assert result.details["acceptable_issuers"] == ["CN=Test Client CA"]
    assert "asks for a certificate from" not in result.message
    assert result.message.endswith(
        "it does not accept dev's certificate CN=dev, issued by CN=Test Client CA Intermediate"
    )
    assert "ssl_client_certificate" in (result.fix or "")


# --- through the daemon: the tunnel counts it, check agrees, the CLI names the certificate --------


def test_the_tunnel_counts_nginx_400_like_check_and_the_cli_names_the_presented_certificate(
    pki: Pki, corp_ca: Path, isolated_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    with nginx_mtls(
        tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=corp_ca
    ) as nginx:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={"api": config_route(pki, nginx.port, protocol="http")},
        )
        with DaemonThread(config) as daemon:
            answer = curl(daemon.port("api"), "/", "-i")
            status = daemon.status()["routes"]["api"]
            assert main(["check", "api"]) == 1
            text = capsys.readouterr().out
            assert main(["check", "api", "--json"]) == 1
            checked = json.loads(capsys.readouterr().out)
            after = daemon.status()["routes"]["api"]
    # The client gets nginx's own answer, untouched.
    assert answer.stdout.startswith("HTTP/1.1 400 Bad Request\n"), answer
    assert "The SSL certificate error" in answer.stdout
    assert "Mtls-Sidecar-Cause" not in answer.stdout
    assert status["failures"] == {"server_rejected_certificate_http": 1}, status
    # the handshake passed and nginx answered, but the route does not work: failing, not ok
    assert status["health"] == "failing" and status["last_success"] is None, status
    assert 'answered HTTP 400 "The SSL certificate error"' in str(status["last_error"])
    assert checked["cause"] == "server_rejected_certificate_http"
    assert after["failures"] == status["failures"]  # check's own connections are not the route's
    lines = text.splitlines()
    assert lines[0].startswith("problem: ") and WANTS_CORP in lines[0]
    assert lines[1].startswith("presented: dev's CN=dev, issued by CN=Test Client CA Intermediate, expires in ")
    assert lines[1].endswith(f"from {isolated_home / 'keystore' / 'dev' / 'dev-1.crt'}")
    assert lines[2].startswith(f"fix: present a certificate from {CORP}")


def test_a_renew_none_identity_is_never_told_to_renew(
    pki: Pki, isolated_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its only certificate expired: check through the daemon names the way in, not `renew`."""
    keystore = isolated_home / "keystore"
    pki.enroll(keystore, "corp", "corp-1", not_before=now() - timedelta(days=9), not_after=now() - timedelta(days=2))
    config = write_config(
        isolated_home / "config.toml",
        identities={"corp": {"renew": "none"}},
        active="corp",
        routes={"api": config_route(pki, 9)},
    )
    with DaemonThread(config):
        assert main(["check", "api", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["cause"] == "no_usable_certificate"
    assert "mtls-sidecar renew" not in result["fix"]
    assert result["fix"].endswith(
        "or get a new certificate for corp from its issuer and add it with "
        '`mtls-sidecar identity import FILE --name corp` (corp has renew = "none": the sidecar does not renew it)'
    )


# --- explain(), no sockets ----------------------------------------------------------------------

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CLIENT_CA = CA("Client CA", with_intermediate=True)
CLIENT = CLIENT_CA.client("dev", not_before=NOW - timedelta(days=1))
CORP_NAME = x509.Name(
    [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Corp"), x509.NameAttribute(NameOID.COMMON_NAME, CORP)]
)


def observation(**fields: Any) -> Observation:
    base: dict[str, Any] = {
        "route": "api",
        "host": "api.example.test",
        "port": 443,
        "server_name": "api.example.test",
        "identity": "dev",
        "now": NOW,
        "timeout": 10.0,
        "client_cert": CLIENT.cert,
        "client_chain": tuple(CLIENT.chain),
        "address": "192.0.2.10:443",
        "tls_version": "TLSv1.3",
        "cipher": "TLS_AES_128_GCM_SHA256",
        "after_handshake": "data",
        "http_host": "api.example.test",
    }
    base.update(fields)
    return Observation(**base)


@pytest.mark.parametrize(
    ("status", "reason", "body", "words"),
    [
        (400, b"Bad Request", NGINX_400, "The SSL certificate error"),
        (400, b"Bad Request", NGINX_NO_CERT, "No required SSL certificate was sent"),
        (400, b"Bad Request", b"", None),  # HEAD: nothing says why
        (400, b"Bad Request", b"<h1>Bad Request</h1>missing parameter", None),
        (
            403,
            b"Forbidden",
            b"client certificate CN=dev is not allowed here\n",
            "client certificate CN=dev is not allowed here",
        ),
        (403, b"Forbidden", b"<h1>Forbidden</h1>", None),
        (495, b"SSL Certificate Error", b"", "SSL Certificate Error"),
        (496, b"", b"", "HTTP 496"),
        (200, b"OK", b"all about certificates", None),
        (404, b"Not Found", b"no certificate here", None),
    ],
)
def test_which_http_answers_name_the_certificate(status: int, reason: bytes, body: bytes, words: str | None) -> None:
    assert http_certificate_refusal(status, reason, body) == words


def test_the_http_refusal_is_a_cause_of_its_own() -> None:
    assert (
        cause_of(Fault("established", "http_refused", "The SSL certificate error")) == Cause.SERVER_REJECTED_CERT_HTTP
    )
    assert Cause.SERVER_REJECTED_CERT_HTTP.value == "server_rejected_certificate_http"
    assert Cause.SERVER_REJECTED_CERT_HTTP in CAUSES


def test_explain_an_http_refusal_with_the_issuers_the_server_wants() -> None:
    result = explain(
        observation(
            http_status="HTTP/1.1 400 Bad Request", http_method="GET", http_body=NGINX_400,
            acceptable_issuers=(CORP_NAME,),
        )
    )  # fmt: skip
    assert not result.ok and result.cause == "server_rejected_certificate_http"
    assert result.message == (
        'api.example.test:443 completed the TLS handshake (TLSv1.3), then answered GET / with "HTTP/1.1 400 Bad '
        'Request": "The SSL certificate error": it does not accept dev\'s certificate CN=dev, issued by CN=Client '
        f"CA Intermediate; the server asks for a certificate from {CORP}; identity dev presents one from Client CA "
        "Intermediate"
    )
    assert result.details["acceptable_issuers"] == [f"CN={CORP},O=Example Corp"]
    assert result.details["http_says"] == "The SSL certificate error"
    assert result.details["stage"] == "after_handshake"


@pytest.mark.parametrize(
    ("issuers", "named"),
    [
        ((), False),  # the server names none: any issuer may do
        (None, False),  # not seen
        ((x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Client CA")]),), False),  # our root, via the chain
        ((x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Client CA Intermediate")]),), False),  # our issuer
        ((CORP_NAME, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "B")])), True),
    ],
)
def test_the_issuers_sentence_only_when_ours_is_not_among_them(
    issuers: tuple[x509.Name, ...] | None, named: bool
) -> None:
    result = explain(
        observation(http_status="HTTP/1.1 400 Bad Request", http_body=NGINX_400, acceptable_issuers=issuers)
    )
    assert ("the server asks for a certificate from" in result.message) is named, result.message
    if named:
        assert result.message.endswith(f"from {CORP} or B; identity dev presents one from Client CA Intermediate")


def test_explain_a_tls_alert_with_the_issuers_the_server_wants() -> None:
    failure = Fault("after_handshake", "tls", "alert", "TLSV13_ALERT_CERTIFICATE_REQUIRED")
    result = explain(observation(failure=failure, acceptable_issuers=(CORP_NAME,), after_handshake=None))
    assert result.cause == "server_rejected_certificate"
    assert result.message.endswith(
        f"it wants a client certificate and did not take CN=dev; the server asks for a certificate from {CORP}; "
        "identity dev presents one from Client CA Intermediate"
    )
    expired = Fault("after_handshake", "tls", "alert", "SSLV3_ALERT_CERTIFICATE_EXPIRED")
    result = explain(observation(failure=expired, acceptable_issuers=(CORP_NAME,), after_handshake=None))
    assert "asks for a certificate from" not in result.message  # an expiry is not about the issuer


def test_explain_a_server_that_says_it_got_no_certificate() -> None:
    result = explain(observation(http_status="HTTP/1.1 400 Bad Request", http_method="GET", http_body=NGINX_NO_CERT))
    assert result.cause == "server_rejected_certificate_http"
    assert result.message.endswith(
        ': "No required SSL certificate was sent": it says it got no client certificate, '
        "though dev's CN=dev was presented"
    )
    assert "ssl_verify_client in the server block that this SNI selects" in (result.fix or "")


def test_explain_a_400_without_words_about_the_certificate_stays_ok() -> None:
    result = explain(observation(http_status="HTTP/1.1 400 Bad Request", http_method="GET", http_body=b"bad query"))
    assert result.ok and result.message.endswith('; GET / with Host: api.example.test → "HTTP/1.1 400 Bad Request"')


@pytest.mark.parametrize("renew", ["none", "local-ca", None])
@pytest.mark.parametrize(
    "case",
    [
        {"client_cert": None, "unusable": "identity 'dev' has no usable certificate"},
        {"failure": Fault("setup", "credential", "key values mismatch")},
        {"failure": Fault("handshake", "tls", "alert", "SSLV3_ALERT_CERTIFICATE_EXPIRED")},
        {"failure": Fault("handshake", "tls", "alert", "SSLV3_ALERT_CERTIFICATE_REVOKED")},
    ],
)
def test_a_fix_never_says_renew_for_renew_none(case: dict[str, Any], renew: str | None) -> None:
    result = explain(observation(renew=renew, http_host=None, after_handshake=None, **case))
    assert result.fix is not None
    if renew == "none":
        assert "mtls-sidecar renew" not in result.fix, result.fix
        assert "`mtls-sidecar identity import FILE --name dev`" in result.fix
        assert 'dev has renew = "none"' in result.fix
    else:
        assert "run `mtls-sidecar renew dev`" in result.fix, result.fix


def test_details_name_the_presented_certificate_and_the_cli_prints_it() -> None:
    result = explain(observation(client_file="/home/me/keystore/dev/dev-1.crt", http_host=None))
    presented = result.details["client_certificate"]
    assert presented == {
        "subject": "CN=dev",
        "issuer": "CN=Client CA Intermediate",
        "serial": f"{CLIENT.cert.serial_number:x}",
        "not_before": CLIENT.cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "not_after": CLIENT.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "file": "/home/me/keystore/dev/dev-1.crt",
    }
    at = CLIENT.cert.not_valid_after_utc - timedelta(days=6, hours=1)
    assert presented_line(result.to_json(), at) == (
        f"presented: dev's CN=dev, issued by CN=Client CA Intermediate, expires in 6 days ({presented['not_after']}) "
        "from /home/me/keystore/dev/dev-1.crt"
    )
    assert presented_line({"ok": False, "details": {}}) is None  # nothing presented (no usable certificate)


# --- the http stage: the tunnel's side ------------------------------------------------------------

LOCAL = ListenAddress("tcp", "127.0.0.1", 18080)


def stage() -> HTTPStage:
    route = RouteSpec(
        name="api",
        listen=LOCAL,
        target_host="10.1.2.3",
        target_port=443,
        server_name="api.internal.test",
        protocol="http",
    )
    s = HTTPStage(route, LOCAL)
    assert s.connected() == [StartTLS()] and s.tls_established() == []
    return s


def answer(status: bytes, body: bytes, *, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n" % len(body) + extra + b"\r\n" + body


def counts(commands: list[Command]) -> list[Count]:
    return [c for c in commands if isinstance(c, Count)]


def passed_on(commands: list[Command]) -> bytes:
    return b"".join(c.data for c in commands if isinstance(c, SendLocal))


def test_nginx_400_is_counted_and_passed_on_untouched() -> None:
    s = stage()
    assert isinstance(s.from_local(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")[0], SendRemote)
    raw = answer(b"400 Bad Request", NGINX_400, extra=b"Connection: close\r\n")
    commands = s.from_remote(raw)
    [count] = counts(commands)
    assert cause_of(count.fault) == Cause.SERVER_REJECTED_CERT_HTTP
    assert count.message == (
        '10.1.2.3:443 answered HTTP 400 "The SSL certificate error": it does not take our client certificate'
    )
    assert passed_on(commands).endswith(NGINX_400)
    assert isinstance(commands[-1], Close)  # nginx said Connection: close, as it does


def test_a_reason_split_over_pieces_of_the_body_is_still_read() -> None:
    s = stage()
    s.from_local(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    raw = answer(b"400 Bad Request", NGINX_400)
    cut = raw.index(b"SSL certificate") + 5
    assert counts(s.from_remote(raw[:cut])) == []
    assert len(counts(s.from_remote(raw[cut:]))) == 1


@pytest.mark.parametrize(
    ("request_line", "status", "body", "counted"),
    [
        (b"GET", b"495 SSL Certificate Error", b"", True),
        (b"HEAD", b"496 SSL Certificate Required", b"", True),
        (b"HEAD", b"400 Bad Request", b"", False),  # no body to say why: not counted
        (b"GET", b"403 Forbidden", b"<h1>Forbidden</h1>", False),
        (b"GET", b"400 Bad Request", b"x" * 5000 + b"certificate", False),  # only the start is read
        (b"GET", b"200 OK", b"certificate", False),
    ],
)
def test_which_answers_the_stage_counts(request_line: bytes, status: bytes, body: bytes, counted: bool) -> None:
    s = stage()
    s.from_local(request_line + b" / HTTP/1.1\r\nHost: x\r\n\r\n")
    raw = answer(status, b"" if request_line == b"HEAD" else body)
    assert bool(counts(s.from_remote(raw))) is counted


def test_a_kept_alive_connection_counts_once() -> None:
    s = stage()
    for _ in range(3):
        s.from_local(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        commands = s.from_remote(answer(b"403 Forbidden", b"client certificate not allowed"))
        assert passed_on(commands).endswith(b"client certificate not allowed")
        seen = counts(commands)
        if _ == 0:
            assert len(seen) == 1
        else:
            assert seen == []


# --- distinguished names as OpenSSL hands them over ----------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        CORP_NAME,
        x509.Name(
            [x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"), x509.NameAttribute(NameOID.COMMON_NAME, "Zürich CA")]
        ),
        x509.Name(
            [
                x509.RelativeDistinguishedName(
                    [
                        x509.NameAttribute(NameOID.COMMON_NAME, "a"),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "b"),
                    ]
                ),
                x509.RelativeDistinguishedName([x509.NameAttribute(x509.ObjectIdentifier("2.999.5"), "x")]),
            ]
        ),
        x509.Name([]),
    ],
)
def test_a_name_read_from_der_is_the_name(name: x509.Name) -> None:
    read = name_from_der(name.public_bytes())
    assert read == name and read.rfc4514_string() == name.rfc4514_string()


@pytest.mark.parametrize(
    "der",
    [
        b"",
        b"\x30",
        b"\x31\x00",
        b"\x30\x03\x31\x01\x00",
        b"\x30\x05\x31\x03\x30\x01\x06",
        CORP_NAME.public_bytes()[:-1],
    ],
)
def test_a_malformed_name_is_a_value_error(der: bytes) -> None:
    with pytest.raises(ValueError):
        name_from_der(der)
