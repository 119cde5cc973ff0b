"""clanctl's inventory, clan, machine and invite commands.

Owns: the admin side's dialogue: reading TOML, showing the diff, asking,
and submitting what `inventory/edit.py` signed with the admin key (which
never leaves this process) to the local agent.  Must never: sign anything
that failed validation, or write an admin key readable by others.
"""

from __future__ import annotations

import argparse
import base64
import copy
import dataclasses
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import nacl.signing

from ..control.client import ControlClient
from ..inventory import edit
from ..inventory.edit import DEFAULT_ADMIN_KEY, EditError, admin_key_path
from ._clan import require_clan
from ._table import table
from .errors import NOT_IN_CLAN_HINT, CommandError, Exit

# The other inventory modules are imported inside the commands that use them:
# a clanctl process imports only what its command needs (start-up time is
# part of every command's latency; see bench/vm.py).

__all__ = ["add_parsers", "create_admin_key", "load_admin_key"]


# -- admin keys --------------------------------------------------------------


def load_admin_key(path: Path) -> nacl.signing.SigningKey:
    """The admin key in the file `path` names (the user's own: a symlink is followed)."""
    try:
        return edit.read_admin_key(path, follow_symlinks=True)
    except FileNotFoundError:
        raise CommandError(
            f"no admin key at {path}: pass --admin-key PATH (the file 'clanctl clan init' wrote)"
        ) from None
    except EditError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"cannot read admin key {path}: {exc.strerror}") from None


def create_admin_key(path: Path) -> nacl.signing.SigningKey:
    """The admin key at `path`, made there first if there is none."""
    if path.exists():
        return load_admin_key(path)
    try:
        return edit.create_admin_key(path)
    except OSError as exc:
        raise CommandError(f"cannot write admin key {path}: {exc.strerror}") from None


# -- helpers -------------------------------------------------------------------


def _short(b: bytes) -> str:
    return b.hex()[:12]


def _confirm(args: argparse.Namespace, question: str) -> None:
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise CommandError("not confirmed: run with --yes to apply without asking")
    # The question goes to stderr: with --json, stdout carries only the JSON.
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        raise CommandError("cancelled")


def _current(client: ControlClient) -> dict[str, Any]:
    shown = client.call("inventory.show")
    if shown.get("doc") is None:
        require_clan(client)
        raise CommandError(
            f"this agent has no inventory yet: {NOT_IN_CLAN_HINT}", exit_code=Exit.NO_CLAN
        )
    return shown


def _changes_json(changes: Any) -> list[dict[str, Any]]:
    return [dataclasses.asdict(c) for c in changes]


def _show_diff(args: argparse.Namespace, text: str) -> None:
    """The diff for the human: on stdout, or on stderr when stdout is for --json."""
    print(text, file=sys.stderr if args.json else sys.stdout)


def _seal_and_sign(
    client: ControlClient,
    doc: dict[str, Any],
    shown: dict[str, Any],
    keys: list[nacl.signing.SigningKey],
    message: str,
) -> Any:
    # Endpoints travel sealed to the member machines: the agent opens the
    # ones only it can read, edit.py seals everything to the new member set.
    readable = client.call("inventory.endpoints")
    try:
        return edit.seal_and_sign(
            doc,
            parents=shown["leaves"],
            keys=keys,
            message=message,
            now=int(time.time()),
            readable=readable,
        )
    except EditError as exc:
        raise CommandError(str(exc)) from None


def _submit(client: ControlClient, version: Any, *, init: bool = False) -> dict[str, Any]:
    return client.call("inventory.submit", {"version": version.to_wire(), "init": init})


def _print_issues(result: Any) -> None:
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for e in result.errors:
        print(f"error: {e}", file=sys.stderr)


# -- commands ------------------------------------------------------------------


def cmd_clan_init(client: ControlClient, args: argparse.Namespace) -> Any:
    from ..inventory.parse import doc_to_toml, validate_doc

    who = client.call("whoami")
    status = client.call("status")
    if status.get("clan"):
        raise CommandError(
            f"this agent already belongs to clan '{status['clan']['name']}' "
            f"({status['clan']['id']})"
        )
    key_path = admin_key_path(args.admin_key)
    existed = key_path.exists()
    admin = create_admin_key(key_path)
    machine = args.machine or who["name"]
    doc = {
        "format": 1,
        "clan": {
            "id": secrets.token_bytes(16),
            "name": args.name,
            "admins": [bytes(admin.verify_key)],
            "threshold": 1,
        },
        "machines": {
            machine: {
                "node_key": bytes.fromhex(who["signing_key"]),
                "box_key": bytes.fromhex(who["box_key"]),
                "wg_key": base64.b64decode(who["wireguard_key"]),
                "tags": sorted(set(args.tags)),
                "endpoints": sorted(set(args.endpoint)),
                "sealed_endpoints": b"",
                "public": "no-public" not in args.tags,
            }
        },
        "networks": {"default": ["lan", "public", "tor"], "by_tag": {}},
        "services": {},
        "vms": {},
    }
    issues = validate_doc(doc)
    if issues:
        raise CommandError(f"cannot found the clan: {issues[0]}")
    try:
        version = edit.seal_and_sign(
            doc, parents=[], keys=[admin], message=f"clan {args.name} founded", now=int(time.time())
        )
    except EditError as exc:
        raise CommandError(f"cannot found the clan: {exc}") from None
    result = _submit(client, version, init=True)
    if args.out:
        Path(args.out).write_text(doc_to_toml(version.doc))
    if args.json:
        return {**result, "admin_key": str(key_path), "clan_id": doc["clan"]["id"]}
    print(f"founded clan '{args.name}' ({doc['clan']['id'].hex()})")
    print(f"admin key: {key_path} ({'existing' if existed else 'new'}; keep it safe)")
    print(f"first machine: {machine} (this agent)")
    if args.out:
        print(f"inventory written to {args.out}: edit it and 'clanctl inventory apply {args.out}'")
    return None


def cmd_machine_add(client: ControlClient, args: argparse.Namespace) -> Any:
    from ..identity import IdentityError, parse_machine_key
    from ..inventory.diff import diff_docs, format_diff
    from ..inventory.parse import validate_doc

    try:
        node_key, box_key, wg_key = parse_machine_key(args.key)
    except IdentityError as exc:
        raise CommandError(str(exc)) from None
    shown = _current(client)
    doc = copy.deepcopy(shown["doc"])
    if args.name in doc["machines"]:
        raise CommandError(f"machine '{args.name}' is already in the inventory")
    doc["machines"][args.name] = {
        "node_key": node_key,
        "box_key": box_key,
        "wg_key": wg_key,
        "tags": sorted(set(args.tags)),
        "endpoints": sorted(set(args.endpoint)),
        "sealed_endpoints": b"",
        "public": "no-public" not in args.tags,
    }
    issues = validate_doc(doc)
    if issues:
        raise CommandError(str(issues[0]).replace("<doc>: ", ""))
    keys = [load_admin_key(admin_key_path(p)) for p in (args.admin_key or [None])]
    version = _seal_and_sign(client, doc, shown, keys, f"add machine {args.name}")
    changes = diff_docs(shown["doc"], version.doc)
    _show_diff(args, format_diff(changes))
    _confirm(args, f"add machine '{args.name}'?")
    result = _submit(client, version)
    invite = client.call("invite", {"machine": args.name})
    if args.json:
        return {**invite, "version": result, "changes": _changes_json(changes)}
    print(f"added machine '{args.name}'. On it, run:\n")
    print(f"  clanagent join {invite['token']}\n")
    return None


def cmd_invite(client: ControlClient, args: argparse.Namespace) -> Any:
    invite = client.call("invite", {"machine": args.name})
    if args.json:
        return invite
    print(invite["token"])
    return None


def cmd_inventory_show(client: ControlClient, args: argparse.Namespace) -> Any:
    from ..inventory.parse import doc_to_toml

    shown = client.call("inventory.show")
    if shown["doc"] is None:
        require_clan(client)
    if args.json:
        return shown
    print(
        f"# head: {', '.join(_short(h) for h in shown['leaves'])}  ({shown['versions']} versions)"
    )
    if shown["conflicts"]:
        print(f"# {len(shown['conflicts'])} conflict(s): see 'clanctl inventory conflicts'")
    print(doc_to_toml(shown["doc"]), end="")
    return None


def _parse_file(path: str) -> dict[str, Any]:
    from ..inventory.parse import load_inventory_toml

    result = load_inventory_toml(Path(path))
    _print_issues(result)
    if result.errors:
        raise CommandError(f"{path}: {len(result.errors)} error(s); nothing was applied")
    return result.doc


def cmd_inventory_diff(client: ControlClient, args: argparse.Namespace) -> Any:
    from ..inventory.diff import format_diff

    doc = _parse_file(args.file)
    shown = _current(client)
    changes = edit.changes(shown["doc"], doc)
    if args.json:
        return _changes_json(changes)
    print(format_diff(changes))
    return None


def cmd_inventory_apply(client: ControlClient, args: argparse.Namespace) -> Any:
    from ..inventory.diff import format_diff

    doc = _parse_file(args.file)
    shown = _current(client)
    if doc["clan"]["id"] != shown["doc"]["clan"]["id"]:
        raise CommandError(f"{args.file}: clan.id is not this clan's id: is this the right file?")
    keys = [load_admin_key(admin_key_path(p)) for p in (args.admin_key or [None])]
    version = _seal_and_sign(client, doc, shown, keys, args.message or f"apply {args.file}")
    changes = edit.changes(shown["doc"], version.doc)
    explicit_endpoints = any(m["endpoints"] for m in doc["machines"].values())
    if not changes and not explicit_endpoints and not shown["conflicts"]:
        if args.json:
            return {"status": "unchanged", "changes": []}
        print("nothing to apply: the inventory already says this")
        return None
    _show_diff(args, format_diff(changes))
    _confirm(args, "sign and apply this inventory?")
    result = _submit(client, version)
    if args.json:
        return {**result, "changes": _changes_json(changes)}
    print(f"applied version {_short(result['hash'])} ({result['status']})")
    if result["conflicts"]:
        print(f"{result['conflicts']} conflict(s) remain: clanctl inventory conflicts")
    return None


def cmd_inventory_history(client: ControlClient, args: argparse.Namespace) -> Any:
    log = client.call("inventory.history")
    if not log:
        require_clan(client)
    if args.json:
        return log
    rows = [
        (
            _short(e["hash"]),
            ",".join(_short(p) for p in e["parents"]) or "-",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(e["time"])),
            ",".join(_short(s) for s in e["signers"]),
            e["message"],
        )
        for e in log
    ]
    print(table(["VERSION", "PARENTS", "TIME", "SIGNED BY", "MESSAGE"], rows))
    return None


def cmd_inventory_conflicts(client: ControlClient, args: argparse.Namespace) -> Any:
    conflicts = client.call("inventory.conflicts")
    if not conflicts:
        require_clan(client)
    if args.json:
        return conflicts
    if not conflicts:
        print("no conflicts")
        return None
    for c in conflicts:
        print(f"{c['path']}: changed differently by concurrent edits")
        print(f"  base: {c['base']!r}")
        for v in c["variants"]:
            print(f"  {_short(v['version'])}: {v['value']!r}")
    print(
        "\nresolve: edit the inventory (clanctl inventory show > FILE), decide each entry, "
        "then clanctl inventory apply FILE"
    )
    return None


def cmd_machines(client: ControlClient, args: argparse.Namespace) -> Any:
    rows = client.call("machines")
    if not rows:
        require_clan(client)
    if args.json:
        return rows
    print(
        table(
            ["NAME", "NODE", "TAGS", "STATE", "SERVICES", "VMS"],
            [
                (
                    r["name"],
                    r["node_id"][:10],
                    ",".join(r["tags"]) or "-",
                    "online (this machine)"
                    if r["state"] == "self"
                    else ("online" if r["online"] else r["state"]),
                    ",".join(r["services"]) or "-",
                    ",".join(r["vms"]) or "-",
                )
                for r in rows
            ],
        )
    )
    return None


# -- argparse --------------------------------------------------------------------


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_parsers(sub: Any) -> None:
    clan = sub.add_parser("clan", help="found a clan").add_subparsers(
        dest="clan_cmd", required=True
    )
    init = clan.add_parser("init", help="found a clan with this machine as its first member")
    init.add_argument("name")
    init.add_argument(
        "--admin-key",
        help=f"admin key file, created if missing "
        f"(default $CLANAGENT_ADMIN_KEY or {DEFAULT_ADMIN_KEY})",
    )
    init.add_argument("--machine", help="this machine's name in the inventory (default: host name)")
    init.add_argument("--tags", type=_csv, default=[], help="comma-separated tags")
    init.add_argument("--endpoint", action="append", default=[], help="public HOST:PORT")
    init.add_argument("--out", help="also write the inventory TOML to this file")
    init.set_defaults(handler=cmd_clan_init)

    machine = sub.add_parser("machine", help="add machines").add_subparsers(
        dest="machine_cmd", required=True
    )
    add = machine.add_parser("add", help="add a machine and print its join token")
    add.add_argument("name")
    add.add_argument("--key", required=True, help="the 'machine key' that clanagent keygen printed")
    add.add_argument("--tags", type=_csv, default=[], help="comma-separated tags")
    add.add_argument("--endpoint", action="append", default=[], help="public HOST:PORT")
    add.add_argument("--admin-key", action="append", help="admin key file (repeat for several)")
    add.add_argument("--yes", action="store_true", help="do not ask")
    add.set_defaults(handler=cmd_machine_add, needs_clan=True)

    inv = sub.add_parser("invite", help="print a join token for a machine of the inventory")
    inv.add_argument("name")
    inv.set_defaults(handler=cmd_invite, needs_clan=True)

    ms = sub.add_parser("machines", help="machines of the clan: tags, state, services, VMs")
    ms.set_defaults(handler=cmd_machines, needs_clan=True)

    invent = sub.add_parser("inventory", help="show, diff and apply the clan's inventory")
    isub = invent.add_subparsers(dest="inventory_cmd", required=True)
    show = isub.add_parser("show", help="the effective inventory as TOML")
    show.set_defaults(handler=cmd_inventory_show, needs_clan=True)
    diff = isub.add_parser("diff", help="what applying FILE would change")
    diff.add_argument("file")
    diff.set_defaults(handler=cmd_inventory_diff, needs_clan=True)
    apply = isub.add_parser("apply", help="validate, diff, sign and submit FILE")
    apply.add_argument("file")
    apply.add_argument("--admin-key", action="append", help="admin key file (repeat for several)")
    apply.add_argument("--message", "-m", help="a note kept in the history")
    apply.add_argument("--yes", action="store_true", help="do not ask")
    apply.set_defaults(handler=cmd_inventory_apply, needs_clan=True)
    hist = isub.add_parser("history", help="accepted versions, newest first")
    hist.set_defaults(handler=cmd_inventory_history, needs_clan=True)
    conf = isub.add_parser("conflicts", help="entries concurrent edits changed differently")
    conf.set_defaults(handler=cmd_inventory_conflicts, needs_clan=True)
