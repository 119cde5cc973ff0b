"""Signed inventory versions and the DAG of them a node holds.

Owns: the `InventoryVersion` value (hash, wire form, admin signatures), the
signing `Policy` a document sets, the `TrustAnchor` from the join token or
config, and `InventoryHistory`: which versions are valid, which wait for a
missing parent, the leaves, the effective head (merged by `merge.py`) and the
log shown by `clanctl inventory history`.

Validity (the spec's rule): the doc passes validation; a first version (no
parents) is signed by >= threshold of its own admins and matches the anchor
(same clan id, shares at least one anchored admin key); any other version is
signed by >= threshold admins of EVERY parent's policy (so an admin rotation
is signed by the old admins) and keeps the clan id.  A version carrying any
signature that does not verify is rejected whole: we store and forward
versions as received, and must never forward forged bytes.

Must never: do I/O, read a clock (`now` is passed in), store a rejected
version, let a valid version be undone (the head only moves forward), or
raise on bad input from peers (that is an `OfferResult`, counted by reason).
"""

from __future__ import annotations

import enum
import hashlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import nacl.exceptions
import nacl.signing

from clanagent.inventory.merge import Conflict, merge_leaves
from clanagent.wire import Record, WireError, pack, record_type

__all__ = [
    "INVENTORY_SIGNATURE_DOMAIN",
    "MAX_MESSAGE",
    "MAX_PARENTS",
    "MAX_SIGS",
    "MAX_PENDING",
    "InventoryError",
    "LocalInventoryError",
    "RejectReason",
    "InventoryVersion",
    "signing_message",
    "sign",
    "check_signatures",
    "Policy",
    "clan_id_of",
    "TrustAnchor",
    "OfferStatus",
    "OfferResult",
    "HeadView",
    "LogEntry",
    "InventoryHistory",
    "make_version",
]

# Domain separation: an inventory signature can never be replayed as a record
# signature or anything else an admin key signs.
INVENTORY_SIGNATURE_DOMAIN = b"clanagent-inventory-v1\0"
MAX_MESSAGE = 500  # characters
MAX_PARENTS = 64  # concurrent leaves one resolving version may join
MAX_SIGS = 64
MAX_PENDING = 256  # versions waiting for a parent; the oldest is dropped beyond
_MAX_TIME = 2**63 - 1


@record_type
@dataclass(frozen=True, slots=True)
class InventoryVersionWire(Record):
    """The `inventory` record's body as it travels (the schema engine checks
    its shape; InventoryVersion checks the rest, the inventory validator the
    document)."""

    KIND: ClassVar[str] = "inventory"
    doc: dict[str, Any]
    parents: list[bytes]
    time: int
    message: str
    sigs: list[list[bytes]]


class InventoryError(Exception):
    """Base of the inventory versions' errors; `reason` is safe to log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LocalInventoryError(InventoryError):
    """We asked for something invalid (e.g. `new_version` without enough admin keys).

    Bad input from peers is never raised: `offer` returns a rejected result.
    """


class RejectReason(enum.StrEnum):
    """Why `offer` rejected a version (the counter keys)."""

    BAD_SIGNATURE = "bad-signature"  # a signature that does not verify for its key
    UNDER_SIGNED = "under-signed"  # fewer than threshold admin signatures of some policy
    BAD_POLICY = "bad-policy"  # the doc (or a parent's) has no usable clan admins/threshold
    ANCHOR_MISMATCH = "anchor-mismatch"  # a first version not matching the trust anchor
    CLAN_ID_CHANGED = "clan-id-changed"
    INVALID_DOC = "invalid-doc"
    PENDING_OVERFLOW = "pending-overflow"  # dropped from the pending queue


# ------------------------------------------------------------------ version


def signing_message(version_hash: bytes) -> bytes:
    """The bytes an admin signs for a version."""
    return INVENTORY_SIGNATURE_DOMAIN + version_hash


def _hash_of(doc: Any, parents: Sequence[bytes], time: int, message: str) -> bytes:
    body = pack({"doc": doc, "parents": list(parents), "time": time, "message": message})
    return hashlib.blake2b(body, digest_size=32).digest()


@dataclass(frozen=True, eq=False)
class InventoryVersion:
    """One signed version.  Equal when hash and signatures are equal.

    `doc` is shared, treat it as read-only.  `hash` covers doc, parents, time
    and message (not the signatures).  Construction checks shape strictly
    (WireError), never signatures.
    """

    doc: dict[str, Any]
    parents: tuple[bytes, ...]
    time: int
    message: str
    sigs: tuple[tuple[bytes, bytes], ...] = ()
    hash: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if type(self.doc) is not dict:
            raise WireError("doc: expected map")
        parents = self.parents
        if type(parents) not in (tuple, list) or len(parents) > MAX_PARENTS:
            raise WireError(f"parents: expected at most {MAX_PARENTS} hashes")
        for p in parents:
            if type(p) is not bytes or len(p) != 32:
                raise WireError("parents: each parent is 32 bytes")
        if any(a >= b for a, b in zip(parents, parents[1:], strict=False)):
            raise WireError("parents: not sorted or not unique")
        if type(self.time) is not int or not 0 <= self.time <= _MAX_TIME:
            raise WireError("time: expected int in 0..2**63-1")
        if type(self.message) is not str or len(self.message) > MAX_MESSAGE:
            raise WireError(f"message: expected str of at most {MAX_MESSAGE} characters")
        sigs = self.sigs
        if type(sigs) not in (tuple, list) or len(sigs) > MAX_SIGS:
            raise WireError(f"sigs: expected at most {MAX_SIGS} signatures")
        for s in sigs:
            if (
                type(s) not in (tuple, list)
                or len(s) != 2
                or type(s[0]) is not bytes
                or len(s[0]) != 32
                or type(s[1]) is not bytes
                or len(s[1]) != 64
            ):
                raise WireError("sigs: each is [admin_key 32 bytes, signature 64 bytes]")
        if any(a[0] >= b[0] for a, b in zip(sigs, sigs[1:], strict=False)):
            raise WireError("sigs: not sorted by key or a key signs twice")
        object.__setattr__(self, "parents", tuple(parents))
        object.__setattr__(self, "sigs", tuple((bytes(k), bytes(s)) for k, s in sigs))
        object.__setattr__(self, "hash", _hash_of(self.doc, self.parents, self.time, self.message))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, InventoryVersion):
            return NotImplemented
        return self.hash == other.hash and self.sigs == other.sigs

    def __hash__(self) -> int:
        return hash((self.hash, self.sigs))

    def __repr__(self) -> str:
        return (
            f"InventoryVersion(hash={self.hash.hex()[:16]}, parents={len(self.parents)}, "
            f"time={self.time}, sigs={len(self.sigs)})"
        )

    @property
    def signers(self) -> tuple[bytes, ...]:
        """The keys that claim to have signed (not verified)."""
        return tuple(k for k, _ in self.sigs)

    def to_wire(self) -> dict[str, Any]:
        return {
            "doc": self.doc,
            "parents": list(self.parents),
            "time": self.time,
            "message": self.message,
            "sigs": [[k, s] for k, s in self.sigs],
        }

    @classmethod
    def from_wire(cls, value: Any) -> InventoryVersion:
        """Build from a decoded wire value; WireError on any deviation from the spec's shape."""
        w = InventoryVersionWire.from_wire(value, path="version")
        try:
            return cls(w.doc, w.parents, w.time, w.message, w.sigs)
        except WireError:
            raise
        except (TypeError, ValueError, RecursionError) as exc:
            raise WireError(f"version: {type(exc).__name__}") from None


def sign(version: InventoryVersion, key: nacl.signing.SigningKey) -> InventoryVersion:
    """Return `version` with `key`'s signature added (replacing an older one by that key)."""
    pub = bytes(key.verify_key)
    sig = key.sign(signing_message(version.hash)).signature
    sigs = sorted([(k, s) for k, s in version.sigs if k != pub] + [(pub, sig)])
    return InventoryVersion(version.doc, version.parents, version.time, version.message, sigs)


def _bad_signers(version: InventoryVersion) -> list[bytes]:
    msg = signing_message(version.hash)
    bad = []
    for key, sig in version.sigs:
        try:
            nacl.signing.VerifyKey(key).verify(msg, sig)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            bad.append(key)
    return bad


def check_signatures(version: InventoryVersion, policy: Policy) -> frozenset[bytes]:
    """The admin keys of `policy` that signed `version` validly."""
    msg = signing_message(version.hash)
    good = set()
    for key, sig in version.sigs:
        if key not in policy.admins:
            continue
        try:
            nacl.signing.VerifyKey(key).verify(msg, sig)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            continue
        good.add(key)
    return frozenset(good)


def make_version(
    doc: dict[str, Any],
    parents: Iterable[bytes],
    time: int,
    message: str,
    signing_keys: Iterable[nacl.signing.SigningKey] = (),
) -> InventoryVersion:
    """Build a version (parents sorted for you) and sign it with each key."""
    v = InventoryVersion(doc, tuple(sorted(set(parents))), time, message)
    for key in signing_keys:
        v = sign(v, key)
    return v


# ------------------------------------------------------------------- policy


@dataclass(frozen=True)
class Policy:
    """Who may sign the next version: `threshold` distinct keys of `admins`."""

    admins: frozenset[bytes]
    threshold: int

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Policy:
        """The policy a doc sets; WireError if its clan section has no usable one."""
        clan = doc.get("clan") if isinstance(doc, Mapping) else None
        if not isinstance(clan, Mapping):
            raise WireError("doc has no clan section")
        admins, threshold = clan.get("admins"), clan.get("threshold")
        if type(admins) is not list or not all(type(a) is bytes and len(a) == 32 for a in admins):
            raise WireError("clan.admins: expected a list of 32-byte keys")
        if type(threshold) is not int or threshold < 1:
            raise WireError("clan.threshold: expected int >= 1")
        if threshold > len(set(admins)):
            raise WireError("clan.threshold: more than the number of admins")
        return cls(frozenset(admins), threshold)


def clan_id_of(doc: Mapping[str, Any]) -> bytes | None:
    """The doc's clan id, or None when it has none."""
    clan = doc.get("clan") if isinstance(doc, Mapping) else None
    cid = clan.get("id") if isinstance(clan, Mapping) else None
    return cid if type(cid) is bytes else None


@dataclass(frozen=True)
class TrustAnchor:
    """What a node trusts before it holds any version (from its join token or config)."""

    clan_id: bytes
    admin_keys: frozenset[bytes]

    def __post_init__(self) -> None:
        object.__setattr__(self, "admin_keys", frozenset(self.admin_keys))
        if not self.admin_keys:
            raise ValueError("a trust anchor needs at least one admin key")


# ------------------------------------------------------------------ history


class OfferStatus(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"
    PENDING = "pending"


@dataclass(frozen=True)
class OfferResult:
    """What `offer` did.  `accepted` lists every version that became valid by this
    offer, in acceptance order: the offered one and any pending descendants it
    released (store and gossip exactly these)."""

    status: OfferStatus
    hash: bytes
    reason: RejectReason | None = None
    detail: str = ""
    accepted: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class HeadView:
    """The effective state: the merged doc, the leaves it came from, open conflicts,
    and the hashes of every valid version held (for anti-entropy).

    `issues` lists validation errors of a *merged* doc (each leaf is valid, but
    changes merged from several may not be together, e.g. one side deletes a
    machine a role of the other side names).  Empty with one leaf.  A caller
    should not apply a head with issues; an admin resolves it like a conflict.
    """

    doc: dict[str, Any] | None
    leaves: tuple[bytes, ...]
    conflicts: tuple[Conflict, ...]
    version_hashes: frozenset[bytes]
    issues: tuple[Any, ...] = ()


@dataclass(frozen=True)
class LogEntry:
    hash: bytes
    parents: tuple[bytes, ...]
    time: int
    message: str
    signers: tuple[bytes, ...]  # the admin keys whose signatures verified


def _default_validate(doc: dict[str, Any]) -> list[Any]:
    # Imported lazily: parse.py is a sibling that must not be an import-time need.
    from clanagent.inventory.parse import validate_doc

    return list(validate_doc(doc))


def _is_error(issue: Any) -> bool:
    """Warnings (an issue with severity/level "warning") do not invalidate a doc."""
    for attr in ("severity", "level", "kind"):
        value = getattr(issue, attr, None)
        if value is not None:
            return str(getattr(value, "value", value)).lower() != "warning"
    return True


class InventoryHistory:
    """Every valid version a node holds, as a DAG, plus those waiting for a parent."""

    def __init__(
        self,
        anchor: TrustAnchor,
        validate: Callable[[dict[str, Any]], Sequence[Any]] | None = None,
        *,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.anchor = anchor
        self._validate = validate or _default_validate
        self._max_pending = max_pending
        self._versions: dict[bytes, InventoryVersion] = {}
        self._depth: dict[bytes, int] = {}
        self._signers: dict[bytes, tuple[bytes, ...]] = {}
        self._children: dict[bytes, set[bytes]] = {}
        self._leaves: set[bytes] = set()
        self._pending: OrderedDict[bytes, InventoryVersion] = OrderedDict()
        self._rejected: Counter[str] = Counter()
        self._head: HeadView | None = None

    # ---- queries

    def __len__(self) -> int:
        return len(self._versions)

    def __contains__(self, version_hash: object) -> bool:
        return version_hash in self._versions

    def get(self, version_hash: bytes) -> InventoryVersion | None:
        return self._versions.get(version_hash)

    def versions(self) -> list[InventoryVersion]:
        """Every valid version, parents before children (the order to store or re-offer)."""
        return sorted(self._versions.values(), key=lambda v: (self._depth[v.hash], v.hash))

    def leaves(self) -> tuple[bytes, ...]:
        return tuple(sorted(self._leaves))

    @property
    def pending(self) -> tuple[bytes, ...]:
        return tuple(self._pending)

    @property
    def rejected_counts(self) -> dict[str, int]:
        return dict(self._rejected)

    def ancestors(self, version_hash: bytes) -> set[bytes]:
        """All proper ancestors of a held version."""
        seen: set[bytes] = set()
        stack = list(self._versions[version_hash].parents)
        while stack:
            h = stack.pop()
            if h not in seen:
                seen.add(h)
                stack.extend(self._versions[h].parents)
        return seen

    def is_ancestor(self, a: bytes, b: bytes) -> bool:
        """True when `a` is a proper ancestor of `b` (both held)."""
        if a not in self._versions or b not in self._versions or a == b:
            return False
        if self._depth[a] >= self._depth[b]:
            return False
        return a in self.ancestors(b)

    def lowest_common_ancestor(self, *hashes: bytes) -> bytes | None:
        """The deepest version that is (or is an ancestor of) every one of `hashes`.

        Ties between equally deep candidates go to the lowest hash; None when
        there is no common ancestor (or a hash is not held).
        """
        if not hashes or any(h not in self._versions for h in hashes):
            return None
        common: set[bytes] | None = None
        for h in hashes:
            anc = self.ancestors(h) | {h}
            common = anc if common is None else common & anc
        if not common:
            return None
        return min(common, key=lambda h: (-self._depth[h], h))

    def head(self) -> HeadView:
        if self._head is None:
            self._head = self._compute_head()
        return self._head

    def _compute_head(self) -> HeadView:
        leaves = self.leaves()
        hashes = frozenset(self._versions)
        if not leaves:
            return HeadView(None, (), (), hashes)
        if len(leaves) == 1:
            return HeadView(self._versions[leaves[0]].doc, leaves, (), hashes)

        def base_of(hs: list[bytes]) -> dict[str, Any] | None:
            lca = self.lowest_common_ancestor(*hs)
            return None if lca is None else self._versions[lca].doc

        doc, conflicts = merge_leaves([(h, self._versions[h].doc) for h in leaves], base_of)
        try:
            issues = tuple(i for i in self._validate(doc) if _is_error(i))
        except Exception as exc:  # same stance as _check: a validator bug is an issue
            issues = (f"validator failed: {type(exc).__name__}",)
        return HeadView(doc, leaves, tuple(conflicts), hashes, issues)

    def log(self) -> list[LogEntry]:
        """Every valid version, newest first: children before parents, then by time
        (newest first), then by hash, so every node prints the same order."""
        order = sorted(
            self._versions.values(),
            key=lambda v: (-self._depth[v.hash], -v.time, v.hash),
        )
        return [
            LogEntry(v.hash, v.parents, v.time, v.message, self._signers[v.hash]) for v in order
        ]

    # ---- building

    def new_version(
        self,
        doc: dict[str, Any],
        *,
        message: str,
        now: int,
        signing_keys: Iterable[nacl.signing.SigningKey],
        parents: Iterable[bytes | InventoryVersion] | None = None,
    ) -> InventoryVersion:
        """Build and sign a child of `parents` (default: all current leaves).

        Raises LocalInventoryError when the result would not be accepted
        (unknown parent, too few admin keys, invalid doc, ...).  Does not add it:
        offer it like any other version.
        """
        if parents is None:
            parent_hashes = list(self._leaves)
        else:
            parent_hashes = [p.hash if isinstance(p, InventoryVersion) else p for p in parents]
        for p in parent_hashes:
            if p not in self._versions:
                raise LocalInventoryError(f"parent {p.hex()[:16]} is not a version we hold")
        try:
            version = make_version(doc, parent_hashes, now, message, signing_keys)
        except WireError as exc:
            raise LocalInventoryError(f"cannot build version: {exc.reason}") from None
        if version.hash in self._versions:
            raise LocalInventoryError("this exact version already exists")
        problem = self._check(version)
        if problem is not None:
            raise LocalInventoryError(f"{problem[0].value}: {problem[1]}")
        return version

    # ---- offering

    def offer(self, version: InventoryVersion) -> OfferResult:
        """Consider a version from anywhere (a peer, the store, a local admin)."""
        h = version.hash
        if h in self._versions or h in self._pending:
            return OfferResult(OfferStatus.DUPLICATE, h)
        bad = _bad_signers(version)
        if bad:
            return self._reject(
                h, RejectReason.BAD_SIGNATURE, f"signature by {bad[0].hex()[:16]} does not verify"
            )
        missing = [p for p in version.parents if p not in self._versions]
        if missing:
            self._pending[h] = version
            while len(self._pending) > self._max_pending:
                old, _ = self._pending.popitem(last=False)
                self._rejected[RejectReason.PENDING_OVERFLOW.value] += 1
                if old == h:
                    return OfferResult(
                        OfferStatus.REJECTED, h, RejectReason.PENDING_OVERFLOW, "pending is full"
                    )
            return OfferResult(
                OfferStatus.PENDING, h, detail=f"waiting for parent {missing[0].hex()[:16]}"
            )
        problem = self._check(version)
        if problem is not None:
            return self._reject(h, *problem)
        accepted = [h]
        self._add(version)
        accepted.extend(self._release())
        return OfferResult(OfferStatus.ACCEPTED, h, accepted=tuple(accepted))

    def _reject(self, h: bytes, reason: RejectReason, detail: str) -> OfferResult:
        self._rejected[reason.value] += 1
        return OfferResult(OfferStatus.REJECTED, h, reason, detail)

    def _release(self) -> list[bytes]:
        """Accept or reject pending versions whose parents are now all held, repeatedly."""
        released: list[bytes] = []
        progress = True
        while progress:
            progress = False
            for h, v in list(self._pending.items()):
                if all(p in self._versions for p in v.parents):
                    del self._pending[h]
                    progress = True
                    problem = self._check(v)
                    if problem is None:
                        self._add(v)
                        released.append(h)
                    else:
                        self._rejected[problem[0].value] += 1
        return released

    def _check(self, version: InventoryVersion) -> tuple[RejectReason, str] | None:
        """Why `version` (all parents held, signatures already verified) is invalid, or None."""
        try:
            own_policy = Policy.from_doc(version.doc)
        except WireError as exc:
            return RejectReason.BAD_POLICY, exc.reason
        clan_id = clan_id_of(version.doc)
        if not version.parents:
            if clan_id != self.anchor.clan_id:
                return RejectReason.ANCHOR_MISMATCH, "first version is for another clan"
            if not own_policy.admins & self.anchor.admin_keys:
                return RejectReason.ANCHOR_MISMATCH, "first version shares no anchored admin"
            policies = [own_policy]
        else:
            policies = []
            for p in version.parents:
                parent = self._versions[p]
                if clan_id_of(parent.doc) != clan_id:
                    return RejectReason.CLAN_ID_CHANGED, "the clan id differs from a parent's"
                policies.append(Policy.from_doc(parent.doc))  # held => valid
        # Every signature already verified (offer checks them before anything
        # else, and new_version signs itself), so counting is set arithmetic.
        signed = frozenset(version.signers)
        for policy in policies:
            got = signed & policy.admins
            if len(got) < policy.threshold:
                return (
                    RejectReason.UNDER_SIGNED,
                    f"{len(got)} admin signature(s), policy needs {policy.threshold}",
                )
        try:
            issues = [i for i in self._validate(version.doc) if _is_error(i)]
        except Exception as exc:  # a validator bug must not let a doc in
            return RejectReason.INVALID_DOC, f"validator failed: {type(exc).__name__}"
        if issues:
            return RejectReason.INVALID_DOC, f"{len(issues)} error(s), first: {issues[0]}"
        return None

    def _add(self, version: InventoryVersion) -> None:
        h = version.hash
        self._versions[h] = version
        self._depth[h] = 1 + max((self._depth[p] for p in version.parents), default=-1)
        docs = [self._versions[p].doc for p in version.parents] or [version.doc]
        admins = frozenset().union(*(Policy.from_doc(d).admins for d in docs))
        self._signers[h] = tuple(sorted(admins & frozenset(version.signers)))
        self._children[h] = set()
        for p in version.parents:
            self._children[p].add(h)
            self._leaves.discard(p)
        if not self._children[h]:
            self._leaves.add(h)
        self._head = None
