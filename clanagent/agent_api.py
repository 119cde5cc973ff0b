"""The agent's control API table: which part answers which method, over what.

Owns: building the one `ApiTable` the control socket and the web console
dispatch through, in the order `methods` lists them: the agent-wide methods
(`status.NodeStatus`), then each part's, registered by the part's own
`api.py` with the few objects it needs -- getters of the part's running
service (a part starts once the agent is in a clan; gossip restarts on a
clan change), the inventory, our identity and store, and the agent's
publish.  Part of the composition root (`agent.py`), kept apart so the
start-up order stays short.
Must never: answer a method itself, or hand a part the agent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import topology_api
from .control.api import ApiTable, register_core
from .inventory import api as inventory_api
from .mesh import api as mesh_api
from .metrics import api as metrics_api
from .metrics.sources import MetricsSources
from .secrets import api as secrets_api
from .services import api as services_api
from .status import NodeStatus
from .vmhost import api as vm_api
from .web import api as web_api

if TYPE_CHECKING:
    from .agent import Agent

__all__ = ["AgentApi", "build"]


@dataclass(frozen=True, slots=True)
class AgentApi:
    table: ApiTable
    node: NodeStatus  # status, whoami, peers, events; capability rows
    inventory: inventory_api.InventoryApi
    vms: vm_api.VmApi
    metrics: metrics_api.MetricsApi


def build(agent: Agent) -> AgentApi:
    def get(name: str) -> Callable[[], Any]:
        return lambda: getattr(agent, name)  # read when called: parts come and go

    def publish(kind: str, key: str, body: Any) -> Any:
        return agent.publish_record(kind, key, body)

    table = ApiTable()
    node = NodeStatus(
        agent.cfg,
        agent.name,
        identity=get("identity"),
        store=get("store"),
        anchor=get("anchor"),
        capabilities=get("capabilities"),
        control=get("control"),
        gossip=get("gossip"),
        mesh=get("mesh"),
        vms=get("vms"),
        web=get("web"),
        record_stats=lambda: agent.records.stats,
        events=agent.events_bus,
    )
    register_core(table, node)
    inventory = inventory_api.InventoryApi(
        inventory=get("inventory"),
        identity=get("identity"),
        members=agent.membership,
        anchor=get("anchor"),
        join=agent.set_anchor,
        publish=publish,
        seeds=lambda: inventory_api.gossip_seeds(agent.gossip),
    )
    inventory_api.register(table, inventory)
    services_api.register(table, services=get("services"))
    vms = vm_api.VmApi(
        inventory=lambda: agent.inventory.inventory,
        identity=get("identity"),
        store=get("store"),
        vms=get("vms"),
        in_clan=lambda: agent.anchor is not None,
        publish=publish,
        open_remote=mesh_api.console_dialer(get("mesh"), agent.cfg.mesh.console_port),
    )
    vm_api.register(table, vms)
    secrets_api.register(table, secrets=get("secrets"))
    mesh_api.register(
        table,
        mesh=get("mesh"),
        has_inventory=lambda: agent.inventory.inventory is not None,
        ports=get("ports"),
        inventory_endpoints=inventory.endpoints,
    )
    topology_api.register(table, topology=get("topology"), make=agent._topology_service)
    web_api.register(table, console=agent._web_console)
    metrics = metrics_api.MetricsApi(
        MetricsSources(
            identity=get("identity"),
            name=agent.name,
            started_wall=node.started_wall,
            capabilities=node.capability_rows,
            inventory=lambda: agent.inventory.inventory,
            gossip=get("gossip"),
            store=get("store"),
            mesh=get("mesh"),
            secrets=get("secrets"),
            vms=get("vms"),
            control=get("control"),
            web=get("web"),
            record_checks=get("records"),
            events=get("events_bus"),
            listener=get("metrics_http"),
        )
    )
    metrics_api.register(table, metrics)
    return AgentApi(table, node, inventory, vms, metrics)
