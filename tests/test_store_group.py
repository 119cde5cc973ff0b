"""Group commit, soft records and the fsync counter of clanagent.store."""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clanagent.gossip.config import GossipConfig, RecordLimits
from clanagent.gossip.node import GossipNode, Persist, RecordAccepted
from clanagent.identity import Identity
from clanagent.store import Store, StoreError, file_name
from clanagent.wire import SignedRecord

ALICE = Identity.generate()
BOB = Identity.generate()
SOFT = frozenset({"topology", "path"})


def soft_kinds(kind: str) -> bool:
    return kind not in SOFT


def rec(ident: Identity, kind: str, key: str, version: int, pad: int = 0) -> SignedRecord:
    return SignedRecord.create(ident, kind, key, version, {"v": version, "pad": b"x" * pad})


def rows(d: Path) -> dict[str, bytes]:
    db = sqlite3.connect(d / "records.db")
    try:
        return dict(db.execute("SELECT name, data FROM records").fetchall())
    finally:
        db.close()


def run_threads(fn, args_list, timeout: float = 20.0) -> list[object]:
    """Call fn(*args) in one thread each, all at once; results (or exceptions)."""
    out: list[object] = [None] * len(args_list)
    start = threading.Barrier(len(args_list))

    def body(i: int, args: tuple) -> None:
        start.wait()
        try:
            out[i] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 -- handed back to the test
            out[i] = exc

    threads = [threading.Thread(target=body, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a writer hung"
    return out


# ------------------------------------------------------------------ group commit


def test_fsyncs_are_counted(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "s")
    base = s.stats["fsyncs"]
    assert s.put(rec(ALICE, "k", "a", 1))
    assert s.stats["fsyncs"] - base == 1  # the WAL, at the commit
    assert s.counters()["fsyncs"] == s.stats["fsyncs"]
    assert s.counters()["records"] == 1
    assert s.delete(ALICE.public_key, "k", "a")
    assert s.stats["fsyncs"] - base == 2
    mem = Store.open(None)
    assert mem.put(rec(ALICE, "k", "a", 1)) and mem.stats["fsyncs"] == 0


def test_concurrent_writes_share_one_commit_and_ack_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "s"
    s = Store.open(d, group_window=0.2)
    synced: list[set[str]] = []  # the names in each committed transaction
    real = s._commit

    def spy(upserts: list[tuple[str, bytes]], deletes: list[str]) -> None:
        real(upserts, deletes)
        synced.append({name for name, _ in upserts})

    monkeypatch.setattr(s, "_commit", spy)
    # Make the store "busy" so that the window applies (a lone write goes at once).
    assert s.put(rec(BOB, "k", "warm", 1))
    recs = [rec(ALICE, "k", f"key{i}", 1, pad=200 * i) for i in range(16)]
    acked_after: dict[str, int] = {}

    def put(r: SignedRecord) -> bool:
        ok = s.put(r)
        acked_after[r.key] = len(synced)  # commits done when put returned
        return ok

    before = s.stats["commits"]
    assert run_threads(put, [(r,) for r in recs]) == [True] * 16
    commits = s.stats["commits"] - before
    assert commits <= 3, commits  # 16 writers, not 16 transactions
    assert len(synced) - 1 == commits
    for r in recs:
        name = file_name(r.origin, r.kind, r.key)
        # A commit that completed before put() returned held the record.
        assert any(name in seen for seen in synced[: acked_after[r.key]]), r.key
    s2 = Store.open(d)
    assert sorted(r.encode() for r in s2.records()) == sorted(
        x.encode() for x in [*recs, rec(BOB, "k", "warm", 1)]
    )


def test_group_ends_early_at_group_max(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "s", group_window=30.0, group_max=4)
    assert s.put(rec(BOB, "k", "warm", 1))
    # As right after a group of concurrent writers: the window applies.
    s._last_tickets, s._last_commit = 2, time.monotonic()
    started = time.monotonic()
    got = run_threads(s.put, [(rec(ALICE, "k", f"k{i}", 1),) for i in range(4)])
    assert got == [True] * 4
    assert time.monotonic() - started < 10.0  # not the 30 s window


def test_a_lone_writer_never_waits_for_the_window(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "s", group_window=5.0)
    started = time.monotonic()
    for v in range(1, 6):  # one caller writing in a loop
        assert s.put_many([rec(ALICE, "k", "a", v), rec(ALICE, "k", "b", v)]) == [True, True]
    assert time.monotonic() - started < 4.0
    assert s.stats["commits"] == 5


def test_versions_race_within_a_group(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "s", group_window=0.1)
    assert s.put(rec(BOB, "k", "warm", 1))
    recs = [rec(ALICE, "k", "same", v) for v in (3, 1, 5, 2, 4, 5)]
    got = run_threads(s.put, [(r,) for r in recs])
    assert got.count(True) >= 1
    assert s.get(ALICE.public_key, "k", "same").version == 5
    assert Store.open(tmp_path / "s").get(ALICE.public_key, "k", "same").version == 5


def test_a_failed_group_fails_every_caller(tmp_path: Path) -> None:
    d = tmp_path / "s"
    s = Store.open(d, group_window=0.2)
    warm = rec(BOB, "k", "warm", 1)
    assert s.put(warm)
    assert s._db is not None
    s._db.execute("PRAGMA query_only=1")  # refuses writes, as a failing disk does
    got = run_threads(s.put, [(rec(ALICE, "k", f"k{i}", 1),) for i in range(6)])
    assert all(isinstance(g, StoreError) for g in got), got
    assert rows(d) == {file_name(BOB.public_key, "k", "warm"): warm.encode()}
    assert len(s) == 1
    s._db.execute("PRAGMA query_only=0")
    assert s.put(rec(ALICE, "k", "k0", 1))  # the store still works afterwards


# ------------------------------------------------------------------ soft records


def test_soft_records_are_never_written(tmp_path: Path) -> None:
    d = tmp_path / "s"
    s = Store.open(d, durable=soft_kinds)
    base = s.stats["fsyncs"]
    topo = rec(ALICE, "topology", "links", 1)
    assert s.put(topo)
    assert s.get(ALICE.public_key, "topology", "links") == topo
    assert rows(d) == {} and s.stats["fsyncs"] == base and s.stats["soft"] == 1
    assert not s.is_durable("topology") and s.is_durable("inventory")
    mixed = [rec(ALICE, "topology", "links", 2), rec(ALICE, "inventory", "head", 1)]
    assert s.put_many(mixed) == [True, True]
    assert list(rows(d)) == [file_name(ALICE.public_key, "inventory", "head")]
    assert s.max_version(ALICE.public_key) == 2
    # Gone after a restart; the durable one is still there.
    s2 = Store.open(d, durable=soft_kinds)
    assert s2.get(ALICE.public_key, "topology", "links") is None
    assert s2.get(ALICE.public_key, "inventory", "head") is not None
    # Deleting a soft record needs no disk either.
    assert s.delete(ALICE.public_key, "topology", "links")
    assert s.get(ALICE.public_key, "topology", "links") is None


def test_soft_records_count_against_the_quota(tmp_path: Path) -> None:
    q = RecordLimits(max_records_per_origin=3, max_bytes_per_origin=10_000)
    s = Store.open(tmp_path / "s", quota=q, durable=soft_kinds)
    assert s.put(rec(ALICE, "topology", "a", 1))
    assert s.put(rec(ALICE, "path", "b", 1))
    assert s.put(rec(ALICE, "inventory", "c", 1))
    assert not s.put(rec(ALICE, "topology", "d", 1))  # a fourth record
    assert not s.put(rec(ALICE, "inventory", "e", 1))
    assert s.stats["refused_quota"] == 2
    assert not s.put(rec(ALICE, "topology", "a", 2, pad=20_000))  # bytes too
    assert s.usage(ALICE.public_key)[0] == 3


def test_soft_put_never_waits_for_the_disk(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "s", durable=soft_kinds)
    done = threading.Event()
    with s._write_lock:  # a durable group is on the disk (a slow fsync)

        def soft() -> None:
            s.put(rec(ALICE, "topology", "a", 1))
            done.set()

        t = threading.Thread(target=soft)
        t.start()
        assert done.wait(5.0)
    t.join()


def test_records_of_kinds_now_soft_are_removed_at_open(tmp_path: Path) -> None:
    d = tmp_path / "s"
    old = Store.open(d)  # everything durable, as before the split
    assert old.put(rec(ALICE, "topology", "links", 7))
    assert old.put(rec(ALICE, "inventory", "head", 1))
    s = Store.open(d, durable=soft_kinds)
    assert s.stats["soft_removed"] == 1 and s.stats["corrupt"] == 0
    assert s.get(ALICE.public_key, "topology", "links") is None
    assert list(rows(d)) == [file_name(ALICE.public_key, "inventory", "head")]


def test_gossip_node_takes_soft_records_without_a_persist_round_trip(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s", durable=soft_kinds)
    node = GossipNode(
        ALICE,
        GossipConfig.local(),
        addr="a",
        clan=b"clan",
        store=store,
        rng=random.Random(1),
        now=0.0,
    )
    rec_soft, actions = node.publish(1.0, "topology", "links", {"l": 1})
    assert not any(isinstance(a, Persist) for a in actions)
    assert any(isinstance(a, RecordAccepted) for a in actions)
    assert store.get(ALICE.public_key, "topology", "links") == rec_soft
    _, actions = node.publish(1.0, "inventory", "head", {"h": 1})
    persists = [a for a in actions if isinstance(a, Persist)]
    assert len(persists) == 1  # durable records still go through the shell
    results = store.put_many(persists[0].records)
    out = node.persisted(1.0, persists[0].records, results)
    assert any(isinstance(a, RecordAccepted) for a in out)


# ------------------------------------------------------------------ damaged rows


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
        st.integers(min_value=0),
        st.text(max_size=20),
    )
)
def test_any_row_content_loads_or_is_quarantined(tmp_path: Path, data: object) -> None:
    """Whatever a row holds, open() never raises, and the row is either loaded
    (a valid record for its name) or moved to corrupt/ and deleted."""
    import tempfile

    d = Path(tempfile.mkdtemp(dir=tmp_path))
    real = rec(ALICE, "k", "a", 3, pad=40)
    enc = real.encode()
    if isinstance(data, tuple):
        i, b = data
        ba = bytearray(enc)
        ba[i % len(ba)] = b
        content: object = bytes(ba)
    elif isinstance(data, int):
        content = enc[: data % (len(enc) + 1)]
    else:
        content = data
    Store.open(d).close()
    db = sqlite3.connect(d / "records.db")
    with db:
        db.execute(
            "INSERT INTO records VALUES (?, ?)", (file_name(ALICE.public_key, "k", "a"), content)
        )
    db.close()
    s = Store.open(d)
    loaded = s.get(ALICE.public_key, "k", "a")
    if loaded is None:
        assert s.stats["corrupt"] == 1 and rows(d) == {}
        assert len(list((d / "corrupt").iterdir())) == 1
    else:
        assert s.stats["loaded"] == 1 and loaded.encode() == content
    assert s.stats["corrupt"] + s.stats["loaded"] == 1
    s.close()
