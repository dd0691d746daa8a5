"""The daemon's smoke test, for every platform's CI job: `python -m tests.smoke`.

In a fresh temporary home: `mtls-sidecar run` (first run: the dev CA, an identity, the demo
service and the demo route), then an HTTP GET through the demo route, then `status --json`
naming the demo route healthy. Needs only Python and the installed package (no curl, no real
servers), so the Windows and macOS jobs run it as the Linux one does. Exits 0 when all held;
otherwise prints what did not and the daemon's output, and exits 1.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

DEADLINE_S = 60.0


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="mtls-sidecar-smoke-") as folder:
        home = Path(folder)
        env = {**os.environ, "MTLS_SIDECAR_HOME": str(home / "home")}
        for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME", "XDG_RUNTIME_DIR"):
            (home / var.lower()).mkdir()
            env[var] = str(home / var.lower())
        daemon = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: list[str] = []
        arrived: queue.Queue[str] = queue.Queue()

        def read() -> None:
            for line in daemon.stdout or []:
                lines.append(line)
                arrived.put(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            return _check(env, lines, arrived)
        finally:
            daemon.terminate()  # SIGTERM; TerminateProcess on Windows
            daemon.wait(timeout=30)
            reader.join(timeout=10)
            if os.environ.get("SMOKE_VERBOSE"):
                print("".join(lines))


def _check(env: dict[str, str], lines: list[str], arrived: queue.Queue[str]) -> int:
    deadline = time.monotonic() + DEADLINE_S
    url = None
    while url is None and (left := deadline - time.monotonic()) > 0:
        try:
            line = arrived.get(timeout=left)  # the daemon's next log line, or the deadline
        except queue.Empty:
            break
        found = re.search(r"try it: curl (http://127\.0\.0\.1:\d+/)", line)
        url = found.group(1) if found else None
    if url is None:
        return _fail("the daemon did not say it was ready", lines)
    with urllib.request.urlopen(url, timeout=30) as answer:
        body = answer.read().decode()
    if "hello from the mtls-sidecar demo service" not in body:
        return _fail(f"the demo route answered {body[:200]!r}", lines)
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "status", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        return _fail(f"status --json exited {done.returncode}: {done.stderr}", lines)
    health = json.loads(done.stdout)["routes"]["demo"]["health"]
    if health != "ok":
        return _fail(f"the demo route's health is {health!r}, not ok", lines)
    print(f"smoke: ok ({sys.platform}): run, GET {url} through the demo route, status --json")
    return 0


def _fail(what: str, lines: list[str]) -> int:
    print(f"smoke: FAILED: {what}\n--- the daemon's output ---\n{''.join(lines)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
