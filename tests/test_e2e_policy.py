"""Server policy beyond names, end to end: a real daemon, real TLS servers, a real OpenSSL OCSP
responder and a CRL distribution point, all on 127.0.0.1.

Every refusal is checked the same way: the local client gets nothing (the scripted servers
speak first, so a server byte forwarded before the check would show), nothing the client
sent reaches the server, the failure is counted under its reason with a sentence that says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from sidecar.check.explain import CheckResult
from sidecar.check.observe import check_route
from sidecar.cli import main
from sidecar.config import load_config
from sidecar.credentials import Secrets
from sidecar.keystore import read_identity_folder, select
from sidecar.policy import spki_sha256
from tests.daemon_runner import DaemonThread
from tests.pki import CA, Leaf
from tests.revocation_fixtures import OpenSSLResponder, StaticServer, issue, make_crl, responder_leaf
from tests.scenario import recv_all, write_config
from tests.tlsserver import ScriptedTLSServer

SECRET = b"PLAINTEXT-SECRET-must-not-leak"
HELLO = b"hello\n"


class Lab:
    """A server CA with an intermediate, a client CA, one scripted mTLS server per server leaf,
    and routes to them in one daemon."""

    def __init__(self, folder: Path, home: Path, stack: contextlib.ExitStack) -> None:
        self.folder, self.home, self.stack = folder, home, stack
        self.server_ca = CA("Policy Server CA", with_intermediate=True)
        self.client_ca = CA("Policy Client CA")
        self.server_ca_file = self.server_ca.write_root(folder / "server-ca.pem")
        self.client_ca_file = self.client_ca.write_root(folder / "client-ca.pem")
        self.client_ca.client("dev").write_pair(home / "keystore" / "dev", "dev-1")
        self.servers: dict[str, ScriptedTLSServer] = {}
        self.routes: dict[str, dict[str, Any]] = {}

    def serve(self, name: str, leaf: Leaf) -> ScriptedTLSServer:
        cert, key = leaf.write_pair(self.folder / "servers", name)
        server = ScriptedTLSServer(
            cert=cert, key=key, client_ca=self.client_ca_file, require_client_cert=True, mode="hello"
        )
        self.servers[name] = self.stack.enter_context(server)
        return server

    def route(self, name: str, server: ScriptedTLSServer, **policy: Any) -> None:
        self.routes[name] = {
            "listen": "127.0.0.1:0",
            "target": f"127.0.0.1:{server.port}",
            "server_name": "localhost",
            "ca_file": str(self.server_ca_file),
            "connect_timeout": "5s",
            **policy,
        }

    def daemon(self) -> DaemonThread:
        config = write_config(self.home / "config.toml", identities={"dev": {"renew": "none"}}, routes=self.routes)
        return self.stack.enter_context(DaemonThread(config))


@pytest.fixture
def lab(tmp_path: Path, isolated_home: Path) -> Iterator[Lab]:
    with contextlib.ExitStack() as stack:
        yield Lab(tmp_path / "lab", isolated_home, stack)


def talk(daemon: DaemonThread, route: str) -> bytes:
    """Connect, read the server's greeting, send a line, half-close, read to the end."""
    with daemon.connect(route, timeout=10) as sock:
        with contextlib.suppress(OSError):  # a refused connection may be closed already
            sock.sendall(SECRET)
            sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def assert_passes(daemon: DaemonThread, route: str) -> None:
    assert talk(daemon, route) == HELLO + SECRET, route
    status = daemon.status()["routes"][route]
    assert status["failures"] == {}, (route, status["last_error"])


def assert_refused(daemon: DaemonThread, lab: Lab, route: str, server: str, reason: str, *words: str) -> dict[str, Any]:
    target = lab.servers[server]
    seen = target.connections
    assert talk(daemon, route) == b"", f"{route}: bytes crossed a refused tunnel"
    status = daemon.status()["routes"][route]
    assert status["failures"] == {reason: 1}, (route, status)
    for word in words:
        assert word in status["last_error"], (route, word, status["last_error"])
    target.wait_for(lambda: target.closed_connections == target.connections > seen, what="the refused connection")
    assert [bytes(r.app) for r in target.records[seen:]] == [b""], f"{route}: the server got application bytes"
    assert SECRET not in target.raw_received
    return status


def test_pins_and_uri_san_allow_list(lab: Lab) -> None:
    leaf = issue(lab.server_ca, "orders", uris=["spiffe://example.test/api/orders"])
    server = lab.serve("orders", leaf)
    other = issue(lab.server_ca, "other")  # same names, another key
    lab.route("pin_leaf", server, pin_sha256=[spki_sha256(leaf.cert)])
    lab.route("pin_root_curl_style", server, pin_sha256=["sha256//" + spki_sha256(lab.server_ca.root)])
    lab.route("pin_wrong", server, pin_sha256=[spki_sha256(other.cert)])
    lab.route("uri_one_segment", server, allowed_uri_sans=["spiffe://example.test/api/*"])
    lab.route("uri_any_depth", server, allowed_uri_sans=["spiffe://example.test/**"])
    lab.route("uri_star_stops_at_slash", server, allowed_uri_sans=["spiffe://example.test/*"])
    lab.route("uri_other_service", server, allowed_uri_sans=["spiffe://example.test/db/*", "spiffe://other.test/**"])
    lab.route("both_ok", server, pin_sha256=[spki_sha256(leaf.cert)], allowed_uri_sans=["spiffe://*/api/orders"])
    no_uri = lab.serve("plain", issue(lab.server_ca, "plain"))
    lab.route("uri_none_held", no_uri, allowed_uri_sans=["spiffe://example.test/**"])
    daemon = lab.daemon()

    for route in ("pin_leaf", "pin_root_curl_style", "uri_one_segment", "uri_any_depth", "both_ok"):
        assert_passes(daemon, route)
    # Again: these connections may resume a TLS session, which carries no verified chain; the
    # root pin must still be found (in the chain its full handshake verified).
    for _ in range(2):
        assert talk(daemon, "pin_root_curl_style") == HELLO + SECRET
    status = assert_refused(daemon, lab, "pin_wrong", "orders", "pin_mismatch", "not pinned", spki_sha256(leaf.cert))
    assert status["policy"]["pins"] == 1
    assert_refused(
        daemon, lab, "uri_star_stops_at_slash", "orders", "uri_san_not_allowed", "spiffe://example.test/api/orders"
    )
    assert_refused(daemon, lab, "uri_other_service", "orders", "uri_san_not_allowed", "does not allow")
    assert_refused(daemon, lab, "uri_none_held", "plain", "uri_san_not_allowed", "holds no URI SAN")


def test_ocsp_with_a_real_openssl_responder(lab: Lab) -> None:
    responder = lab.stack.enter_context(
        OpenSSLResponder(lab.folder / "ocsp", lab.server_ca, responder_leaf(lab.server_ca))
    )
    good = issue(lab.server_ca, "good", ocsp_url=responder.url)
    revoked = issue(lab.server_ca, "revoked", ocsp_url=responder.url)
    unknown = issue(lab.server_ca, "stranger", ocsp_url=responder.url)
    responder.publish(good=[good], revoked=[revoked])
    lab.route("good_hard", lab.serve("good", good), revocation="hard")
    lab.route("revoked_hard", lab.serve("revoked", revoked), revocation="hard")
    lab.route("revoked_soft", lab.servers["revoked"], revocation="soft")
    lab.route("revoked_off", lab.servers["revoked"])
    lab.route("unknown_hard", lab.serve("stranger", unknown), revocation="hard")
    daemon = lab.daemon()

    assert_passes(daemon, "good_hard")
    assert_passes(daemon, "good_hard")  # the second answer comes from the cache
    assert daemon.call(lambda d: d.listeners["good_hard"].revocation.fetches) == 1
    assert_refused(daemon, lab, "revoked_hard", "revoked", "server_certificate_revoked", "is revoked", "keyCompromise")
    assert_refused(daemon, lab, "revoked_soft", "revoked", "server_certificate_revoked", responder.url)
    assert talk(daemon, "revoked_off") == HELLO + SECRET  # nobody asked
    assert_refused(daemon, lab, "unknown_hard", "stranger", "revocation_unknown", "does not know this certificate")
    assert responder.errors == []
    assert responder.requests == 4


def test_unreachable_responder_soft_warns_and_hard_refuses(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{probe.getsockname()[1]}/ocsp"  # closed again before use
    leaf = issue(lab.server_ca, "down", ocsp_url=dead_url)
    server = lab.serve("down", leaf)
    lab.route("soft", server, revocation="soft")
    lab.route("hard", server, revocation="hard")
    daemon = lab.daemon()

    assert_passes(daemon, "soft")
    status = daemon.status()
    soft = status["routes"]["soft"]
    assert soft["warnings"] == {"revocation_unknown": 1}
    assert "unknown" in soft["last_warning"] and "unreachable" in soft["last_warning"]
    assert 'revocation = "soft"' in soft["last_warning"]
    assert any(w.startswith("route soft: revocation status") for w in status["warnings"])
    hard = assert_refused(daemon, lab, "hard", "down", "revocation_unknown", "unreachable", 'revocation = "hard"')
    assert hard["last_warning"] is None
    # `mtls-sidecar check`, through the daemon's control API
    capsys.readouterr()
    assert main(["check", "soft"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # issue 15: the presented client certificate is named on the line after the verdict
    assert lines[0].startswith("ok: ") and lines[1].startswith("presented: ")
    assert lines[2].startswith("warning: revocation status of server certificate")
    assert main(["check", "hard"]) == 1
    out = capsys.readouterr().out
    assert (
        out.startswith("problem: 127.0.0.1:") and "connection refused" in out and "fix: make the OCSP responder" in out
    )


def test_crl_from_a_file_and_from_a_distribution_point(lab: Lab) -> None:
    dp = lab.stack.enter_context(StaticServer())
    url = dp.url("/issuer.crl")
    good_file, revoked_file = issue(lab.server_ca, "good-file"), issue(lab.server_ca, "revoked-file")
    good_dp = issue(lab.server_ca, "good-dp", crl_url=url)
    revoked_dp = issue(lab.server_ca, "revoked-dp", crl_url=url)
    crl = make_crl(lab.server_ca, [revoked_file.cert, revoked_dp.cert])
    crl_file = lab.folder / "issuer.crl"
    crl_file.write_bytes(crl)
    forged = lab.folder / "forged.crl"
    forged.write_bytes(make_crl(lab.server_ca, [], signer=CA("Forger").root_key))
    dp.files["/issuer.crl"] = make_crl(lab.server_ca, [revoked_dp.cert], encoding=serialization.Encoding.DER)
    lab.route("file_good", lab.serve("good-file", good_file), revocation="hard", crl_file=str(crl_file))
    lab.route("file_revoked", lab.serve("revoked-file", revoked_file), revocation="hard", crl_file=str(crl_file))
    lab.route("file_forged", lab.servers["revoked-file"], revocation="hard", crl_file=str(forged))
    lab.route("dp_good", lab.serve("good-dp", good_dp), revocation="hard")
    lab.route("dp_revoked", lab.serve("revoked-dp", revoked_dp), revocation="soft")
    daemon = lab.daemon()

    assert_passes(daemon, "file_good")
    assert_refused(
        daemon, lab, "file_revoked", "revoked-file", "server_certificate_revoked", "CRL file", "keyCompromise"
    )
    assert_refused(daemon, lab, "file_forged", "revoked-file", "revocation_unknown", "signature does not verify")
    assert_passes(daemon, "dp_good")
    assert_passes(daemon, "dp_good")
    assert dp.requests == 1  # cached until the CRL's nextUpdate
    assert_refused(daemon, lab, "dp_revoked", "revoked-dp", "server_certificate_revoked", url)


def test_check_explains_each_policy_refusal_in_one_line(lab: Lab) -> None:
    """`mtls-sidecar check ROUTE` (check_route) reaches the same verdicts as the tunnel and says what to do."""
    responder = lab.stack.enter_context(
        OpenSSLResponder(lab.folder / "ocsp", lab.server_ca, responder_leaf(lab.server_ca))
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{probe.getsockname()[1]}/ocsp"
    leaf = issue(lab.server_ca, "orders", uris=["spiffe://example.test/api/orders"], ocsp_url=responder.url)
    revoked = issue(lab.server_ca, "revoked", ocsp_url=responder.url)
    down = issue(lab.server_ca, "down", ocsp_url=dead_url)
    responder.publish(good=[leaf], revoked=[revoked])
    orders, gone, nobody = lab.serve("orders", leaf), lab.serve("revoked", revoked), lab.serve("down", down)
    lab.route("ok", orders, pin_sha256=[spki_sha256(leaf.cert)], revocation="hard")
    lab.route("pin", orders, pin_sha256=[spki_sha256(revoked.cert)])
    lab.route("uri", orders, allowed_uri_sans=["spiffe://example.test/db/*"])
    lab.route("revoked", gone, revocation="soft")
    lab.route("down_hard", nobody, revocation="hard")
    lab.route("down_soft", nobody, revocation="soft")
    config = load_config(
        write_config(lab.home / "config.toml", identities={"dev": {"renew": "none"}}, routes=lab.routes)
    )
    selection = select("dev", read_identity_folder(lab.home / "keystore" / "dev", Secrets()), datetime.now(UTC))

    def check(name: str) -> CheckResult:
        return asyncio.run(check_route(config.routes[name], selection, after_handshake_wait=0.2))

    ok = check("ok")
    assert (ok.ok, ok.cause, ok.details["warnings"]) == (True, "ok", [])
    pin = check("pin")
    assert (pin.cause, pin.details["server_pin"]) == ("pin_mismatch", spki_sha256(leaf.cert))
    assert "not pinned" in pin.message and f"sha256/{spki_sha256(leaf.cert)}" in (pin.fix or "")
    uri = check("uri")
    assert uri.cause == "uri_san_not_allowed" and "spiffe://example.test/api/orders" in (uri.fix or "")
    gone_result = check("revoked")
    assert gone_result.cause == "server_certificate_revoked" and "keyCompromise" in gone_result.message
    assert "nothing to change on this side" in (gone_result.fix or "")
    hard = check("down_hard")
    assert hard.cause == "revocation_unknown" and "connection refused" in hard.message
    assert 'revocation = "soft"' in (hard.fix or "")
    soft = check("down_soft")
    assert soft.ok and any("unreachable" in w for w in soft.details["warnings"])
    for result in (pin, uri, gone_result, hard):
        assert "\n" not in result.message and result.message.startswith("127.0.0.1:")


def test_soft_warning_clears_once_an_answer_comes(lab: Lab) -> None:
    """crl_file missing: soft lets the connection through with a warning; once the CRL is
    there, the next connection gets an answer and the warning is gone from status."""
    crl_file = lab.folder / "later.crl"
    leaf = issue(lab.server_ca, "later")
    lab.route("soft", lab.serve("later", leaf), revocation="soft", crl_file=str(crl_file))
    daemon = lab.daemon()
    assert_passes(daemon, "soft")
    route = daemon.status()["routes"]["soft"]
    assert "cannot read it: no such file or directory" in route["last_warning"]
    crl_file.write_bytes(make_crl(lab.server_ca, []))
    assert_passes(daemon, "soft")
    status = daemon.status()
    assert status["routes"]["soft"]["last_warning"] is None
    assert status["routes"]["soft"]["warnings"] == {"revocation_unknown": 1}
    assert not any(w.startswith("route soft:") for w in status["warnings"])
    crl_file.write_bytes(make_crl(lab.server_ca, [leaf.cert]))  # revoked now: refused, soft or not
    assert_refused(daemon, lab, "soft", "later", "server_certificate_revoked", "CRL file")
