"""clanagent.inventory.edit: admin keys, sealing and signing an edit, comparing edits.

No agent here: edit.py takes a document (and what the agent could open) and
gives a signed version; these tests drive it directly.
"""

from __future__ import annotations

import copy
import os
import stat

import nacl.public
import nacl.signing
import pytest

from clanagent.inventory import edit
from clanagent.inventory.parse import validate_doc
from clanagent.inventory.sealing import open_doc_endpoints, reseal_doc
from clanagent.inventory.versions import InventoryHistory, TrustAnchor

ADMIN = nacl.signing.SigningKey(b"\x11" * 32)


class Member:
    def __init__(self, name: str, seed: int) -> None:
        self.name = name
        self.sign = nacl.signing.SigningKey(bytes([seed]) * 32)
        self.box = nacl.public.PrivateKey(bytes([seed + 1]) * 32)

    def entry(self, endpoints=()) -> dict:
        return {
            "node_key": bytes(self.sign.verify_key),
            "box_key": bytes(self.box.public_key),
            "wg_key": bytes(self.box.public_key)[::-1],
            "tags": [],
            "endpoints": list(endpoints),
            "sealed_endpoints": b"",
            "public": True,
        }


M1, M2 = Member("m1", 1), Member("m2", 3)


def make_doc(**endpoints) -> dict:
    doc = {
        "format": 1,
        "clan": {
            "id": b"c" * 16,
            "name": "home",
            "admins": [bytes(ADMIN.verify_key)],
            "threshold": 1,
        },
        "machines": {m.name: m.entry(endpoints.get(m.name, ())) for m in (M1, M2)},
        "networks": {"default": ["lan"], "by_tag": {}},
        "services": {},
        "vms": {},
    }
    assert validate_doc(doc) == []
    return doc


def test_seal_and_sign_gives_a_version_the_history_accepts():
    doc = make_doc(m1=["198.51.100.7:7946"])
    before = copy.deepcopy(doc)
    v = edit.seal_and_sign(doc, parents=[], keys=[ADMIN], message="founded", now=1_800_000_000)
    assert doc == before  # the caller's document is not changed
    assert v.parents == () and v.time == 1_800_000_000 and v.message == "founded"
    # endpoints leave only sealed, and a member opens them
    assert v.doc["machines"]["m1"]["endpoints"] == []
    assert open_doc_endpoints(v.doc, bytes(M2.sign.verify_key), M2.box) == {
        "m1": ["198.51.100.7:7946"]
    }
    history = InventoryHistory(TrustAnchor(b"c" * 16, frozenset([bytes(ADMIN.verify_key)])))
    assert history.offer(v).status.name == "ACCEPTED"


def test_sealed_endpoints_need_what_the_agent_can_open():
    sealed = reseal_doc(make_doc(m1=["198.51.100.7:7946"]), {})
    edited = copy.deepcopy(sealed)
    edited["machines"]["m2"]["tags"] = ["web"]
    with pytest.raises(edit.EditError, match=r"machines\.m1: its endpoints are sealed"):
        edit.seal_and_sign(edited, parents=[], keys=[ADMIN], message="m", now=1)
    v = edit.seal_and_sign(
        edited,
        parents=[b"p" * 32],
        keys=[ADMIN],
        message="m",
        now=1,
        readable={"m1": ["198.51.100.7:7946"]},
    )
    assert v.parents == (b"p" * 32,)
    assert open_doc_endpoints(v.doc, bytes(M1.sign.verify_key), M1.box)["m1"] == [
        "198.51.100.7:7946"
    ]


def test_an_invalid_edit_is_never_signed():
    doc = make_doc()
    doc["clan"]["threshold"] = 5  # more than there are admins
    with pytest.raises(edit.EditError, match="refusing to sign an invalid inventory"):
        edit.seal_and_sign(doc, parents=[], keys=[ADMIN], message="m", now=1)


def test_changes_ignore_endpoints_and_their_sealed_blobs():
    old = reseal_doc(make_doc(m1=["198.51.100.7:7946"]), {})
    new = make_doc(m1=["198.51.100.8:7946"])
    assert edit.changes(old, new) == []
    new["machines"]["m2"]["tags"] = ["web"]
    assert [c.path for c in edit.changes(old, new)] == ["machines.m2.tags"]
    assert old["machines"]["m1"]["sealed_endpoints"]  # comparing changed neither
    assert new["machines"]["m1"]["endpoints"] == ["198.51.100.8:7946"]


# -- admin keys --------------------------------------------------------------


def test_create_and_read_an_admin_key(tmp_path):
    path = tmp_path / "sub" / "admin.key"
    old = os.umask(0)
    try:
        key = edit.create_admin_key(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert bytes(edit.read_admin_key(path).verify_key) == bytes(key.verify_key)
    with pytest.raises(FileExistsError):  # never replaces a key
        edit.create_admin_key(path)
    assert bytes(edit.read_admin_key(path).verify_key) == bytes(key.verify_key)


def test_read_admin_key_refuses_what_it_must_not_use(tmp_path):
    good = tmp_path / "admin.key"
    edit.create_admin_key(good)
    link = tmp_path / "link.key"
    link.symlink_to(good)
    with pytest.raises(edit.AdminKeyError, match="symlink"):
        edit.read_admin_key(link)
    assert edit.read_admin_key(link, follow_symlinks=True)  # the CLI's own file
    with pytest.raises(edit.AdminKeyError, match="is not yours"):
        edit.read_admin_key(good, owner=os.geteuid() + 1)
    good.chmod(0o640)
    with pytest.raises(edit.AdminKeyError, match="chmod 600"):
        edit.read_admin_key(good)
    big = tmp_path / "big.key"
    big.write_bytes(b"A" * (edit.MAX_ADMIN_KEY_FILE + 1))
    big.chmod(0o600)
    with pytest.raises(edit.AdminKeyError, match="too large"):
        edit.read_admin_key(big)
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"not base64\n")
    junk.chmod(0o600)
    with pytest.raises(edit.AdminKeyError, match="not an admin key"):
        edit.read_admin_key(junk)
    with pytest.raises(FileNotFoundError):
        edit.read_admin_key(tmp_path / "none.key")


def test_admin_key_path(monkeypatch, tmp_path):
    monkeypatch.setenv("CLANAGENT_ADMIN_KEY", str(tmp_path / "env.key"))
    assert edit.admin_key_path("/x/y.key") == tmp_path.joinpath("/x/y.key")
    assert edit.admin_key_path(None) == tmp_path / "env.key"
    monkeypatch.delenv("CLANAGENT_ADMIN_KEY")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert edit.admin_key_path() == tmp_path / ".config/clanagent/admin.key"
