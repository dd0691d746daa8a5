"""Nothing a keystore file or a renewal provider hands us can hold the event loop (issue 16,
point 2): the PEM scan is linear, key derivation is capped and runs off the loop, and
`renew_command` output is bounded."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from sidecar.credentials import Secrets, candidates_from_files
from sidecar.kdf import MAX_ITERATIONS, kdf_costs
from sidecar.renewal.providers.base import ProviderError
from sidecar.renewal.providers.run import OUTPUT_KEPT, run_setting_command
from tests.daemon_runner import DaemonThread
from tests.pki import CA, Leaf
from tests.scenario import Pki, mtls_server, route_to, write_config

MIB = 1 << 20


def hostile_pem(size: int = MIB) -> bytes:
    """Unterminated BEGIN lines: a regex with a back-reference rescans the rest for each."""
    line = b"-----BEGIN CERTIFICATE-----\n"
    return line * (size // len(line))


def test_a_mebibyte_of_unterminated_begin_lines_is_scanned_in_well_under_a_second() -> None:
    data = hostile_pem()
    started = time.perf_counter()
    [candidate] = candidates_from_files({"hostile.pem": data}, Secrets())
    elapsed = time.perf_counter() - started
    assert candidate.problem == "not a PEM file (no -----BEGIN ...----- block found)"
    assert elapsed < 0.5, f"{elapsed:.2f} s for 1 MiB: the scan is not linear"


def test_renew_command_printing_100_mb_is_read_in_bounded_memory() -> None:
    script = (
        "import sys\n"
        "line = b'x' * 99 + b'\\n'\n"
        "for _ in range(1_000_000): sys.stdout.buffer.write(line); sys.stderr.buffer.write(line)\n"
        "sys.stdout.buffer.write(b'last words\\n'); sys.stderr.buffer.write(b'it went wrong\\n')\n"
        "sys.exit(3)\n"
    )
    tracemalloc.start()
    try:
        with pytest.raises(ProviderError) as caught:
            asyncio.run(run_setting_command([sys.executable, "-c", script], setting="renew_command", timeout=60))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(caught.value).endswith("exited with status 3: it went wrong")
    assert peak < 4 * MIB, f"peak {peak / MIB:.1f} MiB for 2 x 100 MB of output"


def test_a_token_command_keeps_its_last_lines() -> None:
    script = "import sys\nfor _ in range(100_000): print('noise ' * 20)\nprint('a.b.c')\n"
    out = asyncio.run(run_setting_command([sys.executable, "-c", script], setting="t", timeout=60))
    assert out.endswith(b"a.b.c\n")
    assert len(out) <= OUTPUT_KEPT
    assert out.startswith(b"noise")  # a whole line: the cut falls at a line start


def p12_with_rounds(leaf: Leaf, rounds: int, password: bytes = b"pw") -> bytes:
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(rounds)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .build(password)
    )
    return pkcs12.serialize_key_and_certificates(b"test", leaf.key, leaf.cert, None, encryption)


def test_a_pkcs12_file_asking_for_more_than_the_cap_is_refused_before_any_derivation() -> None:
    leaf = CA().client("alice")
    hostile = p12_with_rounds(leaf, MAX_ITERATIONS + 1)
    secrets = Secrets(pkcs12_password=b"pw")
    started = time.perf_counter()
    [refused] = candidates_from_files({"alice.p12": hostile}, secrets)
    assert time.perf_counter() - started < 0.2  # refused from its header: nothing was derived
    assert refused.problem == (
        f"PKCS#12 file refused: its key derivation asks for {MAX_ITERATIONS + 1:,} iterations; "
        f"more than {MAX_ITERATIONS:,} are refused (each read would take seconds of CPU)"
    )
    [usual] = candidates_from_files({"alice.p12": p12_with_rounds(leaf, 10_000)}, secrets)
    assert usual.problem is None and usual.cert == leaf.cert


def test_the_pkcs12_mac_iterations_are_read_as_well(tmp_path: Path) -> None:
    leaf = CA().client("alice")
    leaf.write_pair(tmp_path, "alice")
    subprocess.run(
        [
            *(
                "openssl",
                "pkcs12",
                "-export",
                "-in",
                str(tmp_path / "alice.crt"),
                "-inkey",
                str(tmp_path / "alice.key"),
            ),
            *("-keypbe", "NONE", "-certpbe", "NONE", "-iter", "3000000", "-passout", "pass:pw"),
            *("-out", str(tmp_path / "mac.p12")),
        ],
        check=True,
        capture_output=True,
    )
    assert kdf_costs((tmp_path / "mac.p12").read_bytes()) == [("MAC iterations", 3_000_000)]


def test_an_encrypted_key_asking_for_more_than_the_cap_is_refused(tmp_path: Path) -> None:
    leaf = CA().client("alice")
    cert, key = leaf.write_pair(tmp_path, "alice")
    subprocess.run(
        [
            *("openssl", "pkcs8", "-topk8", "-in", str(key), "-v2", "aes-256-cbc", "-iter", "3000000"),
            *("-passout", "pass:pw", "-out", str(tmp_path / "encrypted.key")),
        ],
        check=True,
        capture_output=True,
    )
    files = {"alice.crt": cert.read_bytes(), "alice.key": (tmp_path / "encrypted.key").read_bytes()}
    [refused] = candidates_from_files(files, Secrets(key_password=b"pw"))
    assert refused.problem == (
        "encrypted private key refused: its key derivation asks for 3,000,000 iterations; "
        f"more than {MAX_ITERATIONS:,} are refused (each read would take seconds of CPU) (alice.key)"
    )


# -- an open tunnel keeps answering while the keystore holds hostile files --------------------


def test_an_open_tunnel_echoes_within_half_a_second_while_hostile_files_land_in_the_keystore(
    tmp_path: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = Pki.create(tmp_path / "pki")
    keystore = isolated_home / "keystore"
    leaf = pki.enroll(keystore, "dev", "dev-1")
    monkeypatch.setenv("DEV_P12", "pw")
    # Files within the caps that still cost real key derivation (2,000,000 iterations each),
    # one above the cap (8,000,000: the same file with its counts rewritten), and 1 MiB of
    # unterminated BEGIN lines. Made before the daemon starts, landed by renames.
    at_cap = p12_with_rounds(leaf, 2_000_000)
    assert at_cap.count(_der_int(2_000_000)) == 2  # key and certificate encryption
    above_cap = at_cap.replace(_der_int(2_000_000), _der_int(8_000_000))
    staging = tmp_path / "staging"
    staging.mkdir()
    arriving = {f"costly-{n}.p12": at_cap for n in range(4)} | {
        "above-cap.p12": above_cap,
        "hostile.pem": hostile_pem(),
    }
    for name, data in arriving.items():
        (staging / name).write_bytes(data)
        (staging / name).chmod(0o600)
    with mtls_server(pki, mode="echo") as server:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none", "pkcs12_password_env": "DEV_P12"}},
            routes={"echo": route_to(pki, server.port)},
        )
        with DaemonThread(config) as daemon, daemon.connect("echo", timeout=10) as sock:
            sock.settimeout(5)
            assert echo(sock, b"hello") < 5  # the tunnel is up (the first round trip makes the TLS session)

            def read_all(status: dict[str, Any]) -> bool:
                # hostile.pem lands last, so a read that lists it saw every file; the costly
                # files are usable (status lists the one selected), the others are listed as refused
                dev = status["identities"]["dev"]
                listed = {Path(c["file"]).name for c in dev["candidates"]}
                return {"above-cap.p12", "hostile.pem"} <= listed and Path(dev["selected"]["file"]).suffix == ".p12"

            for name in arriving:
                (staging / name).rename(keystore / "dev" / name)
            round_trips: list[float] = []
            deadline = time.monotonic() + 60
            while not read_all(status := daemon.status()):
                assert time.monotonic() < deadline, f"the keystore was not re-read: {status['identities']['dev']}"
                round_trips.append(echo(sock, b"ping %d" % len(round_trips)))
            status = daemon.status()
    reasons = {Path(c["file"]).name: c["reason"] for c in status["identities"]["dev"]["candidates"]}
    assert reasons["hostile.pem"] == "not a PEM file (no -----BEGIN ...----- block found)"
    assert "asks for 8,000,000 iterations" in reasons["above-cap.p12"]
    assert len(round_trips) >= 5, "the keystore was read before the tunnel was asked anything"
    assert max(round_trips) < 0.5, f"slowest echo {max(round_trips):.2f} s of {len(round_trips)}"
    print(f"\n{len(round_trips)} echoes during the keystore re-read, the slowest {max(round_trips) * 1000:.0f} ms")


def _der_int(n: int) -> bytes:
    body = n.to_bytes((n.bit_length() + 8) // 8, "big")
    return bytes([0x02, len(body)]) + body


def echo(sock: socket.socket, data: bytes) -> float:
    started = time.monotonic()
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        assert chunk, "the tunnel closed"
        got += chunk
    assert got == data
    return time.monotonic() - started
