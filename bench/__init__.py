"""Benchmarks of clanagent, run with `make bench` (`python -m bench`).

Owns: one module per benchmark (`gossip` so far) and the dispatcher in
`__main__`; results go to `bench/results/<name>.json`.

Must never: be imported by the product or by the unit tests.
"""

__all__ = ["BENCHMARKS"]

# name -> module under bench/ with a main(argv) -> int
BENCHMARKS = {
    "gossip": "bench.gossip",
    "mesh": "bench.mesh",
    "vm": "bench.vm",
    "store": "bench.store",
}
