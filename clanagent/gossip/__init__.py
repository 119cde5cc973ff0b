"""gossip: authenticated peer sessions, SWIM membership with Lifeguard, and
dissemination plus anti-entropy of signed records.

Sans-IO cores (`handshake`, `session`, `membership`, `broadcast_queue`,
`antientropy`, `pipeline` for records, `messages` for the datagram, composed
in `node`) and one trio shell (`service`).
"""

from .config import GossipConfig
from .errors import GossipError, LocalProtocolError, PeerDisconnected, RemoteProtocolError
from .node import (
    GossipNode,
    MemberChanged,
    MsgType,
    PeerMisbehaved,
    Persist,
    RecordAccepted,
    SendTo,
)

__all__ = [
    "GossipConfig",
    "GossipError",
    "GossipNode",
    "LocalProtocolError",
    "MemberChanged",
    "MsgType",
    "PeerDisconnected",
    "PeerMisbehaved",
    "Persist",
    "RecordAccepted",
    "RemoteProtocolError",
    "SendTo",
]
