"""The web console: a map of the clan and its machines, services, VMs and secrets.

Served by the agent on 127.0.0.1 only (`clanctl ui` starts it and prints a
one-time login URL); every action goes through the one control API table
(`api`: `ui.open` for clanctl; `actions`: the console's own methods;
`guided`: adding and removing machines and applying services, each a preview
then a signature over exactly what it showed; `qr`: the join token's QR code).
"""

from .auth import Authenticator, AuthError
from .server import BIND_HOST, WebConsole

__all__ = ["Authenticator", "AuthError", "BIND_HOST", "WebConsole"]
