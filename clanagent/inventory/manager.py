"""The agent's view of the inventory: versions in, effective state out.

Owns: turning gossiped records of kind "inventory" into offers to the
version history, the effective (merged) inventory, and the admission
decisions that follow from it (which node keys may connect, whose records
are accepted).  Must never: act on a version the history did not accept, or
go back to an older head; it is sans-IO (the agent persists and publishes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..wire import SignedRecord, WireError
from .anchor import Anchor
from .model import Inventory
from .versions import (
    HeadView,
    InventoryHistory,
    InventoryVersion,
    OfferResult,
    OfferStatus,
    TrustAnchor,
)

__all__ = ["InventoryManager", "RECORD_KIND"]

log = logging.getLogger("clanagent.inventory")

RECORD_KIND = "inventory"


def _validate(doc: dict[str, Any]) -> list[Any]:
    from .parse import validate_doc

    return validate_doc(doc)


class InventoryManager:
    def __init__(self, anchor: Anchor | None) -> None:
        self.anchor = anchor
        self.history: InventoryHistory | None = None
        self._inventory: Inventory | None = None
        self._head_leaves: tuple[bytes, ...] = ()
        self.listeners: list[Callable[[Inventory], None]] = []
        self.stats = {"offered": 0, "rejected": 0, "accepted": 0}
        if anchor is not None:
            self._make_history(anchor)

    def subscribe(self, handler: Callable[[Inventory], None]) -> None:
        """Call `handler(inventory)` whenever the head changes (the InventoryView port)."""
        self.listeners.append(handler)

    def _make_history(self, anchor: Anchor) -> None:
        self.anchor = anchor
        self.history = InventoryHistory(
            TrustAnchor(anchor.clan_id, frozenset(anchor.admins)), _validate
        )

    def set_anchor(self, anchor: Anchor) -> None:
        if self.anchor is not None:
            raise ValueError("this node already belongs to a clan")
        self._make_history(anchor)

    # -- offers ---------------------------------------------------------------

    def offer_version(self, version: InventoryVersion) -> OfferResult | None:
        if self.history is None:
            return None
        self.stats["offered"] += 1
        result = self.history.offer(version)
        if result.status is OfferStatus.REJECTED:
            self.stats["rejected"] += 1
            log.warning(
                "inventory version rejected",
                extra={
                    "kv": {
                        "hash": result.hash.hex()[:16],
                        "reason": result.reason,
                        "detail": result.detail,
                    }
                },
            )
        elif result.accepted:
            self.stats["accepted"] += len(result.accepted)
            self._refresh()
        return result

    def offer_record(self, rec: SignedRecord) -> OfferResult | None:
        """Offer a gossiped inventory record; None when it is not one (or no clan yet)."""
        if rec.kind != RECORD_KIND or self.history is None:
            return None
        try:
            version = InventoryVersion.from_wire(rec.body)
        except WireError as exc:
            log.warning("malformed inventory record", extra={"kv": {"reason": exc.reason}})
            return OfferResult(OfferStatus.REJECTED, b"", None, exc.reason)
        if rec.key != version.hash.hex():
            return OfferResult(
                OfferStatus.REJECTED, version.hash, None, "record key is not the version hash"
            )
        return self.offer_version(version)

    def load(self, records: Any) -> None:
        for rec in records:
            if rec.kind == RECORD_KIND:
                self.offer_record(rec)

    def _refresh(self) -> None:
        assert self.history is not None
        head = self.history.head()
        if head.doc is None or head.leaves == self._head_leaves:
            return
        self._head_leaves = head.leaves
        if head.issues:
            # Concurrent edits merged into something invalid: keep acting on
            # the last good inventory until an admin resolves it.
            log.warning(
                "merged inventory is invalid; keeping the previous one",
                extra={"kv": {"issue": str(head.issues[0])}},
            )
            return
        # The history validated head.doc with validate_doc (a leaf when it
        # was offered, a merged doc in head()), and found no issue.
        self._inventory = Inventory(head.doc, checked=True)
        log.info(
            "inventory head",
            extra={
                "kv": {
                    "leaves": ",".join(h.hex()[:12] for h in head.leaves),
                    "machines": len(self._inventory.machines),
                    "conflicts": len(head.conflicts),
                }
            },
        )
        for listener in list(self.listeners):
            listener(self._inventory)

    # -- views ------------------------------------------------------------------

    @property
    def head(self) -> HeadView | None:
        return None if self.history is None else self.history.head()

    @property
    def inventory(self) -> Inventory | None:
        return self._inventory

    def admit_peer(self, public_key: bytes) -> bool | None:
        """None: no inventory yet (the config decides); else membership of the inventory."""
        if self._inventory is None:
            return None
        return public_key in self._inventory.node_keys()

    def admit_record(self, rec: SignedRecord) -> bool | None:
        if rec.kind == RECORD_KIND:
            if self.history is None:
                return False  # not in a clan: inventories mean nothing to us
            result = self.offer_record(rec)
            return result is not None and result.status is not OfferStatus.REJECTED
        if self._inventory is None:
            return None
        return rec.origin in self._inventory.node_keys()
