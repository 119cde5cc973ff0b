"""The console's guided edits (add / remove a machine, apply a service to tags)
over the real WebSocket API of one running agent: previews, field errors,
refusals (a head that moved, a change the preview did not show), and what
gets signed.  The browser drives the same methods in test_web_browser_guided.py.
"""

from __future__ import annotations

import pytest

from clanagent.identity import load_or_create, machine_key_string
from clanagent.inventory.token import parse_token
from clanagent.web.guided import FormError, add_machine_doc, remove_machine_doc, service_doc

from .test_inventory_agent import call, genesis, machine_entry
from .test_web_browser import vpn_service
from .test_web_console import api, founded_agent, login, write_key

pytestmark = pytest.mark.integration


def _doc(tmp_path):
    import nacl.signing

    admin = nacl.signing.SigningKey.generate()
    ids = {i: load_or_create(tmp_path / f"k{i}")[0] for i in (1, 2, 3)}
    doc = genesis(
        admin,
        {
            "m1": machine_entry(ids[1], ["server"]),
            "m2": machine_entry(ids[2], ["laptop"]),
            "m3": machine_entry(ids[3], ["server"]),
        },
    )
    doc["services"]["vpn"] = vpn_service()
    return doc, ids


def test_add_machine_errors_name_their_field(tmp_path):
    doc, ids = _doc(tmp_path)
    new_ident = load_or_create(tmp_path / "k4")[0]
    key = machine_key_string(new_ident)
    with pytest.raises(FormError) as e:
        add_machine_doc(doc, "m2", ["x"], key)
    assert "already a machine" in e.value.fields["name"]
    with pytest.raises(FormError) as e:
        add_machine_doc(doc, "m4", ["x"], key[:-3])
    assert "mistyped" in e.value.fields["key"]
    with pytest.raises(FormError) as e:
        add_machine_doc(doc, "m4", ["x"], machine_key_string(ids[1]))
    assert "machine 'm1'" in e.value.fields["key"]
    with pytest.raises(FormError) as e:
        add_machine_doc(doc, "Bad Name", ["Not A Tag"], "nope")
    assert set(e.value.fields) == {"name", "tags", "key"}
    new = add_machine_doc(doc, "m4", ["server", "server"], key)
    assert new["machines"]["m4"]["tags"] == ["server"] and "m4" not in doc["machines"]


def test_remove_strips_references_and_refuses_this_machine(tmp_path):
    doc, _ = _doc(tmp_path)
    with pytest.raises(FormError, match="runs this console"):
        remove_machine_doc(doc, "m1", "m1")
    new = remove_machine_doc(doc, "m2", "m1")
    assert "m2" not in new["machines"]
    assert new["services"]["vpn"]["roles"]["client"]["machines"] == ["m3"]


def test_removal_lists_what_follows(tmp_path):
    from clanagent.web.guided import removal_consequences, service_preview

    doc, _ = _doc(tmp_path)
    doc["vms"]["hello"] = {
        "machines": [],
        "tags": ["server"],
        "count": 1,
        "vcpus": 1,
        "memory_mb": 64,
        "kernel": "/k",
        "initrd": "",
        "rootfs": "",
        "disk_mb": 0,
        "networks": [],
        "secrets": [],
        "backend": "auto",
        "graphics": False,
    }
    from clanagent.inventory.select import placement

    host = placement(doc, "hello")[0]
    other = "m3" if host == "m1" else "m1"
    gone = remove_machine_doc(doc, "m1", "m2")
    lines = [c["text"] for c in removal_consequences(doc, gone, "m1", online=False)]
    text = " | ".join(lines)
    assert "not online" in text
    assert "vpn/serverkey is no longer kept by anyone" in text
    assert (
        "exports of vpn.server (address, public_key) are withdrawn from vpn.client on m2, m3"
        in text
    )
    assert "role vpn.server is left with no machine" in text
    if host == "m1":
        assert f"VM hello is stopped on m1 and started on {other}" in text
    # m2 held the shared client secret with m3: it is made again for m3 only
    gone = remove_machine_doc(doc, "m2", "m1")
    text = " | ".join(c["text"] for c in removal_consequences(doc, gone, "m2", online=True))
    assert "vpn/psk is rotated: a new generation for m3 only" in text
    assert "closes its sessions" in text
    # the service preview: the same selection as the agents
    new = service_doc(doc, "vpn", None, {"client": {"tags": ["laptop"]}})
    p = service_preview(doc, new, "vpn", {"m1", "m2"})
    psk = next(x for x in p["secrets"] if x["id"] == "vpn/psk")
    assert psk["holders"] == ["m2"] and psk["change"] == "rotated" and psk["generator"] == "m2"
    assert p["wiring"] == [
        {
            "import": "vpn.server",
            "by": "vpn.client",
            "from": ["m1"],
            "to": ["m2"],
            "values": ["address", "public_key"],
        }
    ]


def test_service_tags_that_match_nothing_are_errors(tmp_path):
    doc, _ = _doc(tmp_path)
    with pytest.raises(FormError) as e:
        service_doc(doc, "vpn", None, {"client": {"tags": ["nobody-has-this"]}})
    assert "matches no machine" in e.value.fields["roles.client.tags"]
    with pytest.raises(FormError) as e:
        service_doc(doc, "web", "", {"front": {"tags": ["server"]}})
    assert "type" in e.value.fields
    new = service_doc(doc, "vpn", None, {"client": {"machines": [], "tags": ["laptop"]}})
    role = new["services"]["vpn"]["roles"]["client"]
    assert role["tags"] == ["laptop"] and role["imports"] == ["vpn.server"]  # kept


async def test_guided_edits_over_the_api(tmp_path):
    new_ident = load_or_create(tmp_path / "new")[0]
    key = machine_key_string(new_ident)
    async with founded_agent(tmp_path) as (agent, admin):
        opened = await call(agent, "ui.open", {"admin_key": write_key(tmp_path / "a.key", admin)})
        base, session = await login(opened["url"])
        async with api(base, session) as a:
            bad = await a.call("console.machine_add_preview", {"name": "m1", "key": "x"})
            assert set(bad["result"]["errors"]) == {"name", "key"}
            assert bad["result"]["tags_known"] == ["server"]
            form = {"name": "m4", "tags": ["server"], "key": key}
            pre = (await a.call("console.machine_add_preview", form))["result"]
            assert pre["errors"] == {} and "+ machines.m4" in pre["diff"]
            # a digest the preview did not show, a head that moved: refused, nothing signed
            err = (
                await a.call(
                    "console.machine_add", {**form, "leaves": pre["leaves"], "digest": "00"}
                )
            )["error"]
            assert "not the change the preview showed" in err["message"]
            err = (
                await a.call(
                    "console.machine_add", {**form, "leaves": ["00" * 32], "digest": pre["digest"]}
                )
            )["error"]
            assert "changed since" in err["message"]
            done = await a.call(
                "console.machine_add", {**form, "leaves": pre["leaves"], "digest": pre["digest"]}
            )
            assert done["ok"], done
            r = done["result"]
            assert r["command"] == f"clanagent join {r['token']}"
            assert parse_token(r["token"]).machine == "m4"
            assert r["qr"].startswith("data:image/svg+xml")
            shown = await call(agent, "inventory.show")
            assert shown["doc"]["machines"]["m4"]["tags"] == ["server"]
            # the old preview's head moved: signing it again is refused
            err = (
                await a.call(
                    "console.machine_add",
                    {**form, "leaves": pre["leaves"], "digest": pre["digest"]},
                )
            )["error"]
            assert "m4" in err["message"] or "changed since" in err["message"]

            # apply a new service to a tag: the preview says where it lands
            roles = {"web": {"machines": [], "tags": ["server"]}}
            sp = (
                await a.call(
                    "console.service_preview", {"service": "www", "type": "static", "roles": roles}
                )
            )["result"]
            assert sp["errors"] == {}
            assert sp["preview"]["roles"][0]["machines"] == ["m1", "m4"]
            nothing = await a.call(
                "console.service_preview",
                {"service": "www", "type": "static", "roles": {"web": {"tags": ["ghost"]}}},
            )
            assert "matches no machine" in nothing["result"]["errors"]["roles.web.tags"]
            ok = await a.call(
                "console.service_apply",
                {
                    "service": "www",
                    "type": "static",
                    "roles": roles,
                    "leaves": sp["leaves"],
                    "digest": sp["digest"],
                },
            )
            assert ok["ok"], ok

            # remove m4: consequences, then the change
            rp = (await a.call("console.machine_remove_preview", {"name": "m4"}))["result"]
            assert rp["errors"] == {} and "- machines.m4" in rp["diff"]
            texts = " | ".join(c["text"] for c in rp["consequences"])
            assert "refuses it" in texts and "WireGuard" in texts
            me = (await a.call("console.machine_remove_preview", {"name": "m1"}))["result"]
            assert "runs this console" in me["errors"]["name"]
            gone = await a.call(
                "console.machine_remove",
                {"name": "m4", "leaves": rp["leaves"], "digest": rp["digest"]},
            )
            assert gone["ok"], gone
        # clanctl's socket never offers them (they sign with a web session's key)
        from clanagent.control.client import ClientError

        for method in ("console.machine_add", "console.machine_remove", "console.service_apply"):
            with pytest.raises(ClientError) as exc:
                await call(agent, method, {})
            assert exc.value.code == "unknown_method"
        shown = await call(agent, "inventory.show")
        assert "m4" not in shown["doc"]["machines"]
        assert shown["doc"]["services"]["www"]["roles"]["web"]["tags"] == ["server"]
        history = await call(agent, "inventory.history")
        assert history[0]["message"] == "remove machine m4 (web console)"


HOSTILE = {
    "console.machine_add_preview": [
        {},
        {"name": 5, "tags": "x", "key": ["a"]},
        {"name": "x" * 10_000, "tags": [1, 2]},
        {"name": "ok", "tags": ["a"] * 1000, "key": "clanmachine1." + "A" * 10_000},
        {"name": "m1", "tags": [None], "key": {"k": 1}},
    ],
    "console.machine_remove_preview": [{}, {"name": 5}, {"name": ["m1"]}, {"name": "m1"}],
    "console.service_preview": [
        {},
        {"service": "vpn", "roles": []},
        {"service": "vpn", "roles": {"r": 5}},
        {"service": "vpn", "roles": {"r": {"tags": "x"}}},
        {"service": "vpn", "roles": {"BAD": {}}},
        {"service": "new", "type": 5, "roles": {"r": {}}},
        {"service": "new", "type": "t", "roles": {"r": {"machines": [None], "x": 1}}},
        {"service": "new", "type": "t\n" * 100, "roles": {"r": {"machines": ["m1"]}}},
        {"service": "x" * 70, "roles": {"r": {}}},
    ],
    "console.machine_add": [{}, {"name": "m9", "leaves": "zz", "digest": 5}],
    "console.service_apply": [{"service": "vpn", "roles": {}, "leaves": [5]}],
}


async def test_hostile_forms_get_answers_not_crashes(tmp_path):
    async with founded_agent(tmp_path) as (agent, admin):
        opened = await call(agent, "ui.open", {"admin_key": write_key(tmp_path / "a.key", admin)})
        base, session = await login(opened["url"])
        async with api(base, session) as a:
            for method, forms in HOSTILE.items():
                for form in forms:
                    reply = await a.call(method, form)
                    if reply["ok"]:
                        assert reply["result"]["errors"], (method, form)
                    else:
                        assert reply["error"]["code"] == "invalid_params", (method, form, reply)
        history = await call(agent, "inventory.history")
        assert len(history) == 1  # nothing was signed
