"""The record body checks as an agent runs them: peers' records and our own.

Owns: building the `records.RecordContext` from the current inventory,
the store and the wall clock (the highest published generation of a
secret included), the gossip node's `validate` hook, the trial check of
our own records before they are published, the counters of both, and
logging each (kind, origin, own) refusal once. The agent and the
whole-agent simulator use this one class, so the simulator checks records
exactly as the agent does.
Must never: do I/O beyond reading the store in memory, or raise anything
but `records.Refusal` from `validate`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ._counters import OTHER, LabelCounts
from ._log import kv
from .records import RecordContext, Refusal, spec, validate
from .wire import SignedRecord

__all__ = ["RecordChecker"]

log = logging.getLogger("clanagent.agent")

MAX_LOGGED = 1024  # (kind, origin, own) refusals logged once each, at most this many


class RecordChecker:
    """Checks record bodies against `clanagent.records` for one agent.

    Everything it reads is asked for at check time (`inventory()`,
    `store()`, `identity()`, `clan()`), since the agent replaces them as it
    starts and joins a clan."""

    def __init__(
        self,
        *,
        wall: Callable[[], float],
        inventory: Callable[[], Any],
        store: Callable[[], Any],
        identity: Callable[[], Any],
        clan: Callable[[], bytes],
    ) -> None:
        self._wall = wall
        self._inventory = inventory
        self._store = store
        self._identity = identity
        self._clan = clan
        self.stats: dict[str, int] = {
            "checked": 0,
            "refused": 0,
            "deferred": 0,
            "own_refusals": 0,
        }
        # Peers' records by (kind, result): passed, refused or deferred; a
        # kind outside the registry counts as OTHER (peers choose kinds).
        self.by_kind = LabelCounts()
        self._logged: set[tuple[str, str, bool]] = set()

    def context(self) -> RecordContext:
        return RecordContext(
            now=self._wall(),
            inventory=self._inventory(),
            secret_generation=self._secret_generation,
        )

    def _secret_generation(self, instance_id: str) -> int:
        """The highest generation of a secret instance any clan machine has published."""
        from .secrets.record import SECRET_KIND

        inv, store = self._inventory(), self._store()
        if inv is None or store is None:
            return 0
        best = 0
        for nk in inv.node_keys():
            rec = store.get(nk, SECRET_KIND, instance_id)
            gen = rec.body.get("generation") if rec is not None and type(rec.body) is dict else None
            if type(gen) is int and gen > best:
                best = gen
        return best

    def validate(self, record: SignedRecord) -> None:
        """The gossip node's `validate=` hook: None to take the record, Refusal to refuse it.

        A transient Refusal (`.transient`) means "not now" (no inventory yet,
        or it names a generation or placement we may not know yet)."""
        self.stats["checked"] += 1
        kind = record.kind if spec(record.kind) is not None else OTHER
        try:
            validate(record, self.context())
        except Refusal as exc:
            result = "deferred" if exc.transient else "refused"
            self.stats[result] += 1
            self.by_kind.add(kind, result)
            self._log(record, exc, own=False)
            raise
        self.by_kind.add(kind, "passed")

    def check_own(self, kind: str, key: str, body: Any) -> bool:
        """Would our peers take this record of ours?  False (counted, logged once) if not."""
        trial = SignedRecord.create(self._identity(), kind, key, 1, body, clan=self._clan())
        try:
            validate(trial, self.context())
        except Refusal as exc:
            self.stats["own_refusals"] += 1
            self._log(trial, exc, own=True)
            return False
        return True

    def _log(self, record: SignedRecord, exc: Refusal, *, own: bool) -> None:
        key = (record.kind[:64], record.origin.hex()[:16], own)
        if key in self._logged:
            return
        if len(self._logged) < MAX_LOGGED:
            self._logged.add(key)
        log.log(
            # transient: the inventory that allows it has not arrived yet (a
            # VM status at start-up, say): it goes out once it has
            logging.INFO if exc.transient else logging.WARNING,
            "own record not published" if own else "record refused",
            extra=kv(kind=key[0], origin=key[1], reason=exc.reason, transient=exc.transient),
        )
