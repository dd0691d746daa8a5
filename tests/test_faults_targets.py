"""Targets that fail: down, refusing, too slow to accept, silent, resetting or closing mid-answer.

For each fault, through one daemon that also has a healthy route to a real nginx:
- the local client's connection is closed (EOF or reset) within a bound, the route's
  connect_timeout plus 2 s, waited for with a deadline;
- the faulty route's counters name the reason (a `sidecar.failures` key) with a readable
  last_error, and the healthy route counts nothing;
- the healthy route keeps serving meanwhile (a held keep-alive connection and new ones)
  and afterwards.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.daemon_runner import DaemonThread
from tests.realservers import nginx_mtls
from tests.scenario import Pki, curl, http_get_on, route_to, write_config
from tests.tlsserver import PARTIAL_ANSWER, ScriptedTLSServer, full_backlog
from tests.waiting import wait_until

CONNECT_TIMEOUT = 1.0
CLOSE_BOUND = CONNECT_TIMEOUT + 2.0  # the local client's connection must be closed within this
REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"


@dataclass(frozen=True)
class Fault:
    name: str
    reason: str  # the failure key the faulty route must count
    says: str  # words its last_error must hold
    answer: bytes = b""  # what the local client receives before the close
    # how the local connection ends: RST (True), FIN (False), either (None: closing a socket that
    # holds the client's unread request sends RST, and the request may or may not have arrived)
    reset: bool | None = None


FAULTS = [
    Fault("down", "refused", "refused (is the service running?)"),  # `check`'s key too (one vocabulary)
    Fault("refusing", "connect", "reset the connection during the TLS handshake"),
    Fault("slow_to_accept", "timeout", "no TCP connection within 1s"),
    Fault("never_handshakes", "timeout", "did not complete the TLS handshake within 1s"),
    Fault("reset_mid_answer", "reset", "reset the connection after {n} bytes", answer=PARTIAL_ANSWER, reset=True),
    Fault(
        "closes_mid_answer", "truncated", "without TLS close_notify after {n} bytes", answer=PARTIAL_ANSWER, reset=False
    ),
]


@contextlib.contextmanager
def faulty_target(fault: str, pki: Pki) -> Iterator[int]:
    """A loopback port that misbehaves as `fault` says."""
    if fault == "down":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
            yield probe.getsockname()[1]
        return
    if fault == "slow_to_accept":
        with full_backlog() as port:
            yield port
        return
    mode = {
        "refusing": "reset_on_accept",
        "never_handshakes": "stall",
        "reset_mid_answer": "partial_reset",
        "closes_mid_answer": "partial_close",
    }[fault]
    with ScriptedTLSServer(
        cert=pki.server_cert,
        key=pki.server_key,
        client_ca=pki.client_ca_file,
        require_client_cert=True,
        mode=mode,
    ) as server:
        yield server.port


def read_until_closed(sock: socket.socket, bound: float) -> tuple[bytes, bool]:
    """Everything the client receives until the connection ends; (data, ended by a reset).

    Fails if the connection is still open `bound` seconds from now.
    """
    deadline = time.monotonic() + bound
    data = b""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, True
        except TimeoutError:
            raise AssertionError(f"the local connection was still open after {bound:g}s; got {data!r}") from None
        if not chunk:
            return data, False
        data += chunk


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_a_faulty_target_closes_the_client_promptly_counts_why_and_spares_other_routes(
    fault: Fault, pki: Pki, isolated_home: Path, tmp_path: Path
) -> None:
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    with (
        nginx_mtls(
            tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.client_ca_file
        ) as nginx,
        faulty_target(fault.name, pki) as port,
    ):
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={
                "healthy": route_to(pki, nginx.port),
                "faulty": route_to(pki, port, connect_timeout=f"{CONNECT_TIMEOUT:g}s"),
            },
        )
        with DaemonThread(config) as daemon, daemon.connect("healthy") as held:
            assert b"verify=SUCCESS" in http_get_on(held)
            with daemon.connect("faulty") as client:
                started = time.monotonic()
                with contextlib.suppress(OSError):  # the tunnel may already have closed it
                    client.sendall(REQUEST)
                # while the faulty connection is pending, the other route serves at once
                assert b"verify=SUCCESS" in http_get_on(held)
                assert "verify=SUCCESS" in curl(daemon.port("healthy"), timeout=5).stdout
                answer, was_reset = read_until_closed(client, CLOSE_BOUND - (time.monotonic() - started))
                closed_after = time.monotonic() - started
            wait_until(
                lambda: daemon.status()["routes"]["faulty"]["active_connections"] == 0,
                timeout=5,
                what="the daemon to let go of the faulty connection",
            )
            status = daemon.status()["routes"]
            # and afterwards: the held connection and new ones
            assert b"verify=SUCCESS" in http_get_on(held)
            assert "verify=SUCCESS" in curl(daemon.port("healthy"), timeout=5).stdout
            wait_until(
                lambda: daemon.status()["routes"]["healthy"]["active_connections"] == 1,
                timeout=5,
                what="curl's connections to end, the held one to stay",
            )
    print(
        f"\nfault {fault.name}: local client closed after {closed_after:.2f}s "
        f"({'reset' if was_reset else 'EOF'}, {len(answer)} bytes); "
        f"counted {status['faulty']['failures']}: {status['faulty']['last_error']}"
    )
    assert answer == fault.answer
    assert fault.reset is None or was_reset == fault.reset
    assert status["faulty"]["failures"] == {fault.reason: 1}, status["faulty"]
    assert fault.says.format(n=len(PARTIAL_ANSWER)) in status["faulty"]["last_error"]
    assert status["faulty"]["active_connections"] == 0
    assert status["healthy"]["failures"] == {}, status["healthy"]
    if fault.reason == "timeout":
        assert closed_after >= CONNECT_TIMEOUT * 0.9, "closed before connect_timeout: which timeout fired?"


def test_a_server_half_close_without_close_notify_keeps_the_other_direction_open(pki: Pki, isolated_home: Path) -> None:
    """A TCP FIN alone from the server is a half-close: the local client gets its EOF and what
    it sends afterwards still reaches the server (as ghostunnel does; before, the client's next
    write met a broken pipe)."""
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    with ScriptedTLSServer(
        cert=pki.server_cert,
        key=pki.server_key,
        client_ca=pki.client_ca_file,
        require_client_cert=True,
        mode="fin_then_read",
    ) as server:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={"halfway": route_to(pki, server.port)},
        )
        with DaemonThread(config) as daemon, daemon.connect("halfway") as client:
            client.settimeout(5)
            received = b""
            while chunk := client.recv(65536):  # ends at the EOF passed on, not at a reset
                received += chunk
            assert received == b"first part\n"
            client.sendall(b"late words from the client")
            client.shutdown(socket.SHUT_WR)
            server.wait_for(lambda: server.app_received == b"late words from the client", what="the late words")
            server.wait_closed(1)
            assert client.recv(10) == b""
            wait_until(
                lambda: daemon.status()["routes"]["halfway"]["active_connections"] == 0,
                timeout=5,
                what="the tunnel to close once both directions ended",
            )
            status = daemon.status()["routes"]["halfway"]
    # The server's end came without close_notify while the client was still sending: the answer
    # could have been cut short, and status says so; the connection itself was not torn down.
    assert status["failures"] == {"truncated": 1}, status


def test_the_second_connection_resumes_the_tls_session(pki: Pki, isolated_home: Path) -> None:
    """TLS 1.3 session tickets are kept per route and identity, and the next connection uses one
    (the lookup for a ticket stops after a few records, which a server without tickets needs)."""
    pki.enroll(isolated_home / "keystore", "dev", "dev-1")
    with ScriptedTLSServer(
        cert=pki.server_cert, key=pki.server_key, client_ca=pki.client_ca_file, require_client_cert=True
    ) as server:
        config = write_config(
            isolated_home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={"echo": route_to(pki, server.port)},
        )
        with DaemonThread(config) as daemon:
            for n in range(3):
                with daemon.connect("echo") as client:
                    for _ in range(12):  # more records than the tunnel looks for a ticket in
                        client.sendall(b"ping")
                        got = b""
                        while len(got) < 4 and (chunk := client.recv(4 - len(got))):
                            got += chunk
                        assert got == b"ping"
                server.wait_closed(n + 1)
    assert [r.resumed for r in server.records] == [False, True, True]
