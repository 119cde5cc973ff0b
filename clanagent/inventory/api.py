"""The inventory's control methods: show, history, conflicts, submit, endpoints,
machines, invite.

Owns: what each of those methods checks and answers, over the inventory
manager, our identity, the membership view and the clan anchor; a submitted
version is offered to the manager and, if new, published as a record.  The
agent hands in how to join a clan (`join`) and how to publish (`publish`).
Must never: publish a version the manager rejected, found a second clan on
an agent that has one, or hand out a token for a machine the inventory does
not name.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..control.api import ApiTable, handler
from ..control.protocol import ControlError, ErrorCode
from ..wire import WireError
from . import views
from .anchor import Anchor
from .manager import InventoryManager
from .sealing import open_doc_endpoints
from .token import make_token
from .versions import InventoryVersion, OfferStatus

__all__ = ["InventoryApi", "gossip_seeds", "register"]

MAX_SEEDS = 16  # addresses in a join token


def gossip_seeds(gossip: Any) -> list[str]:
    """Where a joining machine may dial: our gossip address, then every alive member's."""
    seeds: list[str] = []
    if gossip is None or not gossip.addr or ":" not in gossip.addr:
        return seeds
    if not gossip.addr.startswith("outbound-only"):
        seeds.append(gossip.addr)
    if gossip.node is not None:
        seeds += [
            m["addr"] for m in gossip.node.members() if m["state"] == "alive" and not m["self"]
        ]
    return seeds


def _refuse(msg: str) -> ControlError:
    return ControlError(ErrorCode.INVALID_PARAMS, msg)


def _name(params: dict[str, Any], key: str) -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value:
        raise _refuse(f"parameter '{key}' must be a name")
    return value


class InventoryApi:
    def __init__(
        self,
        *,
        inventory: Callable[[], InventoryManager],
        identity: Callable[[], Any],
        members: Any,
        anchor: Callable[[], Anchor | None],
        join: Callable[[Anchor], Awaitable[None]],
        publish: Callable[[str, str, Any], Awaitable[bool]],
        seeds: Callable[[], list[str]],
    ) -> None:
        self.inventory = inventory
        self.identity = identity
        self.members = members
        self.anchor = anchor
        self.join = join
        self.publish = publish
        self.seeds = seeds  # gossip addresses a new machine may dial (ours first)

    def show(self) -> dict[str, Any]:
        return views.show(self.inventory())

    def history(self) -> list[dict[str, Any]]:
        return views.history(self.inventory())

    def conflicts(self) -> list[dict[str, Any]]:
        return views.conflicts(self.inventory())

    def machines(self) -> list[dict[str, Any]]:
        manager = self.inventory()
        states = views.member_states(manager, self.members.rows(), self.identity().public_key)
        return views.machines(manager, states)

    async def submit(self, version_wire: Any, init: bool) -> dict[str, Any]:
        try:
            version = InventoryVersion.from_wire(version_wire)
        except WireError as exc:
            raise _refuse(f"malformed inventory version: {exc.reason}") from None
        if init:
            have = self.anchor()
            if have is not None:
                raise _refuse(
                    f"this agent already belongs to clan '{have.name}' ({have.clan_id.hex()})"
                )
            if version.parents:
                raise _refuse("a new clan starts with a version that has no parents")
            clan = version.doc.get("clan") if isinstance(version.doc, dict) else None
            if not isinstance(clan, dict):
                raise _refuse("the first version has no [clan] section")
            anchor = Anchor(clan["id"], clan["name"], tuple(clan["admins"]))
            trial = InventoryManager(anchor).offer_version(version)
            if trial is None or trial.status is OfferStatus.REJECTED:
                detail = "" if trial is None else f"{trial.reason}: {trial.detail}"
                raise _refuse(f"inventory rejected: {detail}")
            await self.join(anchor)
        manager = self.inventory()
        if manager.history is None:
            raise _refuse(
                "this agent is not in a clan yet: run 'clanctl clan init NAME' to found one "
                "or 'clanagent join TOKEN' to join one"
            )
        result = manager.offer_version(version)
        assert result is not None
        if result.status is OfferStatus.REJECTED:
            raise _refuse(f"inventory rejected: {result.reason}: {result.detail}")
        if result.status is not OfferStatus.DUPLICATE:
            await self.publish("inventory", version.hash.hex(), version.to_wire())
        head = manager.head
        return {
            "status": result.status.value,
            "hash": version.hash,
            "leaves": [] if head is None else list(head.leaves),
            "conflicts": 0 if head is None else len(head.conflicts),
        }

    def endpoints(self) -> dict[str, list[str]]:
        """Every machine's endpoints this member can read (for resealing on apply)."""
        head = self.inventory().head
        if head is None or head.doc is None:
            return {}
        ident = self.identity()
        return open_doc_endpoints(head.doc, ident.public_key, ident.box_key)

    def invite(self, machine: str) -> dict[str, Any]:
        inv, anchor = self.inventory().inventory, self.anchor()
        if anchor is None or inv is None:
            raise ControlError(ErrorCode.UNAVAILABLE, "this agent is not in a clan yet")
        if machine not in inv.machines:
            raise _refuse(
                f"no machine '{machine}' in the inventory: add it with 'clanctl machine add'"
            )
        seeds = list(dict.fromkeys(self.seeds() + list(anchor.seeds)))[:MAX_SEEDS]
        token = make_token(anchor.clan_id, anchor.name, list(anchor.admins), seeds, machine)
        return {"token": token, "machine": machine, "seeds": seeds}


def register(table: ApiTable, api: InventoryApi) -> None:
    async def show(params: dict[str, Any]) -> Any:
        return api.show()

    async def history(params: dict[str, Any]) -> Any:
        return api.history()

    async def conflicts(params: dict[str, Any]) -> Any:
        return api.conflicts()

    async def submit(params: dict[str, Any]) -> Any:
        if "version" not in params:
            raise _refuse("missing parameter 'version'")
        init = params.get("init", False)
        if not isinstance(init, bool):
            raise _refuse("'init' must be true or false")
        return await api.submit(params["version"], init)

    async def endpoints(params: dict[str, Any]) -> Any:
        return api.endpoints()

    async def machines(params: dict[str, Any]) -> Any:
        return api.machines()

    async def invite(params: dict[str, Any]) -> Any:
        return api.invite(_name(params, "machine"))

    table.add(
        handler("inventory.show", "read", show, "the effective inventory and its head"),
        handler("inventory.history", "read", history, "every accepted version"),
        handler(
            "inventory.conflicts",
            "read",
            conflicts,
            "entries concurrent edits changed differently",
        ),
        handler(
            "inventory.submit",
            "write",
            submit,
            "offer a signed inventory version",
            params=("version", "init"),
        ),
        handler(
            "inventory.endpoints",
            "write",
            endpoints,
            "every machine's endpoints, opened (they travel sealed)",
        ),
        handler("machines", "read", machines, "machines of the clan with tags and state"),
        handler(
            "invite",
            "write",
            invite,
            "a join token for a machine of the inventory",
            params=("machine",),
        ),
    )
