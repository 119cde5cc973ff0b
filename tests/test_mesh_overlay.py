"""Overlay addressing: pinned vectors, uniqueness, and the IPv4 assignment rules."""

from __future__ import annotations

import hashlib
import ipaddress
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clanagent.mesh.overlay import (
    AddressRangeFull,
    OverlayError,
    assign_ipv4,
    clan_prefix,
    clan_subnet,
    overlay_ip6,
    preferred_ipv4_index,
)

ULA = ipaddress.IPv6Network("fd00::/8")
KEY0 = bytes(32)
KEY_SEQ = bytes(range(32))
KEY_FF = b"\xff" * 32

keys_st = st.binary(min_size=32, max_size=32)


# Pinned: a change here changes every machine's address in every clan, which
# breaks running meshes.  Only change these with a migration plan.
def test_pinned_vectors() -> None:
    assert clan_prefix(b"clan-one") == ipaddress.IPv6Network("fd37:2326:4e9b::/48")
    assert clan_subnet(b"clan-one") == ipaddress.IPv6Network("fd37:2326:4e9b::/64")
    assert clan_prefix(bytes(16)) == ipaddress.IPv6Network("fd71:25cd:6c4e::/48")
    assert overlay_ip6(b"clan-one", KEY0) == ipaddress.IPv6Address(
        "fd37:2326:4e9b:0:a6b6:376:3f7a:7036"
    )
    assert overlay_ip6(b"clan-one", KEY_SEQ) == ipaddress.IPv6Address(
        "fd37:2326:4e9b:0:4e87:a84e:8440:20dc"
    )
    assert assign_ipv4("100.64.0.0/16", [KEY0, KEY_SEQ, KEY_FF]) == {
        KEY0: ipaddress.IPv4Address("100.64.159.240"),
        KEY_SEQ: ipaddress.IPv4Address("100.64.128.208"),
        KEY_FF: ipaddress.IPv4Address("100.64.186.213"),
    }


def test_prefix_follows_the_documented_construction() -> None:
    # fd + the first 40 bits of BLAKE2b(clan_id, person="clan-ula"), subnet 0.
    gid = hashlib.blake2b(b"c", digest_size=5, person=b"clan-ula").digest()
    assert clan_prefix(b"c").network_address.packed[:6] == b"\xfd" + gid
    assert clan_subnet(b"c").network_address.packed[6:8] == b"\x00\x00"


def test_iid_is_the_documented_hash() -> None:
    iid = hashlib.blake2b(KEY_FF, digest_size=8, person=b"clan-iid").digest()
    assert overlay_ip6(b"c", KEY_FF).packed[8:] == iid


@given(clan=st.binary(min_size=1, max_size=64), key=keys_st)
def test_overlay_is_inside_the_clan_ula(clan: bytes, key: bytes) -> None:
    prefix = clan_prefix(clan)
    subnet = clan_subnet(clan)
    assert prefix.prefixlen == 48 and subnet.prefixlen == 64
    assert prefix.subnet_of(ULA) and subnet.subnet_of(prefix) and subnet.subnet_of(ULA)
    addr = overlay_ip6(clan, key)
    assert addr in subnet
    assert addr != subnet.network_address  # never the all-zero interface id


def test_different_clans_get_different_prefixes() -> None:
    prefixes = {clan_prefix(i.to_bytes(4, "big")) for i in range(2000)}
    assert len(prefixes) == 2000


def test_distinct_nodes_get_distinct_addresses() -> None:
    rng = random.Random(5)
    keys = {rng.randbytes(32) for _ in range(5000)}
    assert len({overlay_ip6(b"clan", k) for k in keys}) == len(keys)
    assigned = assign_ipv4("100.64.0.0/16", keys)
    assert len(set(assigned.values())) == len(keys)


@pytest.mark.parametrize("bad", [b"", b"x" * 31, b"x" * 33, "x" * 32])
def test_bad_keys_are_refused(bad: object) -> None:
    with pytest.raises(OverlayError):
        overlay_ip6(b"clan", bad)  # type: ignore[arg-type]
    with pytest.raises(OverlayError):
        assign_ipv4("10.0.0.0/24", [bad])  # type: ignore[list-item]


@pytest.mark.parametrize("bad", ["10.0.0.0/31", "10.0.0.1/32", "10.0.0.1/24", "fd00::/64", "nope"])
def test_bad_ranges_are_refused(bad: str) -> None:
    with pytest.raises(OverlayError):
        assign_ipv4(bad, [KEY0])


def test_empty_clan_id_is_refused() -> None:
    with pytest.raises(OverlayError):
        clan_prefix(b"")


@settings(max_examples=200)
@given(
    keys=st.sets(keys_st, max_size=30),
    seed=st.integers(0, 2**32),
    rng_range=st.sampled_from(["10.9.0.0/26", "10.9.0.0/27", "100.64.0.0/16"]),
)
def test_ipv4_is_deterministic_under_any_order(keys: set[bytes], seed: int, rng_range: str) -> None:
    listed = sorted(keys)
    shuffled = list(listed) * 2  # duplicates too
    random.Random(seed).shuffle(shuffled)
    a = assign_ipv4(rng_range, listed)
    assert a == assign_ipv4(rng_range, shuffled)
    assert a == assign_ipv4(ipaddress.IPv4Network(rng_range), iter(reversed(listed)))
    assert set(a) == keys
    assert len(set(a.values())) == len(keys)


@settings(max_examples=200)
@given(keys=st.sets(keys_st, min_size=1, max_size=6))
def test_tiny_range_resolves_collisions_and_skips_network_and_broadcast(keys: set[bytes]) -> None:
    # A /29 has 6 host addresses: with up to 6 keys collisions are frequent.
    net = ipaddress.IPv4Network("192.0.2.8/29")
    a = assign_ipv4(net, keys)
    addrs = set(a.values())
    assert len(addrs) == len(keys)
    assert all(x in net for x in addrs)
    assert net.network_address not in addrs and net.broadcast_address not in addrs


def test_collisions_actually_happen_and_are_resolved() -> None:
    # Find keys that share a preferred index in a /30 (2 hosts) so the test
    # really exercises the probe, instead of hoping hypothesis finds one.
    rng = random.Random(1)
    by_pref: dict[int, list[bytes]] = {}
    while not any(len(v) >= 2 for v in by_pref.values()):
        k = rng.randbytes(32)
        by_pref.setdefault(preferred_ipv4_index("10.0.0.0/30", k), []).append(k)
    pref, (k1, k2) = next((p, v[:2]) for p, v in by_pref.items() if len(v) >= 2)
    a = assign_ipv4("10.0.0.0/30", [k2, k1])
    lo, hi = sorted((k1, k2))
    # The smaller key wins its preferred offset; the other takes the next,
    # wrapping from offset 2 to offset 1 (never .0 or .3).
    assert a[lo] == ipaddress.IPv4Address(f"10.0.0.{pref}")
    assert a[hi] == ipaddress.IPv4Address(f"10.0.0.{pref % 2 + 1}")


def test_a_full_range_raises_a_clear_error() -> None:
    rng = random.Random(2)
    keys = [rng.randbytes(32) for _ in range(7)]
    assert len(assign_ipv4("192.0.2.8/29", keys[:6])) == 6  # exactly full is fine
    with pytest.raises(
        AddressRangeFull, match=r"192\.0\.2\.8/29 has 6 host addresses for 7 machines"
    ):
        assign_ipv4("192.0.2.8/29", keys)


def _chain(
    old: dict[bytes, ipaddress.IPv4Address], net: ipaddress.IPv4Network, start: int
) -> set[int]:
    """Offsets of the run of consecutive taken offsets beginning at `start` (wrapping)."""
    hosts = net.num_addresses - 2
    taken = {int(a) - int(net.network_address) for a in old.values()}
    run: set[int] = set()
    off = start
    while off in taken and off not in run:
        run.add(off)
        off = off % hosts + 1
    return run


@pytest.mark.parametrize(
    ("v4range", "size"), [("100.64.0.0/16", 200), ("10.1.0.0/24", 60), ("10.2.0.0/28", 9)]
)
def test_a_join_moves_nobody_outside_its_collision_chain(v4range: str, size: int) -> None:
    net = ipaddress.IPv4Network(v4range)
    rng = random.Random(v4range)
    moved_total = 0
    joins_into_chain = 0
    trials = 300
    for _ in range(trials):
        keys = [rng.randbytes(32) for _ in range(size)]
        newcomer = rng.randbytes(32)
        old = assign_ipv4(net, keys)
        new = assign_ipv4(net, [*keys, newcomer])
        moved = {k for k in keys if old[k] != new[k]}
        pref = preferred_ipv4_index(net, newcomer)
        chain = _chain(old, net, pref)
        if not chain:
            # Preferred offset was free: the newcomer takes it, nobody moves.
            assert moved == set()
            assert int(new[newcomer]) - int(net.network_address) == pref
        else:
            joins_into_chain += 1
            # Only members of the chain may move, and only within the chain
            # grown by one offset (the first free one after it).
            hosts = net.num_addresses - 2
            grown = chain | {(max(chain, key=lambda o: (o - pref) % hosts)) % hosts + 1}
            for k in moved:
                assert int(old[k]) - int(net.network_address) in chain
                assert int(new[k]) - int(net.network_address) in grown
        moved_total += len(moved)
    if size / (net.num_addresses - 2) < 0.01:
        # A sparse range (200 of 65534): joins into a chain are rare.
        assert joins_into_chain < trials * 0.02
    else:
        # Dense ranges must have exercised the chain branch.
        assert joins_into_chain > 0
    assert moved_total <= joins_into_chain * size


def test_a_leave_moves_nobody_when_it_was_not_in_a_chain() -> None:
    net = ipaddress.IPv4Network("10.3.0.0/20")
    rng = random.Random(3)
    for _ in range(100):
        keys = [rng.randbytes(32) for _ in range(50)]
        old = assign_ipv4(net, keys)
        leaver = keys.pop()
        new = assign_ipv4(net, keys)
        off = int(old[leaver]) - int(net.network_address)
        neighbours = _chain({k: v for k, v in old.items() if k != leaver}, net, off % 4094 + 1)
        if not neighbours:
            assert all(old[k] == new[k] for k in keys)
