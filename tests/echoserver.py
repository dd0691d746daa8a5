"""An mTLS echo server for load tests: one asyncio process holding thousands of connections.

    python3 -m tests.echoserver --cert S.pem --key S.key --client-ca CA.pem

Requires a client certificate from CLIENT_CA, echoes every byte back until the client ends
the stream, prints its port on stdout (one line) once it accepts, and stops on SIGTERM or
when stdin closes (so it never outlives the test that started it). The thread-per-connection
`ScriptedTLSServer` is for misbehaving on purpose; this one is for numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import signal
import ssl
import sys
from collections.abc import Sequence


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def serve(cert: str, key: str, client_ca: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=client_ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: sys.stdin.buffer.read1(1) or stop.set())
    server = await asyncio.start_server(_echo, "127.0.0.1", 0, ssl=ctx, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m tests.echoserver")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--client-ca", required=True)
    args = parser.parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(serve(args.cert, args.key, args.client_ca))


if __name__ == "__main__":
    main()
