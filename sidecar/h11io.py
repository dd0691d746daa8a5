"""The steps every small h11 server here repeats: the next request event (reading more as
needed, with a deadline), a whole response written at once, and, for servers that must end
their open connections when stopped, the set of their connection tasks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import h11


async def next_event(conn: h11.Connection, reader: asyncio.StreamReader, chunk: int, timeout: float) -> Any:
    """The connection's next event; waits at most `timeout` for each read (TimeoutError)."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await asyncio.wait_for(reader.read(chunk), timeout))


async def send_response(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    status: int,
    headers: list[tuple[str, str]],
    body: bytes | None,
) -> None:
    """Response, body (None: none, as for HEAD) and end of message, then drain."""
    writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
    if body is not None:
        writer.write(conn.send(h11.Data(data=body)) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")
    await writer.drain()


class ConnectionTasks:
    """The tasks serving one server's open connections, so that stopping it ends them all."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    @contextlib.asynccontextmanager
    async def serving(self, writer: asyncio.StreamWriter) -> AsyncIterator[None]:
        """Around one connection's handler: the task is counted while it runs and the writer is
        closed after. A cancel from `cancel_all` ends it normally, which keeps asyncio's stream
        server (it calls task.exception() on its handler tasks) from logging a false error."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            yield
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def cancel_all(self) -> None:
        """End every open connection and wait until their handlers have finished."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
