"""Inventory TOML parsing, canonical validation and the TOML writer."""

from __future__ import annotations

import base64
import copy
import json
import pathlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clanagent.inventory.parse import (
    InventoryInvalid,
    InventoryIssue,
    check_host_port,
    doc_to_toml,
    load_inventory_toml,
    validate_doc,
)
from clanagent.wire import pack, unpack

FILE = "inv.toml"
ADMIN = "aa" * 32
CLAN_ID = "00112233445566778899aabbccddeeff"


def wg(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


def base() -> dict:
    """A valid inventory in its human form: no errors, no warnings."""
    return {
        "clan": {"id": CLAN_ID, "name": "home", "admins": [ADMIN], "threshold": 1},
        "machines": {
            "alpha": {
                "node_key": "11" * 32,
                "box_key": "12" * 32,
                "wg_key": wg(1),
                "tags": ["server"],
                "endpoints": ["198.51.100.7:7946"],
            },
            "beta": {
                "node_key": "21" * 32,
                "box_key": "22" * 32,
                "wg_key": wg(2),
                "tags": ["laptop"],
            },
        },
        "networks": {"default": ["lan", "public", "tor"], "by_tag": {"laptop": ["lan", "tor"]}},
        "services": {
            "backup": {
                "type": "borgbackup",
                "roles": {
                    "server": {"machines": ["alpha"], "exports": ["address", "public_key"]},
                    "client": {"tags": ["laptop"], "imports": ["backup.server"]},
                },
                "secrets": {
                    "repokey": {"generator": "password", "scope": "role:server"},
                    "sshkey": {"generator": "ed25519", "depends": ["repokey"]},
                },
            }
        },
        "vms": {"web": {"tags": ["server"], "kernel": "/k"}},
    }


def _val(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, list):
        return "[" + ", ".join(_val(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_val(x)}" for k, x in v.items()) + "}"


def to_toml(d: dict) -> str:
    """A test-only writer (inline tables), independent of doc_to_toml."""
    return "\n".join(f"{json.dumps(k)} = {_val(v)}" for k, v in d.items()) + "\n"


DEL = object()


def edit(*pairs):
    """A mutation: set dotted paths to values (DEL removes)."""

    def apply(d):
        for path, value in zip(pairs[::2], pairs[1::2], strict=True):
            *head, last = path.split(".")
            cur = d
            for h in head:
                cur = cur.setdefault(h, {})
            if value is DEL:
                del cur[last]
            else:
                cur[last] = value
        return d

    return apply


def parse(d: dict):
    return load_inventory_toml(to_toml(d), filename=FILE)


def test_base_is_valid():
    r = parse(base())
    assert r.errors == [] and r.warnings == [] and r.ok
    assert validate_doc(r.doc) == []


SPEC_EXAMPLE = """
[clan]
id = "00112233445566778899aabbccddeeff"
name = "home"
admins = ["ADMIN"]
threshold = 1

[machines.alpha]
node_key = "NODE"
box_key = "BOX"
wg_key = "WG"
tags = ["server"]
endpoints = ["198.51.100.7:7946"]

[networks]
default = ["lan", "public", "tor"]
[networks.by_tag]
laptop = ["lan", "tor"]

[services.backup]
type = "borgbackup"
[services.backup.roles.server]
machines = ["alpha"]
exports = ["address", "public_key"]
[services.backup.roles.client]
tags = ["laptop"]
imports = ["backup.server"]
[services.backup.secrets.repokey]
generator = "password"
length = 32
scope = "role:server"
rotate_days = 90
secret_files = ["passphrase"]

[vms.web]
tags = ["server"]
vcpus = 1
memory_mb = 256
kernel = "/var/lib/clanagent/images/vmlinux"
"""


def spec_example() -> str:
    return (
        SPEC_EXAMPLE.replace("ADMIN", "ab" * 32)
        .replace("NODE", "01" * 32)
        .replace("BOX", "02" * 32)
        .replace('"WG"', json.dumps(wg(3)))
    )


def test_spec_example_parses_with_defaults_filled():
    r = load_inventory_toml(spec_example(), filename="example.toml")
    assert r.errors == []
    # laptop is used by no machine in the example: a warning, not an error
    assert [str(w) for w in r.warnings] == [
        "example.toml: networks.by_tag.laptop: tag 'laptop' matches no machine",
        "example.toml: services.backup.roles.client.tags: tag 'laptop' matches no machine",
    ]
    doc = r.doc
    assert doc["format"] == 1
    assert doc["clan"] == {
        "id": bytes.fromhex(CLAN_ID),
        "name": "home",
        "admins": [b"\xab" * 32],
        "threshold": 1,
    }
    assert doc["machines"]["alpha"] == {
        "node_key": b"\x01" * 32,
        "box_key": b"\x02" * 32,
        "wg_key": b"\x03" * 32,
        "tags": ["server"],
        "endpoints": ["198.51.100.7:7946"],
        "sealed_endpoints": b"",
        "public": True,
    }
    backup = doc["services"]["backup"]
    assert backup["settings"] == {} and backup["reload"] == ""
    assert backup["roles"]["client"] == {
        "machines": [],
        "tags": ["laptop"],
        "settings": {},
        "exports": [],
        "imports": ["backup.server"],
    }
    assert backup["secrets"]["repokey"] == {
        "generator": "password",
        "length": 32,
        "command": "",
        "depends": [],
        "scope": "role:server",
        "rotate_days": 90,
        "secret_files": ["passphrase"],
        "public_files": [],
    }
    assert doc["vms"]["web"] == {
        "machines": [],
        "tags": ["server"],
        "count": 1,
        "vcpus": 1,
        "memory_mb": 256,
        "kernel": "/var/lib/clanagent/images/vmlinux",
        "initrd": "",
        "rootfs": "",
        "disk_mb": 0,
        "networks": [],
        "secrets": [],
        "backend": "auto",
        "graphics": False,
    }
    assert validate_doc(doc) == []
    assert load_inventory_toml(doc_to_toml(doc)).doc == doc


def test_defaults_and_sorting():
    d = base()
    d["clan"]["admins"] = ["ff" * 32, "01" * 32]
    del d["clan"]["threshold"]
    d["machines"]["alpha"]["tags"] = ["server", "db", "no-public"]
    del d["networks"]
    r = parse(d)
    assert r.errors == []
    assert r.doc["clan"]["admins"] == [b"\x01" * 32, b"\xff" * 32]
    assert r.doc["clan"]["threshold"] == 1
    alpha = r.doc["machines"]["alpha"]
    assert alpha["tags"] == ["db", "no-public", "server"]
    assert alpha["public"] is False  # the no-public tag implies it
    assert r.doc["networks"] == {"default": ["lan", "public", "tor"], "by_tag": {}}
    # a generator without a length gets 0, password/random-bytes get 32
    secrets = r.doc["services"]["backup"]["secrets"]
    assert secrets["sshkey"]["length"] == 0 and secrets["repokey"]["length"] == 32
    # an explicit public = false without the tag is kept
    d2 = edit("machines.beta.public", False)(base())
    assert parse(d2).doc["machines"]["beta"]["public"] is False


def test_minimal_inventory():
    r = load_inventory_toml(
        f'[clan]\nid = "{CLAN_ID}"\nname = "c"\nadmins = ["{ADMIN}"]\n', filename=FILE
    )
    assert r.errors == []
    assert r.doc["machines"] == {} and r.doc["services"] == {} and r.doc["vms"] == {}


# (mutation, path, message fragment): every error rule of the spec.
ERRORS = [
    # unknown keys, named, with the known ones listed
    (
        edit("bogus", 1),
        "bogus",
        "unknown key 'bogus' (known keys: format, clan, machines, networks, services, vms)",
    ),
    (
        edit("machines.alpha.colour", "red"),
        "machines.alpha.colour",
        "unknown key 'colour' (known keys: node_key, box_key, wg_key",
    ),
    (
        edit("services.backup.roles.server.port", 1),
        "services.backup.roles.server.port",
        "unknown key 'port'",
    ),
    (
        edit("services.backup.secrets.repokey.size", 1),
        "services.backup.secrets.repokey.size",
        "unknown key 'size'",
    ),
    (edit("vms.web.cpu", 1), "vms.web.cpu", "unknown key 'cpu' (known keys: machines, tags, count"),
    (edit("clan.owner", "me"), "clan.owner", "unknown key 'owner'"),
    (
        edit("networks.fast", []),
        "networks.fast",
        "unknown key 'fast' (known keys: default, by_tag)",
    ),
    # missing required keys
    (edit("clan", DEL), "clan", "missing required key"),
    (edit("clan.id", DEL), "clan.id", "missing required key"),
    (edit("clan.admins", DEL), "clan.admins", "missing required key"),
    (edit("machines.alpha.node_key", DEL), "machines.alpha.node_key", "missing required key"),
    (edit("machines.alpha.wg_key", DEL), "machines.alpha.wg_key", "missing required key"),
    (edit("services.backup.type", DEL), "services.backup.type", "missing required key"),
    (
        edit("services.backup.secrets.repokey.generator", DEL),
        "services.backup.secrets.repokey.generator",
        "missing required key",
    ),
    (edit("vms.web.kernel", DEL), "vms.web.kernel", "missing required key"),
    # format
    (edit("format", 2), "format", "unsupported format 2 (this agent reads format 1)"),
    # type errors
    (edit("machines", []), "machines", "expected a table, got array"),
    (edit("machines.alpha", "x"), "machines.alpha", "expected a table, got string"),
    (edit("clan.id", 5), "clan.id", "expected a string of 32 hex digits, got integer"),
    (edit("clan.threshold", "1"), "clan.threshold", "expected an integer, got string"),
    (edit("clan.threshold", True), "clan.threshold", "expected an integer, got boolean"),
    (edit("machines.alpha.tags", "server"), "machines.alpha.tags", "expected an array, got string"),
    (edit("machines.alpha.tags", [1]), "machines.alpha.tags[0]", "expected a string, got integer"),
    (edit("vms.web.graphics", "yes"), "vms.web.graphics", "expected a boolean, got string"),
    (edit("vms.web.count", 1.5), "vms.web.count", "expected an integer, got float"),
    (edit("machines.alpha.public", 1), "machines.alpha.public", "expected a boolean, got integer"),
    (
        edit("services.backup.settings", [1]),
        "services.backup.settings",
        "expected a table, got array",
    ),
    # malformed keys
    (edit("clan.id", "0011"), "clan.id", "clan id must be 32 hex digits (got 4 characters)"),
    (
        edit("clan.admins", ["ab"]),
        "clan.admins[0]",
        "admin key must be 64 hex digits (got 2 characters)",
    ),
    (
        edit("machines.alpha.node_key", "zz" * 32),
        "machines.alpha.node_key",
        "node key must be 64 hex digits",
    ),
    (
        edit("machines.alpha.node_key", " 1" * 32),
        "machines.alpha.node_key",
        "node key must be 64 hex digits",
    ),
    (
        edit("machines.alpha.box_key", "12" * 31),
        "machines.alpha.box_key",
        "box key must be 64 hex digits (got 62 characters)",
    ),
    (
        edit("machines.alpha.wg_key", "abc"),
        "machines.alpha.wg_key",
        "WireGuard key must be 44 characters of base64",
    ),
    (
        edit("machines.alpha.wg_key", base64.b64encode(b"x" * 31).decode()),
        "machines.alpha.wg_key",
        "WireGuard key must be 44",
    ),
    (
        edit("machines.alpha.wg_key", "A" * 43 + "B"),
        "machines.alpha.wg_key",
        "WireGuard key must be 44",
    ),
    (
        edit("machines.alpha.sealed_endpoints", "!!!"),
        "machines.alpha.sealed_endpoints",
        "not valid base64",
    ),
    # names
    (
        edit("clan.name", "Home"),
        "clan.name",
        "'Home' is not a valid name (must match [a-z0-9][a-z0-9-]{0,62})",
    ),
    (
        edit("machines.Alpha", base()["machines"]["alpha"], "machines.alpha", DEL),
        "machines.Alpha",
        "'Alpha' is not a valid machine name",
    ),
    (edit("machines.-x", {}), "machines.-x", "'-x' is not a valid machine name"),
    (edit("machines." + "a" * 64, {}), "machines." + "a" * 64, "is not a valid machine name"),
    (
        edit("services.Backup", {"type": "x"}),
        "services.Backup",
        "'Backup' is not a valid service name",
    ),
    (
        edit("services.backup.roles.a_b", {}),
        "services.backup.roles.a_b",
        "'a_b' is not a valid role name",
    ),
    (
        edit("services.backup.secrets.Key", {"generator": "ed25519"}),
        "services.backup.secrets.Key",
        "not a valid secret name",
    ),
    (edit("vms.web_1", {"kernel": "/k"}), "vms.web_1", "'web_1' is not a valid vm name"),
    (
        edit("machines.alpha.tags", ["Server"]),
        "machines.alpha.tags[0]",
        "'Server' is not a valid name",
    ),
    (edit("networks.by_tag.Lap", ["lan"]), "networks.by_tag.Lap", "'Lap' is not a valid tag name"),
    (
        edit("services.backup.roles.server.exports", ["Address"]),
        "services.backup.roles.server.exports[0]",
        "'Address' is not a valid export name",
    ),
    # duplicates
    (
        edit("machines.alpha.tags", ["server", "server"]),
        "machines.alpha.tags[1]",
        "duplicate 'server'",
    ),
    (edit("clan.admins", [ADMIN, ADMIN]), "clan.admins[1]", "duplicate aaaaaaaaaaaaaaaa"),
    (
        edit("machines.alpha.endpoints", ["a.example:1", "a.example:1"]),
        "machines.alpha.endpoints[1]",
        "duplicate 'a.example:1'",
    ),
    (edit("networks.default", ["lan", "lan"]), "networks.default[1]", "duplicate 'lan'"),
    (
        edit("services.backup.roles.server.machines", ["alpha", "alpha"]),
        "services.backup.roles.server.machines[1]",
        "duplicate 'alpha'",
    ),
    (
        edit("machines.beta.node_key", "11" * 32),
        "machines.beta.node_key",
        "same node key as machine 'alpha'",
    ),
    (
        edit("machines.beta.box_key", "12" * 32),
        "machines.beta.box_key",
        "same box key as machine 'alpha'",
    ),
    (
        edit("machines.beta.wg_key", wg(1)),
        "machines.beta.wg_key",
        "same WireGuard key as machine 'alpha'",
    ),
    # addresses
    (
        edit("machines.alpha.endpoints", ["198.51.100.7"]),
        "machines.alpha.endpoints[0]",
        "'198.51.100.7' is not a valid host:port: missing :port",
    ),
    (
        edit("machines.alpha.endpoints", ["198.51.100.7:0"]),
        "machines.alpha.endpoints[0]",
        "port 0 is out of range 1..65535",
    ),
    (
        edit("machines.alpha.endpoints", ["198.51.100.7:65536"]),
        "machines.alpha.endpoints[0]",
        "port 65536 is out of range 1..65535",
    ),
    (
        edit("machines.alpha.endpoints", ["198.51.100.7:http"]),
        "machines.alpha.endpoints[0]",
        "port 'http' is not a number",
    ),
    (
        edit("machines.alpha.endpoints", ["300.1.1.1:80"]),
        "machines.alpha.endpoints[0]",
        "'300.1.1.1' is not an IPv4 address",
    ),
    (
        edit("machines.alpha.endpoints", ["2001:db8::1:80"]),
        "machines.alpha.endpoints[0]",
        "an IPv6 address must be written [address]:port",
    ),
    (
        edit("machines.alpha.endpoints", ["[2001:db8::zz]:80"]),
        "machines.alpha.endpoints[0]",
        "'2001:db8::zz' is not an IPv6 address",
    ),
    (
        edit("machines.alpha.endpoints", ["[2001:db8::1]"]),
        "machines.alpha.endpoints[0]",
        "an IPv6 address must be written [address]:port",
    ),
    (
        edit("machines.alpha.endpoints", ["bad_host.example:80"]),
        "machines.alpha.endpoints[0]",
        "'bad_host.example' is not a valid DNS name",
    ),
    (
        edit("machines.alpha.endpoints", ["-a.example:80"]),
        "machines.alpha.endpoints[0]",
        "is not a valid DNS name",
    ),
    (edit("machines.alpha.endpoints", [":80"]), "machines.alpha.endpoints[0]", "missing host"),
    # enums
    (
        edit("networks.default", ["wifi"]),
        "networks.default[0]",
        "unknown network kind 'wifi' (known: lan, public, tor)",
    ),
    (
        edit("networks.by_tag.laptop", ["lan", "carrier-pigeon"]),
        "networks.by_tag.laptop[1]",
        "unknown network kind 'carrier-pigeon'",
    ),
    (
        edit("services.backup.secrets.repokey.generator", "rsa"),
        "services.backup.secrets.repokey.generator",
        "unknown generator 'rsa' (known: random-bytes, password, ed25519, x25519, wireguard, command)",
    ),
    (
        edit("services.backup.secrets.repokey.scope", "global"),
        "services.backup.secrets.repokey.scope",
        "unknown scope 'global' (known: machine, role:ROLE)",
    ),
    (
        edit("vms.web.backend", "vmware"),
        "vms.web.backend",
        "unknown backend 'vmware' (known: auto, qemu, cloud-hypervisor, firecracker)",
    ),
    # ranges and value rules
    (edit("networks.default", []), "networks.default", "must not be empty"),
    (edit("clan.admins", []), "clan.admins", "must not be empty"),
    (edit("clan.threshold", 0), "clan.threshold", "0 is out of range 1..1024"),
    (edit("clan.threshold", 2), "clan.threshold", "threshold 2 is more than the 1 admin(s)"),
    (edit("vms.web.count", 0), "vms.web.count", "0 is out of range 1..1024"),
    (edit("vms.web.vcpus", 0), "vms.web.vcpus", "0 is out of range 1..256"),
    (edit("vms.web.memory_mb", 8), "vms.web.memory_mb", "8 is out of range 16..4194304"),
    (edit("vms.web.disk_mb", -1), "vms.web.disk_mb", "-1 is out of range 0..16777216"),
    (edit("vms.web.kernel", ""), "vms.web.kernel", "must not be empty"),
    (edit("services.backup.type", ""), "services.backup.type", "must not be empty"),
    (
        edit("services.backup.secrets.repokey.rotate_days", -1),
        "services.backup.secrets.repokey.rotate_days",
        "-1 is out of range 0..36500",
    ),
    (
        edit("services.backup.secrets.repokey.length", 0),
        "services.backup.secrets.repokey.length",
        "password needs a length of at least 1",
    ),
    (
        edit("services.backup.secrets.repokey.length", 70000),
        "services.backup.secrets.repokey.length",
        "70000 is out of range 0..65536",
    ),
    (
        edit("services.backup.secrets.sshkey.length", 32),
        "services.backup.secrets.sshkey.length",
        "only random-bytes and password take a length, not ed25519",
    ),
    (
        edit("services.backup.secrets.sshkey.generator", "command"),
        "services.backup.secrets.sshkey.command",
        "the command generator needs a command",
    ),
    (
        edit("services.backup.secrets.sshkey.command", "ssh-keygen"),
        "services.backup.secrets.sshkey.command",
        "only the command generator takes a command, not ed25519",
    ),
    (
        edit("services.backup.secrets.sshkey.secret_files", ["../etc/shadow"]),
        "services.backup.secrets.sshkey.secret_files[0]",
        "'../etc/shadow' is not a valid file name",
    ),
    (
        edit("services.backup.secrets.sshkey.public_files", ["a/b"]),
        "services.backup.secrets.sshkey.public_files[0]",
        "not a valid file name",
    ),
    (
        edit(
            "services.backup.secrets.sshkey.secret_files",
            ["key"],
            "services.backup.secrets.sshkey.public_files",
            ["key"],
        ),
        "services.backup.secrets.sshkey.public_files",
        "'key' is also a secret file",
    ),
    (
        edit("machines.alpha.tags", ["no-public"], "machines.alpha.public", True),
        "machines.alpha.public",
        "must be false for a machine tagged 'no-public'",
    ),
    # dangling references
    (
        edit("services.backup.roles.server.machines", ["alpha", "gamma"]),
        "services.backup.roles.server.machines[1]",
        "unknown machine 'gamma'",
    ),
    (edit("vms.web.machines", ["gamma"]), "vms.web.machines[0]", "unknown machine 'gamma'"),
    (
        edit("services.backup.roles.client.imports", ["backup.nope"]),
        "services.backup.roles.client.imports[0]",
        "no service role 'backup.nope'",
    ),
    (
        edit("services.backup.roles.client.imports", ["dns.server"]),
        "services.backup.roles.client.imports[0]",
        "no service role 'dns.server'",
    ),
    (
        edit("services.backup.roles.client.imports", ["backup"]),
        "services.backup.roles.client.imports[0]",
        "'backup' is not a valid import (service.role)",
    ),
    (edit("vms.web.secrets", ["backup/nope"]), "vms.web.secrets[0]", "no secret 'backup/nope'"),
    (
        edit("vms.web.secrets", ["backup.repokey"]),
        "vms.web.secrets[0]",
        "is not a valid secret (service/secret)",
    ),
    (
        edit("services.backup.secrets.sshkey.depends", ["nope"]),
        "services.backup.secrets.sshkey.depends[0]",
        "unknown secret 'nope' of service 'backup'",
    ),
    (
        edit("services.backup.secrets.sshkey.depends", ["sshkey"]),
        "services.backup.secrets.sshkey.depends[0]",
        "a secret cannot depend on itself",
    ),
    (
        edit("services.backup.secrets.repokey.depends", ["sshkey"]),
        "services.backup.secrets.repokey.depends",
        "dependency cycle: repokey -> sshkey -> repokey",
    ),
    (
        edit("services.backup.secrets.repokey.scope", "role:nope"),
        "services.backup.secrets.repokey.scope",
        "service 'backup' has no role 'nope'",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "path", "message"), ERRORS, ids=[e[1] + ":" + e[2][:30] for e in ERRORS]
)
def test_error(mutate, path, message):
    r = parse(mutate(base()))
    assert r.doc is None and not r.ok
    hits = [e for e in r.errors if e.path == path and message in e.message]
    assert hits, f"no error {path}: {message} in {[str(e) for e in r.errors]}"
    assert all(e.file == FILE for e in r.errors)
    assert str(hits[0]) == f"{FILE}: {path}: {hits[0].message}"


WARNINGS = [
    (
        edit("services.backup.roles.client.tags", ["tablet"]),
        "services.backup.roles.client.tags",
        "tag 'tablet' matches no machine",
    ),
    (edit("vms.web.tags", ["gpu"]), "vms.web.tags", "tag 'gpu' matches no machine"),
    (
        edit("networks.by_tag.phone", ["tor"]),
        "networks.by_tag.phone",
        "tag 'phone' matches no machine",
    ),
    (edit("vms.web.tags", []), "vms.web", "names no machines and no tags, so it runs nowhere"),
]


@pytest.mark.parametrize(("mutate", "path", "message"), WARNINGS)
def test_warning(mutate, path, message):
    r = parse(mutate(base()))
    assert r.errors == [] and r.doc is not None
    assert [(w.file, w.path, w.message) for w in r.warnings] == [(FILE, path, message)]


@pytest.mark.parametrize(
    "endpoint",
    [
        "198.51.100.7:7946",
        "[2001:db8::1]:7946",
        "[::1]:1",
        "example.org:65535",
        "host:80",
        "abcdefghijklmnopqrstuvwxyz234567abcdefghijklmnopqrstuvwx.onion:9",
    ],
)
def test_valid_endpoints(endpoint):
    assert check_host_port(endpoint) is None
    r = parse(edit("machines.alpha.endpoints", [endpoint])(base()))
    assert r.errors == [] and r.doc["machines"]["alpha"]["endpoints"] == [endpoint]


def test_endpoints_keep_their_order():
    eps = ["z.example:1", "a.example:2"]
    assert (
        parse(edit("machines.alpha.endpoints", eps)(base())).doc["machines"]["alpha"]["endpoints"]
        == eps
    )


def test_toml_syntax_error():
    r = load_inventory_toml("[clan\n", filename=FILE)
    assert r.doc is None and len(r.errors) == 1
    e = r.errors[0]
    assert (e.file, e.path) == (FILE, "") and e.message.startswith("TOML syntax error")
    assert str(e).startswith(f"{FILE}: TOML syntax error")


def test_duplicate_table_is_a_syntax_error():
    text = to_toml(base()) + '[machines.alpha]\nnode_key = "x"\n'
    r = load_inventory_toml(text, filename=FILE)
    assert r.doc is None and "TOML syntax error" in r.errors[0].message


def test_reading_a_file(tmp_path: pathlib.Path):
    p = tmp_path / "inventory.toml"
    p.write_text(to_toml(base()))
    r = load_inventory_toml(p)
    assert r.ok and r.doc["clan"]["name"] == "home"
    r = load_inventory_toml(tmp_path / "missing.toml")
    assert r.doc is None
    assert r.errors[0].file == str(tmp_path / "missing.toml")
    assert r.errors[0].message.startswith("cannot read")
    p.write_bytes(b"\xff\xfe")
    r = load_inventory_toml(p, filename="x.toml")
    assert [str(e) for e in r.errors] == ["x.toml: not UTF-8 text (byte 0)"]


def test_settings_values():
    d = base()
    d["services"]["backup"]["settings"] = {"a": 1, "b": [1, "x", {"c": 2.5}], "d": {"e f": True}}
    r = parse(d)
    assert r.errors == []
    assert r.doc["services"]["backup"]["settings"] == d["services"]["backup"]["settings"]
    # a datetime is TOML but not a wire value
    text = to_toml(base()).replace('"borgbackup"', '"borgbackup", "settings" = {when = 1979-05-27}')
    r = load_inventory_toml(text, filename=FILE)
    assert [(e.path, e.message) for e in r.errors] == [
        (
            "services.backup.settings.when",
            "a datetime cannot be a setting (use string, integer, float, boolean, array or table)",
        )
    ]
    nan = to_toml(base()).replace('"borgbackup"', '"borgbackup", "settings" = {x = nan}')
    r = load_inventory_toml(nan, filename=FILE)
    assert [(e.path, e.message) for e in r.errors] == [
        ("services.backup.settings.x", "NaN is not allowed")
    ]


def test_issue_str():
    assert str(InventoryIssue("f.toml", "a.b", "bad")) == "f.toml: a.b: bad"
    assert str(InventoryIssue("f.toml", "", "bad")) == "f.toml: bad"


def test_many_errors_reported_at_once():
    d = edit("clan.id", "xx", "vms.web.count", 0, "machines.alpha.tags", ["X"])(base())
    paths = {e.path for e in parse(d).errors}
    assert {"clan.id", "vms.web.count", "machines.alpha.tags[0]"} <= paths


# --------------------------------------------------------- canonical docs


def good_doc() -> dict:
    r = parse(base())
    assert r.ok
    return r.doc


def test_round_trip_base():
    doc = good_doc()
    doc["machines"]["alpha"]["sealed_endpoints"] = b"\x00\x01sealed"
    doc["machines"]["beta"]["public"] = False
    doc["services"]["backup"]["settings"] = {
        'q"uote': "line\nbreak\t\\ \x7f \x01 é 😀",
        "f": -0.0,
        "i": 2**63 - 1,
        "inf": float("inf"),
    }
    doc["services"]["backup"]["secrets"]["cmd"] = {
        "generator": "command",
        "length": 0,
        "command": 'sh -c "echo hi"',
        "depends": [],
        "scope": "machine",
        "rotate_days": 0,
        "secret_files": ["x"],
        "public_files": [],
    }
    assert validate_doc(doc) == []
    text = doc_to_toml(doc)
    r = load_inventory_toml(text, filename="rt.toml")
    assert r.errors == [], text
    assert r.doc == doc
    assert pack(r.doc) == pack(doc)


def test_doc_to_toml_refuses_invalid_doc():
    doc = good_doc()
    doc["clan"]["threshold"] = 0
    with pytest.raises(InventoryInvalid) as info:
        doc_to_toml(doc)
    assert info.value.issues[0].path == "clan.threshold"


def _set(doc, path, value):
    d = copy.deepcopy(doc)
    *head, last = path.split(".")
    cur = d
    for h in head:
        cur = cur[h]
    if value is DEL:
        del cur[last]
    else:
        cur[last] = value
    return d


BAD_DOCS = [
    ("format", DEL, "format", "missing required key"),
    ("machines.alpha.public", DEL, "machines.alpha.public", "missing required key"),
    (
        "machines.alpha.sealed_endpoints",
        DEL,
        "machines.alpha.sealed_endpoints",
        "missing required key",
    ),
    (
        "services.backup.secrets.repokey.length",
        DEL,
        "services.backup.secrets.repokey.length",
        "missing required key",
    ),
    ("networks", DEL, "networks", "missing required key"),
    ("vms.web.backend", DEL, "vms.web.backend", "missing required key"),
    ("machines.alpha.extra", 1, "machines.alpha.extra", "unknown key 'extra'"),
    ("clan.id", "00112233445566778899aabbccddeeff", "clan.id", "expected 16 bytes, got string"),
    ("clan.id", b"\x00" * 15, "clan.id", "expected 16 bytes, got 15"),
    ("clan.admins", [b"\x01" * 31], "clan.admins[0]", "expected 32 bytes, got 31"),
    ("clan.admins", [b"\x02" * 32, b"\x01" * 32], "clan.admins", "not sorted"),
    (
        "machines.alpha.node_key",
        b"\x01" * 33,
        "machines.alpha.node_key",
        "expected 32 bytes, got 33",
    ),
    ("machines.alpha.wg_key", "x", "machines.alpha.wg_key", "expected 32 bytes, got string"),
    ("machines.alpha.tags", ["z", "a"], "machines.alpha.tags", "not sorted"),
    (
        "machines.alpha.sealed_endpoints",
        "",
        "machines.alpha.sealed_endpoints",
        "expected bytes, got string",
    ),
    ("machines.alpha.public", 1, "machines.alpha.public", "expected a boolean, got integer"),
    ("machines.alpha.tags", ["no-public"], "machines.alpha.public", "must be false"),
    ("vms.web.count", True, "vms.web.count", "expected an integer, got boolean"),
    ("vms.web.count", 2**70, "vms.web.count", "out of range"),
    (
        "services.backup.settings",
        {"b": b"\x00"},
        "services.backup.settings.b",
        "a bytes cannot be a setting",
    ),
    (
        "services.backup.settings",
        {"n": None},
        "services.backup.settings.n",
        "a nil cannot be a setting",
    ),
    (
        "services.backup.settings",
        {"i": 2**64 - 1},
        "services.backup.settings.i",
        "does not fit in 64 bits",
    ),
    (
        "services.backup.roles.server.machines",
        ["gamma"],
        "services.backup.roles.server.machines[0]",
        "unknown machine 'gamma'",
    ),
    ("vms.web.secrets", ["backup/none"], "vms.web.secrets[0]", "no secret 'backup/none'"),
    ("clan", [], "clan", "expected a table, got array"),
    ("clan.name", "a\ud800", "clan.name", "not valid UTF-8"),
]


@pytest.mark.parametrize(("path", "value", "where", "message"), BAD_DOCS)
def test_validate_doc_rejects(path, value, where, message):
    issues = validate_doc(_set(good_doc(), path, value))
    assert any(i.path == where and message in i.message and i.file == "<doc>" for i in issues), (
        issues
    )


def test_validate_doc_non_dict():
    assert [str(i) for i in validate_doc([1])] == ["<doc>: expected a table, got array"]
    assert validate_doc(None)[0].message == "expected a table, got nil"


def test_validate_doc_survives_the_wire():
    doc = good_doc()
    again = unpack(pack(doc))
    assert again == doc and validate_doc(again) == []


# ---------------------------------------------------------------- hypothesis

_names = st.from_regex(r"[a-z0-9][a-z0-9-]{0,6}", fullmatch=True)
_text = st.text(max_size=12).filter(lambda s: all(not 0xD800 <= ord(c) <= 0xDFFF for c in s))
_scalars = _text | st.integers(-(2**63), 2**63 - 1) | st.booleans() | st.floats(allow_nan=False)
_settings = st.dictionaries(
    _text,
    st.recursive(
        _scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
        max_leaves=6,
    ),
    max_size=3,
)
_endpoint = st.sampled_from(["198.51.100.7:7946", "[2001:db8::1]:1", "a.example:65535", "h:80"])
_kinds = st.lists(st.sampled_from(["lan", "public", "tor"]), min_size=1, max_size=3, unique=True)


@st.composite
def valid_docs(draw):
    admins = sorted(
        draw(st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=3, unique=True))
    )
    mnames = draw(st.lists(_names, max_size=4, unique=True))
    keys = draw(
        st.lists(
            st.binary(min_size=32, max_size=32),
            min_size=3 * len(mnames),
            max_size=3 * len(mnames),
            unique=True,
        )
    )
    machines = {}
    for i, n in enumerate(mnames):
        tags = sorted(draw(st.lists(_names | st.just("no-public"), max_size=3, unique=True)))
        machines[n] = {
            "node_key": keys[3 * i],
            "box_key": keys[3 * i + 1],
            "wg_key": keys[3 * i + 2],
            "tags": tags,
            "endpoints": draw(st.lists(_endpoint, max_size=2, unique=True)),
            "sealed_endpoints": draw(st.binary(max_size=20)),
            "public": False if "no-public" in tags else draw(st.booleans()),
        }
    services = {}
    role_refs: list[str] = []  # roles of services drawn so far: imports only look back
    secret_refs: list[str] = []
    for sname in draw(st.lists(_names, max_size=2, unique=True)):
        roles = {
            r: {
                "machines": draw(st.lists(st.sampled_from(mnames), unique=True)) if mnames else [],
                "tags": draw(st.lists(_names, max_size=2, unique=True)),
                "settings": draw(_settings),
                "exports": draw(st.lists(st.sampled_from(["a_b", "x"]), unique=True)),
                "imports": draw(st.lists(st.sampled_from(role_refs), unique=True))
                if role_refs
                else [],
            }
            for r in draw(st.lists(_names, max_size=2, unique=True))
        }
        secrets: dict = {}  # a secret depends only on earlier ones: never a cycle
        for x in draw(st.lists(_names, max_size=2, unique=True)):
            gen = draw(
                st.sampled_from(
                    ["random-bytes", "password", "ed25519", "x25519", "wireguard", "command"]
                )
            )
            secrets[x] = {
                "generator": gen,
                "length": draw(st.integers(1, 64)) if gen in ("random-bytes", "password") else 0,
                "command": draw(_text.filter(bool)) if gen == "command" else "",
                "depends": draw(st.lists(st.sampled_from(sorted(secrets)), unique=True))
                if secrets
                else [],
                "scope": draw(st.sampled_from(["machine"] + [f"role:{r}" for r in roles])),
                "rotate_days": draw(st.integers(0, 36500)),
                "secret_files": draw(st.lists(st.sampled_from(["key", "a.pem"]), unique=True)),
                "public_files": draw(st.lists(st.sampled_from(["pub"]), unique=True)),
            }
        role_refs += [f"{sname}.{r}" for r in roles]
        secret_refs += [f"{sname}/{x}" for x in secrets]
        services[sname] = {
            "type": draw(_text.filter(bool)),
            "settings": draw(_settings),
            "roles": roles,
            "secrets": secrets,
            "reload": draw(_text),
        }
    vms = {
        v: {
            "machines": draw(st.lists(st.sampled_from(mnames), unique=True)) if mnames else [],
            "tags": draw(st.lists(_names, max_size=2, unique=True)),
            "count": draw(st.integers(1, 4)),
            "vcpus": draw(st.integers(1, 8)),
            "memory_mb": draw(st.integers(16, 4096)),
            "kernel": draw(_text.filter(bool)),
            "initrd": draw(_text),
            "rootfs": draw(_text),
            "disk_mb": draw(st.integers(0, 100)),
            "networks": draw(st.lists(_names, max_size=2, unique=True)),
            "secrets": draw(st.lists(st.sampled_from(secret_refs), unique=True))
            if secret_refs
            else [],
            "backend": draw(st.sampled_from(["auto", "qemu", "cloud-hypervisor", "firecracker"])),
            "graphics": draw(st.booleans()),
        }
        for v in draw(st.lists(_names, max_size=2, unique=True))
    }
    return {
        "format": 1,
        "clan": {
            "id": draw(st.binary(min_size=16, max_size=16)),
            "name": draw(_names),
            "admins": admins,
            "threshold": draw(st.integers(1, len(admins))),
        },
        "machines": machines,
        "networks": {
            "default": draw(_kinds),
            "by_tag": draw(st.dictionaries(_names, _kinds, max_size=2)),
        },
        "services": services,
        "vms": vms,
    }


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(valid_docs())
def test_round_trip_generated(doc):
    assert validate_doc(doc) == []
    r = load_inventory_toml(doc_to_toml(doc))
    assert r.errors == []
    assert r.doc == doc
    assert pack(r.doc) == pack(doc)


_wire = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(_wire)
def test_validate_doc_never_raises_on_arbitrary_values(value):
    issues = validate_doc(value)
    assert isinstance(issues, list) and issues
    assert not any("cannot validate" in i.message for i in issues)


def _leaves(d, prefix=()):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _leaves(v, prefix + (k,))
    else:
        yield prefix


@settings(max_examples=300)
@given(st.data())
def test_validate_doc_mutated_valid_doc_never_raises(data):
    doc = good_doc()
    paths = list(_leaves(doc))
    path = data.draw(st.sampled_from(paths))
    cur = doc
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = data.draw(_wire)
    issues = validate_doc(doc)
    assert isinstance(issues, list)
    assert not any("cannot validate" in i.message for i in issues)


@given(st.text(max_size=200))
def test_load_never_raises_on_any_text(text):
    r = load_inventory_toml(text, filename=FILE)
    assert (r.doc is None) == bool(r.errors)


_toml_values = st.recursive(
    st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=300)
@given(st.data())
def test_load_never_raises_on_mutated_toml(data):
    d = base()
    paths = list(_leaves(d))
    path = data.draw(st.sampled_from(paths))
    cur = d
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = data.draw(_toml_values)
    r = parse(d)
    assert (r.doc is None) == bool(r.errors)
    assert not any(e.message.startswith("internal") for e in r.errors)
    if r.doc is not None:
        assert validate_doc(r.doc) == []
