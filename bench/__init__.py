"""Benchmarks of clanagent, run with `make bench` (`python -m bench`).

Owns: one module per benchmark (`gossip`, `agents`, `agents_sim`, `mesh`, `vm`,
`store`, `nat`) and the dispatcher in `__main__`; results go to `bench/results/<name>.json`.

Must never: be imported by the product or by the unit tests.
"""

__all__ = ["BENCHMARKS"]

# name -> module under bench/ with a main(argv) -> int
BENCHMARKS = {
    "gossip": "bench.gossip",
    "agents": "bench.agents",
    "agents_sim": "bench.agents_sim",
    "mesh": "bench.mesh",
    "vm": "bench.vm",
    "store": "bench.store",
    "nat": "bench.nat",
}
