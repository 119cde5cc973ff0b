"""The store benchmark: records/s and fsyncs/s of the record store's layouts.

Owns: the comparison behind the store decision in docs/decisions.md -- (a)
today's per-file writes (one file fsync and one directory fsync per record,
one record at a time), (b) group commit in the per-file layout (the real
`clanagent.store.Store`), (c) SQLite in WAL mode (stdlib `sqlite3`, one
transaction per group, the same group-commit front end) -- the result rows in
`bench/results/store.json`, and the printed table.  (a) and (b) run the
Store's own front end over the file layout it had before (`FileStore` here),
so that only the disk layout differs.

Must never: report a number it did not measure (a missing value is None), or
let one backend's files or page cache help another (each runs in its own
child process on a fresh directory).

Workload (the same records for every backend): signed records from 20
origins, bodies 200 B to 4 KiB (log-uniform), durable kinds only.
  burst:  1000 records offered at once by 32 writer threads (the gossip shell
          persists each record batch from a trio worker thread, up to 40).
  steady: 10 records/s for 10 s, each from its own writer, as the idle agent
          of issue 13 wrote them; ack latency from offer to return.
fsyncs are counted by `strace` (fsync and fdatasync of the whole child) when
it is installed, else by the store's own counter (SQLite then: None).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from clanagent.identity import Identity
from clanagent.store import Store, Triple, file_name
from clanagent.wire import SignedRecord

__all__ = ["BACKENDS", "main"]

RESULTS = Path(__file__).resolve().parent / "results" / "store.json"
BACKENDS = {
    "a_per_file": "today: each record its own file fsync + directory fsync, one at a time",
    "b_group": "group commit, per-file layout (20 ms window): files + 1 directory fsync",
    "b_group_nowait": "as b, no window (groups only the writes that queue meanwhile)",
    "c_sqlite_full": "clanagent.store.Store as shipped: SQLite WAL, synchronous=FULL, group commit",
    "c_sqlite_normal": "as c, synchronous=NORMAL (no fsync per commit: not power-safe)",
}
WRITERS = 32
ORIGINS = 20
KINDS = ("endpoint", "service", "secret", "vm.order")


def make_records(n: int, seed: int) -> list[SignedRecord]:
    rng = random.Random(seed)
    idents = [Identity.generate() for _ in range(ORIGINS)]
    versions: dict[Triple, int] = {}
    out = []
    for i in range(n):
        ident = idents[i % ORIGINS]
        kind = rng.choice(KINDS)
        key = f"k{rng.randrange(40)}"
        t = (ident.public_key, kind, key)
        versions[t] = versions.get(t, 0) + 1
        size = int(math.exp(rng.uniform(math.log(200), math.log(4096))))
        out.append(SignedRecord.create(ident, kind, key, versions[t], {"pad": rng.randbytes(size)}))
    return out


class FileStore(Store):
    """The real Store's front end (quotas, versions, group commit) over the
    one-file-per-key layout of the store before SQLite: per record a temp file,
    its fsync and a rename; per group one directory fsync."""

    def _load(self) -> None:  # a fresh directory: nothing to load
        pass

    def _write_batch(self, recs: list[SignedRecord]) -> list[bool]:
        assert self._dir is not None
        with self._write_lock:
            with self._lock:
                results, winners = self._select_nolock(recs)
            if not winners:
                return results
            for triple, i in winners.items():
                name = file_name(*triple)
                tmp = self._dir / f"{name}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                try:
                    os.write(fd, recs[i].encode())
                    self._fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, self._dir / name)
            self._fsync_dir(self._dir)
            with self._lock:
                for triple, i in winners.items():
                    self._set_nolock(triple, recs[i])
                    results[i] = True
                self.stats["written"] += len(winners)
                self.stats["commits"] += 1
            return results


def open_backend(name: str, path: Path) -> tuple[Store, threading.Lock | None]:
    """The store, and a lock that serialises puts (today's one-at-a-time)."""
    if name == "a_per_file":
        return FileStore.open(path, group_window=0.0), threading.Lock()
    if name == "b_group":
        return FileStore.open(path), None
    if name == "b_group_nowait":
        return FileStore.open(path, group_window=0.0), None
    if name == "c_sqlite_full":
        return Store.open(path), None  # the store as shipped
    if name == "c_sqlite_normal":
        store = Store.open(path)
        assert store._db is not None
        store._db.execute("PRAGMA synchronous=NORMAL")
        return store, None
    raise ValueError(name)


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_one(name: str, burst: int, steady_s: float, path: Path) -> dict[str, Any]:
    """Run both phases on one backend (in this process); fsyncs from the store."""
    recs = make_records(burst + int(steady_s * 10) + 10, seed=20261206)
    store, serial = open_backend(name, path)

    def put(rec: SignedRecord) -> bool:
        if serial is None:
            return store.put(rec)
        with serial:
            return store.put(rec)

    rows = []
    with ThreadPoolExecutor(WRITERS) as pool:
        # burst
        f0, c0, cpu0, t0 = store.stats["fsyncs"], store.stats["commits"], _cpu(), time.monotonic()
        acked = sum(pool.map(put, recs[:burst]))
        wall = time.monotonic() - t0
        rows.append(
            {
                "phase": "burst",
                "records": burst,
                "acked": acked,
                "wall_s": round(wall, 3),
                "records_per_s": round(burst / wall, 1),
                "store_fsyncs": store.stats["fsyncs"] - f0,
                "commits": store.stats["commits"] - c0,
                "cpu_ms_per_record": round((_cpu() - cpu0) * 1000 / burst, 3),
                "t_start": t0,
                "t_end": t0 + wall,
            }
        )
        # steady
        rest = recs[burst : burst + int(steady_s * 10)]
        lat: list[float] = []
        lock = threading.Lock()

        def timed(rec: SignedRecord, due: float) -> bool:
            ok = put(rec)
            with lock:
                lat.append(time.monotonic() - due)
            return ok

        f0, c0, cpu0, t0 = store.stats["fsyncs"], store.stats["commits"], _cpu(), time.monotonic()
        futs = []
        for i, rec in enumerate(rest):
            due = t0 + i / 10
            time.sleep(max(0.0, due - time.monotonic()))
            futs.append(pool.submit(timed, rec, due))
        acked = sum(f.result() for f in futs)
        wall = time.monotonic() - t0
        lat.sort()
        rows.append(
            {
                "phase": "steady",
                "records": len(rest),
                "acked": acked,
                "wall_s": round(wall, 3),
                "records_per_s": round(len(rest) / wall, 1),
                "store_fsyncs": store.stats["fsyncs"] - f0,
                "commits": store.stats["commits"] - c0,
                "cpu_ms_per_record": round((_cpu() - cpu0) * 1000 / len(rest), 3),
                "latency_ms_median": round(lat[len(lat) // 2] * 1000, 2),
                "latency_ms_p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 2),
                "t_start": t0,
                "t_end": t0 + wall,
            }
        )
    for r in rows:
        r["backend"] = name
    return {"rows": rows}


def _strace_counts(trace: Path, rows: list[dict[str, Any]]) -> None:
    """fsync/fdatasync calls per phase, from `strace -ttt` lines."""
    times = []
    for line in trace.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and ("fsync(" in parts[2] or "fdatasync(" in parts[2]):
            times.append(float(parts[1]))
    for r in rows:
        r["fsyncs"] = sum(r["t_start_wall"] <= t <= r["t_end_wall"] for t in times)


def run_child(name: str, burst: int, steady_s: float) -> list[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix=f"bench-store-{name}-", dir=os.environ.get("BENCH_DIR")))
    try:
        out = work / "out.json"
        trace = work / "strace.txt"
        cmd = _child_cmd(name, burst, steady_s, work)
        strace = shutil.which("strace")
        if strace:
            flags = ["-f", "-qq", "--seccomp-bpf", "-ttt", "-e", "trace=fsync,fdatasync"]
            cmd = [strace, *flags, "-o", str(trace), "--", *cmd]
        subprocess.run(cmd, check=True)
        rows = json.loads(out.read_text())["rows"]
        if strace and trace.exists():
            _strace_counts(trace, rows)
        else:
            for r in rows:
                r["fsyncs"] = None if name.startswith("c_") else r["store_fsyncs"]
        for r in rows:
            wall = r["wall_s"]
            r["fsyncs_per_s"] = None if r["fsyncs"] is None else round(r["fsyncs"] / wall, 1)
            r["fsyncs_per_record"] = (
                None if r["fsyncs"] is None else round(r["fsyncs"] / r["records"], 3)
            )
            for k in ("t_start", "t_end", "t_start_wall", "t_end_wall"):
                r.pop(k, None)
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _child_cmd(name: str, burst: int, steady_s: float, work: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.store",
        "--one",
        name,
        "--burst",
        str(burst),
        "--steady",
        str(steady_s),
        "--dir",
        str(work / "s"),
        "--out",
        str(work / "out.json"),
    ]


COLUMNS = (
    ("backend", 16),
    ("phase", 7),
    ("records_per_s", 13),
    ("fsyncs", 6),
    ("store_fsyncs", 12),
    ("fsyncs_per_s", 12),
    ("fsyncs_per_record", 17),
    ("cpu_ms_per_record", 17),
    ("latency_ms_median", 17),
    ("latency_ms_p99", 14),
)


def table(rows: list[dict[str, Any]]) -> str:
    head = " ".join(f"{c:>{w}}" for c, w in COLUMNS)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for c, w in COLUMNS:
            v = r.get(c)
            cells.append(f"{'-' if v is None else v!s:>{w}}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.store")
    p.add_argument("--quick", action="store_true", help="burst 200, steady 2 s")
    p.add_argument("--one", choices=sorted(BACKENDS), help="(child) run one backend")
    p.add_argument("--only", choices=sorted(BACKENDS), action="append")
    p.add_argument("--burst", type=int, default=1000)
    p.add_argument("--steady", type=float, default=10.0)
    p.add_argument("--dir", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.burst, args.steady = 200, 2.0
    if args.one:
        res = run_one(args.one, args.burst, args.steady, args.dir)
        # strace -ttt stamps are wall-clock: convert the phase bounds.
        shift = time.time() - time.monotonic()
        for r in res["rows"]:
            r["t_start_wall"] = r["t_start"] + shift
            r["t_end_wall"] = r["t_end"] + shift
        args.out.write_text(json.dumps(res))
        return 0
    rows: list[dict[str, Any]] = []
    for name in args.only or list(BACKENDS):
        rows.extend(run_child(name, args.burst, args.steady))
    print(table(rows))
    for name, what in BACKENDS.items():
        print(f"  {name}: {what}")
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "burst": args.burst,
            "steady_s": args.steady,
            "writers": WRITERS,
            "fsyncs_counted_by": "strace" if shutil.which("strace") else "store counter",
            "sqlite": sqlite3.sqlite_version,
            "python": sys.version.split()[0],
            "loadavg_1m_at_end": round(os.getloadavg()[0], 1),
        }
        RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
