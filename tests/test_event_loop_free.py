"""Nothing a keystore file or a renewal provider hands us can hold the event loop (issue 16,
point 2): the PEM scan is linear, key derivation is capped and runs off the loop, and
`renew_command` output is bounded."""

from __future__ import annotations

import time

from sidecar.credentials import Secrets, candidates_from_files

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
