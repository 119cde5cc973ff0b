"""NAT traversal in the simulator (tests/sim/nat.py): thirty machines behind
simulated NATs run the real traversal cores, no kernel.

Every pair behind endpoint-independent NATs (or a stateful firewall) gets a
reflexive path after one punch round; a machine behind a symmetric NAT is
detected, never punched, and reached through a relay; no relay is used
against the policy (untagged members, `no-relay`, `no-public`).
"""

from __future__ import annotations

import itertools

from clanagent.mesh.relay import RelayPolicy
from tests.sim.nat import NatSim

PUBLIC = [("r1", ["relay"]), ("r2", ["relay"]), ("s1", ["server"]), ("s2", ["server"])]
EIM = [f"e{i:02d}" for i in range(16)]
FIREWALL = [f"f{i}" for i in range(5)]
SYMMETRIC = ["y0", "y1"]
NO_RELAY = ["n0", "n1"]  # behind EIM NATs, tagged no-relay
NO_PUBLIC = ["q0"]  # behind an EIM NAT, tagged no-public


def clan() -> NatSim:
    return NatSim(
        [(n, "public", t) for n, t in PUBLIC]
        + [(n, "eim", []) for n in EIM]
        + [(n, "firewall", []) for n in FIREWALL]
        + [(n, "symmetric", []) for n in SYMMETRIC]
        + [(n, "eim", ["no-relay"]) for n in NO_RELAY]
        + [(n, "eim", ["no-public"]) for n in NO_PUBLIC],
        seed=7,
    )


def test_thirty_machines_behind_simulated_nats_punch_relay_and_keep_the_policy():
    sim = clan()
    sim.run(40)
    m = sim.machines
    punchable = EIM + FIREWALL + NO_RELAY

    # reflexive addresses: learnt by every NATed machine, none for a symmetric NAT
    for n in punchable:
        assert m[n].traversal.book.addresses(sim.wall), n
    for n in SYMMETRIC:
        assert m[n].traversal.book.mapping_varies(sim.wall), n
        assert m[n].traversal.book.addresses(sim.wall) == [], n

    # every pair behind endpoint-independent NATs: a reflexive path, in one round
    for a, b in itertools.combinations(punchable, 2):
        for x, y in ((a, b), (b, a)):
            assert sim.path(x, y) == ("reflexive", ""), (x, y, sim.path(x, y))
            assert m[x].traversal.planner.established(m[y].key) is not None, (x, y)
        assert sim.works(a, b), (a, b)
    for n in punchable:
        st = m[n].traversal.stats
        assert st["punch_failed"] == 0, (n, st)
    # nobody ever punched with a symmetric NAT (it published nothing to punch at)
    for n in SYMMETRIC:
        assert m[n].traversal.stats["punch_rounds"] == 0
        assert m[n].traversal.planner.requests(sim.wall) == []
        for o in punchable:
            assert m[o].traversal.planner.explain(m[n].key, sim.wall) == "no punch tried"

    # a symmetric end: through a relay, and WireGuard works through it
    policy = RelayPolicy.from_doc(sim.doc)
    relayable = EIM + FIREWALL + SYMMETRIC
    for a in SYMMETRIC:
        for b in relayable:
            if a == b:
                continue
            for x, y in ((a, b), (b, a)):
                kind, via = sim.path(x, y) or ("none", "")
                assert kind == "relay", (x, y, kind)
                assert via in ("r1", "r2") and policy.why_not(via, x, y) is None, (x, y, via)
            assert sim.works(a, b), (a, b)

    # never against the policy: no relay for no-relay or no-public machines, and
    # no machine but the two tagged relay serves a pair
    def nothing(x: str, y: str) -> bool:
        # no path but the other's private LAN address, which the selector
        # retries now and then and which never answers
        return sim.path(x, y) in (None, ("lan", "")) and not sim.works(x, y)

    for a in NO_RELAY + NO_PUBLIC:
        for b in SYMMETRIC:
            assert nothing(a, b) and nothing(b, a), (a, b, sim.path(a, b), sim.path(b, a))
    for q in NO_PUBLIC:
        for o in punchable + SYMMETRIC:
            if o != q:
                assert nothing(q, o) and nothing(o, q), (q, o, sim.path(q, o), sim.path(o, q))
    for name, mach in m.items():
        grants = mach.traversal.grants.pairs
        if name not in ("r1", "r2"):
            assert grants == [], name
        assert len(grants) <= sim.relay_config.max_pairs
        for pa, pb in grants:
            assert policy.why_not(name, sim.by_key[pa].name, sim.by_key[pb].name) is None

    # a public member talks to every NATed machine at its mapping (learnt from
    # its packets): it asks no relay for any of them, even while it retries a
    # private LAN address it cannot reach
    from clanagent.mesh.nat import parse_nat_body

    for p, _ in PUBLIC:
        rec = m[p].record
        assert rec is None or parse_nat_body(rec.body).relay_ask == [], p

    # the public members reach every NATed machine (at its mapping, learnt from
    # its packets) but the no-public one, which uses no public path at all
    for p, _ in PUBLIC:
        for o in punchable + SYMMETRIC:
            assert sim.works(p, o), (p, o)
        for q in NO_PUBLIC:
            assert not sim.works(p, q), (p, q)
