"""Tests of the transmit-limited broadcast queue (clanagent.gossip.broadcast_queue)."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clanagent.gossip.broadcast_queue import BroadcastQueue, retransmit_limit


def _queue(mult: int = 1, nodes: int = 9) -> BroadcastQueue:
    return BroadcastQueue(mult, lambda: nodes)


@pytest.mark.parametrize(
    ("mult", "n", "expected"),
    [
        (4, 0, 1),  # nobody known yet: still sent once
        (4, 1, 4),
        (4, 9, 4),
        (4, 10, 8),
        (4, 99, 8),
        (4, 100, 12),
        (4, 999, 12),
        (4, 1000, 16),
        (3, 1000, 12),
    ],
)
def test_retransmit_limit_table(mult: int, n: int, expected: int) -> None:
    assert retransmit_limit(mult, n) == expected


@given(st.integers(min_value=1, max_value=10**12), st.integers(min_value=1, max_value=10))
def test_retransmit_limit_matches_memberlist_formula(n: int, mult: int) -> None:
    # memberlist: retransmitMult * ceil(log10(n + 1)); exact near powers of ten.
    digits = 1
    while 10**digits <= n:
        digits += 1
    assert retransmit_limit(mult, n) == mult * digits
    if n < 10**6:  # floats are exact enough here to compare with the Go formula
        assert digits == math.ceil(math.log10(n + 1))


def test_broadcast_sent_exactly_limit_times_then_done() -> None:
    nodes = [9]
    q = BroadcastQueue(3, lambda: nodes[0])
    done: list[str] = []
    q.queue("a", b"payload", on_done=lambda: done.append("a"))
    sent = 0
    for _ in range(10):
        got = q.get_broadcasts(0, 1000)
        sent += len(got)
    assert sent == 3  # 3 * ceil(log10(10))
    assert done == ["a"]
    assert len(q) == 0


def test_limit_grows_with_cluster_size() -> None:
    nodes = [1000]
    q = BroadcastQueue(2, lambda: nodes[0])
    q.queue("a", b"x")
    sent = sum(len(q.get_broadcasts(0, 100)) for _ in range(20))
    assert sent == 2 * 4


def test_shrinking_cluster_drops_overdue_broadcast() -> None:
    nodes = [1000]
    q = BroadcastQueue(1, lambda: nodes[0])
    q.queue("a", b"x")
    assert q.get_broadcasts(0, 100) == [b"x"]
    assert q.get_broadcasts(0, 100) == [b"x"]
    nodes[0] = 5  # limit drops from 4 to 1: one more send, then gone
    assert q.get_broadcasts(0, 100) == [b"x"]
    assert q.get_broadcasts(0, 100) == []
    assert len(q) == 0


def test_same_key_replaces_queued_broadcast() -> None:
    q = _queue(mult=5)
    done: list[str] = []
    q.queue(("origin", "k"), b"v1", on_done=lambda: done.append("v1"))
    q.get_broadcasts(0, 100)  # v1 sent once
    q.queue(("origin", "k"), b"v2", on_done=lambda: done.append("v2"))
    assert done == ["v1"]
    assert len(q) == 1
    # v2 starts fresh: sent the full 5 times, v1 never again.
    sent = [q.get_broadcasts(0, 100) for _ in range(8)]
    flat = [p for batch in sent for p in batch]
    assert flat == [b"v2"] * 5
    assert done == ["v1", "v2"]


def test_different_keys_do_not_replace() -> None:
    q = _queue()
    q.queue("a", b"1")
    q.queue("b", b"2")
    assert len(q) == 2
    assert sorted(q.get_broadcasts(0, 100)) == [b"1", b"2"]


def test_order_fewest_transmits_then_newest() -> None:
    q = _queue(mult=10)
    q.queue("old", b"old")
    assert q.get_broadcasts(0, 100) == [b"old"]  # old now has 1 transmit
    q.queue("mid", b"mid")
    q.queue("new", b"new")
    assert q.ordered_view() == [("new", 0), ("mid", 0), ("old", 1)]
    assert q.get_broadcasts(0, 100) == [b"new", b"mid", b"old"]


def test_newest_first_within_a_promoted_tier() -> None:
    # Items reach tier 1 in different calls; tier 1 must still be newest-first.
    q = _queue(mult=10)
    for name in ("a", "b", "c", "d", "e"):
        q.queue(name, name.encode())
    assert q.get_broadcasts(0, 2) == [b"e", b"d"]  # 1 byte each, limit 2
    q.queue("f", b"f")
    assert q.get_broadcasts(0, 4) == [b"f", b"c", b"b", b"a"]
    assert [k for k, t in q.ordered_view() if t == 1] == ["f", "e", "d", "c", "b", "a"]
    assert q.get_broadcasts(0, 100) == [b"f", b"e", b"d", b"c", b"b", b"a"]


def test_byte_limit_with_overhead_and_skipping_big_items() -> None:
    q = _queue(mult=10)
    q.queue("small-old", b"s" * 10)
    q.queue("big", b"B" * 50)
    q.queue("mid", b"m" * 30)
    # 60 bytes, 5 overhead each: mid (35) fits, big (55) no longer does, small (15) does.
    got = q.get_broadcasts(5, 60)
    assert got == [b"m" * 30, b"s" * 10]
    assert sum(5 + len(p) for p in got) <= 60
    # big was skipped, not counted: it is still alone at 0 transmits and goes first.
    assert q.ordered_view()[0] == ("big", 0)
    assert q.get_broadcasts(5, 60) == [b"B" * 50]


def test_nothing_fits() -> None:
    q = _queue()
    q.queue("a", b"x" * 100)
    assert q.get_broadcasts(10, 50) == []
    assert q.get_broadcasts(0, 0) == []
    assert q.ordered_view() == [("a", 0)]


def test_prune_keeps_least_sent_newest() -> None:
    q = _queue(mult=10)
    done: list[str] = []
    for name in ("a", "b", "c"):
        q.queue(name, name.encode(), on_done=lambda name=name: done.append(name))
    q.get_broadcasts(0, 1)  # c now has 1 transmit
    q.queue("d", b"d", on_done=lambda: done.append("d"))
    q.prune(2)
    assert [k for k, _ in q.ordered_view()] == ["d", "b"]
    assert sorted(done) == ["a", "c"]
    q.prune(5)
    assert len(q) == 2


def test_reset_calls_every_on_done() -> None:
    q = _queue()
    done: list[int] = []
    for i in range(5):
        q.queue(i, b"x", on_done=lambda i=i: done.append(i))
    q.reset()
    assert sorted(done) == list(range(5))
    assert len(q) == 0
    assert q.get_broadcasts(0, 100) == []


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["queue", "get"]),
            st.integers(min_value=0, max_value=7),  # key
            st.integers(min_value=0, max_value=40),  # payload size / byte limit
        ),
        max_size=80,
    ),
    st.integers(min_value=1, max_value=3),
    st.integers(min_value=0, max_value=4),
)
def test_model_against_reference(ops, mult: int, overhead: int) -> None:
    """Compare with a naive model that sorts the whole queue on every call."""
    q = BroadcastQueue(mult, lambda: 9)
    model: dict[int, list] = {}  # key -> [transmits, id, payload]
    done: list[bytes] = []
    model_done: list[bytes] = []
    next_id = 0
    for op, key, size in ops:
        if op == "queue":
            next_id += 1
            payload = bytes([key]) * size + next_id.to_bytes(4, "big")
            if key in model:
                model_done.append(model[key][2])
            model[key] = [0, next_id, payload]
            q.queue(key, payload, on_done=lambda p=payload: done.append(p))
        else:
            limit = size * 3
            expected: list[bytes] = []
            used = 0
            for entry in sorted(model.values(), key=lambda e: (e[0], -e[1])):
                free = limit - used - overhead
                if free <= 0:
                    break
                if len(entry[2]) <= free:
                    expected.append(entry[2])
                    used += overhead + len(entry[2])
            for k in list(model):
                if model[k][2] in expected:
                    model[k][0] += 1
                    if model[k][0] >= mult:
                        model_done.append(model[k][2])
                        del model[k]
            got = q.get_broadcasts(overhead, limit)
            assert got == expected
            assert sum(overhead + len(p) for p in got) <= max(limit, 0) or not got
        assert len(q) == len(model)
        assert sorted(done) == sorted(model_done)


def test_many_items_is_fast_and_fair() -> None:
    q = BroadcastQueue(4, lambda: 1000)  # 16 transmits each
    n = 5000
    for i in range(n):
        q.queue(("origin", i), i.to_bytes(4, "big") + b"." * 96)
    # Replacing half of them keeps the count and leaves dead heap entries behind.
    for i in range(0, n, 2):
        q.queue(("origin", i), i.to_bytes(4, "big") + b"!" * 96)
    assert len(q) == n
    counts: dict[bytes, int] = {}
    start = time.perf_counter()
    calls = 0
    while len(q):
        for payload in q.get_broadcasts(3, 1400):
            counts[payload] = counts.get(payload, 0) + 1
        calls += 1
        assert calls < 100_000
    elapsed = time.perf_counter() - start
    # Every live broadcast went out exactly 16 times, the replaced ones never.
    assert len(counts) == n
    assert set(counts.values()) == {16}
    assert all(p[4:5] == b"!" for p in counts if int.from_bytes(p[:4], "big") % 2 == 0)
    # 13 per packet -> about 6200 calls; generous bound so CI noise never trips it.
    per_call = elapsed / calls
    assert per_call < 0.002, f"{per_call * 1e6:.0f} us per call"
