"""A relay that makes a loopback server look far away: every chunk waits a fixed time each way.

    python3 -m bench.delayrelay --listen PORT --target PORT [--delay-ms 10] [--no-handshake]

This kernel has no netem, so the delay cannot come from the kernel. The relay accepts on
127.0.0.1:PORT, dials 127.0.0.1:TARGET, and hands each chunk it reads on one side to the other
side DELAY after it arrived: in order per direction, with the end of a direction (a half-close,
FIN) held for the same DELAY and then passed on with `shutdown(SHUT_WR)`, so the other direction
keeps flowing. A reset is passed on as a close after DELAY.

TCP's own handshake is a round trip that loopback makes free: the client's `connect()` returns
at once. By default the relay puts that round trip back into the time that counts, the time to
the first byte: the client's bytes start their one-way trip only one round trip after the
accept, and the relay dials the target when the handshake's last ACK would reach it (1.5 round
trips after the accept), so a server that speaks first is heard 2 round trips after the
connect, as over a real link. `--no-handshake` turns this off (only the chunks are delayed).

Why threads, not asyncio: asyncio's and libuv's timers wake in whole milliseconds (epoll's
timeout is rounded up), which would add up to 1 ms per one-way trip. Each connection has a
reader and a writer thread per direction (kept in a pool: starting four threads per connection
cost ~0.8 ms); a writer waits until its oldest chunk is due (see `sleep_until`), so order per
direction is kept by construction.

Its own cost, measured on this 2-core VM (load average ~0, the bench's C echo server, medians):
with `--delay-ms 0`, a 1-byte echo on a held connection took 148-152 µs through the relay
against 55-64 µs direct (~45 µs per one-way trip), and a new connection's first echoed byte
0.39-0.51 ms against 0.10-0.11 ms; with `--delay-ms 10`, the echo took 20.29 ms (20 asked) and
a new plain TCP connection's first echoed byte 40.71 ms (2 round trips asked: TCP's handshake
and the echo).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import queue
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

HOST = "127.0.0.1"
CHUNK = 65536
# Chunks held per direction before the reader stops reading: a fast sender is then held back
# (as by a TCP window) instead of filling memory.
QUEUE_CHUNKS = 256
EOF = b""
# SO_LINGER on, 0 s: close() sends a reset.
LINGER_RESET = struct.pack("ii", 1, 0)
PR_SET_TIMERSLACK = 29
SPIN = 0.0003


def _fine_timers() -> None:
    """Ask Linux to wake this thread's sleeps on time: the default timer slack (50 µs) lets the
    kernel batch wake-ups; a 10 ms sleep here woke ~110 µs late with it, ~50 µs with 1 ns."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)


class _Threads:
    """Daemon threads kept for reuse. Starting a thread costs ~100 µs here and a new connection
    needs four, which showed as ~0.8 ms added to every new connection; handing a job to an idle
    thread costs a queue put."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]]] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.idle = 0

    def run(self, job: Callable[..., None], *args: Any) -> None:
        with self.lock:
            if self.idle:
                self.idle -= 1
                self.jobs.put((job, args))
                return
        threading.Thread(target=self._worker, args=(job, args), daemon=True).start()

    def _worker(self, job: Callable[..., None], args: tuple[Any, ...]) -> None:
        _fine_timers()
        while True:
            job(*args)
            with self.lock:
                self.idle += 1
            job, args = self.jobs.get()


def sleep_until(when: float) -> None:
    """Return when time.monotonic() reaches `when` (at once if already past). A sleeping thread
    woke ~110 µs late here even with fine timers (the VM's wake-up from idle); so sleep until
    SPIN before, then poll the clock, giving the GIL away on each turn: ~10 µs late, for up to
    SPIN of CPU per wait (the WAN line opens one connection at a time)."""
    wait = when - time.monotonic() - SPIN
    if wait > 0:
        time.sleep(wait)
    while time.monotonic() < when:
        time.sleep(0)


def _nodelay(sock: socket.socket) -> None:
    # A held chunk must leave the moment it is due, not wait for Nagle to fill a segment.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Link:
    """One relayed connection: client side, server side, four threads."""

    def __init__(self, relay: DelayRelay, client: socket.socket, accepted: float) -> None:
        self.relay = relay
        self.client = client
        self.server: socket.socket | None = None
        self.accepted = accepted
        self.lock = threading.Lock()
        self.writers_left = 2
        self.reset = False

    def run(self) -> None:
        """The accepting thread's part: start the upstream reader, dial the target when the
        handshake would let the server accept, then carry the client's bytes upstream."""
        delay, rtt = self.relay.delay, 2 * self.relay.delay
        opens = self.accepted + (rtt if self.relay.handshake else 0.0)
        up: queue.Queue[tuple[float, bytes]] = queue.Queue(QUEUE_CHUNKS)
        self.relay.threads.run(self._read, self.client, up, opens)
        sleep_until(self.accepted + (rtt + delay if self.relay.handshake else 0.0))
        try:
            server = socket.create_connection((HOST, self.relay.target), timeout=30)
            server.settimeout(None)
        except OSError:
            self.reset = True
            self._abort()
            self._write(up, None)  # drain until the client reader's EOF, then close
            return
        _nodelay(server)
        self.server = server
        down: queue.Queue[tuple[float, bytes]] = queue.Queue(QUEUE_CHUNKS)
        self.relay.threads.run(self._read, server, down, 0.0)
        self.relay.threads.run(self._write, down, self.client)
        self._write(up, server)

    def _read(self, src: socket.socket, out: queue.Queue[tuple[float, bytes]], opens: float) -> None:
        """Stamp each chunk with the time it is due at the other side; EOF is stamped like data.
        Due times only grow, so the single writer keeps the order."""
        delay = self.relay.delay
        while True:
            try:
                data = src.recv(CHUNK)
            except OSError:
                self.reset = True
                data = EOF
            out.put((max(time.monotonic(), opens) + delay, data))
            if not data:
                return

    def _write(self, inq: queue.Queue[tuple[float, bytes]], dst: socket.socket | None) -> None:
        try:
            while True:
                due, data = inq.get()
                sleep_until(due)
                if dst is None:
                    if not data:
                        return
                    continue
                if not data:
                    if self.reset:
                        self._abort()
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                try:
                    dst.sendall(data)
                except OSError:
                    # The receiver is gone: stop both directions (their readers see EOF).
                    self.reset = True
                    self._abort()
        finally:
            self._writer_done()

    def _abort(self) -> None:
        """Wake every blocked recv on this link (shutdown does; close from another thread would not)."""
        for sock in (self.client, self.server):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _writer_done(self) -> None:
        with self.lock:
            self.writers_left -= 1
            last = self.writers_left == 0 or self.server is None
        if last:
            for sock in (self.client, self.server):
                if sock is not None:
                    if self.reset:  # pass a reset on as one
                        with contextlib.suppress(OSError):
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                    sock.close()
            self.relay.link_closed()


class DelayRelay:
    """Listens on 127.0.0.1:`listen` (0: any free port, see `.port`), relays to 127.0.0.1:`target`."""

    def __init__(self, listen: int, target: int, delay_s: float, handshake: bool = True) -> None:
        self.target = target
        self.delay = delay_s
        self.handshake = handshake
        self.threads = _Threads()
        self.links_done = 0  # connections finished both ways (the tests wait on it)
        self._count_lock = threading.Lock()
        self.sock = socket.create_server((HOST, listen), backlog=4096)
        self.port: int = self.sock.getsockname()[1]

    def serve_forever(self) -> None:
        while True:
            try:
                client, _addr = self.sock.accept()
            except OSError:
                return  # closed
            accepted = time.monotonic()
            _nodelay(client)
            self.threads.run(_Link(self, client, accepted).run)

    def start(self) -> threading.Thread:
        """Serve from a daemon thread (the tests' way); `close()` stops accepting."""
        thread = threading.Thread(target=self.serve_forever, daemon=True)
        thread.start()
        return thread

    def link_closed(self) -> None:
        with self._count_lock:
            self.links_done += 1

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.delayrelay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1 to accept on")
    parser.add_argument("--target", type=int, required=True, help="port on 127.0.0.1 to relay to")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay (default 10: a 20 ms round trip)")
    parser.add_argument(
        "--no-handshake", action="store_true", help="do not add TCP's handshake round trip before the first byte"
    )
    args = parser.parse_args(argv)
    relay = DelayRelay(args.listen, args.target, args.delay_ms / 1e3, handshake=not args.no_handshake)
    print(f"relaying 127.0.0.1:{relay.port} -> 127.0.0.1:{args.target}, {args.delay_ms} ms each way", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        relay.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
