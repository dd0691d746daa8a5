"""The server allow-list and pin-alone routes, end to end: a real daemon, real TLS servers on
127.0.0.1 whose certificates are made here.

`allowed_common_names`, `allowed_ous`, `allowed_dns_sans`, `allowed_ip_sans` and
`allowed_uri_sans` are what `tunnel --verify-cn/-ou/-dns/-ip/-uri` mean; `pin_sha256` with
`unsafe_skip_verify` is `tunnel --verify-spki-pin`. For each: one server let in, one refused
with its cause counted, no byte across a refused tunnel (the servers speak first), and `check`
saying the same.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.control.client import ApiCallError
from sidecar.policy import spki_sha256
from tests.daemon_runner import DaemonThread
from tests.pki import CA, Leaf
from tests.scenario import Pki, recv_all, write_config
from tests.test_allow_list_policy import server_leaf
from tests.test_e2e_policy import HELLO, SECRET, Lab, assert_passes, assert_refused, talk
from tests.tlsserver import ScriptedTLSServer
from tests.waiting import wait_until


@pytest.fixture
def lab(tmp_path: Path, isolated_home: Path) -> Iterator[Lab]:
    with contextlib.ExitStack() as stack:
        yield Lab(tmp_path / "lab", isolated_home, stack)


def checked(daemon: DaemonThread, route: str) -> dict[str, Any]:
    """`mtls-sidecar check ROUTE --json`, through the control API."""
    answer: dict[str, Any] = daemon.client().post(f"/v1/routes/{route}/check")
    return answer


# --- one list at a time: CN, OU, DNS SAN, IP SAN, URI SAN -------------------------------------


def test_each_list_lets_one_server_in_and_refuses_another(lab: Lab) -> None:
    # Both servers hold "localhost" (the routes' server_name): the handshake passes for both,
    # only the allow-list tells them apart.
    orders = lab.serve(
        "orders",
        server_leaf(
            lab.server_ca,
            "orders",
            ous=("Payments",),
            dns=("localhost", "orders.example.test"),
            ips=("::1", "10.0.0.5"),
            uris=("spiffe://example.test/api/orders",),
        ),
    )
    billing = lab.serve(
        "billing",
        server_leaf(
            lab.server_ca,
            "billing",
            ous=("Finance",),
            dns=("localhost", "billing.example.test"),
            ips=("10.0.0.6",),
            uris=("spiffe://example.test/api/billing",),
        ),
    )
    allow = {
        "cn": {"allowed_common_names": ["orders"]},
        "ou": {"allowed_ous": ["Payments"]},
        "dns": {"allowed_dns_sans": ["Orders.Example.Test"]},
        "ip": {"allowed_ip_sans": ["0:0:0:0:0:0:0:1"]},  # ::1 in another spelling
        # with another list beside it, allowed_uri_sans is one more way in (and the cause is server_not_allowed)
        "uri": {"allowed_uri_sans": ["spiffe://example.test/api/ord*"], "allowed_common_names": ["nobody"]},
    }
    for kind, lists in allow.items():
        lab.route(f"{kind}_in", orders, **lists)
        lab.route(f"{kind}_out", billing, **lists)
    daemon = lab.daemon()

    for kind in allow:
        assert_passes(daemon, f"{kind}_in")
    held = {
        "cn": "CN billing",
        "ou": "OU Finance",
        "dns": "DNS SANs localhost, billing.example.test",
        "ip": "IP SANs 10.0.0.6",
        "uri": "URI SANs spiffe://example.test/api/billing",
    }
    for kind, lists in allow.items():
        status = assert_refused(
            daemon, lab, f"{kind}_out", "billing", "server_not_allowed", "matches nothing the route allows", held[kind]
        )
        for key in lists:
            assert key in status["last_error"], (kind, key)
    # status shows the lists as they are compared: DNS names in lower case, IP addresses in one form
    policies = {kind: daemon.status()["routes"][f"{kind}_out"]["policy"] for kind in allow}
    assert policies["dns"]["allowed_dns_sans"] == ["orders.example.test"]
    assert policies["ip"]["allowed_ip_sans"] == ["::1"]
    assert policies["cn"]["allowed_common_names"] == ["orders"] and policies["cn"]["allowed_ous"] == []
    assert orders.connections == len(allow)


def test_the_lists_together_are_one_or(lab: Lab) -> None:
    server = lab.serve("api", server_leaf(lab.server_ca, "api", ous=("Ops",), dns=("localhost",), ips=("127.0.0.1",)))
    misses = {
        "allowed_common_names": ["billing"],
        "allowed_ous": ["Finance"],
        "allowed_dns_sans": ["billing.example.test"],
        "allowed_ip_sans": ["10.9.9.9"],
        "allowed_uri_sans": ["spiffe://example.test/**"],
    }
    lab.route("all_miss", server, **misses)
    lab.route("one_ip_hit", server, **{**misses, "allowed_ip_sans": ["10.9.9.9", "::ffff:127.0.0.1"]})
    lab.route("one_ou_hit", server, **{**misses, "allowed_ous": ["Ops"]})
    daemon = lab.daemon()

    assert_passes(daemon, "one_ip_hit")
    assert_passes(daemon, "one_ou_hit")
    status = assert_refused(daemon, lab, "all_miss", "api", "server_not_allowed", "CN api; OU Ops; DNS SANs localhost")
    for key in misses:
        assert key in status["last_error"], key
    # `check` explains it as the tunnel refused it, with a name to add
    answer = checked(daemon, "all_miss")
    assert answer["ok"] is False and answer["cause"] == "server_not_allowed"
    assert "matches nothing the route allows" in answer["message"]
    assert '"localhost" to allowed_dns_sans' in answer["fix"] and "route all_miss" in answer["fix"]
    assert answer["details"]["server_names"]["ous"] == ["Ops"]
    assert checked(daemon, "one_ou_hit")["ok"] is True


def test_allowed_uri_sans_alone_still_says_uri_san_not_allowed(lab: Lab) -> None:
    server = lab.serve("orders", server_leaf(lab.server_ca, "orders", dns=("localhost",), uris=("spiffe://a/b",)))
    lab.route("uri_only", server, allowed_uri_sans=["spiffe://a/c"])
    daemon = lab.daemon()
    assert_refused(daemon, lab, "uri_only", "orders", "uri_san_not_allowed", "which allowed_uri_sans does not allow")
    assert checked(daemon, "uri_only")["cause"] == "uri_san_not_allowed"


# --- a proxy rule ---------------------------------------------------------------------------


def connect_via_proxy(port: int, authority: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    return sock


def test_a_proxy_rule_with_allowed_common_names(tmp_path: Path, isolated_home: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    good = server_leaf(pki.server_ca, "db-primary", dns=("db.corp.test",)).write_pair(tmp_path / "s", "good")
    rogue = server_leaf(pki.server_ca, "db-rogue", dns=("rogue.corp.test",)).write_pair(tmp_path / "s", "rogue")
    with contextlib.ExitStack() as stack:
        servers = {
            name: stack.enter_context(
                ScriptedTLSServer(
                    cert=cert, key=key, client_ca=pki.client_ca_file, require_client_cert=True, mode="hello"
                )
            )
            for name, (cert, key) in (("good", good), ("rogue", rogue))
        }

        def rule(name: str, host: str) -> dict[str, Any]:
            return {
                "name": name,
                "hosts": [host],
                "ca_file": str(pki.server_ca_file),
                "connect": f"127.0.0.1:{servers[name].port}",
                "allowed_common_names": ["db-primary"],
            }

        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={},
            proxy={"listen": "127.0.0.1:0", "rules": [rule("good", "db.corp.test"), rule("rogue", "rogue.corp.test")]},
        )
        daemon = stack.enter_context(DaemonThread(config))
        port = int(daemon.status()["proxy"]["listen"].rsplit(":", 1)[1])

        with connect_via_proxy(port, "db.corp.test:443") as sock:
            sock.sendall(SECRET)
            sock.shutdown(socket.SHUT_WR)
            answer = recv_all(sock)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n" + HELLO + SECRET), answer

        with connect_via_proxy(port, "rogue.corp.test:443") as sock:
            with contextlib.suppress(OSError):
                sock.sendall(SECRET)
                sock.shutdown(socket.SHUT_WR)
            answer = recv_all(sock)
        assert HELLO not in answer, answer

        def rogue_rule() -> dict[str, Any]:
            return next(r for r in daemon.status()["proxy"]["rules"] if r["name"] == "rogue")

        wait_until(lambda: rogue_rule()["failures"], what="the rogue rule to count its refusal")
        assert rogue_rule()["failures"] == {"server_not_allowed": 1}
        assert "CN=db-rogue" in rogue_rule()["last_error"] and "allowed_common_names" in rogue_rule()["last_error"]
        assert SECRET not in servers["rogue"].raw_received
        good_rule = next(r for r in daemon.status()["proxy"]["rules"] if r["name"] == "good")
        assert good_rule["failures"] == {} and good_rule["connections"] == 1


# --- pin alone: ghostunnel's --verify-spki-pin is pin_sha256 + unsafe_skip_verify -----------------


def self_signed(name: str, *, expired: bool) -> Leaf:
    """A certificate that signs itself, for `name`, valid last week when `expired`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = datetime.now(UTC) - timedelta(days=10 if expired else 1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=3))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Leaf(cert, key, [])


def test_a_pin_alone_lets_in_only_the_pinned_key(lab: Lab) -> None:
    # Neither server passes normal verification: one signs itself, for another name, and expired
    # last week; the other comes from a CA nobody trusts, also for another name, also expired.
    mine = self_signed("elsewhere.example", expired=True)
    stranger_ca = CA("Nobody Trusts This CA")
    theirs = stranger_ca.server(
        "other.example", not_before=datetime.now(UTC) - timedelta(days=9), lifetime=timedelta(days=2)
    )
    own = lab.serve("own", mine)
    stranger = lab.serve("stranger", theirs)
    pin = spki_sha256(mine.cert)
    lab.route("pinned", own, pin_sha256=[f"sha256:{pin}"], unsafe_skip_verify=True)
    lab.route("pinned_curl_style", own, pin_sha256=[f"sha256//{pin}"], unsafe_skip_verify=True)
    lab.route("pinned_stranger", stranger, pin_sha256=[f"sha256:{spki_sha256(theirs.cert)}"], unsafe_skip_verify=True)
    lab.route("wrong_pin", stranger, pin_sha256=[f"sha256:{pin}"], unsafe_skip_verify=True)
    # Only the leaf counts without verification: the CA's key, pinned, proves nothing.
    lab.route("ca_pin_unverified", stranger, pin_sha256=[spki_sha256(stranger_ca.root)], unsafe_skip_verify=True)
    lab.route("pin_but_verified", own, pin_sha256=[f"sha256:{pin}"])  # the pin is one more check, not a way around
    daemon = lab.daemon()

    for route in ("pinned", "pinned_curl_style", "pinned_stranger"):
        assert_passes(daemon, route)
        assert daemon.status()["routes"][route]["verify"] is False
    assert_refused(daemon, lab, "wrong_pin", "stranger", "pin_mismatch", "not pinned", spki_sha256(theirs.cert))
    assert_refused(daemon, lab, "ca_pin_unverified", "stranger", "pin_mismatch", "not pinned")
    verified = talk(daemon, "pin_but_verified")
    assert verified == b""
    failures = daemon.status()["routes"]["pin_but_verified"]["failures"]
    assert set(failures) <= {"server_untrusted", "server_certificate_expired", "name_mismatch"} and failures, failures
    assert checked(daemon, "pinned")["ok"] is True
    assert checked(daemon, "wrong_pin")["cause"] == "pin_mismatch"


# --- the control API takes the same keys --------------------------------------------------------


def test_routes_added_through_the_control_api_take_the_allow_list(lab: Lab) -> None:
    server = lab.serve("api", server_leaf(lab.server_ca, "api", dns=("localhost",), ips=("127.0.0.1",)))
    lab.route("seed", server)
    daemon = lab.daemon()
    client = daemon.client()
    base = {"listen": "127.0.0.1:0", "target": f"127.0.0.1:{server.port}", "server_name": "localhost",
            "ca_file": str(lab.server_ca_file)}  # fmt: skip
    with pytest.raises(ApiCallError) as bad:
        client.post("/v1/routes", {"name": "bad", **base, "allowed_ip_sans": ["127.0.0.1/8"]})
    assert bad.value.status == 400 and "allowed_ip_sans" in str(bad.value) and "not an IP address" in str(bad.value)
    added = client.post("/v1/routes", {"name": "by_ip", **base, "allowed_ip_sans": ["::ffff:127.0.0.1"]})
    assert added["policy"]["allowed_ip_sans"] == ["127.0.0.1"]
    assert_passes(daemon, "by_ip")
    changed = client.patch("/v1/routes/by_ip", {"allowed_ip_sans": None, "allowed_common_names": ["someone-else"]})
    assert changed["policy"]["allowed_common_names"] == ["someone-else"] and changed["policy"]["allowed_ip_sans"] == []
    assert_refused(daemon, lab, "by_ip", "api", "server_not_allowed", "allowed_common_names = ['someone-else']")
