"""`clanctl`: talk to the local agent over its control socket.

Owns: turning API replies into readable tables (or JSON with --json) and
errors into one clear line with an exit code.  Must never: print a traceback
for an agent that is down or a refused request.

Exit codes: 0 ok, 1 the agent answered with an error, 2 no agent / usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..control.client import AgentNotRunning, ClientError, ControlClient
from . import _inventory_cmds, _mesh_cmds, _services_cmds, _ui_cmds
from ._table import table
from .errors import CommandError

DEFAULT_SOCKET = "/run/clanagent/control.sock"


def _default_socket() -> str:
    return os.environ.get("CLANAGENT_SOCKET", DEFAULT_SOCKET)


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    d = max(0.0, time.time() - ts)
    if d < 60:
        return f"{d:.0f}s ago"
    if d < 3600:
        return f"{d / 60:.0f}m ago"
    return f"{d / 3600:.1f}h ago"


def _duration(s: float) -> str:
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _print_status(st: dict[str, Any]) -> None:
    members = st.get("members") or {}
    print(f"node       {st['name']} ({st['short_id']})")
    print(f"node id    {st['node_id']}")
    print(f"version    clanagent {st['version']} (pid {st['pid']})")
    print(f"uptime     {_duration(st['uptime_s'])}")
    print(f"state dir  {st['state_dir']}")
    print(f"records    {st['records']}")
    if st.get("gossip_addr"):
        print(f"gossip     {st['gossip_addr']}")
    if members:
        print("members    " + ", ".join(f"{v} {k}" for k, v in sorted(members.items())))
    print()
    rows = [
        (c["name"], "available" if c["available"] else "unavailable", c["reason"])
        for c in st["capabilities"]
    ]
    print(table(["CAPABILITY", "STATUS", "DETAIL"], rows))
    _print_counters(st.get("counters"))


def _print_counters(counters: Any, width: int = 96) -> None:
    """One block per part ("gossip", "control", ...), its counters wrapped to
    `width`. Counters at 0 are left out (`--json` has them all)."""
    if not isinstance(counters, dict) or not counters:
        return
    counters = {
        part: {k: v for k, v in values.items() if v} if isinstance(values, dict) else values
        for part, values in counters.items()
    }
    print()
    print("counters (those not 0; --json shows all)")
    indent = max(len(str(part)) for part in counters) + 4
    for part in sorted(counters, key=str):
        values = counters[part]
        items = (
            [f"{name} {value}" for name, value in sorted(values.items(), key=lambda kv: str(kv[0]))]
            if isinstance(values, dict)
            else [str(values)]
        )
        lines: list[str] = []
        for item in items or ["-"]:
            if lines and indent + len(lines[-1]) + 2 + len(item) <= width:
                lines[-1] += ", " + item
            else:
                lines.append(item)
        print(f"  {str(part):<{indent - 4}}  {lines[0]}")
        for line in lines[1:]:
            print(" " * indent + line)


def _print_whoami(w: dict[str, Any]) -> None:
    print(f"name           {w['name']}")
    print(f"node id        {w['node_id']}")
    print(f"short id       {w['short_id']}")
    print(f"signing key    {w['signing_key']}")
    print(f"box key        {w['box_key']}")
    print(f"wireguard key  {w['wireguard_key']}")


def _print_peers(peers: list[dict[str, Any]]) -> None:
    if not peers:
        print("no peers known (join one with 'clanagent run --join HOST:PORT')")
        return
    rows = []
    for p in peers:
        rtt = p.get("rtt_ms")
        rows.append(
            (
                p.get("name") or "-",
                p.get("short_id") or p.get("node_id", "")[:10],
                p.get("state", "?"),
                p.get("incarnation", ""),
                _ago(p.get("last_seen")),
                "-" if rtt is None else f"{rtt:.1f} ms",
                p.get("addr") or "-",
            )
        )
    print(table(["NAME", "NODE", "STATE", "INC", "LAST SEEN", "RTT", "ADDRESS"], rows))


def _format_event(ev: dict[str, Any]) -> str:
    ts = time.strftime("%H:%M:%S", time.localtime(ev.get("ts", time.time())))
    fields = " ".join(f"{k}={v}" for k, v in ev.items() if k not in ("ts", "type"))
    return f"{ts} {ev.get('type', '?')} {fields}".rstrip()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clanctl", description="Talk to the local clanagent.")
    p.add_argument(
        "--socket",
        default=None,
        help=f"control socket (default $CLANAGENT_SOCKET or {DEFAULT_SOCKET})",
    )
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the agent")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="node, uptime and what this machine can do")
    sub.add_parser("whoami", help="this node's identity and public keys")
    sub.add_parser("peers", help="members of the clan and their state")
    ev = sub.add_parser("events", help="stream agent events until interrupted")
    ev.add_argument("--count", type=int, default=0, help="stop after N events")
    met = sub.add_parser("metrics", help="Prometheus metrics of this agent (what /metrics serves)")
    met.add_argument("--openmetrics", action="store_true", help="OpenMetrics text format")
    _inventory_cmds.add_parsers(sub)
    _mesh_cmds.add_parsers(sub)
    _services_cmds.add_parsers(sub)
    _ui_cmds.add_parsers(sub)
    return p


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _dump(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=_json_default)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "tor-connect":  # ssh's ProxyCommand: no agent involved
        try:
            _mesh_cmds.tor_connect(args.socks, args.host, args.port)
        except (OSError, CommandError) as exc:
            print(f"clanctl: {exc}", file=sys.stderr)
            return 1
        return 0
    path = Path(args.socket or _default_socket())
    client = ControlClient(path, timeout=args.timeout)
    try:
        client.connect()
        if args.command == "events":
            for n, ev in enumerate(client.stream("events"), start=1):
                print(
                    json.dumps(ev, default=_json_default) if args.json else _format_event(ev),
                    flush=True,
                )
                if args.count and n >= args.count:
                    break
            return 0
        if getattr(args, "handler", None) is not None:
            result = _inventory_cmds.run(client, args)
            if result is not None:
                print(_dump(result))
            return 0
        if args.command == "metrics":
            fmt = "openmetrics" if args.openmetrics else "text"
            result = client.call("metrics", {"format": fmt})
        else:
            result = client.call(args.command)
    except CommandError as exc:
        print(f"clanctl: {exc}", file=sys.stderr)
        return exc.exit_code
    except AgentNotRunning as exc:
        print(f"clanctl: {exc.message}", file=sys.stderr)
        return 2
    except ClientError as exc:
        print(f"clanctl: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()
    if args.json:
        print(_dump(result))
    elif args.command == "status":
        _print_status(result)
    elif args.command == "whoami":
        _print_whoami(result)
    elif args.command == "peers":
        _print_peers(result)
    elif args.command == "metrics":
        sys.stdout.write(result["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
