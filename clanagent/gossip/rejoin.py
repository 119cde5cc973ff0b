"""Restarts rejoin: the retry schedule for lost members, and the peer book.

Owns: when we try again to reach a member we marked dead or left
(`RejoinSchedule`: per member, exponential backoff with jitter from a base
interval up to `RETRY_MAX_DELAY`, only for members the inventory still lists,
bounded in size; sans-IO, driven by `now`), and the file in the state dir
where an agent remembers the addresses of its peers (`encode_peer_book`,
`decode_peer_book`: a bounded JSON list; `save_peer_book` writes it
atomically, `load_peer_book` treats a corrupt or hostile file as empty).

Must never: read a clock, sleep or import trio (the schedule is driven by
the node's `now`; the service runs the file helpers in a worker thread),
grow without bound, or let a bad peer file stop an agent.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..durable import FileRefused, atomic_write, read_file

__all__ = [
    "RejoinSchedule",
    "RETRY_MAX_DELAY",
    "RETRY_TIMEOUT",
    "MAX_RETRIES",
    "PeerEntry",
    "PEER_BOOK_FILE",
    "MAX_PEERS",
    "MAX_PEER_BOOK_BYTES",
    "PeerBookError",
    "encode_peer_book",
    "decode_peer_book",
    "save_peer_book",
    "load_peer_book",
]

# The longest wait between two attempts to reach one lost member.
RETRY_MAX_DELAY = 300.0
# Without an inventory to say who belongs, a lost member is given up after this.
RETRY_TIMEOUT = 24 * 3600.0
# Members we keep retrying at most (the planned clan size, with room).
MAX_RETRIES = 16384
# A delay is drawn uniformly from [JITTER_LOW, 1] x the nominal one: never
# later than nominal, and members lost together are not retried in step.
JITTER_LOW = 0.5


@dataclass(slots=True)
class _Entry:
    addr: str
    since: float  # when we marked it dead or left
    attempts: int
    next_at: float


class RejoinSchedule:
    """When to try again to reach each member we marked dead or left.

    `lost(id, addr, now)` starts (or restarts) a member's schedule, `found(id)`
    ends it; `due(now)` returns the members whose attempt is due and moves
    each to its next, doubled, delay.  `scope(ids)` keeps only members the
    inventory lists (None: no inventory, everyone for `RETRY_TIMEOUT`)."""

    def __init__(
        self,
        base: float,
        rng: random.Random,
        *,
        max_delay: float = RETRY_MAX_DELAY,
        timeout: float = RETRY_TIMEOUT,
        max_entries: int = MAX_RETRIES,
    ) -> None:
        if not base > 0 or not max_delay >= base:
            raise ValueError("need 0 < base <= max_delay")
        self.base = base
        self.max_delay = max_delay
        self.timeout = timeout
        self.max_entries = max_entries
        self._rng = rng
        self._entries: dict[str, _Entry] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._tie = itertools.count()
        self._scope: frozenset[str] | None = None
        self.stats = {"rejoin_given_up": 0, "rejoin_evicted": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._entries

    def delay(self, attempts: int) -> float:
        """The nominal wait before attempt number `attempts + 1`."""
        return min(self.max_delay, self.base * (2.0 ** min(attempts, 62)))

    def _schedule(self, node_id: str, entry: _Entry, now: float) -> None:
        jitter = JITTER_LOW + (1.0 - JITTER_LOW) * self._rng.random()
        entry.next_at = now + self.delay(entry.attempts) * jitter
        heapq.heappush(self._heap, (entry.next_at, next(self._tie), node_id))
        if len(self._heap) > 2 * len(self._entries) + 64:
            self._compact()

    def _compact(self) -> None:
        self._heap = [(e.next_at, next(self._tie), k) for k, e in self._entries.items()]
        heapq.heapify(self._heap)

    def lost(self, node_id: str, addr: str, now: float) -> None:
        """We marked `node_id` dead or left: start trying to reach it again."""
        if self._scope is not None and node_id not in self._scope:
            return
        entries = self._entries
        old = entries.pop(node_id, None)
        if old is None and len(entries) >= self.max_entries:
            # The member lost longest ago goes first.
            oldest = min(entries, key=lambda k: entries[k].since)
            del entries[oldest]
            self.stats["rejoin_evicted"] += 1
        entry = _Entry(addr, now, 0, now)
        entries[node_id] = entry
        self._schedule(node_id, entry, now)

    def found(self, node_id: str) -> None:
        """`node_id` is back (or otherwise not to be retried)."""
        self._entries.pop(node_id, None)

    def scope(self, node_ids: Iterable[str] | None) -> None:
        """The members the inventory lists (None: no inventory)."""
        self._scope = None if node_ids is None else frozenset(node_ids)
        if self._scope is not None:
            for node_id in [k for k in self._entries if k not in self._scope]:
                del self._entries[node_id]

    def due(self, now: float) -> list[tuple[str, str]]:
        """`(node id, addr)` of each member to try now; each moves on to its next delay."""
        out: list[tuple[str, str]] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, node_id = heapq.heappop(heap)
            entry = self._entries.get(node_id)
            if entry is None or entry.next_at != when:
                continue  # stale heap item
            if self._scope is None and now - entry.since > self.timeout:
                del self._entries[node_id]
                self.stats["rejoin_given_up"] += 1
                continue
            out.append((node_id, entry.addr))
            entry.attempts += 1
            self._schedule(node_id, entry, now)
        return out

    def next_deadline(self) -> float:
        heap = self._heap
        while heap:
            when, _, node_id = heap[0]
            entry = self._entries.get(node_id)
            if entry is not None and entry.next_at == when:
                return when
            heapq.heappop(heap)
        return math.inf

    def pending(self) -> dict[str, tuple[str, int, float]]:
        """node id -> (addr, attempts so far, next attempt at): for status and tests."""
        return {k: (e.addr, e.attempts, e.next_at) for k, e in self._entries.items()}


# -- the peer book -------------------------------------------------------------

PEER_BOOK_FILE = "peers.json"
PEER_BOOK_VERSION = 1
MAX_PEERS = 256  # addresses remembered (a sample is dialed at start)
MAX_PEER_BOOK_BYTES = 256 * 1024  # a larger file is not ours: ignored
_MAX_ID = 128
_MAX_ADDR = 512
_MAX_NAME = 64


class PeerBookError(ValueError):
    """A peer file we will not use (corrupt, foreign, oversized)."""


@dataclass(frozen=True, slots=True)
class PeerEntry:
    node_id: str
    addr: str
    name: str = ""


def _valid_addr(addr: str) -> bool:
    if not 0 < len(addr) <= _MAX_ADDR or addr.startswith("outbound-only:"):
        return False
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return False
    return all(c.isprintable() and not c.isspace() for c in addr)


def encode_peer_book(entries: Iterable[PeerEntry]) -> bytes:
    peers = []
    seen: set[str] = set()
    for e in entries:
        if e.node_id in seen or not _valid_addr(e.addr) or not 0 < len(e.node_id) <= _MAX_ID:
            continue
        seen.add(e.node_id)
        peers.append({"id": e.node_id, "addr": e.addr, "name": e.name[:_MAX_NAME]})
        if len(peers) >= MAX_PEERS:
            break
    doc = {"version": PEER_BOOK_VERSION, "peers": peers}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


def decode_peer_book(data: bytes) -> tuple[list[PeerEntry], int]:
    """The entries of a peer file and how many were skipped as invalid.

    PeerBookError when the file as a whole is not a peer book."""
    if len(data) > MAX_PEER_BOOK_BYTES:
        raise PeerBookError(f"larger than {MAX_PEER_BOOK_BYTES} bytes")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PeerBookError(f"not JSON: {type(exc).__name__}") from None
    if type(doc) is not dict or doc.get("version") != PEER_BOOK_VERSION:
        raise PeerBookError("not a version 1 peer book")
    peers = doc.get("peers")
    if type(peers) is not list:
        raise PeerBookError("peers must be a list")
    out: list[PeerEntry] = []
    seen: set[str] = set()
    skipped = 0
    for p in peers[: 4 * MAX_PEERS]:
        if type(p) is not dict:
            skipped += 1
            continue
        node_id, addr, name = p.get("id"), p.get("addr"), p.get("name", "")
        if (
            type(node_id) is not str
            or not 0 < len(node_id) <= _MAX_ID
            or not node_id.isalnum()
            or type(addr) is not str
            or not _valid_addr(addr)
            or type(name) is not str
            or node_id in seen
        ):
            skipped += 1
            continue
        seen.add(node_id)
        out.append(PeerEntry(node_id, addr, name[:_MAX_NAME]))
        if len(out) >= MAX_PEERS:
            break
    skipped += max(0, len(peers) - 4 * MAX_PEERS)
    return out, skipped


def save_peer_book(path: Path, entries: Iterable[PeerEntry]) -> None:
    """Write the peer book atomically (temp file, fsync, rename, fsync dir)."""
    atomic_write(Path(path), encode_peer_book(entries), mode=0o600)


def load_peer_book(path: Path) -> tuple[list[PeerEntry], int]:
    """The remembered peers; ([], 0) when there is no file.

    OSError or PeerBookError when the file cannot be used (the caller logs one
    line and goes on without it)."""
    try:
        # Not through a symlink, and never blocking on a FIFO put in its place.
        data = read_file(Path(path), max_size=MAX_PEER_BOOK_BYTES)
    except FileNotFoundError:
        return [], 0
    except FileRefused as exc:
        if exc.reason == "too_large":
            raise PeerBookError(f"larger than {MAX_PEER_BOOK_BYTES} bytes") from None
        raise PeerBookError(
            "a symlink (not followed)" if exc.reason == "symlink" else "not a regular file"
        ) from None
    return decode_peer_book(data)
