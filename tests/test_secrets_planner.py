"""The secrets planner: who generates what and when, failover, partitions, rotation reasons.

Also home of the small clan builder the other secrets tests import.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import nacl.signing
import pytest

from clanagent.identity import Identity
from clanagent.inventory.parse import load_inventory_toml
from clanagent.secrets.crypto import open_payload, recover_payload
from clanagent.secrets.model import (
    SecretInstance,
    generator_for,
    holders,
    instances,
    instances_held_by,
    parse_instance_id,
)
from clanagent.secrets.planner import current_of, plan, status
from clanagent.secrets.record import (
    SecretBody,
    build_rotate_request,
    build_secret_record,
)
from clanagent.wire import WireError
from tests.test_inventory_parse import to_toml, wg

DAY = 86400
T0 = 1_700_000_000


@dataclass
class Clan:
    doc: dict
    ids: dict[str, Identity]
    admin: nacl.signing.SigningKey

    def key(self, m: str) -> bytes:
        return self.ids[m].public_key

    def opener(self, m: str):
        ident = self.ids[m]

        def opens(body: SecretBody) -> None:
            open_payload(body.nonce, body.ciphertext, body.keys, ident.public_key, ident.box_key)

        return opens


def make_clan(
    servers=("a", "b", "c"), clients=("d",), secrets: dict | None = None, ids=None, admin=None
) -> Clan:
    ids = dict(ids or {})
    for m in (*servers, *clients):
        ids.setdefault(m, Identity.generate())
    admin = admin or nacl.signing.SigningKey.generate()
    if secrets is None:
        secrets = {
            "shared": {"generator": "password", "scope": "role:server", "rotate_days": 30},
            "own": {"generator": "ed25519"},
            "cert": {
                "generator": "command",
                "command": "true",
                "secret_files": ["c"],
                "depends": ["shared"],
                "scope": "role:server",
            },
        }
    raw = {
        "clan": {
            "id": "00112233445566778899aabbccddeeff",
            "name": "t",
            "admins": [bytes(admin.verify_key).hex()],
            "threshold": 1,
        },
        "machines": {
            m: {
                "node_key": ident.public_key.hex(),
                "box_key": ident.box_public.hex(),
                "wg_key": wg(i + 1),
                "tags": ["server"] if m in servers else ["client"],
            }
            for i, (m, ident) in enumerate(sorted(ids.items()))
            if m in servers or m in clients
        },
        "services": {
            "svc": {
                "type": "x",
                "roles": {"server": {"tags": ["server"]}, "client": {"tags": ["client"]}},
                "secrets": secrets,
            }
        },
    }
    r = load_inventory_toml(to_toml(raw), filename="inv.toml")
    assert r.errors == [], r.errors
    return Clan(r.doc, ids, admin)


SHARED = SecretInstance("svc", "shared", "role:server")


def publish(clan: Clan, m: str, inst: SecretInstance, generation: int, created: int, files=None):
    keys = {
        clan.doc["machines"][h]["node_key"]: clan.doc["machines"][h]["box_key"]
        for h in holders(clan.doc, inst.service, inst.secret, inst.scope_id)
    }
    return build_secret_record(
        clan.ids[m],
        inst,
        generation,
        created,
        files or {"password": f"pw-{generation}-{m}".encode()},
        {},
        keys,
        clan.doc["clan"]["admins"],
    )


def tasks(p, inst=SHARED):
    return [t for t in p.generate if t.instance == inst]


# ------------------------------------------------------------------- model


def test_instances_and_holders():
    clan = make_clan()
    ids = [i.id for i in instances(clan.doc)]
    assert ids == sorted(ids)
    assert "svc/shared" in ids and "svc/cert" in ids
    assert {"svc/own@a", "svc/own@b", "svc/own@c", "svc/own@d"} <= set(ids)
    assert holders(clan.doc, "svc", "shared", "role:server") == ["a", "b", "c"]
    assert holders(clan.doc, "svc", "own", "d") == ["d"]
    assert holders(clan.doc, "svc", "own", "role:server") == []
    assert holders(clan.doc, "svc", "nope", "a") == []
    assert [i.id for i in instances_held_by(clan.doc, "d")] == ["svc/own@d"]
    assert parse_instance_id("svc/shared", clan.doc) == SHARED
    assert parse_instance_id("svc/own@a") == SecretInstance("svc", "own", "a")
    for bad in ("svc", "svc/x/y", "svc/shared", "svc/own@role:x", "../x/y", "svc/own@"):
        with pytest.raises(WireError):
            parse_instance_id(bad, clan.doc if bad != "svc/shared" else None)


def test_generator_choice_is_deterministic_and_fails_over():
    clan = make_clan()
    online = [(m, clan.key(m)) for m in ("a", "b", "c")]
    first = generator_for("svc/shared", online)
    assert first in ("a", "b", "c")
    assert generator_for("svc/shared", list(reversed(online))) == first
    rest = [x for x in online if x[0] != first]
    second = generator_for("svc/shared", rest)
    assert second != first and second is not None
    assert generator_for("svc/shared", [x for x in rest if x[0] != second]) not in (first, second)
    assert generator_for("svc/shared", []) is None


# ------------------------------------------------------------------- planner


def _chosen(clan, online, inst=SHARED):
    return generator_for(inst.id, [(m, clan.key(m)) for m in online])


def test_first_generation_only_on_the_chosen_machine():
    clan = make_clan()
    online = ["a", "b", "c", "d"]
    g = _chosen(clan, ["a", "b", "c"])
    for m in ("a", "b", "c"):
        p = plan(clan.doc, m, online, {}, {}, T0)
        ts = tasks(p)
        if m == g:
            assert len(ts) == 1 and ts[0].reason == "first" and ts[0].generation == 1
            assert set(ts[0].recipients) == {clan.key(x) for x in ("a", "b", "c")}
            assert ts[0].admins == (bytes(clan.admin.verify_key),)
        else:
            assert ts == []
            assert any(w.instance == SHARED and g in w.reason for w in p.waiting)
    # d holds nothing shared and never generates it
    assert tasks(plan(clan.doc, "d", online, {}, {}, T0)) == []
    # own@d is generated by d alone
    own_d = SecretInstance("svc", "own", "d")
    assert tasks(plan(clan.doc, "d", online, {}, {}, T0), own_d)[0].reason == "first"


def test_dependency_waits_for_current_generation():
    clan = make_clan()
    g = _chosen(clan, ["a", "b", "c"])
    cert = SecretInstance("svc", "cert", "role:server")
    cg = _chosen(clan, ["a", "b", "c"], cert)
    p = plan(clan.doc, cg, ["a", "b", "c"], {}, {}, T0)
    assert tasks(p, cert) == []
    assert any(w.instance == cert and "svc/shared" in w.reason for w in p.waiting)
    rec = publish(clan, g, SHARED, 1, T0)
    p = plan(clan.doc, cg, ["a", "b", "c"], {"svc/shared": [rec]}, {}, T0, opens=clan.opener(cg))
    (t,) = tasks(p, cert)
    assert t.deps == {"shared": SHARED} and t.inputs == {"svc/shared": 1}
    # once the dependency rotates, the dependent is redone ("dependency")
    cert_rec = build_secret_record(
        clan.ids[cg],
        cert,
        1,
        T0,
        {"c": b"x"},
        {},
        dict(
            (clan.doc["machines"][h]["node_key"], clan.doc["machines"][h]["box_key"])
            for h in ("a", "b", "c")
        ),
        clan.doc["clan"]["admins"],
        inputs={"svc/shared": 1},
    )
    recs = {"svc/shared": [rec], "svc/cert": [cert_rec]}
    assert tasks(plan(clan.doc, cg, ["a", "b", "c"], recs, {}, T0), cert) == []
    recs["svc/shared"] = [rec, publish(clan, g, SHARED, 2, T0 + 5)]
    (t,) = tasks(plan(clan.doc, cg, ["a", "b", "c"], recs, {}, T0 + 5), cert)
    assert t.reason == "dependency" and t.inputs == {"svc/shared": 2} and t.generation == 2


def test_holders_install_current_and_non_recipients_do_not():
    clan = make_clan()
    g = _chosen(clan, ["a", "b", "c"])
    rec = publish(clan, g, SHARED, 1, T0)
    for m in ("a", "b", "c"):
        p = plan(clan.doc, m, ["a", "b", "c"], {"svc/shared": [rec]}, {}, T0 + 1)
        assert [i.record for i in p.install if i.instance == SHARED] == [rec]
        assert tasks(p) == []  # nothing due yet
    p = plan(clan.doc, "d", ["a", "b", "c", "d"], {"svc/shared": [rec]}, {}, T0 + 1)
    assert all(i.instance != SHARED for i in p.install)


def test_rotation_due_and_requested():
    clan = make_clan()
    g = _chosen(clan, ["a", "b", "c"])
    rec = publish(clan, g, SHARED, 3, T0)
    recs = {"svc/shared": [rec]}
    assert tasks(plan(clan.doc, g, ["a", "b", "c"], recs, {}, T0 + 30 * DAY - 1)) == []
    (t,) = tasks(plan(clan.doc, g, ["a", "b", "c"], recs, {}, T0 + 30 * DAY))
    assert t.reason == "due" and t.generation == 4
    # a member asks for a rotation of the current generation
    req = build_rotate_request(clan.ids["d"], "svc/shared", 3, T0 + 10)
    (t,) = tasks(plan(clan.doc, g, ["a", "b", "c"], recs, {"svc/shared": [req]}, T0 + 11))
    assert t.reason == "requested" and t.generation == 4
    # a stale request (for an older generation) does nothing
    old = build_rotate_request(clan.ids["d"], "svc/shared", 2, T0 + 10)
    assert tasks(plan(clan.doc, g, ["a", "b", "c"], recs, {"svc/shared": [old]}, T0 + 11)) == []
    # a stranger's request does nothing
    stranger = build_rotate_request(Identity.generate(), "svc/shared", 3, T0 + 10)
    assert (
        tasks(plan(clan.doc, g, ["a", "b", "c"], recs, {"svc/shared": [stranger]}, T0 + 11)) == []
    )


@pytest.mark.parametrize("maker", ["a", "b", "c"])
def test_removed_machine_triggers_rotation_and_cannot_read_the_new_generation(maker):
    clan = make_clan()
    rec1 = publish(clan, maker, SHARED, 1, T0)
    victim = "c"
    smaller = make_clan(servers=("a", "b"), clients=("c", "d"), ids=clan.ids, admin=clan.admin)
    assert holders(smaller.doc, "svc", "shared", "role:server") == ["a", "b"]
    g = _chosen(smaller, ["a", "b"])
    recs = {"svc/shared": [rec1]}
    (t,) = tasks(plan(smaller.doc, g, ["a", "b", "c", "d"], recs, {}, T0 + 5))
    assert t.reason == "recipients" and t.generation == 2
    assert clan.key(victim) not in t.recipients
    # the chosen machine seals generation 2 to exactly the task's recipients
    rec2 = build_secret_record(
        smaller.ids[g], SHARED, 2, T0 + 5, {"password": b"new"}, {}, t.recipients, t.admins
    )
    body = current_of(smaller.doc, SHARED, [rec1, rec2]).body
    assert body.generation == 2
    ident = clan.ids[victim]
    assert (
        open_payload(body.nonce, body.ciphertext, body.keys, ident.public_key, ident.box_key)
        is None
    )
    for m in ("a", "b"):
        i = clan.ids[m]
        assert open_payload(body.nonce, body.ciphertext, body.keys, i.public_key, i.box_key) == {
            "password": b"new"
        }
    assert recover_payload(body.nonce, body.ciphertext, body.keys, clan.admin) == {
        "password": b"new"
    }
    # the removed machine no longer installs it and is told to remove its files
    p = plan(
        smaller.doc,
        victim,
        ["a", "b", "c"],
        {"svc/shared": [rec1, rec2]},
        {},
        T0 + 6,
        installed=[("svc", "shared"), ("svc", "own")],
    )
    assert all(i.instance != SHARED for i in p.install)
    assert p.remove == [("svc", "shared")]
    # after the rotation, nothing more to do
    p = plan(smaller.doc, g, ["a", "b"], {"svc/shared": [rec1, rec2]}, {}, T0 + 6)
    assert tasks(p) == []


def test_joined_machine_triggers_rotation():
    clan = make_clan()
    rec1 = publish(clan, _chosen(clan, ["a", "b", "c"]), SHARED, 1, T0)
    bigger = make_clan(servers=("a", "b", "c", "d"), clients=(), ids=clan.ids, admin=clan.admin)
    g = _chosen(bigger, ["a", "b", "c", "d"])
    (t,) = tasks(plan(bigger.doc, g, ["a", "b", "c", "d"], {"svc/shared": [rec1]}, {}, T0))
    assert t.reason == "recipients" and clan.key("d") in t.recipients


def test_generator_dies_mid_rotation_and_the_next_one_finishes():
    clan = make_clan()
    online = ["a", "b", "c"]
    g1 = _chosen(clan, online)
    rec1 = publish(clan, g1, SHARED, 1, T0)
    recs = {"svc/shared": [rec1]}
    req = {"svc/shared": [build_rotate_request(clan.ids["d"], "svc/shared", 1, T0 + 1)]}
    # g1 is told to make generation 2 ...
    (t,) = tasks(plan(clan.doc, g1, online, recs, req, T0 + 2))
    assert t.generation == 2
    # ... and dies before publishing it.  Membership drops it; the next holder takes over.
    rest = [m for m in online if m != g1]
    g2 = _chosen(clan, rest)
    assert g2 != g1
    for m in rest:
        ts = tasks(plan(clan.doc, m, rest, recs, req, T0 + 60))
        assert [x.generation for x in ts] == ([2] if m == g2 else [])
    rec2 = publish(clan, g2, SHARED, 2, T0 + 60)
    recs["svc/shared"].append(rec2)
    for m in rest:
        p = plan(clan.doc, m, rest, recs, req, T0 + 61, opens=clan.opener(m))
        assert tasks(p) == []
        assert [i.body.generation for i in p.install if i.instance == SHARED] == [2]
    # the dead one comes back: it agrees on generation 2 and does nothing more
    p = plan(clan.doc, g1, online, recs, req, T0 + 62, opens=clan.opener(g1))
    assert tasks(p) == [] and [i.record for i in p.install if i.instance == SHARED] == [rec2]


def test_partition_both_sides_generate_and_converge():
    clan = make_clan()
    online = ["a", "b", "c"]
    rec1 = publish(clan, _chosen(clan, online), SHARED, 1, T0)
    now = T0 + 30 * DAY
    # each side of a partition sees only itself online and rotates
    side_recs = []
    for side in (["a"], ["b", "c"]):
        g = _chosen(clan, side)
        (t,) = tasks(plan(clan.doc, g, side, {"svc/shared": [rec1]}, {}, now))
        assert t.reason == "due" and t.generation == 2
        side_recs.append(publish(clan, g, SHARED, 2, now + len(side)))
    merged = [rec1, *side_recs]
    want = max(side_recs, key=lambda r: (2, r.body["created"], r.origin))
    for m in ("a", "b", "c"):
        for order in (merged, list(reversed(merged))):
            p = plan(clan.doc, m, online, {"svc/shared": order}, {}, now + 10, opens=clan.opener(m))
            assert [i.record for i in p.install if i.instance == SHARED] == [want]
            assert tasks(p) == []


def test_partition_same_created_breaks_tie_by_origin():
    clan = make_clan()
    recs = [publish(clan, m, SHARED, 2, T0) for m in ("a", "b", "c")]
    want = max(recs, key=lambda r: r.origin)
    for order in (recs, recs[::-1]):
        assert current_of(clan.doc, SHARED, order).record == want


def test_records_from_non_holders_are_ignored():
    clan = make_clan()
    g = _chosen(clan, ["a", "b", "c"])
    good = publish(clan, g, SHARED, 1, T0)
    bad = publish(clan, "d", SHARED, 9, T0)  # a client is no holder of the server secret
    assert current_of(clan.doc, SHARED, [good, bad]).record == good
    # but its generation is still never reused by the next one
    (t,) = tasks(plan(clan.doc, g, ["a", "b", "c"], {"svc/shared": [good, bad]}, {}, T0 + 30 * DAY))
    assert t.generation == 10


def test_a_generation_that_does_not_open_for_us_is_skipped():
    clan = make_clan()
    g = _chosen(clan, ["a", "b", "c"])
    good = publish(clan, g, SHARED, 1, T0)
    newer = publish(clan, g, SHARED, 2, T0 + 1)
    body = copy.deepcopy(newer.body)
    body["ciphertext"] = bytes([body["ciphertext"][0] ^ 1]) + body["ciphertext"][1:]
    broken = build_signed_body(clan.ids[g], body)
    cur = current_of(clan.doc, SHARED, [good, broken], opens=clan.opener("a"))
    assert cur.record == good


def build_signed_body(ident, body):
    from clanagent.wire import SignedRecord

    return SignedRecord.create(ident, "secret", "svc/shared", body["generation"], body)


def test_forged_or_badly_signed_records_are_never_installed():
    clan = make_clan()
    g = _chosen(clan, ["a", "b", "c"])
    good = publish(clan, g, SHARED, 1, T0)
    other = next(m for m in ("a", "b", "c") if m != g)
    newer = publish(clan, g, SHARED, 2, T0 + 1)
    # the newer record's payload presented as signed by another holder: bad signature
    from clanagent.wire import SignedRecord

    stolen = SignedRecord(clan.key(other), newer.payload, newer.signature)
    # a record claiming another instance's key is rejected too
    wrong_key = SignedRecord.create(clan.ids[g], "secret", "svc/own@a", 2, newer.body)
    for m in ("a", "b", "c"):
        p = plan(
            clan.doc,
            m,
            ["a", "b", "c"],
            {"svc/shared": [good, stolen, wrong_key]},
            {},
            T0 + 2,
            opens=clan.opener(m),
        )
        assert [i.record for i in p.install if i.instance == SHARED] == [good]


def test_status_rows():
    clan = make_clan()
    g = _chosen(clan, ["a", "b", "c"])
    rec = publish(clan, g, SHARED, 1, T0)
    rows = {
        r.instance.id: r for r in status(clan.doc, ["a", "b", "c"], {"svc/shared": [rec]}, {}, T0)
    }
    r = rows["svc/shared"]
    assert (r.generation, r.created, r.origin, r.generator) == (1, T0, clan.key(g), g)
    assert r.holders == ("a", "b", "c") and r.due == T0 + 30 * DAY and r.pending is None
    assert rows["svc/own@d"].generation is None and rows["svc/own@d"].pending == "first"
    assert rows["svc/own@d"].generator is None  # d is offline
    rows = {
        r.instance.id: r for r in status(clan.doc, ["a"], {"svc/shared": [rec]}, {}, T0 + 30 * DAY)
    }
    assert rows["svc/shared"].pending == "due" and rows["svc/shared"].generator == "a"
