"""The topology part's control method: topology (the clan map this machine sees).

Owns: answering `topology` from the running `TopologyService`, or from one
built for the occasion (`make`) before the agent is in a clan.
Must never: publish anything (a read), or wait on the network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .control.api import ApiTable, handler

__all__ = ["register"]


def register(table: ApiTable, *, topology: Callable[[], Any], make: Callable[[], Any]) -> None:
    async def view(params: dict[str, Any]) -> Any:
        return (topology() or make()).view()

    table.add(
        handler(
            "topology",
            "read",
            view,
            "machines, the links between them (path kind, RTT), services and VMs",
        )
    )
