"""clanctl's services and secrets commands.

Owns: showing service instances, their roles, machines and the exports wired
between them; and the secrets commands.  Must never: print a secret value
(only public parts are ever shown).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..control.client import ControlClient
from ._argtypes import seconds
from ._clan import require_clan
from ._table import table
from .errors import CommandError

__all__ = ["add_parsers"]


def cmd_services(client: ControlClient, args: argparse.Namespace) -> Any:
    view = client.call("services")
    if not view:
        require_clan(client)
    if args.json:
        return view
    if not view:
        print("no services in the inventory")
        return None
    for svc in view:
        reload = f"  (reload: {svc['reload']})" if svc.get("reload") else ""
        print(f"{svc['service']}  type {svc['type']}{reload}")
        rows = []
        for role in svc["roles"]:
            published = []
            for p in role.get("published", []) if role["exports"] else []:
                if p["published"]:
                    vals = ", ".join(f"{k}={v}" for k, v in sorted(p["values"].items()))
                    published.append(f"{p['machine']}: {vals or '-'}")
                else:
                    published.append(f"{p['machine']}: (not yet)")
            rows.append(
                (
                    role["role"],
                    ",".join(role["machines"]) or "-",
                    ",".join(role["exports"]) or "-",
                    ",".join(role["imports"]) or "-",
                    ",".join(role["imported_by"]) or "-",
                    "; ".join(published) or "-",
                )
            )
        print(
            table(
                ["  ROLE", "MACHINES", "EXPORTS", "IMPORTS", "IMPORTED BY", "PUBLISHED"],
                [("  " + r[0], *r[1:]) for r in rows],
            )
        )
        print()
    return None


def _ago(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _when(ts: int | None) -> str:
    if not ts:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


NO_SECRETS = (
    "no secrets: no service in the inventory declares one (a service type's secrets "
    "are made when a role of it is placed on machines; see 'clanctl services')"
)


def cmd_secrets_list(client: ControlClient, args: argparse.Namespace) -> Any:
    rows = client.call("secrets.list")
    if not rows:
        require_clan(client)
    if args.json:
        return rows
    if not rows:
        print(NO_SECRETS)
        return None
    print(
        table(
            ["SECRET", "GEN", "AGE", "HOLDERS", "STATE"],
            [
                (
                    r["id"],
                    r["generation"] or "-",
                    _ago(r["age_s"]),
                    ",".join(r["holders"]),
                    r["error"]
                    and "generator failed"
                    or (r["pending"] and f"pending: {r['pending']}")
                    or "ok",
                )
                for r in rows
            ],
        )
    )
    return None


def cmd_secrets_status(client: ControlClient, args: argparse.Namespace) -> Any:
    rows = client.call("secrets.list")
    if not rows:
        require_clan(client)
    if args.id:
        rows = [r for r in rows if r["id"] == args.id]
        if not rows:
            raise CommandError(f"no secret {args.id} (see 'clanctl secrets list')")
    if args.json:
        return rows
    if not rows:
        print(NO_SECRETS)
        return None
    for r in rows:
        print(f"{r['id']}")
        print(f"  generation     {r['generation'] or 'none yet'}")
        print(f"  age            {_ago(r['age_s'])}")
        print(f"  next rotation  {_when(r['next_rotation'])}")
        print(f"  holders        {', '.join(r['holders']) or '-'}")
        print(f"  recipients     {', '.join(r['recipients']) or '-'}")
        print(f"  current held   {', '.join(r['held_by_current']) or '-'}")
        print(f"  generator      {r['generator'] or '(no holder online)'}")
        if r["pending"]:
            print(f"  pending        {r['pending']}")
        if r["error"]:
            print(f"  last error     {r['error']}")
        print()
    return None


def cmd_secrets_show_public(client: ControlClient, args: argparse.Namespace) -> Any:
    rows = client.call("secrets.list")
    if not rows:
        require_clan(client)
    rows = [r for r in rows if r["id"] == args.id]
    if not rows:
        raise CommandError(f"no secret {args.id} (see 'clanctl secrets list')")
    public = rows[0]["public"]
    if args.json:
        return {k: v.decode("utf-8", "replace") for k, v in public.items()}
    if not public:
        print(f"{args.id} has no public part")
    for name, value in sorted(public.items()):
        text = value.decode("utf-8", "replace").rstrip("\n")
        print(f"{name}: {text}" if value.isascii() else f"{name}: {value.hex()}")
    return None


def cmd_secrets_rotate(client: ControlClient, args: argparse.Namespace) -> Any:
    result = client.call("secrets.rotate", {"id": args.id})
    if args.json:
        return result
    print(
        f"rotation of {result['id']} requested (after generation {result['generation']}); "
        "its generator makes the next one"
    )
    return None


def cmd_vm_action(client: ControlClient, args: argparse.Namespace) -> Any:
    from ..inventory.edit import admin_key_path
    from ..vmhost.requests import sign_request
    from ._inventory_cmds import load_admin_key

    key = load_admin_key(admin_key_path(args.admin_key))
    req = sign_request(key, args.name, args.vm_cmd, int(time.time()))
    result = client.call("vm.request", {"request": req.to_wire()})
    if args.json:
        return result
    hosts = ", ".join(result["hosts"]) or "no machine (placement is empty)"
    print(f"{args.vm_cmd} {result['vm']}: sent to its host ({hosts}) over the mesh")
    return None


def _after(shown: bytes, tail: bytes) -> bytes:
    """What `tail` has beyond what was already printed (tails of one log overlap)."""
    if not shown:
        return tail
    anchor = shown[-256:]
    at = tail.rfind(anchor)
    return tail[at + len(anchor) :] if at != -1 else tail


def cmd_vm_logs(client: ControlClient, args: argparse.Namespace) -> Any:
    shown = b""
    while True:
        since = int(time.time())
        deadline = time.monotonic() + args.timeout
        while True:
            reply = client.call("vm.logs", {"name": args.name, "since": since})
            if not reply.get("pending"):
                break
            if time.monotonic() > deadline:
                raise CommandError(
                    f"no answer from the machine hosting {args.name} in "
                    f"{args.timeout:.0f} s (is it online? see 'clanctl vm list')"
                )
            time.sleep(0.3)
        tail = reply["tail"]
        new = _after(shown, tail)
        text = new.decode("utf-8", "replace")
        if args.json:  # one object per line, like `clanctl events --json`
            print(json.dumps({"vm": args.name, "log": text}), flush=True)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
        shown = tail
        if not args.follow:
            return None
        time.sleep(2)


ESCAPE = b"\x1d"  # Ctrl-], as in telnet and virsh console


def _console_host(client: ControlClient, name: str, machine: str | None) -> str:
    rows = client.call("vm.list")
    if not rows:
        require_clan(client)
    rows = [r for r in rows if r["vm"] == name]
    if not rows:
        raise CommandError(f"no VM '{name}' in the inventory (see 'clanctl vm list')")
    hosts = [r["machine"] for r in rows]
    if machine:
        if machine not in hosts:
            raise CommandError(
                f"VM {name} is not placed on {machine} (it is on {', '.join(hosts)})"
            )
        return machine
    if len(hosts) == 1:
        return hosts[0]
    running = [r["machine"] for r in rows if r["state"] == "running"]
    if len(running) == 1:
        return running[0]
    raise CommandError(f"VM {name} is placed on {', '.join(hosts)}: pick one with --machine")


def _pump(sock: Any, early: bytes, linger: float) -> None:
    """Console bytes to stdout, stdin to the console; Ctrl-] (on a terminal) quits."""
    import os
    import selectors

    out = sys.stdout.buffer
    if early:
        out.write(early)
        out.flush()
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    stdin = sys.stdin.fileno()
    tty = os.isatty(stdin)
    sel.register(stdin, selectors.EVENT_READ)
    stdin_open = True
    while True:
        # Once a piped stdin ends, wait `linger` seconds of quiet for the answers.
        events = sel.select(None if stdin_open else linger)
        if not events:
            return
        for key, _ in events:
            if key.fileobj is sock:
                data = sock.recv(65536)
                if not data:
                    sys.stderr.write("\r\n[console closed by the agent]\r\n")
                    return
                out.write(data)
                out.flush()
            else:
                data = os.read(stdin, 4096)
                if tty and ESCAPE in data:
                    data = data[: data.index(ESCAPE)]
                    if data:
                        sock.sendall(data)
                    return
                if not data:
                    sel.unregister(stdin)
                    stdin_open = False
                    continue
                sock.sendall(data)


def cmd_vm_console(client: ControlClient, args: argparse.Namespace) -> Any:
    import os

    from ..inventory.edit import admin_key_path
    from ..vmhost.requests import NONCE_LEN, sign_console
    from ._inventory_cmds import load_admin_key

    key = load_admin_key(admin_key_path(args.admin_key))
    machine = _console_host(client, args.name, args.machine)
    req = sign_console(key, args.name, machine, int(time.time()), os.urandom(NONCE_LEN))
    sock, early = client.attach("vm.console", {"request": req.to_wire()})
    tty = os.isatty(sys.stdin.fileno())
    if tty:
        import termios
        import tty as ttymod

        sys.stderr.write(
            f"connected to the console of {args.name} on {machine}; Ctrl-] disconnects\r\n"
        )
        saved = termios.tcgetattr(sys.stdin.fileno())
        ttymod.setraw(sys.stdin.fileno())
    try:
        if tty:
            sock.sendall(b"\r")  # a fresh prompt
        _pump(sock, early, args.linger)
    except OSError as exc:  # reset, broken pipe: the agent or the host went away
        sys.stderr.write(f"\r\n[console connection lost: {exc.strerror or exc}]\r\n")
    finally:
        if tty:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
            sys.stderr.write("\ndisconnected\n")
        sock.close()
    return None


def cmd_vm_list(client: ControlClient, args: argparse.Namespace) -> Any:
    rows = client.call("vm.list")
    if not rows:
        require_clan(client)
    if args.json:
        return rows
    if not rows:
        print("no VMs declared in the inventory")
        return None
    print(
        table(
            ["VM", "MACHINE", "STATE", "UP", "OVERLAY", "ACCEL", "CRASHES", "DETAIL"],
            [
                (
                    r["vm"],
                    r["machine"],
                    r["state"],
                    _ago(int(time.time()) - r["booted"] if r.get("booted") else None),
                    r.get("overlay") or "-",
                    r["accel"] or "-",
                    r["crashes"] or 0,
                    r["reason"] or "-",
                )
                for r in rows
            ],
        )
    )
    return None


def add_parsers(sub: Any) -> None:
    s = sub.add_parser("services", help="service instances, roles, machines and their wiring")
    s.set_defaults(handler=cmd_services, needs_clan=True)
    sec = sub.add_parser("secrets", help="the clan's secrets (never their values)")
    ssub = sec.add_subparsers(dest="secrets_cmd", required=True)
    ssub.add_parser("list", help="every secret instance").set_defaults(
        handler=cmd_secrets_list, needs_clan=True
    )
    st = ssub.add_parser("status", help="age, next rotation, recipients, who holds it")
    st.add_argument("id", nargs="?", help="SERVICE/NAME (all when omitted)")
    st.set_defaults(handler=cmd_secrets_status, needs_clan=True)
    sp = ssub.add_parser("show-public", help="the public part of a secret")
    sp.add_argument("id", help="SERVICE/NAME")
    sp.set_defaults(handler=cmd_secrets_show_public, needs_clan=True)
    ro = ssub.add_parser("rotate", help="make a new generation now")
    ro.add_argument("id", help="SERVICE/NAME")
    ro.set_defaults(handler=cmd_secrets_rotate, needs_clan=True)
    vm = sub.add_parser("vm", help="the clan's micro VMs")
    vsub = vm.add_subparsers(dest="vm_cmd", required=True)
    vsub.add_parser("list", help="every VM, where it runs, its state and accelerator").set_defaults(
        handler=cmd_vm_list, needs_clan=True
    )
    lg = vsub.add_parser("logs", help="a VM's console log, from any machine")
    lg.add_argument("name")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    lg.add_argument("--timeout", type=seconds, default=15.0, help="seconds to wait for the host")
    lg.set_defaults(handler=cmd_vm_logs, needs_clan=True)
    co = vsub.add_parser(
        "console",
        help="an interactive serial console of a VM, from any machine (admins only)",
        description="Attach to a VM's serial console wherever it runs; Ctrl-] disconnects. "
        "With stdin not a terminal, stdin is sent and output printed until it is quiet "
        "for --linger seconds after stdin ends.",
    )
    co.add_argument("name")
    co.add_argument("--machine", help="the host, when the VM is placed on several")
    co.add_argument("--admin-key", help="admin key file (default $CLANAGENT_ADMIN_KEY)")
    co.add_argument(
        "--linger",
        type=seconds,
        default=1.0,
        help="with stdin not a terminal: seconds of quiet output before exiting (default 1)",
    )
    co.set_defaults(handler=cmd_vm_console, needs_clan=True)
    for action, text in (
        ("start", "start a VM an admin stopped"),
        ("stop", "stop a VM (it stays stopped until started)"),
        ("restart", "restart a VM"),
    ):
        a = vsub.add_parser(action, help=f"{text} (admins only; from any machine)")
        a.add_argument("name")
        a.add_argument("--admin-key", help="admin key file (default $CLANAGENT_ADMIN_KEY)")
        a.set_defaults(handler=cmd_vm_action, needs_clan=True)
