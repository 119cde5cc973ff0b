"""The errors of the gossip part.

Owns: one base (`GossipError`) split into the kinds a caller must handle
differently -- our own misuse (`LocalProtocolError`), a peer that sent
something bad (`RemoteProtocolError`), and a peer link that went away
(`PeerDisconnected`).  Model: h11 `_util.py`.

Must never: carry secrets (keys, plaintext) in a message or attribute; every
`reason` ends up in logs and, for remote errors, in a WebSocket close frame
that travels in the clear.
"""

from __future__ import annotations

__all__ = [
    "GossipError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "PeerDisconnected",
]


class GossipError(Exception):
    """Base of every error the gossip part raises on purpose.

    `reason` is a short human sentence, safe to log and to send to the peer.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LocalProtocolError(GossipError):
    """We used a protocol object wrongly (a bug on our side, not the peer's).

    Example: sending on a cipher that is closed, or starting a handshake as
    the responder.
    """


class RemoteProtocolError(GossipError):
    """The peer sent something we refuse: malformed, forged, replayed, out of
    order, from another clan, or from a key we do not admit.

    The protocol object that raised it is dead afterwards (sticky error
    state); the shell closes the link with a policy-violation code and
    `reason`.
    """


class PeerDisconnected(GossipError):
    """The link to the peer is gone (closed by either side, reset, timed out).

    `code` is the WebSocket close code when the peer closed with one, else
    None.  When the peer closed, `reason` includes the peer's own close reason,
    which is untrusted text: log it, never parse it.
    """

    def __init__(self, reason: str, *, code: int | None = None) -> None:
        super().__init__(reason)
        self.code = code
