"""The composition root: builds every part from the config and runs them.

Owns: start-up order (identity, store, capabilities, control socket, then
the network parts; the rest once in a clan), joining a clan, the one trio
nursery everything runs in, sd_notify and the watchdog, and a clean stop.
How each part is built is `agent_parts.py`'s; the one control API table,
which every part's `api.py` fills, is built by `agent_api.py`.
Must never: let one part's failure to start (no tor, no root) stop the
others (it reports it as a capability), hand a part the agent, or answer a
control method itself.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from pathlib import Path
from typing import Any

import trio

from . import __version__, agent_api, agent_parts
from ._eventbus import EventBus
from ._log import kv
from ._sdnotify import Notifier, watchdog, watchdog_interval
from .bus import AgentBus, TrioClock, drop_other_clans, publish_own
from .capabilities import Capability, probe_all
from .config import Config
from .control.protocol import ControlError
from .control.server import ControlServer
from .identity import Identity
from .inventory.anchor import Anchor, save_anchor
from .inventory.manager import InventoryManager
from .ports import NodeMembership, Ports
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
        self.records = agent_parts.record_checker(self)
        self.bus = AgentBus(self.publish_record)
        # over whichever gossip node runs now (a clan change restarts gossip)
        self.membership = NodeMembership(lambda: None if self.gossip is None else self.gossip.node)
        self.ports: Ports | None = None  # built in run(), once identity and store exist
        # The one control API table (socket and web console), and the parts'
        # answers tests and the topology read directly.
        api = agent_api.build(self)
        self.api, self.node = api.table, api.node
        self.inventory_api, self.vm_api = api.inventory, api.vms
        self.metrics_api = api.metrics
        self.metrics_http: Any = None  # the [metrics] listen HTTP listener, when set

    def _topology_service(self) -> Any:
        return agent_parts.topology(self)

    async def _web_console(self) -> tuple[Any, int]:
        """The web console, started if it is not running: (it, its port)."""
        return await agent_parts.web_console(self)

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

    async def publish_record(self, kind: str, key: str, body: Any, *, push: bool = True) -> bool:
        """Store a record of ours and gossip it (store only, when gossip is off).

        One our peers would refuse (the same body check as theirs) is not
        published: False, counted in record_stats["own_refusals"]."""
        if not self.records.check_own(kind, key, body):
            return False
        parts = (self.gossip, self.anchor, self.store, self.identity)
        await publish_own(*parts, kind, key, body, push=push)
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
            await drop_other_clans(self.store, anchor.clan_id)
            if self._nursery is not None:
                await self._start_gossip(self._nursery)

    # -- lifecycle ----------------------------------------------------------

    def make_ports(self) -> Ports:
        """The ports every part gets (once identity, store and inventory exist)."""
        return agent_parts.ports(self)

    def stop(self) -> None:
        self._stopping.set()

    async def _start_gossip(self, nursery: trio.Nursery) -> None:
        seeds = self.cfg.gossip.join or (self.anchor.seeds if self.anchor else ())
        if not (self.cfg.gossip.listen or seeds):
            return
        self.gossip = agent_parts.gossip(self)

        async def run(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                self._gossip_scope = scope
                await self.gossip.run(task_status=task_status)

        await nursery.start(run)
        inv = self.inventory.inventory
        if inv is not None:
            self.gossip.on_inventory(inv.node_keys())
        await self._start_clan_parts(nursery)

    async def _start_clan_parts(self, nursery: trio.Nursery) -> None:
        """Once in a clan: the mesh, service wiring, secrets, VMs and the topology."""
        if self.anchor is None or self.mesh is not None:
            return
        self.mesh = agent_parts.mesh(self)
        await nursery.start(self.mesh.run)
        self.services = agent_parts.services(self)
        await nursery.start(self.services.run)
        self.secrets = agent_parts.secrets(self)
        await nursery.start(self.secrets.run)
        self.vms = agent_parts.vms(self)
        await nursery.start(self.vms.run)
        self.topology = agent_parts.topology(self)
        await nursery.start(self.topology.run)
        await nursery.start(self.vms.serve_consoles)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.cfg
        opened = await trio.to_thread.run_sync(agent_parts.open_state, cfg)
        self.identity, created, self.store, self.anchor = opened
        if created:
            log.info("generated node keys", extra=kv(state_dir=cfg.state_path))
        if self.anchor is not None:
            await drop_other_clans(self.store, self.anchor.clan_id)
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
            if cfg.metrics.listen:
                from .metrics.http import start_http

                self.metrics_http, cap = await start_http(
                    cfg.metrics.listen, self.metrics_api.scrape_async, nursery
                )
                self.capabilities.append(cap)
            async with self._parts_lock:  # each part that cannot run is reported, not fatal
                await self._start_gossip(nursery)
            if cfg.web.enabled:
                with contextlib.suppress(ControlError):  # logged, and shown in `clanctl status`
                    await self._web_console()
            wd = watchdog_interval()
            if wd:
                nursery.start_soon(watchdog, self.notifier, wd)
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
