"""The local control socket: protocol, API table, server and client."""

from .api import HANDLERS, AgentView, Handler
from .client import AgentNotRunning, ClientError, ControlClient
from .protocol import API_VERSION, ControlError, ErrorCode
from .server import ControlServer, PeerCred, authorize

__all__ = [
    "API_VERSION",
    "HANDLERS",
    "AgentNotRunning",
    "AgentView",
    "ClientError",
    "ControlClient",
    "ControlError",
    "ControlServer",
    "ErrorCode",
    "Handler",
    "PeerCred",
    "authorize",
]
