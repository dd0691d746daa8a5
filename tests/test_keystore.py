"""The keystore rule, pure: candidates in, selection and plain-words reasons out."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from sidecar.credentials import Secrets, candidates_from_files
from sidecar.keystore import chains_to, read_identity_folder, select
from tests.pki import CA, key_pem, now, pem

# Runs anywhere: pure logic, or loopback sockets only (the macOS and Windows CI jobs run it).
pytestmark = pytest.mark.portable


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA("Keystore Test CA")


def reasons(selection) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {Path(r.candidate.file).name: r.reason for r in selection.rejected}


def test_newest_valid_wins_and_every_rejection_has_a_reason(ca: CA) -> None:
    t = now()
    older = ca.client("dev", not_before=t - timedelta(days=3), lifetime=timedelta(days=10))
    newest = ca.client("dev", not_before=t - timedelta(hours=1), lifetime=timedelta(days=10))
    expired = ca.client("dev", not_before=t - timedelta(minutes=30), not_after=t - timedelta(minutes=1))
    future = ca.client("dev", not_before=t + timedelta(days=2), lifetime=timedelta(days=10))
    mismatch = ca.client("dev", not_before=t - timedelta(minutes=10))
    no_client_auth = ca.client("dev", not_before=t - timedelta(minutes=5), eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
    p12 = ca.client("dev", not_before=t - timedelta(minutes=2))
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    p12_bytes = pkcs12.serialize_key_and_certificates(
        b"x", p12.key, p12.cert, None, serialization.BestAvailableEncryption(b"right")
    )
    other_key = ec.generate_private_key(ec.SECP256R1())
    files = {
        "a-older.pem": older.chain_pem() + key_pem(older.key),
        "b-newest.crt": newest.chain_pem(),
        "b-newest.key": key_pem(newest.key),
        "c-expired.pem": expired.chain_pem() + key_pem(expired.key),
        "d-future.pem": future.chain_pem() + key_pem(future.key),
        "e-mismatch.pem": mismatch.chain_pem() + key_pem(other_key),
        "f-server-only.pem": no_client_auth.chain_pem() + key_pem(no_client_auth.key),
        "g-corrupt.pem": b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
        "h-wrongpass.p12": p12_bytes,
        "README.txt": b"ignored",
    }
    candidates = candidates_from_files(files, Secrets(pkcs12_password=b"wrong"))
    selection = select("dev", candidates, t)

    assert selection.selected is not None
    assert selection.selected.cert == newest.cert
    assert selection.selected.key_file == "b-newest.key"
    why = reasons(selection)
    assert set(why) == {
        "c-expired.pem",
        "d-future.pem",
        "e-mismatch.pem",
        "f-server-only.pem",
        "g-corrupt.pem",
        "h-wrongpass.p12",
    }
    assert why["c-expired.pem"].startswith("expired 1 minute ago")
    assert why["d-future.pem"].startswith("not valid until ")
    assert "UTC" in why["d-future.pem"]
    assert why["e-mismatch.pem"] == "key does not match certificate"
    assert why["f-server-only.pem"] == "no clientAuth in extendedKeyUsage"
    assert why["g-corrupt.pem"].startswith("malformed certificate PEM")
    assert why["h-wrongpass.p12"].startswith("wrong PKCS#12 password")
    # the older valid one is usable but loses: it is not listed as rejected
    assert "a-older.pem" not in why


def test_ties_break_on_not_after_then_serial(ca: CA) -> None:
    t = now()
    start = t - timedelta(hours=1)
    short = ca.client("dev", not_before=start, lifetime=timedelta(days=1), serial=900)
    long = ca.client("dev", not_before=start, lifetime=timedelta(days=2), serial=100)
    long_higher = ca.client("dev", not_before=start, lifetime=timedelta(days=2), serial=200)
    files = {f"{i}.pem": leaf.chain_pem() + key_pem(leaf.key) for i, leaf in enumerate([short, long_higher, long])}
    selection = select("dev", candidates_from_files(files, Secrets()), t)
    assert selection.selected is not None
    assert selection.selected.cert.serial_number == 200


def test_no_usable_candidate_fails_closed_with_reasons(ca: CA) -> None:
    t = now()
    expired = ca.client("dev", not_before=t - timedelta(days=3), not_after=t - timedelta(days=2))
    selection = select(
        "dev", candidates_from_files({"old.pem": expired.chain_pem() + key_pem(expired.key)}, Secrets()), t
    )
    assert selection.selected is None
    assert "expired 2 days ago" in selection.why_unusable()
    assert "old.pem" in selection.why_unusable()
    assert select("dev", [], t).why_unusable() == "identity 'dev' has no certificates in its keystore folder"


def test_selection_is_a_function_of_now(ca: CA) -> None:
    t = now()
    current = ca.client("dev", not_before=t - timedelta(days=1), lifetime=timedelta(days=10))
    upcoming = ca.client("dev", not_before=t + timedelta(hours=1), lifetime=timedelta(days=10))
    candidates = candidates_from_files(
        {
            "current.pem": current.chain_pem() + key_pem(current.key),
            "upcoming.pem": upcoming.chain_pem() + key_pem(upcoming.key),
        },
        Secrets(),
    )
    assert select("dev", candidates, t).selected.cert == current.cert  # type: ignore[union-attr]
    later = select("dev", candidates, t + timedelta(hours=2))
    assert later.selected is not None and later.selected.cert == upcoming.cert
    assert select("dev", candidates, t).next_boundary() == upcoming.cert.not_valid_before_utc


def test_encrypted_keys_and_traditional_keys(ca: CA) -> None:
    leaf = ca.client("dev")
    rsa_leaf = ca.client("dev-rsa", rsa_key=True)
    files = {
        "enc.crt": leaf.chain_pem(),
        "enc.key": key_pem(leaf.key, password=b"s3cret"),
        "trad.pem": rsa_leaf.chain_pem() + key_pem(rsa_leaf.key, traditional=True),
    }
    no_password = select("dev", candidates_from_files(files, Secrets()), now())
    assert "private key is encrypted and no password is set" in reasons(no_password)["enc.crt"]
    wrong = select("dev", candidates_from_files(files, Secrets(key_password=b"nope")), now())
    assert reasons(wrong)["enc.crt"].startswith("wrong key password")
    right = candidates_from_files(files, Secrets(key_password=b"s3cret"))
    assert all(c.problem is None for c in right)


def test_pkcs12_without_password_and_with_the_right_one(ca: CA, tmp_path: Path) -> None:
    leaf = ca.client("dev")
    path = leaf.write_p12(tmp_path, "dev.p12", b"pw")
    data = {"dev.p12": path.read_bytes()}
    missing = candidates_from_files(data, Secrets())[0]
    assert missing.problem is not None and "needs a password" in missing.problem
    ok = candidates_from_files(data, Secrets(pkcs12_password=b"pw"))[0]
    assert ok.problem is None and ok.cert == leaf.cert


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "not a PEM file"),
        (b"hello world", "not a PEM file"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "no certificate in this PEM file"),
    ],
)
def test_malformed_files_become_named_problems(content: bytes, expected: str) -> None:
    (candidate,) = candidates_from_files({"bad.pem": content}, Secrets())
    assert candidate.problem is not None and candidate.problem.startswith(expected)


def test_certificate_without_key_and_key_without_certificate(ca: CA) -> None:
    leaf = ca.client("dev")
    found = candidates_from_files({"lonely.crt": leaf.chain_pem(), "orphan.key": key_pem(leaf.key)}, Secrets())
    problems = {c.file: c.problem for c in found}
    assert problems["lonely.crt"] == "no private key (expected one in this file or in lonely.key beside it)"
    assert problems["orphan.key"] == "private key with no certificate (expected orphan.crt or orphan.pem beside it)"


def test_key_usage_without_digital_signature_is_rejected(ca: CA) -> None:
    leaf = ca.client("dev", digital_signature=False)
    selection = select("dev", candidates_from_files({"ku.pem": leaf.chain_pem() + key_pem(leaf.key)}, Secrets()), now())
    assert reasons(selection)["ku.pem"].startswith("keyUsage does not allow digitalSignature")


def test_issuer_anchor_must_be_reached_through_the_chain() -> None:
    root = CA("Anchor Root", with_intermediate=True)
    stranger = CA("Stranger Root")
    leaf = root.client("dev")
    assert root.intermediate is not None
    assert chains_to(leaf.cert, [root.intermediate], [root.root])
    assert not chains_to(leaf.cert, [], [root.root])  # intermediate missing from the file
    assert not chains_to(leaf.cert, [root.intermediate], [stranger.root])
    files = {"dev.pem": leaf.chain_pem() + key_pem(leaf.key)}
    ok = select("dev", candidates_from_files(files, Secrets()), now(), [root.root])
    assert ok.selected is not None
    refused = select("dev", candidates_from_files(files, Secrets()), now(), [stranger.root])
    assert refused.selected is None
    assert "does not chain to the identity's issuer (CN=Stranger Root)" in refused.why_unusable()


def test_read_identity_folder_names_files_by_path(ca: CA, tmp_path: Path) -> None:
    leaf = ca.client("dev")
    leaf.write_pair(tmp_path / "dev", "one")
    (tmp_path / "dev" / ".one.crt.abc.tmp").write_bytes(b"half written")
    candidates = read_identity_folder(tmp_path / "dev", Secrets())
    assert [Path(c.file).name for c in candidates] == ["one.crt"]
    assert candidates[0].key_file == str(tmp_path / "dev" / "one.key")
    assert read_identity_folder(tmp_path / "missing", Secrets()) == []


def test_pem_helper_round_trip(ca: CA) -> None:
    assert pem(ca.root).startswith(b"-----BEGIN CERTIFICATE-----")


# A certificate whose serial was mutated to a negative number (the fuzzer's find; no key needed).
NEGATIVE_SERIAL_PEM = b"""-----BEGIN CERTIFICATE-----
MIIBXDCCAQKgAwIBAgIUgBKtXSURfkV+s5IUt2zm/HQRR3kwCgYIKoZIzj0EAwIw
FzEVMBMGA1UEAwwMVGVzdCBSb290IENBMB4XDTI2MTEzMDE1NTY1NloXDTI2MTIw
NzE1NTY1NlowDjEMMAoGA1UEAwwDZGV2MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcD
QgAEYmohNTbzNBX10SL8YafP77EzyfC80eYe44F1qY8uMZLkTSGnnDvOPm3AbhaU
al/wq/iIlhoNhX/glTHE/77MBKM1MDMwDAYDVR0TAQH/BAIwADAOBgNVHQ8BAf8E
BAMCB4AwEwYDVR0lBAwwCgYIKwYBBQUHAwIwCgYIKoZIzj0EAwIDSAAwRQIgDCZw
LuMJV478QQlwmxJKbttOFwt7D0ix0h/KGTVizVACIQD33eI7c5xmonsnk8zkPDm5
jIDtLKxSZ7fbHlDM61Bp/g==
-----END CERTIFICATE-----
"""


def test_a_certificate_with_a_negative_serial_is_malformed_not_a_warning() -> None:
    """Found by the fuzzer: cryptography only warns about a serial that is not positive (RFC 5280
    forbids it); the keystore calls the candidate malformed instead of letting the warning out."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        [candidate] = candidates_from_files({"dev.pem": NEGATIVE_SERIAL_PEM}, Secrets())
    assert candidate.cert is None
    assert candidate.problem is not None and "malformed certificate PEM" in candidate.problem
    assert "serial number" in candidate.problem
