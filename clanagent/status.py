"""What this node says about itself: the agent-wide control methods.

Owns: the answers of `status` (identity, uptime, clan, capability rows of
every part, each part's counters), `whoami`, `peers` and `events` (the
`AgentView` of `control/api.py`), and the capability rows the topology
shows too.  It reads each part through a getter (a part may not run yet,
and gossip is restarted on a clan change).
Must never: touch the disk or the network (`status` must answer at the fd
limit), or change what it reports on.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from . import __version__
from .capabilities import Capability
from .config import Config
from .identity import wg_key_base64

__all__ = ["NodeStatus"]

WEB_OFF = "off: 'clanctl ui' starts it for this run (or set web.enabled = true)"

Getter = Callable[[], Any]


class NodeStatus:
    def __init__(
        self,
        cfg: Config,
        name: str,
        *,
        identity: Getter,
        store: Getter,
        anchor: Getter,
        capabilities: Callable[[], list[Capability]],
        control: Getter,
        gossip: Getter,
        mesh: Getter,
        vms: Getter,
        web: Getter,
        record_stats: Callable[[], dict[str, int]],
        events: Any,
    ) -> None:
        self.cfg = cfg
        self.name = name
        self._identity, self._store, self._anchor = identity, store, anchor
        self._capabilities = capabilities
        self._control, self._gossip, self._mesh, self._vms, self._web = (
            control,
            gossip,
            mesh,
            vms,
            web,
        )
        self._record_stats = record_stats
        self._events = events
        self.started_at = time.monotonic()
        self.started_wall = time.time()

    def capability_rows(self) -> list[dict[str, Any]]:
        """What this machine can do, one row a capability (status and topology show it)."""
        caps = [c.to_wire() for c in self._capabilities()]
        gossip, mesh, vms, web = self._gossip(), self._mesh(), self._vms(), self._web()
        if gossip is not None:
            caps.append(gossip.capability().to_wire())
        if mesh is not None:
            caps += [c.to_wire() for c in mesh.capabilities()]
        if vms is not None:
            caps.append(vms.capability().to_wire())
        if web is not None:
            caps.append(web.capability().to_wire())
        else:
            off = "starting" if self.cfg.web.enabled else WEB_OFF
            caps.append(Capability("web", False, off).to_wire())
        return caps

    def status(self) -> dict[str, Any]:
        ident, store, anchor, gossip = (
            self._identity(),
            self._store(),
            self._anchor(),
            self._gossip(),
        )
        assert ident is not None
        caps = self.capability_rows()
        return {
            "node_id": ident.node_id,
            "short_id": ident.short_id,
            "name": self.name,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "started_at": self.started_wall,
            "state_dir": str(self.cfg.state_dir),
            "control_socket": str(self.cfg.control.socket),
            "records": len(store) if store is not None else 0,
            "members": gossip.member_counts() if gossip is not None else {},
            "gossip_addr": gossip.addr if gossip is not None else "",
            "clan": None if anchor is None else {"id": anchor.clan_id.hex(), "name": anchor.name},
            "capabilities": caps,
            "counters": self.counters(),
        }

    def counters(self) -> dict[str, dict[str, int]]:
        """Each part's limit and fault counters (`clanctl status` shows them).

        Built from memory only, so `status` still answers at the fd limit."""
        out: dict[str, dict[str, int]] = {}
        for name, part in (
            ("control", self._control()),
            ("gossip", self._gossip()),
            ("web", self._web()),
        ):
            counters = getattr(part, "counters", None)
            if callable(counters):
                out[name] = dict(counters())
        records = dict(self._record_stats())
        store = self._store()
        if store is not None:
            records.update({f"store_{k}": v for k, v in store.stats.items()})
        out["records"] = records
        return out

    def whoami(self) -> dict[str, Any]:
        ident = self._identity()
        assert ident is not None
        return {
            "node_id": ident.node_id,
            "short_id": ident.short_id,
            "name": self.name,
            "signing_key": ident.public_key.hex(),
            "box_key": ident.box_public.hex(),
            "wireguard_key": wg_key_base64(ident.wg_public),
        }

    def peers(self) -> list[dict[str, Any]]:
        gossip = self._gossip()
        return [] if gossip is None else gossip.peer_table()

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        async for event in self._events.subscribe():
            yield event
