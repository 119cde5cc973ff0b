"""The web console's control method `ui.open` (clanctl only, never the browser).

Owns: starting the console on request (through `console`, which the agent
hands in: it knows the nursery), minting a one-time login URL, and which
admin key that login's session may sign with (`signer_for`): whoever runs
`clanctl ui` as root or as the agent's user may name any key file or fall
back on the configured one; anyone else only a key file of their own.
The console's own `console.*` methods are `actions.py`'s.
Must never: be offered to a web session, or lend one user's admin key to
another.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..control.api import ApiTable, handler
from ..control.protocol import ControlError, ErrorCode
from .actions import SIGNER, AdminKeySource

__all__ = ["register", "signer_for"]


def signer_for(admin_key: str, keys: AdminKeySource) -> tuple[str, int | None] | None:
    """The admin key a new web session may sign with, for whoever runs `clanctl ui`.

    Root and the agent's own user may name any file, or fall back on
    web.admin_key / the default path.  Anyone else (a member of the
    control group) signs only with a key file they own: the agent runs
    as root and must not lend them another user's key."""
    from ..control.server import CURRENT_PEER

    peer = CURRENT_PEER.get(None)
    if peer is None or peer.uid in (0, os.getuid()):
        return (admin_key or str(keys.default_path())), None
    if not admin_key:
        return None
    return admin_key, peer.uid


def register(table: ApiTable, *, console: Callable[[], Awaitable[tuple[Any, int]]]) -> None:
    """`console()` starts the web console if needed: (the WebConsole, its port)."""

    async def ui_open(params: dict[str, Any]) -> Any:
        from .auth import LOGIN_TTL

        admin_key = params.get("admin_key", "")
        if not isinstance(admin_key, str) or len(admin_key) > 4096 or "\0" in admin_key:
            raise ControlError(ErrorCode.INVALID_PARAMS, "'admin_key' must be a file path")
        if admin_key and not os.path.isabs(admin_key):
            raise ControlError(ErrorCode.INVALID_PARAMS, "'admin_key' must be an absolute path")
        web, port = await console()
        signer = signer_for(admin_key, web.keys)
        url = web.login_url(web.app.clock(), signer)
        SIGNER.set(signer)
        key, why = await trio.to_thread.run_sync(web.keys.load)
        return {
            "url": url,
            "port": port,
            "expires_in": LOGIN_TTL,
            "admin_key": {
                "available": key is not None,
                "reason": why,
                "path": signer[0] if signer else "",
            },
        }

    table.add(
        handler(
            "ui.open",
            "write",
            ui_open,
            "start the web console (127.0.0.1 only) and mint a one-time login URL",
            params=("admin_key",),
            surfaces=("socket",),
        )
    )
