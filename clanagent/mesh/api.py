"""The mesh's control method `path`, and the dialer other parts' methods use
to reach a machine's console server over the mesh.

Owns: ranking the paths to a machine for `path` (from the running
`MeshService`, or from what the store knows when the mesh does not run
here, changing nothing) and opening a TCP stream to another machine's
overlay address for `vm.console`.
Must never: change a path or a WireGuard peer (reads only), or dial a
machine when the mesh is not up here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..control.api import ApiTable, handler
from ..control.protocol import ControlError, ErrorCode

__all__ = ["console_dialer", "register"]


def register(
    table: ApiTable,
    *,
    mesh: Callable[[], Any],
    has_inventory: Callable[[], bool],
    ports: Callable[[], Any],
    inventory_endpoints: Callable[[], dict[str, list[str]]],
) -> None:
    async def path(params: dict[str, Any]) -> Any:
        machine = params.get("machine")
        if not isinstance(machine, str) or not machine:
            raise ControlError(ErrorCode.INVALID_PARAMS, "parameter 'machine' must be a name")
        if not has_inventory():
            raise ControlError(ErrorCode.UNAVAILABLE, "this agent is not in a clan yet")
        service = mesh()
        try:
            if service is None:  # not running: rank what is known, change nothing
                from .service import explain_path

                return explain_path(
                    ports(), machine=machine, inventory_endpoints=inventory_endpoints
                )
            return service.explain(machine)
        except KeyError:
            raise ControlError(
                ErrorCode.INVALID_PARAMS, f"no machine '{machine}' in the inventory"
            ) from None

    table.add(
        handler(
            "path",
            "read",
            path,
            "the chosen path to a machine and the ranked alternatives",
            params=("machine",),
        )
    )


def console_dialer(mesh: Callable[[], Any], port: int) -> Callable[[bytes, bytes, Any], Any]:
    """open(clan id, host node key, console request): a stream to that host's
    console server on its overlay address; ControlError while the mesh is down."""

    def open_console(clan_id: bytes, node_key: bytes, req: Any) -> Any:
        from ..vmhost.attach import open_remote
        from .overlay import overlay_ip6

        service = mesh()
        if service is None or service.backend is None or not port:
            raise ControlError(
                ErrorCode.UNAVAILABLE,
                f"VM {req.vm} runs on {req.machine}, and reaching its console needs "
                "the WireGuard mesh, which is not up here (see 'clanctl status')",
            )
        return open_remote(str(overlay_ip6(clan_id, node_key)), port, req.to_wire())

    return open_console
