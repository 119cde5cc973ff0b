"""The composition root: builds every part from the config and runs them.

Owns: start-up order (identity, store, capabilities, control socket, then
the network parts), which objects each part gets (its ports and a few
getters), the one control API table every part registers its methods into
(`_control_api`), the one trio nursery everything runs in, sd_notify and
the watchdog, and a clean stop.  Must never: let one part's failure to
start (no tor, no root) stop the others (it reports it as a capability),
or answer a control method itself (each part's `api.py` does).
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from pathlib import Path
from typing import Any

import trio

from . import __version__, agent_api
from ._eventbus import EventBus
from ._log import kv
from ._sdnotify import Notifier, watchdog_interval
from .bus import AgentBus, TrioClock, drop_other_clans, publish_own
from .capabilities import Capability, probe_all
from .config import Config
from .control.server import ControlServer
from .gossip.config import RecordLimits
from .identity import Identity, load_or_create
from .inventory.anchor import Anchor, load_anchor, save_anchor
from .inventory.manager import InventoryManager
from .ports import NodeMembership, Ports
from .record_checks import RecordChecker
from .records import is_durable
from .store import Store
from .wire import SignedRecord

__all__ = ["Agent", "AgentBus", "TrioClock"]

log = logging.getLogger("clanagent.agent")


class Agent:
    def __init__(self, cfg: Config, *, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier()
        self.events_bus = EventBus()
        self.name = cfg.gossip.name or socket.gethostname()
        self.identity: Identity | None = None
        self.store: Store | None = None
        self.anchor: Anchor | None = None
        self.inventory = InventoryManager(None)
        self.capabilities: list[Capability] = []
        self.control: ControlServer | None = None
        # The parts, once they run: gossip (restarted on a clan change), and
        # once in a clan the mesh, service wiring, secrets, this machine's VMs
        # and the topology; the web console once enabled (config or `clanctl ui`).
        self.gossip: Any = None
        self.mesh: Any = None
        self.services: Any = None
        self.secrets: Any = None
        self.vms: Any = None
        self.topology: Any = None
        self.web: Any = None
        self._gossip_scope: trio.CancelScope | None = None
        self._stopping = trio.Event()
        self._nursery: trio.Nursery | None = None
        # Held while the network parts start and while a clan change restarts
        # gossip: a `clan init` that arrives while the first start is still
        # under way (the control socket serves before the parts are up) waits
        # for it instead of cancelling a gossip run that has not started yet.
        self._parts_lock = trio.Lock()
        # Record body checks (clanagent.records): peers' records and our own.
        self.records = RecordChecker(
            wall=time.time,
            inventory=lambda: self.inventory.inventory,
            store=lambda: self.store,
            identity=lambda: self.identity,
            clan=lambda: self.anchor.clan_id if self.anchor else b"",
        )
        self.bus = AgentBus(self.publish_record)
        # over whichever gossip node runs now (a clan change restarts gossip)
        self.membership = NodeMembership(lambda: None if self.gossip is None else self.gossip.node)
        self.ports: Ports | None = None  # built in run(), once identity and store exist
        # The one control API table (socket and web console), and the parts'
        # answers tests and the topology read directly.
        api = agent_api.build(self)
        self.api, self.node, self.inventory_api, self.vm_api = (
            api.table,
            api.node,
            api.inventory,
            api.vms,
        )

    def _topology_service(self) -> Any:
        from .topology import TopologyService

        def path_kind(node_key: bytes) -> str | None:
            current = getattr(self.mesh, "selector", None)
            current = None if current is None else current.current(node_key)
            return None if current is None else current.kind

        assert self.ports is not None
        return TopologyService(
            self.ports,
            name=self.name,
            machines=self.inventory_api.machines,
            vms=self.vm_api.list,
            capabilities=self.node.capability_rows,
            path_kind=path_kind,
        )

    async def _web_console(self) -> tuple[Any, int]:
        """The web console, started if it is not running: (it, its port)."""
        from .control.protocol import ControlError, ErrorCode
        from .web import WebConsole

        if self._nursery is None:
            raise ControlError(ErrorCode.UNAVAILABLE, "the agent is still starting; try again")
        if self.web is None:
            self.web = WebConsole(self.cfg, self.api)
        return self.web, await self.web.ensure_running(self._nursery)

    # -- gossip hooks ----------------------------------------------------------

    def admit_peer(self, public_key: bytes) -> bool | None:
        return self.inventory.admit_peer(public_key)

    def on_record(self, rec: SignedRecord) -> None:
        """A record was stored (ours or a peer's): tell the parts that care."""
        self.bus.subscriptions.dispatch(rec)

    def _inventory_changed(self, inv: Any) -> None:
        self.events_bus.publish(
            "inventory.head", machines=sorted(inv.machines), hash=inv.hash.hex()
        )
        if self.gossip is not None:
            self.gossip.on_inventory(inv.node_keys())

    def validate_record(self, record: SignedRecord) -> None:
        """The gossip node's `validate=` hook (RecordChecker.validate)."""
        self.records.validate(record)

    @property
    def record_stats(self) -> dict[str, int]:
        return self.records.stats

    async def publish_record(self, kind: str, key: str, body: Any) -> bool:
        """Store a record of ours and gossip it (store only, when gossip is off).

        One our peers would refuse (the same body check as theirs) is not
        published: False, counted in record_stats["own_refusals"]."""
        if not self.records.check_own(kind, key, body):
            return False
        await publish_own(self.gossip, self.anchor, self.store, self.identity, kind, key, body)
        return True

    async def set_anchor(self, anchor: Anchor) -> None:
        """Join (or found) a clan: remember it and restart gossip under its id.

        All under the parts lock: a first start still under way must not see
        the new anchor before gossip runs under it (it started the mesh on
        the old gossip node, which signed our endpoints record with the
        default clan id; peers refused it, scored us down and never learned
        our WireGuard port)."""
        async with self._parts_lock:
            await trio.to_thread.run_sync(save_anchor, self.cfg.state_path, anchor)
            self.inventory.set_anchor(anchor)
            self.anchor = anchor
            log.info("clan set", extra=kv(clan=anchor.clan_id.hex(), name=anchor.name))
            if self._gossip_scope is not None:
                self._gossip_scope.cancel()
            await self._drop_other_clans(anchor.clan_id)
            if self._nursery is not None:
                await self._start_gossip(self._nursery)

    async def _drop_other_clans(self, clan_id: bytes) -> None:
        dropped = await drop_other_clans(self.store, clan_id)
        if dropped:
            log.info("dropped records of another clan", extra=kv(records=dropped))

    # -- lifecycle ----------------------------------------------------------

    def make_ports(self) -> Ports:
        """The ports every part gets (once identity, store and inventory exist)."""
        assert self.identity is not None and self.store is not None
        return Ports(
            clock=TrioClock(),
            identity=self.identity,
            store=self.store,
            bus=self.bus,
            members=self.membership,
            inventory=self.inventory,
            events=self.events_bus,
        )

    def stop(self) -> None:
        self._stopping.set()

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.notify("WATCHDOG=1")
            await trio.sleep(interval)

    async def _start_parts(self, nursery: trio.Nursery) -> None:
        """Start the network parts; each one that cannot run is reported, not fatal."""
        async with self._parts_lock:
            await self._start_gossip(nursery)

    async def _start_web(self) -> None:
        from .control.protocol import ControlError

        try:
            await self._web_console()
        except ControlError:
            pass  # logged and shown in `clanctl status`; the agent runs on

    async def _start_gossip(self, nursery: trio.Nursery) -> None:
        from .gossip.service import GossipService

        seeds = self.cfg.gossip.join or (self.anchor.seeds if self.anchor else ())
        if not (self.cfg.gossip.listen or seeds):
            return
        assert self.identity is not None and self.store is not None
        self.gossip = GossipService(
            self.cfg.gossip,
            identity=self.identity,
            store=self.store,
            name=self.name,
            state_path=self.cfg.state_path,
            anchor=self.anchor,
            admit_peer=self.admit_peer,
            admit_record=self.inventory.admit_record,
            validate=self.validate_record,
            on_record=self.on_record,
            on_member_changed=self.membership.changed,
            events=self.events_bus,
            tor=lambda: None if self.mesh is None else self.mesh.tor,
        )

        async def run(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                self._gossip_scope = scope
                await self.gossip.run(task_status=task_status)

        await nursery.start(run)
        inv = self.inventory.inventory
        if inv is not None:
            self.gossip.on_inventory(inv.node_keys())
        await self._start_mesh(nursery)

    async def _start_mesh(self, nursery: trio.Nursery) -> None:
        from .mesh.service import GossipEndpoint, MeshService

        if self.anchor is None or self.mesh is not None:
            return

        def gossip_listening() -> tuple[str, int] | None:
            g = self.gossip  # the current one: a clan change restarts gossip
            return None if g is None or g.port is None else (g.listen_host, g.port)

        def gossip_add_seed(addr: str) -> None:
            if self.gossip is not None:
                self.gossip.add_seed(addr)

        assert self.ports is not None
        self.mesh = MeshService(
            self.ports,
            cfg=self.cfg.mesh,
            state_path=self.cfg.state_path,
            capabilities=self.capabilities,
            gossip_endpoint=GossipEndpoint(gossip_listening, gossip_add_seed),
            inventory_endpoints=self.inventory_api.endpoints,
        )
        await nursery.start(self.mesh.run)
        from .services.service import ServicesService

        assert self.ports is not None
        self.services = ServicesService(self.ports, runtime_dir=self.cfg.runtime_dir)
        await nursery.start(self.services.run)
        from .secrets.service import SecretsService

        self.secrets = SecretsService(
            self.ports,
            runtime_dir=self.cfg.runtime_dir,
            default_owner=self.cfg.secrets_owner,
            on_public_files_changed=self.services.wake,
        )
        await nursery.start(self.secrets.run)
        from .vmhost.service import VmService

        assert self.ports is not None
        self.vms = VmService(
            self.ports,
            state_dir=self.cfg.state_dir,
            runtime_dir=self.cfg.runtime_dir,
            clan_interface=self.cfg.mesh.interface,
            console_port=self.cfg.mesh.console_port,
            wireguard=self.cfg.mesh.wireguard,
            overlay6=lambda: None if self.mesh is None else self.mesh.overlay6,
        )
        await nursery.start(self.vms.run)
        self.topology = self._topology_service()
        await nursery.start(self.topology.run)
        await nursery.start(self.vms.serve_consoles)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.cfg
        state = cfg.state_path
        self.identity, created = await trio.to_thread.run_sync(load_or_create, state)
        if created:
            log.info("generated node keys", extra=kv(state_dir=state))
        g = self.cfg.gossip
        quota = RecordLimits(
            g.max_records_per_origin, g.max_bytes_per_origin, g.max_records, g.max_bytes
        )
        self.store = await trio.to_thread.run_sync(
            functools.partial(Store.open, state / "records", quota=quota, durable=is_durable)
        )
        self.anchor = await trio.to_thread.run_sync(load_anchor, state)
        if self.anchor is not None:
            await self._drop_other_clans(self.anchor.clan_id)
        self.inventory = InventoryManager(self.anchor)
        self.inventory.listeners.append(self._inventory_changed)
        # Every version we ever accepted is in the store: rebuild the head from it.
        await trio.to_thread.run_sync(self.inventory.load, list(self.store.records()))
        self.ports = self.make_ports()
        self.capabilities = await trio.to_thread.run_sync(probe_all)
        for cap in self.capabilities:
            if not cap.available:
                log.info("capability unavailable", extra=kv(name=cap.name, reason=cap.reason))
        self.control = ControlServer(Path(cfg.control.socket), self.api, cfg.control)
        self.control.bind()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.control.serve)
            await self._start_parts(nursery)
            if cfg.web.enabled:
                await self._start_web()
            wd = watchdog_interval()
            if wd:
                nursery.start_soon(self._watchdog, wd)
            self.notifier.notify("READY=1", f"STATUS=node {self.identity.short_id} running")
            log.info(
                "agent started",
                extra=kv(
                    node=self.identity.short_id,
                    version=__version__,
                    control=cfg.control.socket,
                    records=len(self.store),
                ),
            )
            self.events_bus.publish("agent.started", node_id=self.identity.node_id)
            task_status.started(self)
            await self._stopping.wait()
            self.notifier.notify("STOPPING=1")
            log.info("agent stopping")
            self.events_bus.publish("agent.stopping")
            self.events_bus.close()
            # Give event streams a moment to deliver the last events and end.
            with trio.move_on_after(0.5):
                while self.events_bus.subscribers:
                    await trio.sleep(0.01)
            if self.web is not None:
                self.web.stop()
            if self.gossip is not None:
                with trio.move_on_after(min(1.0, cfg.shutdown_timeout / 2)):
                    await self.gossip.leave()
            nursery.cancel_scope.cancel()
        log.info("agent stopped")
