"""Every clanctl command against real agents, as a script uses it: with `--json`
(before and after the command) stdout parses as JSON; on an agent in no clan
each clan command exits 5 and prints nothing on stdout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clanagent.cli import clanctl
from clanagent.cli._argtree import leaves, walk
from clanagent.cli.errors import Exit

from ._clanctl_agents import (
    clanagent,
    ctl,
    free_port,
    running_agent,
    wait_for,
    write_config,
)
from .test_vmhost_qemu import vm_assets  # noqa: F401 (a fixture, asked for by vm_kernel)

pytestmark = pytest.mark.integration

LEAVES = {" ".join(c.path): c for c in leaves(walk(clanctl._parser()))}
# Byte pipes, not reports: a console session and ssh itself (`ssh --print`
# is tested), and ssh's ProxyCommand helper, which talks to no agent.
RAW = {"vm console", "tor-connect"}


def js(sock: Path, *args: str, after: bool = False, stdin: str | None = None):
    """Run clanctl with --json (before the command, or after it) and parse stdout."""
    argv = list(args)
    if after:
        words = argv[: _command_words(argv)]
        argv = [*words, "--json", *argv[len(words) :]]
    else:
        argv = ["--json", *argv]
    r = ctl(sock, *argv, stdin=stdin)
    assert r.returncode == 0, f"clanctl {argv}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    try:
        return json.loads(r.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"clanctl {argv}: stdout is not JSON ({exc}):\n{r.stdout}") from None


def _command_words(argv: list[str]) -> int:
    for n in range(len(argv), 0, -1):
        if " ".join(argv[:n]) in LEAVES:
            return n
    raise AssertionError(f"no command in {argv}")


@pytest.fixture
def vm_kernel(request):
    """(vmlinux, initrd) of a bootable test image, or None where QEMU cannot run one."""
    try:
        return request.getfixturevalue("vm_assets")
    except pytest.skip.Exception:
        return None


def test_every_command_prints_json_against_real_agents(tmp_path, vm_kernel):
    tested: set[str] = set()

    def run(*args, after=False, stdin=None):
        tested.add(" ".join(args[: _command_words(list(args))]))
        return js(alpha, *args, after=after, stdin=stdin)

    pa, pb = free_port(), free_port()
    cfg_a = write_config(tmp_path, "alpha", pa)
    cfg_b = write_config(tmp_path, "beta", pb)
    alpha, beta = tmp_path / "alpha.sock", tmp_path / "beta.sock"
    key, inv = tmp_path / "admin.key", tmp_path / "inventory.toml"
    with running_agent(cfg_a, alpha, tmp_path / "alpha.log"):
        for after in (False, True):
            assert run("status", after=after)["name"] == "alpha"
            assert "signing_key" in run("whoami", after=after)
            assert run("peers", after=after) == []
            assert "clanagent_info" in run("metrics", after=after)["text"]
        founded = run(
            "clan", "init", "home", "--admin-key", str(key), "--machine", "alpha",
            "--tags", "server", "--endpoint", f"127.0.0.1:{pa}", "--out", str(inv),
        )  # fmt: skip
        assert founded["status"] == "accepted" and len(founded["clan_id"]) == 32
        # in a clan without secrets, the secrets commands say so (and exit 0)
        for words in (["secrets", "status"], ["secrets", "list"]):
            r = ctl(alpha, *words)
            assert r.returncode == 0 and r.stdout.startswith("no secrets: no service"), r
        assert js(alpha, "secrets", "status") == []

        # beta: keys first, then the admin adds it, then it joins with the token
        mk = clanagent("keygen", "--state-dir", str(tmp_path / "beta")).stdout
        machine_key = next(ln.split()[-1] for ln in mk.splitlines() if ln.startswith("machine key"))
        added = run(
            "machine", "add", "beta", "--key", machine_key, "--tags", "laptop",
            "--endpoint", f"127.0.0.1:{pb}", "--admin-key", str(key), "--yes", after=True,
        )  # fmt: skip
        assert added["token"].startswith("clan1.")
        assert "machines.beta" in {c["path"] for c in added["changes"]}
        assert run("invite", "beta")["token"].startswith("clan1.")
        # `clanagent join` puts the anchor where the agent's config says
        j = clanagent("join", added["token"], "--config", str(cfg_b))
        assert j.returncode == 0, j.stderr
        assert (tmp_path / "beta").is_dir()

        with running_agent(cfg_b, beta, tmp_path / "beta.log") as beta_proc:
            wait_for(
                lambda: any(p["state"] == "alive" for p in js(alpha, "peers")), 30, "beta alive"
            )
            peers = run("peers", after=True)
            assert [p["name"] for p in peers] == ["beta"]
            rows = {r["name"]: r for r in run("machines")}
            assert rows["beta"]["online"] is True

            # a service with a secret, and a VM on alpha
            text = ctl(alpha, "inventory", "show").stdout + _SERVICE
            if vm_kernel is not None:
                text += _VM.format(kernel=vm_kernel[0], initrd=vm_kernel[1])
            inv.write_text(text)
            changes = run("inventory", "diff", str(inv))
            assert {c["path"] for c in changes} >= {"services.backup"}
            assert all(set(c) == {"kind", "path", "old", "new"} for c in changes)
            applied = run(
                "inventory", "apply", str(inv), "--admin-key", str(key), "--yes", "-m", "svc",
                after=True,
            )  # fmt: skip
            assert applied["status"] == "accepted" and applied["changes"]
            again = run("inventory", "apply", str(inv), "--admin-key", str(key), "--yes")
            assert again == {"status": "unchanged", "changes": []}
            for after in (False, True):
                shown = run("inventory", "show", after=after)
                assert shown["doc"]["clan"]["name"] == "home"
                assert len(run("inventory", "history", after=after)) == 3
                assert run("inventory", "conflicts", after=after) == []
                assert [s["service"] for s in run("services", after=after)] == ["backup"]

            secret = "backup/repokey"
            wait_for(
                lambda: any(r["generation"] for r in js(alpha, "secrets", "list")),
                30,
                "the secret's first generation",
            )
            assert [r["id"] for r in run("secrets", "list", after=True)] == [secret]
            assert run("secrets", "status", secret)[0]["holders"] == ["alpha"]
            assert run("secrets", "show-public", secret, after=True) == {}
            assert run("secrets", "rotate", secret)["id"] == secret

            path = wait_for(
                lambda: (p := js(alpha, "path", "beta"))["chosen"] and p, 30, "a path to beta"
            )
            assert path["machine"] == "beta" and path["chosen"]["address"].endswith(str(pb))
            assert run("path", "beta", after=True)["machine"] == "beta"
            ssh = run("ssh", "--print", "beta", after=True)
            assert ssh["argv"][-1] == ssh["host"] == "127.0.0.1"
            ssh = run("ssh", "--print", "beta")
            assert ssh["host"] == "127.0.0.1"

            ui = run("ui", after=True)
            assert ui["url"].startswith("http://127.0.0.1:")

            vms = run("vm", "list")
            for action in ("start", "stop", "restart"):
                if vm_kernel is None:
                    break
                r = run("vm", action, "web", "--admin-key", str(key), after=action == "stop")
                assert r == {"action": action, "hosts": ["alpha"], "vm": "web"}
            if vm_kernel is not None:
                assert [v["vm"] for v in vms] == ["web"]
                wait_for(
                    lambda: js(alpha, "vm", "list")[0]["state"] == "running", 60, "the VM to run"
                )
                logs = run("vm", "logs", "web", after=True)
                assert logs["vm"] == "web" and isinstance(logs["log"], str)

            # events: one object per line
            p = subprocess.Popen(
                [
                    sys.executable, "-m", "clanagent.cli.clanctl", "--socket", str(alpha),
                    "events", "--json", "--count", "1",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            tested.add("events")
            # It may have printed its one event (a VM state change, say) and
            # exited before this looks: then its connection is already gone.
            wait_for(
                lambda: p.poll() is not None or _connections(alpha) >= 2,
                30,
                "the events subscriber",
            )
            # Its subscription may lag its connection: change the inventory until
            # the event it reports has arrived (each change publishes one).
            for n in range(20):
                if p.poll() is not None:
                    break
                doc = inv.read_text().replace('"laptop"', f'"laptop{n}"' if n else '"laptop"')
                inv.write_text(doc.replace(f'"laptop{n - 1}"', f'"laptop{n}"'))
                run("inventory", "apply", str(inv), "--admin-key", str(key), "--yes")
            out, _ = p.communicate(timeout=30)
            assert json.loads(out.splitlines()[0])["type"]

            # a machine that leaves is "left" for clanctl and for the console's map
            beta_proc.terminate()
            beta_proc.wait(timeout=10)
            wait_for(
                lambda: {r["name"]: r for r in js(alpha, "machines")}["beta"]["state"] == "left",
                20,
                "beta to be left",
            )
            from clanagent.control.client import ControlClient

            with ControlClient(alpha) as c:
                topo = {m["name"]: m for m in c.call("topology")["machines"]}
            assert topo["beta"]["state"] == "left" and topo["beta"]["online"] is False

        # refused (1) and not-JSON-on-error
        r = ctl(alpha, "--json", "invite", "nosuchmachine")
        assert r.returncode == Exit.FAILED and r.stdout == "" and "nosuchmachine" in r.stderr

    missing = set(LEAVES) - RAW - tested
    if vm_kernel is None:
        missing -= {"vm logs", "vm start", "vm stop", "vm restart"}
    assert not missing, f"commands not run with --json: {sorted(missing)}"


def _connections(sock: Path) -> int:
    """Control connections open at the agent, this one included."""
    from clanagent.control.client import ControlClient

    with ControlClient(sock) as c:
        return int(c.call("status")["counters"]["control"]["active"])


_SERVICE = """
[services.backup]
type = "borgbackup"
[services.backup.roles.server]
machines = ["alpha"]
exports = ["address"]
[services.backup.secrets.repokey]
generator = "password"
length = 32
scope = "role:server"
rotate_days = 90
secret_files = ["passphrase"]
"""

_VM = """
[vms.web]
machines = ["alpha"]
vcpus = 1
memory_mb = 128
kernel = "{kernel}"
initrd = "{initrd}"
"""


# -- an agent in no clan: exit 5 for every clan command -----------------------------------

NO_CLAN_ARGS = {
    "machines": [],
    "invite": ["beta"],
    "machine add": ["beta", "--key", "KEY", "--yes"],
    "inventory show": [],
    "inventory diff": ["FILE"],
    "inventory apply": ["FILE", "--yes"],
    "inventory history": [],
    "inventory conflicts": [],
    "path": ["beta"],
    "ssh": ["--print", "beta"],
    "services": [],
    "secrets list": [],
    "secrets status": [],
    "secrets show-public": ["backup/repokey"],
    "secrets rotate": ["backup/repokey"],
    "vm list": [],
    "vm logs": ["web"],
    "vm console": ["web"],
    "vm start": ["web"],
    "vm stop": ["web"],
    "vm restart": ["web"],
}
WITHOUT_CLAN = {
    "status": [],
    "whoami": [],
    "peers": [],
    "metrics": [],
    "ui": [],
    "clan init": ["home", "--admin-key", "ADMIN"],  # last: the agent is in a clan after it
}


def test_every_command_on_an_agent_in_no_clan(tmp_path):
    from clanagent.cli._inventory_cmds import create_admin_key
    from clanagent.identity import load_or_create, machine_key_string

    assert {*NO_CLAN_ARGS, *WITHOUT_CLAN, "events", "tor-connect"} == set(LEAVES)
    key = tmp_path / "admin.key"
    create_admin_key(key)
    inv = tmp_path / "inventory.toml"
    inv.write_text(_a_valid_inventory(tmp_path))
    machine_key = machine_key_string(load_or_create(tmp_path / "other")[0])
    cfg = write_config(tmp_path, "lonely")
    sock = tmp_path / "lonely.sock"
    with running_agent(cfg, sock, tmp_path / "lonely.log"):
        # events works without a clan: it reports (at the latest) the agent's stop
        events = subprocess.Popen(
            [
                sys.executable, "-m", "clanagent.cli.clanctl", "--socket", str(sock),
                "events", "--count", "1", "--json",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name, args in NO_CLAN_ARGS.items():
            args = [{"KEY": machine_key, "FILE": str(inv)}.get(a, a) for a in args]
            if (
                name in ("machine add", "inventory apply")
                or name.startswith("vm ")
                and name
                not in (
                    "vm list",
                    "vm logs",
                )
            ):
                args += ["--admin-key", str(key)]
            for pre in ([], ["--json"]):
                r = ctl(sock, *pre, *name.split(), *args)
                assert r.returncode == Exit.NO_CLAN, f"{name}: {r.returncode} {r.stderr}"
                assert r.stdout == "", name
                assert "not in a clan" in r.stderr and "clanagent join TOKEN" in r.stderr, name
                assert r.stderr.count("\n") == 1, r.stderr
        for name, args in WITHOUT_CLAN.items():
            args = [str(key) if a == "ADMIN" else a for a in args]
            r = ctl(sock, "--json", *name.split(), *args)
            assert r.returncode == 0, f"{name}: {r.stderr}"
            json.loads(r.stdout)
            if name == "peers":
                text = ctl(sock, "peers").stdout
                assert "not in a clan yet" in text and "clanagent join TOKEN" in text
                assert "--join" not in text
    out, _ = events.communicate(timeout=30)
    assert events.returncode == 0 and json.loads(out)["type"]


def _a_valid_inventory(tmp_path: Path) -> str:
    """An inventory TOML of some clan (for diff/apply against an agent in none)."""
    import nacl.signing

    from clanagent.identity import load_or_create
    from clanagent.inventory.parse import doc_to_toml

    ident = load_or_create(tmp_path / "someone")[0]
    admin = nacl.signing.SigningKey.generate()
    import base64

    doc = {
        "format": 1,
        "clan": {
            "id": b"\x01" * 16,
            "name": "elsewhere",
            "admins": [bytes(admin.verify_key)],
            "threshold": 1,
        },
        "machines": {
            "m1": {
                "node_key": ident.public_key,
                "box_key": ident.box_public,
                "wg_key": base64.b64decode(base64.b64encode(ident.wg_public)),
                "tags": [],
                "endpoints": [],
                "sealed_endpoints": b"",
                "public": True,
            }
        },
        "networks": {"default": ["lan", "public", "tor"], "by_tag": {}},
        "services": {},
        "vms": {},
    }
    return doc_to_toml(doc)
