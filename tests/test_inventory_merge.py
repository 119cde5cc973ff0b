"""Tests for clanagent.inventory.merge: the entry-by-entry three-way merge rule."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from clanagent.inventory.merge import Conflict, merge3, merge_leaves
from clanagent.wire import pack

L, R, X = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32


def doc(machines=None, services=None, vms=None, clan=None, networks=None) -> dict[str, Any]:
    return {
        "format": 1,
        "clan": clan if clan is not None else {"id": b"c" * 16, "name": "home"},
        "networks": networks if networks is not None else {"default": ["lan"], "by_tag": {}},
        "machines": machines or {},
        "services": services or {},
        "vms": vms or {},
    }


def test_disjoint_changes_from_both_sides_are_kept():
    base = doc({"a": {"v": 1}}, services={"s": {"t": 1}})
    left = doc({"a": {"v": 1}, "l": {"v": 2}}, services={"s": {"t": 2}})
    right = doc({"r": {"v": 3}}, services={"s": {"t": 1}}, vms={"vm": {"c": 1}})
    merged, conflicts = merge3(base, left, right, L, R)
    assert conflicts == []
    # right deleted "a" (left left it alone), left changed service s, right added a vm.
    assert merged == doc({"l": {"v": 2}, "r": {"v": 3}}, {"s": {"t": 2}}, {"vm": {"c": 1}})


def test_same_change_on_both_sides_is_not_a_conflict():
    base = doc({"a": {"v": 1}})
    both = doc({"a": {"v": 2}, "new": {"v": 5}}, networks={"default": ["tor"], "by_tag": {}})
    merged, conflicts = merge3(base, both, copy.deepcopy(both), L, R)
    assert merged == both and conflicts == []
    # Deleting on both sides is the same change too.
    merged, conflicts = merge3(base, doc(), doc(), L, R)
    assert merged == doc() and conflicts == []


def test_delete_vs_modify_is_a_conflict_and_keeps_base():
    base = doc({"a": {"v": 1}})
    merged, conflicts = merge3(base, doc(), doc({"a": {"v": 2}}), L, R)
    assert merged["machines"] == {"a": {"v": 1}}
    assert conflicts == [Conflict("machines", "a", {"v": 1}, ((L, None), (R, {"v": 2})))]


def test_add_on_both_sides_with_different_values_is_a_conflict_and_stays_absent():
    merged, conflicts = merge3(doc(), doc(vms={"w": {"n": 1}}), doc(vms={"w": {"n": 2}}), L, R)
    assert merged["vms"] == {}
    assert conflicts == [Conflict("vms", "w", None, ((L, {"n": 1}), (R, {"n": 2})))]
    assert conflicts[0].path == "vms.w"


def test_single_entry_sections_conflict_as_a_whole():
    base = doc()
    left = doc(networks={"default": ["tor"], "by_tag": {}})
    right = doc(networks={"default": ["lan"], "by_tag": {"x": ["tor"]}})
    merged, conflicts = merge3(base, left, right, L, R)
    assert merged["networks"] == base["networks"]
    assert [(c.section, c.name, c.path) for c in conflicts] == [("networks", "", "networks")]


def test_no_common_base_keeps_clan_usable_and_lists_conflict():
    left = doc(clan={"id": b"c" * 16, "name": "a"})
    right = doc(clan={"id": b"c" * 16, "name": "b"})
    merged, conflicts = merge3(None, left, right, L, R)
    assert merged["clan"] == left["clan"]
    assert [c.path for c in conflicts] == ["clan"] and conflicts[0].base is None


def test_inputs_are_not_mutated_and_output_shares_nothing():
    base, left, right = doc({"a": {"v": [1]}}), doc({"a": {"v": [2]}}), doc({"b": {"v": [3]}})
    snapshot = pack([base, left, right])
    merged, _ = merge3(base, left, right, L, R)
    merged["machines"]["b"]["v"].append(9)
    assert pack([base, left, right]) == snapshot


def test_three_leaves_accumulate_variants_of_one_conflict():
    base = doc({"a": {"v": 0}})
    leaves = [(L, doc({"a": {"v": 1}})), (R, doc({"a": {"v": 2}})), (X, doc({"a": {"v": 3}}))]
    merged, conflicts = merge_leaves(leaves, lambda hashes: base)
    assert merged["machines"] == {"a": {"v": 0}}
    assert conflicts == [
        Conflict("machines", "a", {"v": 0}, ((L, {"v": 1}), (R, {"v": 2}), (X, {"v": 3})))
    ]
    # A third leaf that did not touch the entry adds no variant.
    leaves[2] = (X, base)
    _, conflicts = merge_leaves(leaves, lambda hashes: base)
    assert len(conflicts[0].variants) == 2


def test_three_leaves_uses_the_base_for_the_folded_set():
    # L and R share a recent ancestor that set a=1; X branched off before it.
    old, recent = doc(), doc({"a": {"v": 1}})
    leaves = [(L, doc({"a": {"v": 1}, "l": {}})), (R, doc({"a": {"v": 1}, "r": {}})), (X, doc())]

    def base_of(hashes):
        return recent if set(hashes) == {L, R} else old

    merged, conflicts = merge_leaves(leaves, base_of)
    assert conflicts == [] and set(merged["machines"]) == {"a", "l", "r"}


entry = st.none() | st.fixed_dictionaries({"v": st.integers(0, 2)})
section = st.dictionaries(st.sampled_from(["a", "b", "c"]), entry, max_size=3)


def _doc_from(machines: dict) -> dict[str, Any]:
    return doc({k: v for k, v in machines.items() if v is not None})


@settings(max_examples=200, deadline=None)
@given(
    section,
    st.lists(
        st.tuples(st.binary(min_size=32, max_size=32), section),
        min_size=1,
        max_size=4,
        unique_by=lambda t: t[0],
    ),
    st.randoms(use_true_random=False),
)
def test_merge_leaves_is_independent_of_input_order(base_m, leaves_m, rnd):
    base = _doc_from(base_m)
    leaves = [(h, _doc_from(m)) for h, m in leaves_m]
    shuffled = list(leaves)
    rnd.shuffle(shuffled)
    a = merge_leaves(leaves, lambda hs: base)
    b = merge_leaves(shuffled, lambda hs: base)
    assert a == b
    merged, conflicts = a
    # Every conflict lists at least two variants and every variant comes from a leaf.
    hashes = {h for h, _ in leaves}
    for c in conflicts:
        assert len(c.variants) >= 2 and {h for h, _ in c.variants} <= hashes
    # Nothing silently dropped: any entry value in a leaf that differs from the
    # merged value and from base is listed as a variant.
    listed = {(c.name, pack(v)) for c in conflicts for _, v in c.variants}
    for _, d in leaves:
        for name in {"a", "b", "c"}:
            val = d["machines"].get(name)
            if val != merged["machines"].get(name) and val != base["machines"].get(name):
                assert (name, pack(val)) in listed


@settings(max_examples=200, deadline=None)
@given(section, section)
def test_one_sided_change_always_wins(base_m, changed_m):
    base, changed = _doc_from(base_m), _doc_from(changed_m)
    assert merge3(base, base, changed, L, R) == (changed, [])
    assert merge3(base, changed, base, L, R) == (changed, [])
