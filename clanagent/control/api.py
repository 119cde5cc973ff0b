"""The control API: a versioned table of handlers, each marked read or write.

Owns: which methods exist in which API version, their access level, their
parameter checks, and how they map onto the agent.  Only append to a
version's table; a changed meaning gets a new version.  Must never: reach
into the agent's internals beyond the small `AgentView` protocol below, or
let a caller with read access run a write handler.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from .protocol import ControlError, ErrorCode

__all__ = ["Access", "Handler", "HANDLERS", "AgentView", "lookup"]

Access = Literal["read", "write"]


class AgentView(Protocol):
    """What the control API needs from the agent (the agent implements it)."""

    def status(self) -> dict[str, Any]: ...
    def whoami(self) -> dict[str, Any]: ...
    def peers(self) -> list[dict[str, Any]]: ...
    def events(self) -> AsyncIterator[dict[str, Any]]: ...


@dataclass(frozen=True, slots=True)
class Handler:
    name: str
    access: Access
    streaming: bool
    params: frozenset[str]
    doc: str
    call: Callable[..., Any]
    # After an ok reply the connection carries raw bytes both ways (a console):
    # `call` returns an async context manager that yields the other stream.
    upgrade: bool = False


def _no_params(params: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = set(params) - allowed
    if unknown:
        raise ControlError(ErrorCode.INVALID_PARAMS, f"unknown parameter(s): {sorted(unknown)}")


async def _status(agent: AgentView, params: dict[str, Any]) -> Any:
    return agent.status()


async def _whoami(agent: AgentView, params: dict[str, Any]) -> Any:
    return agent.whoami()


async def _peers(agent: AgentView, params: dict[str, Any]) -> Any:
    return agent.peers()


def _events(agent: AgentView, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    return agent.events()


async def _inventory_show(agent: Any, params: dict[str, Any]) -> Any:
    return agent.inventory_show()


async def _inventory_history(agent: Any, params: dict[str, Any]) -> Any:
    return agent.inventory_history()


async def _inventory_conflicts(agent: Any, params: dict[str, Any]) -> Any:
    return agent.inventory_conflicts()


async def _inventory_submit(agent: Any, params: dict[str, Any]) -> Any:
    if "version" not in params:
        raise ControlError(ErrorCode.INVALID_PARAMS, "missing parameter 'version'")
    init = params.get("init", False)
    if not isinstance(init, bool):
        raise ControlError(ErrorCode.INVALID_PARAMS, "'init' must be true or false")
    return await agent.inventory_submit(params["version"], init)


async def _inventory_endpoints(agent: Any, params: dict[str, Any]) -> Any:
    return agent.inventory_endpoints()


async def _machines(agent: Any, params: dict[str, Any]) -> Any:
    return agent.machines()


async def _invite(agent: Any, params: dict[str, Any]) -> Any:
    machine = params.get("machine")
    if not isinstance(machine, str) or not machine:
        raise ControlError(ErrorCode.INVALID_PARAMS, "parameter 'machine' must be a name")
    return agent.invite(machine)


async def _path(agent: Any, params: dict[str, Any]) -> Any:
    machine = params.get("machine")
    if not isinstance(machine, str) or not machine:
        raise ControlError(ErrorCode.INVALID_PARAMS, "parameter 'machine' must be a name")
    return agent.path(machine)


async def _services(agent: Any, params: dict[str, Any]) -> Any:
    return agent.services_view()


async def _secrets_list(agent: Any, params: dict[str, Any]) -> Any:
    return agent.secrets_rows()


async def _secrets_rotate(agent: Any, params: dict[str, Any]) -> Any:
    sid = params.get("id")
    if not isinstance(sid, str) or not sid:
        raise ControlError(ErrorCode.INVALID_PARAMS, "parameter 'id' must be SERVICE/NAME")
    return await agent.secrets_rotate(sid)


async def _vm_list(agent: Any, params: dict[str, Any]) -> Any:
    return agent.vm_list()


async def _vm_request(agent: Any, params: dict[str, Any]) -> Any:
    if "request" not in params:
        raise ControlError(ErrorCode.INVALID_PARAMS, "missing parameter 'request'")
    return await agent.vm_request(params["request"])


async def _vm_logs(agent: Any, params: dict[str, Any]) -> Any:
    name, since = params.get("name"), params.get("since", 0)
    if not isinstance(name, str) or not name:
        raise ControlError(ErrorCode.INVALID_PARAMS, "parameter 'name' must be a VM name")
    if type(since) is not int or since < 0:
        raise ControlError(ErrorCode.INVALID_PARAMS, "'since' must be a unix time")
    return await agent.vm_logs(name, since)


def _vm_console(agent: Any, params: dict[str, Any]) -> Any:
    if "request" not in params:
        raise ControlError(ErrorCode.INVALID_PARAMS, "missing parameter 'request'")
    return agent.vm_console(params["request"])


async def _topology(agent: Any, params: dict[str, Any]) -> Any:
    return agent.topology_view()


async def _ui_open(agent: Any, params: dict[str, Any]) -> Any:
    admin_key = params.get("admin_key", "")
    if not isinstance(admin_key, str) or len(admin_key) > 4096 or "\0" in admin_key:
        raise ControlError(ErrorCode.INVALID_PARAMS, "'admin_key' must be a file path")
    return await agent.ui_open(admin_key)


async def _methods(agent: AgentView, params: dict[str, Any]) -> Any:
    return [
        {"name": h.name, "access": h.access, "streaming": h.streaming, "doc": h.doc}
        for h in HANDLERS[1].values()
    ]


def _h(
    name: str,
    access: Access,
    call: Callable[..., Awaitable[Any] | AsyncIterator[Any]],
    doc: str,
    *,
    streaming: bool = False,
    params: tuple[str, ...] = (),
    upgrade: bool = False,
) -> Handler:
    return Handler(name, access, streaming, frozenset(params), doc, call, upgrade)


# The table.  Only append to a version's list.
HANDLERS: dict[int, dict[str, Handler]] = {
    1: {
        h.name: h
        for h in [
            _h("status", "read", _status, "node id, version, uptime and capabilities"),
            _h("whoami", "read", _whoami, "this node's identity and public keys"),
            _h("peers", "read", _peers, "members of the clan this node knows"),
            _h("events", "read", _events, "stream of agent events", streaming=True),
            _h("methods", "read", _methods, "the methods of this API version"),
            _h("inventory.show", "read", _inventory_show, "the effective inventory and its head"),
            _h("inventory.history", "read", _inventory_history, "every accepted version"),
            _h(
                "inventory.conflicts",
                "read",
                _inventory_conflicts,
                "entries concurrent edits changed differently",
            ),
            _h(
                "inventory.submit",
                "write",
                _inventory_submit,
                "offer a signed inventory version",
                params=("version", "init"),
            ),
            _h(
                "inventory.endpoints",
                "write",
                _inventory_endpoints,
                "every machine's endpoints, opened (they travel sealed)",
            ),
            _h("machines", "read", _machines, "machines of the clan with tags and state"),
            _h(
                "invite",
                "write",
                _invite,
                "a join token for a machine of the inventory",
                params=("machine",),
            ),
            _h("services", "read", _services, "service instances, roles and their wiring"),
            _h("vm.list", "read", _vm_list, "every VM of the clan, from every host's status"),
            _h(
                "vm.logs",
                "read",
                _vm_logs,
                "a VM's console tail, from whichever machine hosts it",
                params=("name", "since"),
            ),
            _h(
                "vm.request",
                "write",
                _vm_request,
                "an admin-signed start/stop/restart of a VM, for its host",
                params=("request",),
            ),
            _h(
                "vm.console",
                "write",
                _vm_console,
                "attach to a VM's serial console (admin-signed); the connection "
                "then carries raw console bytes",
                params=("request",),
                upgrade=True,
            ),
            _h(
                "secrets.list",
                "read",
                _secrets_list,
                "secret instances: generation, age, holders, public parts (never values)",
            ),
            _h(
                "secrets.rotate",
                "write",
                _secrets_rotate,
                "ask for a new generation now",
                params=("id",),
            ),
            _h(
                "path",
                "read",
                _path,
                "the chosen path to a machine and the ranked alternatives",
                params=("machine",),
            ),
            _h(
                "topology",
                "read",
                _topology,
                "machines, the links between them (path kind, RTT), services and VMs",
            ),
            _h(
                "ui.open",
                "write",
                _ui_open,
                "start the web console (127.0.0.1 only) and mint a one-time login URL",
                params=("admin_key",),
            ),
        ]
    }
}


def lookup(version: int, method: str) -> Handler:
    table = HANDLERS.get(version)
    if table is None:
        raise ControlError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"API version {version} is not supported (this agent speaks "
            f"{min(HANDLERS)}..{max(HANDLERS)}): upgrade clanctl or the agent",
        )
    handler = table.get(method)
    if handler is None:
        raise ControlError(
            ErrorCode.UNKNOWN_METHOD,
            f"unknown method '{method}' (known: {', '.join(sorted(table))})",
        )
    return handler


def check_params(handler: Handler, params: dict[str, Any]) -> None:
    _no_params(params, handler.params)
