"""The clan's topology: which machine reaches which, over what kind of path, how fast.

Owns: this machine's view of its links (to every other machine of the
inventory: path kind lan / public / tor / down and the round-trip time),
the `topology` record that carries that view (and a summary of this
machine's capabilities) to the rest of the clan, and the clan-wide map the
`topology` control method returns (machines, links, services and VMs per
machine).  Must never: publish more often than the view really changes
for its readers (a link's kind or up/down, a capability: not RTT jitter;
RTTs are published coarse and refreshed only with the periodic
republish), publish faster than the kind's min_interval (records.py),
trust a peer's record beyond display (it is shown, never acted on), fail
the caller because one record is malformed, or reach into another part: it
reads the rest of the agent through its ports (clanagent.ports) and the
callables it is given (machine rows, VM rows, capability rows, the current
path kind to a machine).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from ._log import kv
from .publish_policy import PublishPolicy

if TYPE_CHECKING:
    from .ports import Ports

__all__ = [
    "TOPOLOGY_KIND",
    "LINK_KINDS",
    "TopologyService",
    "classify_addr",
    "merge_links",
]

log = logging.getLogger("clanagent.topology")

TOPOLOGY_KIND = "topology"
LINK_KINDS = ("lan", "public", "tor", "other", "down")
CHECK_INTERVAL = 3.0  # seconds between looks at our own links
# The topology kind's cadence (the registry in records.py takes it from
# here): republish an unchanged view every REFRESH (minus up to
# REFRESH_JITTER of it), never two within MIN_INTERVAL (plus up to
# MIN_JITTER of it); a view older than STALE (the kind's TTL) no longer
# describes links.
REFRESH = 300.0
MIN_INTERVAL = 2.0
STALE = 3 * REFRESH  # the kind's TTL
MAX_LINKS = 256  # links in one record (a bigger clan shows the first 256 by name)
MAX_CAPS = 32
FUTURE_SKEW = 300  # a view dated further ahead than this is ignored (records.MAX_FUTURE_SKEW)


def classify_addr(addr: str) -> str:
    """lan / public / tor / other for a gossip HOST:PORT address."""
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
    """The RTT as published: its half-power-of-two bucket's lower bound, rounded
    up to 3 significant digits (so it stays in the bucket)."""
    b = _bucket(rtt_ms)
    if b is None:
        return None
    v = 2.0 ** (b / 2)
    q = 10.0 ** (2 - math.floor(math.log10(v)))
    return math.ceil(v * q) / q


def _parse_body(body: Any) -> dict[str, Any] | None:
    """A peer's topology record body, checked; None when malformed (then ignored)."""
    if not isinstance(body, dict):
        return None
    links, caps, at = body.get("links"), body.get("capabilities"), body.get("at")
    if not isinstance(links, list) or not isinstance(caps, list) or type(at) is not int:
        return None
    out_links = []
    for link in links[:MAX_LINKS]:
        if not isinstance(link, dict):
            return None
        peer, kind, rtt = link.get("peer"), link.get("kind"), link.get("rtt_ms")
        if not isinstance(peer, str) or kind not in LINK_KINDS:
            return None
        if rtt is not None and not (isinstance(rtt, (int, float)) and 0 <= rtt < 1e7):
            rtt = None
        out_links.append({"peer": peer, "kind": kind, "rtt_ms": rtt})
    out_caps = []
    for c in caps[:MAX_CAPS]:
        if (
            isinstance(c, dict)
            and isinstance(c.get("name"), str)
            and isinstance(c.get("available"), bool)
        ):
            reason = c.get("reason")
            out_caps.append(
                {
                    "name": c["name"][:64],
                    "available": c["available"],
                    "reason": reason[:300] if isinstance(reason, str) else "",
                }
            )
    return {"at": at, "links": out_links, "capabilities": out_caps}


def merge_links(views: dict[str, list[dict[str, Any]]], online: set[str]) -> list[dict[str, Any]]:
    """One edge per pair of machines from both ends' views.

    `views`: machine -> its links ({peer, kind, rtt_ms}); `online`: the
    machines we see online.  An edge is up when either end reports it up
    (each end only knows its own sessions) and both ends are online; its
    kind and RTT then come from the end that reports it up (the one whose
    name sorts first when both do).
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
            kind, rtt = up[0]["kind"], up[0]["rtt_ms"]
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
    machine now (lan / public / tor / other), or None when it has none
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
            if len(links) >= MAX_LINKS:
                break
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
        links = [{**link, "rtt_ms": coarse_rtt(link["rtt_ms"])} for link in self.local_links()]
        return {
            "at": int(self.ports.clock.wall()),
            "links": links,
            "capabilities": self._capabilities(),
        }

    @staticmethod
    def _shape(body: dict[str, Any]) -> Any:
        """What readers act on: each link's kind (down included) and the capabilities.

        RTTs are left out: jitter alone never republishes (the periodic
        refresh carries the current coarse RTT)."""
        return (
            [(link["peer"], link["kind"]) for link in body["links"]],
            [(c["name"], c["available"]) for c in body["capabilities"]],
        )

    async def publish_once(self) -> bool:
        if self.ports.inventory.inventory is None:
            return False
        body = self._body()
        now = self.ports.clock.now()
        shape = self._shape(body)
        if not self.policy.due(now, shape):
            if self.policy.hold_until is not None:
                self.stats["held"] += 1
            return False
        await self.ports.bus.publish(TOPOLOGY_KIND, "", body)
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
            wait = CHECK_INTERVAL
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
        for rec in self.ports.store.of_kind(TOPOLOGY_KIND):
            name = by_key.get(rec.origin)
            if name is None or name == me:
                continue
            body = _parse_body(rec.body)
            if body is None:
                self.stats["bad_records"] += 1
                continue
            caps[name] = body["capabilities"]
            reported[name] = body["at"]
            # A view dated in the future is never "fresh": it would stay forever.
            if 0 <= now - body["at"] < STALE or 0 < body["at"] - now <= FUTURE_SKEW:
                views[name] = [link for link in body["links"] if link["peer"] in machines]
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
