"""`check ROUTE`: every failure produced by a real server set up to misbehave, then explained.

The first half connects over loopback to nginx or the scripted TLS server; the second half
feeds `explain()` hand-made observations, no sockets.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from sidecar.causes import Fault as Failed
from sidecar.causes import alert_name, printable
from sidecar.check.explain import CAUSES, CheckResult, Observation, explain
from sidecar.check.observe import certificate_from_tls12_flight, check_route
from sidecar.config import ListenAddress, RouteSpec, parse_config
from sidecar.credentials import Secrets, candidates_from_files
from sidecar.keystore import Selection, read_identity_folder, select
from tests.pki import CA, Leaf, now
from tests.realservers import free_port, nginx_mtls
from tests.scenario import Pki
from tests.tlsserver import ScriptedTLSServer

TLS12 = ssl.TLSVersion.TLSv1_2
TLS13 = ssl.TLSVersion.TLSv1_3


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


@pytest.fixture
def keystore(tmp_path: Path) -> Path:
    return tmp_path / "keystore"


@pytest.fixture
def dev(pki: Pki, keystore: Path) -> Selection:
    """Identity `dev` with one usable certificate from the client CA (via its intermediate)."""
    pki.enroll(keystore, "dev", "dev-1")
    selection = select("dev", read_identity_folder(keystore / "dev", Secrets()), now())
    assert selection.selected is not None
    return selection


def route_to(pki: Pki | None, port: int, **extra: Any) -> RouteSpec:
    fields: dict[str, Any] = {
        "name": "api",
        "listen": ListenAddress("tcp", "127.0.0.1", 0),
        "target_host": "127.0.0.1",
        "target_port": port,
        "server_name": "localhost",
        "ca_file": pki.server_ca_file if pki is not None else None,
        "connect_timeout": 5.0,
    }
    fields.update(extra)
    return RouteSpec(**fields)


def check(route: RouteSpec, selection: Selection, **kwargs: Any) -> CheckResult:
    async def bounded() -> CheckResult:
        async with asyncio.timeout(30):
            return await check_route(route, selection, **kwargs)

    result = asyncio.run(bounded())
    assert result.cause in CAUSES
    assert "\n" not in result.message and (result.fix is None or "\n" not in result.fix)
    json.dumps(result.to_json())  # JSON-able, all the way down
    return result


def serving(leaf: Leaf, folder: Path, **kwargs: Any) -> ScriptedTLSServer:
    cert, key = leaf.write_pair(folder, "server")
    return ScriptedTLSServer(cert=cert, key=key, **kwargs)


def server_leaf(ca: CA, *names: str, **kwargs: Any) -> Leaf:
    return ca.server(*names, **kwargs)


# --- against real servers --------------------------------------------------------------------


def test_ok_against_nginx_names_version_cipher_and_both_certificates(pki: Pki, dev: Selection, tmp_path: Path) -> None:
    with nginx_mtls(
        tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.client_ca_file
    ) as nginx:
        result = check(route_to(pki, nginx.port), dev)
    assert result.ok and result.cause == "ok" and result.fix is None, result
    details = result.details
    assert details["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert details["cipher"]
    assert details["server_certificate"]["subject"] == "CN=localhost"
    assert details["server_certificate"]["issuer"] == "CN=Test Server CA"
    assert details["server_certificate"]["sans"] == ["DNS:localhost", "IP:127.0.0.1"]
    assert details["server_certificate"]["verified"] is True
    assert details["client_certificate"]["subject"] == "CN=dev"
    assert details["client_certificate"]["issuer"] == "CN=Test Client CA Intermediate"
    assert details["trust"] == {"source": "ca_file", "path": str(pki.server_ca_file)}
    assert details["warnings"] == []
    assert f"127.0.0.1:{nginx.port}: OK: {details['tls_version']}, {details['cipher']}" in result.message
    assert "server CN=localhost, issued by CN=Test Server CA, expires " in result.message
    assert set(result.to_json()) == {"ok", "cause", "message", "fix", "details"}


def test_untrusted_server_names_its_issuer_and_the_trust_in_use(pki: Pki, dev: Selection, tmp_path: Path) -> None:
    rogue_cert, rogue_key = CA("Rogue CA").server("localhost", "127.0.0.1").write_pair(tmp_path / "rogue", "s")
    with nginx_mtls(
        tmp_path / "nginx", server_cert=rogue_cert, server_key=rogue_key, client_ca=pki.client_ca_file
    ) as nginx:
        with_ca_file = check(route_to(pki, nginx.port), dev)
        system = check(route_to(None, nginx.port), dev)
    assert not with_ca_file.ok and with_ca_file.cause == "server_untrusted"
    assert with_ca_file.message == (
        f"127.0.0.1:{nginx.port}: server certificate is not trusted: issued by CN=Rogue CA, "
        f"which is not in {pki.server_ca_file}"
    )
    assert with_ca_file.fix == "set ca_file for route api to the CA that issued the server's certificate"
    assert with_ca_file.details["server_certificate"]["issuer"] == "CN=Rogue CA"
    assert with_ca_file.details["server_certificate"]["verified"] is False
    assert with_ca_file.details["verify_error"]["code"] == 20
    assert system.cause == "server_untrusted"
    assert system.message.endswith("issued by CN=Rogue CA, which is not in the system trust store")
    assert system.details["trust"] == {"source": "system", "path": None}


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_an_untrusted_server_never_sees_our_certificate(
    pki: Pki, dev: Selection, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    """Neither the real handshake (it stops at our verification) nor the probe presents it."""
    rogue = CA("Rogue CA").server("localhost", "127.0.0.1")
    with serving(
        rogue, tmp_path / "rogue", client_ca=pki.client_ca_file, require_client_cert=False, max_version=version
    ) as server:
        result = check(route_to(pki, server.port), dev)
        server.wait_closed(2)
        assert server.peer_certs == [None, None]
    assert result.cause == "server_untrusted"
    assert "issued by CN=Rogue CA" in result.message


def test_self_signed_server_certificate(pki: Pki, dev: Selection, tmp_path: Path) -> None:
    ca = CA("Lonely Server")
    with serving(
        Leaf(ca.root, ca.root_key), tmp_path / "self", client_ca=pki.client_ca_file, require_client_cert=False
    ) as server:
        result = check(route_to(pki, server.port), dev)
    assert result.cause == "server_untrusted"
    assert "it is self-signed (CN=Lonely Server), and not in " in result.message
    assert "set ca_file for route api to that certificate" in (result.fix or "")


def test_wrong_name_lists_the_names_the_certificate_has(pki: Pki, dev: Selection, tmp_path: Path) -> None:
    leaf = server_leaf(pki.server_ca, "other.example.test", "10.1.2.3")
    with serving(leaf, tmp_path / "srv") as server:
        result = check(route_to(pki, server.port), dev)
    assert result.cause == "name_mismatch"
    assert result.message == (
        f'127.0.0.1:{server.port} does not hold the name "localhost": its certificate names '
        "DNS:other.example.test, IP:10.1.2.3"
    )
    assert result.fix == (
        "set server_name for route api to one of those names, or have the server certificate reissued for localhost"
    )
    assert result.details["expected_name"] == "localhost"
    assert result.details["server_certificate"]["sans"] == ["DNS:other.example.test", "IP:10.1.2.3"]


def test_ip_server_name_missing_from_the_certificate(pki: Pki, dev: Selection, tmp_path: Path) -> None:
    with serving(server_leaf(pki.server_ca, "localhost"), tmp_path / "srv") as server:
        result = check(route_to(pki, server.port, server_name="127.0.0.1"), dev)
    assert result.cause == "name_mismatch"
    assert 'does not hold the IP address "127.0.0.1": its certificate names DNS:localhost' in result.message


def test_cn_only_certificate_is_a_name_mismatch_that_says_so(pki: Pki, dev: Selection, tmp_path: Path) -> None:
    leaf = pki.server_ca.issue("localhost", eku=(ExtendedKeyUsageOID.SERVER_AUTH,))  # no SAN at all
    with serving(leaf, tmp_path / "srv") as server:
        result = check(route_to(pki, server.port), dev)
    assert result.cause == "name_mismatch"
    assert result.message.endswith('does not hold the name "localhost": its certificate has no SANs, only CN=localhost')
    assert "reissued with a subjectAltName for localhost" in (result.fix or "")
    assert "never checked" in (result.fix or "")


def test_wrong_name_from_a_tls12_server_that_requires_a_client_certificate(
    pki: Pki, dev: Selection, tmp_path: Path
) -> None:
    """The probe's handshake fails (no client certificate), yet the certificate it sent in clear is read."""
    leaf = server_leaf(pki.server_ca, "other.example.test")
    with serving(
        leaf, tmp_path / "srv", client_ca=pki.client_ca_file, require_client_cert=True, max_version=TLS12
    ) as server:
        result = check(route_to(pki, server.port), dev)
        server.wait_closed(2)
        assert server.peer_certs == [None, None]
        assert len(server.handshake_errors) == 2
    assert result.cause == "name_mismatch"
    assert result.message.endswith("its certificate names DNS:other.example.test")
    assert "probe_error" not in result.details


def test_expired_server_certificate_says_when(pki: Pki, dev: Selection, tmp_path: Path) -> None:
    start = now() - timedelta(days=30)
    leaf = server_leaf(pki.server_ca, "localhost", not_before=start, not_after=start + timedelta(days=27))
    with serving(leaf, tmp_path / "srv") as server:
        result = check(route_to(pki, server.port), dev)
    assert result.cause == "server_certificate_expired"
    ended = leaf.cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC")
    assert result.message == f"127.0.0.1:{server.port}: server certificate CN=localhost expired 3 days ago ({ended})"
    assert "renewed" in (result.fix or "") and "clock" in (result.fix or "")


def test_server_certificate_not_yet_valid_says_when(pki: Pki, dev: Selection, tmp_path: Path) -> None:
    start = now() + timedelta(days=2, hours=1)
    leaf = server_leaf(pki.server_ca, "localhost", not_before=start)
    with serving(leaf, tmp_path / "srv") as server:
        result = check(route_to(pki, server.port), dev)
    assert result.cause == "server_certificate_not_yet_valid"
    assert f"is not valid until {start.strftime('%Y-%m-%d %H:%M UTC')} (in 2 days)" in result.message
    assert "clock" in (result.fix or "")


def test_plaintext_server_shows_what_it_answered(pki: Pki, dev: Selection) -> None:
    with ScriptedTLSServer(cert=None, key=None, mode="plaintext") as server:
        result = check(route_to(pki, server.port), dev)
    assert result.cause == "not_tls"
    assert result.message == f'127.0.0.1:{server.port} is not a TLS server: it answered in plaintext: "HTTP/1.0 200 OK"'
    assert "TLS port" in (result.fix or "")
    assert result.details["first_bytes"] == "HTTP/1.0 200 OK"


def test_stopped_port_is_refused(pki: Pki, dev: Selection) -> None:
    port = free_port()
    result = check(route_to(pki, port), dev)
    assert result.cause == "refused"
    assert result.message.startswith(f"127.0.0.1:{port}: connection refused")
    assert "start the service" in (result.fix or "")


def test_name_that_does_not_resolve(pki: Pki, dev: Selection) -> None:
    result = check(route_to(pki, 443, target_host="nonexistent.invalid"), dev)
    assert result.cause == "dns", result
    assert result.message.startswith("nonexistent.invalid:443: the name nonexistent.invalid does not resolve")
    assert "target for route api" in (result.fix or "")


def test_stalled_server_times_out_within_the_given_timeout(pki: Pki, dev: Selection) -> None:
    with ScriptedTLSServer(cert=pki.server_cert, key=pki.server_key, mode="stall") as server:
        started = time.monotonic()
        result = check(route_to(pki, server.port), dev, timeout=0.5)
        took = time.monotonic() - started
    assert result.cause == "timeout"
    assert result.message == (
        f"127.0.0.1:{server.port} accepted the TCP connection but did not answer our TLS hello within 0.5 s"
    )
    assert "connect_timeout" in (result.fix or "")
    assert took < 5


def test_route_connect_timeout_from_config_is_the_default(pki: Pki, dev: Selection, tmp_path: Path) -> None:
    with ScriptedTLSServer(cert=pki.server_cert, key=pki.server_key, mode="stall") as server:
        config = parse_config(
            f"""
            [identities.dev]
            renew = "none"
            [routes.api]
            listen = "127.0.0.1:0"
            target = "127.0.0.1:{server.port}"
            server_name = "localhost"
            ca_file = "{pki.server_ca_file}"
            connect_timeout = "1500ms"
            """
        )
        result = check(config.routes["api"], dev)
    assert result.cause == "timeout"
    # 1.5 s, not less: under load, resolving 127.0.0.1 in asyncio's thread pool took over 0.3 s
    assert result.message.endswith("within 1.5 s"), result.message


@pytest.mark.parametrize(("version", "stage"), [(TLS13, "after_handshake"), (TLS12, "handshake")])
def test_server_requiring_a_client_ca_we_do_not_chain_to(
    pki: Pki, dev: Selection, tmp_path: Path, version: ssl.TLSVersion, stage: str
) -> None:
    other_ca = CA("Other Client CA").write_root(tmp_path / "other-ca.pem")
    with ScriptedTLSServer(
        cert=pki.server_cert,
        key=pki.server_key,
        client_ca=other_ca,
        require_client_cert=True,
        min_version=version,
        max_version=version,
    ) as server:
        result = check(route_to(pki, server.port), dev)
        server.wait_closed(1)
        # Ours, then check's probe for the issuers the server asks for (presenting nothing).
        assert len(server.handshake_errors) == 2, server.handshake_errors
        assert server.handshake_errors[0].startswith("SSLCertVerificationError")
    assert not result.ok and result.cause == "server_rejected_certificate"
    assert result.details["alert"] == "unknown ca"
    assert result.details["stage"] == stage
    assert result.details["acceptable_issuers"] == []  # Python's server names no issuers: no sentence about them
    assert "(TLS alert: unknown ca)" in result.message
    assert result.message.endswith(
        "the server does not trust the issuer of dev's certificate, CN=Test Client CA Intermediate"
    )
    assert "have dev's certificate issued by a CA the server trusts" in (result.fix or "")


def test_no_usable_certificate_does_not_connect(pki: Pki, keystore: Path) -> None:
    start = now() - timedelta(days=10)
    pki.enroll(keystore, "dev", "old", not_before=start, not_after=start + timedelta(days=7))
    selection = select("dev", read_identity_folder(keystore / "dev", Secrets()), now())
    with ScriptedTLSServer(cert=pki.server_cert, key=pki.server_key) as server:
        result = check(route_to(pki, server.port), selection)
        assert server.connections == 0
    assert result.cause == "no_usable_certificate"
    assert result.message.startswith(f"127.0.0.1:{server.port}: not contacted: identity 'dev' has no usable")
    assert "old.crt: expired 3 days ago" in result.message
    assert str(keystore / "dev") in (result.fix or "")
    assert "mtls-sidecar renew dev" in (result.fix or "")
    assert result.details["unusable"][0]["reason"].startswith("expired 3 days ago")


def test_no_usable_certificate_from_candidates_in_memory(pki: Pki) -> None:
    files = {"only.key": b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}
    selection = select("dev", candidates_from_files(files, Secrets()), now())
    result = check(route_to(pki, 9), selection)
    assert result.cause == "no_usable_certificate"
    assert "private key with no certificate" in result.message
    assert "the keystore folder of dev" in (result.fix or "")


def test_alpn_the_server_does_not_speak_is_only_a_warning_with_python_servers(
    pki: Pki, dev: Selection, tmp_path: Path
) -> None:
    """Python's (OpenSSL's default) server side selects no protocol rather than sending an alert."""
    with ScriptedTLSServer(cert=pki.server_cert, key=pki.server_key, alpn=["http/1.1"]) as server:
        result = check(route_to(pki, server.port, alpn=("h2",)), dev)
    assert result.ok and result.cause == "ok"
    assert result.details["alpn"] is None
    assert result.details["warnings"] == ["the server selected no ALPN protocol (we offered h2)"]
    assert "ALPN none" in result.message


def test_alpn_refused_by_nginx_with_an_alert(pki: Pki, dev: Selection, tmp_path: Path) -> None:
    """nginx (≥ 1.21.4) ends the handshake with no_application_protocol when nothing matches."""
    with nginx_mtls(
        tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.client_ca_file
    ) as nginx:
        refused = check(route_to(pki, nginx.port, alpn=("h2",)), dev)
        agreed = check(route_to(pki, nginx.port, alpn=("h2", "http/1.1")), dev)
    assert refused.cause == "alpn_refused"
    assert refused.details["alert"] == "no application protocol"
    assert "accepts none of the ALPN protocols we offered (h2)" in refused.message
    assert refused.fix == "set alpn for route api to a protocol the server speaks, or remove it"
    assert agreed.ok and agreed.details["alpn"] == "http/1.1"
    assert "ALPN http/1.1" in agreed.message


def test_negotiated_alpn_is_reported(pki: Pki, dev: Selection) -> None:
    with ScriptedTLSServer(cert=pki.server_cert, key=pki.server_key, alpn=["h2", "http/1.1"]) as server:
        result = check(route_to(pki, server.port, alpn=("h2",)), dev)
    assert result.ok and result.details["alpn"] == "h2" and result.details["warnings"] == []


@pytest.mark.parametrize(
    ("mode", "cause", "words"),
    [
        ("close", "connect", "completed the TLS handshake (TLSv1.3), then closed the connection without a TLS alert"),
        ("reset", "connect", "completed the TLS handshake (TLSv1.3), then reset the connection without a TLS alert"),
        ("reset_on_accept", "connect", "accepted the TCP connection, then reset it without answering our TLS hello"),
    ],
)
def test_servers_that_hang_up(pki: Pki, dev: Selection, mode: str, cause: str, words: str) -> None:
    with ScriptedTLSServer(cert=pki.server_cert, key=pki.server_key, mode=mode) as server:
        result = check(route_to(pki, server.port), dev)
    assert result.cause == cause and words in result.message, result


def test_server_that_speaks_first_is_ok(pki: Pki, dev: Selection) -> None:
    with ScriptedTLSServer(cert=pki.server_cert, key=pki.server_key, mode="hello") as server:
        # a longer wait than the default 1 s: on a loaded machine the server's words came later
        result = check(route_to(pki, server.port), dev, after_handshake_wait=5.0)
    assert result.ok and result.details["server_spoke_first"] is True


def test_unreadable_ca_file_is_a_config_problem(pki: Pki, dev: Selection, tmp_path: Path) -> None:
    result = check(route_to(pki, 9, ca_file=tmp_path / "missing.pem"), dev)
    assert result.cause == "config"
    assert "not contacted" in result.message and "missing.pem" in result.message
    assert result.fix == "point ca_file for route api at a readable PEM file of CA certificates"


def test_unsafe_skip_verify_passes_with_a_warning(pki: Pki, dev: Selection, tmp_path: Path) -> None:
    with serving(CA("Rogue CA").server("elsewhere.test"), tmp_path / "rogue") as server:
        result = check(route_to(pki, server.port, unsafe_skip_verify=True), dev)
    assert result.ok
    assert result.details["server_certificate"]["verified"] is False
    assert any("verification is OFF" in w for w in result.details["warnings"])


# --- explain(), no sockets ----------------------------------------------------------------------

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def observation(**fields: Any) -> Observation:
    base: dict[str, Any] = {
        "route": "api",
        "host": "api.example.test",
        "port": 8443,
        "server_name": "api.example.test",
        "identity": "dev",
        "now": NOW,
        "timeout": 10.0,
        "ca_file": Path("/etc/ca.pem"),
        "client_cert": CLIENT.cert,
        "address": "192.0.2.10:8443",
    }
    base.update(fields)
    return Observation(**base)


SERVER_CA = CA("Server CA")
CLIENT_CA = CA("Client CA")
CLIENT = CLIENT_CA.client("dev", not_before=NOW - timedelta(days=1))
SERVER = SERVER_CA.server("api.example.test", not_before=NOW - timedelta(days=10), lifetime=timedelta(days=90))


def verify_failed(code: int, message: str) -> Failed:
    return Failed("handshake", "verify", "certificate verify failed", "CERTIFICATE_VERIFY_FAILED", code, message)


def test_explain_ok_summarises_the_connection() -> None:
    result = explain(
        observation(
            tls_version="TLSv1.3",
            cipher="TLS_AES_128_GCM_SHA256",
            alpn="h2",
            alpn_offered=("h2",),
            server_cert=SERVER.cert,
            server_cert_verified=True,
            after_handshake="silent",
        )
    )
    assert result.ok and result.fix is None
    expires = SERVER.cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC")
    assert result.message == (
        "api.example.test:8443: OK: TLSv1.3, TLS_AES_128_GCM_SHA256, ALPN h2; "
        f"server CN=api.example.test, issued by CN=Server CA, expires {expires}"
    )
    assert result.details["server_certificate"]["not_after"] == SERVER.cert.not_valid_after_utc.strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    assert result.details["server_certificate"]["serial"] == f"{SERVER.cert.serial_number:x}"
    assert result.details["client_certificate"]["serial"] == f"{CLIENT.cert.serial_number:x}"
    assert result.details["checked_at"] == "2026-03-01T12:00:00Z"
    assert result.to_json()["details"] is result.details


def test_explain_ok_warns_of_a_server_certificate_about_to_expire() -> None:
    soon = SERVER_CA.server("api.example.test", not_before=NOW - timedelta(days=80), lifetime=timedelta(days=81))
    result = explain(observation(tls_version="TLSv1.3", cipher="X", server_cert=soon.cert, after_handshake="silent"))
    assert result.ok
    assert result.details["warnings"] == [
        f"the server certificate expires in 1 day ({soon.cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)"
    ]


@pytest.mark.parametrize(
    ("failure", "cause", "message", "fix"),
    [
        (
            Failed("resolve", "dns", "Name or service not known"),
            "dns",
            "api.example.test:8443: the name api.example.test does not resolve (Name or service not known)",
            "check the host in target for route api, or your DNS or VPN connection",
        ),
        (
            Failed("connect", "refused", "Connection refused"),
            "refused",
            "api.example.test:8443: connection refused at 192.0.2.10:8443 (nothing is listening on port 8443)",
            "start the service, or correct the port in target for route api",
        ),
        (
            Failed("resolve", "timeout"),
            "timeout",
            "api.example.test:8443: resolving api.example.test took longer than 10 s",
            "check your DNS or VPN connection, or raise connect_timeout for route api",
        ),
        (
            Failed("connect", "timeout"),
            "timeout",
            "api.example.test:8443: no answer to the TCP connection within 10 s",
            "check that api.example.test is reachable from here (VPN, firewall) and the port is right, "
            "or raise connect_timeout for route api",
        ),
        (
            Failed("connect", "os_error", "Network is unreachable"),
            "connect",
            "api.example.test:8443: cannot connect: Network is unreachable",
            "check that api.example.test is reachable from this machine and the port in target for route api",
        ),
    ],
)
def test_explain_network_failures(failure: Failed, cause: str, message: str, fix: str) -> None:
    result = explain(observation(failure=failure))
    assert (result.ok, result.cause, result.message, result.fix) == (False, cause, message, fix)
    assert result.details["stage"] == failure.stage


def test_explain_timeout_after_some_tls_bytes() -> None:
    result = explain(observation(failure=Failed("handshake", "timeout"), first_bytes=b"\x16\x03\x03\x00\x7a"))
    assert result.cause == "timeout"
    assert result.message == "api.example.test:8443: the TLS handshake started but did not finish within 10 s"


def test_explain_plaintext_even_when_the_server_then_stalls() -> None:
    result = explain(observation(failure=Failed("handshake", "timeout"), first_bytes=b"+OK POP3 ready\r\n"))
    assert result.cause == "not_tls"
    assert result.message.endswith('it answered in plaintext: "+OK POP3 ready"')


def test_printable_first_bytes() -> None:
    assert printable(b"HTTP/1.1 400 Bad Request\r\nServer: x\r\n") == "HTTP/1.1 400 Bad Request"
    assert printable(b"\x00\x01ab\\") == "\\x00\\x01ab\\x5c"
    assert printable(b"A" * 100) == "A" * 60 + "…"
    assert printable(b"\nsecond line") == "\\x0asecond line"


def test_explain_untrusted_without_the_certificate_falls_back_to_openssl_words() -> None:
    result = explain(
        observation(
            failure=verify_failed(20, "unable to get local issuer certificate"),
            probe_error="Connection reset by peer",
        )
    )
    assert result.cause == "server_untrusted"
    assert result.message == (
        "api.example.test:8443: server certificate is not trusted (unable to get local issuer certificate); "
        "trust in use: /etc/ca.pem"
    )
    assert result.details["probe_error"] == "Connection reset by peer"


def test_explain_untrusted_with_ca_dir() -> None:
    result = explain(
        observation(
            ca_file=None,
            ca_dir=Path("/etc/ssl/mine"),
            failure=verify_failed(20, "unable to get local issuer certificate"),
            server_cert=SERVER.cert,
        )
    )
    assert result.message.endswith("issued by CN=Server CA, which is not in /etc/ssl/mine")
    assert result.details["trust"] == {"source": "ca_dir", "path": "/etc/ssl/mine"}


def test_explain_other_verification_errors_say_openssl_words() -> None:
    result = explain(observation(failure=verify_failed(26, "unsupported certificate purpose"), server_cert=SERVER.cert))
    assert result.cause == "server_untrusted"
    assert result.message == (
        "api.example.test:8443: server certificate failed verification: unsupported certificate purpose"
    )


def test_explain_expired_chain_certificate_when_the_leaf_is_current() -> None:
    result = explain(observation(failure=verify_failed(10, "certificate has expired"), server_cert=SERVER.cert))
    assert result.cause == "server_certificate_expired"
    assert result.message == (
        "api.example.test:8443: a certificate in the server's chain has expired (certificate has expired)"
    )


def test_explain_name_mismatch_without_the_certificate() -> None:
    failure = verify_failed(62, "Hostname mismatch, certificate is not valid for 'api.example.test'.")
    result = explain(observation(failure=failure))
    assert result.cause == "name_mismatch"
    assert result.message == (
        'api.example.test:8443 does not hold the name "api.example.test" '
        "(Hostname mismatch, certificate is not valid for 'api.example.test'.)"
    )


def test_explain_name_mismatch_lists_uri_sans_only_as_details() -> None:
    leaf = SERVER_CA.issue("svc", dns=["svc.internal"], uris=["spiffe://example.test/svc"])
    result = explain(observation(failure=verify_failed(62, "Hostname mismatch"), server_cert=leaf.cert))
    assert result.message.endswith("its certificate names DNS:svc.internal")
    assert result.details["server_certificate"]["sans"] == ["DNS:svc.internal", "URI:spiffe://example.test/svc"]


@pytest.mark.parametrize(
    ("reason", "cause", "words"),
    [
        ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "server_rejected_certificate", "did not take CN=dev"),
        ("SSLV3_ALERT_BAD_CERTIFICATE", "server_rejected_certificate", "(TLS alert: bad certificate): CN=dev"),
        ("SSLV3_ALERT_CERTIFICATE_EXPIRED", "server_rejected_certificate", "considers CN=dev (or its chain) expired"),
        ("SSLV3_ALERT_CERTIFICATE_REVOKED", "server_rejected_certificate", "is revoked"),
        ("TLSV1_ALERT_ACCESS_DENIED", "server_rejected_certificate", "accepted CN=dev but does not let it in"),
        ("SSLV3_ALERT_HANDSHAKE_FAILURE", "server_rejected_certificate", "most often it does not accept CN=dev"),
        ("TLSV1_ALERT_NO_APPLICATION_PROTOCOL", "alpn_refused", "accepts none of the ALPN protocols we offered (h2)"),
        ("TLSV1_ALERT_PROTOCOL_VERSION", "tls_error", "share no TLS version"),
        ("TLSV1_ALERT_INTERNAL_ERROR", "tls_error", "ended the TLS connection with alert: internal error"),
    ],
)
def test_explain_alerts(reason: str, cause: str, words: str) -> None:
    result = explain(observation(alpn_offered=("h2",), failure=Failed("handshake", "tls", "alert", reason)))
    assert result.cause == cause and words in result.message, result
    assert result.details["alert"] == alert_name(reason)
    assert result.fix


def test_explain_post_handshake_rejection_says_after_the_handshake() -> None:
    failure = Failed("after_handshake", "tls", "alert", "TLSV1_ALERT_UNKNOWN_CA")
    result = explain(observation(tls_version="TLSv1.3", cipher="X", failure=failure))
    assert result.cause == "server_rejected_certificate"
    assert result.message == (
        "api.example.test:8443 rejected dev's certificate after the handshake (TLS alert: unknown ca): "
        "the server does not trust the issuer of dev's certificate, CN=Client CA"
    )
    assert (
        result.fix == "have dev's certificate issued by a CA the server trusts, or add CN=Client CA to its client CAs"
    )


def test_explain_other_tls_errors_name_openssl_reason() -> None:
    result = explain(observation(failure=Failed("handshake", "tls", "x", "UNSUPPORTED_PROTOCOL")))
    assert result.cause == "tls_error"
    assert result.message == "api.example.test:8443: the TLS handshake failed: unsupported protocol"
    assert "openssl s_client -connect api.example.test:8443 -servername api.example.test" in (result.fix or "")


def test_explain_not_tls_from_openssl_reason_alone() -> None:
    result = explain(observation(failure=Failed("handshake", "tls", "x", "WRONG_VERSION_NUMBER"), first_bytes=b""))
    assert result.cause == "not_tls"


def test_explain_setup_failures() -> None:
    config = explain(observation(failure=Failed("setup", "config", "/etc/ca.pem: ca_file: cannot load")))
    assert config.cause == "config" and config.message.startswith("api.example.test:8443: not contacted: ")
    credential = explain(observation(failure=Failed("setup", "credential", "key values mismatch")))
    assert credential.cause == "tls_error" and "OpenSSL cannot use dev's certificate" in credential.message


def test_explain_no_usable_certificate_wins_over_anything_else() -> None:
    result = explain(
        observation(
            client_cert=None,
            unusable="identity 'dev' has no certificates in its keystore folder",
            identity_folder="/home/me/keystore/dev",
            failure=Failed("connect", "refused"),
        )
    )
    assert result.cause == "no_usable_certificate"
    assert result.fix == "put a valid client certificate and key for dev in /home/me/keystore/dev, " + (
        "or run `mtls-sidecar renew dev`"
    )


def test_explain_ipv6_target() -> None:
    result = explain(observation(host="::1", failure=Failed("connect", "refused"), address=None))
    assert result.message.startswith("[::1]:8443: connection refused (nothing")


def test_every_cause_key_is_reachable_and_stable() -> None:
    assert set(CAUSES) == {
        "ok", "dns", "refused", "timeout", "connect", "not_tls", "server_untrusted", "name_mismatch",
        "server_certificate_expired", "server_certificate_not_yet_valid", "server_rejected_certificate",
        "no_usable_certificate", "alpn_refused", "tls_error", "config",
        "pin_mismatch", "uri_san_not_allowed", "server_certificate_revoked", "revocation_unknown",
        "protocol_mismatch", "server_offers_no_tls", "server_rejected_certificate_http", "server_not_allowed",
        "upstream_proxy_refused", "upstream_proxy_unreachable",
    }  # fmt: skip


def test_alert_name() -> None:
    assert alert_name("TLSV1_ALERT_UNKNOWN_CA") == "unknown ca"
    assert alert_name("TLSV13_ALERT_CERTIFICATE_REQUIRED") == "certificate required"
    assert alert_name("WRONG_VERSION_NUMBER") == ""


def _record(content_type: int, body: bytes) -> bytes:
    return bytes([content_type, 3, 3]) + len(body).to_bytes(2, "big") + body


def _handshake_message(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + len(body).to_bytes(3, "big") + body


def test_certificate_from_a_tls12_flight() -> None:
    der = SERVER.cert.public_bytes(serialization.Encoding.DER)
    entry = len(der).to_bytes(3, "big") + der
    certificate = _handshake_message(11, (len(entry)).to_bytes(3, "big") + entry)
    messages = _handshake_message(2, b"\x03\x03" + bytes(38)) + certificate + _handshake_message(14, b"")
    # The Certificate message split over two records, as servers do with long chains.
    flight = _record(22, messages[:50]) + _record(22, messages[50:])
    found = certificate_from_tls12_flight(flight)
    assert found is not None and x509.load_der_x509_certificate(found) == SERVER.cert
    assert certificate_from_tls12_flight(flight[:-10]) is None  # truncated
    assert certificate_from_tls12_flight(_record(20, b"\x01") + flight) is None  # after ChangeCipherSpec: encrypted
    assert certificate_from_tls12_flight(b"HTTP/1.0 200 OK\r\n\r\n") is None
