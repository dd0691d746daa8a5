"""Events inside the daemon: published once, delivered to every subscriber (the control API, logs)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("sidecar.events")

QUEUE_LIMIT = 1000


class EventBus:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self.history: list[dict[str, Any]] = []  # the last few, for status and tests

    def publish(self, event_type: str, **fields: Any) -> dict[str, Any]:
        event = {"type": event_type, "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), **fields}
        log.debug("event %s", event)
        self.history = [*self.history[-99:], event]
        for queue in list(self._subscribers):
            if queue.full():  # a stalled subscriber loses events rather than stalling the daemon
                continue
            queue.put_nowait(event)
        return event

    def add_subscriber(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_LIMIT)
        self._subscribers.add(queue)
        return queue

    def remove_subscriber(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._subscribers.discard(queue)

    @contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[dict[str, Any]]]:
        queue = self.add_subscriber()
        try:
            yield queue
        finally:
            self.remove_subscriber(queue)
