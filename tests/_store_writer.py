"""Writer process for tests/test_store_crash.py (not a test module).

Usage: python _store_writer.py STORE_DIR SEED ID_DIR [ID_DIR ...]

Opens the store, prints ``READY``, then writes records forever: several
origins (one identity per ID_DIR), kinds and keys, increasing versions, bodies
from empty to a few hundred KB, sometimes as a batch.  After put()/put_many()
returned True for a record it prints ``ACK <origin hex> <kind> <key> <version>``
and flushes, so every line on stdout is a write the store acknowledged.  The
test SIGKILLs it at a random moment and checks the acknowledged writes.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from clanagent import identity
from clanagent.store import Store
from clanagent.wire import SignedRecord

KINDS = ("endpoint", "service")
KEYS = ("a", "b", "c")
# Mostly small records, some big enough that a kill often lands mid-write.
SIZES = (0, 0, 16, 200, 200, 4_000, 60_000, 300_000)


def main() -> None:
    store_dir, seed, *id_dirs = sys.argv[1:]
    idents = [identity.load(Path(d)) for d in id_dirs]
    store = Store.open(Path(store_dir))
    out = sys.stdout
    out.write("READY\n")
    out.flush()
    rng = random.Random(int(seed))
    triples = [(i, k, key) for i in idents for k in KINDS for key in KEYS]

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
        out.write("".join(lines))
        out.flush()


if __name__ == "__main__":
    main()
