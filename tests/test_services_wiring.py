"""Service wiring: export values, export records, imports and the services view."""

from __future__ import annotations

import copy
import json

import nacl.signing
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clanagent.services.wiring import (
    EXPORT_KIND,
    MAX_VALUE_LEN,
    ExportRejected,
    ServicesLocalError,
    accept_export,
    check_value,
    collect_exports,
    export_body,
    export_key,
    export_report,
    export_values,
    imports_for,
    parse_export_body,
    reload_command,
    resolve_imports,
    services_view,
    split_export_key,
)
from clanagent.wire import SignedRecord, WireError, pack, unpack
from tests.test_inventory_parse import base, parse, wg

WG_PUB = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
ALPHA_KEY = bytes.fromhex("11" * 32)
BETA_KEY = bytes.fromhex("21" * 32)
GAMMA_KEY = bytes.fromhex("31" * 32)


def vpn_doc(**server_extra) -> dict:
    """alpha and gamma are vpn servers, beta (a laptop) is a client that imports them."""
    d = base()
    d["machines"]["gamma"] = {
        "node_key": "31" * 32,
        "box_key": "32" * 32,
        "wg_key": wg(3),
        "tags": ["server"],
    }
    d["services"]["vpn"] = {
        "type": "wireguard",
        "reload": "systemctl reload wg-vpn.service",
        "settings": {"mtu": 1380},
        "roles": {
            "server": {
                "tags": ["server"],
                "exports": ["address", "port", "public_key"],
                "settings": {"port": 51820, "public_key": "secret:wg/public"},
                **server_extra,
            },
            "client": {"tags": ["laptop"], "imports": ["vpn.server"]},
        },
        "secrets": {
            "wg": {
                "generator": "wireguard",
                "secret_files": ["private"],
                "public_files": ["public"],
            }
        },
    }
    r = parse(d)
    assert r.errors == [], r.errors
    return r.doc


def public_files(files: dict):
    return lambda secret, name: files.get((secret, name))


def alpha_values(doc, files=None) -> dict:
    return export_values(
        doc,
        "vpn",
        "server",
        "alpha",
        overlay="fd00::a",
        node_key_hex="11" * 32,
        public_file=public_files(files if files is not None else {("wg", "public"): WG_PUB + "\n"}),
    )


# ------------------------------------------------------------------ exports


def test_export_values_server():
    doc = vpn_doc()
    assert alpha_values(doc) == {"address": "fd00::a", "port": "51820", "public_key": WG_PUB}


def test_export_values_missing_are_reported_with_a_reason():
    doc = vpn_doc(exports=["address", "mtu", "public_key", "nothing"])
    values, missing = export_report(
        doc,
        "vpn",
        "server",
        "alpha",
        overlay="fd00::a",
        node_key_hex="11" * 32,
        public_file=public_files({}),
    )
    # mtu comes from the service settings; the secret is not generated yet.
    assert values == {"address": "fd00::a", "mtu": "1380"}
    assert set(missing) == {"public_key", "nothing"}
    assert "not generated yet" in missing["public_key"]
    assert "no setting" in missing["nothing"]


def test_export_values_builtins_and_stringified_settings():
    doc = vpn_doc(
        exports=["address", "public_key", "wg_key", "flag", "ratio", "names"],
        settings={"flag": True, "ratio": 0.5, "names": ["x", "y"]},
    )
    values = alpha_values(doc)
    assert values == {
        "address": "fd00::a",
        "public_key": "11" * 32,  # no setting: the node key
        "wg_key": wg(1),
        "flag": "true",
        "ratio": "0.5",
        "names": '["x","y"]',
    }


def test_export_values_bad_secret_refs_and_bad_values_are_missing():
    doc = vpn_doc(
        exports=["a", "b", "c", "d"],
        settings={
            "a": "secret:nope/public",
            "b": "secret:wg/private",  # a secret file is never exported
            "c": "secret:wg/public",
            "d": "line1\nline2",
        },
    )
    values, missing = export_report(
        doc,
        "vpn",
        "server",
        "alpha",
        overlay="fd00::a",
        node_key_hex="11" * 32,
        public_file=public_files({("wg", "public"): "two\nlines\n", ("wg", "private"): "SECRET"}),
    )
    assert values == {}
    assert "no secret 'nope'" in missing["a"]
    assert "not a public file" in missing["b"]
    assert "control character" in missing["c"]
    assert "control character" in missing["d"]


def test_export_values_public_file_as_bytes():
    doc = vpn_doc()
    assert alpha_values(doc, {("wg", "public"): WG_PUB.encode() + b"\n"})["public_key"] == WG_PUB
    assert "public_key" not in alpha_values(doc, {("wg", "public"): b"\xff\xfe"})


def test_export_values_unknown_role_is_a_local_error():
    doc = vpn_doc()
    with pytest.raises(ServicesLocalError):
        export_values(
            doc,
            "vpn",
            "nope",
            "alpha",
            overlay="fd00::a",
            node_key_hex="",
            public_file=public_files({}),
        )


class FakeSigner:
    def __init__(self, seed: bytes) -> None:
        self._k = nacl.signing.SigningKey(seed)
        self.public_key = bytes(self._k.verify_key)

    def sign(self, data: bytes) -> bytes:
        return self._k.sign(data).signature


def test_export_record_round_trip_through_a_signed_record():
    doc = vpn_doc()
    body = export_body("vpn", "server", "alpha", alpha_values(doc))
    rec = SignedRecord.create(
        FakeSigner(b"\x07" * 32), EXPORT_KIND, export_key("vpn", "server"), 1, body
    )
    back = SignedRecord.decode(rec.encode())
    parsed = parse_export_body(back.body)
    assert parsed.to_wire() == body
    assert parsed.key == "vpn.server" == back.key


def test_export_body_refuses_what_a_peer_would_reject():
    with pytest.raises(ServicesLocalError):
        export_body("vpn", "server", "alpha", {"address": "a\nb"})
    with pytest.raises(ServicesLocalError):
        export_body("vpn", "Server", "alpha", {})


def test_split_export_key():
    assert split_export_key("vpn.server") == ("vpn", "server")
    for bad in ("vpn", "vpn.", ".server", "vpn.server.x", "VPN.server", 7):
        with pytest.raises(WireError):
            split_export_key(bad)


# ------------------------------------------------------------------ export bodies from peers

GOOD = {
    "service": "vpn",
    "role": "server",
    "machine": "alpha",
    "values": {"address": "fd00::a", "port": "51820"},
}


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b.pop("values"),
        lambda b: b.update(extra=1),
        lambda b: b.update(service="Vpn"),
        lambda b: b.update(role=""),
        lambda b: b.update(machine=b"alpha"),
        lambda b: b.update(values=[]),
        lambda b: b["values"].update(port=51820),
        lambda b: b["values"].update(address="fd00::a\n"),
        lambda b: b["values"].update(address="x\x00"),
        lambda b: b["values"].update({"Bad": "x"}),
        lambda b: b["values"].update({"a.b": "x"}),
        lambda b: b["values"].update(long="x" * (MAX_VALUE_LEN + 1)),
        lambda b: b["values"].update({f"v{i}": "" for i in range(1025)}),
    ],
)
def test_malformed_export_bodies_are_rejected(mutate):
    body = copy.deepcopy(GOOD)
    mutate(body)
    with pytest.raises(WireError):
        parse_export_body(body)


def test_good_body_parses():
    e = parse_export_body(copy.deepcopy(GOOD))
    assert (e.service, e.role, e.machine) == ("vpn", "server", "alpha")
    assert e.values == GOOD["values"]
    assert parse_export_body(unpack(pack(GOOD))).to_wire() == GOOD


_wire_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
_wire = st.recursive(
    _wire_scalar,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(_wire)
def test_parse_export_body_only_raises_wire_error(value):
    try:
        parse_export_body(value)
    except WireError:
        pass


@given(
    st.sampled_from(["service", "role", "machine", "values"]),
    _wire,
)
def test_any_replaced_field_is_checked(name, value):
    body = copy.deepcopy(GOOD)
    body[name] = value
    try:
        e = parse_export_body(body)
    except WireError:
        return
    # Accepted: then it really is a valid body.
    assert e.to_wire() == body
    assert all(check_value(v) is None for v in e.values.values())


@given(
    st.dictionaries(
        st.from_regex(r"[a-z0-9][a-z0-9_-]{0,10}", fullmatch=True),
        st.text(max_size=30),
        max_size=6,
    )
)
def test_values_accepted_exactly_when_single_line(values):
    body = {**GOOD, "values": values}
    ok = all(check_value(v) is None for v in values.values())
    if ok:
        assert parse_export_body(body).values == values
    else:
        with pytest.raises(WireError):
            parse_export_body(body)


def test_accept_export_checks_signer_role_and_key():
    doc = vpn_doc()
    e = accept_export(doc, ALPHA_KEY, "vpn.server", GOOD)
    assert e.values == GOOD["values"]
    with pytest.raises(ExportRejected):  # beta signs alpha's export
        accept_export(doc, BETA_KEY, "vpn.server", GOOD)
    with pytest.raises(ExportRejected):  # beta is not a server
        accept_export(doc, BETA_KEY, "vpn.server", {**GOOD, "machine": "beta"})
    with pytest.raises(ExportRejected):
        accept_export(doc, ALPHA_KEY, "vpn.server", {**GOOD, "machine": "nobody"})
    with pytest.raises(WireError):  # key and body disagree
        accept_export(doc, ALPHA_KEY, "vpn.client", GOOD)
    # Values the role no longer declares are dropped, not fatal.
    e = accept_export(
        doc, ALPHA_KEY, "vpn.server", {**GOOD, "values": {"address": "x", "old": "y"}}
    )
    assert e.values == {"address": "x"}


def test_collect_exports_keeps_the_backed_ones():
    doc = vpn_doc()
    records = [
        (ALPHA_KEY, "vpn.server", GOOD),
        (BETA_KEY, "vpn.server", {**GOOD, "machine": "beta"}),
        (GAMMA_KEY, "vpn.server", "garbage"),
    ]
    exports, rejections = collect_exports(doc, records)
    assert exports == {("vpn", "server", "alpha"): GOOD["values"]}
    assert len(rejections) == 2


# ------------------------------------------------------------------ imports


def two_servers(doc) -> dict:
    return {
        ("vpn", "server", "alpha"): alpha_values(doc),
        ("vpn", "server", "gamma"): {"address": "fd00::c", "port": "51821"},
    }


def test_imports_for():
    doc = vpn_doc()
    assert imports_for(doc, "beta") == [
        ("backup", "client", "backup.server"),
        ("vpn", "client", "vpn.server"),
    ]
    assert imports_for(doc, "alpha") == []
    assert imports_for(doc, "nobody") == []


def test_resolve_imports_client_sees_both_servers():
    doc = vpn_doc()
    r = resolve_imports(doc, "beta", two_servers(doc))
    assert r.machine == "beta"
    assert sorted(r.services) == ["backup", "vpn"]
    vpn = r.services["vpn"]
    assert vpn.roles == {"client": ("vpn.server",)}
    provs = vpn.imports["vpn.server"]
    assert [p.machine for p in provs] == ["alpha", "gamma"]
    assert provs[0].values == {"address": "fd00::a", "port": "51820", "public_key": WG_PUB}
    assert provs[1].missing == ("public_key",)
    assert not any(p.is_self for p in provs)
    assert vpn.env == {
        "CLAN_VPN_SERVER_ADDRESS": "fd00::a",
        "CLAN_VPN_SERVER_PORT": "51820",
        "CLAN_VPN_SERVER_PUBLIC_KEY": WG_PUB,
        "CLAN_VPN_SERVER_ADDRESS_0": "fd00::a",
        "CLAN_VPN_SERVER_PORT_0": "51820",
        "CLAN_VPN_SERVER_PUBLIC_KEY_0": WG_PUB,
        "CLAN_VPN_SERVER_ADDRESS_1": "fd00::c",
        "CLAN_VPN_SERVER_PORT_1": "51821",
        "CLAN_VPN_SERVER_COUNT": "2",
        "CLAN_VPN_SERVER_MACHINES": "alpha gamma",
    }
    assert vpn.conflicts == ()
    # backup.server (alpha) has not published: listed, but not in the env.
    backup = r.services["backup"].imports["backup.server"]
    assert [(p.machine, p.published) for p in backup] == [("alpha", False)]
    assert backup[0].missing == ("address", "public_key")
    assert r.services["backup"].env["CLAN_BACKUP_SERVER_COUNT"] == "0"
    assert "CLAN_BACKUP_SERVER_ADDRESS" not in r.services["backup"].env


def test_first_provider_is_the_lowest_published():
    doc = vpn_doc()
    exports = {("vpn", "server", "gamma"): {"address": "fd00::c"}}
    env = resolve_imports(doc, "beta", exports).services["vpn"].env
    assert env["CLAN_VPN_SERVER_ADDRESS"] == "fd00::c"
    assert env["CLAN_VPN_SERVER_MACHINES"] == "gamma"


def test_resolve_imports_is_deterministic():
    doc = vpn_doc()
    exports = two_servers(doc)
    a = resolve_imports(doc, "beta", exports)
    b = resolve_imports(doc, "beta", dict(reversed(list(exports.items()))))
    assert a == b
    assert pack(a.services["vpn"].to_json()) == pack(b.services["vpn"].to_json())


def test_a_role_importing_itself_marks_self():
    d = base()
    d["services"]["mesh"] = {
        "type": "x",
        "roles": {
            "peer": {"tags": ["server", "laptop"], "exports": ["address"], "imports": ["mesh.peer"]}
        },
    }
    doc = parse(d).doc
    exports = {
        ("mesh", "peer", "alpha"): {"address": "a"},
        ("mesh", "peer", "beta"): {"address": "b"},
    }
    provs = resolve_imports(doc, "beta", exports).services["mesh"].imports["mesh.peer"]
    assert [(p.machine, p.is_self) for p in provs] == [("alpha", False), ("beta", True)]


def test_env_name_collisions_are_left_out():
    d = base()
    d["services"]["a-b"] = {"type": "x", "roles": {"c": {"machines": ["alpha"], "exports": ["v"]}}}
    d["services"]["a"] = {
        "type": "x",
        "roles": {"b-c": {"machines": ["alpha"], "exports": ["v", "count"]}},
    }
    d["services"]["use"] = {
        "type": "x",
        "roles": {"u": {"machines": ["beta"], "imports": ["a-b.c", "a.b-c"]}},
    }
    doc = parse(d).doc
    exports = {
        ("a-b", "c", "alpha"): {"v": "1"},
        ("a", "b-c", "alpha"): {"v": "2", "count": "9"},
    }
    si = resolve_imports(doc, "beta", exports).services["use"]
    assert "CLAN_A_B_C_V" in si.conflicts and "CLAN_A_B_C_V" not in si.env
    assert "CLAN_A_B_C_COUNT" in si.conflicts and "CLAN_A_B_C_COUNT" not in si.env
    # Nothing is lost in the JSON.
    js = si.to_json()
    assert js["imports"]["a-b.c"][0]["values"] == {"v": "1"}
    assert js["imports"]["a.b-c"][0]["values"] == {"count": "9", "v": "2"}
    assert js["env_conflicts"] == list(si.conflicts)


def test_reload_command():
    doc = vpn_doc()
    assert reload_command(doc, "vpn") == "systemctl reload wg-vpn.service"
    assert reload_command(doc, "backup") == ""
    assert reload_command(doc, "nope") == ""


# ------------------------------------------------------------------ clanctl services


def test_services_view():
    doc = vpn_doc()
    view = services_view(doc, two_servers(doc))
    assert [s["service"] for s in view] == ["backup", "vpn"]
    vpn = view[1]
    assert vpn["type"] == "wireguard"
    assert vpn["reload"] == "systemctl reload wg-vpn.service"
    roles = {r["role"]: r for r in vpn["roles"]}
    assert list(roles) == ["client", "server"]
    server, client = roles["server"], roles["client"]
    assert server["machines"] == ["alpha", "gamma"]
    assert server["exports"] == ["address", "port", "public_key"]
    assert server["imported_by"] == ["vpn.client"]
    assert server["published"] == [
        {
            "machine": "alpha",
            "published": True,
            "values": {"address": "fd00::a", "port": "51820", "public_key": WG_PUB},
            "missing": [],
        },
        {
            "machine": "gamma",
            "published": True,
            "values": {"address": "fd00::c", "port": "51821"},
            "missing": ["public_key"],
        },
    ]
    assert client["machines"] == ["beta"]
    assert client["imports"] == ["vpn.server"]
    assert client["imported_by"] == []
    assert client["published"] == [
        {"machine": "beta", "published": False, "values": {}, "missing": []}
    ]
    backup_server = view[0]["roles"][1]
    assert backup_server["role"] == "server"
    assert backup_server["published"][0]["published"] is False
    assert backup_server["published"][0]["missing"] == ["address", "public_key"]
    # Plain JSON types all the way down.
    assert json.loads(json.dumps(view)) == view
