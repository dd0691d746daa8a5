"""A company credential in one command: `identity import` checks it, copies it and adds its
identity to config.toml (comments kept); a running daemon takes it up, and the dev CA never
issues into a folder that holds another issuer's certificates. `identity new` registers too.

Real files, the real CLI (`main`), a real daemon and a real TLS server that asks for the
company certificate.
"""

from __future__ import annotations

import socket
import stat
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from sidecar.cli import main
from sidecar.devca import load_or_create_ca
from sidecar.paths import resolve_places
from sidecar.statusview import render_status
from tests.daemon_runner import DaemonThread
from tests.pki import CA, Leaf, key_pem
from tests.scenario import Pki, recv_all
from tests.tlsserver import ScriptedTLSServer
from tests.waiting import wait_until

PASSWORD = "c0rp-Pa55-from-IT"

CONFIG = """\
# my notes about this laptop: keep them
active_identity = "dev"
log_level = "info"

# the developer's own identity, from the dev CA
[identities.dev]
renew = "local-ca"   # renewed every week
subject = "CN=dev"

# routes come next; they are added with `route add`
"""


def company_ca() -> CA:
    return CA("Example Corp Issuing CA 1", with_intermediate=True)


def lines_in_order(old: str, new: str) -> bool:
    """Every line of `old` is in `new`, in the same order (nothing of the user's was lost or moved)."""
    remaining = iter(new.splitlines())
    return all(any(line == candidate for candidate in remaining) for line in old.splitlines())


def identity_table(config: Path, name: str) -> dict[str, Any]:
    table: dict[str, Any] = tomllib.loads(config.read_text())["identities"][name]
    return table


def der(leaf: Leaf) -> bytes:
    return leaf.cert.public_bytes(serialization.Encoding.DER)


# -- the whole task, against a running daemon -----------------------------------------------


def test_a_company_p12_is_one_command_and_a_running_daemon_presents_it(
    isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    corp = company_ca()
    leaf = corp.client("alice.corp")
    p12 = leaf.write_p12(tmp_path / "Downloads", "corp.p12", PASSWORD.encode())
    pki = Pki.create(tmp_path / "pki")  # the server's certificate; the server trusts only the company CA
    config = isolated_home / "config.toml"
    config.write_text(CONFIG)
    keystore = isolated_home / "keystore"
    server = ScriptedTLSServer(
        cert=pki.server_cert,
        key=pki.server_key,
        client_ca=corp.write_root(tmp_path / "corp-root.pem"),
        require_client_cert=True,
        mode="echo",
    )
    with server, DaemonThread(config) as daemon:
        argv = ["identity", "import", str(p12), "--name", "company", "--password-env", "CORP_P12"]

        # the variable is not set: said as such, not as a wrong password; nothing copied or written
        monkeypatch.delenv("CORP_P12", raising=False)
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "environment variable CORP_P12 is not set" in err and "nothing was imported" in err
        assert "wrong" not in err
        assert not (keystore / "company").exists()
        assert config.read_text() == CONFIG

        # set, but to something else: a wrong password, said differently
        monkeypatch.setenv("CORP_P12", "not-the-password")
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "wrong PKCS#12 password (from environment variable CORP_P12)" in err and "is not set" not in err
        assert not (keystore / "company").exists()
        assert config.read_text() == CONFIG

        monkeypatch.setenv("CORP_P12", PASSWORD)
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "imported CN=alice.corp (issued by CN=Example Corp Issuing CA 1 Intermediate" in out
        assert f'{config}: added [identities.company] with renew = "none", pkcs12_password_env = "CORP_P12"' in out
        copied = keystore / "company" / "corp.p12"
        assert copied.read_bytes() == p12.read_bytes() and stat.S_IMODE(copied.stat().st_mode) == 0o600
        text = config.read_text()
        assert identity_table(config, "company") == {"renew": "none", "pkcs12_password_env": "CORP_P12"}
        assert identity_table(config, "dev") == {"renew": "local-ca", "subject": "CN=dev"}
        assert lines_in_order(CONFIG, text), text
        assert text.index("[identities.company]") < text.index("# routes come next")  # with its kind
        assert PASSWORD not in text

        # the daemon reloads its config by itself and presents the company certificate
        def company_selected() -> dict[str, Any] | None:
            selected: dict[str, Any] | None = daemon.status()["identities"].get("company", {}).get("selected")
            return selected

        selected = wait_until(company_selected, timeout=15, what="the daemon to take up identity company")
        assert selected["subject"] == "CN=alice.corp"
        assert main(["route", "add", "corp", "--listen", "127.0.0.1:0", "--target", f"127.0.0.1:{server.port}",
                     "--server-name", "localhost", "--ca-file", str(pki.server_ca_file),
                     "--identity", "company"]) == 0  # fmt: skip
        capsys.readouterr()
        with daemon.connect("corp") as sock:
            sock.sendall(b"hello from the company identity")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"hello from the company identity"
        assert server.peer_certs == [der(leaf)]

        status = daemon.status()
        assert status["identities"]["company"]["renewal"]["provider"] == "none"
        assert main(["status"]) == 0
        table = capsys.readouterr().out
    company_row = next(line for line in table.splitlines() if line.startswith(" company"))
    assert "CN=alice.corp, expires in" in company_row and "none: valid" in company_row
    # the trap of the issue: the dev CA issued nothing into the company's folder
    assert sorted(p.name for p in (keystore / "company").iterdir()) == ["corp.p12"]


def test_the_dev_ca_never_enrolls_beside_a_foreign_credential(
    isolated_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # As in the issue: the identity added by hand with the default renew ("local-ca"), its
    # password variable not set, so the company .p12 cannot be opened and nothing is usable.
    monkeypatch.delenv("CORP_P12", raising=False)
    folder = isolated_home / "keystore" / "company"
    company_ca().client("alice.corp").write_p12(folder, "corp.p12", PASSWORD.encode())
    config = isolated_home / "config.toml"
    config.write_text('[identities.company]\npkcs12_password_env = "CORP_P12"\n')
    with caplog.at_level("WARNING", logger="sidecar.renewal"), DaemonThread(config) as daemon:
        company = daemon.status()["identities"]["company"]
        assert company["selected"] is None
        renewal = company["renewal"]
        assert renewal["provider"] == "local-ca" and renewal["state"] == "expired"
        assert renewal["last_error"].startswith("refused: the dev CA does not issue into identity company")
        assert "corp.p12 (a PKCS#12 file, which the dev CA never writes)" in renewal["last_error"]
        assert 'Set renew = "none"' in renewal["last_error"]
        reasons = [c["reason"] for c in company["candidates"]]
        assert reasons == ["PKCS#12 file needs a password: environment variable CORP_P12 is not set"]
        assert sorted(p.name for p in folder.iterdir()) == ["corp.p12"]

        # asked to renew now: refused again, still nothing written
        capsys.readouterr()
        assert main(["renew", "company"]) == 1  # `renew` waits and reports the outcome: refused
        assert "renewal of company failed (local-ca): refused: the dev CA does not issue" in capsys.readouterr().out
        wait_until(
            lambda: daemon.status()["identities"]["company"]["renewal"]["consecutive_failures"] >= 2,
            timeout=10,
            what="the renewal asked for to be refused",
        )
        assert sorted(p.name for p in folder.iterdir()) == ["corp.p12"]
        capsys.readouterr()
        assert main(["status"]) == 0
        table = capsys.readouterr().out
        assert "unusable: corp.p12: PKCS#12 file needs a password: environment variable CORP_P12 is not set" in table
        assert "local-ca: expired (refused: the dev CA does not issue into identity company" in table

        # once the foreign file is gone the dev CA may enroll, and does so at once (no back-off wait)
        (folder / "corp.p12").rename(tmp_path / "corp.p12")
        daemon.call(lambda d: d.keystore_changed())  # what the keystore watch does
        selected = wait_until(
            lambda: daemon.status()["identities"]["company"]["selected"], timeout=10, what="enrollment"
        )
    assert "CN=mtls-sidecar dev CA" in selected["issuer"]
    refusals = [r.getMessage() for r in caplog.records if "refused: the dev CA" in r.getMessage()]
    assert refusals and refusals[0].startswith("identity company: no usable certificate and none can be enrolled")


# -- the choices `identity import` makes ---------------------------------------------------


def test_a_dev_ca_credential_is_renewed_by_the_dev_ca_and_a_separate_encrypted_key_is_named(
    isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = isolated_home / "config.toml"
    config.write_text(CONFIG)
    now = datetime.now(UTC)
    ca = load_or_create_ca(resolve_places().ca, now)
    issued = ca.issue_client("CN=build-bot,O=Team", timedelta(days=3), now)
    bundle = tmp_path / "bot.pem"
    bundle.write_bytes(issued.cert_pem() + issued.key_pem())
    assert main(["identity", "import", str(bundle), "--name", "bot"]) == 0
    assert 'renew = "local-ca"' in capsys.readouterr().out
    assert identity_table(config, "bot") == {"renew": "local-ca", "subject": "CN=build-bot,O=Team"}

    # a certificate with its encrypted key in another file: --key, and the key's password source
    leaf = company_ca().client("svc.corp")
    cert = tmp_path / "svc.crt"
    cert.write_bytes(leaf.chain_pem())
    key = tmp_path / "private" / "svc-key.pem"
    key.parent.mkdir()
    key.write_bytes(key_pem(leaf.key, password=b"k3y-pass"))
    monkeypatch.setenv("SVC_KEY", "k3y-pass")
    assert main(["identity", "import", str(cert), "--key", str(key), "--name", "svc", "--password-env", "SVC_KEY"]) == 0
    out = capsys.readouterr().out
    assert identity_table(config, "svc") == {"renew": "none", "key_password_env": "SVC_KEY"}
    folder = isolated_home / "keystore" / "svc"
    assert sorted(p.name for p in folder.iterdir()) == ["svc.crt", "svc.key"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in folder.iterdir())
    assert "new connections as svc present it" in out
    assert lines_in_order(CONFIG, config.read_text())


def test_what_import_refuses_and_what_it_changes_in_an_existing_identity(
    isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = isolated_home / "config.toml"
    config.write_text(CONFIG + '\n[identities.company]\nrenew = "none"\npkcs12_password_env = "CORP_P12"\n')
    corp = company_ca()
    monkeypatch.setenv("CORP_P12", PASSWORD)
    first = corp.client("alice.corp").write_p12(tmp_path / "2026", "corp-2026.p12", PASSWORD.encode())
    assert main(["identity", "import", str(first), "--name", "company"]) == 0  # the config's password source
    assert "identities.company is there already, unchanged" in capsys.readouterr().out
    before = config.read_text()

    # a foreign certificate into the dev CA's identity: refused, nothing copied
    foreign = corp.client("bob.corp").write_bundle(tmp_path, "bob.pem")
    assert main(["identity", "import", str(foreign), "--name", "dev"]) == 1
    err = capsys.readouterr().err
    assert 'identity dev is renewed by the dev CA (renew = "local-ca")' in err and "nothing was imported" in err
    assert not (isolated_home / "keystore" / "dev").exists()

    # a dev-CA certificate into the company's identity: refused, it would be presented instead
    now = datetime.now(UTC)
    issued = load_or_create_ca(resolve_places().ca, now).issue_client("CN=alice", timedelta(days=1), now)
    dev_pem = tmp_path / "dev.pem"
    dev_pem.write_bytes(issued.cert_pem() + issued.key_pem())
    assert main(["identity", "import", str(dev_pem), "--name", "company"]) == 1
    assert "holds credentials from another issuer (corp-2026.p12" in capsys.readouterr().err

    # the same file again: it is there already
    assert main(["identity", "import", str(first), "--name", "company"]) == 1
    assert "corp-2026.p12 exists already" in capsys.readouterr().err
    assert config.read_text() == before

    # next year's file with another password in another variable: the identity's source changes,
    # and the import says which file no longer opens with it
    monkeypatch.setenv("CORP_P12_2027", "another-one")
    second = corp.client("alice.corp").write_p12(tmp_path / "2027", "corp-2027.p12", b"another-one")
    assert main(["identity", "import", str(second), "--name", "company", "--password-env", "CORP_P12_2027"]) == 0
    out = capsys.readouterr().out
    assert 'identities.company now has pkcs12_password_env = "CORP_P12_2027"' in out
    assert "note: corp-2026.p12 no longer opens with the new password source" in out
    assert identity_table(config, "company") == {"renew": "none", "pkcs12_password_env": "CORP_P12_2027"}
    assert lines_in_order(CONFIG, config.read_text())

    # bad names and values are the command line's fault, and name the flag
    assert main(["identity", "import", str(second), "--name", "../etc", "--password-env", "CORP_P12"]) == 2
    assert "--name = '../etc': invalid name" in capsys.readouterr().err
    assert main(["identity", "import", str(second), "--name", "x", "--password-env", "my secret pw"]) == 2
    err = capsys.readouterr().err
    assert "--password-env: not an environment variable name (value not shown)" in err and "secret" not in err


def test_a_credential_that_cannot_be_used_writes_nothing_even_on_a_fresh_machine(
    isolated_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expired = company_ca().client("old", not_before=datetime.now(UTC) - timedelta(days=30), lifetime=timedelta(days=1))
    pem = expired.write_bundle(tmp_path, "old.pem")
    assert main(["identity", "import", str(pem), "--name", "old"]) == 1
    assert "old.pem cannot be used: expired 29 days ago" in capsys.readouterr().err
    p12 = company_ca().client("p").write_p12(tmp_path, "p.p12", b"pw")
    assert main(["identity", "import", str(p12), "--name", "p"]) == 1
    assert "needs a password: say where it is with --password-env VAR or --password-keyring" in (
        capsys.readouterr().err
    )
    assert sorted(p.name for p in isolated_home.iterdir()) == []  # no config, no keystore

    # a usable one on a fresh machine: the first-run config is written, with the identity in it
    fresh = company_ca().client("fresh").write_bundle(tmp_path, "fresh.pem")
    assert main(["identity", "import", str(fresh), "--name", "fresh"]) == 0
    config = tomllib.loads((isolated_home / "config.toml").read_text())
    assert config["identities"]["fresh"] == {"renew": "none"}
    assert config["demo_service"]["enabled"] is True and len(config["identities"]) == 2


# -- identity new ----------------------------------------------------------------------------


def test_identity_new_registers_its_identity_once(isolated_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = isolated_home / "config.toml"
    config.write_text(CONFIG)
    assert main(["identity", "new", "ci-bot", "--lifetime", "2m"]) == 0
    assert f'{config}: added [identities.ci-bot] with renew = "local-ca"' in capsys.readouterr().out
    assert identity_table(config, "ci-bot") == {"renew": "local-ca", "lifetime": "2m"}
    assert lines_in_order(CONFIG, config.read_text())
    registered = config.read_text()
    assert main(["identity", "new", "ci-bot"]) == 0  # a second certificate; the config is left alone
    assert "added" not in capsys.readouterr().out
    assert config.read_text() == registered
    assert len(list((isolated_home / "keystore" / "ci-bot").iterdir())) == 2

    # never a dev-CA certificate into an identity whose certificates come from elsewhere
    config.write_text(registered + '\n[identities.company]\nrenew = "none"\n')
    assert main(["identity", "new", "company"]) == 1
    assert 'identity company has renew = "none"' in capsys.readouterr().err
    assert not (isolated_home / "keystore" / "company").exists()
    company_ca().client("x").write_bundle(isolated_home / "keystore" / "stray", "x.pem")
    assert main(["identity", "new", "stray"]) == 1  # not in config, but its folder holds another issuer's
    assert "holds credentials from another issuer (x.pem (issued by" in capsys.readouterr().err
    assert "stray" not in tomllib.loads(config.read_text())["identities"]


# -- the status table -----------------------------------------------------------------------


def test_status_table_lists_every_unusable_candidate_even_beside_a_usable_one() -> None:
    status = {
        "version": "t",
        "active_identity": "company",
        "identities": {
            "company": {
                "selected": {"subject": "CN=alice.corp", "not_after": "2030-01-01T00:00:00Z"},
                "candidates": [
                    {"file": "/k/company/corp-2027.p12", "usable": True, "reason": None},
                    {"file": "/k/company/corp-2026.p12", "usable": False, "reason": "expired 2 days ago"},
                    {"file": "/k/company/new.p12", "usable": False, "reason": "wrong PKCS#12 password (from x)"},
                ],
                "renewal": {"provider": "none", "state": "valid"},
                "problem": None,
            }
        },
        "routes": {},
        "warnings": [],
    }
    lines = render_status(status, datetime(2029, 1, 1, tzinfo=UTC)).splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("*company"))
    assert lines[row + 1 : row + 3] == [
        "  unusable: corp-2026.p12: expired 2 days ago",
        "  unusable: new.p12: wrong PKCS#12 password (from x)",
    ]
