"""Tests for clanagent.inventory.sealing: endpoints only members can read."""

from __future__ import annotations

import copy
import ipaddress
import socket

import nacl.public
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clanagent.inventory.sealing import (
    SealError,
    open_doc_endpoints,
    open_endpoints,
    reseal_doc,
    seal_endpoints,
)
from clanagent.wire import pack, unpack


class Member:
    def __init__(self, name: str) -> None:
        self.name = name
        self.node_key = bytes(nacl.signing.SigningKey.generate().verify_key)
        self.box = nacl.public.PrivateKey.generate()

    @property
    def box_key(self) -> bytes:
        return bytes(self.box.public_key)

    def entry(self, endpoints=()) -> dict:
        return {
            "node_key": self.node_key,
            "box_key": self.box_key,
            "wg_key": b"\x07" * 32,
            "tags": [],
            "endpoints": list(endpoints),
            "sealed_endpoints": b"",
            "public": True,
        }


ADDRS = {
    "alpha": ["198.51.100.7:7946", "[2001:db8::7]:7946"],
    "beta": ["203.0.113.9:443"],
    "gamma": ["192.0.2.33:51820", "gamma.example.org:7946"],
}


def make_doc(members: list[Member], plain: bool = True) -> dict:
    return {
        "format": 1,
        "clan": {"id": b"c" * 16, "name": "home", "admins": [b"\x01" * 32], "threshold": 1},
        "machines": {m.name: m.entry(ADDRS.get(m.name, []) if plain else []) for m in members},
        "networks": {"default": ["lan"], "by_tag": {}},
        "services": {},
        "vms": {},
    }


def needles(address: str) -> list[bytes]:
    """Every form in which an address could leak into packed bytes."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    out = [address.encode(), pack(address), host.encode(), pack(host), pack([address])]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        out.append(ip.packed)
        out.append(socket.inet_pton(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, host))
    return out


def test_seal_and_open_round_trip_only_for_recipients():
    a, b, outsider = Member("alpha"), Member("beta"), Member("x")
    sealed = seal_endpoints(ADDRS["alpha"], {a.node_key: a.box_key, b.node_key: b.box_key})
    assert open_endpoints(sealed, a.node_key, a.box) == ADDRS["alpha"]
    assert open_endpoints(sealed, b.node_key, bytes(b.box)) == ADDRS["alpha"]
    assert open_endpoints(sealed, outsider.node_key, outsider.box) is None
    # Fresh key and nonce each time.
    again = seal_endpoints(ADDRS["alpha"], {a.node_key: a.box_key})
    assert unpack(again)["n"] != unpack(sealed)["n"]


def test_member_opens_every_machine_and_outsider_learns_no_address():
    members = [Member("alpha"), Member("beta"), Member("gamma")]
    sealed_doc = reseal_doc(make_doc(members), {})
    for m in members:
        assert open_doc_endpoints(sealed_doc, m.node_key, m.box) == ADDRS
    for entry in sealed_doc["machines"].values():
        assert entry["endpoints"] == [] and entry["sealed_endpoints"]
    outsider = Member("zeta")
    assert open_doc_endpoints(sealed_doc, outsider.node_key, outsider.box) == {}
    # Even the whole packed document carries no address in any form.
    blob = pack(sealed_doc)
    for addrs in ADDRS.values():
        for addr in addrs:
            for needle in needles(addr):
                assert needle not in blob, (addr, needle)
    # Sanity: the needles do find addresses in the unsealed doc.
    assert all(needles(a)[0] in pack(make_doc(members)) for addrs in ADDRS.values() for a in addrs)


def test_removed_machine_cannot_open_doc_resealed_after_removal():
    alpha, beta, gamma = Member("alpha"), Member("beta"), Member("gamma")
    doc = reseal_doc(make_doc([alpha, beta, gamma]), {})
    assert open_doc_endpoints(doc, gamma.node_key, gamma.box) == ADDRS
    # Remove gamma: open with a remaining member, drop gamma, reseal.
    plain = open_doc_endpoints(doc, alpha.node_key, alpha.box)
    del doc["machines"]["gamma"], plain["gamma"]
    after = reseal_doc(doc, plain)
    assert open_doc_endpoints(after, gamma.node_key, gamma.box) == {}
    assert open_doc_endpoints(after, beta.node_key, beta.box) == {
        "alpha": ADDRS["alpha"],
        "beta": ADDRS["beta"],
    }


def test_reseal_to_new_member_and_update_endpoints():
    alpha, beta = Member("alpha"), Member("beta")
    doc = reseal_doc(make_doc([alpha]), {})
    plain = open_doc_endpoints(doc, alpha.node_key, alpha.box)
    doc["machines"]["beta"] = beta.entry()
    before = copy.deepcopy(doc)
    out = reseal_doc(doc, plain | {"beta": ["203.0.113.10:1"]})
    assert doc == before  # not mutated
    assert open_doc_endpoints(out, beta.node_key, beta.box) == {
        "alpha": ADDRS["alpha"],
        "beta": ["203.0.113.10:1"],
    }


def test_reseal_refuses_to_lose_sealed_endpoints_or_invent_machines():
    alpha = Member("alpha")
    doc = reseal_doc(make_doc([alpha]), {})
    with pytest.raises(SealError, match="not given in plain"):
        reseal_doc(doc, {})
    with pytest.raises(SealError, match="no machine named 'nope'"):
        reseal_doc(doc, {"nope": []})
    # A machine with no endpoints at all is stored as b"" (none).
    empty = reseal_doc(make_doc([Member("delta")]), {})
    assert empty["machines"]["delta"]["sealed_endpoints"] == b""


def test_tampered_ciphertext_raises_seal_error_and_doc_open_skips_it():
    a = Member("alpha")
    sealed = seal_endpoints(ADDRS["alpha"], {a.node_key: a.box_key})
    value = unpack(sealed)
    for field in ("c", "n"):
        bad = dict(value)
        bad[field] = bytes([bad[field][0] ^ 1]) + bad[field][1:]
        with pytest.raises(SealError, match="authentication failed"):
            open_endpoints(pack(bad), a.node_key, a.box)
    bad = dict(value, k={a.node_key.hex(): b"\0" * 80})
    with pytest.raises(SealError):
        open_endpoints(pack(bad), a.node_key, a.box)
    doc = make_doc([a], plain=False)
    doc["machines"]["alpha"]["sealed_endpoints"] = sealed[:-1]
    errors: dict[str, str] = {}
    assert open_doc_endpoints(doc, a.node_key, a.box, errors) == {}
    assert list(errors) == ["alpha"]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_open_arbitrary_bytes_gives_none_or_seal_error(blob):
    a = Member("alpha")
    try:
        result = open_endpoints(blob, a.node_key, a.box)
    except SealError:
        return
    assert result is None


_ME = Member("alpha")

sealed_like = st.fixed_dictionaries(
    {
        "n": st.binary(min_size=23, max_size=25),
        "c": st.binary(max_size=80),
        "k": st.dictionaries(
            st.sampled_from([_ME.node_key.hex(), "00" * 32, "x"]),
            st.binary(max_size=100) | st.integers(0, 9) | st.none(),
            max_size=2,
        )
        | st.integers(0, 9),
    }
) | st.dictionaries(st.sampled_from(["n", "c", "k", "z"]), st.binary(max_size=30), max_size=4)


@settings(max_examples=300, deadline=None)
@given(sealed_like)
def test_open_structured_garbage_gives_none_or_seal_error(value):
    try:
        result = open_endpoints(pack(value), _ME.node_key, _ME.box)
    except SealError:
        return
    assert result is None
