"""Fan-out of agent events to control-socket subscribers.

Owns: per-subscriber bounded queues.  Must never: block a publisher (the
agent's protocol loops publish here), so a subscriber that falls behind
loses events and is told how many.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import trio

__all__ = ["EventBus"]


class _Subscriber:
    __slots__ = ("send", "dropped")

    def __init__(self, send: trio.MemorySendChannel) -> None:
        self.send = send
        self.dropped = 0


class EventBus:
    def __init__(self, buffer: int = 256) -> None:
        self.buffer = buffer
        self._subs: set[_Subscriber] = set()
        self.published = 0
        # Events published, by type (our own constants, so a bounded set):
        # the metrics read member.suspect and the like from here.
        self.counts: dict[str, int] = {}
        self.closed = False

    def publish(self, type_: str, **fields: Any) -> None:
        event = {"type": type_, "ts": time.time(), **fields}
        self.published += 1
        self.counts[type_] = self.counts.get(type_, 0) + 1
        for sub in list(self._subs):
            try:
                sub.send.send_nowait(event)
            except trio.WouldBlock:
                sub.dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subs.discard(sub)

    def close(self) -> None:
        """End every subscription after the events already queued."""
        self.closed = True
        for sub in list(self._subs):
            sub.send.close()

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    async def subscribe(self) -> AsyncIterator[dict[str, Any]]:
        send, recv = trio.open_memory_channel[dict[str, Any]](self.buffer)
        sub = _Subscriber(send)
        if self.closed:
            send.close()
        self._subs.add(sub)
        try:
            async with recv:
                while True:
                    try:
                        event = await recv.receive()
                    except trio.EndOfChannel:
                        return  # the bus closed: the stream ends cleanly
                    yield event
                    # Events were lost after the ones still buffered: say so once
                    # the buffer is drained, where the gap really is.
                    if sub.dropped and recv.statistics().current_buffer_used == 0:
                        yield {"type": "events.dropped", "ts": time.time(), "count": sub.dropped}
                        sub.dropped = 0
        finally:
            self._subs.discard(sub)
            send.close()
