"""Writer process for tests/test_store_crash.py (not a test module).

Usage: python _store_writer.py STORE_DIR SEED THREADS ID_DIR [ID_DIR ...]

Opens the store, prints ``READY``, then writes records forever: several
origins (one identity per ID_DIR), kinds and keys, increasing versions, bodies
from empty to a few hundred KB, sometimes as a batch.  After put()/put_many()
returned True for a record it prints ``ACK <origin hex> <kind> <key> <version>``
and flushes, so every line on stdout is a write the store acknowledged.  The
test SIGKILLs it at a random moment and checks the acknowledged writes.

With THREADS > 1, that many threads write at once, so their writes meet in
group commits (the store's window is 20 ms): a kill then often lands in the
middle of a group.  The kind ``topology`` is soft there (held in memory only):
its acknowledgements say nothing about the disk.  After each write a thread
also prints ``STAT <records written> <group commits>``.
"""

from __future__ import annotations

import os
import random
import sys
import threading
from pathlib import Path

from clanagent import identity
from clanagent.store import Store
from clanagent.wire import SignedRecord

KINDS = ("endpoint", "service")
KEYS = ("a", "b", "c")
SOFT_KIND = "topology"
# Mostly small records, some big enough that a kill often lands mid-write.
SIZES = (0, 0, 16, 200, 200, 4_000, 60_000, 300_000)


def main() -> None:
    store_dir, seed, threads, *id_dirs = sys.argv[1:]
    n_threads = int(threads)
    idents = [identity.load(Path(d)) for d in id_dirs]
    kinds = KINDS if n_threads == 1 else (*KINDS, SOFT_KIND)
    store = Store.open(Path(store_dir), durable=lambda kind: kind != SOFT_KIND)
    out_lock = threading.Lock()
    os.write(1, b"READY\n")
    triples = [(i, k, key) for i in idents for k in kinds for key in KEYS]

    def writer(rng: random.Random) -> None:
        def next_record() -> SignedRecord:
            ident, kind, key = rng.choice(triples)
            held = store.get(ident.public_key, kind, key)
            version = (held.version if held else 0) + rng.randint(1, 3)
            body = {"v": version, "pad": rng.randbytes(rng.choice(SIZES))}
            return SignedRecord.create(ident, kind, key, version, body)

        while True:
            if rng.random() < 0.2:
                # A batch may hold the same triple twice with the same version;
                # put_many then acknowledges at most one of them.
                batch = [next_record() for _ in range(rng.randint(2, 6))]
                results = store.put_many(batch)
            else:
                batch = [next_record()]
                results = [store.put(batch[0])]
            lines = [
                f"ACK {r.origin.hex()} {r.kind} {r.key} {r.version}\n"
                for r, ok in zip(batch, results, strict=True)
                if ok
            ]
            if n_threads > 1:
                lines.append(f"STAT {store.stats['written']} {store.stats['commits']}\n")
            # One write() per put, so a kill never leaves half a line.
            with out_lock:
                os.write(1, "".join(lines).encode())

    rngs = [random.Random(f"{seed}-{i}") for i in range(n_threads)]
    workers = [threading.Thread(target=writer, args=(r,), daemon=True) for r in rngs[1:]]
    for w in workers:
        w.start()
    writer(rngs[0])


if __name__ == "__main__":
    main()
