"""The smoke test every platform's CI job runs (`python -m tests.smoke`) passes here too, and the
workflow runs what the README says it runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_smoke_test_passes(isolated_home: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.smoke"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "smoke: ok" in done.stdout


def test_the_workflow_runs_the_suite_on_linux_and_the_portable_part_elsewhere() -> None:
    workflow = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    assert "bash .ci/run" in workflow
    assert "os: [macos-latest, windows-latest]" in workflow
    assert "python -m pytest -q -m portable" in workflow
    assert "python -m tests.smoke" in workflow
