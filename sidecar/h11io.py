"""The two steps every small h11 server here repeats: the next request event (reading more
as needed, with a deadline), and a whole response written at once."""

from __future__ import annotations

import asyncio
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
