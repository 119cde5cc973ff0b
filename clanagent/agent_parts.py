"""How the agent builds each part: from the config, the ports, and getters of
the few other parts it must follow.

Owns: the constructor call of every long-running part (gossip, mesh,
service wiring, secrets, VMs, topology) and opening the state directory
(node keys, record store with its quotas, clan anchor), the ports and the
record checker.  Part of the
composition root: `agent.py` decides when each part starts and stops.
Must never: start a part, or hand a part the agent (each gets ports,
settings and narrow callables; a getter reads the agent's attribute when
called, because gossip restarts on a clan change and the other parts start
only once the agent is in a clan).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .config import Config
from .gossip.config import RecordLimits
from .identity import Identity, load_or_create
from .inventory.anchor import Anchor, load_anchor
from .ports import Ports
from .record_checks import RecordChecker
from .records import is_durable
from .store import Store

if TYPE_CHECKING:
    from .agent import Agent

__all__ = [
    "gossip",
    "mesh",
    "open_state",
    "ports",
    "record_checker",
    "secrets",
    "services",
    "topology",
    "vms",
]


def open_state(cfg: Config) -> tuple[Identity, bool, Store, Anchor | None]:
    """(node keys, whether they were just made, the record store, our clan). Blocking."""
    state = cfg.state_path
    identity, created = load_or_create(state)
    g = cfg.gossip
    quota = RecordLimits(
        g.max_records_per_origin, g.max_bytes_per_origin, g.max_records, g.max_bytes
    )
    store = Store.open(state / "records", quota=quota, durable=is_durable)
    return identity, created, store, load_anchor(state)


def ports(agent: Agent) -> Ports:
    """The ports every part gets (once identity, store and inventory exist)."""
    from .bus import TrioClock

    assert agent.identity is not None and agent.store is not None
    return Ports(
        clock=TrioClock(),
        identity=agent.identity,
        store=agent.store,
        bus=agent.bus,
        members=agent.membership,
        inventory=agent.inventory,
        events=agent.events_bus,
    )


def record_checker(agent: Agent) -> RecordChecker:
    """Record body checks (clanagent.records): of peers' records and of our own."""
    return RecordChecker(
        wall=time.time,
        inventory=lambda: agent.inventory.inventory,
        store=lambda: agent.store,
        identity=lambda: agent.identity,
        clan=lambda: agent.anchor.clan_id if agent.anchor else b"",
    )


def gossip(agent: Agent) -> Any:
    from .gossip.service import GossipService

    assert agent.identity is not None and agent.store is not None
    return GossipService(
        agent.cfg.gossip,
        identity=agent.identity,
        store=agent.store,
        name=agent.name,
        state_path=agent.cfg.state_path,
        anchor=agent.anchor,
        admit_peer=agent.admit_peer,
        admit_record=agent.inventory.admit_record,
        validate=agent.validate_record,
        on_record=agent.on_record,
        on_member_changed=agent.membership.changed,
        events=agent.events_bus,
        tor=lambda: None if agent.mesh is None else agent.mesh.tor,
    )


def mesh(agent: Agent) -> Any:
    from .mesh.service import GossipEndpoint, MeshService

    def gossip_listening() -> tuple[str, int] | None:
        g = agent.gossip  # the current one: a clan change restarts gossip
        return None if g is None or g.port is None else (g.listen_host, g.port)

    def gossip_add_seed(addr: str) -> None:
        if agent.gossip is not None:
            agent.gossip.add_seed(addr)

    assert agent.ports is not None
    return MeshService(
        agent.ports,
        cfg=agent.cfg.mesh,
        state_path=agent.cfg.state_path,
        capabilities=agent.capabilities,
        gossip_endpoint=GossipEndpoint(gossip_listening, gossip_add_seed),
        inventory_endpoints=agent.inventory_api.endpoints,
    )


def services(agent: Agent) -> Any:
    from .services.service import ServicesService

    assert agent.ports is not None
    return ServicesService(agent.ports, runtime_dir=agent.cfg.runtime_dir)


def secrets(agent: Agent) -> Any:
    from .secrets.service import SecretsService

    assert agent.ports is not None
    return SecretsService(
        agent.ports,
        runtime_dir=agent.cfg.runtime_dir,
        default_owner=agent.cfg.secrets_owner,
        on_public_files_changed=agent.services.wake,
    )


def vms(agent: Agent) -> Any:
    from .vmhost.service import VmService

    assert agent.ports is not None
    cfg = agent.cfg
    return VmService(
        agent.ports,
        state_dir=cfg.state_dir,
        runtime_dir=cfg.runtime_dir,
        clan_interface=cfg.mesh.interface,
        console_port=cfg.mesh.console_port,
        wireguard=cfg.mesh.wireguard,
        overlay6=lambda: None if agent.mesh is None else agent.mesh.overlay6,
    )


def topology(agent: Agent) -> Any:
    """Also built for one `topology` answer before the agent is in a clan."""
    from .topology import TopologyService

    def path_kind(node_key: bytes) -> str | None:
        return None if agent.mesh is None else agent.mesh.path_kind(node_key)

    assert agent.ports is not None
    return TopologyService(
        agent.ports,
        name=agent.name,
        machines=agent.inventory_api.machines,
        vms=agent.vm_api.rows,
        capabilities=agent.node.capability_rows,
        path_kind=path_kind,
    )


async def web_console(agent: Any) -> tuple[Any, int]:
    """The agent's web console, started if it is not running: (it, its port)."""
    from .control.protocol import ControlError, ErrorCode
    from .web import WebConsole

    if agent._nursery is None:
        raise ControlError(ErrorCode.UNAVAILABLE, "the agent is still starting; try again")
    if agent.web is None:
        agent.web = WebConsole(agent.cfg, agent.api)
    return agent.web, await agent.web.ensure_running(agent._nursery)
