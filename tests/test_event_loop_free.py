"""Nothing a keystore file or a renewal provider hands us can hold the event loop (issue 16,
point 2): the PEM scan is linear, key derivation is capped and runs off the loop, and
`renew_command` output is bounded."""

from __future__ import annotations

import asyncio
import sys
import time
import tracemalloc

import pytest

from sidecar.credentials import Secrets, candidates_from_files
from sidecar.renewal.providers.base import ProviderError
from sidecar.renewal.providers.run import OUTPUT_KEPT, run_setting_command

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
