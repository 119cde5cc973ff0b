"""Crash safety of clanagent.store under SIGKILL.

A writer process (tests/_store_writer.py) writes records in a loop and prints
one line per write that put() acknowledged.  We kill it with SIGKILL at a
random moment, 50 times on the same directory, and after each kill reopen the
store and check that nothing acknowledged was lost and nothing is corrupt.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clanagent import identity
from clanagent.store import Store, file_name
from clanagent.wire import SignedRecord

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


def _acks(out: Path) -> list[tuple[bytes, str, str, int]]:
    acks = []
    for line in out.read_bytes().split(b"\n"):
        # A line is written with one write() before the next put begins, so a
        # kill cannot leave half a line; a missing newline would only mean the
        # last line is incomplete, which split() leaves as the final element.
        if not line.startswith(b"ACK "):
            continue
        _, origin, kind, key, version = line.decode().split(" ")
        acks.append((bytes.fromhex(origin), kind, key, int(version)))
    return acks


@pytest.mark.slow
@pytest.mark.integration
def test_sigkill_never_loses_an_acknowledged_write(tmp_path: Path) -> None:
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

    for rnd in range(ROUNDS):
        out = tmp_path / f"out{rnd}"
        err = tmp_path / f"err{rnd}"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(
                [sys.executable, str(WRITER), str(store_dir), str(rnd), *id_dirs],
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
        for origin, kind, key, version in acks:
            t = (origin, kind, key)
            acked[t] = max(acked.get(t, 0), version)

        s = Store.open(store_dir)
        assert s.stats["corrupt"] == 0, f"round {rnd}: {s.stats}"
        assert not (store_dir / "corrupt").exists()
        for t, version in acked.items():
            got = s.get(*t)
            assert got is not None, f"round {rnd}: acknowledged {t} v{version} is gone"
            assert got.version >= version, f"round {rnd}: {t} went back to v{got.version}"
        # Every file left on disk is a complete, verifying record under its own name.
        names = sorted(p.name for p in store_dir.iterdir())
        assert names == sorted(file_name(r.origin, r.kind, r.key) for r in s.records())
        for r in s.records():
            data = (store_dir / file_name(r.origin, r.kind, r.key)).read_bytes()
            assert SignedRecord.decode(data, verify=True).encode() == data == r.encode()

    elapsed = time.monotonic() - started
    print(f"{ROUNDS} kills, {total_acks} acknowledged writes, {elapsed:.1f} s")
    # The test only means something if the kills landed while writes happened.
    assert rounds_with_acks >= ROUNDS // 2
    assert total_acks >= 10 * ROUNDS
