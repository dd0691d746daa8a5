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
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "--log-level", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=os.environ.copy(),
        )
        try:
            # wait until it is renewing (a new certificate appeared), then kill it a random moment later
            def renewing(before: set[Path] = before, proc: subprocess.Popen[bytes] = proc) -> bool:
                return bool(set(folder.glob("*.pem")) - before) or proc.poll() is not None

            wait_until(renewing, timeout=30, what="the daemon to start renewing")
            assert proc.poll() is None, "the daemon exited on its own"
            time.sleep(rng.uniform(0, 0.05))  # the random kill point, not synchronisation
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        kills += 1
        interrupted_writes += len(list(folder.glob(".*.tmp")))
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
