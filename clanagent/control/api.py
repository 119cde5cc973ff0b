"""The control API: one versioned table of handlers, each marked read or write.

Owns: the table (`ApiTable`: version -> method -> `Handler`), the shape of a
handler (access level, parameters, streaming or upgrading the connection,
and the surfaces that offer it: the control socket, the web console, or
both), the one lookup both surfaces dispatch through, and the agent-wide
methods over the small `AgentView` (status, whoami, peers, events, methods).
Every other method is registered by the part it serves, from that part's
`api.py` (`inventory/api.py`, `vmhost/api.py`, `secrets/api.py`,
`services/api.py`, `mesh/api.py`, `web/api.py`, `topology_api.py`,
`metrics/api.py`), with the few objects it needs; the web console's own
`console.*` methods go into the same table, so a method has one access
level wherever it is called from.
Only append to a version's table; a changed meaning gets a new version.
Must never: let a caller with read access run a write handler, offer a method
on a surface it was not registered for, or reach into the agent beyond
`AgentView`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from .protocol import ControlError, ErrorCode

__all__ = [
    "Access",
    "AgentView",
    "ApiTable",
    "BOTH",
    "Handler",
    "Surface",
    "check_params",
    "handler",
    "register_core",
]

Access = Literal["read", "write"]
# Where a method may be called from: the unix control socket (clanctl) and/or
# a web console session.  `ui.open` mints console logins for the local user
# who asks, so the browser never gets it; `console.*` sign with the web
# session's admin key, so the socket never gets them.
Surface = Literal["socket", "web"]
BOTH: frozenset[str] = frozenset({"socket", "web"})


class AgentView(Protocol):
    """What the agent-wide methods need (the agent's `NodeStatus` implements it)."""

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
    # call(params): a coroutine with the result, an async iterator (streaming),
    # or an async context manager yielding the other byte stream (upgrade).
    call: Callable[[dict[str, Any]], Any]
    # After an ok reply the connection carries raw bytes both ways (a console).
    upgrade: bool = False
    surfaces: frozenset[str] = BOTH

    def allows(self, access: str) -> bool:
        """May a caller with `access` ("read" or "write") run this handler?"""
        return self.access == "read" or access == "write"


def handler(
    name: str,
    access: Access,
    call: Callable[[dict[str, Any]], Any],
    doc: str,
    *,
    streaming: bool = False,
    params: tuple[str, ...] = (),
    upgrade: bool = False,
    surfaces: Iterable[str] = BOTH,
) -> Handler:
    return Handler(
        name, access, streaming, frozenset(params), doc, call, upgrade, frozenset(surfaces)
    )


def check_params(handler: Handler, params: dict[str, Any]) -> None:
    unknown = set(params) - handler.params
    if unknown:
        raise ControlError(ErrorCode.INVALID_PARAMS, f"unknown parameter(s): {sorted(unknown)}")


class ApiTable:
    """The one table of control methods, by API version, in registration order."""

    def __init__(self) -> None:
        self._versions: dict[int, dict[str, Handler]] = {}

    @classmethod
    def of(cls, api: ApiTable | AgentView) -> ApiTable:
        """`api` itself, or a table of the agent-wide methods over an AgentView."""
        if isinstance(api, ApiTable):
            return api
        table = cls()
        register_core(table, api)
        return table

    def add(self, *handlers: Handler, version: int = 1) -> None:
        table = self._versions.setdefault(version, {})
        for h in handlers:
            if h.name in table:
                raise ValueError(f"control method '{h.name}' is registered twice")
            table[h.name] = h

    def handlers(self, version: int = 1, surface: str | None = None) -> list[Handler]:
        return [
            h
            for h in self._versions.get(version, {}).values()
            if surface is None or surface in h.surfaces
        ]

    def lookup(self, version: int, method: str, surface: str = "socket") -> Handler:
        """The handler of `method` for a caller on `surface`; ControlError if none.

        A method of the other surface only is unknown on the socket (clanctl
        never sees the console's methods) and refused in the browser."""
        table = self._versions.get(version)
        if table is None:
            raise ControlError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"API version {version} is not supported (this agent speaks "
                f"{min(self._versions)}..{max(self._versions)}): upgrade clanctl or the agent",
            )
        h = table.get(method)
        if h is not None and surface not in h.surfaces and surface == "web":
            raise ControlError(
                ErrorCode.PERMISSION_DENIED,
                f"'{method}' is for clanctl on this machine, not for the browser",
            )
        if h is None or surface not in h.surfaces:
            known = sorted(n for n, x in table.items() if surface in x.surfaces)
            raise ControlError(
                ErrorCode.UNKNOWN_METHOD, f"unknown method '{method}' (known: {', '.join(known)})"
            )
        return h

    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        version: int = 1,
        surface: str = "socket",
    ) -> Any:
        """Run one plain (not streaming, not upgrading) method, parameters checked."""
        h = self.lookup(version, method, surface)
        params = params or {}
        check_params(h, params)
        if h.streaming or h.upgrade:
            raise ControlError(ErrorCode.INVALID_PARAMS, f"'{method}' is not a plain call")
        return await h.call(params)


def register_core(table: ApiTable, view: AgentView) -> None:
    """The agent-wide methods, first in version 1 (their order is `methods`' order)."""

    async def status(params: dict[str, Any]) -> Any:
        return view.status()

    async def whoami(params: dict[str, Any]) -> Any:
        return view.whoami()

    async def peers(params: dict[str, Any]) -> Any:
        return view.peers()

    def events(params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return view.events()

    async def methods(params: dict[str, Any]) -> Any:
        # clanctl's list: what the control socket offers
        return [
            {"name": h.name, "access": h.access, "streaming": h.streaming, "doc": h.doc}
            for h in table.handlers(1, "socket")
        ]

    table.add(
        handler("status", "read", status, "node id, version, uptime and capabilities"),
        handler("whoami", "read", whoami, "this node's identity and public keys"),
        handler("peers", "read", peers, "members of the clan this node knows"),
        handler("events", "read", events, "stream of agent events", streaming=True),
        handler("methods", "read", methods, "the methods of this API version"),
    )
