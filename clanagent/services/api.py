"""The services part's control method: services (instances, roles, wiring).

Owns: answering `services` from the running `ServicesService` (an empty
list until the agent is in a clan).  Must never: change the wiring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..control.api import ApiTable, handler

__all__ = ["register"]


def register(table: ApiTable, *, services: Callable[[], Any]) -> None:
    async def view(params: dict[str, Any]) -> Any:
        service = services()
        return [] if service is None else service.view()

    table.add(handler("services", "read", view, "service instances, roles and their wiring"))
