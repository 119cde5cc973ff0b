"""The NAT traversal cores (mesh/nat.py): observing, gathering, punching, on a fake clock."""

from __future__ import annotations

import nacl.public
import pytest

from clanagent import records
from clanagent.mesh import nat
from clanagent.mesh.nat import (
    HANDSHAKE_FRESH,
    PunchConfig,
    PunchPlanner,
    ReflexiveBook,
    effective_preference,
    observations,
)
from clanagent.records import RecordContext, Refusal
from clanagent.wire import WireError

A = b"\x01" * 32
B = b"\x02" * 32
C = b"\x03" * 32
T0 = 1_800_000_000.0


# ---------------------------------------------------------------- observing


def test_only_fresh_handshakes_at_an_unadvertised_address_are_reported():
    peers = [
        (A, "203.0.113.1:51820", T0 - 10),  # NAT mapping: reported
        (B, "192.168.1.5:51820", T0 - 10),  # its own LAN address: not
        (C, "203.0.113.9:4000", T0 - HANDSHAKE_FRESH),  # stale handshake: not
    ]
    adv = {B: ["192.168.1.5:51820"], A: ["192.168.77.2:51820"]}
    assert observations(peers, adv, T0) == {A: "203.0.113.1:51820"}


def test_no_endpoint_no_handshake_loopback_or_garbage_is_never_reported():
    peers = [
        (A, None, T0),
        (B, "203.0.113.1:1", None),
        (C, "127.0.0.1:51820", T0),
        (b"\x04" * 32, "not an address", T0),
        (b"\x05" * 32, "[2001:db8::1]:51820", T0),
    ]
    assert observations(peers, {}, T0) == {b"\x05" * 32: "[2001:db8::1]:51820"}


def test_observations_are_bounded():
    peers = [(i.to_bytes(32, "big"), f"203.0.113.1:{1000 + i}", T0) for i in range(1, 400)]
    assert len(observations(peers, {}, T0)) == nat.MAX_SEEN


def test_a_sealed_observation_opens_only_for_its_machine():
    mine, other = nacl.public.PrivateKey.generate(), nacl.public.PrivateKey.generate()
    sealed = nat.seal_seen("203.0.113.1:51820", bytes(mine.public_key))
    assert nat.open_seen(sealed, mine) == ["203.0.113.1:51820"]
    assert nat.open_seen(sealed, other) is None
    assert nat.open_seen(b"\x00" * 60, mine) is None
    # a member that seals nonsense to us gets nothing published
    assert nat.open_seen(nat.seal_seen("evil.example:1", bytes(mine.public_key)), mine) is None
    three = ["203.0.113.1:1", "203.0.113.1:2", "203.0.113.1:3"]
    assert nat.open_seen(nat.seal_seen(three, bytes(mine.public_key)), mine) is None
    two = three[:2]
    assert nat.open_seen(nat.seal_seen(two, bytes(mine.public_key)), mine) == two


# ---------------------------------------------------------------- gathering


def test_reflexive_addresses_follow_the_observers_and_expire():
    book = ReflexiveBook(ttl=300.0)
    book.update(B, "203.0.113.1:51820", 0.0)
    book.update(C, "203.0.113.1:51820", 10.0)
    assert book.addresses(20.0) == ["203.0.113.1:51820"]
    # B no longer sees us: C still does
    book.update(B, None, 30.0)
    assert book.addresses(40.0) == ["203.0.113.1:51820"]
    # C's record is not refreshed: the address goes with it
    assert book.addresses(309.9) == ["203.0.113.1:51820"]
    assert book.addresses(310.0) == []
    assert book.next_deadline() == 310.0


def test_a_new_mapping_replaces_the_old_one_at_once():
    book = ReflexiveBook()
    book.update(B, "203.0.113.1:51820", 0.0)
    book.update(B, "203.0.113.1:61000", 5.0)  # the router rebooted
    assert book.addresses(6.0) == ["203.0.113.1:61000"]


def test_a_mapping_that_varies_by_destination_publishes_nothing():
    book = ReflexiveBook()
    book.update(B, "203.0.113.1:40001", 0.0)
    book.update(C, "203.0.113.1:40777", 0.0)  # symmetric NAT
    assert book.mapping_varies(1.0)
    assert book.addresses(1.0) == []


def test_a_relay_seeing_our_socket_at_a_second_port_reveals_a_symmetric_nat():
    book = ReflexiveBook()
    # one observer only (the public member, also our relay): its WireGuard
    # sees us at one port, our packets to its relay port come from another
    book.update(B, ["203.0.113.1:40001", "203.0.113.1:40777"], 0.0)
    assert book.mapping_varies(1.0) and book.addresses(1.0) == []
    book.update(B, ["203.0.113.1:51820"], 2.0)  # no relay in use: one view
    assert book.addresses(3.0) == ["203.0.113.1:51820"]


def test_more_observers_rank_an_address_first():
    book = ReflexiveBook()
    book.update(A, "198.51.100.1:51820", 0.0)
    book.update(B, "203.0.113.1:51820", 0.0)
    book.update(C, "203.0.113.1:51820", 0.0)
    assert book.addresses(1.0) == ["203.0.113.1:51820", "198.51.100.1:51820"]


def test_the_book_is_bounded():
    book = ReflexiveBook(cap=4)
    for i in range(10):
        book.update(i.to_bytes(32, "big"), "203.0.113.1:51820", float(i))
    assert len(book._by_observer) == 4


# ---------------------------------------------------------------- preference


@pytest.mark.parametrize(
    "pref, expected",
    [
        (["lan", "public", "tor"], ["lan", "public", "reflexive", "relay", "tor"]),
        (["lan", "public"], ["lan", "public", "reflexive", "relay"]),
        (["tor", "public", "lan"], ["relay", "tor", "public", "reflexive", "lan"]),
        (["lan", "tor"], ["lan", "tor"]),  # no-public: neither NAT kind
        (["lan", "relay", "public"], ["lan", "public", "reflexive", "relay"]),
    ],
)
def test_effective_preference_puts_nat_kinds_below_direct_above_tor(pref, expected):
    assert effective_preference(pref) == expected


# ---------------------------------------------------------------- punching


def test_the_lower_key_asks_and_both_open_the_same_window():
    cfg = PunchConfig(lead=3.0, window=12.0)
    pa, pb = PunchPlanner(A, cfg), PunchPlanner(B, cfg)
    # B (higher key) never asks
    pb.consider(A, ours=True, theirs=True, direct_ok=False, now=T0)
    assert pb.requests(T0) == []
    pa.consider(B, ours=True, theirs=True, direct_ok=False, now=T0)
    [(peer, at_ms, pid)] = pa.requests(T0)
    assert peer == B and at_ms == int((T0 + 3.0) * 1000)
    # gossip brings it to B a second later
    assert pb.requested(A, at_ms, pid, T0 + 1.0)
    assert pa.window(B, T0 + 1) == pb.window(A, T0 + 1) == (T0 + 3.0, T0 + 15.0)
    addrs = ["203.0.113.1:51820"]
    # before the window nothing is admitted; inside it the addresses are
    assert pa.admitted(B, addrs, T0 + 2.9) == [] and pb.admitted(A, addrs, T0 + 2.9) == []
    assert pa.admitted(B, addrs, T0 + 3.0) == addrs and pb.admitted(A, addrs, T0 + 3.0) == addrs
    assert pa.admitted(B, addrs, T0 + 15.0) == []
    # the same request seen again (gossip repeats) is not a new round
    assert not pb.requested(A, at_ms, pid, T0 + 2.0)


def test_no_new_round_before_the_last_one_is_judged():
    p = PunchPlanner(A, PunchConfig(lead=1.0, window=10.0))
    p.consider(B, ours=True, theirs=True, direct_ok=False, now=T0)
    [(_, _, first)] = p.requests(T0)
    # the window is over, the shell has not judged it yet: no new round
    p.consider(B, ours=True, theirs=True, direct_ok=False, now=T0 + 12)
    assert p.requests(T0 + 12) == [] and p.ended(T0 + 12) == [B]
    p.failed(B, T0 + 12)
    assert p.ended(T0 + 12) == []


def test_no_punch_without_both_reflexive_addresses_or_with_a_working_direct_path():
    p = PunchPlanner(A)
    p.consider(B, ours=True, theirs=False, direct_ok=False, now=T0)
    p.consider(B, ours=False, theirs=True, direct_ok=False, now=T0)
    p.consider(B, ours=True, theirs=True, direct_ok=True, now=T0)
    assert p.requests(T0) == [] and p.next_deadline() is None


def test_stale_or_far_future_requests_are_not_joined():
    cfg = PunchConfig(window=12.0, max_ahead=60.0)
    p = PunchPlanner(B, cfg)
    assert not p.requested(A, int((T0 - 13.0) * 1000), 1, T0)  # a replay
    assert not p.requested(A, int((T0 + 61.0) * 1000), 2, T0)  # would hold us hostage
    assert p.requested(A, int((T0 - 5.0) * 1000), 3, T0)  # late but inside the window


def test_a_failed_round_backs_off_doubling_to_the_cap():
    cfg = PunchConfig(lead=1.0, window=10.0, backoff_base=30.0, backoff_cap=100.0)
    p = PunchPlanner(A, cfg)
    now = T0
    delays = []
    for _ in range(4):
        p.consider(B, ours=True, theirs=True, direct_ok=False, now=now)
        assert p.requests(now), "a round was asked for"
        now += 11.0
        assert p.ended(now) == [B]
        p.failed(B, now)
        assert p.ended(now) == []
        start = now
        while True:
            p.consider(B, ours=True, theirs=True, direct_ok=False, now=now)
            if p.requests(now):
                break
            now += 1.0
        delays.append(now - start)
    assert delays == [30.0, 60.0, 100.0, 100.0]
    assert "punch failed" in p.explain(B, T0 + 200) or "punch in" in p.explain(B, T0 + 200)


def test_a_punched_path_is_kept_until_it_is_lost():
    p = PunchPlanner(A, PunchConfig(lead=1.0, window=10.0, backoff_base=30.0))
    p.consider(B, ours=True, theirs=True, direct_ok=False, now=T0)
    p.succeeded(B, "203.0.113.2:51820", T0 + 2)
    addrs = ["203.0.113.2:51820", "203.0.113.2:9"]
    assert p.admitted(B, addrs, T0 + 1000) == ["203.0.113.2:51820"]
    assert p.explain(B, T0 + 1000) == "punched: direct to 203.0.113.2:51820"
    p.consider(B, ours=True, theirs=True, direct_ok=False, now=T0 + 1000)
    assert p.requests(T0 + 1000) == []  # nothing to ask: it works
    p.lost(B, T0 + 1000)
    assert p.admitted(B, addrs, T0 + 1001) == []
    p.consider(B, ours=True, theirs=True, direct_ok=False, now=T0 + 1010)
    assert p.requests(T0 + 1010) == []  # not before the first backoff step
    p.consider(B, ours=True, theirs=True, direct_ok=False, now=T0 + 1030)
    assert p.requests(T0 + 1030)


def test_retain_forgets_peers_that_left():
    p = PunchPlanner(A)
    p.consider(B, ours=True, theirs=True, direct_ok=False, now=T0)
    p.retain([C])
    assert p.requests(T0) == []


# ---------------------------------------------------------------- punching against a model of NATs


class Nat:
    """A conntrack-like NAT: endpoint-independent mapping (`symmetric` False)
    or one port per destination; inbound passes only as the reply to a
    packet sent out to exactly that address (a stateful firewall)."""

    def __init__(self, public: str, symmetric: bool) -> None:
        self.public, self.symmetric = public, symmetric
        self.out: dict[str, int] = {}  # destination -> our public port
        self.next_port = 40000

    def send(self, dst: str) -> str:
        if dst not in self.out:
            if self.symmetric:
                self.next_port += 1
                self.out[dst] = self.next_port
            else:
                self.out[dst] = 51820
        return f"{self.public}:{self.out[dst]}"

    def admits(self, src: str, port: int) -> bool:
        return self.out.get(src) == port


def run_punch(symmetric_b: bool) -> tuple[bool, bool]:
    """Two NATed peers, one public observer P, a punch round between them;
    WireGuard sends a handshake every 5 s to whatever the selector admits.
    Returns (A's verdict, B's verdict): did a handshake get through?"""
    nat_a, nat_b = Nat("198.51.100.1", False), Nat("203.0.113.1", symmetric_b)
    p_addr = "192.0.2.1:51820"
    # both talk to P: P observes their mappings, they gather them
    book_a, book_b = ReflexiveBook(), ReflexiveBook()
    book_a.update(C, nat_a.send(p_addr), T0)
    book_b.update(C, nat_b.send(p_addr), T0)
    refl_a, refl_b = book_a.addresses(T0), book_b.addresses(T0)
    cfg = PunchConfig(lead=3.0, window=12.0)
    pa, pb = PunchPlanner(A, cfg), PunchPlanner(B, cfg)
    pa.consider(B, ours=bool(refl_a), theirs=bool(refl_b), direct_ok=False, now=T0)
    for peer, at_ms, pid in pa.requests(T0):
        assert peer == B
        assert pb.requested(A, at_ms, pid, T0 + 0.5)
    through = {A: False, B: False}
    t = T0
    while t < T0 + 20:
        for me, planner, mine, other_refl, theirs_nat, other in (
            (A, pa, nat_a, refl_b, nat_b, B),
            (B, pb, nat_b, refl_a, nat_a, A),
        ):
            for dst in planner.admitted(other, other_refl, t):
                src = mine.send(dst)
                port = dst.rsplit(":", 1)[1]
                if theirs_nat.admits(src, int(port)):
                    through[me] = True
        t += 5.0 if t > T0 + 3 else 3.0
    return through[A], through[B]


def test_endpoint_independent_nats_with_firewalls_are_punched():
    # the first packets die at the far firewall; the next ones are replies
    assert run_punch(symmetric_b=False) == (True, True)


def test_a_symmetric_nat_defeats_punching():
    # one observer cannot tell the NAT kinds apart: the round is tried, and fails
    assert run_punch(symmetric_b=True) == (False, False)


# ---------------------------------------------------------------- the record


class Inv:
    def __init__(self, keys):
        self._keys = frozenset(keys)

    def node_keys(self):
        return self._keys


def _rec(origin: bytes, body, key: str = ""):
    from types import SimpleNamespace

    return SimpleNamespace(kind="nat", key=key, origin=origin, body=body)


def _validate(origin, body, key=""):
    spec = records.spec("nat")
    parsed = spec.parse(body)
    spec.rules(_rec(origin, body, key), parsed, RecordContext(now=T0, inventory=Inv([A, B, C])))
    return parsed


def test_a_good_body_round_trips():
    body = nat.nat_body(
        seen=[(B, b"x" * 80)],
        punch=[(B, int(T0 * 1000), 7)],
        relay_ask=[(B, C)],
        relays=[(B, C, 40001, 40002)],
    )
    parsed = _validate(A, body)
    assert parsed.punch[0].id == 7 and parsed.relays[0].pb == 40002


@pytest.mark.parametrize(
    "body, why",
    [
        (nat.nat_body(seen=[(A, b"x")]), "its own machine"),
        (nat.nat_body(punch=[(b"\x09" * 32, 0, 1)]), "not a member"),
        (nat.nat_body(punch=[(B, int((T0 + 400) * 1000), 1)]), "future"),
        (nat.nat_body(relay_ask=[(B, A)]), "its own machine"),
    ],
)
def test_semantic_refusals(body, why):
    with pytest.raises(Refusal, match=why):
        _validate(A, body)


def test_keyed_as_another_is_refused():
    with pytest.raises(Refusal):
        _validate(A, nat.nat_body(), key="m1")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b.update(seen=[{"node": B, "addr": b""}]),
        lambda b: b.update(seen=[{"node": B, "addr": b"x" * 200}]),
        lambda b: b.update(seen=[{"node": b"short", "addr": b"x"}]),
        lambda b: b.update(punch=[{"peer": B, "at": -1, "id": 1}]),
        lambda b: b.update(relay_ask=[{"peer": B, "via": B}]),
        lambda b: b.update(relays=[{"a": C, "b": B, "pa": 1, "pb": 2}]),  # a > b
        lambda b: b.update(relays=[{"a": B, "b": C, "pa": 1, "pb": 1}]),
        lambda b: b.update(relays=[{"a": B, "b": C, "pa": 0, "pb": 2}]),
        lambda b: b.update(seen=[{"node": B, "addr": b"x"}] * 2),
        lambda b: b.update(
            seen=[{"node": i.to_bytes(32, "big"), "addr": b"x"} for i in range(257)]
        ),
        lambda b: b.update(extra=1),
        lambda b: b.pop("relays"),
    ],
)
def test_malformed_bodies_are_wire_errors(mutate):
    body = nat.nat_body()
    mutate(body)
    with pytest.raises(WireError):
        nat.parse_nat_body(body)
