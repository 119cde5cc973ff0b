"""clanctl's inventory commands against a real agent process, as an admin uses them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def ctl(sock, *args, check=True, stdin=None):
    r = subprocess.run(
        [sys.executable, "-m", "clanagent.cli.clanctl", "--socket", str(sock), *args],
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"clanctl {args}: {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def agent_cmd(*args):
    return subprocess.run(
        [sys.executable, "-m", "clanagent.cli.agent_main", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def agent(tmp_path):
    cfg = tmp_path / "agent.toml"
    sock = tmp_path / "ctl.sock"
    cfg.write_text(
        f'state_dir = "{tmp_path / "state"}"\n[control]\nsocket = "{sock}"\n'
        '[gossip]\nlisten = "127.0.0.1:0"\nprofile = "local"\nname = "alpha"\n'
        "[mesh]\nwireguard = false\nmdns = false\n"  # loopback only
    )
    log = (tmp_path / "agent.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "clanagent.cli.agent_main", "run", "--config", str(cfg)], stderr=log
    )
    deadline = time.monotonic() + 15
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "agent did not start"
        time.sleep(0.05)
    yield sock
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


def test_init_add_apply_diff_history(agent, tmp_path):
    key = tmp_path / "admin.key"
    inv = tmp_path / "inventory.toml"
    r = ctl(
        agent,
        "clan",
        "init",
        "home",
        "--admin-key",
        str(key),
        "--machine",
        "alpha",
        "--tags",
        "server",
        "--endpoint",
        "192.0.2.1:7946",
        "--out",
        str(inv),
    )
    assert "founded clan 'home'" in r.stdout
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    text = inv.read_text()
    assert "192.0.2.1" not in text and "sealed_endpoints" in text  # sealed even in the file
    # a second init is refused
    r = ctl(agent, "clan", "init", "again", "--admin-key", str(key), check=False)
    assert r.returncode == 1 and "already belongs to clan 'home'" in r.stderr

    # add a machine from its keygen output; the token comes back
    mk = agent_cmd("keygen", "--state-dir", str(tmp_path / "beta"))
    machine_key = next(
        ln.split()[-1] for ln in mk.stdout.splitlines() if ln.startswith("machine key")
    )
    r = ctl(
        agent,
        "machine",
        "add",
        "beta",
        "--key",
        machine_key,
        "--tags",
        "laptop",
        "--admin-key",
        str(key),
        "--yes",
    )
    assert "+ machines.beta" in r.stdout and "clanagent join clan1." in r.stdout
    r = ctl(
        agent,
        "machine",
        "add",
        "gamma",
        "--key",
        machine_key[:-3] + "AAA",
        "--admin-key",
        str(key),
        "--yes",
        check=False,
    )
    assert r.returncode == 1 and "mistyped" in r.stderr
    rows = json.loads(ctl(agent, "--json", "machines").stdout)
    assert [(x["name"], x["tags"]) for x in rows] == [("alpha", ["server"]), ("beta", ["laptop"])]

    # edit the TOML: a service with roles by name and tag; diff, then apply
    current = ctl(agent, "inventory", "show").stdout
    edited = (
        current
        + """
[services.backup]
type = "borgbackup"
[services.backup.roles.server]
machines = ["alpha"]
[services.backup.roles.client]
tags = ["laptop"]
"""
    )
    inv.write_text(edited)
    r = ctl(agent, "inventory", "diff", str(inv))
    assert "+ services.backup" in r.stdout
    r = ctl(agent, "inventory", "apply", str(inv), "--admin-key", str(key), check=False, stdin="")
    assert r.returncode == 1 and "--yes" in r.stderr  # no TTY: it will not guess
    r = ctl(
        agent,
        "inventory",
        "apply",
        str(inv),
        "--admin-key",
        str(key),
        "--yes",
        "-m",
        "backup service",
    )
    assert "applied version" in r.stdout
    rows = {x["name"]: x for x in json.loads(ctl(agent, "--json", "machines").stdout)}
    assert rows["alpha"]["services"] == ["backup.server"]
    assert rows["beta"]["services"] == ["backup.client"]
    r = ctl(agent, "inventory", "apply", str(inv), "--admin-key", str(key), "--yes")
    assert "nothing to apply" in r.stdout
    hist = ctl(agent, "inventory", "history").stdout
    assert "backup service" in hist and "add machine beta" in hist and "founded" in hist
    assert ctl(agent, "inventory", "conflicts").stdout.strip() == "no conflicts"


def test_validation_errors_name_file_path_and_problem(agent, tmp_path):
    key = tmp_path / "admin.key"
    inv = tmp_path / "inventory.toml"
    ctl(
        agent,
        "clan",
        "init",
        "home",
        "--admin-key",
        str(key),
        "--machine",
        "alpha",
        "--out",
        str(inv),
    )
    good = inv.read_text()
    inv.write_text(
        good
        + """
[services.backup]
type = "borgbackup"
[services.backup.roles.server]
machines = ["nosuchmachine"]
tags = ["nosuchtag"]
colour = "blue"
"""
    )
    r = ctl(agent, "inventory", "apply", str(inv), "--admin-key", str(key), "--yes", check=False)
    assert r.returncode == 1
    assert f"{inv}: services.backup.roles.server.machines" in r.stderr
    assert "nosuchmachine" in r.stderr
    assert f"{inv}: services.backup.roles.server" in r.stderr and "colour" in r.stderr
    assert "warning:" in r.stderr and "nosuchtag" in r.stderr  # a tag matching nothing warns
    assert "nothing was applied" in r.stderr
    assert len(json.loads(ctl(agent, "--json", "inventory", "history").stdout)) == 1

    # a different admin key cannot change the clan
    other = tmp_path / "other.key"
    from clanagent.cli._inventory_cmds import create_admin_key

    create_admin_key(other)
    inv.write_text(good.replace('name = "home"', 'name = "hijacked"'))
    r = ctl(agent, "inventory", "apply", str(inv), "--admin-key", str(other), "--yes", check=False)
    assert r.returncode == 1 and "under-signed" in r.stderr
    key.chmod(0o644)
    r = ctl(agent, "inventory", "apply", str(inv), "--admin-key", str(key), "--yes", check=False)
    assert r.returncode == 1 and "chmod 600" in r.stderr
    assert Path(key).exists()
