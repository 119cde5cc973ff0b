"""N whole agents on one virtual clock: every part behind its ports, minus the kernel.

Owns: the whole-agent harness (DESIGN rule 7). Each `SimAgent` is what
`clanagent.agent.Agent` composes, built from the same parts: a seeded
identity, an in-memory `Store`, a real `InventoryManager`, a real
`GossipNode` (with the real record body checks as its `validate=` hook and
the inventory's admission as its `admit=` hook), and one `Ports` (a virtual
`SimClock`, the store, the agent's `AgentBus` and `NodeMembership`, the inventory and an
`EventRecorder`) on which the real services run. The agents talk through a
`SimNet`: the datagram decisions of `tests/sim/network.Network` (latency,
loss, partitions, crashes, byte counters) with a trio task that delivers
what is in flight at its arrival time. Everything runs in one trio run on
`trio.testing.MockClock(autojump_threshold=0)` (`run_sim`), so virtual
seconds cost only the work done in them.

What the harness measures, it measures at the receiver: a machine counts as
holding a record only once the record arrived in its store (the virtual
time of each arrival is kept per agent, `Arrivals`), never because it was
sent or queued.

Must never: open a socket, start a process or touch WireGuard, QEMU or
the kernel (those parts' backends are replaced by fakes); read the wall
clock for a decision (the wall clock a part sees is `SIM_EPOCH` plus the
virtual time); reach into a part beyond the ports the agent also gives it.

The services (`ALL_SERVICES`; a test picks its own `service_starters`):
secrets and service wiring (files under the agent's workdir), VMs (the
in-memory backend of tests/_fake_vm_backend.py) and topology. Not run: the
mesh (WireGuard, discovery, path probes: the kernel side), so topology
classifies links by gossip address; the control socket and web console.

What differs from the real agent, on purpose: no peer sessions (a datagram
arrives from the sender's node id, as an authenticated session would say),
so the inventory's admission gates records (the node's `admit=`) but not
who may exchange membership messages; persistence is immediate (the store
is in memory, as in `tests/sim/driver.py`); the secrets part's file work
runs in trio's worker threads, during which the MockClock may jump (the
VM part's runs inline).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import trio
import trio.testing

from clanagent import __version__
from clanagent.agent import AgentBus
from clanagent.gossip.config import GossipConfig
from clanagent.gossip.node import GossipNode
from clanagent.identity import Identity
from clanagent.inventory import RECORD_KIND, Anchor, InventoryManager
from clanagent.inventory.versions import InventoryVersion, OfferStatus
from clanagent.ports import NodeMembership, Ports
from clanagent.record_checks import RecordChecker
from clanagent.records import is_durable, soft_ttl
from clanagent.store import Store
from clanagent.wire import RECORD_LIMITS, NodeInfo, SignedRecord
from tests.sim.cluster import peak_rss_mb, seeded_identity
from tests.sim.driver import EventLog
from tests.sim.network import Latency, Network

__all__ = [
    "ALL_SERVICES",
    "SIM_EPOCH",
    "AgentSim",
    "Arrivals",
    "EventRecorder",
    "SimAgent",
    "SimClock",
    "SimNet",
    "backup_service",
    "genesis_doc",
    "machine_entry",
    "run_sim",
    "shared_record_decoding",
    "sign_version",
    "start_secrets_and_services",
    "start_topology",
    "start_vms",
    "vm_entry",
]

# The wall clock every simulated agent reads at virtual time 0 (2027-01-15):
# record timestamps and version floors follow the virtual clock from here.
SIM_EPOCH = 1_800_000_000.0
JOIN_RETRY = 2.0  # the gossip service's JOIN_RETRY


def run_sim(fn: Callable[[], Awaitable[Any]]) -> Any:
    """Run `fn()` in a fresh trio run on a MockClock that jumps whenever every
    task waits (virtual time costs nothing)."""
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


@contextlib.contextmanager
def shared_record_decoding(max_records: int = 1 << 20) -> Iterator[None]:
    """While inside: `SignedRecord.decode` hands every agent the same object
    for the same bytes (checked once, signature verified on every call that
    asks for it, as before).

    A record's body is read-only and shared by everyone who holds it (see
    SignedRecord), so this changes no decision of any part; it only stops N
    agents in one process from each holding a decoded copy of every record,
    which at hundreds of agents with per-machine link lists (topology) is
    gigabytes. The benchmark uses it; the tests do not need it."""
    orig = SignedRecord.__dict__["decode"].__func__
    cache: dict[bytes, SignedRecord] = {}

    def decode(
        cls: type[SignedRecord], data: bytes, limits: Any = RECORD_LIMITS, *, verify: bool = True
    ) -> SignedRecord:
        if limits is not RECORD_LIMITS or type(data) is not bytes:
            return orig(cls, data, limits, verify=verify)
        rec = cache.get(data)
        if rec is None:
            rec = orig(cls, data, limits, verify=False)
            if len(cache) >= max_records:
                cache.clear()
            cache[data] = rec
        if verify:
            rec.verify()
        return rec

    SignedRecord.decode = classmethod(decode)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        SignedRecord.decode = classmethod(orig)  # type: ignore[method-assign,assignment]


def machine_entry(ident: Identity, tags: Iterable[str] = ()) -> dict[str, Any]:
    """An inventory machine entry for `ident` (no endpoints: the sim needs none)."""
    return {
        "node_key": ident.public_key,
        "box_key": ident.box_public,
        "wg_key": ident.wg_public,
        "tags": sorted(tags),
        "endpoints": [],
        "sealed_endpoints": b"",
        "public": True,
    }


def genesis_doc(sim: AgentSim, tags: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """An inventory naming every agent of `sim` (tags "base" unless given)."""
    tags = tags or {}
    return {
        "format": 1,
        "clan": {
            "id": sim.anchor.clan_id,
            "name": sim.anchor.name,
            "admins": list(sim.anchor.admins),
            "threshold": 1,
        },
        "machines": {
            addr: machine_entry(sim.identities[addr], tags.get(addr, ["base"]))
            for addr in sim.addrs
        },
        "networks": {"default": ["lan", "public", "tor"], "by_tag": {}},
        "services": {},
        "vms": {},
    }


def backup_service(servers: list[str], clients: list[str]) -> dict[str, Any]:
    """A service whose servers share a generated password (as tests/test_secrets_agent.py)."""

    def role(machines: list[str]) -> dict[str, Any]:
        return {"machines": machines, "tags": [], "settings": {}, "exports": [], "imports": []}

    return {
        "type": "backup",
        "settings": {},
        "reload": "",
        "roles": {"server": role(servers), "client": role(clients)},
        "secrets": {
            "repokey": {
                "generator": "password",
                "length": 24,
                "command": "",
                "depends": [],
                "scope": "role:server",
                "rotate_days": 30,
                "secret_files": [],
                "public_files": [],
            }
        },
    }


def sign_version(doc: dict[str, Any], parents: list[bytes], msg: str, admin: Any) -> Any:
    """An inventory version signed by `admin`, stamped with the virtual wall clock."""
    from clanagent.inventory import make_version

    return make_version(doc, parents, int(SIM_EPOCH + trio.current_time()), msg, [admin])


# -- the ports ------------------------------------------------------------------


class SimClock:
    """The Clock port on the virtual clock: `now` is trio's (mock) clock and
    `wall` is SIM_EPOCH plus it, so timestamps move with virtual time."""

    def now(self) -> float:
        return trio.current_time()

    def wall(self) -> float:
        return SIM_EPOCH + trio.current_time()


class EventRecorder:
    """The EventSink port: every event with the virtual time it was published."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, dict[str, Any]]] = []

    def publish(self, topic: str, **fields: Any) -> None:
        self.events.append((trio.current_time(), topic, fields))

    def of(self, topic: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, f) for t, top, f in self.events if top == topic]


# -- the network ------------------------------------------------------------------


class SimNet:
    """Datagrams in flight between the agents, delivered by one trio task.

    `Network` decides loss and arrival time at send and again at arrival
    (a crash or partition also eats what is in flight); `blackhole(addr)`
    drops everything addressed to one agent from then on (a broken delivery
    path the metrics must notice)."""

    def __init__(self, network: Network) -> None:
        self.network = network
        self.agents: dict[str, SimAgent] = {}
        self._heap: list[tuple[float, int, str, str, bytes]] = []
        self._seq = itertools.count()
        self._wake = trio.Event()
        self.blackholed: set[str] = set()
        self.stats = {"sent": 0, "delivered": 0, "blackholed": 0, "peak_in_flight_bytes": 0}
        self._in_flight = 0  # bytes in the heap
        # Called with (src, dst, data) for every datagram sent (a benchmark's probe).
        self.taps: list[Callable[[str, str, bytes], None]] = []

    def attach(self, agent: SimAgent) -> None:
        self.agents[agent.addr] = agent
        self.network.register(agent.addr)
        self.network.restart(agent.addr)

    def blackhole(self, addr: str) -> None:
        self.blackholed.add(addr)

    def send(self, src: str, dst: str, data: bytes) -> None:
        self.stats["sent"] += 1
        for tap in self.taps:
            tap(src, dst, data)
        t = self.network.send(trio.current_time(), src, dst, len(data))
        if t is None:
            return
        first = self._heap[0][0] if self._heap else math.inf
        heapq.heappush(self._heap, (t, next(self._seq), src, dst, data))
        self._in_flight += len(data)
        if self._in_flight > self.stats["peak_in_flight_bytes"]:
            self.stats["peak_in_flight_bytes"] = self._in_flight
        if t < first:
            self._wake.set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        heap = self._heap
        while True:
            due = heap[0][0] if heap else math.inf
            with trio.move_on_at(due):
                await self._wake.wait()
            self._wake = trio.Event()
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                _, _, src, dst, data = heapq.heappop(heap)
                self._in_flight -= len(data)
                if dst in self.blackholed:
                    self.stats["blackholed"] += 1
                    self.network.counters[src].msgs_dropped += 1
                    continue
                if not self.network.accept(src, dst, len(data)):
                    continue
                agent = self.agents.get(dst)
                sender = self.agents.get(src)
                if agent is None or not agent.up:
                    continue
                self.stats["delivered"] += 1
                agent.receive(src, None if sender is None else sender.node_id, data)
            # Let the agents' tasks see what arrived before the next batch.
            await trio.lowlevel.checkpoint()


# -- metrics ------------------------------------------------------------------------


class Arrivals:
    """When each record arrived in each agent's store (virtual seconds).

    Fed from the node's RecordAccepted, which it reports only after the
    record is in the store; `held_since` also checks the store itself, so a
    machine is a holder only when the record is really there."""

    def __init__(self) -> None:
        # addr -> (origin, kind, key) -> [(version, t), ...] in arrival order
        self._by_addr: dict[str, dict[tuple[bytes, str, str], list[tuple[int, float]]]] = {}

    def note(self, addr: str, rec: SignedRecord, t: float) -> None:
        triple = (rec.origin, rec.kind, rec.key)
        self._by_addr.setdefault(addr, {}).setdefault(triple, []).append((rec.version, t))

    def arrived_at(self, addr: str, rec: SignedRecord) -> float | None:
        """First virtual time `addr` stored `rec` or a newer version of it."""
        seen = self._by_addr.get(addr, {}).get((rec.origin, rec.kind, rec.key), ())
        times = [t for v, t in seen if v >= rec.version]
        return min(times) if times else None


# -- one agent ------------------------------------------------------------------------


class SimAgent:
    """One whole agent: gossip node, store, inventory and ports (see the module docstring)."""

    def __init__(
        self,
        sim: AgentSim,
        addr: str,
        identity: Identity,
        anchor: Anchor,
        config: GossipConfig,
        *,
        seed: int,
        workdir: Path | None = None,
    ) -> None:
        self.sim = sim
        self.addr = addr
        self.name = addr
        self.identity = identity
        self.node_id = identity.node_id
        self.anchor = anchor
        self.config = config
        self.workdir = workdir
        self.store = Store.open(None, durable=is_durable)
        self.inventory = InventoryManager(anchor)
        self.clock = SimClock()
        self.events = EventRecorder()
        # the agent's bus (its PublishGate included) and membership view
        self.bus = AgentBus(self._publish, random.Random(f"bus-{seed}-{addr}"))
        self.membership = NodeMembership(lambda: self.node)
        self.ports = Ports(
            clock=self.clock,
            identity=identity,
            store=self.store,
            bus=self.bus,
            members=self.membership,
            inventory=self.inventory,
            events=self.events,
        )
        # the agent's own record checks (clanagent.record_checks), on our clock
        self.checks = RecordChecker(
            wall=self.clock.wall,
            inventory=lambda: self.inventory.inventory,
            store=lambda: self.store,
            identity=lambda: self.identity,
            clan=lambda: self.anchor.clan_id,
        )
        self.record_stats = self.checks.stats
        self.up = False
        self.seeds: list[str] = []
        self._rng = random.Random(f"agent-{seed}-{addr}")
        self._scope: trio.CancelScope | None = None
        self._wakeup = trio.Event()
        self.parts: dict[str, Any] = {}  # the services started on our ports, by name
        self.inventory.subscribe(self._inventory_changed)
        self.node: GossipNode = self._make_node()

    @property
    def faults(self) -> int:
        """Membership handlers that raised (the bus counts its own)."""
        return self.membership.faults

    async def _publish(self, kind: str, key: str, body: Any, *, push: bool = True) -> bool:
        ok = self.publish_record(kind, key, body, push=push)
        await trio.lowlevel.checkpoint()
        return ok

    def _make_node(self) -> GossipNode:
        return GossipNode(
            self.identity,
            self.config,
            addr=self.addr,
            clan=self.anchor.clan_id,
            store=self.store,
            rng=self._rng,
            now=trio.current_time(),
            name=self.name,
            admit=self.admit_record,
            validate=self.checks.validate,
            wall_clock=self.clock.wall if self.sim.version_floor else None,
            soft_ttl=soft_ttl,
        )

    # -- hooks the gossip node asks (as Agent's) ------------------------------------

    def admit_record(self, rec: SignedRecord) -> bool:
        verdict = self.inventory.admit_record(rec)
        if verdict is not None:
            return verdict
        peer = self.inventory.admit_peer(rec.origin)
        return True if peer is None else peer

    # -- views the parts are given (as Agent's) -----------------------------------

    def machines(self) -> list[dict[str, Any]]:
        """`clanctl machine list` rows (Agent.machines): gossip state per machine."""
        from clanagent.inventory import views

        states = views.member_states(
            self.inventory, self.membership.rows(), self.identity.public_key
        )
        return views.machines(self.inventory, states)

    def vm_list(self) -> list[dict[str, Any]]:
        vms = self.parts.get("vms")
        return [] if vms is None else vms.clan_vms()

    def capability_rows(self) -> list[dict[str, Any]]:
        from clanagent.capabilities import Capability

        caps = [Capability("gossip", True, f"simulated at {self.addr}").to_wire()]
        vms = self.parts.get("vms")
        if vms is not None:
            caps.append(vms.capability().to_wire())
        return caps

    # -- the shell around the node ------------------------------------------------

    def publish_record(self, kind: str, key: str, body: Any, *, push: bool = True) -> bool:
        """Our own body check, then sign and spread (Agent.publish_record)."""
        if not self.up or not self.checks.check_own(kind, key, body):
            return False
        rec, actions = self.node.publish(trio.current_time(), kind, key, body, push=push)
        self.sim.published_at.setdefault(rec.record_id, trio.current_time())
        self.sim.published[kind] = self.sim.published.get(kind, 0) + 1
        self._handle(actions)
        return True

    def submit_inventory(self, version: InventoryVersion) -> OfferStatus:
        """What `clanctl inventory apply` makes the agent do: offer, then gossip."""
        result = self.inventory.offer_version(version)
        assert result is not None, "no clan"
        if result.status is OfferStatus.REJECTED:
            raise ValueError(f"inventory rejected: {result.reason}: {result.detail}")
        if result.status is not OfferStatus.DUPLICATE:
            self.publish_record(RECORD_KIND, version.hash.hex(), version.to_wire())
        return result.status

    def receive(self, src: str, from_node: str | None, data: bytes) -> None:
        self._handle(self.node.receive(trio.current_time(), src, data, from_node=from_node))

    def _handle(self, actions: list[Any]) -> None:
        now = trio.current_time()
        for action in actions:
            name = type(action).__name__
            if name == "SendTo":
                self.sim.net.send(self.addr, action.addr, action.data)
            elif name == "Persist":
                self._handle(self.node.persisted(now, action.records))
            elif name == "RecordAccepted":
                rec = action.record
                self.sim.arrivals.note(self.addr, rec, now)
                self.bus.subscriptions.dispatch(rec)
                self.events.publish(
                    "record.accepted", origin=rec.origin.hex(), kind=rec.kind, key=rec.key
                )
            elif name == "MemberChanged":
                if action.node_id == self.node_id:
                    continue
                self.sim.log.member(
                    now, self.addr, action.node_id, action.state, action.incarnation
                )
                self.events.publish(
                    f"member.{action.change}", node_id=action.node_id, state=action.state
                )
                self.membership.changed(action.node_id)
            elif name == "PeerMisbehaved":
                self.sim.log.misbehaved.append((now, self.addr, action.addr, action.reason))
        self._wakeup.set()

    def _inventory_changed(self, inv: Any) -> None:
        self.events.publish("inventory.head", machines=sorted(inv.machines), hash=inv.hash.hex())
        from clanagent.identity import node_id_of

        self.node.set_rejoin_scope(frozenset(node_id_of(k) for k in inv.node_keys()))

    async def _timer_loop(self) -> None:
        node = self.node
        while True:
            with trio.move_on_at(node.next_deadline()):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            self._handle(node.tick(trio.current_time()))
            self._wakeup = trio.Event()

    async def _join_loop(self) -> None:
        while self.seeds:
            self._handle(self.node.join(trio.current_time(), self.seeds))
            await trio.sleep(JOIN_RETRY)
            if self.node.membership.alive_count() > 1:
                return

    # -- life ----------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start the agent's tasks; they run until `crash()`."""
        with trio.CancelScope() as scope:
            self._scope = scope
            self.up = True
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._timer_loop)
                info = NodeInfo(name=self.name, version=__version__, addrs=[self.addr])
                self.publish_record("node-info", "", info.to_wire())
                if self.seeds:
                    nursery.start_soon(self._join_loop)
                for start in self.sim.service_starters:
                    await start(self, nursery)
                task_status.started()
        self.up = False

    def crash(self) -> None:
        """Stop every task of this agent at once (no goodbye) and drop its traffic."""
        self.up = False
        self.sim.net.network.crash(self.addr)
        self.sim.ever_crashed.add(self.node_id)
        if self._scope is not None:
            self._scope.cancel()


# -- the services ----------------------------------------------------------------------

ServiceStarter = Callable[[SimAgent, trio.Nursery], Awaitable[None]]


async def start_secrets_and_services(agent: SimAgent, nursery: trio.Nursery) -> None:
    """The service wiring and the secrets parts, as Agent._start_mesh starts
    them, on the agent's ports; their files go under the agent's workdir."""
    from clanagent.secrets.service import SecretsService
    from clanagent.services.service import ServicesService
    from tests._fake_vm_backend import inline

    assert agent.workdir is not None, "secrets and services write files: give a workdir"
    runtime = agent.workdir / "run"
    # file work inline: the virtual clock must not jump while a thread works
    # (under load, a slow worker thread let whole probe rounds pass)
    services = ServicesService(agent.ports, runtime_dir=runtime, run_sync=inline)
    await nursery.start(services.run)
    secrets = SecretsService(
        agent.ports, runtime_dir=runtime, on_public_files_changed=services.wake, run_sync=inline
    )
    await nursery.start(secrets.run)
    agent.parts.update(services=services, secrets=secrets)


async def start_vms(agent: SimAgent, nursery: trio.Nursery) -> None:
    """The VM part on the agent's ports with the in-memory backend
    (tests/_fake_vm_backend.py): VMs "boot" at once and report status; the
    file work runs inline, so the virtual clock does not jump under it."""
    from clanagent.vmhost.service import VmService
    from clanagent.vmhost.spec import HostLimits
    from tests._fake_vm_backend import FakeHost, fake_backends, inline

    assert agent.workdir is not None, "the VM part keeps run dirs: give a workdir"
    host = FakeHost()
    vms = VmService(
        agent.ports,
        state_dir=agent.workdir / "state",
        runtime_dir=agent.workdir / "run",
        backends=lambda: fake_backends(host),
        host_limits=lambda: HostLimits.from_totals(4, 8192),
        run_sync=inline,
        rng=random.Random(f"vms-{agent.sim.seed}-{agent.addr}"),
    )
    await nursery.start(vms.run)
    agent.parts.update(vms=vms, vm_host=host)


async def start_topology(agent: SimAgent, nursery: trio.Nursery) -> None:
    """The topology part: publishes this machine's links (a member that
    fails makes its link "down") and answers the clan map."""
    from clanagent.topology import TopologyService

    topology = TopologyService(
        agent.ports,
        name=agent.name,
        machines=agent.machines,
        vms=agent.vm_list,
        capabilities=agent.capability_rows,
        path_kind=None,  # no mesh in the simulator: the gossip address says
        rng=random.Random(f"topology-{agent.sim.seed}-{agent.addr}"),
    )
    await nursery.start(topology.run)
    agent.parts["topology"] = topology


# Every service the simulator runs (the benchmark starts all of them).
ALL_SERVICES: list[ServiceStarter] = [start_secrets_and_services, start_vms, start_topology]


def vm_entry(workdir: Path, tags: list[str]) -> dict[str, Any]:
    """An inventory VM placed by tag; its kernel and initrd are stand-in files
    under `workdir` (the in-memory backend never reads them)."""
    kernel, initrd = workdir / "vmlinuz", workdir / "initrd.img"
    for f in (kernel, initrd):
        if not f.exists():
            f.write_bytes(b"not a kernel: the simulator's VM backend never reads it")
    return {
        "machines": [],
        "tags": tags,
        "count": 1,
        "vcpus": 1,
        "memory_mb": 128,
        "kernel": str(kernel),
        "initrd": str(initrd),
        "rootfs": "",
        "disk_mb": 0,
        "networks": [],
        "secrets": [],
        "backend": "auto",
        "graphics": False,
    }


# -- the clan ---------------------------------------------------------------------------


class AgentSim:
    """N whole agents of one clan on one in-memory network.

    Build it inside a trio run on a MockClock (`run_sim`), then `await
    sim.start(nursery)`: agent n0 is the seed everyone else joins through.
    `service_starters` are called for every agent as it starts, with the
    agent and its nursery, to start the services on `agent.ports`."""

    def __init__(
        self,
        n: int,
        *,
        admins: Sequence[bytes],
        clan_id: bytes = b"\x5a" * 16,
        seed: int = 0,
        config: GossipConfig | None = None,
        latency: Latency | None = None,
        loss: float = 0.0,
        workdir: Path | None = None,
        identities: Sequence[Identity] | None = None,
        service_starters: Sequence[ServiceStarter] = (),
        version_floor: bool = True,
    ) -> None:
        """`version_floor=False` gives the nodes no wall clock (record
        versions count up by one, as before the floor): a diagnostic, to see
        what the floor costs; the agent always has one."""
        self.n = n
        self.version_floor = version_floor
        self.seed = seed
        self.config = config if config is not None else GossipConfig.lan()
        self.anchor = Anchor(clan_id, "sim", tuple(sorted(admins)))
        self.network = Network(seed=seed, latency=latency, loss=loss)
        self.net = SimNet(self.network)
        self.log = EventLog()
        self.arrivals = Arrivals()
        self.published_at: dict[bytes, float] = {}
        self.published: dict[str, int] = {}  # kind -> records published by all agents
        self.ever_crashed: set[str] = set()
        self.service_starters = list(service_starters)
        self.addrs = [f"n{i}" for i in range(n)]
        idents = (
            list(identities)
            if identities is not None
            else [seeded_identity(seed, i) for i in range(n)]
        )
        self.identities = dict(zip(self.addrs, idents, strict=False))
        self.agents: dict[str, SimAgent] = {}
        self.workdir = workdir
        self._wall_start = time.perf_counter()

    def build(self, addrs: Iterable[str] | None = None) -> list[SimAgent]:
        """Make the agents (not started yet)."""
        made = []
        for addr in self.addrs if addrs is None else addrs:
            wd = None if self.workdir is None else self.workdir / addr
            if wd is not None:
                wd.mkdir(parents=True, exist_ok=True)
            agent = SimAgent(
                self,
                addr,
                self.identities[addr],
                self.anchor,
                self.config,
                seed=self.seed,
                workdir=wd,
            )
            agent.seeds = [] if addr == self.addrs[0] else [self.addrs[0]]
            self.agents[addr] = agent
            self.net.attach(agent)
            made.append(agent)
        return made

    async def start(self, nursery: trio.Nursery, *, spread: float = 0.0) -> None:
        """Start the network and every agent (the seed first; the others at
        times uniform in [0, spread) after it)."""
        await nursery.start(self.net.run)
        if not self.agents:
            self.build()
        rng = random.Random(f"start-{self.seed}")
        t0 = trio.current_time()
        order = sorted(self.agents.values(), key=lambda a: 0.0 if a.seeds == [] else rng.random())
        for agent in order:
            if spread and agent.seeds:
                await trio.sleep_until(t0 + rng.random() * spread)
            await nursery.start(agent.run)

    # -- access ------------------------------------------------------------------------

    def __getitem__(self, addr: str) -> SimAgent:
        return self.agents[addr]

    def live(self) -> list[SimAgent]:
        return [a for a in self.agents.values() if a.up]

    @property
    def now(self) -> float:
        return trio.current_time()

    # -- waiting -----------------------------------------------------------------------

    async def wait_for(self, pred: Callable[[], bool], timeout: float, every: float = 0.1) -> bool:
        """Run until `pred()` holds (checked every `every` virtual s) or `timeout`."""
        deadline = trio.current_time() + timeout
        while not pred():
            if trio.current_time() >= deadline:
                return False
            await trio.sleep(every)
        return True

    # -- measurements --------------------------------------------------------------------

    def converged(self) -> bool:
        """Every live agent sees every other live agent alive."""
        live = self.live()
        ids = [a.node_id for a in live]
        return all(
            a.node.member_state(nid) == "alive" for a in live for nid in ids if nid != a.node_id
        )

    def holds(self, addr: str, rec: SignedRecord) -> bool:
        """Did `rec` (or a newer version) arrive in the store of `addr`?"""
        agent = self.agents[addr]
        if self.arrivals.arrived_at(addr, rec) is None:
            return False
        held = agent.store.get(rec.origin, rec.kind, rec.key)
        return held is not None and held.version >= rec.version

    def holders(self, rec: SignedRecord, among: Iterable[str] | None = None) -> list[str]:
        """Live agents (of `among`, default all) that hold `rec`."""
        addrs = [a.addr for a in self.live()] if among is None else list(among)
        return [a for a in addrs if self.agents[a].up and self.holds(a, rec)]

    def all_hold(self, rec: SignedRecord, among: Iterable[str] | None = None) -> bool:
        addrs = [a.addr for a in self.live()] if among is None else list(among)
        return bool(addrs) and len(self.holders(rec, addrs)) == len(addrs)

    def spread(self, rec: SignedRecord, among: Iterable[str] | None = None) -> dict[str, Any]:
        """How `rec` spread: holders, missing and the seconds from its
        publication until the last holder stored it (None while any is missing)."""
        addrs = [a.addr for a in self.live()] if among is None else list(among)
        t0 = self.published_at.get(rec.record_id)
        times = {a: self.arrivals.arrived_at(a, rec) for a in addrs if self.holds(a, rec)}
        missing = sorted(set(addrs) - set(times))
        last = max(times.values()) if times and not missing else None
        return {
            "holders": len(times),
            "of": len(addrs),
            "missing": missing,
            "seconds": None if last is None or t0 is None else last - t0,
        }

    def detection_time(self, addr: str, crashed_at: float) -> float | None:
        """Seconds from `crashed_at` until every live agent marked `addr` dead."""
        nid = self.agents[addr].node_id
        observers = [a.addr for a in self.live() if a.addr != addr]
        t = self.log.all_marked_at(nid, "dead", observers, since=crashed_at)
        return None if t is None else t - crashed_at

    def false_deaths(self) -> list[tuple[float, str, str]]:
        """(t, observer, subject) of "dead" verdicts about agents that never crashed."""
        out = []
        for nid, events in self.log.by_subject.items():
            if nid in self.ever_crashed:
                continue
            out.extend((ev.t, ev.observer, nid) for ev in events if ev.state == "dead")
        return out

    def bytes_sent(self) -> dict[str, int]:
        return {a: c.bytes_sent for a, c in self.network.counters.items()}

    async def bandwidth(self, window: float) -> dict[str, float]:
        """Run `window` virtual seconds; bytes sent per live agent per second over it."""
        before = self.bytes_sent()
        t0 = trio.current_time()
        await trio.sleep(window)
        dt = trio.current_time() - t0
        rates = sorted(
            (self.network.counters[a.addr].bytes_sent - before.get(a.addr, 0)) / dt
            for a in self.live()
        )
        return {"mean": sum(rates) / len(rates), "p50": rates[len(rates) // 2], "max": rates[-1]}

    def real_seconds(self) -> float:
        return time.perf_counter() - self._wall_start

    @staticmethod
    def peak_rss_mb() -> float:
        return peak_rss_mb()
