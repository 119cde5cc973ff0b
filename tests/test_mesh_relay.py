"""The relay cores (mesh/relay.py): policy, the client's choice, grants, forwarding."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clanagent.mesh.candidates import collect
from clanagent.mesh.nat import effective_preference
from clanagent.mesh.paths import Candidate, PathError, PathSelector
from clanagent.mesh.relay import (
    RelayConfig,
    RelayGrants,
    RelayLimiter,
    RelayPair,
    RelayPolicy,
    choose_relays,
    pair_of,
    wireguard_shaped,
)

A = b"\x01" * 32
B = b"\x02" * 32
R = b"\x03" * 32
S = b"\x04" * 32


def doc(**tags):
    machines = {}
    for i, name in enumerate(["a", "b", "r", "s"]):
        t = tags.get(name, [])
        machines[name] = {
            "node_key": bytes([i + 1]) * 32,
            "tags": t,
            "public": "no-public" not in t,
            "endpoints": [],
        }
    return {"machines": machines}


# ---------------------------------------------------------------- policy


def test_only_machines_tagged_relay_relay_and_no_relay_or_no_public_are_never_relayed_for():
    pol = RelayPolicy.from_doc(doc(r=["relay"], s=["relay", "no-public"], b=["no-relay"]))
    assert pol.relays == {"r"}  # s is no-public: its legs would cross the internet
    assert pol.why_not("r", "a", "s") == "s is no-public"
    assert "no-relay" in pol.why_not("r", "a", "b")
    assert "does not relay" in pol.why_not("s", "a", "r")
    pol = RelayPolicy.from_doc(doc(r=["relay"], a=["no-public"]))
    assert "no-public" in pol.why_not("r", "a", "b")
    assert pol.why_not("r", "r", "b") == "an end of the path"


def test_the_client_prefers_the_fastest_directly_reached_relay_and_says_why_not_the_rest():
    pol = RelayPolicy.from_doc(doc(r=["relay"], s=["relay"], b=[]))
    reach = {"r": ("public", 0.030), "s": ("public", 0.010)}
    opts = choose_relays(pol, "a", "b", reach)
    assert [(o.relay, o.usable) for o in opts] == [("s", True), ("r", True)]
    assert opts[0].reason == "relay via s (public, rtt 10.0 ms)"
    reach = {"r": ("tor", 0.5), "s": None}
    opts = choose_relays(pol, "a", "b", reach)
    assert not any(o.usable for o in opts)
    assert {o.relay: o.reason for o in opts} == {
        "r": "r is reached over tor, not directly",
        "s": "no working path to s",
    }
    # the peer itself is no relay for a path to itself
    assert [o.relay for o in choose_relays(pol, "a", "r", reach)] == ["s"]


# ---------------------------------------------------------------- grants


def test_a_pair_is_granted_when_asked_and_both_ends_are_alive_and_lingers_then_closes():
    g = RelayGrants(RelayConfig(linger=60.0))
    alive = {A, B}
    opened, closed = g.update([(A, B)], alive.__contains__, lambda a, b: True, 0.0)
    assert opened == [pair_of(A, B)] and closed == []
    # both ask: still one pair
    opened, closed = g.update([(A, B), (B, A)], alive.__contains__, lambda a, b: True, 1.0)
    assert opened == [] and g.pairs == [(A, B)]
    # nobody asks: kept for the linger, then closed
    assert g.update([], alive.__contains__, lambda a, b: True, 60.0) == ([], [])
    assert g.update([], alive.__contains__, lambda a, b: True, 61.5) == ([], [(A, B)])


def test_no_grant_for_a_dead_end_a_forbidden_pair_or_beyond_the_cap():
    g = RelayGrants(RelayConfig(max_pairs=1))
    assert g.update([(A, B)], {A}.__contains__, lambda a, b: True, 0.0) == ([], [])
    assert g.update([(A, B)], {A, B}.__contains__, lambda a, b: False, 0.0) == ([], [])
    assert g.update([(A, B), (A, S)], {A, B, S}.__contains__, lambda a, b: True, 0.0)[0] == [(A, B)]
    assert g.pairs == [(A, B)]
    # the policy changes: the pair closes at once
    assert g.update([(A, B)], {A, B}.__contains__, lambda a, b: False, 1.0) == ([], [(A, B)])


def test_a_full_relay_makes_room_by_closing_a_pair_nobody_asks_for_any_more():
    # a pair that punched its way to a direct path lingers; a pair that needs
    # the relay now must not wait for it (found in tests/sim/test_nat.py)
    alive = {A, B, R, S}.__contains__
    ok = lambda a, b: True  # noqa: E731
    g = RelayGrants(RelayConfig(max_pairs=2, linger=60.0))
    assert g.update([(A, B), (R, S)], alive, ok, 0.0)[0] == [(A, B), (R, S)]
    g.update([(R, S)], alive, ok, 5.0)  # A-B no longer asked: lingering
    opened, closed = g.update([(R, S), (A, R)], alive, ok, 6.0)
    assert opened == [(A, R)] and closed == [(A, B)]
    assert g.pairs == [(A, R), (R, S)]
    # pairs still asked for are never pushed out
    assert g.update([(R, S), (A, R), (B, S)], alive, ok, 7.0) == ([], [])
    assert g.pairs == [(A, R), (R, S)]


# ---------------------------------------------------------------- forwarding


def init() -> bytes:
    return b"\x01\x00\x00\x00" + b"\x00" * 144


def data(n: int = 64) -> bytes:
    return b"\x04\x00\x00\x00" + b"\x00" * (n - 4)


def test_wireguard_shapes():
    assert wireguard_shaped(init())
    assert wireguard_shaped(b"\x02\x00\x00\x00" + b"\x00" * 88)
    assert wireguard_shaped(b"\x03\x00\x00\x00" + b"\x00" * 60)
    assert wireguard_shaped(data(32)) and wireguard_shaped(data(1440))
    # a full-MTU packet: padding stops at the MTU (1420 + 32 on the wire);
    # refusing it stalled every TCP stream through a relay (bench/nat.py)
    assert wireguard_shaped(data(1452)) and wireguard_shaped(data(33))
    assert not wireguard_shaped(data(31))
    assert not wireguard_shaped(init()[:-1])
    assert not wireguard_shaped(b"\x01\x01\x00\x00" + b"\x00" * 144)
    assert not wireguard_shaped(b"GET / HTTP/1.1\r\n" * 4)
    assert not wireguard_shaped(b"")


HOSTS = {A: ["198.51.100.1"], B: ["203.0.113.1"]}


def test_forwarding_learns_each_side_from_its_authenticated_host_only():
    p = RelayPair(A, B)
    a_src, b_src = ("198.51.100.1", 40001), ("203.0.113.1", 51820)
    # A first: B not learnt yet, nothing to forward to
    assert p.datagram("a", a_src, init(), HOSTS.__getitem__, 0.0) is None
    assert p.stats["no_peer_yet"] == 1
    # a stranger on B's port cannot become B
    assert p.datagram("b", ("192.0.2.66", 1), init(), HOSTS.__getitem__, 0.1) is None
    assert p.stats["stranger"] == 1
    assert p.datagram("b", b_src, data(), HOSTS.__getitem__, 0.2) == a_src
    assert p.datagram("a", a_src, data(), HOSTS.__getitem__, 0.3) == b_src
    # not WireGuard: dropped even from a learnt address
    assert p.datagram("a", a_src, b"hello", HOSTS.__getitem__, 0.4) is None
    assert p.stats["not_wireguard"] == 1
    # A's NAT moves it to another port of the same host: followed
    moved = ("198.51.100.1", 40777)
    assert p.datagram("a", moved, data(), HOSTS.__getitem__, 0.5) == b_src
    assert p.datagram("b", b_src, data(), HOSTS.__getitem__, 0.6) == moved


def test_forwarding_is_rate_limited():
    cfg = RelayConfig(rate_bytes=10_000, burst_bytes=5_000, rate_packets=1e6, burst_packets=1e6)
    p = RelayPair(A, B, cfg)
    a_src, b_src = ("198.51.100.1", 1), ("203.0.113.1", 2)
    p.datagram("b", b_src, data(), HOSTS.__getitem__, 0.0)
    sent = sum(
        p.datagram("a", a_src, data(1008), HOSTS.__getitem__, 0.0) is not None for _ in range(20)
    )
    assert sent == 4  # 5000 bytes of burst / 1008
    # one second later 10 000 bytes more are allowed (but the burst caps it at 5000)
    sent = sum(
        p.datagram("a", a_src, data(1008), HOSTS.__getitem__, 1.0) is not None for _ in range(20)
    )
    assert sent == 4
    assert p.stats["rate_limited"] == 32


def test_the_relay_wide_limit_holds_across_pairs():
    # each pair alone may send 100 packets at once; together they get 40 a second
    cfg = RelayConfig(
        rate_bytes=1e9,
        burst_bytes=1e9,
        rate_packets=1e6,
        burst_packets=100,
        total_rate_bytes=1e9,
        total_rate_packets=160,
    )
    shared = RelayLimiter(cfg)
    keys = [bytes([i]) * 32 for i in range(1, 9)]
    hosts = {k: [f"192.0.2.{i}"] for i, k in enumerate(keys, 1)}
    pairs = [RelayPair(keys[i], keys[i + 1], cfg, limiter=shared) for i in range(0, 8, 2)]
    for p in pairs:
        p.datagram("b", (hosts[p.b][0], 2), data(), hosts.__getitem__, 0.0)

    def burst(at: float) -> list[int]:
        return [
            sum(
                p.datagram("a", (hosts[p.a][0], 1), data(), hosts.__getitem__, at) is not None
                for _ in range(30)
            )
            for p in pairs
        ]

    assert sum(burst(0.0)) == 40  # a quarter second of the total rate, not 4 x 30
    assert sum(burst(0.1)) == 16  # refilled at 160 packets/s
    assert shared.refused == 240 - 56
    assert sum(p.stats["relay_limited"] for p in pairs) == 240 - 56
    assert all(p.stats["rate_limited"] == 0 for p in pairs)
    # a pair alone (no shared limiter) is held only by its own limit
    alone = RelayPair(keys[0], keys[1], cfg)
    alone.datagram("b", (hosts[keys[1]][0], 2), data(), hosts.__getitem__, 0.0)
    sent = sum(
        alone.datagram("a", (hosts[keys[0]][0], 1), data(), hosts.__getitem__, 0.0) is not None
        for _ in range(150)
    )
    assert sent == 100


def test_the_relay_limit_is_configurable(tmp_path):
    from clanagent.config import ConfigError, load_config

    with pytest.raises(ValueError):
        RelayConfig(total_rate_packets=0)
    p = tmp_path / "agent.toml"
    p.write_text("[mesh]\nrelay_max_mibps = 2.5\nrelay_max_pps = 300\n")
    cfg = load_config(p)
    assert (cfg.mesh.relay_max_mibps, cfg.mesh.relay_max_pps) == (2.5, 300)
    assert RelayConfig.scaled(4.0, 16.0, 16000.0) == RelayConfig()
    big = RelayConfig.scaled(40.0, 100.0, 1e5)
    assert (big.rate_bytes, big.rate_packets, big.burst_packets) == (40 * 1024 * 1024, 4e4, 1e4)
    p.write_text("[mesh]\nrelay_max_mibps = 0\n")
    with pytest.raises(ConfigError, match="relay_max_mibps"):
        load_config(p)


def test_a_silent_side_must_be_learnt_again():
    p = RelayPair(A, B, RelayConfig(address_idle=10.0))
    a_src, b_src = ("198.51.100.1", 1), ("203.0.113.1", 2)
    p.datagram("b", b_src, data(), HOSTS.__getitem__, 0.0)
    assert p.datagram("a", a_src, data(), HOSTS.__getitem__, 5.0) == b_src
    assert p.datagram("a", a_src, data(), HOSTS.__getitem__, 20.0) is None


# ---------------------------------------------------------------- in the path selector


def test_relay_ranks_below_direct_and_reflexive_above_tor_and_shows_its_relay():
    d = doc(r=["relay"])
    cands = collect(
        d,
        self_key=A,
        records={},
        opened_inventory={"b": ["198.51.100.9:7946"]},
        lan_seen={},
        onions={B: "bbbb.onion:7946"},
        reflexive={B: ["203.0.113.1:51820"]},
        relayed={B: [("192.0.2.1:40002", "r")]},
    )[B]
    sel = PathSelector(True, random.Random(0))
    sel.set_candidates(B, cands, effective_preference(["lan", "public", "tor"]), True, 0.0)
    ranked = [r.candidate.kind for r in sel.rank(B, 0.0)]
    assert ranked == ["public", "reflexive", "relay", "tor"]
    pub, refl = cands[0], next(c for c in cands if c.kind == "reflexive")
    assert refl.port_wg == 51820
    sel.report_failure(B, pub, 1.0)
    sel.report_failure(B, refl, 1.0)
    out = sel.explain(B, 1.0)
    assert out["chosen"] == {"kind": "relay", "address": "192.0.2.1:40002", "via": "r"}
    row = next(r for r in out["paths"] if r["kind"] == "relay")
    assert row["reason"].startswith("fallback: relay via r")
    # punching succeeds: back to the reflexive path at once
    sel.report_success(B, refl, 0.02, 2.0)
    assert sel.choose(B, 2.0).kind == "reflexive"


def test_no_public_forbids_reflexive_and_relay_paths():
    sel = PathSelector(False, random.Random(0))
    cands = [
        Candidate(B, "reflexive", "203.0.113.1:51820", "nat", 51820),
        Candidate(B, "relay", "192.0.2.1:40002", "relay", 40002, via="r"),
    ]
    sel.set_candidates(B, cands, ["lan", "public", "reflexive", "relay"], True, 0.0)
    assert sel.choose(B, 0.0) is None
    reasons = [r.reason for r in sel.rank(B, 0.0)]
    assert all("forbidden for this machine (no-public)" in r for r in reasons)


def test_a_relay_candidate_must_name_its_relay():
    for kwargs in ({}, {"via": ""}):
        try:
            Candidate(B, "relay", "192.0.2.1:1", "relay", 1, **kwargs)
        except PathError:
            continue
        raise AssertionError("a relay candidate without its relay")
    try:
        Candidate(B, "public", "192.0.2.1:1", "gossip", 1, via="r")
    except PathError:
        return
    raise AssertionError("a direct candidate with a relay")


def test_clanctl_ssh_never_dials_a_relay_port_or_a_nat_mapping():
    import pytest

    from clanagent.cli._mesh_cmds import ssh_target
    from clanagent.cli.errors import CommandError

    info = {
        "machine": "b",
        "overlay6": "fd00::b",
        "wireguard": True,
        "handshake": False,
        "chosen": {"kind": "relay", "address": "192.0.2.1:40002", "via": "r"},
    }
    with pytest.raises(CommandError, match="relay via r"):
        ssh_target(info)
    assert ssh_target({**info, "handshake": True}) == ("fd00::b", [])


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.sampled_from(["198.51.100.1", "203.0.113.1", "192.0.2.66", "::1"]),
            st.integers(0, 65535),
            st.binary(max_size=1600),
        ),
        max_size=40,
    )
)
def test_hostile_datagrams_on_a_relay_port_are_dropped_never_raise(datagrams):
    """Anything anyone sends to a relay's ports: no exception; a datagram is
    forwarded only when WireGuard-shaped, from the side's authenticated host,
    and only to the other side's learnt address."""
    p = RelayPair(A, B)
    for i, (side, host, port, payload) in enumerate(datagrams):
        dst = p.datagram(side, (host, port), payload, HOSTS.__getitem__, i * 0.01)
        if dst is not None:
            assert wireguard_shaped(payload)
            assert host in HOSTS[A if side == "a" else B]
            assert dst[0] in HOSTS[B if side == "a" else A]
