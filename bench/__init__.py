"""Benchmarks of clanagent, run with `make bench` (`python -m bench`).

Owns: one module per benchmark (`gossip`, `agents`, `mesh`, `vm`, `store`) and the dispatcher in
`__main__`; results go to `bench/results/<name>.json`.

Must never: be imported by the product or by the unit tests.
"""

__all__ = ["BENCHMARKS"]

# name -> module under bench/ with a main(argv) -> int
BENCHMARKS = {
    "gossip": "bench.gossip",
    "agents": "bench.agents",
    "mesh": "bench.mesh",
    "vm": "bench.vm",
    "store": "bench.store",
}
