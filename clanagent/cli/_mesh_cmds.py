"""clanctl's mesh commands: `path MACHINE` and `ssh MACHINE [ARGS]`.

Owns: showing the chosen path and the ranked alternatives, and running ssh
to the best address (the overlay address when the WireGuard mesh is up,
else the chosen path, through tor with a ProxyCommand for onion paths).
Must never: guess an address the agent did not choose.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import struct
import sys
import threading
from typing import Any

from ..control.client import ControlClient
from ._table import table
from .errors import CommandError

__all__ = ["add_parsers", "ssh_target", "tor_connect"]


def cmd_path(client: ControlClient, args: argparse.Namespace) -> Any:
    info = client.call("path", {"machine": args.machine})
    if args.json:
        return info
    chosen = info.get("chosen")
    print(f"machine    {info['machine']}")
    print(
        f"overlay    {info['overlay6']}"
        + ("" if info.get("wireguard") else "  (WireGuard mesh not running here)")
    )
    if chosen:
        learnt = "  (learnt from the peer's packets)" if chosen.get("learnt") else ""
        print(f"chosen     {_kind(chosen)} {chosen['address']}{learnt}")
    else:
        print("chosen     none")
    print(f"why        {info.get('reason', '')}")
    if info.get("preference"):
        print(f"preference {' > '.join(info['preference'])}")
    nat = info.get("nat")
    if nat:
        print(f"punch      {nat['punch']}")
        for r in nat.get("relays", []):
            print(f"relay      {r['relay']}: {r['reason']}")
    paths = info.get("paths") or []
    if paths:
        print()
        print(
            table(
                ["", "KIND", "ADDRESS", "FROM", "RTT", "REASON"],
                [
                    (
                        "*" if p["chosen"] else ("" if p["usable"] else "-"),
                        _kind(p),
                        p["address"],
                        ",".join(p["sources"]),
                        "-" if p["rtt_ms"] is None else f"{p['rtt_ms']:.1f} ms",
                        p["reason"],
                    )
                    for p in paths
                ],
            )
        )
    return None


def _kind(p: dict[str, Any]) -> str:
    return f"relay via {p['via']}" if p.get("via") else p["kind"]


def ssh_target(info: dict[str, Any]) -> tuple[str, list[str]]:
    """(host, extra ssh options) for a `path` reply."""
    if info.get("wireguard") and info.get("handshake"):
        return info["overlay6"], []
    chosen = info.get("chosen")
    if not chosen:
        raise CommandError(
            f"no usable path to {info['machine']}: see 'clanctl path {info['machine']}'"
        )
    from ..config import split_hostport

    if chosen["kind"] in ("reflexive", "relay"):
        # WireGuard endpoints (a NAT mapping, a relay's port): only the tunnel goes there
        raise CommandError(
            f"{info['machine']} is reached only through WireGuard ({_kind(chosen)}), "
            "and no handshake is fresh yet"
        )
    host, _ = split_hostport(chosen["address"], "address")
    if chosen["kind"] == "tor":
        socks = info.get("tor_socks")
        if not socks:
            raise CommandError("the chosen path is Tor but this agent runs no tor")
        proxy = f"{sys.executable} -m clanagent.cli.clanctl tor-connect {socks} %h %p"
        return host, ["-o", f"ProxyCommand={proxy}"]
    return host, []


def cmd_ssh(client: ControlClient, args: argparse.Namespace) -> Any:
    info = client.call("path", {"machine": args.machine})
    host, opts = ssh_target(info)
    ssh = shutil.which("ssh")
    if ssh is None:
        raise CommandError("ssh is not installed (apt install openssh-client)")
    argv = [ssh, *opts, host, *args.args]
    if args.print:
        if args.json:
            return {"argv": argv, "host": host}
        print(" ".join(argv))
        return None
    client.close()
    os.execv(ssh, argv)
    return None  # not reached


def tor_connect(socks: str, host: str, port: int) -> None:
    """Pipe stdin/stdout to HOST:PORT through a SOCKS5 proxy (ssh's ProxyCommand)."""
    from ..config import split_hostport

    phost, pport = split_hostport(socks, "socks")
    s = socket.create_connection((phost, pport), timeout=30)
    s.sendall(b"\x05\x01\x00")
    if s.recv(2) != b"\x05\x00":
        raise CommandError("the SOCKS proxy refused us")
    name = host.encode()
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", port))
    head = s.recv(4)
    if len(head) < 4 or head[1] != 0:
        raise CommandError(f"tor could not reach {host}:{port}")
    rest = {1: 4, 4: 16}.get(head[3])
    if rest is None:
        rest = s.recv(1)[0]
    s.recv(rest + 2)
    s.settimeout(None)

    def upstream() -> None:
        while data := os.read(0, 65536):
            s.sendall(data)
        s.shutdown(socket.SHUT_WR)

    threading.Thread(target=upstream, daemon=True).start()
    while data := s.recv(65536):
        os.write(1, data)


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("path", help="the chosen path to a machine, and the ranked alternatives")
    p.add_argument("machine")
    p.set_defaults(handler=cmd_path, needs_clan=True)
    s = sub.add_parser(
        "ssh",
        help="ssh to a machine over the best path",
        description="ssh to a machine over the best path. clanctl's own options (--print, "
        "--json) go before MACHINE: everything after it is passed to ssh.",
    )
    s.add_argument("machine")
    s.add_argument("--print", action="store_true", help="print the ssh command instead")
    s.add_argument("args", nargs=argparse.REMAINDER, help="passed to ssh")
    s.set_defaults(handler=cmd_ssh, needs_clan=True)
    t = sub.add_parser(
        "tor-connect", help="(used by `clanctl ssh` as its ProxyCommand to reach onion hosts)"
    )
    t.add_argument("socks")
    t.add_argument("host")
    t.add_argument("port", type=int)
    t.set_defaults(handler=None, raw=True)
