"""The renewer's decisions with an injected clock and real providers (dev CA, real commands)."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sidecar.config import parse_config
from sidecar.devca import DevCA, load_or_create_ca, write_credential
from sidecar.errors import ConfigError
from sidecar.events import EventBus
from sidecar.identities import IdentityBook
from sidecar.renewal.providers import make_provider
from sidecar.renewal.providers.base import ProviderContext
from sidecar.renewal.scheduler import IdentityRenewer
from sidecar.renewal.state import State
from tests.pki import CA


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


def renewer_for(tmp_path: Path, identity_toml: str, clock: Clock, ca: DevCA | None = None) -> IdentityRenewer:
    config = parse_config(f"[identities.dev]\n{identity_toml}\n", source="test.toml")
    spec = config.identities["dev"]
    book = IdentityBook(config.identities, tmp_path / "keystore")
    book.refresh(clock())
    provider = make_provider(spec, ProviderContext(keystore=tmp_path / "keystore", dev_ca=ca))
    assert provider is not None
    import random

    return IdentityRenewer(spec, provider, book, EventBus(), clock=clock, rng=random.Random(7))


@pytest.fixture
def ca(tmp_path: Path) -> DevCA:
    return load_or_create_ca(tmp_path / "ca", datetime.now(UTC))


def test_enrolls_when_nothing_is_usable_then_waits_until_due(tmp_path: Path, ca: DevCA) -> None:
    clock = Clock(datetime.now(UTC))
    renewer = renewer_for(tmp_path, 'renew = "local-ca"\nlifetime = "3h"\nrenew_at = 0.5', clock, ca)
    plan = renewer.plan(clock())
    assert plan.due and plan.enrolling
    assert renewer.status.state is State.EXPIRED
    assert asyncio.run(renewer.attempt(enrolling=True))
    assert renewer.status.state is State.VALID
    selected = renewer.book.selection("dev").selected
    assert selected is not None and selected.cert is not None
    assert selected.cert.subject.rfc4514_string() == "CN=dev"
    assert renewer.events.history[-1]["type"] == "renewal.succeeded"
    transitions = [(e["previous"], e["state"]) for e in renewer.events.history if e["type"] == "renewal.state"]
    assert transitions == [("valid", "expired"), ("expired", "renewing"), ("renewing", "valid")]
    # the new credential (chain and key in one file) is private
    assert stat.S_IMODE(Path(selected.file).stat().st_mode) == 0o600

    # halfway through a 3 h life (minus up to 1/20 of jitter) it is due, not before
    start = selected.cert.not_valid_before_utc
    clock.now = start + timedelta(minutes=80)
    assert not renewer.plan(clock()).due
    clock.now = start + timedelta(minutes=91)
    assert renewer.plan(clock()).due
    assert renewer.status.state is State.RENEW_DUE
    old_serial = selected.cert.serial_number
    assert asyncio.run(renewer.attempt())
    new = renewer.book.selection("dev").selected
    assert new is not None and new.cert is not None and new.cert.serial_number != old_serial
    assert new.cert.public_key() != selected.cert.public_key()  # rekey by default


def test_the_first_enrollment_reads_as_one_in_the_log(
    tmp_path: Path, ca: DevCA, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(datetime.now(UTC))
    renewer = renewer_for(tmp_path, 'renew = "local-ca"\nlifetime = "3h"', clock, ca)
    with caplog.at_level("INFO", logger="sidecar.renewal"):
        assert renewer.plan(clock()).enrolling
        assert asyncio.run(renewer.attempt(enrolling=True))
    lines = renewal_lines(caplog)
    assert lines[:3] == [
        "identity dev: no certificate yet: enrolling",
        "identity dev: enrollment started (local-ca)",
        "identity dev: renewal state renewing → valid",
    ]
    assert len(lines) == 4 and lines[3].startswith("identity dev: enrollment succeeded in ")

    # a certificate that really expires later still says so
    selected = renewer.book.selection("dev").selected
    assert selected is not None and selected.cert is not None
    clock.now = selected.cert.not_valid_after_utc + timedelta(minutes=1)
    renewer.book.refresh(clock())
    caplog.clear()
    with caplog.at_level("INFO", logger="sidecar.renewal"):
        assert renewer.plan(clock()).enrolling
    assert renewal_lines(caplog) == ["identity dev: renewal state valid → expired"]


def test_a_first_look_at_only_unusable_certificates_says_so(
    tmp_path: Path, ca: DevCA, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(datetime.now(UTC))
    old = ca.issue_client("CN=dev", timedelta(hours=1), clock() - timedelta(hours=5))
    write_credential(tmp_path / "keystore" / "dev", old, clock() - timedelta(hours=5))
    renewer = renewer_for(tmp_path, 'renew = "local-ca"', clock, ca)
    with caplog.at_level("INFO", logger="sidecar.renewal"):
        assert renewer.plan(clock()).enrolling
    assert renewal_lines(caplog) == ["identity dev: no usable certificate (see `mtls-sidecar status`): enrolling"]


def renewal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the renewer logged at INFO and above (other loggers may be on after in-process CLI tests)."""
    return [r.getMessage() for r in caplog.records if r.name == "sidecar.renewal" and r.levelno >= logging.INFO]


def test_rekey_false_keeps_the_key(tmp_path: Path, ca: DevCA) -> None:
    clock = Clock(datetime.now(UTC))
    renewer = renewer_for(tmp_path, 'renew = "local-ca"\nrekey = false', clock, ca)
    assert asyncio.run(renewer.attempt(enrolling=True))
    first = renewer.book.selection("dev").selected
    clock.advance(timedelta(seconds=2))
    renewer.renew_now()
    assert renewer.plan(clock()).due
    assert asyncio.run(renewer.attempt())
    second = renewer.book.selection("dev").selected
    assert first is not None and second is not None and first.cert is not None and second.cert is not None
    assert first.cert.serial_number != second.cert.serial_number
    assert first.cert.public_key() == second.cert.public_key()


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(
    ("body", "timeout", "reason"),
    [
        ("echo 'the CA said no' >&2; exit 3\n", "10s", "exited with status 3: the CA said no"),
        ("exec sleep 30\n", "300ms", "did not finish within 0.3s"),
        (
            'echo garbage > "$MTLS_SIDECAR_OUT_CERT"; echo junk > "$MTLS_SIDECAR_OUT_KEY"\n',
            "10s",
            "not usable: not a PEM file",
        ),
        ("exit 0\n", "10s", "did not write MTLS_SIDECAR_OUT_CERT"),
    ],
    ids=["fails", "hangs", "garbage", "writes-nothing"],
)
def test_a_bad_command_leaves_the_current_certificate_and_backs_off(
    tmp_path: Path, ca: DevCA, body: str, timeout: str, reason: str
) -> None:
    clock = Clock(datetime.now(UTC))
    prog = script(tmp_path, "renew.sh", body)
    renewer = renewer_for(
        tmp_path, f'renew = "command"\nrenew_command = ["{prog}"]\nrenew_timeout = "{timeout}"', clock, ca
    )
    issued = ca.issue_client("CN=dev", timedelta(hours=3), clock())
    write_credential(tmp_path / "keystore" / "dev", issued, clock())
    renewer.book.refresh(clock())
    before = os.listdir(tmp_path / "keystore" / "dev")

    renewer.renew_now()
    assert renewer.plan(clock()).due
    assert not asyncio.run(renewer.attempt())
    assert renewer.status.state is State.FAILING
    assert reason in (renewer.status.last_error or "")
    assert os.listdir(tmp_path / "keystore" / "dev") == before  # nothing lost, nothing added
    selected = renewer.book.selection("dev").selected
    assert selected is not None and selected.cert == issued.cert
    event = renewer.events.history[-1]
    assert event["type"] == "renewal.failed" and reason in event["error"]

    # back-off: one minute after the first failure, ten after the second
    assert not renewer.plan(clock() + timedelta(seconds=59)).due
    assert renewer.plan(clock() + timedelta(seconds=61)).due


def test_command_that_works_is_validated_and_accepted(tmp_path: Path, ca: DevCA) -> None:
    """A real script using the openssl CLI and a test CA."""
    clock = Clock(datetime.now(UTC))
    from tests.pki import CA, key_pem

    test_ca = CA("Command CA")
    (tmp_path / "ca.pem").write_bytes(test_ca.root_pem())
    (tmp_path / "ca.key").write_bytes(key_pem(test_ca.root_key))
    (tmp_path / "ext.cnf").write_text("extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n")
    prog = script(
        tmp_path,
        "issue.sh",
        f"""set -e
cd {tmp_path}
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$MTLS_SIDECAR_OUT_KEY" \\
  -subj "/CN=$MTLS_SIDECAR_IDENTITY" -out req.csr 2>/dev/null
openssl x509 -req -in req.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile ext.cnf \\
  -out "$MTLS_SIDECAR_OUT_CERT" 2>/dev/null
if [ -n "${{MTLS_SIDECAR_CURRENT_CERT:-}}" ]; then
  openssl x509 -noout -serial -in "$MTLS_SIDECAR_CURRENT_CERT" > seen-current
  openssl pkey -in "$MTLS_SIDECAR_CURRENT_KEY" -pubout > seen-current-pub
else
  echo none > seen-current
fi
""",
    )
    renewer = renewer_for(tmp_path, f'renew = "command"\nrenew_command = ["{prog}"]', clock, ca)
    clock.advance(timedelta(seconds=5))  # openssl stamps notBefore with the real time: keep the test clock ahead
    assert asyncio.run(renewer.attempt(enrolling=True)), renewer.status.last_error
    selected = renewer.book.selection("dev").selected
    assert selected is not None and selected.cert is not None
    assert selected.cert.issuer.rfc4514_string() == "CN=Command CA"
    assert (tmp_path / "seen-current").read_text() == "none\n"  # enrolling: no current certificate
    clock.advance(timedelta(seconds=2))
    renewer.renew_now()
    assert asyncio.run(renewer.attempt()), renewer.status.last_error
    # the program was handed the credential in use as a plain certificate file and key file
    assert int((tmp_path / "seen-current").read_text().strip().removeprefix("serial="), 16) == (
        selected.cert.serial_number
    )
    from cryptography.hazmat.primitives import serialization

    public = selected.cert.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert (tmp_path / "seen-current-pub").read_bytes() == public


def test_command_config_errors(tmp_path: Path) -> None:
    clock = Clock(datetime.now(UTC))
    with pytest.raises(
        ConfigError, match=r"^test.toml:3: identities.dev.renew_command = 'step ca renew': must be a non-empty list"
    ):
        renewer_for(tmp_path, 'renew = "command"\nrenew_command = "step ca renew"', clock)
    with pytest.raises(ConfigError, match=r"^test.toml:4: identities.dev.renew_timeout = 'later': "):
        renewer_for(tmp_path, 'renew = "command"\nrenew_command = ["x"]\nrenew_timeout = "later"', clock)


def test_a_certificate_dropped_in_by_hand_ends_a_failure_streak(tmp_path: Path, ca: DevCA) -> None:
    clock = Clock(datetime.now(UTC))
    prog = script(tmp_path, "fail.sh", "exit 1\n")
    renewer = renewer_for(tmp_path, f'renew = "command"\nrenew_command = ["{prog}"]', clock, ca)
    assert not asyncio.run(renewer.attempt(enrolling=True))
    assert renewer.status.state is State.FAILING
    write_credential(tmp_path / "keystore" / "dev", ca.issue_client("CN=dev", timedelta(days=3), clock()), clock())
    renewer.book.refresh(clock())
    plan = renewer.plan(clock())
    assert renewer.status.state is State.VALID and renewer.status.consecutive_failures == 0
    assert not plan.due


def test_expired_credentials_are_pruned_after_the_grace_but_never_the_last(tmp_path: Path, ca: DevCA) -> None:
    clock = Clock(datetime.now(UTC))
    renewer = renewer_for(tmp_path, 'renew = "local-ca"\nprune_after = "1h"\nlifetime = "1d"', clock, ca)
    folder = tmp_path / "keystore" / "dev"
    long_gone = ca.issue_client("CN=dev", timedelta(hours=1), clock() - timedelta(hours=5))
    recently = ca.issue_client("CN=dev", timedelta(hours=1), clock() - timedelta(minutes=90))
    old_path = write_credential(folder, long_gone, clock() - timedelta(hours=5))
    recent_path = write_credential(folder, recently, clock() - timedelta(minutes=90))
    renewer.book.refresh(clock())
    assert renewer.book.selection("dev").selected is None
    assert asyncio.run(renewer.attempt(enrolling=True))
    assert not old_path.exists()  # expired 4 h ago > 1 h
    assert recent_path.exists()  # expired 30 min ago < 1 h grace


def test_renewals_within_one_second_are_still_newer(tmp_path: Path, ca: DevCA) -> None:
    """Certificate times have one-second resolution; back-to-back renewals must not tie."""
    clock = Clock(datetime.now(UTC))
    renewer = renewer_for(tmp_path, 'renew = "local-ca"', clock, ca)
    assert asyncio.run(renewer.attempt(enrolling=True))
    for _ in range(5):
        renewer.renew_now()
        assert asyncio.run(renewer.attempt()), renewer.status.last_error
    assert len(list((tmp_path / "keystore" / "dev").glob("*.pem"))) == 6


def test_renew_none_warns_once_per_certificate(tmp_path: Path, ca: DevCA, caplog: pytest.LogCaptureFixture) -> None:
    from sidecar.renewal.scheduler import ExpiryWarner

    clock = Clock(datetime.now(UTC))
    config = parse_config('[identities.dev]\nrenew = "none"\n', source="test.toml")
    book = IdentityBook(config.identities, tmp_path / "keystore")
    issued = ca.issue_client("CN=dev", timedelta(hours=3), clock())
    write_credential(tmp_path / "keystore" / "dev", issued, clock())
    book.refresh(clock())
    warner = ExpiryWarner(config.identities["dev"], book, EventBus(), clock=clock)
    warner.check(clock())
    assert warner.events.history == []
    clock.advance(timedelta(hours=2, minutes=30))  # past 2/3 of the life
    with caplog.at_level("WARNING", logger="sidecar.renewal"):
        warner.check(clock())
        warner.check(clock())
    assert [e["type"] for e in warner.events.history] == ["certificate.expiring"]
    assert sum("is not renewed" in r.getMessage() for r in caplog.records) == 1


def test_the_dev_ca_refuses_to_renew_beside_another_issuers_certificate(tmp_path: Path, ca: DevCA) -> None:
    """A company certificate in a local-ca identity: renewing would put a newer dev-CA certificate
    beside it, which would win the keystore rule. Refused; the company one keeps serving."""
    clock = Clock(datetime.now(UTC))
    folder = tmp_path / "keystore" / "dev"
    company = CA("Example Corp Issuing CA 1").client("dev", lifetime=timedelta(hours=3))
    company.write_bundle(folder, "corp.pem")
    renewer = renewer_for(tmp_path, 'renew = "local-ca"', clock, ca)
    clock.advance(timedelta(hours=2, minutes=30))  # due: past 2/3 of its life
    renewer.book.refresh(clock())
    assert renewer.plan(clock()).due
    assert not asyncio.run(renewer.attempt())
    status = renewer.status
    assert status.state is State.FAILING  # a certificate is still in use: a failed renewal, not "expired"
    assert status.last_error is not None
    assert status.last_error.startswith("refused: the dev CA does not issue into identity dev, whose folder ")
    assert "corp.pem (issued by CN=Example Corp Issuing CA 1)" in status.last_error
    assert sorted(p.name for p in folder.iterdir()) == ["corp.pem"]
    selected = renewer.book.selection("dev").selected
    assert selected is not None and selected.cert == company.cert
    assert not renewer.plan(clock()).due  # backs off while the folder stays as it is


def test_an_earlier_dev_ca_is_not_another_issuer(tmp_path: Path, ca: DevCA) -> None:
    """After `ca/` is moved away (a new dev CA), the identity's old certificates are still the dev CA's."""
    clock = Clock(datetime.now(UTC))
    earlier = load_or_create_ca(tmp_path / "earlier-ca", clock())
    assert earlier.cert != ca.cert
    write_credential(
        tmp_path / "keystore" / "dev", earlier.issue_client("CN=dev", timedelta(hours=3), clock()), clock()
    )
    renewer = renewer_for(tmp_path, 'renew = "local-ca"', clock, ca)
    renewer.renew_now()
    assert asyncio.run(renewer.attempt()), renewer.status.last_error
    selected = renewer.book.selection("dev").selected
    assert selected is not None and selected.cert is not None and selected.cert.issuer == ca.cert.subject


def test_an_enrollment_refused_is_tried_again_once_the_folder_changes(tmp_path: Path, ca: DevCA) -> None:
    clock = Clock(datetime.now(UTC))
    folder = tmp_path / "keystore" / "dev"
    p12 = CA("Example Corp Issuing CA 1").client("dev").write_p12(folder, "corp.p12", b"not given")
    renewer = renewer_for(tmp_path, 'renew = "local-ca"', clock, ca)
    assert renewer.plan(clock()).enrolling
    assert not asyncio.run(renewer.attempt(enrolling=True))
    assert renewer.status.state is State.EXPIRED
    assert "corp.p12 (a PKCS#12 file, which the dev CA never writes)" in (renewer.status.last_error or "")
    assert not renewer.plan(clock()).due  # the same folder: the back-off waits
    clock.advance(timedelta(seconds=5))
    p12.unlink()
    renewer.book.refresh(clock())
    plan = renewer.plan(clock())
    assert plan.due and plan.enrolling  # changed: at once, not after the back-off
    assert asyncio.run(renewer.attempt(enrolling=True))
    assert renewer.status.state is State.VALID
