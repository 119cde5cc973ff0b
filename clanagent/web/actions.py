"""What the console does that clanctl does in its own process: signing, TOML, diffs.

Owns: the `console.*` methods, registered into the one control API table
for web sessions only (`ConsoleActions.register`): the admin key the
console may sign with (found like clanctl finds it), VM orders signed with
it, and the inventory editor (current TOML, the diff an edit would make,
sign and submit).  Each one ends in calls of the same table, exactly the
calls clanctl makes (`vm.request`, `inventory.show`, `inventory.endpoints`,
`inventory.submit`), through `api_call`; keys, sealing, signing and
comparing are `inventory/edit.py`'s, as for clanctl (its CPU part in a
worker thread that only computes: every call to the agent stays on the
event loop).  Must never: sign anything without a readable admin key, sign
an edit whose diff the user did not see (the head it was computed against
must still be the head), be offered on the control socket (a member of the
control group would sign with the agent's key), or reach the agent in any
other way than the API table.
"""

from __future__ import annotations

import contextvars
import functools
import os
import time
from pathlib import Path
from typing import Any

import trio

from ..control.api import ApiTable, handler
from ..control.protocol import ControlError, ErrorCode
from ..inventory import edit
from ..wire import Limits, pack, unpack

__all__ = ["AdminKeySource", "ConsoleActions", "SIGNER", "api_call", "check_head"]

_RESULT_LIMITS = Limits(max_frame=64 << 20, max_array=1 << 20, max_map=1 << 16)
MAX_TOML = 1 << 20


async def api_call(api: ApiTable, method: str, params: dict[str, Any] | None = None) -> Any:
    """Call one control API method as a client would, result as the socket carries it."""
    result = await api.call(method, params, surface="web")
    # Through the wire codec: the console sees exactly what clanctl would see.
    return unpack(pack(result), _RESULT_LIMITS)


# The admin key of the web session whose request runs now: (path, uid that
# must own the file or None), or None for "this session has no key".  The web
# app sets it per request from the session; unset (outside a web session, as
# in tests of the actions alone) means the configured or default path.
SIGNER: contextvars.ContextVar[tuple[str, int | None] | None] = contextvars.ContextVar(
    "clanagent_web_signer"
)
_UNSET = object()


def check_head(shown: dict[str, Any], leaves: Any) -> None:
    """Refuse unless `leaves` (hex, from the page) is the head in `shown` now."""
    if not isinstance(leaves, list) or not all(isinstance(x, str) for x in leaves):
        raise ControlError(
            ErrorCode.INVALID_PARAMS, "'leaves' must be the head the diff was shown against"
        )
    if sorted(x.hex() for x in shown["leaves"]) != sorted(x.lower() for x in leaves):
        raise ControlError(
            ErrorCode.INVALID_PARAMS,
            "the inventory changed since this diff was shown: review the new diff, then sign",
        )


class AdminKeySource:
    """Where the console finds the admin key, and whether it can use it now.

    Each web session has its own key, fixed when `clanctl ui` asked for the
    login link (`SIGNER`): the file that clanctl named, which must belong to
    the user who ran clanctl unless that is root or the agent's user; only
    those two may fall back on `web.admin_key` from agent.toml or clanctl's
    default path of the agent's user.  So a member of the control group can
    never make the console sign with someone else's key.  The key is read
    from its file each time it is needed (no symlinks followed, the owner
    checked again) and never kept, copied or sent.
    """

    def __init__(self, configured: str = "") -> None:
        self.configured = configured

    def default_path(self) -> Path:
        return edit.admin_key_path(self.configured or None)

    def _signer(self) -> tuple[str, int | None] | None:
        signer = SIGNER.get(_UNSET)
        if signer is _UNSET:
            return str(self.default_path()), None
        return signer  # type: ignore[return-value]

    def path(self) -> Path | None:
        signer = self._signer()
        return None if signer is None else Path(signer[0])

    def load(self) -> tuple[Any, str]:
        """(signing key, "") or (None, why not and how to fix it). Blocking (file I/O)."""
        signer = self._signer()
        if signer is None:
            return None, (
                "this session has no admin key: run 'clanctl ui --admin-key PATH' "
                "with a key file of yours"
            )
        path, owner = Path(signer[0]), signer[1]
        # As root, on a path someone else named: never block on a FIFO, take a
        # terminal as ours, follow a link, or read more than a key's size.
        try:
            return edit.read_admin_key(path, owner=owner), ""
        except FileNotFoundError:
            return None, (
                f"no admin key at {path} (read by the agent, as uid {os.getuid()}): "
                "run 'clanctl ui --admin-key PATH' or set web.admin_key in agent.toml"
            )
        except edit.AdminKeyError as exc:
            return None, str(exc)
        except OSError as exc:
            return None, f"cannot read the admin key {path}: {exc.strerror or exc}"


class ConsoleActions:
    def __init__(self, api: ApiTable, keys: AdminKeySource) -> None:
        self.api = api
        self.keys = keys

    def register(self) -> None:
        """Add the console's methods to the table, for web sessions only."""
        web = ("web",)
        self.api.add(
            handler(
                "console.session",
                "read",
                self.session,
                "who you are; can the console sign",
                surfaces=web,
            ),
            handler(
                "console.vm",
                "write",
                self.vm_action,
                "start/stop/restart a VM (signed with the admin key here)",
                params=("name", "action"),
                surfaces=web,
            ),
            handler(
                "console.inventory_text",
                "read",
                self.inventory_text,
                "the current inventory as TOML and its head",
                surfaces=web,
            ),
            handler(
                "console.inventory_diff",
                "read",
                self.inventory_diff,
                "check an edited inventory and show what it would change",
                params=("text",),
                surfaces=web,
            ),
            handler(
                "console.inventory_apply",
                "write",
                self.inventory_apply,
                "sign and submit an edited inventory (its diff was shown)",
                params=("text", "leaves", "message"),
                surfaces=web,
            ),
        )

    async def _key(self) -> Any:
        key, why = await trio.to_thread.run_sync(self.keys.load)
        if key is None:
            raise ControlError(ErrorCode.PERMISSION_DENIED, f"cannot sign here: {why}")
        return key

    # -- methods ---------------------------------------------------------------------

    async def session(self, params: dict[str, Any]) -> dict[str, Any]:
        key, why = await trio.to_thread.run_sync(self.keys.load)
        status = await api_call(self.api, "status")
        admin: dict[str, Any] = {"available": key is not None, "reason": why}
        if key is not None:
            admin["public"] = bytes(key.verify_key)
            shown = await api_call(self.api, "inventory.show")
            admins = (shown.get("clan") or {}).get("admins") or []
            if admins and bytes(key.verify_key) not in admins:
                admin.update(
                    available=False,
                    reason=f"the key at {self.keys.path()} is not an admin key of this clan",
                )
        return {
            "node": status["name"],
            "short_id": status["short_id"],
            "version": status["version"],
            "clan": status.get("clan"),
            "admin_key": admin,
        }

    async def vm_action(self, params: dict[str, Any]) -> Any:
        from ..vmhost.requests import ACTIONS, sign_request

        name, action = params.get("name"), params.get("action")
        if not isinstance(name, str) or not name:
            raise ControlError(ErrorCode.INVALID_PARAMS, "parameter 'name' must be a VM name")
        if action not in ACTIONS:
            raise ControlError(
                ErrorCode.INVALID_PARAMS, f"'action' must be one of {', '.join(ACTIONS)}"
            )
        key = await self._key()
        req = sign_request(key, name, action, int(time.time()))
        return await api_call(self.api, "vm.request", {"request": req.to_wire()})

    async def inventory_text(self, params: dict[str, Any]) -> dict[str, Any]:
        from ..inventory.parse import doc_to_toml

        shown = await api_call(self.api, "inventory.show")
        if shown.get("doc") is None:
            raise ControlError(ErrorCode.UNAVAILABLE, "this agent has no inventory yet")
        return {
            "toml": doc_to_toml(shown["doc"]),
            "leaves": shown["leaves"],
            "versions": shown["versions"],
            "conflicts": len(shown["conflicts"]),
        }

    def _parse(self, text: Any) -> tuple[dict[str, Any] | None, list[str], list[str]]:
        from ..inventory.parse import load_inventory_toml

        if not isinstance(text, str):
            raise ControlError(ErrorCode.INVALID_PARAMS, "'text' must be the inventory as TOML")
        if len(text.encode()) > MAX_TOML:
            raise ControlError(ErrorCode.TOO_LARGE, f"the inventory is over {MAX_TOML} bytes")
        result = load_inventory_toml(text, filename="inventory")
        return result.doc, [str(e) for e in result.errors], [str(w) for w in result.warnings]

    async def inventory_diff(self, params: dict[str, Any]) -> dict[str, Any]:
        from ..inventory.diff import format_diff

        doc, errors, warnings = self._parse(params.get("text"))
        shown = await api_call(self.api, "inventory.show")
        if shown.get("doc") is None:
            raise ControlError(ErrorCode.UNAVAILABLE, "this agent has no inventory yet")
        out: dict[str, Any] = {
            "errors": errors,
            "warnings": warnings,
            "leaves": shown["leaves"],
            "changes": [],
            "diff": "",
        }
        if doc is not None:
            if doc["clan"]["id"] != shown["doc"]["clan"]["id"]:
                out["errors"].append("inventory: clan.id is not this clan's id")
            else:
                changes = edit.changes(shown["doc"], doc)
                out["changes"] = [
                    {"kind": c.kind, "path": c.path, "old": c.old, "new": c.new} for c in changes
                ]
                out["diff"] = format_diff(changes)
        return out

    async def inventory_apply(self, params: dict[str, Any]) -> dict[str, Any]:
        doc, errors, _ = self._parse(params.get("text"))
        if errors or doc is None:
            raise ControlError(
                ErrorCode.INVALID_PARAMS, f"{len(errors)} error(s); nothing was signed: {errors[0]}"
            )
        leaves = params.get("leaves")
        message = params.get("message") or "edited in the web console"
        if not isinstance(message, str) or len(message) > 500:
            raise ControlError(ErrorCode.INVALID_PARAMS, "'message' must be a short text")
        shown = await self.current()
        check_head(shown, leaves)
        if doc["clan"]["id"] != shown["doc"]["clan"]["id"]:
            raise ControlError(ErrorCode.INVALID_PARAMS, "clan.id is not this clan's id")
        return await self.sign_and_submit(doc, shown, message)

    async def current(self) -> dict[str, Any]:
        """`inventory.show`'s answer; UNAVAILABLE before the agent is in a clan."""
        shown = await api_call(self.api, "inventory.show")
        if shown.get("doc") is None:
            raise ControlError(ErrorCode.UNAVAILABLE, "this agent has no inventory yet")
        return shown

    async def sign_and_submit(
        self, doc: dict[str, Any], shown: dict[str, Any], message: str
    ) -> dict[str, Any]:
        """Sign `doc` on top of the head in `shown` (the caller checked it is the one
        the user saw) with this session's admin key, and submit it."""
        if not edit.changes(shown["doc"], doc):
            raise ControlError(
                ErrorCode.INVALID_PARAMS, "nothing to apply: the inventory already says this"
            )
        key = await self._key()
        readable = await api_call(self.api, "inventory.endpoints")
        sign = functools.partial(
            edit.seal_and_sign,
            doc,
            parents=shown["leaves"],
            keys=[key],
            message=message,
            now=int(time.time()),
            readable=readable,
        )
        try:
            version = await trio.to_thread.run_sync(sign)  # CPU only: seal, validate, sign
        except edit.EditError as exc:
            raise ControlError(ErrorCode.INVALID_PARAMS, str(exc)) from None
        return await api_call(
            self.api, "inventory.submit", {"version": version.to_wire(), "init": False}
        )
