"""The relay's trio shell: two UDP ports per served pair, moving WireGuard's
encrypted datagrams between them.

This module is a shell, not sans-IO: it imports trio and does the I/O,
and it decides nothing.  Every decision (is it WireGuard-shaped, from the
side's authenticated host, within the pair's and the relay's rate limits,
where does it go) is made by the I/O-free core in `relay.py`
(`RelayPair`, `RelayLimiter`), which tests/test_layout.py keeps free of
trio and which is tested without sockets.

Owns: binding the pair's two ports, one reader task per port, and sending
what the core says to forward.
Must never: look inside a datagram beyond its WireGuard framing, forward
anything the decision refused, or let one pair's fault reach the agent
(an error ends that pair only; the next mesh round opens it again).
"""

from __future__ import annotations

import logging
import socket as _socket
from collections.abc import Callable, Iterable
from typing import Any

import trio

from .._log import kv
from .relay import Pair, RelayConfig, RelayLimiter, RelayPair

__all__ = ["RelaySockets"]

log = logging.getLogger("clanagent.mesh.relay")

MAX_DATAGRAM = 65535


class RelaySockets:
    def __init__(
        self,
        pair: Pair,
        host: str,
        hosts_of: Callable[[bytes], Iterable[str]],
        clock: Callable[[], float],
        config: RelayConfig | None = None,
        limiter: RelayLimiter | None = None,
    ) -> None:
        self.pair = pair
        self.state = RelayPair(pair[0], pair[1], config or RelayConfig(), limiter=limiter)
        self._host = host or "0.0.0.0"
        self._hosts_of = hosts_of
        self._clock = clock
        self._socks: dict[str, Any] = {}
        self.ports: tuple[int, int] | None = None
        self.cancel = trio.CancelScope()

    async def bind(self) -> tuple[int, int]:
        family = _socket.AF_INET6 if ":" in self._host else _socket.AF_INET
        try:
            for side in ("a", "b"):
                sock = trio.socket.socket(family, _socket.SOCK_DGRAM)
                self._socks[side] = sock
                await sock.bind((self._host, 0))
        except OSError:
            self.close()
            raise
        self.ports = (self._socks["a"].getsockname()[1], self._socks["b"].getsockname()[1])
        return self.ports

    async def run(self) -> None:
        with self.cancel:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader, "a")
                    nursery.start_soon(self._reader, "b")
            except Exception as exc:  # this pair only
                log.warning("relay pair stopped", extra=kv(error=exc))
            finally:
                self.close()

    async def _reader(self, side: str) -> None:
        sock = self._socks[side]
        other = self._socks["b" if side == "a" else "a"]
        while True:
            data, src = await sock.recvfrom(MAX_DATAGRAM)
            dst = self.state.datagram(side, src[:2], data, self._hosts_of, self._clock())  # type: ignore[arg-type]
            if dst is None:
                continue
            try:
                await other.sendto(data, dst)
            except OSError:
                pass

    def close(self) -> None:
        self.cancel.cancel()
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()
