"""The mesh's desired WireGuard peers, from the inventory and what we heard.

Owns: `plan_peers`, the reconcile step's decision -- every other machine of
the inventory becomes one `MeshPeer` (its WireGuard key, overlay addresses,
the direct endpoint the path selector chose for it, and the overlay
addresses of the micro VMs it hosts), computed from the inventory document,
the peers' `endpoints` records, LAN sightings, opened onion addresses, the
`vm-status` records, the machines the membership knows to be gone, and the
NAT paths (reflexive addresses the punch planner admits, relays granted).
Must never: do I/O, read a clock (`now` is given) or touch any state but
the `PathSelector` it is handed (whose path memory is the input the
previous rounds left); the trio shell (`service.py`) gathers the inputs
and applies the result to the interface.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import split_hostport
from ..inventory.select import path_preference
from . import candidates as cands
from .nat import effective_preference
from .overlay import assign_ipv4, overlay_ip6
from .paths import Candidate, PathSelector
from .vmroutes import vm_routes
from .wireguard import MeshPeer

__all__ = ["PeerPlan", "join_host_port", "plan_peers"]


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _wg_endpoint(chosen: Candidate | None) -> str | None:
    """A direct path's host with the peer's WireGuard port; None for Tor or no port.

    A reflexive or relay address is already where WireGuard must send."""
    if chosen is not None and chosen.kind in ("reflexive", "relay"):
        return chosen.address
    if chosen is None or chosen.kind not in ("lan", "public") or not chosen.port_wg:
        return None
    host, _ = split_hostport(chosen.address, "address")
    return join_host_port(host, chosen.port_wg)


def _working(selector: PathSelector, key: bytes, now: float, roamed: bool) -> Candidate | None:
    """The chosen path when it is not known to be failing, else None: "no
    opinion", so WireGuard keeps the address the peer's own authenticated
    packets last came from (behind a NAT, the only one that works) instead
    of being sent back to a path our probes found dead.  When WireGuard
    holds a live session (`roamed`), an unproven path (no RTT measured yet)
    does not replace it either: it takes over once a probe proved it."""
    chosen = selector.choose(key, now)
    if chosen is None or not selector.healthy(key, chosen):
        return None
    if roamed and chosen.kind in ("lan", "public") and selector.rtt(key, chosen) is None:
        return None
    return chosen


@dataclass(frozen=True)
class PeerPlan:
    """What one reconcile round wants."""

    peers: tuple[MeshPeer, ...]  # every other machine, sorted by node key
    overlay4: ipaddress.IPv4Address | None  # our own, when mesh.ipv4_range assigns one
    # Node key -> the candidates the selector was given (for probes).
    candidates: dict[bytes, list[Candidate]] = field(default_factory=dict)


def plan_peers(
    doc: Mapping[str, Any],
    clan_id: bytes,
    self_key: bytes,
    selector: PathSelector,
    now: float,
    *,
    endpoints: Mapping[bytes, Mapping[str, Any]],
    vm_status: Iterable[tuple[bytes, str, Any]] = (),
    gone: frozenset[bytes] = frozenset(),
    ipv4_range: str = "",
    opened_inventory: Mapping[str, list[str]] | None = None,
    lan_seen: Mapping[bytes, Iterable[str]] | None = None,
    onions: Mapping[bytes, str] | None = None,
    reflexive: Mapping[bytes, Iterable[str]] | None = None,
    relayed: Mapping[bytes, Iterable[tuple[str, str]]] | None = None,
    live: frozenset[bytes] = frozenset(),
) -> PeerPlan:
    """The desired peers of this machine (`self_key`) in clan `clan_id`.

    `endpoints`: node key -> parsed `endpoints` record body; `vm_status`:
    (origin, key, body) of `vm-status` records; `gone`: node keys the
    membership holds dead or left (their VM routes lapse); `live`: node keys
    WireGuard has a fresh session with; `now` is the selector's (monotonic)
    clock."""
    by_key = {m["node_key"]: (name, m) for name, m in doc["machines"].items()}
    all_cands = cands.collect(
        doc,
        self_key=self_key,
        records=endpoints,
        opened_inventory=opened_inventory or {},
        lan_seen=lan_seen or {},
        onions=onions or {},
        reflexive=reflexive,
        relayed=relayed,
    )
    v4 = assign_ipv4(ipv4_range, list(by_key)) if ipv4_range else {}
    vms = vm_routes(dict(doc), clan_id, vm_status, gone)
    peers: list[MeshPeer] = []
    for key, (name, m) in sorted(by_key.items()):
        if key == self_key:
            continue
        found = all_cands.get(key, [])
        selector.set_candidates(
            key,
            found,
            effective_preference(path_preference(dict(doc), name)),
            bool(m["public"]),
            now,
        )
        peers.append(
            MeshPeer(
                m["wg_key"],
                overlay_ip6(clan_id, key),
                v4.get(key),
                _wg_endpoint(_working(selector, key, now, key in live)),
                tuple(vms.get(key, ())),
            )
        )
    return PeerPlan(tuple(peers), v4.get(self_key), all_cands)
