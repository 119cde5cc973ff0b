"""The VM part's control methods: vm.list, vm.logs, vm.request, vm.console.

Owns: checking an admin's signed start/stop/restart order and console
request before anything happens (signature, the VM in the inventory,
freshness), publishing an order for its host, reading a VM's console tail
here or asking its host for one (at most once per LOGS_ASK_INTERVAL per VM),
and opening a console here or on the hosting machine over the mesh.
Must never: publish an order or a console session that is not signed by a
clan admin, let a read (`vm.logs`) ask another machine for more than a
bounded request, or date a request in our future.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from ..control.api import ApiTable, handler
from ..control.protocol import ControlError, ErrorCode
from ..records import placed_on
from ..wire import WireError
from .requests import MAX_SKEW, REQUEST_KIND, parse_console, parse_request

__all__ = ["LOGS_ASK_INTERVAL", "VmApi", "register"]

LOGS_ASK_INTERVAL = 1.0  # seconds between two console-tail requests of ours for one VM


class VmApi:
    def __init__(
        self,
        *,
        inventory: Callable[[], Any],
        identity: Callable[[], Any],
        store: Callable[[], Any],
        vms: Callable[[], Any],
        in_clan: Callable[[], bool],
        publish: Callable[[str, str, Any], Awaitable[bool]],
        open_remote: Callable[[bytes, bytes, Any], Any],
    ) -> None:
        self.inventory = inventory  # the effective Inventory, or None
        self.identity = identity
        self.store = store
        self.vms = vms  # the VmService, once in a clan
        self.in_clan = in_clan
        self.publish = publish
        # (clan id, host node key, console request) -> a byte stream to that
        # host's console server over the mesh; ControlError when there is no mesh
        self.open_remote = open_remote
        self._logs_asked: dict[str, float] = {}  # VM -> monotonic time of our last ask

    def rows(self) -> list[dict[str, Any]]:
        """`vm.list`: every VM of the clan, from every host's status."""
        vms = self.vms()
        return [] if vms is None else vms.clan_vms()

    async def request(self, body: Any) -> dict[str, Any]:
        """An admin's signed start/stop/restart order: check it, then gossip it."""
        from ..inventory.select import placement

        inv = self.inventory()
        if inv is None:
            raise ControlError(ErrorCode.UNAVAILABLE, "this agent is not in a clan yet")
        try:
            req = parse_request(body, frozenset(inv.doc["clan"]["admins"]))
        except WireError as exc:
            raise ControlError(ErrorCode.PERMISSION_DENIED, exc.reason) from None
        if req.vm not in inv.doc["vms"]:
            raise ControlError(ErrorCode.INVALID_PARAMS, f"no VM '{req.vm}' in the inventory")
        if abs(time.time() - req.at) > MAX_SKEW:
            raise ControlError(
                ErrorCode.INVALID_PARAMS, "the request is too old (or the clock is off)"
            )
        await self.publish(REQUEST_KIND, req.vm, req.to_wire())
        return {"vm": req.vm, "action": req.action, "hosts": placement(inv.doc, req.vm)}

    async def logs(self, name: str, since: int) -> dict[str, Any]:
        """A VM's console tail: read here when it runs here, else asked of its host.

        Returns {"tail", "machine", "at"} once a tail at least as new as
        `since` is known, or {"pending": True} after publishing a request
        (clanctl asks again until the host's answer has arrived)."""
        from .service import LOGS_KIND, LOGS_REQUEST_KIND

        inv, vms = self.inventory(), self.vms()
        if inv is None or vms is None:
            raise ControlError(
                ErrorCode.UNAVAILABLE,
                "the inventory has not arrived yet" if self.in_clan() else "not in a clan yet",
            )
        if name not in inv.doc["vms"]:
            raise ControlError(ErrorCode.INVALID_PARAMS, f"no VM '{name}' in the inventory")
        me_key = self.identity().public_key
        me = inv.machine_by_node_key(me_key)
        if name in vms.handles or me_key in (placed_on(inv, name) or ()):
            # running here, or placed here and stopped: the local log (maybe empty)
            tail = await trio.to_thread.run_sync(vms.local_tail, name)
            return {"tail": tail or b"", "machine": me.name if me else "", "at": int(time.time())}
        # A read: what we ask of the host is bounded.  `since` never runs
        # ahead of our clock (a request "newer than the future" would let the
        # host's answer stand for every later one, freezing the tail
        # clan-wide), and we ask at most once per LOGS_ASK_INTERVAL per VM.
        now = int(time.time())
        since = min(since, now)
        store = self.store()
        best = None
        for origin in placed_on(inv, name) or frozenset():
            rec = store.get(origin, LOGS_KIND, name)
            m = inv.machine_by_node_key(origin)
            # Only the hosting machine's own word about its VM counts.
            if rec is None or m is None or not isinstance(rec.body, dict):
                continue
            at = rec.body.get("at")
            if rec.body.get("machine") != m.name or type(at) is not int:
                continue
            if best is None or at > best["at"]:
                best = {"tail": rec.body.get("tail", b""), "machine": m.name, "at": at}
        if best is not None and best["at"] >= since:
            return best
        mine = store.get(me_key, LOGS_REQUEST_KIND, name)
        asked = self._logs_asked.get(name)
        mono = time.monotonic()
        if (mine is None or not isinstance(mine.body, dict) or mine.body.get("at", 0) < since) and (
            asked is None or mono - asked >= LOGS_ASK_INTERVAL
        ):
            self._logs_asked[name] = mono
            await self.publish(LOGS_REQUEST_KIND, name, {"at": since})
        return {"pending": True}

    @asynccontextmanager
    async def console(self, body: Any) -> AsyncIterator[Any]:
        """A byte stream to a VM's serial console, wherever in the clan it runs.

        `body` is an admin-signed console request naming the VM and its host;
        the host checks it again (signature, freshness, nonce)."""
        from .spec import VmHostLocalError

        inv, vms = self.inventory(), self.vms()
        if inv is None or vms is None:
            raise ControlError(ErrorCode.UNAVAILABLE, "this agent is not in a clan yet")
        try:
            req = parse_console(body, frozenset(inv.doc["clan"]["admins"]))
        except WireError as exc:
            raise ControlError(ErrorCode.PERMISSION_DENIED, exc.reason) from None
        if req.vm not in inv.doc["vms"]:
            raise ControlError(ErrorCode.INVALID_PARAMS, f"no VM '{req.vm}' in the inventory")
        host = inv.machines.get(req.machine)
        if host is None:
            raise ControlError(ErrorCode.INVALID_PARAMS, f"no machine '{req.machine}'")
        try:
            if req.machine == vms.my_machine():
                try:
                    vms.admit_console(req)  # the signature was checked above
                except WireError as exc:
                    raise ControlError(ErrorCode.PERMISSION_DENIED, exc.reason) from None
                cm = vms.console(req.vm)
            else:
                cm = self.open_remote(inv.clan_id, host.node_key, req)
            async with cm as stream:
                yield stream
        except VmHostLocalError as exc:
            raise ControlError(ErrorCode.UNAVAILABLE, str(exc)) from None


def register(table: ApiTable, api: VmApi) -> None:
    def request_param(params: dict[str, Any]) -> Any:
        if "request" not in params:
            raise ControlError(ErrorCode.INVALID_PARAMS, "missing parameter 'request'")
        return params["request"]

    async def vm_list(params: dict[str, Any]) -> Any:
        return api.rows()

    async def logs(params: dict[str, Any]) -> Any:
        name, since = params.get("name"), params.get("since", 0)
        if not isinstance(name, str) or not name:
            raise ControlError(ErrorCode.INVALID_PARAMS, "parameter 'name' must be a VM name")
        if type(since) is not int or since < 0:
            raise ControlError(ErrorCode.INVALID_PARAMS, "'since' must be a unix time")
        return await api.logs(name, since)

    async def request(params: dict[str, Any]) -> Any:
        return await api.request(request_param(params))

    def console(params: dict[str, Any]) -> Any:
        return api.console(request_param(params))

    table.add(
        handler("vm.list", "read", vm_list, "every VM of the clan, from every host's status"),
        handler(
            "vm.logs",
            "read",
            logs,
            "a VM's console tail, from whichever machine hosts it",
            params=("name", "since"),
        ),
        handler(
            "vm.request",
            "write",
            request,
            "an admin-signed start/stop/restart of a VM, for its host",
            params=("request",),
        ),
        handler(
            "vm.console",
            "write",
            console,
            "attach to a VM's serial console (admin-signed); the connection "
            "then carries raw console bytes",
            params=("request",),
            upgrade=True,
        ),
    )
