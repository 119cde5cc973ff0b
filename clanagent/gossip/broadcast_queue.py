"""The transmit-limited queue of gossip broadcasts (sans-IO).

Owns: which queued broadcasts ride on the next gossip packet, how many times
each one is sent (`retransmit_mult * ceil(log10(n + 1))` for a clan of `n`),
and replacing a queued broadcast when a newer one with the same key arrives.
Model: memberlist `queue.go` (`TransmitLimitedQueue`).

Ordering, as in memberlist: fewest transmits first, so fresh news spreads
before old news is repeated; within one transmit count the newest first.
Broadcasts that do not fit the remaining bytes are skipped and smaller ones
further down are tried.

Must never: look at the payload (it is opaque bytes), decide whether a
broadcast is newer than what is queued (the caller queues only what it just
stored as newer), read the clock, or do I/O.  It is called every gossip tick
by every node of a 1000-node simulation, so a call costs O(k log n) for k
broadcasts taken, never a sort of the whole queue.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable
from dataclasses import dataclass

__all__ = ["BroadcastQueue", "retransmit_limit"]

# How many queued broadcasts in a row may be too big for the space left before
# we give up on that transmit tier.  memberlist finds a fitting one in its
# btree by size; a bounded look-ahead gets nearly the same packing without a
# second index, and keeps a call cheap when a huge queue is full of big items.
_MAX_SKIPS_PER_TIER = 16

# Heap entries of invalidated broadcasts stay until popped (lazy deletion);
# rebuild the heaps when they outnumber the live ones by this much.
_COMPACT_SLACK = 64


def retransmit_limit(retransmit_mult: int, num_nodes: int) -> int:
    """How many times a broadcast is sent in a clan of `num_nodes`.

    `retransmit_mult * ceil(log10(num_nodes + 1))`, computed exactly in
    integers (ceil(log10(n + 1)) is the number of decimal digits of n), and at
    least 1 so that a broadcast queued while we know of nobody still goes out
    once.
    """
    n = max(0, int(num_nodes))
    scale = len(str(n)) if n > 0 else 0
    return max(1, retransmit_mult * scale)


@dataclass(slots=True, eq=False)
class _Item:
    key: Hashable
    payload: bytes
    id: int
    transmits: int
    on_done: Callable[[], None] | None
    live: bool = True


class BroadcastQueue:
    """Broadcasts waiting to be piggybacked on gossip packets.

    `queue(key, payload)` adds one; a queued broadcast with the same key is
    dropped (its `on_done` runs).  `get_broadcasts(overhead, limit)` returns
    the payloads for one packet and counts a transmit for each.  `on_done`
    runs exactly once per broadcast, when it leaves the queue for any reason
    (sent enough times, replaced, pruned, reset).
    """

    def __init__(
        self,
        retransmit_mult: int,
        num_nodes: Callable[[], int],
        *,
        limit: Callable[[int], int] | None = None,
    ) -> None:
        """`limit(n)`, when given, is the transmits per broadcast in a clan of
        `n` instead of `retransmit_limit(retransmit_mult, n)`."""
        if retransmit_mult < 1:
            raise ValueError("retransmit_mult must be at least 1")
        self._mult = retransmit_mult
        self._num_nodes = num_nodes
        self._limit = limit
        self._by_key: dict[Hashable, _Item] = {}
        # transmit count -> heap of (-id, item): the top is the newest.  Ids are
        # unique, so tuple comparison never reaches the item.
        self._tiers: dict[int, list[tuple[int, _Item]]] = {}
        self._dead = 0
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._by_key)

    def transmit_limit(self) -> int:
        """The current number of transmits per broadcast (it follows `num_nodes`)."""
        if self._limit is not None:
            return max(1, self._limit(self._num_nodes()))
        return retransmit_limit(self._mult, self._num_nodes())

    def queue(
        self,
        key: Hashable,
        payload: bytes,
        *,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        """Queue `payload` under `key`, replacing a queued broadcast with that key."""
        if not isinstance(payload, (bytes, bytearray)):
            raise TypeError("payload must be bytes")
        self._next_id += 1
        item = _Item(key, bytes(payload), self._next_id, 0, on_done)
        old = self._by_key.get(key)
        if old is not None:
            self._kill(old)
        self._by_key[key] = item
        heapq.heappush(self._tiers.setdefault(0, []), (-item.id, item))
        self._maybe_compact()
        if old is not None and old.on_done is not None:
            old.on_done()

    def get_broadcasts(self, overhead_per_item: int, limit_bytes: int) -> list[bytes]:
        """Take the broadcasts for one packet of at most `limit_bytes`.

        Each taken broadcast costs `overhead_per_item + len(payload)` bytes of
        the limit.  Its transmit count goes up by one; it leaves the queue when
        that reaches `transmit_limit()`.
        """
        if not self._by_key:
            return []
        tx_limit = self.transmit_limit()
        out: list[bytes] = []
        used = 0
        promoted: list[_Item] = []
        finished: list[_Item] = []
        full = False
        for tier in sorted(self._tiers):
            heap = self._tiers[tier]
            skipped: list[tuple[int, _Item]] = []
            while heap:
                free = limit_bytes - used - overhead_per_item
                if free <= 0:
                    full = True
                    break
                entry = heap[0]
                item = entry[1]
                if not item.live:
                    heapq.heappop(heap)
                    self._dead -= 1
                    continue
                if len(item.payload) > free:
                    if len(skipped) >= _MAX_SKIPS_PER_TIER:
                        break
                    skipped.append(heapq.heappop(heap))
                    continue
                heapq.heappop(heap)
                out.append(item.payload)
                used += overhead_per_item + len(item.payload)
                item.transmits += 1
                if item.transmits >= tx_limit:
                    item.live = False
                    del self._by_key[item.key]
                    finished.append(item)
                else:
                    # Re-inserted only after the walk, or we would meet it
                    # again in the next tier of this same call.
                    promoted.append(item)
            for entry in skipped:
                heapq.heappush(heap, entry)
            if not heap:
                del self._tiers[tier]
            if full:
                break
        for item in promoted:
            heapq.heappush(self._tiers.setdefault(item.transmits, []), (-item.id, item))
        for item in finished:
            if item.on_done is not None:
                item.on_done()
        return out

    def prune(self, max_retain: int) -> None:
        """Keep at most `max_retain` broadcasts: the least sent, then the newest."""
        if len(self._by_key) <= max_retain:
            return
        keep = max(0, max_retain)
        ranked = sorted(self._by_key.values(), key=lambda it: (it.transmits, -it.id))
        dropped = ranked[keep:]
        for item in dropped:
            self._kill(item)
            del self._by_key[item.key]
        self._compact()
        for item in dropped:
            if item.on_done is not None:
                item.on_done()

    def reset(self) -> None:
        """Drop every queued broadcast (their `on_done` run)."""
        items = list(self._by_key.values())
        self._by_key.clear()
        self._tiers.clear()
        self._dead = 0
        for item in items:
            if item.on_done is not None:
                item.on_done()

    def ordered_view(self) -> list[tuple[Hashable, int]]:
        """(key, transmits) of every queued broadcast in send order; for tests and status."""
        live = sorted(self._by_key.values(), key=lambda it: (it.transmits, -it.id))
        return [(it.key, it.transmits) for it in live]

    def _kill(self, item: _Item) -> None:
        item.live = False
        self._dead += 1

    def _maybe_compact(self) -> None:
        if self._dead > _COMPACT_SLACK and self._dead > len(self._by_key):
            self._compact()

    def _compact(self) -> None:
        tiers: dict[int, list[tuple[int, _Item]]] = {}
        for tier, heap in self._tiers.items():
            alive = [entry for entry in heap if entry[1].live]
            if alive:
                heapq.heapify(alive)
                tiers[tier] = alive
        self._tiers = tiers
        self._dead = 0
