"""Run one MdnsDiscovery under trio and print what it sees as JSON lines.

Used by tests/test_mesh_mdns.py inside `ip netns exec` (zeroconf binds its
sockets in the network namespace it is constructed in, so each side must be
its own process).  Not a test module.

argv: CLAN_HEX NODE_KEY_HEX PORT SECONDS [IFACE_IP ...]
Lines: {"event": "ready", ...}, {"event": "update", ...}, {"event": "done", ...}
"""

from __future__ import annotations

import json
import sys
import time

import trio

from clanagent.mesh.mdns import MdnsDiscovery


def emit(**fields) -> None:
    print(json.dumps({"t": time.time(), **fields}), flush=True)


async def main(clan: bytes, key: bytes, port: int, seconds: float, ifaces: list[str]) -> None:
    def on_update(node_key, cands):
        emit(
            event="update",
            node_key=node_key.hex(),
            addresses=[c.address for c in cands],
            wg_ports=[c.port_wg for c in cands],
        )

    d = MdnsDiscovery(
        clan, key, port, interfaces=ifaces or None, wg_port=51820, on_update=on_update
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(d.run)
        emit(event="ready", available=d.available, reason=d.reason, name=d.instance_name)
        await trio.sleep(seconds)
        ignored = dict(d.peers.ignored)
        nursery.cancel_scope.cancel()
    emit(event="done", ignored=ignored, reason=d.reason)


if __name__ == "__main__":
    a = sys.argv[1:]
    trio.run(main, bytes.fromhex(a[0]), bytes.fromhex(a[1]), int(a[2]), float(a[3]), a[4:])
