"""The tunnel's counters (`status`) and `check --json` name the same real failure with the same key.

One daemon, one route per failure that both can see, each pointed at a real misbehaving
server on loopback. For each route: one connection through the tunnel (its failure is
counted in status), then `check` on the same route through the control API, as
`mtls-sidecar check ROUTE --json` does. The keys must be equal, and be `Cause` values.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from sidecar.causes import Cause
from sidecar.policy import spki_sha256
from tests.daemon_runner import DaemonThread
from tests.pki import CA, now
from tests.proxies import UpstreamProxyServer
from tests.scenario import Pki, route_to, write_config
from tests.tlsserver import ScriptedTLSServer
from tests.waiting import wait_until

# route name → the cause both must report
EXPECTED = {
    "refused": Cause.REFUSED,
    "dns": Cause.DNS,
    "timeout": Cause.TIMEOUT,
    "connect": Cause.CONNECT,
    "not_tls": Cause.NOT_TLS,
    "server_untrusted": Cause.SERVER_UNTRUSTED,
    "name_mismatch": Cause.NAME_MISMATCH,
    "server_certificate_expired": Cause.SERVER_CERT_EXPIRED,
    "server_certificate_not_yet_valid": Cause.SERVER_CERT_NOT_YET_VALID,
    "rejected_tls12": Cause.SERVER_REJECTED_CERT,
    "rejected_tls13": Cause.SERVER_REJECTED_CERT,
    "pin_mismatch": Cause.PIN_MISMATCH,
    "uri_san_not_allowed": Cause.URI_SAN_NOT_ALLOWED,
    "server_not_allowed": Cause.SERVER_NOT_ALLOWED,
    "no_usable_certificate": Cause.NO_USABLE_CERT,
    "tls_error": Cause.TLS_ERROR,
    "upstream_proxy_refused": Cause.UPSTREAM_PROXY_REFUSED,
    "upstream_proxy_unreachable": Cause.UPSTREAM_PROXY_UNREACHABLE,
}


@contextlib.contextmanager
def servers(pki: Pki, folder: Path) -> Iterator[dict[str, ScriptedTLSServer]]:
    folder.mkdir(parents=True, exist_ok=True)
    stranger = CA("Stranger Client CA")
    stranger_file = stranger.write_root(folder / "stranger-client-ca.pem")

    def leaf_files(name: str, **kwargs: Any) -> tuple[Path, Path]:
        return pki.server_ca.server("localhost", "127.0.0.1", **kwargs).write_pair(folder, name)

    expired = leaf_files("expired", not_before=now() - timedelta(days=10), not_after=now() - timedelta(days=1))
    future = leaf_files("future", not_before=now() + timedelta(days=1), not_after=now() + timedelta(days=10))
    made = {
        "good": dict(cert=pki.server_cert, key=pki.server_key, client_ca=pki.client_ca_file, require_client_cert=True),
        "stall": dict(cert=None, key=None, tls=False, mode="stall"),
        "reset_on_accept": dict(cert=None, key=None, tls=False, mode="reset_on_accept"),
        "plaintext": dict(cert=None, key=None, mode="plaintext"),
        "expired": dict(cert=expired[0], key=expired[1]),
        "future": dict(cert=future[0], key=future[1]),
        "rejecting12": dict(
            cert=pki.server_cert, key=pki.server_key, client_ca=stranger_file, require_client_cert=True,
            max_version=ssl.TLSVersion.TLSv1_2,
        ),
        "rejecting13": dict(
            cert=pki.server_cert, key=pki.server_key, client_ca=stranger_file, require_client_cert=True,
            min_version=ssl.TLSVersion.TLSv1_3,
        ),
    }  # fmt: skip
    made["tls11_only"] = dict(cert=pki.server_cert, key=pki.server_key, max_version=ssl.TLSVersion.TLSv1_1)
    with contextlib.ExitStack() as stack:
        running = {}
        for name, kwargs in made.items():
            with warnings.catch_warnings():  # TLS 1.1 is deprecated: the point (a protocol_version alert)
                warnings.simplefilter("ignore", DeprecationWarning)
                server = ScriptedTLSServer(**kwargs)  # type: ignore[arg-type]
            running[name] = stack.enter_context(server)
        yield running


def routes(
    pki: Pki, s: dict[str, ScriptedTLSServer], closed_port: int, rogue_ca: Path, refusing_proxy: str
) -> dict[str, dict[str, Any]]:
    fast = {"connect_timeout": "1s"}
    return {
        "refused": route_to(pki, closed_port),
        "dns": {**route_to(pki, 443), "target": "no-such-host.invalid:443"},
        "timeout": route_to(pki, s["stall"].port, **fast),
        "connect": route_to(pki, s["reset_on_accept"].port),
        "not_tls": route_to(pki, s["plaintext"].port),
        "server_untrusted": route_to(pki, s["good"].port, ca_file=str(rogue_ca)),
        "name_mismatch": route_to(pki, s["good"].port, server_name="other.example.test"),
        "server_certificate_expired": route_to(pki, s["expired"].port),
        "server_certificate_not_yet_valid": route_to(pki, s["future"].port),
        "rejected_tls12": route_to(pki, s["rejecting12"].port),
        "rejected_tls13": route_to(pki, s["rejecting13"].port),
        "pin_mismatch": route_to(pki, s["good"].port, pin_sha256=[spki_sha256(CA("Other").server("x").cert)]),
        "uri_san_not_allowed": route_to(pki, s["good"].port, allowed_uri_sans=["spiffe://example.test/api/*"]),
        "server_not_allowed": route_to(pki, s["good"].port, allowed_common_names=["someone-else"]),
        "no_usable_certificate": {**route_to(pki, s["good"].port), "identity": "empty"},
        "tls_error": route_to(pki, s["tls11_only"].port),
        "upstream_proxy_refused": route_to(pki, s["good"].port, upstream_proxy=refusing_proxy),
        "upstream_proxy_unreachable": route_to(pki, s["good"].port, upstream_proxy=f"http://127.0.0.1:{closed_port}"),
    }


def fail_once(daemon: DaemonThread, route: str) -> None:
    """One connection through the route, as a client would make it, until the tunnel ends it."""
    with daemon.connect(route) as client:
        with contextlib.suppress(OSError):
            client.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        client.settimeout(10)
        with contextlib.suppress(OSError):
            while client.recv(65536):
                pass


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


def test_status_and_check_use_the_same_key_for_the_same_real_failure(
    pki: Pki, isolated_home: Path, tmp_path: Path
) -> None:
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    (isolated_home / "keystore" / "empty").mkdir(parents=True)
    rogue_ca = CA("Rogue Server CA").write_root(tmp_path / "rogue-ca.pem")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with servers(pki, tmp_path / "servers") as running, UpstreamProxyServer("http", refuse=403) as proxy:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}, "empty": {"renew": "none"}},
            active="dev",
            routes=routes(pki, running, closed_port, rogue_ca, proxy.url),
        )
        seen: dict[str, tuple[dict[str, int], str]] = {}
        with DaemonThread(config) as daemon:
            client = daemon.client()
            for route, cause in EXPECTED.items():
                fail_once(daemon, route)
                wait_until(
                    lambda route=route: bool(daemon.status()["routes"][route]["failures"]),  # type: ignore[misc]
                    timeout=10,
                    what=f"route {route} to count its failure",
                )
                counted = daemon.status()["routes"][route]["failures"]
                checked = client.post(f"/v1/routes/{route}/check")
                seen[route] = (counted, checked["cause"])
                assert counted == {cause.value: 1}, (route, daemon.status()["routes"][route]["last_error"])
                assert checked["cause"] == cause.value, (route, checked["message"])
                assert checked["ok"] is False
    # Every cause named here is a Cause, and the list covers every cause both sides can produce.
    # Not here: ok; config (a ca_file the config accepted that OpenSSL then cannot read is
    # a race, not a scenario); revocation (OCSP and CRLs need a responder: tests/test_e2e_policy.py
    # asserts those keys for status and check with a real `openssl ocsp`).
    both = {c for c in Cause if c not in (Cause.OK, Cause.CONFIG, Cause.SERVER_CERT_REVOKED, Cause.REVOCATION_UNKNOWN)}
    tunnel_only = {Cause.OTHER_USER, Cause.PEER_UNKNOWN, Cause.TOO_MANY_CONNECTIONS, Cause.RESET, Cause.TRUNCATED}
    # alpn_refused: no server here sends the no_application_protocol alert (OpenSSL's and
    # Python's servers, nginx included, carry on without ALPN); both sides classify the alert
    # through causes.cause_of, tested in tests/test_failures.py and tests/test_check.py.
    no_server_for = {Cause.ALPN_REFUSED}
    # protocol routes (postgres, mysql, http): their own tests assert status and check agree
    # (server_rejected_certificate_http against real nginx: tests/test_check_refusals.py).
    no_server_for |= {Cause.PROTOCOL_MISMATCH, Cause.SERVER_NO_TLS, Cause.LOCAL_TLS, Cause.SERVER_REJECTED_CERT_HTTP}
    # the proxy's own refusals (a destination outside its rules, a client's own TLS inside CONNECT)
    # meet no route: tests/test_e2e_proxy.py asserts the proxy's status counts them.
    no_server_for |= {Cause.PROXY_NOT_ALLOWED, Cause.CLIENT_SPEAKS_TLS}
    assert set(EXPECTED.values()) == both - tunnel_only - no_server_for, "a cause both can produce has no scenario"
    print("\n" + "\n".join(f"{route}: status {counted}, check {cause}" for route, (counted, cause) in seen.items()))


def test_the_readme_lists_every_cause_with_its_text() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for cause in Cause:
        if cause is Cause.OK:
            continue
        assert f"| `{cause.value}` | {cause.text} |" in readme, f"README's table of reasons lacks {cause.value}"
