"""The step-ca provider's pure parts: settings, the one-time token, CSRs, answers and errors."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy import jws
from josepy.jwk import JWKEC, JWKRSA

from sidecar.config import IdentitySpec
from sidecar.credentials import Candidate
from sidecar.errors import ConfigError
from sidecar.renewal.providers import make_provider
from sidecar.renewal.providers.base import CannotEnroll, ProviderContext, ProviderError, RenewalRequest
from sidecar.renewal.providers.stepca import (
    StepCAProvider,
    error_line,
    load_provisioner_key,
    make_csr,
    make_token,
    parse_certificate_response,
    run_token_command,
)
from sidecar.renewal.settings import StepCASettings
from sidecar.renewal.state import Event, RenewalStatus, State
from tests.identity_specs import identity_spec
from tests.pki import CA, pem
from tests.stepca import Provisioner

URL = "https://ca.example.test:9000"
NOW = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)


def spec(**options: Any) -> IdentitySpec:
    return identity_spec("laptop", renew="step-ca", subject="CN=laptop.example.test", **{"step_ca_url": URL, **options})


@pytest.fixture
def provisioner(tmp_path: Path) -> tuple[Provisioner, Path]:
    prov = Provisioner("admin", ec.generate_private_key(ec.SECP256R1()))
    return prov, prov.write_private_jwk(tmp_path / "provisioner.json")


# --- the token


def test_token_is_an_es256_jwt_with_the_claims_step_ca_checks(provisioner: tuple[Provisioner, Path]) -> None:
    prov, key_file = provisioner
    key = load_provisioner_key(key_file)
    token = make_token(key, "admin", "laptop.example.test", f"{URL}/1.0/sign", NOW)

    assert token.count(".") == 2
    signed = jws.JWS.from_compact(token.encode())
    assert signed.verify(JWKEC(key=prov.key.public_key()))  # signed by the provisioner's key
    header = json.loads(jws.b64.b64decode(token.split(".")[0]))
    assert header == {"alg": "ES256", "kid": prov.kid, "typ": "JWT"}
    claims = json.loads(signed.payload)
    issued = int(NOW.timestamp())
    assert claims["iss"] == "admin"
    assert claims["sub"] == "laptop.example.test"
    assert claims["sans"] == ["laptop.example.test"]
    assert claims["aud"] == "https://ca.example.test:9000/1.0/sign"
    assert claims["nbf"] == claims["iat"] == issued
    assert claims["exp"] == issued + 300
    assert len(claims["jti"]) == 64

    again = json.loads(jws.JWS.from_compact(make_token(key, "admin", "x", URL, NOW).encode()).payload)
    assert again["jti"] != claims["jti"]  # one-time: a fresh id every time


@pytest.mark.parametrize(
    ("key", "alg"),
    [
        (ec.generate_private_key(ec.SECP384R1()), "ES384"),
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
    ],
)
def test_other_provisioner_key_types_sign_with_their_algorithm(tmp_path: Path, key: Any, alg: str) -> None:
    jwk = (JWKRSA if isinstance(key, rsa.RSAPrivateKey) else JWKEC)(key=key)
    path = tmp_path / "key.json"
    path.write_text(json.dumps({**jwk.to_json(), "kid": "k1"}))
    token = make_token(load_provisioner_key(path), "admin", "laptop", URL, NOW)
    assert json.loads(jws.b64.b64decode(token.split(".")[0]))["alg"] == alg
    assert jws.JWS.from_compact(token.encode()).verify(jwk.public_key())


def test_kid_defaults_to_the_jwk_thumbprint(tmp_path: Path, provisioner: tuple[Provisioner, Path]) -> None:
    prov, key_file = provisioner
    data = json.loads(key_file.read_text())
    del data["kid"]
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(data))
    bare.chmod(0o600)
    assert load_provisioner_key(bare).kid == prov.kid


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("not json", "is not JSON"),
        ("[1]", "is not a JSON object"),
        ('{"protected": "x", "encrypted_key": "y", "ciphertext": "z"}', "step crypto jwe decrypt"),
        ('{"kty": "oct", "k": "c2VjcmV0"}', "must be a private EC or RSA JWK"),
    ],
)
def test_unusable_provisioner_keys_are_named_without_showing_them(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "key.json"
    path.write_text(content)
    with pytest.raises(ProviderError, match=expected) as caught:
        load_provisioner_key(path)
    assert "c2VjcmV0" not in str(caught.value)


def test_a_public_jwk_is_not_a_provisioner_key(tmp_path: Path, provisioner: tuple[Provisioner, Path]) -> None:
    prov, _ = provisioner
    path = tmp_path / "public.json"
    path.write_text(json.dumps(prov.public_jwk()))
    with pytest.raises(ProviderError, match='with its "d" member'):
        load_provisioner_key(path)


# --- the CSR


def test_csr_asks_for_the_subject_with_its_cn_as_the_only_san() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.load_pem_x509_csr(make_csr(key, "CN=laptop.example.test", "laptop.example.test").encode())
    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == "CN=laptop.example.test"
    sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["laptop.example.test"]

    by_ip = x509.load_pem_x509_csr(make_csr(key, "CN=127.0.0.1", "127.0.0.1").encode())
    ips = by_ip.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in ips.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


# --- answers and errors


def test_response_with_cert_chain_gives_leaf_then_chain() -> None:
    ca = CA("Step", with_intermediate=True)
    leaf = ca.client("laptop")
    assert ca.intermediate is not None
    chain = [pem(leaf.cert).decode(), pem(ca.intermediate).decode()]
    out = parse_certificate_response({"crt": "ignored", "certChain": chain})
    assert x509.load_pem_x509_certificates(out) == [leaf.cert, ca.intermediate]


def test_response_with_crt_and_ca_only_as_older_step_ca_sends() -> None:
    ca = CA("Step", with_intermediate=True)
    leaf = ca.client("laptop")
    assert ca.intermediate is not None
    out = parse_certificate_response({"crt": pem(leaf.cert).decode(), "ca": pem(ca.intermediate).decode()})
    assert x509.load_pem_x509_certificates(out) == [leaf.cert, ca.intermediate]


@pytest.mark.parametrize("body", [{}, {"certChain": []}, {"crt": "not a certificate"}, {"certChain": [1]}])
def test_response_without_a_certificate_is_an_error(body: dict[str, Any]) -> None:
    with pytest.raises(ProviderError, match="answered without a certificate"):
        parse_certificate_response(body)


def test_error_line_carries_status_and_the_cas_message() -> None:
    body = json.dumps({"status": 403, "message": "certificate  not\nauthorized"}).encode()
    assert (
        error_line(URL, "/1.0/renew", 403, "Forbidden", body)
        == f"step-ca at {URL} answered 403 Forbidden to /1.0/renew: certificate not authorized"
    )
    assert error_line(URL, "/1.0/sign", 502, "Bad Gateway", b"upstream gone\n").endswith(": upstream gone")
    assert error_line(URL, "/1.0/sign", 500, "Internal Server Error", b"").endswith(": no message")
    leaked = error_line(URL, "/1.0/sign", 500, "x", b"-----BEGIN PRIVATE KEY-----abc")
    assert "PRIVATE" not in leaked


# --- settings


# Checked when the config is loaded; tests/test_provider_settings.py has the whole messages.
@pytest.mark.parametrize(
    ("options", "key", "expected"),
    [
        ({"step_ca_url": None}, "step_ca_url", 'required with renew = "step-ca"'),
        ({"step_ca_url": "http://ca:9000"}, "step_ca_url", "must be an https:// URL"),
        ({"step_ca_url": "https://ca:99999"}, "step_ca_url", "bad port"),
        ({"step_ca_provisioner": "admin"}, "step_ca_provisioner", "needs step_ca_provisioner_key"),
        ({"step_ca_token_command": "step ca token x"}, "step_ca_token_command", "must be a non-empty list of strings"),
        ({"rekey": "yes"}, "rekey", "must be true or false"),
        ({"renew_timeout": "soon"}, "renew_timeout", "is not a duration"),
    ],
)
def test_bad_settings_name_the_key(options: dict[str, Any], key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        spec(**options)
    assert caught.value.field == f"identities.laptop.{key}" and expected in str(caught.value), caught.value


def test_key_file_without_provisioner_and_key_with_command_are_refused(
    provisioner: tuple[Provisioner, Path],
) -> None:
    _, key_file = provisioner
    with pytest.raises(ConfigError) as caught:
        spec(step_ca_provisioner_key=str(key_file))
    assert caught.value.field == "identities.laptop.step_ca_provisioner_key"
    assert "needs step_ca_provisioner too" in str(caught.value)
    with pytest.raises(ConfigError, match="not both"):
        spec(step_ca_provisioner="admin", step_ca_provisioner_key=str(key_file), step_ca_token_command=["x"])


def test_a_missing_root_is_found_when_the_provider_is_made() -> None:
    with pytest.raises(ProviderError, match=re.escape("identities.laptop.step_ca_root: no such file")):
        make_provider(spec(step_ca_root="/nonexistent/root.crt"), ProviderContext(keystore=Path("/nonexistent")))


def test_a_provisioner_key_others_can_read_is_refused(provisioner: tuple[Provisioner, Path]) -> None:
    _, key_file = provisioner
    key_file.chmod(0o644)
    with pytest.raises(ProviderError, match="chmod 600"):
        make_provider(
            spec(step_ca_provisioner="admin", step_ca_provisioner_key=str(key_file)),
            ProviderContext(keystore=Path("/nonexistent")),
        )


def test_subject_needs_a_cn() -> None:
    with pytest.raises(ConfigError) as caught:
        identity_spec("laptop", renew="step-ca", subject="O=Example", step_ca_url=URL)
    assert caught.value.field == "identities.laptop.subject" and "needs a CN" in str(caught.value)


def test_defaults_and_make_provider() -> None:
    settings = spec(step_ca_url=URL + "/").provider
    assert isinstance(settings, StepCASettings)
    assert settings.url == URL and settings.rekey is False and settings.timeout == 30.0
    assert settings.common_name == "laptop.example.test" and not settings.can_enroll
    provider = make_provider(spec(), ProviderContext(keystore=Path("/nonexistent")))
    assert isinstance(provider, StepCAProvider) and provider.name == "step-ca"


# --- enrollment without a way to enroll, and the token command


def test_no_usable_certificate_and_no_provisioner_cannot_enroll(tmp_path: Path) -> None:
    provider = StepCAProvider(spec(), ProviderContext(keystore=tmp_path))
    request = RenewalRequest(spec(), tmp_path / "laptop", None, NOW)
    with pytest.raises(CannotEnroll) as caught:
        asyncio.run(provider.issue(request))
    message = str(caught.value)
    assert f"step ca certificate laptop.example.test {tmp_path}/laptop/laptop.example.test.crt" in message
    assert f"--ca-url {URL}" in message


def test_an_expired_current_certificate_is_not_sent_to_renew(tmp_path: Path) -> None:
    """/renew refuses an expired certificate in the handshake: go straight to enrollment."""
    leaf = CA("Step", with_intermediate=True).client("laptop.example.test", lifetime=timedelta(hours=1))
    current = Candidate(file="old.pem", cert=leaf.cert, chain=tuple(leaf.chain), key=leaf.key)
    provider = StepCAProvider(spec(), ProviderContext(keystore=tmp_path))
    later = leaf.cert.not_valid_after_utc + timedelta(seconds=1)
    with pytest.raises(CannotEnroll):  # no network was tried: URL is not even resolvable
        asyncio.run(provider.issue(RenewalRequest(spec(), tmp_path, current, later)))


def test_cannot_enroll_moves_the_identity_to_expired_not_failing() -> None:
    status = RenewalStatus(provider="step-ca", state=State.EXPIRED).apply(Event.START, NOW)
    status = status.apply(Event.CANNOT_ENROLL, NOW, error="run step ca certificate ...")
    assert status.state is State.EXPIRED
    assert status.last_error == "run step ca certificate ..." and status.consecutive_failures == 1


def test_token_command_prints_the_token(tmp_path: Path) -> None:
    script = "import sys; print('warming up'); print('aaa.bbb.ccc')"
    assert asyncio.run(run_token_command([sys.executable, "-c", script], 10)) == "aaa.bbb.ccc"


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("import sys; sys.stderr.write('no provisioner named x\\n'); sys.exit(3)", "status 3: no provisioner named x"),
        ("print('token?')", "did not print a token"),
        ("import time; time.sleep(30)", "did not finish within 0.5s"),
    ],
)
def test_token_command_failures_are_one_line(script: str, expected: str) -> None:
    with pytest.raises(ProviderError, match=expected):
        asyncio.run(run_token_command([sys.executable, "-c", script], 0.5))
