"""Tests of Scuttlebutt anti-entropy (clanagent.gossip.antientropy)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clanagent.gossip.antientropy import (
    MAX_DELTA_RECORDS,
    MAX_DIGEST_ORIGINS,
    AntiEntropy,
    Delta,
    WireDelta,
    decode_delta,
    decode_digest,
    encode_delta,
    encode_digest,
)
from clanagent.identity import Identity
from clanagent.store import Store
from clanagent.wire import SignedRecord, WireError, pack, unpack

BIG = 1 << 20


@dataclass
class Node:
    identity: Identity
    store: Store
    ae: AntiEntropy
    # What this node wrote, latest per key, to check against: key -> record.
    written: dict[str, SignedRecord] = field(default_factory=dict)

    @classmethod
    def new(cls) -> Node:
        ident = Identity.generate()
        store = Store.open(None)
        return cls(ident, store, AntiEntropy(store, ident.public_key))

    @property
    def origin(self) -> bytes:
        return self.identity.public_key

    def write(self, key: str, body: object = None, size: int = 0) -> SignedRecord:
        version = self.store.max_version(self.origin) + 1
        rec = SignedRecord.create(self.identity, "test", key, version, body or ("x" * size))
        assert self.store.put(rec)
        self.ae.note_stored(rec)
        self.written[key] = rec
        return rec

    def receive_broadcast(self, rec: SignedRecord) -> bool:
        stored = self.store.put(rec)
        self.ae.note_stored(rec)  # also correct when refused as not newer
        return stored

    def latest(self) -> dict[tuple[bytes, str, str], int]:
        return {(r.origin, r.kind, r.key): r.version for r in self.store.records()}


def pull(receiver: Node, sender: Node, budget: int = BIG):
    """One direction of push-pull, through the real wire shapes."""
    digest = decode_digest(unpack(pack(encode_digest(receiver.ae.digest()))))
    delta = sender.ae.deltas_for(digest, budget)
    wire = pack(encode_delta(delta))
    assert len(wire) <= max(budget, delta.size)
    assert len(wire) <= delta.size  # size is an upper bound on the encoding
    got = decode_delta(unpack(wire))
    return delta, receiver.ae.apply(got.records, got.complete_through)


def push_pull(a: Node, b: Node, budget: int = BIG) -> None:
    pull(a, b, budget)
    pull(b, a, budget)


def truth(nodes: list[Node]) -> dict[tuple[bytes, str, str], int]:
    return {(n.origin, r.kind, k): r.version for n in nodes for k, r in n.written.items()}


def check_invariant(node: Node, nodes: list[Node]) -> None:
    """Every key whose latest version (at its origin) is <= the watermark is held."""
    held = node.latest()
    for origin_node in nodes:
        mark = node.ae.watermark(origin_node.origin)
        assert mark <= origin_node.store.max_version(origin_node.origin)
        for key, rec in origin_node.written.items():
            if rec.version <= mark:
                assert held.get((rec.origin, rec.kind, key)) == rec.version, (
                    f"watermark {mark} claims {key}@{rec.version}"
                )


# ------------------------------------------------------------------ basics


def test_own_watermark_is_max_version() -> None:
    a = Node.new()
    assert a.ae.digest() == {}
    a.write("k1")
    a.write("k2")
    a.write("k1")
    assert a.ae.digest() == {a.origin: 3}


def test_two_nodes_converge() -> None:
    a, b = Node.new(), Node.new()
    for i in range(5):
        a.write(f"a{i}")
    for i in range(3):
        b.write(f"b{i}")
    a.write("a0")  # supersedes a0@1
    push_pull(a, b)
    assert a.latest() == b.latest() == truth([a, b])
    assert a.ae.digest() == b.ae.digest() == {a.origin: 6, b.origin: 3}
    # Converged: nothing more to send either way.
    assert b.ae.deltas_for(a.ae.digest(), BIG).records == ()
    assert a.ae.deltas_for(b.ae.digest(), BIG).records == ()


def test_three_nodes_converge_through_a_relay() -> None:
    a, b, c = Node.new(), Node.new(), Node.new()
    for i in range(4):
        a.write(f"k{i}")
    c.write("c")
    push_pull(a, b)
    push_pull(b, c)  # c learns a's records from b, b learns c's
    push_pull(a, b)
    nodes = [a, b, c]
    assert a.latest() == b.latest() == c.latest() == truth(nodes)
    assert a.ae.digest() == b.ae.digest() == c.ae.digest()
    for n in nodes:
        check_invariant(n, nodes)


def test_out_of_order_broadcasts_wait_for_the_gap() -> None:
    a, b = Node.new(), Node.new()
    recs = [a.write(f"k{i}") for i in range(5)]  # versions 1..5
    b.receive_broadcast(recs[0])
    assert b.ae.watermark(a.origin) == 1
    for rec in (recs[2], recs[3], recs[4]):
        b.receive_broadcast(rec)
    assert b.ae.watermark(a.origin) == 1  # version 2 is missing
    b.receive_broadcast(recs[1])
    assert b.ae.watermark(a.origin) == 5  # runs on through 3, 4, 5


def test_push_pull_fills_a_broadcast_gap() -> None:
    a, b = Node.new(), Node.new()
    recs = [a.write(f"k{i}") for i in range(5)]
    for rec in (recs[0], recs[2], recs[4]):
        b.receive_broadcast(rec)
    assert b.ae.digest() == {a.origin: 1}
    delta, result = pull(b, a)
    # Everything above b's watermark, in order, no gaps, complete through 5.
    assert [r.version for r in delta.records] == [2, 3, 4, 5]
    assert delta.complete_through == {a.origin: 5}
    assert {r.version for r in result.stored} == {2, 4}
    assert result.refused == 2
    assert result.advanced == {a.origin: 5}
    assert b.latest() == a.latest()


def test_superseded_version_never_counts_as_a_gap_filler() -> None:
    a, b = Node.new(), Node.new()
    a.write("x")  # x@1
    r2 = a.write("y")  # y@2
    r3 = a.write("x")  # x@3 supersedes x@1
    b.receive_broadcast(r3)
    b.receive_broadcast(r2)
    assert b.ae.watermark(a.origin) == 0  # version 1 never seen by b
    delta, _ = pull(b, a)
    assert [r.version for r in delta.records] == [2, 3]  # x@1 is gone everywhere
    assert b.ae.watermark(a.origin) == 3
    assert b.latest() == a.latest()


def test_watermark_restored_from_consecutive_versions_held() -> None:
    a = Node.new()
    recs = [a.write(f"k{i}") for i in range(4)]
    store = Store.open(None)
    store.put_many([recs[0], recs[1], recs[3]])
    ae = AntiEntropy(store, Identity.generate().public_key)
    assert ae.watermark(a.origin) == 2
    ae.note_stored(recs[2])
    assert ae.watermark(a.origin) == 4


# ------------------------------------------------------------------ budgets


def test_budget_cuts_batch_without_gaps_and_next_exchange_continues() -> None:
    a, b = Node.new(), Node.new()
    for i in range(20):
        a.write(f"k{i}", size=200)
    one = a.store.by_origin(a.origin)[0].size
    budget = 5 * (one + 3) + 100
    seen: list[int] = []
    for _round in range(10):
        delta, result = pull(b, a, budget)
        if not delta.records:
            break
        versions = [r.version for r in delta.records]
        assert versions == list(range(versions[0], versions[0] + len(versions)))
        assert len(pack(encode_delta(delta))) <= budget
        assert result.advanced == {a.origin: versions[-1]}
        seen.extend(versions)
    assert seen == list(range(1, 21))
    assert b.latest() == a.latest()


def test_budget_cut_claims_only_through_last_record_sent() -> None:
    a, b = Node.new(), Node.new()
    a.write("x", size=100)  # x@1
    a.write("y", size=100)  # y@2
    a.write("z", size=100)  # z@3
    a.write("x", size=100)  # x@4 supersedes x@1
    size = a.store.by_origin(a.origin)[0].size
    budget = 2 * (size + 3) + 60  # two records
    delta, _ = pull(b, a, budget)
    assert [r.version for r in delta.records] == [2, 3]
    # Claiming 4 would be a lie (x@4 was not sent); 3 is true: the only keys
    # whose latest version is <= 3 are y and z, and both were sent.
    assert delta.complete_through == {a.origin: 3}
    check_invariant(b, [a, b])
    delta, _ = pull(b, a, budget)
    assert [r.version for r in delta.records] == [4]
    assert b.ae.watermark(a.origin) == 4


def test_most_lagging_origin_goes_first() -> None:
    a, b = Node.new(), Node.new()
    for i in range(2):
        a.write(f"a{i}")
    for i in range(6):
        b.write(f"b{i}")
    push_pull(a, b)
    delta = a.ae.deltas_for({}, BIG)
    origins = [r.origin for r in delta.records]
    assert origins == [b.origin] * 6 + [a.origin] * 2
    # A peer that has 5 of b's 6: a's two records now lag more.
    delta = a.ae.deltas_for({b.origin: 5}, BIG)
    assert [(r.origin, r.version) for r in delta.records] == [
        (a.origin, 1),
        (a.origin, 2),
        (b.origin, 6),
    ]


def test_origins_go_by_priority_then_lag() -> None:
    """A founding puts fresh records of every machine in flight; the
    inventory, too big to push (a delta is its only way), must not be cut
    from a delta behind them and wait for the next exchange (minutes at 1000
    machines). The node's order: too big to push, durable, soft."""
    admin = Identity.generate()
    store = Store.open(None)
    me = Identity.generate()

    def prio(rec: SignedRecord) -> int:
        return 0 if rec.size > 40_000 else (2 if rec.kind == "topology" else 1)

    ae = AntiEntropy(store, me.public_key, priority=prio)
    plain = AntiEntropy(store, me.public_key)
    peers = [Identity.generate() for _ in range(30)]
    for ident in peers:  # a durable record and 2 soft ones each: lag 3
        for v, kind in ((1, "node-info"), (2, "topology"), (3, "topology")):
            rec = SignedRecord.create(ident, kind, f"k{v}", v, "t" * 1000)
            assert store.put(rec)
            ae.note_stored(rec)
            plain.note_stored(rec)
    inv = SignedRecord.create(admin, "inventory", "doc", 1, "i" * 50_000)  # lag 1
    assert store.put(inv)
    ae.note_stored(inv)
    plain.note_stored(inv)
    budget = 80_000  # room for the inventory and some others, not all
    delta = ae.deltas_for({}, budget)
    assert delta.records[0] == inv
    assert len(delta.records) > 1 and delta.size <= budget
    assert delta.complete_through[admin.public_key] == 1
    # the order it replaces (most lagging first) cuts the inventory
    assert inv not in plain.deltas_for({}, budget).records
    # once the peer has it: durable before soft, whole origins, no gaps
    rest = ae.deltas_for({admin.public_key: 1}, budget)
    assert inv not in rest.records and rest.records
    assert [r.kind for r in rest.records[:3]] == ["node-info", "topology", "topology"]
    # a peer that holds every node-info: the soft rest, most lagging first
    have = {ident.public_key: 1 for ident in peers}
    have[admin.public_key] = 1
    soft = ae.deltas_for(have, budget)
    assert soft.records and {r.kind for r in soft.records} == {"topology"}


def test_oversized_first_record_does_not_block_other_origins() -> None:
    a, b = Node.new(), Node.new()
    for i in range(3):
        a.write(f"big{i}", size=5000)  # a lags most but its record never fits
    b.write("small")
    push_pull(a, b)
    delta = b.ae.deltas_for({}, 1000)
    assert [r.origin for r in delta.records] == [b.origin]
    assert delta.complete_through == {b.origin: 1}


# ----------------------------------------------------- verification and safety


def _tamper(rec: SignedRecord) -> bytes:
    data = bytearray(rec.encode())
    data[-1] ^= 0x01  # last byte of the signature
    return bytes(data)


def test_tampered_record_is_dropped_counted_and_blocks_watermark() -> None:
    a, b = Node.new(), Node.new()
    recs = [a.write(f"k{i}") for i in range(4)]
    items: list[SignedRecord | bytes] = [recs[0], _tamper(recs[1]), recs[2], recs[3]]
    result = b.ae.apply(items, {a.origin: 4})
    assert len(result.invalid) == 1
    bad = result.invalid[0]
    assert (bad.index, bad.origin) == (1, a.origin)
    assert "signature" in bad.reason
    assert [r.version for r in result.stored] == [1, 3, 4]
    assert b.store.get(a.origin, "test", "k1") is None
    # The broadcast rule still counts version 1; the claim of 4 is not trusted.
    assert b.ae.watermark(a.origin) == 1
    assert result.advanced == {a.origin: 1}
    # An honest peer fills it later.
    pull(b, a)
    assert b.ae.watermark(a.origin) == 4


def test_forged_record_claiming_another_origin_is_rejected() -> None:
    a, b, mallory = Node.new(), Node.new(), Node.new()
    a.write("k")
    # Same kind, key and version as a's record, a's key as signer, but the
    # content and signature are mallory's.
    evil = SignedRecord.create(mallory.identity, "test", "k", 1, "evil")
    forged_bytes = SignedRecord(a.origin, evil.payload, evil.signature).encode()
    result = b.ae.apply([forged_bytes], {a.origin: 1})
    assert len(result.invalid) == 1 and result.invalid[0].origin == a.origin
    assert result.stored == ()
    assert b.ae.watermark(a.origin) == 0
    assert list(b.store.records()) == []


def test_undecodable_item_taints_every_claim_of_the_delta() -> None:
    a, c, b = Node.new(), Node.new(), Node.new()
    ra = a.write("k")
    rc = c.write("k")
    result = b.ae.apply([ra.encode(), b"\x01garbage", rc], {a.origin: 1, c.origin: 1})
    assert [(i.index, i.origin) for i in result.invalid] == [(1, None)]
    assert len(result.stored) == 2
    # Version 1 still counts by the broadcast rule, which needs no claim.
    assert b.ae.watermark(a.origin) == 1
    assert b.ae.watermark(c.origin) == 1


def test_claim_without_records_is_capped_by_what_we_hold() -> None:
    a, b = Node.new(), Node.new()
    r1 = a.write("k")
    result = b.ae.apply([r1], {a.origin: 10**9})
    assert result.invalid == ()
    assert b.ae.watermark(a.origin) == 1  # not 10**9: nothing signed says so
    result = b.ae.apply([], {a.origin: 10**9, b.origin: 5})
    assert b.ae.watermark(a.origin) == 1
    assert result.advanced == {}


def test_out_of_order_batch_is_stored_but_not_trusted() -> None:
    a, b = Node.new(), Node.new()
    recs = [a.write(f"k{i}") for i in range(4)]
    result = b.ae.apply([recs[3], recs[1], recs[2]], {a.origin: 4})
    assert len(result.stored) == 3
    assert result.invalid == ()
    assert b.ae.watermark(a.origin) == 0


def test_older_version_never_replaces_newer() -> None:
    a, b = Node.new(), Node.new()
    old = a.write("k", body="old")
    new = a.write("k", body="new")
    b.receive_broadcast(new)
    result = b.ae.apply([old], {a.origin: 1})
    assert result.stored == ()
    assert result.refused == 1
    assert b.store.get(a.origin, "test", "k").version == new.version
    assert b.store.get(a.origin, "test", "k").body == "new"


def test_admit_policy_rejects_like_a_bad_record() -> None:
    a, b = Node.new(), Node.new()
    rec = a.write("k")
    result = b.ae.apply([rec], {a.origin: 1}, admit=lambda r: r.origin != a.origin)
    assert len(result.invalid) == 1 and result.invalid[0].origin == a.origin
    assert b.ae.watermark(a.origin) == 0


def test_own_origin_is_never_advanced_by_a_peer_claim() -> None:
    a, b = Node.new(), Node.new()
    a.write("k")
    b.ae.apply([], {b.origin: 7})
    assert b.ae.digest() == {}
    assert b.ae.watermarks() == {}
    assert a.ae.watermarks() == {}


# ------------------------------------------------------------------ wire shapes


def test_digest_and_delta_round_trip() -> None:
    a, b = Node.new(), Node.new()
    for i in range(3):
        a.write(f"k{i}")
    b.write("z")
    push_pull(a, b)
    d = a.ae.digest()
    assert decode_digest(unpack(pack(encode_digest(d)))) == d
    delta = a.ae.deltas_for({}, BIG)
    wire = decode_delta(unpack(pack(encode_delta(delta))))
    assert isinstance(wire, WireDelta)
    assert wire.records == tuple(r.encode() for r in delta.records)
    assert wire.complete_through == delta.complete_through
    assert isinstance(delta, Delta)


OX = b"\x11" * 32


@pytest.mark.parametrize(
    "value",
    [
        None,
        {},
        [[OX]],
        [[OX, 1, 2]],
        [(OX, 1)],  # a tuple is not what unpack gives; only lists pass
        [[b"\x11" * 31, 1]],
        [[b"\x11" * 33, 1]],
        [["11" * 16, 1]],
        [[OX, -1]],
        [[OX, 2**63]],
        [[OX, True]],
        [[OX, 1.0]],
        [[OX, 1], [OX, 2]],
        [[bytes([i % 256, i // 256]) + b"\0" * 30, 1] for i in range(MAX_DIGEST_ORIGINS + 1)],
    ],
)
def test_decode_digest_rejects(value) -> None:
    with pytest.raises(WireError):
        decode_digest(value)


@pytest.mark.parametrize(
    "value",
    [
        None,
        [],
        {"c": []},
        {"r": []},
        {"c": [], "r": [], "x": 1},
        {"c": [], "r": ["text"]},
        {"c": [], "r": [b""]},
        {"c": [], "r": b"abc"},
        {"c": [[OX, -3]], "r": []},
        {"c": {}, "r": []},
        {"c": [], "r": [b"x"] * (MAX_DELTA_RECORDS + 1)},
    ],
)
def test_decode_delta_rejects(value) -> None:
    with pytest.raises(WireError):
        decode_delta(value)


_wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=40)
    | st.sampled_from([OX, b"\x22" * 32]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["c", "r", "x"]) | st.text(max_size=3), children, max_size=3
        )
    ),
    max_leaves=20,
)


@given(_wire_values)
def test_decode_digest_total(value) -> None:
    try:
        d = decode_digest(value)
    except WireError:
        return
    assert all(len(o) == 32 and 0 <= v < 2**63 for o, v in d.items())


@given(_wire_values)
def test_decode_delta_total(value) -> None:
    try:
        d = decode_delta(value)
    except WireError:
        return
    assert all(type(r) is bytes and r for r in d.records)


@given(st.lists(st.binary(max_size=200), max_size=5))
def test_apply_never_raises_on_garbage_records(items) -> None:
    b = Node.new()
    result = b.ae.apply(items, {OX: 3})
    assert len(result.invalid) == len(items)
    assert b.ae.watermark(OX) == 0


# ------------------------------------------------------------- property test


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    n=st.integers(min_value=3, max_value=5),
    writes=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=4),  # writer (mod n)
            st.integers(min_value=0, max_value=3),  # key: few keys, so many supersede
            st.integers(min_value=0, max_value=31),  # broadcast receiver mask
            st.integers(min_value=0, max_value=300),  # body size
        ),
        min_size=1,
        max_size=30,
    ),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    small_budget=st.booleans(),
)
def test_random_writes_partial_broadcasts_then_push_pull_converge(
    n: int, writes, seed: int, small_budget: bool
) -> None:
    rng = random.Random(seed)
    nodes = [Node.new() for _ in range(n)]
    deliveries: list[tuple[int, SignedRecord]] = []
    for writer, key, mask, size in writes:
        w = writer % n
        rec = nodes[w].write(f"k{key}", size=size)
        deliveries.extend((i, rec) for i in range(n) if i != w and mask >> i & 1)
        # Some deliveries happen right away, the rest later and out of order.
        if rng.random() < 0.5 and deliveries:
            i, r = deliveries.pop(rng.randrange(len(deliveries)))
            nodes[i].receive_broadcast(r)
    rng.shuffle(deliveries)
    for i, rec in deliveries:
        nodes[i].receive_broadcast(rec)
    for node in nodes:
        check_invariant(node, nodes)

    # Budgets always have room for the biggest record (~450 bytes), sometimes
    # for little more, so batches get cut in every possible place.
    budgets = [700, 1000, 1600, BIG] if small_budget else [BIG]
    expected = truth(nodes)
    for _round in range(400):
        if all(node.latest() == expected for node in nodes):
            break
        i, j = rng.sample(range(n), 2)
        push_pull(nodes[i], nodes[j], rng.choice(budgets))
        for node in (nodes[i], nodes[j]):
            check_invariant(node, nodes)
    for node in nodes:
        assert node.latest() == expected  # same latest record everywhere, nothing lost
    # Watermarks catch up too once everyone has everything.
    for _round in range(4 * n):
        i, j = rng.sample(range(n), 2)
        push_pull(nodes[i], nodes[j], rng.choice(budgets))
    full = {node.origin: node.store.max_version(node.origin) for node in nodes}
    full = {o: v for o, v in full.items() if v}
    for _ in range(3):
        for i in range(n):
            push_pull(nodes[i], nodes[(i + 1) % n], rng.choice(budgets))
    for node in nodes:
        assert node.ae.digest() == full
