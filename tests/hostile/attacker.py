"""Our own attacker: raw connections, malformed handshakes and a malicious member.

Everything here talks only to the hostile clan's agents on 127.0.0.0/8, in
bounded loops.  `Mallory` holds a member's real keys, so what it sends is
authenticated and signed: only the agents' checks of bodies, bounds and
quotas stand between it and the clan.
"""

from __future__ import annotations

import base64
import os
import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from clanagent.gossip.errors import PeerDisconnected
from clanagent.gossip.handshake import Handshake, Role, clan_tag
from clanagent.gossip.node import PROTOCOL_VERSION, MsgType
from clanagent.gossip.peer import PeerSession, open_peer_session
from clanagent.gossip.service import addr_to_url
from clanagent.identity import Identity
from clanagent.wire import RECORD_SIGNATURE_DOMAIN, SignedRecord, pack


def split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def datagram(*items: tuple[int, Any]) -> bytes:
    """One gossip datagram: [version, [[type, body], ...]]."""
    return pack([PROTOCOL_VERSION, [[int(t), body] for t, body in items]])


def record_item(rec: SignedRecord) -> tuple[int, bytes]:
    return (MsgType.RECORD, rec.encode())


class Mallory:
    """A member gone bad: its keys are admitted, its software is ours."""

    def __init__(self, identity: Identity, clan_id: bytes) -> None:
        self.identity = identity
        self.clan_id = clan_id
        self.version = 1 << 20  # above anything an honest run of its keys published

    def sign(self, kind: str, key: str, body: Any, version: int | None = None) -> SignedRecord:
        if version is None:
            self.version += 1
            version = self.version
        # Signed by hand, not with SignedRecord.create: mallory's software
        # skips the checks our create() applies (the version bound, say).
        header = {"clan": self.clan_id, "kind": kind, "key": key, "version": version, "body": body}
        payload = pack(header)
        signature = self.identity.sign(RECORD_SIGNATURE_DOMAIN + payload)
        return SignedRecord(bytes(self.identity.public_key), payload, signature)

    @asynccontextmanager
    async def session(self, addr: str) -> AsyncIterator[PeerSession]:
        async with open_peer_session(
            addr_to_url(addr), self.identity, self.clan_id, lambda _key: True, timeout=10
        ) as s:
            yield s

    async def send_records(self, addr: str, records: Iterable[SignedRecord], per: int = 200) -> int:
        """Push records to one agent, `per` to a datagram; returns how many
        were sent before the agent closed the session (its right, once it
        has scored mallory down to the floor)."""
        batch: list[tuple[int, bytes]] = []
        sent = 0
        try:
            async with self.session(addr) as s:
                for rec in records:
                    batch.append(record_item(rec))
                    if len(batch) >= per:
                        await s.send(datagram(*batch))
                        sent += len(batch)
                        batch = []
                if batch:
                    await s.send(datagram(*batch))
                    sent += len(batch)
                await trio.sleep(0.5)  # let the frames drain before we close
        except PeerDisconnected:
            pass
        return sent


# What a refused or dead connection raises: the attack goes on; the test then
# checks that the agent is still up.
_REFUSED = (ConnectionClosed, HandshakeError, OSError)


async def finish_with_short_ciphertext(addr: str, clan_id: bytes, x: bytes = b"\x00") -> None:
    """The no-key attack: a proper HELLO, then a FINISH whose ciphertext is `x`."""
    try:
        await _finish_with(addr, clan_id, x)
    except _REFUSED:
        pass


async def _finish_with(addr: str, clan_id: bytes, x: bytes) -> None:
    me = Identity.generate()
    hs = Handshake(Role.INITIATOR, me, clan_id, lambda _key: True)
    async with open_websocket_url(addr_to_url(addr)) as ws:
        await ws.send_message(hs.start())
        with trio.move_on_after(5):
            await ws.get_message()  # REPLY: we ignore what it says
        await ws.send_message(pack({"t": 3, "x": x}))
        with trio.move_on_after(2):
            await ws.get_message()


async def raw_handshake_message(addr: str, messages: list[bytes]) -> None:
    """Send handshake messages as they are, whatever the agent answers."""
    try:
        async with open_websocket_url(addr_to_url(addr)) as ws:
            for m in messages:
                await ws.send_message(m)
                with trio.move_on_after(1):
                    await ws.get_message()
    except _REFUSED:
        pass


def hello(clan_id: bytes, eph: bytes | None = None) -> bytes:
    return pack({"t": 1, "v": [1, 1], "c": clan_tag(clan_id), "e": eph or os.urandom(32)})


def tcp_connections(addr: str, n: int, source: str = "127.0.0.1") -> list[socket.socket]:
    """Open up to `n` idle TCP connections; stops at the first refusal."""
    host, port = split(addr)
    out = []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(2)
        try:
            s.bind((source, 0))
            s.connect((host, port))
        except OSError:
            s.close()
            break
        out.append(s)
    return out


def closed_by_peer(s: socket.socket) -> bool:
    """True when the other side has closed this connection (EOF or reset)."""
    s.setblocking(False)
    try:
        return s.recv(1 << 16) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def ws_hello_bytes(addr: str, clan_id: bytes) -> bytes:
    """A WebSocket upgrade and one masked binary frame holding a HELLO, as one
    write: the cheapest way for us to make an agent do a handshake's work."""
    host, port = split(addr)
    key = base64.b64encode(os.urandom(16)).decode()
    upgrade = (
        f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    payload = hello(clan_id)
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return upgrade + bytes([0x82, 0x80 | len(payload)]) + mask + masked


async def hello_flood(
    addr: str,
    clan_id: bytes,
    total: int,
    concurrency: int,
    sources: list[str],
    seconds: float = float("inf"),
) -> dict[str, int]:
    """`total` HELLOs on as many connections, `concurrency` at once, spread
    over `sources`, none started after `seconds`; each waits (briefly) for
    the agent's first bytes, then hangs up.  Returns how many connections
    were answered / refused / silent (and how many were sent)."""
    host, port = split(addr)
    counts = {"answered": 0, "refused": 0, "silent": 0, "sent": 0}
    limit = trio.Semaphore(concurrency)
    deadline = trio.current_time() + seconds

    async def one(i: int) -> None:
        async with limit:
            if trio.current_time() > deadline:
                return
            counts["sent"] += 1
            try:
                stream = await trio.open_tcp_stream(
                    host, port, local_address=sources[i % len(sources)]
                )
            except OSError:
                counts["refused"] += 1
                return
            async with stream:
                try:
                    await stream.send_all(ws_hello_bytes(addr, clan_id))
                    with trio.move_on_after(2):
                        got = await stream.receive_some(4096)
                        counts["answered" if got else "refused"] += 1
                        return
                    counts["silent"] += 1
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    counts["refused"] += 1

    async with trio.open_nursery() as nursery:
        for i in range(total):
            nursery.start_soon(one, i)
            if i % concurrency == concurrency - 1:
                await trio.sleep(0)
    return counts


def _main(argv: list[str]) -> None:
    """`python -m tests.hostile.attacker flood ADDR CLAN_HEX TOTAL CONCURRENCY SECONDS SOURCE...`:
    the flood from its own process, so that the test's own timings are not
    the attacker's scheduling delays.  Prints the counts as JSON."""
    import json
    import time

    if argv[:1] != ["flood"]:
        raise SystemExit("usage: flood ADDR CLAN_HEX TOTAL CONCURRENCY SECONDS SOURCE...")
    addr, clan_hex, total, conc, seconds, *sources = argv[1:]
    t0 = time.monotonic()
    counts = trio.run(
        hello_flood, addr, bytes.fromhex(clan_hex), int(total), int(conc), sources, float(seconds)
    )
    print(json.dumps({**counts, "seconds": round(time.monotonic() - t0, 2)}))


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
