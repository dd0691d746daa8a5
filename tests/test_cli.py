"""The commands as a user runs them: subprocesses for `run` and `tunnel`, `main()` for the rest."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from sidecar.cli import main
from tests.realservers import nginx_mtls
from tests.scenario import Pki, curl
from tests.waiting import wait_until


class LogFollower:
    """Collects a subprocess's stderr lines on a thread so tests can wait for a line."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stderr is not None
        self._thread = threading.Thread(target=self._follow, args=(proc.stderr,), daemon=True)
        self._thread.start()

    def _follow(self, stream) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            return next((m for line in list(self.lines) if (m := regex.search(line))), None)

        try:
            return wait_until(found, timeout, what=f"log line matching {pattern!r}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log so far:\n{''.join(self.lines)}") from None

    def join(self) -> None:
        self._thread.join(timeout=10)

    @property
    def text(self) -> str:
        return "".join(self.lines)


@contextmanager
def sidecar_process(
    *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], LogFollower]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    follower = LogFollower(proc)
    try:
        yield proc, follower
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        follower.join()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop does not exist on Windows: asyncio's loop runs there")
def default_config_with_control(transport: str) -> None:
    """The config a first run writes, with `control = TRANSPORT` on top: a `run` subprocess uses that transport."""
    from sidecar.firstrun import default_config_for
    from sidecar.paths import resolve_places

    places = resolve_places()
    places.config_file.write_text(f'control = "{transport}"\n' + default_config_for(places))


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_the_daemon_runs_on_uvloop_and_status_says_so(isolated_home: Path, transport: str) -> None:
    default_config_with_control(transport)
    with sidecar_process("run") as (proc, log):
        match = log.wait_for(r"try it: curl http://127\.0\.0\.1:(\d+)/")
        assert "hello from the mtls-sidecar demo service" in curl(int(match.group(1))).stdout
        status = subprocess.run(
            [sys.executable, "-m", "sidecar", "status", "--json"], capture_output=True, text=True, timeout=30
        )
        assert json.loads(status.stdout)["daemon"]["loop"] == "uvloop"
        assert json.loads(status.stdout)["daemon"]["control"]["transport"] == transport
        table = subprocess.run([sys.executable, "-m", "sidecar", "status"], capture_output=True, text=True, timeout=30)
        assert f"(daemon pid {proc.pid}, uvloop loop)" in table.stdout
        forced = {**os.environ, "MTLS_SIDECAR_LOOP": "asyncio"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.text
    with sidecar_process("run", env=forced) as (proc, log):
        log.wait_for(r"try it: curl")
        status = subprocess.run(
            [sys.executable, "-m", "sidecar", "status", "--json"], capture_output=True, text=True, timeout=30
        )
        assert json.loads(status.stdout)["daemon"]["loop"] == "asyncio"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.text


def test_first_run_creates_everything_and_the_demo_route_works(isolated_home: Path) -> None:
    with sidecar_process("run") as (proc, log):
        match = log.wait_for(r"try it: curl http://127\.0\.0\.1:(\d+)/")
        result = curl(int(match.group(1)))
        assert result.returncode == 0, result.stderr
        assert "hello from the mtls-sidecar demo service" in result.stdout
        assert re.search(r"client subject: CN=\S+", result.stdout)
        log.wait_for(r"listening on 127\.0\.0\.1:\d+ → 127\.0\.0\.1:\d+ as \S+ \(serial [0-9a-f]+, expires ")
        log.wait_for(r"identity \S+: no certificate yet: enrolling")  # the first run enrolls; nothing "expired"
        assert "expired" not in log.text, log.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.text
    assert (isolated_home / "config.toml").exists()
    key = isolated_home / "ca" / "ca.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    identity_folders = list((isolated_home / "keystore").iterdir())
    assert len(identity_folders) == 1
    keys = list(identity_folders[0].glob("*.pem"))
    assert keys and all(stat.S_IMODE(k.stat().st_mode) == 0o600 for k in keys)
    # private keys never reach the log
    assert "PRIVATE KEY" not in log.text and "PRIVATE KEY" not in (isolated_home / "logs" / "daemon.log").read_text()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_second_run_reuses_the_ca_and_identity(isolated_home: Path, transport: str) -> None:
    default_config_with_control(transport)
    for _ in range(2):
        with sidecar_process("run") as (proc, log):
            log.wait_for(r"try it: curl")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=20) == 0, log.text
    assert len(list((isolated_home / "keystore").rglob("*.pem"))) == 1


def test_ca_export_prints_the_dev_ca(isolated_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ca", "export"]) == 0
    out = capsys.readouterr().out
    cert = x509.load_pem_x509_certificate(out.encode())
    assert "mtls-sidecar dev CA" in cert.subject.rfc4514_string()
    assert "PRIVATE" not in out
    assert main(["ca", "export"]) == 0
    assert capsys.readouterr().out == out  # the same CA, not a new one each time


def test_identity_new_issues_into_the_keystore(isolated_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["identity", "new", "ci-bot", "--lifetime", "2m"]) == 0
    out = capsys.readouterr().out
    assert "issued CN=ci-bot serial" in out
    (bundle,) = (isolated_home / "keystore" / "ci-bot").iterdir()
    assert bundle.suffix == ".pem" and b"PRIVATE KEY" in bundle.read_bytes()
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o600
    crt = bundle
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(minutes=2) <= lifetime <= timedelta(minutes=4)  # plus the one-minute backdate
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in eku


def test_identity_new_rejects_a_bad_lifetime(isolated_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["identity", "new", "x", "--lifetime", "soon"]) == 2
    err = capsys.readouterr().err
    assert "--lifetime" in err and "'soon'" in err


def test_tunnel_command_with_cert_and_key_flags(isolated_home: Path, tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    leaf = pki.client_ca.client("tunnel-user")
    cert, key = leaf.write_pair(tmp_path / "client", "me")
    with nginx_mtls(
        tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.client_ca_file
    ) as nginx:
        from tests.realservers import free_port

        port = free_port()
        args = [
            "tunnel",
            "--listen",
            f"127.0.0.1:{port}",
            "--target",
            f"127.0.0.1:{nginx.port}",
            "--cert",
            str(cert),
            "--key",
            str(key),
            "--cacert",
            str(pki.server_ca_file),
            "--server-name",
            "localhost",
        ]
        with sidecar_process(*args) as (proc, log):
            log.wait_for(rf"listening on 127\.0\.0\.1:{port} → 127\.0\.0\.1:{nginx.port}")
            result = curl(port)
            assert f"client_dn=CN=tunnel-user serial={leaf.serial_hex} " in result.stdout, result.stderr
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=20) == 0, log.text


def test_tunnel_command_with_a_keystore_folder(isolated_home: Path, tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    leaf = pki.enroll(tmp_path / "ks", "me", "one")
    with nginx_mtls(
        tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.client_ca_file
    ) as nginx:
        from tests.realservers import free_port

        port = free_port()
        args = [
            "tunnel",
            "--listen",
            f"127.0.0.1:{port}",
            "--target",
            f"localhost:{nginx.port}",
            "--keystore",
            str(tmp_path / "ks" / "me"),
            "--cacert",
            str(pki.server_ca_file),
        ]
        with sidecar_process(*args) as (proc, log):
            log.wait_for(r"listening on")
            assert f"serial={leaf.serial_hex} " in curl(port).stdout
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0, log.text


def test_tunnel_command_refuses_a_non_loopback_listen(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["tunnel", "--listen", "0.0.0.0:9999", "--target", "example.test:443", "--cert", "c", "--key", "k"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--listen" in err and "0.0.0.0:9999" in err and "--unsafe-listen" in err


def test_tunnel_command_names_an_unreadable_cert_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(
        [
            "tunnel",
            "--listen",
            "127.0.0.1:0",
            "--target",
            "example.test:443",
            "--cert",
            str(tmp_path / "missing.crt"),
            "--key",
            str(tmp_path / "missing.key"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "missing.crt" in err and "--cert" in err


def test_ca_server_issues_a_certificate_for_a_local_test_service(
    isolated_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ca", "server", "localhost", "127.0.0.1", "--out", str(tmp_path / "srv")]) == 0
    assert "localhost.crt" in capsys.readouterr().out
    cert = x509.load_pem_x509_certificate((tmp_path / "srv" / "localhost.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert stat.S_IMODE((tmp_path / "srv" / "localhost.key").stat().st_mode) == 0o600
    assert main(["ca", "export"]) == 0
    ca = x509.load_pem_x509_certificate(capsys.readouterr().out.encode())
    cert.verify_directly_issued_by(ca)


def _tunnel_args(*credential: str) -> list[str]:
    return ["tunnel", "--listen", "127.0.0.1:0", "--target", "example.test:443", *credential]


def test_tunnel_refuses_a_key_file_others_can_read_as_the_daemon_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = Pki.create(tmp_path / "pki")
    cert, key = pki.client_ca.client("me").write_pair(tmp_path / "client", "me")
    key.chmod(0o644)
    assert main(_tunnel_args("--cert", str(cert), "--key", str(key))) == 2
    err = capsys.readouterr().err
    assert f"command line: --cert = '{cert}': no usable client certificate (" in err, err
    assert f"private key file {key} is readable by other users (mode 0644)" in err, err
    assert f"chmod 600 '{key}'" in err, err
    # one PEM bundle given as --keystore: the same rule
    bundle = tmp_path / "client" / "bundle.pem"
    bundle.write_bytes(cert.read_bytes() + key.read_bytes())
    bundle.chmod(0o640)
    assert main(_tunnel_args("--keystore", str(bundle))) == 2
    assert f"chmod 600 '{bundle}'" in capsys.readouterr().err


def test_tunnel_with_no_usable_certificate_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from datetime import UTC, datetime

    pki = Pki.create(tmp_path / "pki")
    long_ago = datetime.now(UTC) - timedelta(days=30)
    expired = pki.client_ca.client("me", not_before=long_ago, not_after=long_ago + timedelta(days=1))
    cert, key = expired.write_pair(tmp_path / "client", "me")
    assert main(_tunnel_args("--cert", str(cert), "--key", str(key))) == 2
    err = capsys.readouterr().err
    assert f"command line: --cert = '{cert}': no usable client certificate (me.pem: expired 29 days ago" in err, err
    empty = tmp_path / "empty-keystore"
    empty.mkdir()
    assert main(_tunnel_args("--keystore", str(empty))) == 2
    err = capsys.readouterr().err
    assert f"--keystore = '{empty}': no usable client certificate (no credential files found)" in err, err
