"""Property-based: mutated config files and mutated credential bytes never crash the loader or
the keystore; every failure is a named error (ConfigError with a source; a candidate with a
plain-words problem). test_config.py adds random text and random values per key."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.config import parse_config
from sidecar.credentials import Secrets, candidates_from_files
from sidecar.errors import ConfigError
from sidecar.keystore import select
from tests.pki import CA, key_pem

# Runs anywhere: pure logic, or loopback sockets only (the macOS and Windows CI jobs run it).
pytestmark = pytest.mark.portable

FULL_CONFIG = """\
active_identity = "dev"
log_level = "info"

[identities.dev]
renew = "local-ca"
subject = "CN=dev"
lifetime = "7d"
renew_at = 0.66

[identities.bot]
renew = "command"
renew_command = ["./renew.sh", "bot"]
pkcs12_password_env = "BOT_P12_PASSWORD"

[routes.api]
listen = "127.0.0.1:8443"
target = "api.example.test:443"
server_name = "api.example.test"
alpn = ["h2", "http/1.1"]
connect_timeout = "10s"

[routes.cache]
listen = "[::1]:6380"
target = "10.0.0.5:6379"
identity = "bot"
"""

# One valid credential in each format, made once (test keys are generated at test time).
_CA = CA()
_LEAF = _CA.issue("dev")
_BUNDLE = _LEAF.chain_pem() + key_pem(_LEAF.key)
_ENCRYPTED_KEY = key_pem(_LEAF.key, password=b"secret")
_P12 = pkcs12.serialize_key_and_certificates(
    b"dev", _LEAF.key, _LEAF.cert, None, serialization.BestAvailableEncryption(b"secret")
)
_DER = _LEAF.cert.public_bytes(serialization.Encoding.DER)
_SECRETS = Secrets(pkcs12_password=b"secret", key_password=b"secret")
NOW = datetime.now(UTC)


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """`original` with a few random edits: bytes flipped, ranges cut, junk inserted."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        edit = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if edit == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif edit == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:
            del data[at:]
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(FULL_CONFIG.encode()))
def test_mutated_config_raises_only_config_error(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # load_config rejects non-UTF-8 bytes itself (tested in test_config)
    try:
        parse_config(text, source="config.toml", base_dir=Path("/home/dev/.config/mtls-sidecar"))
    except ConfigError as exc:
        assert exc.source == "config.toml"
        assert str(exc).strip()


def _check_candidates(files: dict[str, bytes]) -> None:
    candidates = candidates_from_files(files, _SECRETS)
    for candidate in candidates:
        if candidate.problem is None:  # only a certificate with its key is ever offered as usable
            assert candidate.cert is not None and candidate.key is not None
        else:
            assert candidate.problem.strip()
    selection = select("dev", candidates, NOW)
    if selection.selected is None:
        assert selection.why_unusable().strip()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["dev.pem", "dev.crt", "dev.p12", "dev.pfx"]),
    st.sampled_from(["bundle", "p12", "der"]).flatmap(
        lambda kind: mutated({"bundle": _BUNDLE, "p12": _P12, "der": _DER}[kind])
    ),
)
def test_mutated_credential_files_are_named_problems_never_crashes(name: str, data: bytes) -> None:
    _check_candidates({name: data})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(_LEAF.chain_pem()), mutated(_ENCRYPTED_KEY))
def test_mutated_certificate_and_key_pairs_never_crash(cert: bytes, key: bytes) -> None:
    _check_candidates({"dev.crt": cert, "dev.key": key})


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096), st.sampled_from(["a.pem", "a.crt", "a.key", "a.p12", "a.pfx"]))
def test_random_bytes_in_the_keystore_never_crash(data: bytes, name: str) -> None:
    _check_candidates({name: data})


def test_unmutated_inputs_are_accepted() -> None:
    """The seeds are valid, so the properties above exercise the interesting failures."""
    parse_config(FULL_CONFIG)
    for name, data in (("dev.pem", _BUNDLE), ("dev.p12", _P12)):
        (candidate,) = candidates_from_files({name: data}, _SECRETS)
        assert candidate.problem is None and candidate.key is not None


def test_a_damaged_extension_is_a_named_problem() -> None:
    """Found by the fuzzer: cryptography parses extensions lazily, so a certificate with a
    damaged KeyUsage loaded fine and crashed the selection rule later."""
    der = _LEAF.cert.public_bytes(serialization.Encoding.DER)
    key_usage = b"\x04\x04\x03\x02"  # OCTET STRING { BIT STRING (2 bytes) }: KeyUsage's value
    assert der.count(key_usage) == 1
    damaged = x509.load_der_x509_certificate(der.replace(key_usage, b"\x04\x04\x23\x02"))  # constructed tag
    data = damaged.public_bytes(serialization.Encoding.PEM) + key_pem(_LEAF.key)
    (candidate,) = candidates_from_files({"dev.pem": data}, _SECRETS)
    assert candidate.problem is not None and candidate.problem.startswith("malformed certificate:")
    assert select("dev", [candidate], NOW).selected is None
