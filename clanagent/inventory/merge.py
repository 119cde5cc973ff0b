"""Three-way merge of inventory documents, entry by entry (the rule every node applies).

Owns: `merge3` (merge two documents against their common base) and
`merge_leaves` (fold every leaf of the version DAG into one effective
document plus the list of unresolved conflicts), and the `Conflict` value.

The rule (copy to docs/decisions.md):

* An *entry* is one item of `machines`, `services` or `vms` (by name), or the
  whole `clan` or `networks` value (entry name "").  `format` is never merged:
  the left (lowest-hash) document's value is kept (validation pins it to 1).
* Per entry, with "absent" as a value of its own: both sides equal -> that
  value; only one side differs from the base -> that side (adds and deletes
  included); both differ from the base and from each other -> CONFLICT: the
  effective value stays the base's (absent if it was absent) and the conflict
  lists the base value and each side's value with its version hash.
  The same change on both sides is not a conflict; delete vs modify is; an add
  on both sides with different values is.
* Several leaves are folded in ascending hash order; each step's base is the
  lowest common ancestor of all leaves folded so far plus the next one.  An
  entry already in conflict stays in conflict and gains the next leaf's variant
  when that leaf changed it to a value not listed yet.  So the same set of versions gives the same
  document and conflicts on every node, whatever the arrival order.
* Exception for `clan` and `networks` when the base lacks them (leaves with no
  common ancestor): the effective value is the lowest-hash leaf's value, since
  a document without them is unusable; the conflict is still listed.

Must never: mutate its inputs, drop a conflicting variant silently, or depend
on dict order or anything but the inputs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ENTRY_SECTIONS",
    "SINGLE_SECTIONS",
    "Conflict",
    "merge3",
    "merge_leaves",
]

# Sections that are maps of entries by name, and sections that are one entry each.
ENTRY_SECTIONS = ("machines", "services", "vms")
SINGLE_SECTIONS = ("clan", "networks")


class _Absent:
    """Marker for "this entry does not exist on this side" (distinct from None)."""

    _inst: _Absent | None = None

    def __new__(cls) -> _Absent:
        if cls._inst is None:
            cls._inst = super().__new__(cls)
        return cls._inst

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()


@dataclass(frozen=True)
class Conflict:
    """One entry changed differently by concurrent versions.

    `name` is the entry name ("" for the single-entry sections clan/networks);
    `base` is the common ancestor's value (None when absent there); `variants`
    is ((version_hash, value or None when deleted), ...) in fold order.
    """

    section: str
    name: str
    base: Any
    variants: tuple[tuple[bytes, Any], ...]

    @property
    def path(self) -> str:
        return f"{self.section}.{self.name}" if self.name else self.section


def _entries(doc: Mapping[str, Any] | None) -> dict[tuple[str, str], Any]:
    """Flatten a document into {(section, name): value}."""
    out: dict[tuple[str, str], Any] = {}
    if not doc:
        return out
    for section in SINGLE_SECTIONS:
        if section in doc:
            out[(section, "")] = doc[section]
    for section in ENTRY_SECTIONS:
        entries = doc.get(section)
        if isinstance(entries, Mapping):
            for name, value in entries.items():
                out[(section, name)] = value
    return out


def _build(fmt: Any, entries: Mapping[tuple[str, str], Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    if fmt is not ABSENT:
        doc["format"] = fmt
    for section in ENTRY_SECTIONS:
        doc[section] = {}
    for (section, name), value in sorted(entries.items()):
        if value is ABSENT:
            continue
        if name == "" and section in SINGLE_SECTIONS:
            doc[section] = copy.deepcopy(value)
        else:
            doc[section][name] = copy.deepcopy(value)
    return doc


def _plain(value: Any) -> Any:
    return None if value is ABSENT else copy.deepcopy(value)


def merge3(
    base: Mapping[str, Any] | None,
    left: Mapping[str, Any],
    right: Mapping[str, Any],
    left_hash: bytes,
    right_hash: bytes,
) -> tuple[dict[str, Any], list[Conflict]]:
    """Merge `left` and `right` against `base` (None = no common ancestor).

    Returns a new document and the conflicts sorted by (section, name).
    """
    return _fold(
        [(left_hash, left), (right_hash, right)],
        lambda hashes: base,
    )


def merge_leaves(
    leaves: Sequence[tuple[bytes, Mapping[str, Any]]],
    base_of: Callable[[list[bytes]], Mapping[str, Any] | None],
) -> tuple[dict[str, Any], list[Conflict]]:
    """Fold leaves (version hash, doc) into one document, in ascending hash order.

    `base_of(hashes)` returns the doc of the lowest common ancestor of those
    versions, or None when they have none.  The order of `leaves` does not
    matter.
    """
    if not leaves:
        raise ValueError("merge_leaves needs at least one leaf")
    return _fold(sorted(leaves, key=lambda hv: hv[0]), base_of)


def _fold(
    ordered: Sequence[tuple[bytes, Mapping[str, Any]]],
    base_of: Callable[[list[bytes]], Mapping[str, Any] | None],
) -> tuple[dict[str, Any], list[Conflict]]:
    first_hash, first_doc = ordered[0]
    fmt = first_doc.get("format", ABSENT)
    merged = _entries(first_doc)
    # Which folded leaf each merged value came from, for naming the "left"
    # side of a later conflict: the lowest-hash leaf holding that value.
    folded: list[tuple[bytes, dict[tuple[str, str], Any]]] = [(first_hash, merged)]
    conflicts: dict[tuple[str, str], Conflict] = {}
    for i in range(1, len(ordered)):
        right_hash, right_doc = ordered[i]
        right = _entries(right_doc)
        base = _entries(base_of([h for h, _ in ordered[: i + 1]]))
        new: dict[tuple[str, str], Any] = {}
        for key in sorted(set(merged) | set(right) | set(base)):
            b = base.get(key, ABSENT)
            m = merged.get(key, ABSENT)
            r = right.get(key, ABSENT)
            old = conflicts.get(key)
            if old is not None:
                # Already contested: keep the effective value, list the new side.
                if r != b and all(r != _raw(v) for _, v in old.variants):
                    conflicts[key] = Conflict(
                        old.section, old.name, old.base, (*old.variants, (right_hash, _plain(r)))
                    )
                new[key] = m
                continue
            if m == r or r == b:
                new[key] = m
            elif m == b:
                new[key] = r
            else:
                left_hash = next((h for h, e in folded if e.get(key, ABSENT) == m), first_hash)
                conflicts[key] = Conflict(
                    key[0],
                    key[1],
                    _plain(b),
                    ((left_hash, _plain(m)), (right_hash, _plain(r))),
                )
                if b is ABSENT and key[1] == "" and key[0] in SINGLE_SECTIONS:
                    new[key] = m  # see the module docstring: keep the doc usable
                else:
                    new[key] = b
        merged = new
        folded.append((right_hash, right))
    return _build(fmt, merged), [conflicts[k] for k in sorted(conflicts)]


def _raw(value: Any) -> Any:
    # Variants store None for "absent"; map back for comparison.
    return ABSENT if value is None else value
