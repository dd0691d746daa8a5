"""SIGKILL the daemon at random points while it writes renewals: nothing half-written is ever
selected, and the identity always keeps a usable credential."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sidecar.credentials import Secrets
from sidecar.devca import load_or_create_ca, write_credential
from sidecar.keystore import read_identity_folder, select
from tests.scenario import write_config
from tests.waiting import wait_until

ITERATIONS = 50
WANTED_INTERRUPTED_WRITES = 3
TIME_BUDGET_S = 240
PROBES_PER_HUNT = 200

# The daemon as `python -m sidecar run`, on a simulated slow disk: each fsync waits 20 ms first.
# On a fast disk (or tmpfs) a credential's temporary file lives for microseconds, and random kill
# points almost never land inside a write (CI once saw 0 in 398 kills); with the wait, a write is
# long enough to be caught. The code under test is unchanged: only the disk got slower.
SLOW_DISK_DAEMON = [
    sys.executable,
    "-c",
    "import os, sys, time\n"
    "real_fsync = os.fsync\n"
    "def slow_fsync(fd):\n"
    "    time.sleep(0.02)\n"
    "    real_fsync(fd)\n"
    "os.fsync = slow_fsync\n"
    "from sidecar.cli import main\n"
    "sys.argv = ['mtls-sidecar', 'run', '--log-level', 'warning']\n"
    "sys.exit(main())\n",
]


def _new_temp_files(folder: Path, stale: set[Path]) -> set[Path]:
    """Temporary files of writes this daemon began (`stale`: left by an earlier kill)."""
    return set(folder.glob(".*.tmp")) - stale


def _stop_inside_a_write(proc: subprocess.Popen[bytes], folder: Path, stale: set[Path], rng: random.Random) -> None:
    """Freeze the daemon at random moments until one finds a temporary file (a write under way)
    and leave it frozen there, so the caller's SIGKILL lands inside that write. Gives up after
    PROBES_PER_HUNT probes (the caller kills it anyway)."""
    for _ in range(PROBES_PER_HUNT):
        time.sleep(rng.uniform(0, 0.01))  # the random probe point, not synchronisation
        proc.send_signal(signal.SIGSTOP)
        if _new_temp_files(folder, stale):
            return
        proc.send_signal(signal.SIGCONT)


def test_sigkill_during_renewal_writes_never_loses_the_identity(isolated_home: Path) -> None:
    ca = load_or_create_ca(isolated_home / "ca", datetime.now(UTC))
    folder = isolated_home / "keystore" / "dev"
    write_credential(folder, ca.issue_client("CN=dev", timedelta(hours=1), datetime.now(UTC)), datetime.now(UTC))
    # renew_at = 1% of the lifetime: every renewal is due at once, so the daemon renews back to
    # back; short lives and quick pruning keep the folder small, so writes are much of each cycle.
    write_config(
        isolated_home / "config.toml",
        identities={"dev": {"renew": "local-ca", "lifetime": "10s", "renew_at": 0.01, "prune_after": "1s"}},
        routes={},
    )
    rng = random.Random(2026)
    deadline = time.monotonic() + TIME_BUDGET_S
    kills = 0
    interrupted_writes = 0  # temp files left behind: kills that landed inside a write
    # At least ITERATIONS kills, and on until a few of them landed inside a write.
    while kills < ITERATIONS or interrupted_writes < WANTED_INTERRUPTED_WRITES:
        if time.monotonic() > deadline:
            break
        before = set(folder.glob("*.pem"))
        stale = set(folder.glob(".*.tmp"))
        proc = subprocess.Popen(
            SLOW_DISK_DAEMON, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy()
        )
        try:
            # wait until it is renewing (a new certificate appeared), then kill it: every other
            # time at a random moment, the other times at a moment found inside a write
            def renewing(before: set[Path] = before, proc: subprocess.Popen[bytes] = proc) -> bool:
                return bool(set(folder.glob("*.pem")) - before) or proc.poll() is not None

            wait_until(renewing, timeout=30, what="the daemon to start renewing")
            assert proc.poll() is None, "the daemon exited on its own"
            if kills % 2:
                _stop_inside_a_write(proc, folder, stale, rng)
            else:
                time.sleep(rng.uniform(0, 0.05))  # the random kill point, not synchronisation
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        kills += 1
        interrupted_writes += len(_new_temp_files(folder, stale))
        now = datetime.now(UTC)
        candidates = read_identity_folder(folder, Secrets())
        selection = select("dev", candidates, now)
        assert selection.selected is not None, selection.why_unusable()
        # every visible file is a whole credential: rejected only for its dates, never as broken
        broken = [
            (r.candidate.file, r.reason)
            for r in selection.rejected
            if not r.reason.startswith(("not valid until", "expired"))
        ]
        assert broken == [], broken
    assert kills >= ITERATIONS, f"only {kills} kills within the time budget"
    leftovers = list(folder.glob(".*.tmp"))
    assert interrupted_writes >= WANTED_INTERRUPTED_WRITES, (
        f"only {interrupted_writes} of {kills} kills landed inside a write: the test proved too little"
    )
    # a restart clears the temporary files a kill left behind
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run", "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if leftovers:
            wait_until(lambda: not any(p.exists() for p in leftovers), timeout=20, what="stale temp files to go")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    print(
        f"\ncrash safety: {kills} SIGKILLs during renewal writes, {len(list(folder.glob('*.pem')))} "
        f"certificates on disk, {interrupted_writes} writes interrupted, {len(leftovers)} temp files cleaned on restart"
    )
