"""Passwords from the OS keyring (the optional `keyring` extra), never from the config file.

The OS keyrings (Secret Service, macOS Keychain, Windows Credential Locker) need a desktop
session that this machine does not have, so the keyring package is given an in-memory
backend of the test's own; everything from `keyring.get_password` on is the real code.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import keyring
import pytest
from keyring.backend import KeyringBackend

from sidecar.cli import main
from sidecar.config import IdentitySpec
from sidecar.credentials import candidates_from_files
from sidecar.identities import KeyringUnavailable, secrets_for
from tests.daemon_runner import DaemonThread
from tests.scenario import Pki, write_config
from tests.waiting import wait_until

PASSWORD = "from-the-keyring-Pa55"


class MemoryKeyring(KeyringBackend):
    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.entries.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.entries[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self.entries.pop((service, username), None)


@pytest.fixture
def memory_keyring() -> Iterator[MemoryKeyring]:
    before = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(before)


def spec(**kwargs: object) -> IdentitySpec:
    return IdentitySpec(name="dev", **kwargs)  # type: ignore[arg-type]


def test_the_environment_wins_then_the_keyring(memory_keyring: MemoryKeyring) -> None:
    memory_keyring.set_password("mtls-sidecar", "dev", PASSWORD)
    both = spec(pkcs12_password_env="DEV_P12", pkcs12_password_keyring=("mtls-sidecar", "dev"))
    from_env = secrets_for(both, {"DEV_P12": "from-env"})
    assert from_env.pkcs12_password == b"from-env" and from_env.pkcs12_password_source == "environment variable DEV_P12"
    from_keyring = secrets_for(both, {})
    assert from_keyring.pkcs12_password == PASSWORD.encode()
    assert from_keyring.pkcs12_password_source == "OS keyring entry mtls-sidecar/dev"
    assert PASSWORD not in repr(from_keyring)


def test_an_empty_or_missing_keyring_says_what_to_do(memory_keyring: MemoryKeyring) -> None:
    empty = secrets_for(spec(key_password_keyring=("mtls-sidecar", "dev-key")), {})
    assert empty.key_password is None
    assert empty.key_password_source.endswith("(store it with: keyring set mtls-sidecar dev-key)")

    def unavailable(service: str, username: str) -> str | None:
        raise KeyringUnavailable("the keyring package is not installed (pip install 'mtls-sidecar[keyring]')")

    missing = secrets_for(spec(key_password_keyring=("mtls-sidecar", "dev-key")), {}, unavailable)
    assert "pip install 'mtls-sidecar[keyring]'" in missing.key_password_source
    none = secrets_for(spec(), {})
    assert none.key_password_source == "neither key_password_env nor key_password_keyring is set"


def test_a_pkcs12_identity_unlocked_from_the_keyring(
    memory_keyring: MemoryKeyring, isolated_home: Path, tmp_path: Path
) -> None:
    pki = Pki.create(tmp_path / "pki")
    pki.client_ca.client("dev").write_p12(isolated_home / "keystore" / "dev", "dev.p12", PASSWORD.encode())
    config = write_config(
        isolated_home / "config.toml",
        identities={"dev": {"renew": "none", "pkcs12_password_keyring": "mtls-sidecar/dev"}},
        routes={},
    )
    with DaemonThread(config) as daemon:
        dev = daemon.status()["identities"]["dev"]
        assert dev["selected"] is None
        assert "store it with: keyring set mtls-sidecar dev" in dev["candidates"][0]["reason"]
        memory_keyring.set_password("mtls-sidecar", "dev", PASSWORD)
        daemon.call(lambda d: d.keystore_changed())  # the re-read runs off the loop: wait for it
        selected = wait_until(lambda: daemon.status()["identities"]["dev"]["selected"], what="the re-read")
    assert selected["subject"] == "CN=dev"


def test_an_unset_variable_is_not_a_wrong_password(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    p12 = pki.client_ca.client("alice").write_p12(tmp_path, "corp.p12", PASSWORD.encode())
    files = {"corp.p12": p12.read_bytes()}
    named = spec(pkcs12_password_env="CORP_P12")
    (unset,) = candidates_from_files(files, secrets_for(named, {}))
    assert unset.problem == "PKCS#12 file needs a password: environment variable CORP_P12 is not set"
    (wrong,) = candidates_from_files(files, secrets_for(named, {"CORP_P12": "nope"}))
    assert wrong.problem == "wrong PKCS#12 password (from environment variable CORP_P12)"
    (unnamed,) = candidates_from_files(files, secrets_for(spec(), {}))
    assert unnamed.problem == (
        "PKCS#12 file needs a password and none is set (neither pkcs12_password_env nor pkcs12_password_keyring is set)"
    )


def test_import_names_a_keyring_entry_it_can_read_and_stores_no_password(
    memory_keyring: MemoryKeyring, isolated_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = Pki.create(tmp_path / "pki")
    p12 = pki.client_ca.client("alice.corp").write_p12(tmp_path / "in", "corp.p12", PASSWORD.encode())
    argv = ["identity", "import", str(p12), "--name", "company", "--password-keyring", "mtls-sidecar/company"]
    assert main(argv) == 1  # nothing stored under that entry yet: import stores nothing itself
    err = capsys.readouterr().err
    assert (
        "OS keyring entry mtls-sidecar/company, which is empty (store it with: keyring set mtls-sidecar company)" in err
    )
    assert not (isolated_home / "config.toml").exists() and not (isolated_home / "keystore").exists()

    memory_keyring.set_password("mtls-sidecar", "company", PASSWORD)
    assert main(argv) == 0
    assert 'pkcs12_password_keyring = "mtls-sidecar/company"' in capsys.readouterr().out
    text = (isolated_home / "config.toml").read_text()
    assert tomllib.loads(text)["identities"]["company"] == {
        "renew": "none",
        "pkcs12_password_keyring": "mtls-sidecar/company",
    }
    assert PASSWORD not in text
    assert (isolated_home / "keystore" / "company" / "corp.p12").read_bytes() == p12.read_bytes()
