"""The ACME provider against a real ACME server (Debian's pebble), over loopback.

What is checked is what the daemon relies on: a chain whose leaf names what we asked for, is
good for TLS client authentication, lives as long as the CA said and chains to the CA's roots;
a key that matches; the account key kept private and reused; and every failure a single
readable line that names the server, the port or the config key at fault.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from sidecar.config import IdentitySpec
from sidecar.credentials import Candidate, Secrets, candidates_from_files
from sidecar.errors import ConfigError
from sidecar.renewal.http01 import Http01Responder
from sidecar.renewal.providers import make_provider
from sidecar.renewal.providers.acme import ACCOUNT_FILE, AcmeProvider, csr_subject, default_identifiers
from sidecar.renewal.providers.base import NewCredential, ProviderContext, ProviderError, RenewalRequest
from sidecar.renewal.settings import AcmeSettings
from tests.identity_specs import identity_spec
from tests.pebble import Pebble, pebble_server, pick_port
from tests.waiting import wait_until

NAME = "dev"
DNS_NAME = "dev.example.test"
VALIDITY_S = 120
ISSUE_DEADLINE_S = 20.0  # an issuance takes about 1 s; this only bounds a broken one
DOWN_DEADLINE_S = 5.0  # "the CA is down" must be reported quickly, not after acme_timeout


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    with pebble_server(tmp_path_factory.mktemp("pebble"), validity_seconds=VALIDITY_S) as server:
        yield server


def spec_for(server: Pebble | None, **options: Any) -> IdentitySpec:
    base: dict[str, Any] = {}
    if server is not None:
        base = {
            "acme_directory": server.directory_url,
            "acme_ca_file": str(server.listener_ca_file),
            "acme_http_port": server.http_port,
        }
    return identity_spec(NAME, renew="acme", subject="CN=dev,O=Example", **{**base, **options})


def issue(
    spec: IdentitySpec, folder: Path, current: Candidate | None = None, *, deadline: float = ISSUE_DEADLINE_S
) -> tuple[NewCredential, float]:
    """Run one issuance on a fresh event loop; return what it gave and how long it took."""
    provider = AcmeProvider(spec, ProviderContext(keystore=folder.parent))
    request = RenewalRequest(identity=spec, folder=folder, current=current, now=datetime.now(UTC))

    async def bounded() -> NewCredential:
        async with asyncio.timeout(deadline):
            return await provider.issue(request)

    started = time.monotonic()
    issued = asyncio.run(bounded())
    return issued, time.monotonic() - started


def issue_error(spec: IdentitySpec, folder: Path, *, deadline: float = ISSUE_DEADLINE_S) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        issue(spec, folder, deadline=deadline)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message, time.monotonic() - started


def parse_chain(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def as_candidate(issued: NewCredential) -> Candidate:
    found = candidates_from_files({"x.pem": issued.cert_chain_pem.strip() + b"\n" + issued.key_pem}, Secrets())
    assert len(found) == 1 and found[0].problem is None, found
    return found[0]


def public_der(key: Any) -> bytes:
    der: bytes = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def leaf_public_der(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def check_issued(issued: NewCredential, server: Pebble, names: Mapping[str, type[x509.GeneralName]]) -> Candidate:
    """The leaf names `names`, allows clientAuth, lives VALIDITY_S, chains to pebble's root; the key matches."""
    chain = parse_chain(issued.cert_chain_pem)
    assert len(chain) >= 2, "expected the leaf and pebble's intermediate"
    leaf, intermediates = chain[0], chain[1:]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    for name, kind in names.items():
        values = [str(v) for v in sans.get_values_for_type(kind)]  # type: ignore[arg-type]
        assert name in values, (name, values)
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    now = datetime.now(UTC)
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert abs(lifetime - timedelta(seconds=VALIDITY_S)) <= timedelta(seconds=2), lifetime
    assert abs(leaf.not_valid_after_utc - (now + timedelta(seconds=VALIDITY_S))) <= timedelta(seconds=30)
    # Chains to what pebble says its root and intermediate are, as a TLS server would check it.
    roots_and_intermediates = parse_chain(server.roots_pem())
    root, pebble_intermediate = roots_and_intermediates[0], roots_and_intermediates[1]
    assert intermediates[0] == pebble_intermediate
    verifier = PolicyBuilder().store(Store([root])).time(now).build_client_verifier()
    verifier.verify(leaf, intermediates)
    key = serialization.load_pem_private_key(issued.key_pem, password=None)
    assert issued.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    assert public_der(key) == leaf_public_der(leaf)
    return as_candidate(issued)


# --------------------------------------------------------------------------------------------
# against pebble


def test_enroll_then_renew_keeping_the_key_and_the_account(
    pebble: Pebble, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    folder = tmp_path / "keystore" / NAME
    spec = spec_for(pebble, acme_identifiers=[DNS_NAME], acme_email="dev@example.com", rekey=False)

    first, enroll_s = issue(spec, folder)
    current = check_issued(first, pebble, {DNS_NAME: x509.DNSName})
    leaf = parse_chain(first.cert_chain_pem)[0]
    assert leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == DNS_NAME

    account = folder / ACCOUNT_FILE
    assert stat.S_IMODE(account.stat().st_mode) == 0o600
    account_bytes = account.read_bytes()
    private_d = json.loads(account_bytes)["key"]["d"]

    # Renewal with rekey = false and no acme_identifiers: same key, names from the current certificate.
    renew_spec = spec_for(pebble, rekey=False)
    second, renew_s = issue(renew_spec, folder, current)
    renewed = check_issued(second, pebble, {DNS_NAME: x509.DNSName})
    assert renewed.cert is not None and current.cert is not None
    assert renewed.cert.serial_number != current.cert.serial_number
    assert leaf_public_der(renewed.cert) == leaf_public_der(current.cert)
    assert account.read_bytes() == account_bytes, "the account key must be reused, not replaced"

    # rekey = true (the default): a new key for the new certificate.
    third, rekey_s = issue(spec_for(pebble), folder, renewed)
    rekeyed = check_issued(third, pebble, {DNS_NAME: x509.DNSName})
    assert rekeyed.cert is not None
    assert leaf_public_der(rekeyed.cert) != leaf_public_der(current.cert)

    # No private key material in anything logged (the acme library logs requests at DEBUG).
    logged = caplog.text
    assert private_d not in logged
    assert b"PRIVATE KEY" not in logged.encode()
    for issued in (first, second, third):
        body = b"".join(issued.key_pem.splitlines()[1:-1]).decode()
        assert body[:40] not in logged
    print(f"\nACME issuance against pebble: enroll {enroll_s:.2f}s, renew {renew_s:.2f}s, rekey {rekey_s:.2f}s")
    assert max(enroll_s, renew_s, rekey_s) < 10, (enroll_s, renew_s, rekey_s)


def test_http01_answered_for_a_validating_ca(tmp_path: Path) -> None:
    """With PEBBLE_VA_ALWAYS_VALID off, pebble's VA really fetches the answer from our responder.

    DNS names cannot be checked that way here (no resolver), an IP identifier can: the VA
    connects to 127.0.0.1:httpPort.
    """
    with pebble_server(tmp_path / "pebble", validity_seconds=VALIDITY_S, always_valid=False) as server:
        issued, _ = issue(spec_for(server, acme_identifiers=["127.0.0.1"]), tmp_path / "keystore" / NAME)
        check_issued(issued, server, {"127.0.0.1": x509.IPAddress})

        # The responder on the wrong port: the VA cannot connect, the authorization fails, and says so.
        wrong_port = pick_port({server.http_port})
        message, _ = issue_error(
            spec_for(server, acme_identifiers=["127.0.0.1"], acme_http_port=wrong_port), tmp_path / "keystore" / "x"
        )
        assert "could not validate 127.0.0.1" in message and server.directory_url in message, message


def test_ca_down_is_reported_quickly_and_a_restart_recovers(tmp_path: Path) -> None:
    with pebble_server(tmp_path / "pebble", validity_seconds=VALIDITY_S) as server:
        folder = tmp_path / "keystore" / NAME
        spec = spec_for(server, acme_identifiers=[DNS_NAME])
        first_roots = server.roots_pem()
        server.stop()
        message, took = issue_error(spec, folder)
        assert message.startswith(f"cannot reach the ACME server at {server.directory_url}: "), message
        assert "connection refused" in message, message
        assert took < DOWN_DEADLINE_S, took

        server.start()
        assert server.roots_pem() != first_roots, "pebble makes a new root on every start"
        issued, _ = issue(spec, folder)
        check_issued(issued, server, {DNS_NAME: x509.DNSName})


def test_untrusted_acme_server_names_acme_ca_file(pebble: Pebble, tmp_path: Path) -> None:
    spec = spec_for(pebble, acme_identifiers=[DNS_NAME], acme_ca_file=None)
    message, _ = issue_error(spec, tmp_path / NAME)
    assert message.startswith(f"cannot verify the ACME server at {pebble.directory_url}: certificate verify failed")
    assert f"identities.{NAME}.acme_ca_file" in message


def test_a_url_that_is_not_an_acme_directory(pebble: Pebble, tmp_path: Path) -> None:
    url = f"https://127.0.0.1:{pebble.mgmt_port}/roots/0"
    message, _ = issue_error(spec_for(pebble, acme_identifiers=[DNS_NAME], acme_directory=url), tmp_path / NAME)
    assert url in message and f"identities.{NAME}.acme_directory" in message, message


def test_server_problem_document_is_one_line(pebble: Pebble, tmp_path: Path) -> None:
    """A contact pebble refuses: the problem type and detail, the server, and the key to fix."""
    spec = spec_for(pebble, acme_identifiers=[DNS_NAME], acme_email="dev@@example.com")
    message, _ = issue_error(spec, tmp_path / NAME)
    assert message.startswith(f"the ACME server at {pebble.directory_url} refused: urn:ietf:params:acme:error:")
    assert "invalidContact" in message and "dev@@example.com" in message, message
    assert message.endswith(f"check identities.{NAME}.acme_email"), message


# --------------------------------------------------------------------------------------------
# local failures: no server needed


def test_http_port_in_use_names_the_port_and_the_key(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        spec = spec_for(
            None, acme_directory="https://127.0.0.1:1/dir", acme_identifiers=[DNS_NAME], acme_http_port=port
        )
        message, took = issue_error(spec, tmp_path / NAME)
    assert f"127.0.0.1:{port}" in message and f"identities.{NAME}.acme_http_port" in message, message
    assert took < DOWN_DEADLINE_S
    assert not (tmp_path / NAME / ACCOUNT_FILE).exists(), "nothing is created before the responder is up"


@pytest.mark.parametrize(
    ("options", "key", "words"),
    [
        ({}, "acme_directory", "required"),
        ({"acme_directory": "http://acme.example/dir"}, "acme_directory", "https://"),
        ({"acme_directory": "not a url"}, "acme_directory", "https://"),
        ({"acme_directory": 42}, "acme_directory", "string"),
        ({"acme_challenge": "dns-01"}, "acme_challenge", "not supported"),
        ({"acme_challenge": "tls-alpn-01"}, "acme_challenge", "http-01"),
        ({"acme_http_port": 0}, "acme_http_port", "1-65535"),
        ({"acme_http_port": "5002"}, "acme_http_port", "1-65535"),
        ({"acme_http_port": True}, "acme_http_port", "1-65535"),
        ({"acme_identifiers": "dev.example.test"}, "acme_identifiers", "list"),
        ({"acme_identifiers": []}, "acme_identifiers", "list"),
        ({"acme_identifiers": ["*.example.test"]}, "acme_identifiers", "wildcard"),
        ({"acme_identifiers": ["not a name"]}, "acme_identifiers", "not a DNS name"),
        ({"acme_email": "nobody"}, "acme_email", "e-mail"),
        ({"rekey": "yes"}, "rekey", "true or false"),
        ({"acme_timeout": "soon"}, "acme_timeout", "duration"),
    ],
)
def test_bad_options_name_the_key(options: dict[str, Any], key: str, words: str) -> None:
    """Checked when the config is loaded (tests/test_provider_settings.py has the whole messages)."""
    merged = options if key == "acme_directory" else {"acme_directory": "https://acme.example/dir", **options}
    with pytest.raises(ConfigError) as caught:
        identity_spec(NAME, renew="acme", **merged)
    message = str(caught.value)
    assert caught.value.field == f"identities.{NAME}.{key}" and words in message, message


def test_a_missing_acme_ca_file_is_found_when_the_provider_is_made() -> None:
    spec = identity_spec(
        NAME, renew="acme", acme_directory="https://acme.example/dir", acme_ca_file="/nonexistent/ca.pem"
    )
    with pytest.raises(ProviderError) as caught:
        make_provider(spec, ProviderContext(keystore=Path("/nonexistent")))
    message = str(caught.value)
    assert f"identities.{NAME}.acme_ca_file" in message and "no such file" in message, message


def test_no_name_to_certify_says_which_key_to_set(tmp_path: Path) -> None:
    """No acme_identifiers, no current certificate, and a CN that is no host name (`CN=dev`)."""
    options = {"acme_directory": "https://127.0.0.1:1/dir", "acme_http_port": pick_port()}
    spec = identity_spec(NAME, renew="acme", subject="CN=dev", **options)
    message, _ = issue_error(spec, tmp_path / NAME)
    assert f"set identities.{NAME}.acme_identifiers" in message, message


def test_default_name_is_a_host_name_cn() -> None:
    spec = IdentitySpec(
        name=NAME, subject="CN=dev.example.test,O=Example", provider=AcmeSettings(directory="https://acme.example/dir")
    )
    assert default_identifiers(spec, None) == ("dev.example.test",)


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A loopback port that accepts TCP connections and never says a word (a hung CA)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", pick_port()))
        sock.listen(16)
        yield sock.getsockname()[1]


def test_a_silent_server_is_bounded_by_acme_timeout(silent_server: int, tmp_path: Path) -> None:
    url = f"https://127.0.0.1:{silent_server}/dir"
    spec = spec_for(None, acme_directory=url, acme_identifiers=[DNS_NAME], acme_http_port=pick_port(), acme_timeout=1)
    message, took = issue_error(spec, tmp_path / NAME)
    assert message == f"the ACME server at {url} did not answer in time", message
    assert took < DOWN_DEADLINE_S, took


def test_cancelling_an_issuance_frees_the_http01_port_at_once(tmp_path: Path) -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.1", pick_port()))
    silent.listen(16)
    http_port = pick_port({silent.getsockname()[1]})
    spec = spec_for(
        None,
        acme_directory=f"https://127.0.0.1:{silent.getsockname()[1]}/dir",
        acme_identifiers=[DNS_NAME],
        acme_http_port=http_port,
        acme_timeout=1,  # so the worker thread, still waiting on the silent server, gives up soon
    )
    provider = AcmeProvider(spec, ProviderContext(keystore=tmp_path))
    request = RenewalRequest(identity=spec, folder=tmp_path / NAME, current=None, now=datetime.now(UTC))

    def responder_up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", http_port), timeout=1).close()
        except OSError:
            return False
        return True

    def workers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == f"acme issuance for {NAME}"]

    async def scenario() -> float:
        task = asyncio.create_task(provider.issue(request))
        await asyncio.to_thread(wait_until, responder_up, 5.0, "the http-01 responder")
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - started

    try:
        took = asyncio.run(scenario())
        assert took < 1.0, took
        assert not responder_up(), "the responder must stop with the issuance"
    finally:
        # The worker thread cannot be interrupted mid-request; it ends at its request timeout.
        # (Closing the silent server under it instead races CPython's ssl, which can then leak
        # the socket: a ResourceWarning, fatal under -W error.)
        wait_until(lambda: not workers(), 5.0, "the ACME worker thread to end")
        silent.close()


def test_account_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / NAME
    folder.mkdir()
    account = folder / ACCOUNT_FILE
    account.write_text("{}")
    account.chmod(0o644)
    spec = spec_for(
        None, acme_directory="https://127.0.0.1:1/dir", acme_identifiers=[DNS_NAME], acme_http_port=pick_port()
    )
    message, _ = issue_error(spec, folder)
    assert "readable by others" in message and f"chmod 600 {account}" in message, message


def test_csr_subject_keeps_the_rest_of_subject_but_names_an_identifier() -> None:
    assert csr_subject("CN=dev,O=Example", ["a.example.test"]).rfc4514_string() == "CN=a.example.test,O=Example"
    assert csr_subject("CN=b.example.test,O=Ex", ["a.example.test", "b.example.test"]).rfc4514_string() == (
        "CN=b.example.test,O=Ex"
    )
    assert csr_subject("not a subject", ["a.example.test"]).rfc4514_string() == "CN=a.example.test"
    assert csr_subject("CN=dev,O=Example", ["127.0.0.1"]).rfc4514_string() == "O=Example"


# --------------------------------------------------------------------------------------------
# the http-01 responder on its own


async def _http(port: int, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_responder_serves_published_tokens_only() -> None:
    async def scenario() -> None:
        async with Http01Responder(0) as responder:
            port = responder.port
            assert port != 0 and responder.is_running
            responder.publish("tok-1", "tok-1.thumbprint")

            def get(path: str, method: str = "GET") -> bytes:
                return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()

            assert await _http(port, get("/.well-known/acme-challenge/tok-1")) == (200, b"tok-1.thumbprint")
            assert (await _http(port, get("/.well-known/acme-challenge/tok-2")))[0] == 404
            assert (await _http(port, get("/")))[0] == 404
            assert (await _http(port, get("/.well-known/acme-challenge/tok-1", "POST")))[0] == 404
            assert await _http(port, get("/.well-known/acme-challenge/tok-1", "HEAD")) == (200, b"")
            assert (await _http(port, b"garbage\r\n\r\n"))[0] == 400
            responder.withdraw("tok-1")
            assert (await _http(port, get("/.well-known/acme-challenge/tok-1")))[0] == 404
            assert responder.answered == 2
        assert not responder.is_running
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    asyncio.run(scenario())
