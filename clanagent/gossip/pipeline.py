"""The record pipeline of a gossip node: from bytes to the store, sans-IO.

Owns: what happens to a record between the wire and the store -- decode
under RECORD_LIMITS, the clan and admission checks, the stale check against
the store, the signature, the version bound, the `validate` hook on its body,
the store's quotas -- then persisting (directly for an in-memory store or
soft records, else through a `Persist` action and `persisted`), and after
that: anti-entropy watermarks, the TTL of soft records, re-asserting our own
records after a restart, and the versions of the records we publish.  Also
the cache of record ids already seen, so duplicates cost a hash.

Must never: read a clock, import trio, store or hand on a record it has not
verified, score down a relay for a record's signed content (only its
origin), or decide how a record is spread (the node does: `spread`).
"""

from __future__ import annotations

import hashlib
import heapq
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..identity import node_id_of
from ..wire import MAX_RECORD_VERSION, RECORD_LIMITS, SignedRecord, WireError
from . import antientropy as ae
from .messages import NodeAction, Persist, RecordAccepted

__all__ = ["RecordPipeline", "SEEN_CACHE", "FAULT_LOG_KEYS"]

# The node's logger: these lines are about what one node took or refused.
log = logging.getLogger("clanagent.gossip.node")

# Records we remember having seen (by id), so the many duplicate copies an
# epidemic delivers cost a hash, not a signature check.
SEEN_CACHE = 65536
# Longest text of a validation refusal kept in a PeerMisbehaved reason.
_MAX_REASON = 200
# Faults are logged once per key (origin or sender, what, reason); this many
# keys are remembered (oldest forgotten first).
FAULT_LOG_KEYS = 256

# offence(out, from_node, from_addr, reason): score the sender down.
Offence = Callable[[list[NodeAction], "str | None", str, str], None]
# spread(now, records, rebroadcast, from_addr, out): records just stored,
# for the node to push on (rebroadcast: they came by gossip or from us, not
# by anti-entropy); from_addr is who sent them ("" for ours).
Spread = Callable[[float, Sequence[SignedRecord], bool, str, list[NodeAction]], None]


@dataclass
class _Continuation:
    claims: dict[bytes, int] | None = None  # anti-entropy completeness claims to apply
    rebroadcast: bool = True
    from_addr: str = ""


class RecordPipeline:
    """Every record a node takes or makes goes through here (see the module doc)."""

    def __init__(
        self,
        identity: Any,
        *,
        clan: bytes,
        store: Any,
        antientropy: ae.AntiEntropy,
        stats: dict[str, int],
        offence: Offence,
        spread: Spread,
        admit: Callable[[SignedRecord], bool] | None = None,
        validate: Callable[[SignedRecord], None] | None = None,
        wall_clock: Callable[[], float] | None = None,
        soft_ttl: Callable[[str], float | None] | None = None,
    ) -> None:
        self.identity = identity
        self.origin: bytes = bytes(identity.public_key)
        self.clan = clan
        self.store = store
        self.stats = stats  # the node's counters, shared
        self._ae = antientropy
        self._offence = offence
        self._spread = spread
        self._admit = admit
        # Checks a verified record's body (kind, schema, semantics): returns
        # None to accept, raises to refuse (transient=True: cannot decide yet).
        self._validate = validate
        # Our first record of this run has a version at least the wall clock
        # in ms: soft records live only in memory, so after a restart the
        # store no longer knows how far our versions went; the clock keeps
        # them from going backwards, where peers' per-origin anti-entropy
        # watermarks would never pull them (2**53 ms is 285,000 years).
        # After that first one, versions count up by one: peers advance a
        # watermark on a broadcast only when it is the next version, and a
        # clock-stamped version every time left every watermark behind until
        # an exchange with the origin itself, so idle anti-entropy resent
        # the latest records of every origin.  (A counter that runs behind
        # the clock is safe: the next run starts at the clock.)  None:
        # counter only.
        self._wall_clock = wall_clock
        self._floored = False
        # Soft kinds (clanagent.records: topology, VM status, console tails)
        # live `soft_ttl(kind)` seconds after the last new version arrived; an
        # origin that stopped refreshing (crashed, removed, partitioned away)
        # does not leave them behind forever.  Our own never expire here: we
        # refresh them.  None: nothing expires (the plain gossip core).
        self._soft_ttl = soft_ttl
        self._soft_until: dict[tuple[bytes, str, str], float] = {}
        self._soft_heap: list[tuple[float, bytes, str, str]] = []
        reserve = getattr(store, "reserve", None)
        if reserve is not None:
            # The store's totals must never stop us publishing our own records.
            reserve(self.origin)
        self._faults_logged: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._pending: dict[int, tuple[tuple[SignedRecord, ...], _Continuation]] = {}
        # Bodies we published in this run, so we can re-assert them when a
        # peer shows us an older run's record of ours with a higher version.
        self._own: dict[tuple[str, str], Any] = {}

    def soft_deadline(self) -> float:
        """When the next soft record may expire (inf: none held)."""
        return self._soft_heap[0][0] if self._soft_heap else float("inf")

    def _refuse(
        self,
        out: list[NodeAction],
        rec: SignedRecord,
        from_node: str | None,
        from_addr: str,
        counter: str,
        reason: str,
    ) -> None:
        """Count a record refused for its signed content.  The content is the
        origin's doing: only a sender that is the origin is scored down (a relay
        forwarding someone else's record is not)."""
        self.stats[counter] += 1
        if from_node is not None and from_node == node_id_of(rec.origin):
            self._offence(out, from_node, from_addr, reason)

    def _undecodable(
        self,
        out: list[NodeAction],
        rid: bytes | None,
        data: bytes,
        from_node: str | None,
        from_addr: str,
        exc: WireError,
    ) -> bytes | None:
        """A record that does not decode under RECORD_LIMITS.  When its origin's
        signature still covers the payload, the origin made it so (a record
        too big for our limits, say, from a peer with other limits): counted
        and logged once, only the origin scored down -- never the relay that
        forwarded it.  Else the bytes are the sender's doing.  Returns the
        origin when known."""
        origin = SignedRecord.signed_by(data)
        if origin is None:
            self.stats["records_invalid"] += 1
            self._offence(out, from_node, from_addr, f"invalid record: {exc.reason}")
            return None
        self.stats["records_undecodable"] += 1
        if rid is not None:
            self._remember(rid)
        key = (origin.hex(), "undecodable", exc.reason[:60])
        if key not in self._faults_logged:
            self._faults_logged[key] = None
            if len(self._faults_logged) > FAULT_LOG_KEYS:
                self._faults_logged.popitem(last=False)
            log.warning(
                "record of origin %s is over our limits or unreadable (%s); not taken",
                origin.hex()[:16],
                exc.reason,
            )
        if from_node is not None and from_node == node_id_of(origin):
            self._offence(out, from_node, from_addr, f"undecodable record: {exc.reason}")
        return origin

    def _unchecked(
        self,
        out: list[NodeAction],
        rec: SignedRecord,
        from_node: str | None,
        from_addr: str,
        exc: WireError,
    ) -> None:
        """A record of another clan or of an origin we do not admit (yet: an
        inventory that admits it may still be on its way to us).  Counted; a
        member relaying it is not scored down, any other sender is."""
        self.stats["records_invalid"] += 1
        if from_node is None or from_node == node_id_of(rec.origin):
            self._offence(out, from_node, from_addr, f"invalid record: {exc.reason}")

    def _accept_body(
        self,
        rec: SignedRecord,
        from_node: str | None,
        from_addr: str,
        out: list[NodeAction],
    ) -> str | None:
        """The checks of a verified record's content: the validate hook, then
        quotas.  None to accept, else the counter it was dropped under."""
        if self._validate is not None:
            try:
                self._validate(rec)
            except Exception as exc:  # noqa: BLE001 -- any refusal of the hook
                if getattr(exc, "transient", False) is True:
                    # Cannot decide yet: drop unscored; anti-entropy brings it back.
                    self.stats["records_deferred"] += 1
                    return "records_deferred"
                why = f"refused record {rec.kind!r}: {exc}"[:_MAX_REASON]
                self._refuse(out, rec, from_node, from_addr, "records_refused", why)
                return "records_refused"
        over_quota = getattr(self.store, "over_quota", None)
        reason = over_quota(rec) if over_quota is not None else None
        if reason is not None:
            self._refuse(out, rec, from_node, from_addr, "records_over_quota", reason)
            return "records_over_quota"
        return None

    def _remember(self, rid: bytes) -> None:
        seen = self._seen
        seen[rid] = None
        if len(seen) > SEEN_CACHE:
            seen.popitem(last=False)

    # -- inputs ---------------------------------------------------------------

    def _check_record(self, rec: SignedRecord) -> None:
        if rec.clan != self.clan:
            raise WireError("record belongs to another clan")
        if self._admit is not None and not self._admit(rec):
            raise WireError("record origin is not admitted")

    def on_record(
        self,
        now: float,
        from_addr: str,
        from_node: str | None,
        data: bytes,
        out: list[NodeAction],
    ) -> None:
        self.stats["records_received"] += 1
        rid = hashlib.blake2b(data, digest_size=32).digest()
        if rid in self._seen:
            self.stats["records_duplicate"] += 1
            return
        try:
            rec = SignedRecord.decode(data, RECORD_LIMITS, verify=False)
        except WireError as exc:
            self._undecodable(out, rid, data, from_node, from_addr, exc)
            return
        try:
            self._check_record(rec)
        except WireError as exc:
            self._unchecked(out, rec, from_node, from_addr, exc)
            return
        held = self.store.get(rec.origin, rec.kind, rec.key)
        if held is not None and held.version >= rec.version:
            self._remember(rid)
            self.stats["records_stale"] += 1
            return
        try:
            rec.verify()
        except WireError as exc:
            # A bad signature is the sender's doing, whoever the origin claims to be.
            self.stats["records_invalid"] += 1
            self._offence(out, from_node, from_addr, f"invalid record: {exc.reason}")
            return
        if rec.version >= MAX_RECORD_VERSION:
            self._remember(rid)
            self._refuse(
                out, rec, from_node, from_addr, "records_over_version", "version at or over 2**53"
            )
            return
        dropped = self._accept_body(rec, from_node, from_addr, out)
        if dropped == "records_refused":
            # Refused for good: its copies cost a hash from now on.  (Deferred
            # and over-quota records may be taken later, so they are not remembered.)
            self._remember(rid)
        if dropped is not None:
            return
        self._remember(rid)
        self._persist(now, (rec,), _Continuation(from_addr=from_addr), out)

    def _persist(
        self,
        now: float,
        records: tuple[SignedRecord, ...],
        cont: _Continuation,
        out: list[NodeAction],
    ) -> None:
        is_durable = getattr(self.store, "is_durable", None)
        if getattr(self.store, "path", None) is None or (
            is_durable is not None and not any(is_durable(r.kind) for r in records)
        ):
            # An in-memory store, or soft records only (held in memory, never
            # fsynced): "durable" at once, no round trip through the shell.
            self._after_persist(now, records, self.store.put_many(records), cont, out)
            return
        self._pending[id(records)] = (records, cont)
        out.append(Persist(records))

    def persisted(
        self,
        now: float,
        records: tuple[SignedRecord, ...],
        results: list[bool] | None,
        out: list[NodeAction],
    ) -> None:
        """The shell made `records` (from a Persist action) durable (see
        `GossipNode.persisted`)."""
        entry = self._pending.pop(id(records), None)
        cont = entry[1] if entry is not None and entry[0] is records else _Continuation()
        if results is None:
            results = self.store.put_many(records)
        self._after_persist(now, records, results, cont, out)

    def persist_failed(self, records: tuple[SignedRecord, ...]) -> None:
        """The shell could not write `records`: forget them so they can come again."""
        self._pending.pop(id(records), None)
        for rec in records:
            self._seen.pop(rec.record_id, None)

    def _after_persist(
        self,
        now: float,
        records: tuple[SignedRecord, ...],
        results: list[bool],
        cont: _Continuation,
        out: list[NodeAction],
    ) -> None:
        held: list[SignedRecord] = []
        taken: list[SignedRecord] = []  # stored now: for the node to spread
        unheld: set[bytes] = set()  # origins with a record the store refused (quota)
        for rec, stored in zip(records, results, strict=True):
            if not stored:
                have = self.store.get(rec.origin, rec.kind, rec.key)
                if have is None or have.version < rec.version:
                    # Refused by the store itself (its quota, racing our check):
                    # counted, and forgotten so that it may come again.
                    self.stats["records_over_quota"] += 1
                    self._seen.pop(rec.record_id, None)
                    unheld.add(rec.origin)
                else:
                    held.append(rec)
                continue
            held.append(rec)
            self.stats["records_accepted"] += 1
            self._note_soft(now, rec)
            if rec.origin == self.origin:
                self._reassert_own(now, rec, out)
            elif cont.claims is None:
                self._ae.note_stored(rec)
            taken.append(rec)
            out.append(RecordAccepted(rec))
        if cont.claims is not None:
            # Anti-entropy: account for the batch (the store already holds it,
            # so apply() only moves watermarks) with the sender's claims.  A
            # record the store refused is not held: its origin's claim must not
            # move our watermark past it.
            claims = {o: v for o, v in cont.claims.items() if o not in unheld}
            self._ae.apply(held, claims, verify=False)
            # Everything the peer sent is durable now: a sync completed.
            self.stats["ae_synced"] = self.stats.get("ae_synced", 0) + 1
        if taken:
            self._spread(now, taken, cont.rebroadcast, cont.from_addr, out)

    def _note_soft(self, now: float, rec: SignedRecord) -> None:
        if self._soft_ttl is None or rec.origin == self.origin:
            return
        ttl = self._soft_ttl(rec.kind)
        if ttl is None:
            return
        until = now + ttl
        triple = (rec.origin, rec.kind, rec.key)
        self._soft_until[triple] = until
        heapq.heappush(self._soft_heap, (until, *triple))

    def expire_soft(self, now: float) -> None:
        """Drop soft records whose origin did not refresh them within the TTL.

        The anti-entropy watermark of that origin stays where it is: a peer
        that still holds the same version does not send it back (it expired
        for a reason), and the origin's next version is above it."""
        heap = self._soft_heap
        while heap and heap[0][0] <= now:
            until, origin, kind, key = heapq.heappop(heap)
            if self._soft_until.get((origin, kind, key)) != until:
                continue  # refreshed since: a later entry holds its deadline
            del self._soft_until[(origin, kind, key)]
            if self.store.delete(origin, kind, key):
                self.stats["soft_expired"] += 1

    def _reassert_own(self, now: float, rec: SignedRecord, out: list[NodeAction]) -> None:
        """A peer showed us our own record from an earlier run (we restarted
        with less state).  Keep it (our version counter moves past it) and
        publish what this run said for that key again, above it."""
        mine = self._own.get((rec.kind, rec.key))
        if mine is not None and mine != rec.body:
            self.publish(now, rec.kind, rec.key, mine, out)

    def publish(
        self,
        now: float,
        kind: str,
        key: str,
        body: Any,
        out: list[NodeAction],
        *,
        push: bool = True,
    ) -> SignedRecord:
        """Sign and store a new record of ours (version = our highest + 1);
        `push=False`: not for the epidemic push (see `GossipNode.publish`)."""
        top = self.store.max_version(self.origin)
        if top >= MAX_RECORD_VERSION - 1:
            # A store that holds one of ours at the bound (one that does not
            # quarantine such records itself): continue after the valid ones.
            top = max(
                (
                    r.version
                    for r in self.store.by_origin(self.origin)
                    if r.version < MAX_RECORD_VERSION - 1
                ),
                default=0,
            )
        version = top + 1
        pending_max = max(
            (
                r.version
                for recs, _ in self._pending.values()
                for r in recs
                if r.origin == self.origin and r.version < MAX_RECORD_VERSION - 1
            ),
            default=0,
        )
        version = max(version, pending_max + 1)
        if self._wall_clock is not None and not self._floored:
            floor = int(self._wall_clock() * 1000)
            version = max(version, min(floor, MAX_RECORD_VERSION - 1))
            self._floored = True
        rec = SignedRecord.create(self.identity, kind, key, version, body, clan=self.clan)
        self._own[(kind, key)] = rec.body
        self._remember(rec.record_id)
        self._persist(now, (rec,), _Continuation(rebroadcast=push), out)
        if not push:
            self.stats["published_unpushed"] = self.stats.get("published_unpushed", 0) + 1
        return rec

    def on_delta(
        self,
        now: float,
        from_addr: str,
        from_node: str | None,
        delta: ae.WireDelta,
        out: list[NodeAction],
    ) -> None:
        # A claim at or over the version bound can never be backed by records.
        claims = {o: v for o, v in delta.complete_through.items() if v < MAX_RECORD_VERSION}
        fresh: list[SignedRecord] = []
        valid: list[SignedRecord] = []
        taint_all = False
        for data in delta.records:
            try:
                rec = SignedRecord.decode(data, RECORD_LIMITS, verify=False)
            except WireError as exc:
                origin = self._undecodable(out, None, data, from_node, from_addr, exc)
                if origin is None:
                    taint_all = True
                else:
                    claims.pop(origin, None)
                continue
            try:
                self._check_record(rec)
            except WireError as exc:
                self._unchecked(out, rec, from_node, from_addr, exc)
                claims.pop(rec.origin, None)
                continue
            try:
                held = self.store.get(rec.origin, rec.kind, rec.key)
                if held is None or held.version < rec.version:
                    rec.verify()
                    if rec.version >= MAX_RECORD_VERSION:
                        reason = "version at or over 2**53"
                        self._refuse(out, rec, from_node, from_addr, "records_over_version", reason)
                        claims.pop(rec.origin, None)
                        continue
                    if self._accept_body(rec, from_node, from_addr, out) is not None:
                        claims.pop(rec.origin, None)
                        continue
                    fresh.append(rec)
                    self._remember(rec.record_id)
                valid.append(rec)
            except WireError as exc:  # a bad signature: the sender's doing
                self.stats["records_invalid"] += 1
                self._offence(out, from_node, from_addr, f"invalid record: {exc.reason}")
                claims.pop(rec.origin, None)
        if taint_all:
            claims = {}
        fresh_ids = {id(r) for r in fresh}
        # Records we already held still count for the watermarks.
        stale = tuple(r for r in valid if id(r) not in fresh_ids)
        if not fresh:
            if stale or claims:
                self._ae.apply(stale, claims, verify=False)
            self.stats["ae_synced"] = self.stats.get("ae_synced", 0) + 1
            return
        if stale:
            self._ae.apply(stale, {}, verify=False)
        # The claims wait until the fresh records are durable.
        self._persist(now, tuple(fresh), _Continuation(claims=claims, rebroadcast=False), out)

    # -- timers ----------------------------------------------------------------
