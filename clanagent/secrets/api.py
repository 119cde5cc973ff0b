"""The secrets part's control methods: secrets.list and secrets.rotate.

Owns: the parameter checks of those methods and the errors they answer,
over the running `SecretsService` (None until the agent is in a clan).
Must never: show a secret's value (the service's rows carry none), or
rotate anything itself: it asks the service, which publishes the request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..control.api import ApiTable, handler
from ..control.protocol import ControlError, ErrorCode

__all__ = ["register"]


def register(table: ApiTable, *, secrets: Callable[[], Any]) -> None:
    async def secrets_list(params: dict[str, Any]) -> Any:
        service = secrets()
        return [] if service is None else service.rows()

    async def rotate(params: dict[str, Any]) -> Any:
        sid = params.get("id")
        if not isinstance(sid, str) or not sid:
            raise ControlError(ErrorCode.INVALID_PARAMS, "parameter 'id' must be SERVICE/NAME")
        service = secrets()
        if service is None:
            raise ControlError(ErrorCode.UNAVAILABLE, "this agent is not in a clan yet")
        try:
            return await service.request_rotation(sid)
        except KeyError as exc:
            raise ControlError(ErrorCode.INVALID_PARAMS, str(exc.args[0])) from None

    table.add(
        handler(
            "secrets.list",
            "read",
            secrets_list,
            "secret instances: generation, age, holders, public parts (never values)",
        ),
        handler("secrets.rotate", "write", rotate, "ask for a new generation now", params=("id",)),
    )
