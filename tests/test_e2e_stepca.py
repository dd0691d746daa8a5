"""`renew = "step-ca"` against a real step-ca (built from Debian's packages), seen by a real nginx.

The CA's own log is the witness for which API was used: `/1.0/sign` (enrollment with a
one-time token), `/1.0/renew` or `/1.0/rekey` (mutual TLS with the current certificate).
"""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import re
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.renewal.providers.base import ProviderContext, ProviderError, RenewalRequest
from sidecar.renewal.providers.stepca import StepCAProvider
from tests.daemon_runner import DaemonThread
from tests.identity_specs import identity_spec
from tests.pki import now
from tests.realservers import nginx_mtls
from tests.scenario import Pki, curl, http_get_on, route_to, write_config
from tests.stepca import Provisioner, StepCA, stepca_server
from tests.waiting import wait_until

NAME = "laptop.example.test"


def stepca_identity(ca: StepCA, key_file: Path | None, **extra: Any) -> dict[str, Any]:
    identity: dict[str, Any] = {
        "renew": "step-ca",
        "subject": f"CN={NAME}",
        "step_ca_url": ca.url,
        "step_ca_root": str(ca.root_file),
        **extra,
    }
    if key_file is not None:
        identity["step_ca_provisioner"] = ca.provisioner.name
        identity["step_ca_provisioner_key"] = str(key_file)
    return identity


def selected(status: dict[str, Any]) -> dict[str, Any] | None:
    result: dict[str, Any] | None = status["identities"]["dev"]["selected"]
    return result


def serial_of(status: dict[str, Any]) -> int | None:
    chosen = selected(status)
    return int(chosen["serial"], 16) if chosen else None


def renewal_of(status: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = status["identities"]["dev"]["renewal"]
    return result


def nginx_serial(text: str | bytes) -> int:
    body = text.decode() if isinstance(text, bytes) else text
    match = re.search(r"serial=([0-9A-F]+) ", body)
    assert match, body
    return int(match.group(1), 16)


def keystore_certs(home: Path) -> dict[int, x509.Certificate]:
    """Every certificate the daemon wrote for `dev`, by serial."""
    found: dict[int, x509.Certificate] = {}
    for path in (home / "keystore" / "dev").glob("*.pem"):
        leaf = x509.load_pem_x509_certificates(path.read_bytes())[0]
        found[leaf.serial_number] = leaf
    return found


def public_der(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_stepca_enrolls_with_provisioner_key_then_renews_through_renew(isolated_home: Path, tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    with stepca_server(tmp_path / "ca", default_duration="2m") as ca:
        key_file = ca.provisioner.write_private_jwk(tmp_path / "secrets" / "provisioner.json")
        with nginx_mtls(
            tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=ca.chain_file
        ) as nginx:
            # 3-minute certificates (backdated 1 min): due at 42 % of the lifetime, minus jitter,
            # that is 7 to 16 s after enrollment.
            config = write_config(
                isolated_home / "config.toml",
                identities={"dev": stepca_identity(ca, key_file, renew_at=0.42)},
                routes={"api": route_to(pki, nginx.port)},
            )
            started = time.monotonic()
            with DaemonThread(config) as daemon:
                first = serial_of(daemon.status())
                enrolled_in = time.monotonic() - started
                assert first is not None, daemon.status()["identities"]["dev"]
                assert ca.requests_logged("/1.0/sign") == 1
                with daemon.connect("api", timeout=60) as held:
                    # nginx trusts the step-ca root and intermediate and sees the step-ca certificate
                    body = http_get_on(held).decode()
                    assert nginx_serial(body) == first and f"CN={NAME}" in body and "verify=SUCCESS" in body
                    second = wait_until(
                        lambda: (s := serial_of(daemon.status())) != first and s,
                        timeout=40,
                        what="the daemon to renew through step-ca before expiry",
                    )
                    assert nginx_serial(curl(daemon.port("api")).stdout) == second  # new connections
                    assert nginx_serial(http_get_on(held)) == first  # the held connection is undisturbed
                status = daemon.status()
                events = daemon.call(lambda d: list(d.events.history))
    assert renewal_of(status)["provider"] == "step-ca" and renewal_of(status)["state"] == "valid"
    # the CA saw a renewal over mutual TLS, not a second enrollment
    assert ca.requests_logged("/1.0/renew") >= 1
    assert ca.requests_logged("/1.0/sign") == 1
    certs = keystore_certs(isolated_home)
    old, new = certs[first], certs[second]
    assert old.issuer == new.issuer == ca.ca.signing_cert.subject
    assert public_der(old) == public_der(new)  # /renew keeps the key
    assert new.not_valid_after_utc > old.not_valid_after_utc
    timings = [e["seconds"] for e in events if e["type"] == "renewal.succeeded"]
    print(f"\nstep-ca: enrolled {enrolled_in:.2f} s after daemon start; issuance times {timings} s")


def test_stepca_rekey_gives_a_new_public_key(isolated_home: Path, tmp_path: Path) -> None:
    with stepca_server(tmp_path / "ca") as ca:
        key_file = ca.provisioner.write_private_jwk(tmp_path / "secrets" / "provisioner.json")
        config = write_config(
            isolated_home / "config.toml", identities={"dev": stepca_identity(ca, key_file, rekey=True)}, routes={}
        )
        with DaemonThread(config) as daemon:
            first = serial_of(daemon.status())
            assert first is not None
            daemon.call(lambda d: d.request_renewal("dev"))
            second = wait_until(
                lambda: (s := serial_of(daemon.status())) != first and s, timeout=30, what="a rekey through step-ca"
            )
    certs = keystore_certs(isolated_home)
    assert public_der(certs[first]) != public_der(certs[second])
    assert ca.requests_logged("/1.0/rekey") >= 1 and ca.requests_logged("/1.0/renew") == 0


def _write_expired(ca: StepCA, home: Path) -> x509.Certificate:
    """A certificate from this CA's intermediate that ended an hour ago: a laptop that slept."""
    leaf = ca.ca.issue(NAME, dns=[NAME], not_before=now() - timedelta(hours=3), not_after=now() - timedelta(hours=1))
    leaf.write_pair(home / "keystore" / "dev", "slept")
    return leaf.cert


# A stand-in for `step ca token NAME`: prints a one-time token made from the provisioner key.
TOKEN_SCRIPT = """
import sys
from datetime import UTC, datetime
from pathlib import Path
from sidecar.renewal.providers.stepca import load_provisioner_key, make_token
key_file, provisioner, name, url = sys.argv[1:]
print("(step would print a notice on stderr; stdout ends with the token)")
print(make_token(load_provisioner_key(Path(key_file)), provisioner, name, url + "/1.0/sign", datetime.now(UTC)))
"""


@pytest.mark.parametrize("enroll_with", ["provisioner_key", "token_command"])
def test_stepca_expired_certificate_falls_back_to_enrollment(
    isolated_home: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, enroll_with: str
) -> None:
    caplog.set_level(logging.DEBUG)
    with stepca_server(tmp_path / "ca") as ca:
        expired = _write_expired(ca, isolated_home)
        key_file = ca.provisioner.write_private_jwk(tmp_path / "secrets" / "provisioner.json")
        if enroll_with == "provisioner_key":
            identity = stepca_identity(ca, key_file)
        else:
            command = [sys.executable, "-c", TOKEN_SCRIPT, str(key_file), ca.provisioner.name, NAME, ca.url]
            identity = stepca_identity(ca, None, step_ca_token_command=command)
        config = write_config(isolated_home / "config.toml", identities={"dev": identity}, routes={})
        with DaemonThread(config) as daemon:
            serial = wait_until(lambda: serial_of(daemon.status()), timeout=30, what="enrollment after expiry")
            status = daemon.status()
            events = daemon.call(lambda d: list(d.events.history))
    assert serial != expired.serial_number
    assert renewal_of(status)["state"] == "valid"
    assert ca.requests_logged("/1.0/sign") == 1 and ca.requests_logged("/1.0/renew") == 0
    # neither the provisioner's private key nor the token reaches status, events or the log
    secret_d = json.loads(key_file.read_text())["d"]
    assert "identity dev: enrollment succeeded" in caplog.text  # the log was captured
    shown = json.dumps(status) + json.dumps(events) + caplog.text
    assert secret_d not in shown and "eyJ" not in shown


def test_stepca_expired_without_provisioner_is_expired_and_says_what_to_run(
    isolated_home: Path, tmp_path: Path
) -> None:
    with stepca_server(tmp_path / "ca") as ca:
        _write_expired(ca, isolated_home)
        config = write_config(isolated_home / "config.toml", identities={"dev": stepca_identity(ca, None)}, routes={})
        with DaemonThread(config) as daemon:
            renewal = wait_until(
                lambda: (r := renewal_of(daemon.status()))["last_error"] and r,
                timeout=30,
                what="the identity to say it cannot enroll",
            )
            status = daemon.status()
    assert renewal["state"] == "expired", renewal
    message = renewal["last_error"]
    assert f"step ca certificate {NAME} " in message and f"--ca-url {ca.url}" in message, message
    assert "step_ca_provisioner" in message
    assert selected(status) is None
    assert ca.requests_logged("/1.0/sign") == 0 and ca.requests_logged("/1.0/renew") == 0


def test_stepca_down_keeps_serving_and_says_so(isolated_home: Path, tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    with stepca_server(tmp_path / "ca") as ca:
        key_file = ca.provisioner.write_private_jwk(tmp_path / "secrets" / "provisioner.json")
        with nginx_mtls(
            tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=ca.chain_file
        ) as nginx:
            config = write_config(
                isolated_home / "config.toml",
                identities={"dev": stepca_identity(ca, key_file)},
                routes={"api": route_to(pki, nginx.port)},
            )
            with DaemonThread(config) as daemon:
                first = serial_of(daemon.status())
                assert first is not None
                ca.stop()
                daemon.call(lambda d: d.request_renewal("dev"))
                renewal = wait_until(
                    lambda: (r := renewal_of(daemon.status()))["state"] == "failing" and r,
                    timeout=30,
                    what="renewal to fail while step-ca is down",
                )
                assert f"cannot reach step-ca at {ca.url}" in renewal["last_error"], renewal
                assert nginx_serial(curl(daemon.port("api")).stdout) == first  # still served


# --- a CA that answers errors: step-ca itself will not answer /renew with 401 or 500 on demand


class _ScriptedCA(http.server.BaseHTTPRequestHandler):
    status = 500
    message = ""
    paths: list[str]

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.paths.append(self.path)
        body = json.dumps({"status": self.status, "message": self.message}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def scripted_ca(pki: Pki, folder: Path, status: int, message: str) -> Iterator[tuple[str, list[str]]]:
    """An HTTPS server on 127.0.0.1 that answers every POST with `status` and step-ca's JSON error."""
    cert, key = pki.server_ca.server("127.0.0.1", "localhost").write_pair(folder, "scripted-ca")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.verify_mode = ssl.CERT_OPTIONAL  # ask for the client certificate, as step-ca does
    context.load_verify_locations(cafile=str(pki.client_ca_file))
    paths: list[str] = []
    handler = type("Handler", (_ScriptedCA,), {"status": status, "message": message, "paths": paths})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, name="scripted-ca", daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}", paths
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.mark.parametrize(
    ("status", "reason", "message"),
    [
        (401, "Unauthorized", "The request lacked necessary authorization to be completed."),
        (500, "Internal Server Error", "The certificate authority encountered an Internal Server Error."),
    ],
)
def test_stepca_error_answers_reach_status_and_current_certificate_keeps_serving(
    isolated_home: Path, tmp_path: Path, status: int, reason: str, message: str
) -> None:
    pki = Pki.create(tmp_path / "pki")
    current = pki.enroll(isolated_home / "keystore", "dev", "current", cn=NAME)
    with (
        scripted_ca(pki, tmp_path / "scripted", status, message) as (url, paths),
        nginx_mtls(
            tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.client_ca_file
        ) as nginx,
    ):
        identity = {
            "renew": "step-ca",
            "subject": f"CN={NAME}",
            "step_ca_url": url,
            "step_ca_root": str(pki.server_ca_file),
        }
        config = write_config(
            isolated_home / "config.toml", identities={"dev": identity}, routes={"api": route_to(pki, nginx.port)}
        )
        with DaemonThread(config) as daemon:
            daemon.call(lambda d: d.request_renewal("dev"))
            renewal = wait_until(
                lambda: (r := renewal_of(daemon.status()))["state"] == "failing" and r,
                timeout=30,
                what=f"renewal to fail on the CA's {status}",
            )
            assert nginx_serial(curl(daemon.port("api")).stdout) == current.cert.serial_number
            log_lines = [e for e in daemon.call(lambda d: list(d.events.history)) if e["type"] == "renewal.failed"]
    assert paths == ["/1.0/renew"]
    assert renewal["last_error"] == f"step-ca at {url} answered {status} {reason} to /1.0/renew: {message}"
    assert log_lines and log_lines[-1]["error"] == renewal["last_error"]


def test_real_stepca_refuses_a_token_from_the_wrong_key_with_401(tmp_path: Path) -> None:
    with stepca_server(tmp_path / "ca") as ca:
        impostor = Provisioner(ca.provisioner.name, ec.generate_private_key(ec.SECP256R1()))
        impostor.kid = ca.provisioner.kid  # claims to be the provisioner, signs with another key
        key_file = impostor.write_private_jwk(tmp_path / "impostor.json")
        spec = identity_spec("dev", **stepca_identity(ca, key_file))
        provider = StepCAProvider(spec, ProviderContext(keystore=tmp_path))
        with pytest.raises(ProviderError) as caught:
            asyncio.run(provider.issue(RenewalRequest(spec, tmp_path, None, datetime.now(UTC))))
    assert f"step-ca at {ca.url} answered 401 Unauthorized to /1.0/sign: " in str(caught.value)
