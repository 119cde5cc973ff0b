"""Anti-entropy of signed records in the Scuttlebutt style (sans-IO).

Owns: each node's per-origin *watermarks*, the digest built from them, which
records to send a peer for its digest (within a byte budget), applying what a
peer sent, and the wire shapes of those two push-pull messages.  Model:
van Renesse et al., "Efficient Reconciliation and Flow Control for
Anti-Entropy Protocols" (Scuttlebutt, precise reconciliation).

Records belong to origins.  An origin numbers its writes with one counter
across all its keys, so a newer write to any key has a higher version than
every earlier write of that origin, and a newer version of a key replaces the
older one everywhere (superseded versions disappear).

Watermark rules (the invariant and every rule that moves a watermark):

* Invariant for origin `o` with watermark `w`: for every key of `o` whose
  latest version at the origin is <= w, this node holds that version.  (A
  superseded version <= w needs nothing: its replacement is either <= w and
  held, or > w and still to be fetched.)  So `w` is "everything still live up
  to w is here", not "the highest version I hold": broadcasts arrive out of
  order and can leave holes below the highest version.
* Own origin: the watermark is the store's max version of our own records.
* Broadcast (`note_stored`): version == w + 1 moves w to w + 1, then on
  through every consecutive version already held (`_pending`).  Any other
  version is kept in the store, remembered in `_pending`, and the watermark
  waits for anti-entropy.  A version the store refused because it already
  holds a newer one of that key counts as held too.
* Push-pull (`apply`): a peer's batch for `o` that was complete through `c`
  moves w to max(w, c) -- but only when every record of that origin in the
  batch was valid and in increasing version order, and never past the highest
  version of `o` we now hold (an honest sender always made us hold a record
  >= c, so this costs nothing and stops a peer from inflating a watermark
  without a record signed by `o`).
* Sending (`deltas_for`): for origin `o` we send every record we hold with
  peer_digest[o] < version, in version order, and claim completeness through
  our own watermark -- or, when the budget cut the batch after version `v`,
  through min(watermark, v).  Both keep the invariant at the receiver: every
  key whose latest version is <= the claim was held by us and, being above the
  peer's watermark, was in the batch.
* Origins go most-lagging first (our max version minus the peer's
  watermark); the batch stops at the first record that does not fit, so no
  origin ever has a gap.

Must never: trust a record it did not verify, let an older version replace a
newer one (the store refuses it), advance a watermark on a batch with an
invalid or out-of-order record, hold state about time or sockets, or raise
anything but `WireError` on malformed peer input to the decoders.

Completeness claims are trusted to the extent that peers are clan members:
a peer that omits records while claiming completeness delays convergence for
that origin until the origin writes again; signatures keep it from forging
content or inflating a watermark past what the origin signed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from clanagent import limits as sizes
from clanagent.wire import DEFAULT_LIMITS, MAX_VERSION, Limits, SignedRecord, WireError

__all__ = [
    "RecordStore",
    "AntiEntropy",
    "Delta",
    "WireDelta",
    "InvalidItem",
    "ApplyResult",
    "MAX_DIGEST_ORIGINS",
    "MAX_DELTA_RECORDS",
    "ORIGIN_LEN",
    "encode_digest",
    "decode_digest",
    "encode_delta",
    "decode_delta",
]

# Named limits for what a peer controls in the two push-pull messages.
# Origins: as many as fit half a frame, >= the planned clan (clanagent.limits).
MAX_DIGEST_ORIGINS = sizes.MAX_DIGEST_ORIGINS
# Records: a full AE_BUDGET of the smallest records (138 bytes each: 3800).
MAX_DELTA_RECORDS = 4096
ORIGIN_LEN = 32

# Versions above the watermark we remember having seen, per origin.  Bounded
# so an origin writing far ahead of a hole cannot grow our memory without
# limit; forgetting some only means the watermark waits for anti-entropy.
_MAX_PENDING_PER_ORIGIN = 4096

# Encoded-size accounting of a delta message {"c": [[origin, n], ...], "r": [bin, ...]}:
# the map and two array headers, one claim pair, one bin header per record.
_DELTA_ENVELOPE = 1 + 2 + 5 + 2 + 5
_CLAIM_ENTRY = 1 + 2 + ORIGIN_LEN + 9


def _bin_header_len(n: int) -> int:
    return 2 if n < 0x100 else 3 if n < 0x10000 else 5


class RecordStore(Protocol):
    """What anti-entropy needs from the record store (clanagent.store.Store fits)."""

    def put_many(self, recs: Iterable[SignedRecord]) -> list[bool]: ...

    def by_origin(self, origin: bytes) -> list[SignedRecord]: ...

    def origins(self) -> list[bytes]: ...

    def max_version(self, origin: bytes) -> int: ...


@dataclass(frozen=True, slots=True)
class Delta:
    """What we send a peer for its digest.

    `records` are grouped by origin (most-lagging origin first) and in version
    order within an origin, with no gaps; `complete_through[o]` is the version
    through which the receiver may consider itself complete for `o` after
    applying them.  `size` is an upper bound on the encoded message in bytes.
    """

    records: tuple[SignedRecord, ...]
    complete_through: dict[bytes, int]
    size: int


@dataclass(frozen=True, slots=True)
class WireDelta:
    """A decoded delta message: records still as bytes (apply verifies each)."""

    records: tuple[bytes, ...]
    complete_through: dict[bytes, int]


@dataclass(frozen=True, slots=True)
class InvalidItem:
    """One peer-supplied record we dropped: its index in the peer's list, why,
    and the origin it claimed when that much could be decoded."""

    index: int
    reason: str
    origin: bytes | None


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What `apply` did.

    `stored` are the records that were newer and are now durable; `refused`
    counts valid records that were not newer; `invalid` lists the dropped
    ones (score the peer down when it is not empty); `advanced` maps each
    origin whose watermark moved to its new watermark.
    """

    stored: tuple[SignedRecord, ...]
    refused: int
    invalid: tuple[InvalidItem, ...]
    advanced: dict[bytes, int] = field(default_factory=dict)


class AntiEntropy:
    """Per-origin watermarks over a record store, and push-pull reconciliation.

    Call `note_stored(rec)` after every broadcast record the store accepted
    (it is also correct for a verified record the store refused as not
    newer).  A push-pull exchange: send `digest()`; answer a peer's digest
    with `deltas_for(peer_digest, budget)`; feed what the peer sent to
    `apply`.  `watermarks` (e.g. saved with `watermarks()` after the store
    was synced) restores them at start; without it, they are rebuilt from the
    consecutive versions held, which is always safe.
    """

    def __init__(
        self,
        store: RecordStore,
        self_origin: bytes,
        watermarks: Mapping[bytes, int] | None = None,
        *,
        priority: Callable[[SignedRecord], int] | None = None,
    ) -> None:
        """`priority(record)`, when given, orders origins in a delta: those
        with a record of a lower priority the peer lacks go first (see
        `deltas_for`)."""
        if type(self_origin) is not bytes or len(self_origin) != ORIGIN_LEN:
            raise ValueError("self_origin must be 32 bytes")
        self._store = store
        self._priority = priority
        self._self = self_origin
        self._wm: dict[bytes, int] = {}
        self._pending: dict[bytes, set[int]] = {}
        for origin, mark in (watermarks or {}).items():
            if origin != self_origin and mark > 0:
                self._wm[origin] = mark
        for origin in store.origins():
            if origin == self_origin:
                continue
            for rec in store.by_origin(origin):
                self._note(origin, rec.version)

    # ------------------------------------------------------------ watermarks

    def watermark(self, origin: bytes) -> int:
        """The version through which we hold everything still live of `origin`."""
        if origin == self._self:
            return self._store.max_version(origin)
        return self._wm.get(origin, 0)

    def watermarks(self) -> dict[bytes, int]:
        """Every non-zero watermark except our own (to save and restore)."""
        return dict(self._wm)

    def digest(self) -> dict[bytes, int]:
        """origin -> watermark, for every origin with a non-zero watermark."""
        out = dict(self._wm)
        own = self._store.max_version(self._self)
        if own > 0:
            out[self._self] = own
        return out

    def note_stored(self, rec: SignedRecord) -> None:
        """Account for a verified record now held (e.g. from a broadcast)."""
        if rec.origin != self._self:
            self._note(rec.origin, rec.version)

    def _note(self, origin: bytes, version: int) -> None:
        mark = self._wm.get(origin, 0)
        if version <= mark:
            return
        if version == mark + 1:
            self._advance(origin, version)
            return
        pending = self._pending.setdefault(origin, set())
        if len(pending) < _MAX_PENDING_PER_ORIGIN:
            pending.add(version)

    def _advance(self, origin: bytes, mark: int) -> int:
        """Set the watermark to `mark` (if higher), then run on through held versions."""
        mark = max(mark, self._wm.get(origin, 0))
        pending = self._pending.get(origin)
        if pending:
            while mark + 1 in pending:
                mark += 1
            pending.difference_update([v for v in pending if v <= mark])
            if not pending:
                del self._pending[origin]
        if mark > 0:
            self._wm[origin] = mark
        return mark

    # -------------------------------------------------------------- sending

    def deltas_for(self, peer_digest: Mapping[bytes, int], budget_bytes: int) -> Delta:
        """The records a peer with `peer_digest` lacks, most-lagging origin first.

        With `priority` given, an origin ranks by the lowest priority of the
        records the peer lacks from it, then most lagging first: the node
        puts records too big to push first (a delta is their only way; at a
        founding, fresh records of every machine filled the budget ahead of
        the inventory), then durable ones, then soft ones.

        Stops at the first record that would take the encoded message over
        `budget_bytes` (so no origin has a gap), except that an origin whose
        first record alone does not fit is skipped while nothing has been
        added yet -- one oversized record must not block every other origin.
        """
        priority = self._priority
        lagging: list[tuple[int, int, bytes, int]] = []
        for origin in self._store.origins():
            base = peer_digest.get(origin, 0)
            top = self._store.max_version(origin)
            if top > base:
                tier = 0
                if priority is not None:
                    tier = min(
                        priority(rec) for rec in self._store.by_origin(origin) if rec.version > base
                    )
                lagging.append((tier, top - base, origin, base))
        # By priority, then most behind; origin bytes break ties so the
        # order is stable.
        lagging.sort(key=lambda t: (t[0], -t[1], t[2]))

        used = _DELTA_ENVELOPE
        out: list[SignedRecord] = []
        claims: dict[bytes, int] = {}
        for _tier, _lag, origin, base in lagging:
            batch_cost = _CLAIM_ENTRY
            last = 0
            cut = False
            for rec in self._store.by_origin(origin):
                if rec.version <= base:
                    continue
                cost = rec.size + _bin_header_len(rec.size)
                if used + batch_cost + cost > budget_bytes:
                    cut = True
                    break
                out.append(rec)
                batch_cost += cost
                last = rec.version
            if last:
                used += batch_cost
                mark = self.watermark(origin)
                claim = min(mark, last) if cut else mark
                if claim > base:
                    claims[origin] = claim
            if cut and out:
                break
        return Delta(tuple(out), claims, used)

    # ------------------------------------------------------------- receiving

    def apply(
        self,
        records: Sequence[SignedRecord | bytes],
        complete_through: Mapping[bytes, int],
        verify: bool = True,
        *,
        limits: Limits = DEFAULT_LIMITS,
        admit: Callable[[SignedRecord], bool] | None = None,
    ) -> ApplyResult:
        """Verify, store and account for a peer's delta.

        Each item is a SignedRecord or its encoded bytes; one that fails to
        decode, verify (unless `verify` is False, for records we decoded and
        verified already) or pass `admit` (clan policy) is dropped and listed
        in `invalid`.  Valid records go to the store in one `put_many`.  A
        watermark moves only for an origin whose batch was entirely valid and
        in increasing version order; an item whose origin cannot even be
        decoded taints every origin of this delta.
        """
        valid: list[SignedRecord] = []
        invalid: list[InvalidItem] = []
        tainted: set[bytes] = set()
        taint_all = False
        last_version: dict[bytes, int] = {}
        for index, item in enumerate(records):
            rec: SignedRecord | None = None
            try:
                if isinstance(item, SignedRecord):
                    rec = item
                else:
                    rec = SignedRecord.decode(item, limits, verify=False)
                if verify:
                    rec.verify()
                if admit is not None and not admit(rec):
                    raise WireError("origin or kind not admitted")
            except WireError as exc:
                origin = rec.origin if rec is not None else None
                invalid.append(InvalidItem(index, exc.reason, origin))
                if origin is None:
                    taint_all = True
                else:
                    tainted.add(origin)
                continue
            if rec.version <= last_version.get(rec.origin, 0):
                # Not a gap-free batch in version order: keep the (valid)
                # record but do not trust the batch's completeness claim.
                tainted.add(rec.origin)
            last_version[rec.origin] = rec.version
            valid.append(rec)

        touched = {rec.origin for rec in valid} | set(complete_through)
        touched.discard(self._self)
        before = {origin: self._wm.get(origin, 0) for origin in touched}
        results = self._store.put_many(valid) if valid else []
        stored = tuple(rec for rec, ok in zip(valid, results, strict=True) if ok)
        # Only after put_many returned: a watermark must never run ahead of
        # what is durable.
        for rec in valid:
            if rec.origin != self._self:
                self._note(rec.origin, rec.version)
        for origin, claim in complete_through.items():
            if taint_all or origin in tainted or origin == self._self:
                continue
            claim = min(claim, self._store.max_version(origin))
            if claim > self._wm.get(origin, 0):
                self._advance(origin, claim)
        advanced = {
            origin: self._wm[origin]
            for origin in touched
            if self._wm.get(origin, 0) > before[origin]
        }
        return ApplyResult(stored, len(valid) - len(stored), tuple(invalid), advanced)


# ------------------------------------------------------------------ wire shapes
#
# digest: [[origin(bin 32), watermark(int)], ...] sorted by origin
# delta:  {"c": [[origin(bin 32), complete_through(int)], ...] sorted, "r": [record(bin), ...]}


def _encode_pairs(pairs: Mapping[bytes, int]) -> list[list[Any]]:
    return [[origin, int(v)] for origin, v in sorted(pairs.items())]


def _decode_pairs(value: Any, what: str, max_items: int) -> dict[bytes, int]:
    if type(value) is not list:
        raise WireError(f"{what}: expected array")
    if len(value) > max_items:
        raise WireError(f"{what}: {len(value)} entries exceeds limit {max_items}")
    out: dict[bytes, int] = {}
    for i, pair in enumerate(value):
        if type(pair) is not list or len(pair) != 2:
            raise WireError(f"{what}[{i}]: expected [origin, version]")
        origin, version = pair
        if type(origin) is not bytes or len(origin) != ORIGIN_LEN:
            raise WireError(f"{what}[{i}]: origin must be {ORIGIN_LEN} bytes")
        if type(version) is not int or not 0 <= version <= MAX_VERSION:
            raise WireError(f"{what}[{i}]: version must be an int in 0..2**63-1")
        if origin in out:
            raise WireError(f"{what}[{i}]: duplicate origin")
        out[origin] = version
    return out


def encode_digest(digest: Mapping[bytes, int]) -> list[list[Any]]:
    """The wire value of a digest (pack() it, or embed it in a message)."""
    return _encode_pairs(digest)


def decode_digest(value: Any) -> dict[bytes, int]:
    """A digest from its unpacked wire value; WireError if malformed."""
    return _decode_pairs(value, "digest", MAX_DIGEST_ORIGINS)


def encode_delta(delta: Delta) -> dict[str, Any]:
    """The wire value of a delta: encoded records and completeness claims."""
    return {"c": _encode_pairs(delta.complete_through), "r": [r.encode() for r in delta.records]}


def decode_delta(value: Any, limits: Limits = DEFAULT_LIMITS) -> WireDelta:
    """A delta from its unpacked wire value; WireError if malformed.

    Records stay bytes: `AntiEntropy.apply` decodes and verifies each one, so
    one bad record costs only itself.
    """
    if type(value) is not dict:
        raise WireError("delta: expected map")
    if value.keys() != {"c", "r"}:
        raise WireError("delta: expected exactly the fields c and r")
    claims = _decode_pairs(value["c"], "delta.c", MAX_DIGEST_ORIGINS)
    recs = value["r"]
    if type(recs) is not list:
        raise WireError("delta.r: expected array")
    if len(recs) > MAX_DELTA_RECORDS:
        raise WireError(f"delta.r: {len(recs)} records exceeds limit {MAX_DELTA_RECORDS}")
    for i, rec in enumerate(recs):
        if type(rec) is not bytes:
            raise WireError(f"delta.r[{i}]: expected bytes")
        if not rec or len(rec) > limits.max_frame:
            raise WireError(f"delta.r[{i}]: record size out of range")
    return WireDelta(tuple(recs), claims)
