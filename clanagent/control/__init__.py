"""The local control socket: protocol, API table, server and client."""

import importlib

# Names load on first use, so `import clanagent.control.x` stays cheap (clanctl
# starts in milliseconds instead of importing trio and every part).
_WHERE = {
    "API_VERSION": "protocol",
    "AgentNotRunning": "client",
    "ApiTable": "api",
    "AgentView": "api",
    "ClientError": "client",
    "ControlClient": "client",
    "ControlError": "protocol",
    "ControlServer": "server",
    "ErrorCode": "protocol",
    "Handler": "api",
    "PeerCred": "server",
    "authorize": "server",
}

__all__ = [
    "API_VERSION",
    "AgentNotRunning",
    "ApiTable",
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


def __getattr__(name: str):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)
