"""Three machines in network namespaces on one switch: mDNS, gossip, WireGuard.

Real agents, each in its own namespace, with wireguard-go.  They join with
tokens that carry no seed address, so they can only find each other by
mDNS; then they gossip, build the WireGuard mesh, and every machine pings
every other machine's overlay address.  One machine's cable is pulled and
put back, and the pings come back.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from clanagent.inventory import Anchor, parse_token, save_anchor

from ._netns import Lan, agent_config, clanctl, clanctl_json, netns_missing_reason, wait_until

REASON = netns_missing_reason()
pytestmark = [
    pytest.mark.root,
    pytest.mark.integration,
    pytest.mark.skipif(REASON is not None, reason=REASON or ""),
]


def keygen(state) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "clanagent.cli.agent_main", "keygen", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return next(ln.split()[-1] for ln in out.splitlines() if ln.startswith("machine key"))


def start_clan(lan: Lan, tmp_path, n: int):
    homes = [tmp_path / f"m{i + 1}" for i in range(n)]
    socks = [h / "control.sock" for h in homes]
    for i, home in enumerate(homes):
        home.mkdir()
        agent_config(home, f"m{i + 1}", f"{lan.prefix}w{i + 1}")
    argv = [sys.executable, "-m", "clanagent.cli.agent_main", "run", "--config"]
    started = {}
    started[0] = time.monotonic()
    lan.spawn(0, [*argv, str(homes[0] / "agent.toml")], homes[0] / "agent.log")
    wait_until(socks[0].exists, 20, "m1 to start")
    admin = tmp_path / "admin.key"
    clanctl(
        socks[0],
        "clan",
        "init",
        "netns",
        "--admin-key",
        str(admin),
        "--machine",
        "m1",
        "--tags",
        "lan",
    )
    for i in range(1, n):
        key = keygen(homes[i] / "state")
        out = clanctl(
            socks[0],
            "machine",
            "add",
            f"m{i + 1}",
            "--key",
            key,
            "--tags",
            "lan",
            "--admin-key",
            str(admin),
            "--yes",
        )
        token = parse_token(
            next(
                ln.split()[-1] for ln in out.splitlines() if ln.strip().startswith("clanagent join")
            )
        )
        # No seeds: the only way to find the clan is mDNS on the LAN.
        save_anchor(
            homes[i] / "state", Anchor(token.clan_id, token.name, token.admins, (), token.machine)
        )
        started[i] = time.monotonic()
        lan.spawn(i, [*argv, str(homes[i] / "agent.toml")], homes[i] / "agent.log")
        wait_until(socks[i].exists, 20, f"m{i + 1} to start")
    return homes, socks, started


def overlay_of(sock, machine: str) -> str:
    return clanctl_json(sock, "path", machine)["overlay6"]


def test_mdns_gossip_wireguard_and_a_pulled_cable(tmp_path):
    n = 3
    lan = Lan(n)
    lan.setup()
    try:
        homes, socks, _ = start_clan(lan, tmp_path, n)

        def all_online() -> bool:
            for s in socks:
                rows = clanctl_json(s, "machines")
                if len(rows) != n or not all(r["online"] for r in rows):
                    return False
            return True

        wait_until(all_online, 45, "every machine online everywhere (mDNS + gossip)")
        status = clanctl_json(socks[1], "status")
        caps = {c["name"]: c for c in status["capabilities"]}
        assert caps["mesh.wireguard"]["available"], caps["mesh.wireguard"]
        assert caps["mesh.mdns"]["available"], caps["mesh.mdns"]

        overlays = {f"m{i + 1}": overlay_of(socks[0], f"m{i + 1}") for i in range(n)}
        for i in range(n):
            for j in range(n):
                if i != j:
                    wait_until(
                        lambda i=i, j=j: lan.ping(i, overlays[f"m{j + 1}"]),
                        30,
                        f"m{i + 1} to ping m{j + 1} over WireGuard",
                    )

        path = clanctl_json(socks[0], "path", "m2")
        assert path["chosen"]["kind"] == "lan"
        assert path["chosen"]["address"].startswith(lan.subnet)
        # the stock wg tool reads what the agent configured
        wg = subprocess.run(
            ["ip", "netns", "exec", lan.hosts[0], "wg", "show", f"{lan.prefix}w1"],
            capture_output=True,
            text=True,
        ).stdout
        assert wg.count("peer:") == n - 1 and "allowed ips" in wg
        assert overlays["m2"] in wg

        # a two-role service: m1 serves, the others import its overlay address and key
        inv = tmp_path / "inventory.toml"
        inv.write_text(
            clanctl(socks[0], "inventory", "show")
            + """
[services.vpn]
type = "vpn"
[services.vpn.roles.server]
machines = ["m1"]
exports = ["address", "public_key"]
[services.vpn.roles.client]
machines = ["m2", "m3"]
imports = ["vpn.server"]
"""
        )
        clanctl(
            socks[0],
            "inventory",
            "apply",
            str(inv),
            "--admin-key",
            str(tmp_path / "admin.key"),
            "--yes",
        )
        env = homes[1] / "run" / "services" / "vpn" / "imports.env"
        wait_until(
            lambda: env.exists() and overlays["m1"] in env.read_text(),
            30,
            "m2 to import m1's exported address",
        )
        imported = next(
            ln.split("=", 1)[1].strip('"')
            for ln in env.read_text().splitlines()
            if ln.startswith("CLAN_VPN_SERVER_ADDRESS=")
        )
        assert lan.ping(1, imported)  # the client reaches the server at what it imported

        # pull m3's cable: it drops off; put it back: the tunnel works again
        lan.cut(2, up=False)
        time.sleep(1)
        assert not lan.ping(0, overlays["m3"])
        lan.cut(2, up=True)
        took = wait_until(
            lambda: lan.ping(0, overlays["m3"]) and lan.ping(2, overlays["m1"]),
            30,
            "pings to come back after the cable is back",
        )
        print(f"connectivity back {took:.2f} s after the cable was restored")
        text = clanctl(socks[0], "path", "m3")
        assert "lan" in text and "chosen" in text
    finally:
        lan.teardown()
        for home in tmp_path.iterdir():
            log = home / "agent.log"
            if log.exists() and "Traceback" in log.read_text():
                print(log.read_text()[-3000:])
