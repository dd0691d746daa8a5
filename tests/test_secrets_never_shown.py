"""No secret ever reaches logs, status, events or error messages.

A real `mtls-sidecar run` (debug logging) with a PKCS#12 identity, an encrypted-key identity,
one with the wrong password and a dev-CA identity that renews; then everything it wrote
(log file, stdout, stderr), every status document and event, and the CLI's output, right and
wrong, is searched for the passwords and for every private key's bytes.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from sidecar.control.client import ControlClient
from sidecar.paths import resolve_places
from tests.scenario import Pki, mtls_server, route_to, write_config
from tests.waiting import wait_until

P12_PASSWORD = "p12-Pa55-only-in-the-environment"
KEY_PASSWORD = "key-Pa55-only-in-the-environment"
WRONG_PASSWORD = "wrong-Pa55-also-a-secret"


def key_fragments(pem_bytes: bytes) -> set[str]:
    """Pieces of a private key that would show it leaked: its PEM body lines, in any encoding
    we might print (the body, the DER in hex), and the raw scalar for EC/RSA."""
    fragments: set[str] = set()
    body = [line for line in pem_bytes.decode().splitlines() if line and not line.startswith("-----")]
    fragments.update(line for line in body if len(line) >= 40)
    der = base64.b64decode("".join(body))
    fragments.add(der.hex()[:64])
    return fragments


def all_key_fragments(home: Path) -> set[str]:
    fragments: set[str] = set()
    for path in home.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        for block in re.findall(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", data, re.S):
            fragments |= key_fragments(block)
            if b"ENCRYPTED" not in block:
                key = serialization.load_pem_private_key(block, password=None)
                raw = key.private_bytes(
                    serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
                fragments.add(raw.hex()[-64:])
    return fragments


def test_no_password_or_key_bytes_in_anything_the_daemon_or_cli_writes(isolated_home: Path, tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    keystore = isolated_home / "keystore"
    pki.client_ca.client("p12").write_p12(keystore / "p12", "p12.p12", P12_PASSWORD.encode())
    encrypted = pki.client_ca.client("enc")
    (keystore / "enc").mkdir(parents=True)
    from tests.pki import key_pem

    (keystore / "enc" / "enc.crt").write_bytes(encrypted.chain_pem())
    (keystore / "enc" / "enc.key").write_bytes(key_pem(encrypted.key, password=KEY_PASSWORD.encode()))
    (keystore / "enc" / "enc.key").chmod(0o600)
    pki.client_ca.client("wrong").write_p12(keystore / "wrong", "wrong.p12", b"the-real-one")

    env = {
        **os.environ,
        "P12_PASSWORD": P12_PASSWORD,
        "ENC_KEY_PASSWORD": KEY_PASSWORD,
        "WRONG_PASSWORD": WRONG_PASSWORD,
    }
    with mtls_server(pki, mode="echo") as server:
        config = write_config(
            isolated_home / "config.toml",
            active="dev",
            identities={
                "dev": {"renew": "local-ca", "lifetime": "1h"},
                "p12": {"renew": "none", "pkcs12_password_env": "P12_PASSWORD"},
                "enc": {"renew": "none", "key_password_env": "ENC_KEY_PASSWORD"},
                "wrong": {"renew": "none", "pkcs12_password_env": "WRONG_PASSWORD"},
            },
            routes={
                "p12": route_to(pki, server.port, identity="p12"),
                "enc": route_to(pki, server.port, identity="enc"),
                "wrong": route_to(pki, server.port, identity="wrong"),
            },
        )
        outputs: list[str] = []
        daemon = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "--log-level", "debug", "--config", str(config)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            client = ControlClient(resolve_places().control_socket, timeout=10)
            wait_until(lambda: _answers(client), timeout=30, what="the daemon's control API")
            events: list[dict[str, Any]] = []
            follower = threading.Thread(target=lambda: _collect(client, events), daemon=True)
            follower.start()

            status = client.get("/v1/status")
            assert status["identities"]["p12"]["selected"] is not None  # the passwords worked
            assert status["identities"]["enc"]["selected"] is not None
            assert "wrong PKCS#12 password" in status["identities"]["wrong"]["candidates"][0]["reason"]

            def cli(*args: str) -> str:
                done = subprocess.run(
                    [sys.executable, "-m", "sidecar", *args], env=env, capture_output=True, text=True, timeout=60
                )
                return done.stdout + done.stderr

            outputs += [cli("status"), cli("status", "--json"), cli("identity", "list", "--json")]
            outputs += [cli("check", "p12"), cli("check", "wrong", "--json"), cli("renew", "dev")]
            wait_until(lambda: any(e.get("type") == "renewal.succeeded" for e in events), timeout=30,
                       what="a renewal event")  # fmt: skip
            outputs += [cli("use", "p12"), cli("identity", "import", str(keystore / "wrong" / "wrong.p12"),
                                                "--name", "other", "--password-env", "WRONG_PASSWORD")]  # fmt: skip
            outputs.append(json.dumps(client.get("/v1/status")))
            outputs.append(json.dumps(events))
        finally:
            daemon.send_signal(signal.SIGTERM)
            out, err = daemon.communicate(timeout=30)
    outputs += [out, err]
    logs = list((isolated_home / "logs").rglob("*"))
    assert logs, "the daemon wrote no log file"
    outputs += [p.read_text(errors="replace") for p in logs if p.is_file()]

    written = "\n".join(outputs)
    assert "renewal" in written and "wrong PKCS#12 password" in written  # we searched real output
    for secret in (P12_PASSWORD, KEY_PASSWORD, WRONG_PASSWORD, "the-real-one"):
        assert secret not in written, f"a password appeared in the output: {secret!r}"
    assert "PRIVATE KEY" not in written
    fragments = all_key_fragments(isolated_home)
    assert len(fragments) >= 6  # the dev CA key, dev's keys, enc's key
    leaked = [f for f in fragments if f in written or f.lower() in written.lower()]
    assert leaked == []
    print(f"\nsearched {len(written):,} characters of output for 4 passwords and {len(fragments)} key fragments")


def _answers(client: ControlClient) -> bool:
    try:
        client.get("/v1/status")
    except Exception:
        return False
    return True


def _collect(client: ControlClient, events: list[dict[str, Any]]) -> None:
    try:
        for event in client.events():
            events.append(event)
    except Exception:
        return
