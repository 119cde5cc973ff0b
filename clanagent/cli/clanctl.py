"""`clanctl`: talk to the local agent over its control socket.

Owns: turning API replies into readable tables (or JSON with --json) and
errors into one clear line with an exit code.  Must never: print a traceback
for an agent that is down or a refused request.

Exit codes: one scheme for both CLIs, `errors.Exit` (shown by `clanctl --help`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..control.client import AgentNotRunning, ClientError, ControlClient
from . import _inventory_cmds, _mesh_cmds, _services_cmds, _ui_cmds
from ._argtypes import count, seconds
from ._clan import clan_of, no_clan_error
from ._table import table
from .errors import EXIT_CODES_HELP, NOT_IN_CLAN_HINT, CommandError, Exit

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


def _print_peers(peers: list[dict[str, Any]], clan: dict[str, Any] | None) -> None:
    if not peers:
        if clan is None:
            print(f"no peers: this agent is not in a clan yet; {NOT_IN_CLAN_HINT}")
        else:
            print(
                f"no peers: no other member of clan '{clan.get('name')}' has been seen yet "
                "(see 'clanctl machines'; 'clanctl path NAME' says how each is reached)"
            )
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


def cmd_status(client: ControlClient, args: argparse.Namespace) -> Any:
    st = client.call("status")
    if args.json:
        return st
    _print_status(st)
    return None


def cmd_whoami(client: ControlClient, args: argparse.Namespace) -> Any:
    who = client.call("whoami")
    if args.json:
        return who
    _print_whoami(who)
    return None


def cmd_peers(client: ControlClient, args: argparse.Namespace) -> Any:
    peers = client.call("peers")
    if args.json:
        return peers
    _print_peers(peers, None if peers else clan_of(client))
    return None


def cmd_metrics(client: ControlClient, args: argparse.Namespace) -> Any:
    """The Prometheus exposition as /metrics serves it (--json: with its content type)."""
    got = client.call("metrics", {"format": "openmetrics" if args.openmetrics else "text"})
    if args.json:
        return got
    sys.stdout.write(got["text"])
    return None


def cmd_events(client: ControlClient, args: argparse.Namespace) -> Any:
    """One event per line (one JSON object per line with --json) until interrupted."""
    for n, ev in enumerate(client.stream("events"), start=1):
        print(json.dumps(ev, default=_json_default) if args.json else _format_event(ev), flush=True)
        if args.count and n >= args.count:
            break
    return None


JSON_HELP = "print JSON for scripts (before or after the command; stdout is then only JSON)"


def add_json_everywhere(parser: argparse.ArgumentParser) -> None:
    """Give every subcommand its own `--json`, so `clanctl status --json` works too.

    The subcommand's flag defaults to SUPPRESS: argparse copies a subparser's
    defaults over the parent's namespace, and a default False there would undo
    `clanctl --json status`."""
    seen: set[int] = set()

    def walk(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    if id(child) in seen:
                        continue
                    seen.add(id(child))
                    if "--json" not in child._option_string_actions:
                        child.add_argument(
                            "--json", action="store_true", default=argparse.SUPPRESS, help=JSON_HELP
                        )
                    walk(child)

    walk(parser)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clanctl",
        description="Talk to the local clanagent over its control socket.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"clanctl {__version__}")
    p.add_argument(
        "--socket",
        default=None,
        help=f"control socket (default $CLANAGENT_SOCKET or {DEFAULT_SOCKET})",
    )
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.add_argument(
        "--timeout",
        type=seconds,
        default=10.0,
        metavar="SECONDS",
        help="seconds to wait for the agent (default 10)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("status", help="node, uptime and what this machine can do").set_defaults(
        handler=cmd_status
    )
    sub.add_parser("whoami", help="this node's identity and public keys").set_defaults(
        handler=cmd_whoami
    )
    sub.add_parser("peers", help="members of the clan and their state").set_defaults(
        handler=cmd_peers
    )
    ev = sub.add_parser("events", help="stream agent events until interrupted")
    ev.add_argument("--count", type=count, default=0, help="stop after N events")
    ev.set_defaults(handler=cmd_events)
    met = sub.add_parser("metrics", help="Prometheus metrics of this agent (what /metrics serves)")
    met.add_argument("--openmetrics", action="store_true", help="OpenMetrics text format")
    met.set_defaults(handler=cmd_metrics)
    _inventory_cmds.add_parsers(sub)
    _mesh_cmds.add_parsers(sub)
    _services_cmds.add_parsers(sub)
    _ui_cmds.add_parsers(sub)
    add_json_everywhere(p)
    return p


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _dump(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=_json_default)


def _exit_code_for(exc: ClientError) -> int:
    if isinstance(exc, AgentNotRunning) or exc.code == "timeout":
        return Exit.NO_AGENT
    if exc.code == "permission_denied":
        return Exit.DENIED
    return Exit.FAILED


def _fail(exc: CommandError | ClientError) -> int:
    print(f"clanctl: {exc.message if isinstance(exc, ClientError) else exc}", file=sys.stderr)
    return exc.exit_code if isinstance(exc, CommandError) else _exit_code_for(exc)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "tor-connect":  # ssh's ProxyCommand: no agent involved
        try:
            _mesh_cmds.tor_connect(args.socks, args.host, args.port)
        except (OSError, CommandError) as exc:
            print(f"clanctl: {exc}", file=sys.stderr)
            return Exit.FAILED
        return Exit.OK
    path = Path(args.socket or _default_socket())
    client = ControlClient(path, timeout=args.timeout)
    try:
        client.connect()
        try:
            result = args.handler(client, args)
        except ClientError as exc:
            # "unavailable" is how the agent says "not in a clan yet" (among
            # other things): one status call tells which, for exit code 5.
            no_clan = None
            if exc.code == "unavailable" and getattr(args, "needs_clan", False):
                no_clan = no_clan_error(client)
            if no_clan is not None:
                raise no_clan from None
            raise
        if result is not None:
            print(_dump(result))
    except (CommandError, ClientError) as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    finally:
        client.close()
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
