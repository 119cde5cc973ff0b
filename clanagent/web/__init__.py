"""The web console: a map of the clan and its machines, services, VMs and secrets.

Served by the agent on 127.0.0.1 only (`clanctl ui` starts it and prints a
one-time login URL); every action goes through the one control API table
(`api`: `ui.open` for clanctl; `actions`: the console's own methods;
`guided`: adding and removing machines and applying services, each a preview
then a signature over exactly what it showed; `qr`: the join token's QR code).
"""

from typing import Any

from .auth import Authenticator, AuthError

__all__ = ["Authenticator", "AuthError", "BIND_HOST", "WebConsole"]


def __getattr__(name: str) -> Any:
    # The server (hypercorn, h2, wsproto: several MB) loads only when the
    # console starts: an agent whose console never runs does not carry it.
    if name in ("BIND_HOST", "WebConsole"):
        from . import server

        return getattr(server, name)
    raise AttributeError(name)
