"""Crash safety of clanagent.store under SIGKILL.

A writer process (tests/_store_writer.py) writes records in a loop and prints
one line per write that put() acknowledged.  We kill it with SIGKILL at a
random moment, 50 times on the same directory, and after each kill reopen the
store and check that nothing acknowledged was lost and nothing is corrupt.

The ``group`` variant runs 6 writer threads at once, so that writes meet in
group commits and kills land in the middle of a group: what was acknowledged
survives, the rest of the group may be lost, nothing is corrupt, and the soft
kind it also writes never reaches the disk.  Every fifth round first drops
record files of the old one-file-per-key layout into the directory, so some
kills land while open() moves them into the database: they must survive too.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clanagent import identity
from clanagent.store import Store, file_name
from clanagent.wire import SignedRecord

SOFT_KIND = "topology"  # soft in the writer (tests/_store_writer.py)

WRITER = Path(__file__).with_name("_store_writer.py")
ROUNDS = 50
SEED = 20261125


def _wait_ready(out: Path, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.read_bytes().startswith(b"READY\n"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    pytest.fail(f"writer did not become ready (rc={proc.returncode})")


def _grouping(out: Path) -> float:
    """Records per group commit, from the writer's last STAT line (0 if none)."""
    stats = [line for line in out.read_bytes().split(b"\n") if line.startswith(b"STAT ")]
    if not stats:
        return 0.0
    _, written, commits = stats[-1].split(b" ")
    return int(written) / max(1, int(commits))


def _acks(out: Path) -> list[tuple[bytes, str, str, int]]:
    acks = []
    for line in out.read_bytes().split(b"\n"):
        # A line is written with one write() before the next put begins, so a
        # kill cannot leave half a line; a missing newline would only mean the
        # last line is incomplete, which split() leaves as the final element.
        if not line.startswith(b"ACK ") or line.count(b" ") != 4:
            continue
        _, origin, kind, key, version = line.decode().split(" ")
        acks.append((bytes.fromhex(origin), kind, key, int(version)))
    return acks


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("threads", [1, 6], ids=["serial", "group"])
def test_sigkill_never_loses_an_acknowledged_write(tmp_path: Path, threads: int) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    id_dirs = []
    for i in range(3):
        d = tmp_path / f"id{i}"
        identity.load_or_create(d)
        id_dirs.append(str(d))
    store_dir = tmp_path / "store"
    acked: dict[tuple[bytes, str, str], int] = {}  # highest acknowledged version, all rounds
    rounds_with_acks = 0
    total_acks = 0
    grouped_rounds = 0  # rounds whose groups held more than one record on average
    legacy_ident = identity.load(Path(id_dirs[0]))

    for rnd in range(ROUNDS):
        if rnd % 5 == 4:
            # Record files of the one-file-per-key layout, as an upgrade finds
            # them: the writer's open() moves them into the database, and the
            # kill may land in the middle of that.
            store_dir.mkdir(mode=0o700, exist_ok=True)
            for i in range(20):
                r = SignedRecord.create(legacy_ident, "legacy", f"l{i}", rnd + 1, {"i": i})
                (store_dir / file_name(r.origin, r.kind, r.key)).write_bytes(r.encode())
                acked[(r.origin, r.kind, r.key)] = rnd + 1
        out = tmp_path / f"out{rnd}"
        err = tmp_path / f"err{rnd}"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(
                [sys.executable, str(WRITER), str(store_dir), str(rnd), str(threads), *id_dirs],
                stdout=fo,
                stderr=fe,
            )
        # Most rounds kill while writing; every fifth may also kill during
        # startup or while open() is cleaning up after the previous kill.
        if rnd % 5 != 4:
            _wait_ready(out, proc)
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, (
            f"round {rnd}: writer exited by itself:\n{err.read_text()}"
        )

        acks = _acks(out)
        total_acks += len(acks)
        rounds_with_acks += bool(acks)
        grouped_rounds += _grouping(out) > 1.2
        soft_acks = [a for a in acks if a[1] == SOFT_KIND]
        assert threads > 1 or not soft_acks
        for origin, kind, key, version in acks:
            if kind == SOFT_KIND:
                continue  # soft: held in memory only, gone after the kill
            t = (origin, kind, key)
            acked[t] = max(acked.get(t, 0), version)

        s = Store.open(store_dir, durable=lambda kind: kind != SOFT_KIND)
        assert s.stats["corrupt"] == 0, f"round {rnd}: {s.stats}"
        assert s.stats["soft_removed"] == 0, f"round {rnd}: a soft record reached the disk"
        assert not any(r.kind == SOFT_KIND for r in s.records())
        assert not (store_dir / "corrupt").exists()
        for t, version in acked.items():
            got = s.get(*t)
            assert got is not None, f"round {rnd}: acknowledged {t} v{version} is gone"
            assert got.version >= version, f"round {rnd}: {t} went back to v{got.version}"
        # Nothing but the database on disk, SQLite finds it sound, and every
        # row is a complete, verifying record under its own name.
        names = {p.name for p in store_dir.iterdir()}
        assert names <= {"records.db", "records.db-wal", "records.db-shm"}, names
        db = sqlite3.connect(store_dir / "records.db")
        try:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            rows = dict(db.execute("SELECT name, data FROM records").fetchall())
        finally:
            db.close()
        assert sorted(rows) == sorted(file_name(r.origin, r.kind, r.key) for r in s.records())
        for r in s.records():
            data = rows[file_name(r.origin, r.kind, r.key)]
            assert SignedRecord.decode(data, verify=True).encode() == data == r.encode()
        s.close()

    elapsed = time.monotonic() - started
    print(
        f"{ROUNDS} kills, {total_acks} acknowledged writes, "
        f"{grouped_rounds} rounds with grouped commits, {elapsed:.1f} s"
    )
    # The test only means something if the kills landed while writes happened.
    assert rounds_with_acks >= ROUNDS // 2
    assert total_acks >= 10 * ROUNDS
    if threads > 1:
        # ...and for the group variant, while groups held several records.
        assert grouped_rounds >= ROUNDS // 2
