"""Overlay addresses: where every machine of the clan lives inside the mesh.

Owns: the clan's IPv6 prefix, each machine's IPv6 overlay address, and the
optional IPv4 assignment from a configured range -- all as pure functions of
the clan id and the node keys, so that every node computes the same address
for every machine without asking anyone.

IPv6 (RFC 4193 style): the clan gets a ULA /48, ``fd`` followed by a 40-bit
global id taken from BLAKE2b(clan_id, person="clan-ula") instead of from a
timestamp and EUI-64 as RFC 4193 section 3.2.2 suggests -- any uniformly
random 40 bits meet the RFC's goal (unlikely to collide with another clan's
prefix), and a hash makes them reproducible everywhere.  The overlay is
subnet 0 of that /48; subnets 1..65535 stay free for later (VM networks, for
example).  The 64-bit interface id is BLAKE2b(node_key, person="clan-iid"):
64 random bits make a collision between two machines of one clan
astronomically unlikely (about n^2 / 2^65), so no coordination is needed.

Micro VMs on the clan network (`vm_ip6`) live in the same /64, with the
interface id BLAKE2b(vm name, person="clan-vm-iid"): a different hash person
than machines' (and a name, not a key, as input), so the two derivations are
independent, and the address depends only on the clan and the VM's name -- a
VM keeps its address on whichever machine runs it.

IPv4: a range has too few addresses to hash without collisions, so
`assign_ipv4` resolves them deterministically over the whole key set (see its
docstring).

Must never: read the clock, the network or any local state (every node must
get the same answer), nor hand out the network or broadcast address of the
IPv4 range, nor give two keys the same address.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable

__all__ = [
    "OverlayError",
    "AddressRangeFull",
    "clan_prefix",
    "clan_subnet",
    "overlay_ip6",
    "vm_ip6",
    "preferred_ipv4_index",
    "assign_ipv4",
]

NODE_KEY_LEN = 32
# The smallest range we accept: a /30 has two host addresses besides network
# and broadcast.  /31 and /32 (RFC 3021 point-to-point) make no sense for a clan.
_MAX_V4_PREFIXLEN = 30


class OverlayError(ValueError):
    """Base of the overlay errors; all are local (our caller passed bad input).

    Nothing here parses peer input, so there is no remote kind.
    """


class AddressRangeFull(OverlayError):
    """More machines than host addresses in the configured IPv4 range."""


def _check_key(node_key: bytes) -> None:
    if not isinstance(node_key, bytes) or len(node_key) != NODE_KEY_LEN:
        raise OverlayError(f"node key must be {NODE_KEY_LEN} bytes")


def clan_prefix(clan_id: bytes) -> ipaddress.IPv6Network:
    """The clan's ULA /48: ``fd`` + 40 bits of BLAKE2b(clan_id, person="clan-ula")."""
    if not isinstance(clan_id, bytes) or not clan_id:
        raise OverlayError("clan id must be non-empty bytes")
    global_id = hashlib.blake2b(clan_id, digest_size=5, person=b"clan-ula").digest()
    net = int.from_bytes(b"\xfd" + global_id + bytes(10), "big")
    return ipaddress.IPv6Network((net, 48))


def clan_subnet(clan_id: bytes) -> ipaddress.IPv6Network:
    """The clan's overlay /64: subnet 0 of `clan_prefix` (what the mesh interface routes)."""
    prefix = clan_prefix(clan_id)
    return ipaddress.IPv6Network((int(prefix.network_address), 64))


def overlay_ip6(clan_id: bytes, node_key: bytes) -> ipaddress.IPv6Address:
    """The machine's IPv6 overlay address: the clan /64 + BLAKE2b(node_key, person="clan-iid")."""
    _check_key(node_key)
    iid = int.from_bytes(hashlib.blake2b(node_key, digest_size=8, person=b"clan-iid").digest())
    # The all-zero id is the subnet-router anycast address (RFC 4291 2.6.1);
    # a 2^-64 event, but cheap to rule out.
    iid = iid or 1
    return clan_subnet(clan_id)[iid]


def vm_ip6(clan_id: bytes, vm_name: str) -> ipaddress.IPv6Address:
    """A VM's IPv6 overlay address: the clan /64 + BLAKE2b(vm name, person="clan-vm-iid")."""
    if not isinstance(vm_name, str) or not vm_name:
        raise OverlayError("vm name must be a non-empty str")
    iid = int.from_bytes(
        hashlib.blake2b(vm_name.encode(), digest_size=8, person=b"clan-vm-iid").digest()
    )
    return clan_subnet(clan_id)[iid or 1]  # never the subnet-router anycast address


def _host_range(network: ipaddress.IPv4Network) -> int:
    """How many host offsets (1 .. n) the range has, network/broadcast excluded."""
    return network.num_addresses - 2


def _parse_range(v4range: str | ipaddress.IPv4Network) -> ipaddress.IPv4Network:
    try:
        network = ipaddress.IPv4Network(v4range)
    except (ValueError, TypeError) as exc:
        raise OverlayError(f"bad IPv4 overlay range {v4range!r}: {exc}") from None
    if network.prefixlen > _MAX_V4_PREFIXLEN:
        raise OverlayError(
            f"IPv4 overlay range {network} is too small (need /{_MAX_V4_PREFIXLEN} or larger)"
        )
    return network


def _preferred(hosts: int, node_key: bytes) -> int:
    # 64 bits modulo at most 2^30 hosts: the modulo bias is below 2^-34.
    h = int.from_bytes(hashlib.blake2b(node_key, digest_size=8, person=b"clan-ipv4").digest())
    return 1 + h % hosts


def preferred_ipv4_index(v4range: str | ipaddress.IPv4Network, node_key: bytes) -> int:
    """The host offset (1 .. size-2) a key would get if nobody else wanted it."""
    _check_key(node_key)
    return _preferred(_host_range(_parse_range(v4range)), node_key)


def assign_ipv4(
    v4range: str | ipaddress.IPv4Network, node_keys: Iterable[bytes]
) -> dict[bytes, ipaddress.IPv4Address]:
    """IPv4 overlay addresses for a set of machines, the same on every node.

    Each key hashes to a preferred host offset.  Keys are taken in the order
    (preferred offset, key) -- a total order that does not depend on how the
    caller listed them -- and each gets its preferred offset, or on a
    collision the next free one upwards, wrapping past the broadcast address
    to offset 1 (linear probing).  Network and broadcast addresses are never
    handed out.

    Stability: when a key joins whose preferred offset was free, nobody else
    moves (the others' probes never stopped at that free offset).  When it was
    taken, only keys of the run of consecutive taken offsets starting there
    (the collision chain) can move, and only to another offset of that chain
    or to the first free offset after it.  With n machines in a
    range of N hosts that happens with probability about n/N per join.

    Raises AddressRangeFull when there are more keys than host addresses.
    """
    network = _parse_range(v4range)
    hosts = _host_range(network)
    keys = set(node_keys)
    for key in keys:
        _check_key(key)
    if len(keys) > hosts:
        raise AddressRangeFull(
            f"IPv4 overlay range {network} has {hosts} host addresses for {len(keys)} machines"
        )
    base = int(network.network_address)
    taken: set[int] = set()
    out: dict[bytes, ipaddress.IPv4Address] = {}
    for pref, key in sorted((_preferred(hosts, k), k) for k in keys):
        offset = pref
        while offset in taken:
            offset = offset % hosts + 1  # hosts -> 1 skips the broadcast and network offsets
        taken.add(offset)
        out[key] = ipaddress.IPv4Address(base + offset)
    return out
