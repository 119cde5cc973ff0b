"""The admin side of the inventory: admin keys, sealing, signing, comparing edits.

Owns: where an admin key lives by default and how its file is read, parsed
and created; turning an edited document into a signed version (endpoints
sealed to the new member set, the result validated, then signed); and the
comparison an admin is shown (without the sealed blobs, which are re-made on
every apply).  Used alike by clanctl (in its own process) and by the web
console (in the agent, the CPU part in a worker thread).

Must never: talk to the agent (the caller fetches what the agent knows --
the head, the endpoints only it can open -- and submits the result), read a
clock (`now` is passed in), sign a document that fails validation, or write
an admin key readable by others.  Plain synchronous functions; the only I/O
is the admin key file, in the functions named for it.
"""

from __future__ import annotations

import base64
import binascii
import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nacl.signing

from ..durable import FileRefused, fsync_dir, read_file, write_new

if TYPE_CHECKING:
    from .diff import Change
    from .versions import InventoryVersion

# The other inventory modules are imported by the functions that need them:
# clanctl imports this module for every command, and its start-up time is
# part of each command's latency.

__all__ = [
    "DEFAULT_ADMIN_KEY",
    "MAX_ADMIN_KEY_FILE",
    "AdminKeyError",
    "EditError",
    "admin_key_path",
    "changes",
    "comparable",
    "create_admin_key",
    "parse_admin_key",
    "read_admin_key",
    "seal_and_sign",
]

DEFAULT_ADMIN_KEY = "~/.config/clanagent/admin.key"
MAX_ADMIN_KEY_FILE = 4096


class EditError(ValueError):
    """An edit that cannot be signed as asked; the message is for the admin, one line."""


class AdminKeyError(EditError):
    """An admin key file that exists but must not or cannot be used."""


# -- admin keys --------------------------------------------------------------


def admin_key_path(arg: str | None = None) -> Path:
    """The admin key file: `arg`, else $CLANAGENT_ADMIN_KEY, else DEFAULT_ADMIN_KEY."""
    return Path(os.path.expanduser(arg or os.environ.get("CLANAGENT_ADMIN_KEY", DEFAULT_ADMIN_KEY)))


def parse_admin_key(data: bytes, path: Path) -> nacl.signing.SigningKey:
    """The key in an admin key file's contents (one line of base64, 32 bytes)."""
    try:
        seed = base64.b64decode(data.strip(), validate=True)
    except (ValueError, binascii.Error):
        seed = b""
    if len(seed) != 32:
        raise AdminKeyError(f"{path} is not an admin key (one line of base64, 32 bytes)")
    return nacl.signing.SigningKey(seed)


def read_admin_key(
    path: Path, *, owner: int | None = None, follow_symlinks: bool = False
) -> nacl.signing.SigningKey:
    """Read and parse an admin key file: regular, small, mode 0600 (or stricter).

    `owner`: the uid the file must belong to (the agent reading a path a
    user named).  AdminKeyError for a file that must not be used;
    FileNotFoundError and other OSErrors pass through (the caller knows
    what to tell the user).
    """
    try:
        data = read_file(
            path,
            max_size=MAX_ADMIN_KEY_FILE,
            owner=owner,
            private=True,
            follow_symlinks=follow_symlinks,
        )
    except FileRefused as exc:
        raise AdminKeyError(_refused(path, exc, owner)) from None
    return parse_admin_key(data, path)


def _refused(path: Path, exc: FileRefused, owner: int | None) -> str:
    if exc.reason == "symlink":
        return f"cannot read the admin key {path}: it is a symlink (not followed)"
    if exc.reason == "not_regular":
        return f"the admin key {path} is not a regular file"
    if exc.reason == "owner":
        return (
            f"the admin key {path} is not yours (uid {owner}): only a key file that "
            "belongs to the user who asks may sign"
        )
    if exc.reason == "mode":
        return f"admin key {path} is readable by others: chmod 600 {path}"
    return f"{path} is not an admin key (too large)"


def create_admin_key(path: Path) -> nacl.signing.SigningKey:
    """A new admin key, written to `path` (which must not exist) 0600 and fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = nacl.signing.SigningKey.generate()
    write_new(path, base64.b64encode(bytes(key)) + b"\n", mode=0o600)
    fsync_dir(path.parent)
    return key


# -- comparing and signing ----------------------------------------------------


def comparable(doc: Mapping[str, Any]) -> dict[str, Any]:
    """`doc` without endpoints: sealed blobs are re-made on every apply."""
    out = copy.deepcopy(dict(doc))
    for m in out["machines"].values():
        m["sealed_endpoints"] = b""
        m["endpoints"] = []
    return out


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """What an admin is shown: the differences from `old` to `new`, endpoints aside."""
    from .diff import diff_docs

    return diff_docs(comparable(old), comparable(new))


def seal_and_sign(
    doc: Mapping[str, Any],
    *,
    parents: Sequence[bytes],
    keys: Sequence[nacl.signing.SigningKey],
    message: str,
    now: int,
    readable: Mapping[str, Sequence[str]] | None = None,
) -> InventoryVersion:
    """A signed version of `doc` on top of `parents`, endpoints sealed to its machines.

    Endpoints a machine has in plain are sealed as given; a machine with only
    sealed endpoints keeps the ones in `readable` (those the local agent can
    open: its `inventory.endpoints` answer), else it is an error.  CPU only
    (sealing, validation, signatures): no I/O.  `doc` is not changed.
    """
    from .parse import validate_doc
    from .sealing import SealError, reseal_doc
    from .versions import make_version

    readable = readable or {}
    machines = doc["machines"]
    plain = {name: list(m["endpoints"]) for name, m in machines.items() if m["endpoints"]}
    for name, m in machines.items():
        if name not in plain and m.get("sealed_endpoints"):
            if name not in readable:
                raise EditError(
                    f"machines.{name}: its endpoints are sealed and this agent cannot open "
                    "them; give them in plain in the file to reseal them"
                )
            plain[name] = list(readable[name])
    try:
        sealed = reseal_doc(doc, plain)
    except SealError as exc:
        raise EditError(f"cannot seal endpoints: {exc}") from None
    issues = validate_doc(sealed)
    if issues:
        raise EditError(f"refusing to sign an invalid inventory: {issues[0]}")
    return make_version(sealed, parents, now, message, keys)
