"""Load held: 1,000 concurrent connections through one route, each echoing, with no growth in
file descriptors or memory across the soak.

The daemon runs as its own process (`mtls-sidecar run`, started with the soft open-file limit
of 1024 that many desktops give, which it must raise itself), so its descriptors and memory
are its own: /proc/PID/fd, VmRSS and Pss. The backend is `tests/echoserver.py`, an asyncio
mTLS echo server that requires our client certificate; the clients are asyncio streams here.

Each wave: 1,000 clients connect (100 at a time, so the listen queue never overflows) and
each echoes a first message; once all 1,000 are open at the same time (a barrier) the daemon
must report 1,000 active connections; then every client echoes round after round until the
hold ends, half-closes, reads the server's EOF and closes. After a wave, descriptors must
come back to the idle count (waited for with a deadline) before memory is read.

- The normal suite: a warm-up wave, then one soak wave, SHORT_HOLD seconds each (~25 s in all).
- `python3 -m pytest -q -m soak tests/test_load.py -s`: a warm-up wave, then five waves of two
  minutes (ten minutes of soak), deselected by default (pyproject's addopts has `-m "not soak"`).
Both print the figures (connections, rounds, fds and memory before/during/after).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sidecar.control.client import ControlClient, DaemonNotRunning
from sidecar.paths import resolve_places
from tests.scenario import Pki, route_to, write_config
from tests.waiting import wait_until

CONNECTIONS = 1000
CONNECTING_AT_ONCE = 100  # below the daemon's listen backlog
MESSAGE = 200  # bytes per echo round
SHORT_HOLD = 10.0  # seconds of echoing with all connections open, in the normal suite
SOAK_WAVES, SOAK_HOLD = 5, 120.0  # the marked soak: ten minutes of load
FD_SLACK = 5  # descriptors after a wave may differ from idle by this much
RSS_GROWTH_MIB = 16  # RSS after the last wave may exceed RSS after the first by this much
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sample:
    fds: int
    rss_kib: int
    pss_kib: int

    def __str__(self) -> str:
        return f"{self.fds} fds, RSS {self.rss_kib / 1024:.1f} MiB, PSS {self.pss_kib / 1024:.1f} MiB"


def sample(pid: int) -> Sample:
    proc = Path("/proc") / str(pid)

    def kib(text: str, key: str) -> int:
        return int(next(line for line in text.splitlines() if line.startswith(key)).split()[1])

    return Sample(
        fds=len(os.listdir(proc / "fd")),
        rss_kib=kib((proc / "status").read_text(), "VmRSS:"),
        pss_kib=kib((proc / "smaps_rollup").read_text(), "Pss:"),
    )


@dataclass
class Wave:
    connected: int = 0
    rounds: int = 0
    closed_cleanly: int = 0
    errors: list[str] = field(default_factory=list)
    during: Sample | None = None
    active: int = 0
    seconds: float = 0.0


async def run_wave(port: int, pid: int, client: ControlClient, hold: float) -> Wave:
    """CONNECTIONS clients through the route at `port`, all open at once, echoing for `hold` s."""
    wave = Wave()
    all_open = asyncio.Barrier(CONNECTIONS + 1)
    stop = asyncio.Event()
    slots = asyncio.Semaphore(CONNECTING_AT_ONCE)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, i: int, n: int) -> None:
        message = (b"%06d:%08d|" % (i, n)).ljust(MESSAGE, b".")
        writer.write(message)
        got = await asyncio.wait_for(reader.readexactly(MESSAGE), 60)
        if got != message:
            raise AssertionError(f"echo mismatch: sent {message[:16]!r}..., got {got[:16]!r}...")

    async def one(i: int) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            async with slots:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 60)
                await echo(reader, writer, i, 0)
            wave.connected += 1
            await asyncio.wait_for(all_open.wait(), 120)
            n = 0
            while not stop.is_set():
                n += 1
                await echo(reader, writer, i, n)
                wave.rounds += 1
            writer.write_eof()  # half-close: the server's EOF must come back through the tunnel
            if await asyncio.wait_for(reader.read(), 60) == b"":
                wave.closed_cleanly += 1
        except Exception as exc:
            wave.errors.append(f"connection {i}: {type(exc).__name__}: {exc}")
            await all_open.abort()
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    started = time.monotonic()
    tasks = [asyncio.create_task(one(i), name=f"client {i}") for i in range(CONNECTIONS)]
    try:
        await asyncio.wait_for(all_open.wait(), 180)
        wave.during = sample(pid)
        route = await asyncio.to_thread(client.get, "/v1/routes")
        wave.active = route["load"]["active_connections"]
        await asyncio.sleep(hold)  # the soak itself: load for this long (not synchronisation)
    except (asyncio.BrokenBarrierError, TimeoutError) as exc:
        wave.errors.append(f"not all {CONNECTIONS} connections were open at once: {type(exc).__name__}")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    wave.seconds = time.monotonic() - started
    return wave


@contextlib.contextmanager
def echo_server(pki: Pki, log: Path) -> Iterator[int]:
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.echoserver",
                "--cert",
                str(pki.server_cert),
                "--key",
                str(pki.server_key),
                "--client-ca",
                str(pki.client_ca_file),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=REPO,
        )
        assert proc.stdout is not None and proc.stdin is not None
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                ready = sel.select(timeout=30)
            line = proc.stdout.readline() if ready else b""
            assert line.strip().isdigit(), f"the echo server did not start: {log.read_text()[-2000:]}"
            yield int(line)
        finally:
            proc.stdin.close()  # it stops when stdin closes
            proc.stdout.close()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def desktop_file_limit() -> None:
    """In the daemon's child process: the soft limit many desktops give (the daemon raises it)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))


@contextlib.contextmanager
def daemon_process(log: Path) -> Iterator[tuple[int, ControlClient]]:
    client = ControlClient(resolve_places().control_socket, timeout=60)
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "--log-level", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=desktop_file_limit,
        )

        def up() -> bool:
            assert proc.poll() is None, f"the daemon exited: {log.read_text()[-2000:]}"
            try:
                return bool(client.get("/v1/routes")["load"]["state"] == "up")
            except (DaemonNotRunning, OSError):
                return False

        try:
            wait_until(up, timeout=30, what="the daemon to serve route load")
            yield proc.pid, client
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            assert proc.returncode == 0, f"the daemon ended with {proc.returncode}: {log.read_text()[-2000:]}"


def raise_own_file_limit() -> None:
    """This process holds the 1,000 client sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = CONNECTIONS + 200
    if soft < need:
        assert hard >= need, f"the hard open-file limit {hard} is below {need}: raise it (ulimit -Hn)"
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def soft_file_limit(pid: int) -> int:
    limits = (Path("/proc") / str(pid) / "limits").read_text()
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    return int(line.split()[3])


def load_test(home: Path, tmp: Path, waves: int, hold: float) -> dict[str, Any]:
    raise_own_file_limit()
    pki = Pki.create(tmp / "pki")
    pki.enroll(home / "keystore", "dev", "dev-1")
    with echo_server(pki, tmp / "echoserver.log") as echo_port:
        write_config(
            home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={"load": route_to(pki, echo_port)},
        )
        with daemon_process(tmp / "daemon.log") as (pid, client):
            assert soft_file_limit(pid) >= 2 * CONNECTIONS + 100, "the daemon did not raise its open-file limit"
            port = int(client.get("/v1/routes")["load"]["listen"].rsplit(":", 1)[1])
            # one connection first: the TLS context and the first handshake are made before the baseline
            asyncio.run(run_wave_of_one(port))
            idle = wait_for_idle(pid, client, None)
            results: list[tuple[Wave, Sample]] = []
            # wave 0 warms up (the allocator reaches its working size): memory after it is the reference
            for number in range(waves + 1):
                wave = asyncio.run(run_wave(port, pid, client, hold))
                after = wait_for_idle(pid, client, idle)
                results.append((wave, after))
                print(
                    f"\nwave {number}{' (warm-up)' if not number else ''}: {wave.connected} connected, "
                    f"{wave.active} active at once, {wave.rounds} echo rounds, {wave.closed_cleanly} clean "
                    f"half-closes, {len(wave.errors)} errors, {wave.seconds:.1f}s; during: {wave.during}; "
                    f"after: {after}"
                )
                assert wave.errors == [], wave.errors[:10]
            route = client.get("/v1/routes")["load"]
    return {"idle": idle, "results": results, "route": route}


async def run_wave_of_one(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"x")
    assert await asyncio.wait_for(reader.readexactly(1), 30) == b"x"
    writer.close()
    await writer.wait_closed()


def wait_for_idle(pid: int, client: ControlClient, idle: Sample | None) -> Sample:
    """No connection left in the daemon, and (after a wave) its descriptors back near idle."""

    def settled() -> Sample | None:
        if client.get("/v1/routes")["load"]["active_connections"] != 0:
            return None
        now = sample(pid)
        return now if idle is None or now.fds <= idle.fds + FD_SLACK else None

    return wait_until(settled, timeout=60, what="the daemon's connections and descriptors to go")


def check(report: dict[str, Any], hold: float) -> None:
    idle: Sample = report["idle"]
    results: list[tuple[Wave, Sample]] = report["results"]
    total = CONNECTIONS * len(results) + 1
    route = report["route"]
    for wave, after in results:
        assert wave.connected == CONNECTIONS and wave.closed_cleanly == CONNECTIONS
        assert wave.active == CONNECTIONS
        assert wave.during is not None and wave.during.fds >= idle.fds + 2 * CONNECTIONS - FD_SLACK
        assert abs(after.fds - idle.fds) <= FD_SLACK, (idle, after)
    reference = results[0][1]  # after the warm-up wave
    last = results[-1][1]
    growth_mib = (last.rss_kib - reference.rss_kib) / 1024
    soak_rounds = sum(wave.rounds for wave, _ in results[1:])
    print(
        f"\nload held: {len(results) - 1} wave(s) of {CONNECTIONS} concurrent connections, "
        f"{hold:g}s of echoing each, {soak_rounds} echo rounds of {MESSAGE} bytes, "
        f"{route['total_connections']} connections in all, failures {route['failures']}\n"
        f"  idle before: {idle}\n  after warm-up: {reference}\n  after the soak: {last}\n"
        f"  RSS growth across the soak: {growth_mib:+.1f} MiB; fds: {last.fds - idle.fds:+d} against idle"
    )
    assert route["total_connections"] == total and route["failures"] == {}, route
    assert soak_rounds >= CONNECTIONS * (len(results) - 1), "fewer than one echo round per connection per wave"
    assert growth_mib <= RSS_GROWTH_MIB, f"RSS grew by {growth_mib:.1f} MiB across the soak"


def test_a_thousand_connections_echo_through_one_route_without_leaks(isolated_home: Path, tmp_path: Path) -> None:
    check(load_test(isolated_home, tmp_path, waves=1, hold=SHORT_HOLD), SHORT_HOLD)


@pytest.mark.soak
def test_ten_minute_soak_of_a_thousand_connections(isolated_home: Path, tmp_path: Path) -> None:
    check(load_test(isolated_home, tmp_path, waves=SOAK_WAVES, hold=SOAK_HOLD), SOAK_HOLD)
