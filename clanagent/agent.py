"""The composition root: builds every part from the config and runs them.

Owns: start-up order (identity, store, capabilities, control socket, then
the network parts), the one trio nursery everything runs in, sd_notify and
the watchdog, and a clean stop.  Must never: let one part's failure to
start (no tor, no root) stop the others; it reports it as a capability.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio

from . import __version__
from ._eventbus import EventBus
from ._log import kv
from ._sdnotify import Notifier, watchdog_interval
from .capabilities import Capability, probe_all
from .config import Config
from .control.server import ControlServer
from .identity import Identity, load_or_create
from .store import Store

__all__ = ["Agent"]

log = logging.getLogger("clanagent.agent")


class Agent:
    def __init__(self, cfg: Config, *, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier()
        self.events_bus = EventBus()
        self.identity: Identity | None = None
        self.store: Store | None = None
        self.capabilities: list[Capability] = []
        self.control: ControlServer | None = None
        self.started_at = time.monotonic()
        self.started_wall = time.time()
        self.name = cfg.gossip.name or socket.gethostname()
        self.gossip: Any = None  # the gossip service, once it runs
        self._stopping = trio.Event()
        self._nursery: trio.Nursery | None = None

    # -- AgentView (the control API calls these) ----------------------------

    def status(self) -> dict[str, Any]:
        assert self.identity is not None
        caps = [c.to_wire() for c in self.capabilities]
        if self.gossip is not None:
            caps.append(self.gossip.capability().to_wire())
        return {
            "node_id": self.identity.node_id,
            "short_id": self.identity.short_id,
            "name": self.name,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "started_at": self.started_wall,
            "state_dir": str(self.cfg.state_dir),
            "control_socket": str(self.cfg.control.socket),
            "records": len(self.store) if self.store is not None else 0,
            "members": self.gossip.member_counts() if self.gossip is not None else {},
            "gossip_addr": self.gossip.addr if self.gossip is not None else "",
            "capabilities": caps,
        }

    def whoami(self) -> dict[str, Any]:
        ident = self.identity
        assert ident is not None
        from .identity import wg_key_base64

        return {
            "node_id": ident.node_id,
            "short_id": ident.short_id,
            "name": self.name,
            "signing_key": ident.public_key.hex(),
            "box_key": ident.box_public.hex(),
            "wireguard_key": wg_key_base64(ident.wg_public),
        }

    def peers(self) -> list[dict[str, Any]]:
        if self.gossip is None:
            return []
        return self.gossip.peer_table()

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        async for event in self.events_bus.subscribe():
            yield event

    # -- lifecycle ----------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.notify("WATCHDOG=1")
            await trio.sleep(interval)

    async def _start_parts(self, nursery: trio.Nursery) -> None:
        """Start the network parts; each one that cannot run is reported, not fatal."""
        if self.cfg.gossip.listen or self.cfg.gossip.join:
            try:
                from .gossip.service import GossipService
            except ImportError:  # gossip is optional until it is built
                return
            self.gossip = GossipService(self)
            await nursery.start(self.gossip.run)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.cfg
        state = cfg.state_path
        self.identity, created = await trio.to_thread.run_sync(load_or_create, state)
        if created:
            log.info("generated node keys", extra=kv(state_dir=state))
        self.store = await trio.to_thread.run_sync(Store.open, state / "records")
        self.capabilities = await trio.to_thread.run_sync(probe_all)
        for cap in self.capabilities:
            if not cap.available:
                log.info("capability unavailable", extra=kv(name=cap.name, reason=cap.reason))
        self.control = ControlServer(Path(cfg.control.socket), self, cfg.control)
        self.control.bind()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.control.serve)
            await self._start_parts(nursery)
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
            if self.gossip is not None:
                with trio.move_on_after(min(1.0, cfg.shutdown_timeout / 2)):
                    await self.gossip.leave()
            nursery.cancel_scope.cancel()
        log.info("agent stopped")
