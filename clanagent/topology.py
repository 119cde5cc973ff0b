"""The clan's topology: which machine reaches which, over what kind of path, how fast.

Owns: this machine's view of its links (to every other machine of the
inventory: path kind lan / public / reflexive / relay / tor / other / down and the round-trip
time), the `topology` record that carries what of that view the rest of
the clan cannot learn elsewhere (and a summary of this machine's
capabilities), and the clan-wide map the `topology` control method returns
(machines, links, services and VMs per machine).

The record is small and constant-sized in a uniform clan: the kind most of
our up links have plus the links that differ from it.  Which machines are
up is left out (every reader's membership tells, and a crash would
otherwise make every machine republish), and so are RTTs (jitter would
republish; the map shows the RTTs the viewing machine measures itself).
Its refresh stretches with the clan (`refresh_for`), so the clan as a
whole republishes unchanged views at a bounded rate.

Must never: publish more often than the view really changes for its
readers (a link's kind, a capability: not up/down, not RTT jitter),
publish faster than the kind's min_interval (records.py), trust a peer's
record beyond display (it is shown, never acted on), fail the caller
because one record is malformed, or reach into another part: it reads the
rest of the agent through its ports (clanagent.ports) and the callables it
is given (machine rows, VM rows, capability rows, the current path kind to
a machine).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import trio

from ._log import kv
from .limits import TARGET_MACHINES
from .publish_policy import PublishPolicy
from .wire import Record, WireError, record_type

if TYPE_CHECKING:
    from .ports import Ports

__all__ = [
    "TOPOLOGY_KIND",
    "LINK_KINDS",
    "TopologyBody",
    "parse_body",
    "UP_KINDS",
    "TopologyService",
    "classify_addr",
    "compact_links",
    "expand_links",
    "merge_links",
    "min_interval_for",
    "refresh_for",
]

log = logging.getLogger("clanagent.topology")

TOPOLOGY_KIND = "topology"
LINK_KINDS = ("lan", "public", "reflexive", "relay", "tor", "other", "down")
UP_KINDS = LINK_KINDS[:-1]
CHECK_INTERVAL = 3.0  # seconds between looks at our own links
# The topology kind's cadence (the registry in records.py takes it from
# here): never two publications within MIN_INTERVAL (plus up to MIN_JITTER
# of it) -- and never two within PER_MACHINE seconds per machine of the
# clan, so the whole clan publishes at most 1 / PER_MACHINE changed views a
# second however big it grows.  (At N=100 with a 2 s floor, a membership
# flapping under CPU starvation made every machine republish its O(N)-sized
# view every 2 s: 480 MB of records sent by one agent in 16 minutes.)
MIN_INTERVAL = 2.0
PER_MACHINE = 0.5
# An unchanged view goes out again every REFRESH seconds -- stretched to
# REFRESH_PER_MACHINE seconds per machine of the clan, at most MAX_REFRESH
# (minus up to REFRESH_JITTER of it) -- so the clan refreshes at most one
# view every REFRESH_PER_MACHINE seconds up to TARGET_MACHINES machines.
REFRESH = 300.0
REFRESH_PER_MACHINE = 10.0
MAX_REFRESH = REFRESH_PER_MACHINE * TARGET_MACHINES
# A peer's view lives this long after its last refresh (the kind's TTL,
# three of the longest refreshes); views of machines the reader sees down
# are not shown anyway.
STALE = 3 * MAX_REFRESH
MAX_LINKS = TARGET_MACHINES  # exceptions in one record (the rest show the default kind)
MAX_CAPS = 32
FUTURE_SKEW = 300  # a view dated further ahead than this is ignored (records.MAX_FUTURE_SKEW)


# -- the record body (records.py registers it; readers parse with `parse_body`)


@dataclass(frozen=True, slots=True)
class TopologyLink(Record):
    """An up link whose kind differs from the view's default."""

    peer: str
    kind: str

    def __post_init__(self) -> None:
        if not 0 < len(self.peer) <= 255:
            raise WireError("peer: expected a machine name")
        if self.kind not in UP_KINDS:
            raise WireError(f"kind: expected one of {', '.join(UP_KINDS)}")


@dataclass(frozen=True, slots=True)
class Capability(Record):
    """One capability of the publishing machine, as `clanctl status` shows it."""

    name: str
    available: bool
    reason: str

    def __post_init__(self) -> None:
        if len(self.name) > 64:
            raise WireError("name: expected a short str")
        if len(self.reason) > 300:
            raise WireError("reason: expected a str of at most 300")


@record_type
@dataclass(frozen=True, slots=True)
class TopologyBody(Record):
    """A machine's links as it publishes them (key "")."""

    KIND: ClassVar[str] = "topology"
    at: int  # unix seconds of the publication
    kind: str  # the kind most of its up links have; "" when none is up
    links: list[TopologyLink]  # the up links of another kind
    capabilities: list[Capability]

    def __post_init__(self) -> None:
        if not 0 <= self.at < 2**63:
            raise WireError("at: expected a unix time")
        if self.kind and self.kind not in UP_KINDS:
            raise WireError(f"kind: expected one of {', '.join(UP_KINDS)} or empty")
        if len(self.links) > MAX_LINKS:
            raise WireError(f"links: expected at most {MAX_LINKS}")
        if len(self.capabilities) > MAX_CAPS:
            raise WireError(f"capabilities: expected at most {MAX_CAPS}")


def parse_body(body: Any) -> TopologyBody:
    """A topology record's body, checked field by field; WireError when malformed."""
    return TopologyBody.from_wire(body, path="body")


def min_interval_for(machines: int) -> float:
    """Seconds between two publications of our view in a clan of `machines`."""
    return max(MIN_INTERVAL, PER_MACHINE * machines)


def check_interval_for(machines: int) -> float:
    """Seconds between two looks at our own links in a clan of `machines`:
    a tenth of the shortest time between two publications (a look costs
    O(machines), and a change could not go out sooner anyway); member
    changes wake the publisher at once whatever this is."""
    return max(CHECK_INTERVAL, min_interval_for(machines) / 10)


def refresh_for(machines: int) -> float:
    """Seconds between two publications of an unchanged view in a clan of `machines`."""
    return min(MAX_REFRESH, max(REFRESH, REFRESH_PER_MACHINE * machines))


@functools.lru_cache(maxsize=4096)
def classify_addr(addr: str) -> str:
    """lan / public / tor / other for a gossip HOST:PORT address (cached:
    every look at our links classifies every member's address)."""
    host = addr.rpartition(":")[0].strip("[]") if ":" in addr else addr
    if host.endswith(".onion"):
        return "tor"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "other"
    if ip.is_loopback or ip.is_private or ip.is_link_local:
        return "lan"
    return "public"


def _bucket(rtt_ms: float | None) -> int | None:
    # Half powers of two.
    if rtt_ms is None or rtt_ms <= 0:
        return None
    return int(math.floor(math.log2(max(rtt_ms, 0.05)) * 2))


def coarse_rtt(rtt_ms: float | None) -> float | None:
    """The RTT as shown: its half-power-of-two bucket's lower bound, rounded
    up to 3 significant digits (so it stays in the bucket)."""
    b = _bucket(rtt_ms)
    if b is None:
        return None
    v = 2.0 ** (b / 2)
    q = 10.0 ** (2 - math.floor(math.log10(v)))
    return math.ceil(v * q) / q


def compact_links(links: list[dict[str, Any]]) -> tuple[str, list[dict[str, str]]]:
    """Our links as published: the kind most up links have ("" when none is
    up; ties go to the first in UP_KINDS) and the up links of another kind,
    by peer name, at most MAX_LINKS.  Down links are left out."""
    up = [link for link in links if link["kind"] in UP_KINDS]
    if not up:
        return "", []
    counts = Counter(link["kind"] for link in up)
    default = max(UP_KINDS, key=lambda k: (counts[k], -UP_KINDS.index(k)))
    other = sorted(
        ({"peer": link["peer"], "kind": link["kind"]} for link in up if link["kind"] != default),
        key=lambda link: link["peer"],
    )
    return default, other[:MAX_LINKS]


def expand_links(
    default: str, exceptions: list[dict[str, str]], origin: str, machines: list[str]
) -> list[dict[str, Any]]:
    """A peer's published links as link rows to every machine of `machines`
    (but itself): the exception's kind, else the default; none when it had no
    up link.  No RTT (the record carries none)."""
    if not default:
        return []
    kinds = {link["peer"]: link["kind"] for link in exceptions}
    return [
        {"peer": m, "kind": kinds.get(m, default), "rtt_ms": None} for m in machines if m != origin
    ]


def merge_links(views: dict[str, list[dict[str, Any]]], online: set[str]) -> list[dict[str, Any]]:
    """One edge per pair of machines from both ends' views.

    `views`: machine -> its links ({peer, kind, rtt_ms}); `online`: the
    machines we see online.  An edge is up when either end reports it up
    and both ends are online; its kind comes from the end that reports it
    up (the one whose name sorts first when both do), its RTT from the
    first of those that measured one (only the viewing machine does).
    """
    pairs: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for src in sorted(views):
        for link in views[src]:
            dst = link["peer"]
            if dst == src:
                continue
            a, b = sorted((src, dst))
            pairs.setdefault((a, b), {})[src] = link
    edges = []
    for (a, b), seen in sorted(pairs.items()):
        up = [seen[m] for m in sorted(seen) if seen[m]["kind"] != "down"]
        if up and a in online and b in online:
            kind = up[0]["kind"]
            rtt = next((u["rtt_ms"] for u in up if u["rtt_ms"] is not None), None)
        else:
            kind, rtt = "down", None
        edges.append(
            {
                "a": a,
                "b": b,
                "kind": kind,
                "rtt_ms": rtt,
                "seen_by": {m: {"kind": v["kind"], "rtt_ms": v["rtt_ms"]} for m, v in seen.items()},
            }
        )
    return edges


Rows = Callable[[], list[dict[str, Any]]]


def _nothing() -> list[dict[str, Any]]:
    return []


class TopologyService:
    """Publishes this machine's links and answers the clan-wide map.

    `name`: ours when the inventory does not name us; `machines`: the
    inventory's machines as `clanctl machine list` rows (name, node_id,
    tags, state, online, services); `vms`: the clan's VMs as `clanctl vm
    list` rows; `capabilities`: ours as `clanctl status` rows;
    `path_kind(node_key)`: the kind of the path the mesh uses to that
    machine now (lan / public / reflexive / relay / tor / other), or None when it has none
    (the gossip address then says). Once it runs, it wakes on membership
    and inventory changes, so a link going down goes out as soon as
    min_interval allows, not at the next check."""

    def __init__(
        self,
        ports: Ports,
        *,
        name: str = "",
        machines: Rows = _nothing,
        vms: Rows = _nothing,
        capabilities: Rows = _nothing,
        path_kind: Callable[[bytes], str | None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.ports = ports
        self.name = name
        self._machines = machines
        self._vms = vms
        self._capability_rows = capabilities
        self._path_kind = path_kind
        self.policy = PublishPolicy(
            min_interval=MIN_INTERVAL, refresh=REFRESH, rng=rng or random.Random()
        )
        self.stats = {"published": 0, "held": 0, "bad_records": 0}
        self._check_every = CHECK_INTERVAL
        self._wakeup = trio.Event()
        # machine name -> node id for the inventory doc it was computed from
        # (a doc is never changed in place): hashed once per inventory
        self._ids_doc: Any = None
        self._ids: dict[str, str] = {}

    def _node_ids(self, doc: Any) -> dict[str, str]:
        if self._ids_doc is not doc:
            from .identity import node_id_of

            self._ids = {name: node_id_of(m["node_key"]) for name, m in doc["machines"].items()}
            self._ids_doc = doc
        return self._ids

    # -- our own view ----------------------------------------------------------------

    def local_links(self) -> list[dict[str, Any]]:
        inv = self.ports.inventory.inventory
        if inv is None:
            return []
        ids = self._node_ids(inv.doc)
        members = {m["node_id"]: m for m in self.ports.members.rows()}
        mine = self.ports.identity.public_key
        links = []
        for name, m in sorted(inv.doc["machines"].items()):
            key = m["node_key"]
            if key == mine:
                continue
            member = members.get(ids[name])
            if member is None or member["state"] not in ("alive", "suspect"):
                links.append({"peer": name, "kind": "down", "rtt_ms": None})
                continue
            kind = None if self._path_kind is None else self._path_kind(key)
            if kind not in LINK_KINDS:
                kind = classify_addr(str(member.get("addr") or ""))
            rtt = member.get("rtt_ms")
            links.append({"peer": name, "kind": kind, "rtt_ms": rtt})
        return links

    def _capabilities(self) -> list[dict[str, Any]]:
        try:
            caps = self._capability_rows()
        except Exception:  # a part mid-start: report nothing rather than fail
            return []
        return [
            {"name": c["name"], "available": bool(c["available"]), "reason": str(c["reason"])[:300]}
            for c in caps[:MAX_CAPS]
        ]

    def _body(self) -> dict[str, Any]:
        default, exceptions = compact_links(self.local_links())
        return {
            "at": int(self.ports.clock.wall()),
            "kind": default,
            "links": exceptions,
            "capabilities": self._capabilities(),
        }

    @staticmethod
    def _shape(body: dict[str, Any]) -> Any:
        """What readers act on: the kinds of the links and the capabilities (not `at`)."""
        return (
            body["kind"],
            [(link["peer"], link["kind"]) for link in body["links"]],
            [(c["name"], c["available"], c["reason"]) for c in body["capabilities"]],
        )

    async def publish_once(self) -> bool:
        inv = self.ports.inventory.inventory
        if inv is None:
            return False
        n = len(inv.doc["machines"])
        self._check_every = check_interval_for(n)
        self.policy.min_interval = min_interval_for(n)
        self.policy.refresh = refresh_for(n)
        body = self._body()
        now = self.ports.clock.now()
        shape = self._shape(body)
        if not self.policy.due(now, shape):
            if self.policy.hold_until is not None:
                self.stats["held"] += 1
            return False
        # an unchanged view only renews its TTL: anti-entropy carries it
        await self.ports.bus.publish(TOPOLOGY_KIND, "", body, push=not self.policy.refresh_only)
        self.policy.published(now, shape)
        self.stats["published"] += 1
        return True

    def counters(self) -> dict[str, int]:
        return dict(self.stats)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # Only the running publisher listens (a service built just to answer
        # `view()` must leave no handler behind).
        self.ports.members.subscribe(self.wake)
        self.ports.inventory.subscribe(lambda _inv: self.wake())
        task_status.started(self)
        while True:
            try:
                await self.publish_once()
            except Exception as exc:  # never fatal: the next round tries again
                log.warning("could not publish the topology", extra=kv(error=exc))
            wait = self._check_every
            held = self.policy.hold_until
            if held is not None:
                # a change waits for min_interval: publish it as soon as it may go
                wait = min(wait, max(0.0, held - self.ports.clock.now()))
            with trio.move_on_after(wait):
                await self._wakeup.wait()
            self._wakeup = trio.Event()

    def wake(self) -> None:
        """Look at our links now (a member changed state), not at the next check."""
        self._wakeup.set()

    # -- the clan-wide map -------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        inv = self.ports.inventory.inventory
        if inv is None:
            return {"self": self.name, "machines": [], "links": [], "clan": None}
        doc = inv.doc
        by_key = {m["node_key"]: name for name, m in doc["machines"].items()}
        me = by_key.get(self.ports.identity.public_key, self.name)
        machines = {r["name"]: r for r in self._machines()}
        online = {n for n, r in machines.items() if r["online"]}
        views: dict[str, list[dict[str, Any]]] = {me: self.local_links()}
        caps: dict[str, list[dict[str, Any]]] = {me: self._capabilities()}
        now = self.ports.clock.wall()
        reported: dict[str, int] = {me: int(now)}
        names = sorted(machines)
        for rec in self.ports.store.of_kind(TOPOLOGY_KIND):
            name = by_key.get(rec.origin)
            if name is None or name == me:
                continue
            try:
                body = parse_body(rec.body)
            except WireError:
                self.stats["bad_records"] += 1
                continue
            caps[name] = [c.to_wire() for c in body.capabilities]
            reported[name] = body.at
            # A view dated in the future is never "fresh": it would stay forever.
            if 0 <= now - body.at < STALE or 0 < body.at - now <= FUTURE_SKEW:
                exceptions = [{"peer": x.peer, "kind": x.kind} for x in body.links]
                views[name] = expand_links(body.kind, exceptions, name, names)
        vms: dict[str, list[dict[str, Any]]] = {}
        for row in self._vms():
            vms.setdefault(row["machine"], []).append(
                {k: row.get(k) for k in ("vm", "state", "reason", "accel")}
            )
        out_machines = []
        for name in sorted(machines):
            r = machines[name]
            out_machines.append(
                {
                    "name": name,
                    "node_id": r["node_id"],
                    "tags": r["tags"],
                    "state": r["state"],
                    "online": r["online"],
                    "self": name == me,
                    "services": r["services"],
                    "vms": vms.get(name, []),
                    "capabilities": caps.get(name),
                    "reported_at": reported.get(name),
                }
            )
        anchor = self.ports.inventory.anchor
        clan = None if anchor is None else {"name": anchor.name}
        return {
            "self": me,
            "clan": clan,
            "machines": out_machines,
            "links": merge_links(views, online),
        }
