"""Where each peer machine can be reached: candidates from every source.

Owns: the `endpoints` record a node publishes about itself (its LAN and
public addresses, WireGuard port and sealed onion address) and turning the
inventory, those records and LAN discovery into `Candidate`s per machine.
Must never: put an onion address in the clear into a record, or make a
candidate for a machine that is not in the inventory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..limits import MAX_SEALED
from ..wire import Record, WireError, record_type
from .paths import Candidate

__all__ = [
    "ENDPOINTS_KIND",
    "EndpointsBody",
    "endpoints_body",
    "parse_endpoints_body",
    "collect",
]

ENDPOINTS_KIND = "endpoints"
MAX_ADDRS = 32


def endpoints_body(
    lan: Iterable[str],
    public: Iterable[str],
    wg_port: int | None,
    sealed_onion: bytes = b"",
) -> dict[str, Any]:
    """The body of our own `endpoints` record."""
    return {
        "lan": sorted(set(lan))[:MAX_ADDRS],
        "public": sorted(set(public))[:MAX_ADDRS],
        "wg_port": wg_port or 0,
        "onion": sealed_onion,
    }


@record_type
@dataclass(frozen=True, slots=True)
class EndpointsBody(Record):
    """The schema of an `endpoints` record body (checked by the wire record engine)."""

    KIND: ClassVar[str] = ENDPOINTS_KIND
    lan: list[str]
    public: list[str]
    wg_port: int
    onion: bytes  # sealed to every member (148 bytes each): sized for the target clan

    def __post_init__(self) -> None:
        for name in ("lan", "public"):
            addrs = getattr(self, name)
            if len(addrs) > MAX_ADDRS:
                raise WireError(f"body.{name}: more than {MAX_ADDRS} addresses")
            if any(len(a) > 300 or ":" not in a for a in addrs):
                raise WireError(f"body.{name}: bad address")
        if not 0 <= self.wg_port < 65536:
            raise WireError("body.wg_port: expected 0..65535")
        if len(self.onion) > MAX_SEALED:
            raise WireError("body.onion: expected sealed bytes")


def parse_endpoints_body(body: Any) -> dict[str, Any]:
    """Check a peer's `endpoints` record body (`EndpointsBody`); the body
    itself when it passes, WireError when malformed."""
    EndpointsBody.from_wire(body, path="body")
    return body


def collect(
    doc: Mapping[str, Any],
    *,
    self_key: bytes,
    records: Mapping[bytes, Mapping[str, Any]],
    opened_inventory: Mapping[str, list[str]],
    lan_seen: Mapping[bytes, Iterable[str]],
    onions: Mapping[bytes, str],
    reflexive: Mapping[bytes, Iterable[str]] | None = None,
    relayed: Mapping[bytes, Iterable[tuple[str, str]]] | None = None,
) -> dict[bytes, list[Candidate]]:
    """Candidates per peer node key, from every source we have.

    `records`: node key -> parsed endpoints body (gossip); `opened_inventory`:
    machine name -> endpoints from the inventory (sealed, already opened);
    `lan_seen`: node key -> addresses found by mDNS; `onions`: node key ->
    onion host:port (opened from the sealed record field); `reflexive`: node
    key -> the peer's NAT mappings of its WireGuard socket that we may use
    now (mesh/nat.py: opened, and admitted by the punch planner); `relayed`:
    node key -> (relay address, relay name) granted for us (mesh/relay.py).
    """
    out: dict[bytes, list[Candidate]] = {}
    for name, m in sorted(doc.get("machines", {}).items()):
        key = m["node_key"]
        if key == self_key:
            continue
        rec = records.get(key)
        wg_port = rec["wg_port"] if rec and rec["wg_port"] else None
        cands: list[Candidate] = []
        for addr in lan_seen.get(key, ()):
            cands.append(Candidate(key, "lan", addr, "mdns", wg_port))
        if rec:
            cands += [Candidate(key, "lan", a, "gossip", wg_port) for a in rec["lan"]]
            cands += [Candidate(key, "public", a, "gossip", wg_port) for a in rec["public"]]
        for addr in opened_inventory.get(name, []) + list(m.get("endpoints", [])):
            cands.append(Candidate(key, "public", addr, "inventory", wg_port))
        for addr in (reflexive or {}).get(key, ()):
            port = int(addr.rpartition(":")[2])
            cands.append(Candidate(key, "reflexive", addr, "nat", port))
        for addr, via in (relayed or {}).get(key, ()):
            port = int(addr.rpartition(":")[2])
            cands.append(Candidate(key, "relay", addr, "relay", port, via=via))
        if key in onions:
            cands.append(Candidate(key, "tor", onions[key], "tor", None))
        # One address is one path: a public endpoint that the peer also lists
        # as a LAN address is that LAN path (probes and their verdicts are
        # per address, so two kinds of one address would split them).
        lan_addrs = {c.address for c in cands if c.kind == "lan"}
        out[key] = [c for c in cands if c.kind != "public" or c.address not in lan_addrs]
    return out
