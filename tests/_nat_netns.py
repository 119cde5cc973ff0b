"""Test helper: two sites behind nftables NAT routers, plus a public machine.

Layout (every name carries a per-run prefix; all removed by `teardown()`)::

    site a: host 192.168.10.2 --- router a (192.168.10.1 | 198.51.100.1) --+
                                                                          |  "internet":
    site b: host 192.168.20.2 --- router b (192.168.20.1 | 198.51.100.2) --+  a bridge in
                                                                          |  its own
    public: host 198.51.100.10 -------------------------------------------+  namespace

A router's NAT is one of (`recipes/nat/`, measured with nftables 1.0.6):

* "eim": `masquerade` -- endpoint-independent mapping, the source port is
  kept when free; unsolicited inbound finds no conntrack entry and is dropped
  at the router (address-and-port-dependent filtering, as conntrack does);
* "firewall": "eim" plus a forward chain with `policy drop` that accepts only
  `ct state established,related` and what comes from the inside (a home
  router's stateful firewall);
* "symmetric": `masquerade random` -- a new source port per destination, so
  hole punching cannot work and a relay must carry the traffic.

Addresses are documentation and private ranges on interfaces inside the
namespaces made here; nothing leaves this machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ._netns import clanctl, clanctl_json, sh, wait_until

NAT_MODES = ("eim", "firewall", "symmetric", "none")
INTERNET = "198.51.100"


@dataclass(frozen=True)
class Site:
    name: str  # "a", "b"
    host: str  # namespace of the machine
    router: str  # namespace of its router
    lan_ip: str
    wan_ip: str
    mode: str


def nft_rules(mode: str, wan_if: str, lan_if: str) -> str:
    """The router's nftables ruleset for one NAT mode."""
    if mode not in NAT_MODES:
        raise ValueError(f"unknown NAT mode {mode!r}")
    if mode == "none":
        return ""
    masq = "masquerade random" if mode == "symmetric" else "masquerade"
    rules = (
        "table ip nat {\n"
        "  chain post { type nat hook postrouting priority 100; "
        f'oifname "{wan_if}" {masq}; }}\n'
        "}\n"
    )
    # Like every home router: nothing on the WAN reaches the router itself
    # unasked.  Without this, a punch packet that arrives before the inside
    # has sent leaves a conntrack entry for the router's own port, the
    # inside's first packet then clashes with it and masquerade moves it to
    # another port -- and the punch fails (measured; see nat.py).
    rules += (
        "table ip guard {\n"
        "  chain input { type filter hook input priority 0; policy accept;\n"
        f'    iifname "{wan_if}" ct state new drop\n'
        "  }\n"
        "}\n"
    )
    if mode == "firewall":
        rules += (
            "table ip filter {\n"
            "  chain guard { type filter hook forward priority 0; policy drop;\n"
            "    ct state established,related accept\n"
            f'    iifname "{lan_if}" accept\n'
            "  }\n"
            "}\n"
        )
    return rules


class NatNet:
    """Two NATed sites and one public machine; `hosts` = [a, b, public]."""

    def __init__(self, mode_a: str, mode_b: str, prefix: str | None = None) -> None:
        p = prefix or f"cn{os.getpid() % 10000}"
        self.prefix = p
        self.inet = f"{p}-inet"
        self.sites = [
            Site("a", f"{p}-ha", f"{p}-ra", "192.168.10.2", f"{INTERNET}.1", mode_a),
            Site("b", f"{p}-hb", f"{p}-rb", "192.168.20.2", f"{INTERNET}.2", mode_b),
        ]
        self.public = f"{p}-hp"
        self.public_ip = f"{INTERNET}.10"
        self.hosts = [self.sites[0].host, self.sites[1].host, self.public]
        self.namespaces = [self.inet, self.public] + [
            n for s in self.sites for n in (s.host, s.router)
        ]
        self.procs: list[subprocess.Popen] = []
        self._made: list[str] = []

    def ip(self, i: int) -> str:
        """The machine's own address (a NATed one's is private)."""
        return [self.sites[0].lan_ip, self.sites[1].lan_ip, self.public_ip][i]

    def setup(self) -> None:
        for ns in self.namespaces:
            sh("ip", "netns", "add", ns)
            self._made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.inet, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.inet, "link", "set", "br0", "up")
        self._wire(self.inet, "pp", self.public, "wan0", f"{self.public_ip}/24", bridge=True)
        for k, s in enumerate(self.sites):
            # router <-> internet, router <-> its host
            self._wire(self.inet, f"p{s.name}", s.router, "wan0", f"{s.wan_ip}/24", bridge=True)
            sh("ip", "link", "add", "lan0", "netns", s.router, "type", "veth", "peer", "eth0",
               "netns", s.host)  # fmt: skip
            router_lan = s.lan_ip.rsplit(".", 1)[0] + ".1"
            sh("ip", "-n", s.router, "addr", "add", f"{router_lan}/24", "dev", "lan0")
            sh("ip", "-n", s.router, "link", "set", "lan0", "up")
            sh("ip", "-n", s.host, "addr", "add", f"{s.lan_ip}/24", "dev", "eth0")
            sh("ip", "-n", s.host, "link", "set", "eth0", "multicast", "on", "up")
            sh("ip", "-n", s.host, "route", "add", "default", "via", router_lan)
            sh("ip", "netns", "exec", s.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            self.set_mode(k, s.mode)

    def _wire(self, sw: str, sw_if: str, ns: str, ifname: str, cidr: str, bridge: bool) -> None:
        sh("ip", "link", "add", sw_if, "netns", sw, "type", "veth", "peer", ifname, "netns", ns)
        if bridge:
            sh("ip", "-n", sw, "link", "set", sw_if, "master", "br0")
        sh("ip", "-n", sw, "link", "set", sw_if, "up")
        sh("ip", "-n", ns, "addr", "add", cidr, "dev", ifname)
        sh("ip", "-n", ns, "link", "set", ifname, "up")

    def set_mode(self, site: int, mode: str) -> None:
        """Replace site `site`'s NAT with `mode` (existing flows keep their
        conntrack entries, as on a real router)."""
        s = self.sites[site]
        sh("ip", "netns", "exec", s.router, "nft", "flush", "ruleset")
        rules = nft_rules(mode, "wan0", "lan0")
        if rules:
            subprocess.run(
                ["ip", "netns", "exec", s.router, "nft", "-f", "-"],
                input=rules, text=True, check=True, capture_output=True, timeout=30,
            )  # fmt: skip
        self.sites[site] = Site(s.name, s.host, s.router, s.lan_ip, s.wan_ip, mode)

    def flush_conntrack(self, site: int) -> None:
        """Forget every mapping of the site's router (a router reboot)."""
        sh("ip", "netns", "exec", self.sites[site].router, "conntrack", "-F", check=False)

    def cut_public(self, up: bool) -> None:
        """Pull the public machine's cable (or put it back)."""
        sh("ip", "-n", self.inet, "link", "set", "pp", "up" if up else "down")

    def spawn(self, i: int, argv: list[str], log: Path) -> subprocess.Popen:
        f = log.open("w")
        p = subprocess.Popen(["ip", "netns", "exec", self.hosts[i], *argv], stderr=f, stdout=f)
        self.procs.append(p)
        return p

    def run(self, i: int, *argv: str, check: bool = False) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.hosts[i], *argv, check=check)

    def ping(self, i: int, addr: str, timeout: float = 1.0) -> bool:
        r = self.run(i, "ping", "-c1", "-n", f"-W{max(1, int(timeout))}", addr)
        return r.returncode == 0

    def wg_show(self, i: int, iface: str, what: str = "endpoints") -> str:
        return self.run(i, "wg", "show", iface, what).stdout

    def teardown(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for ns in reversed(self._made):
            sh("ip", "netns", "del", ns, check=False)
        self._made.clear()


# ---------------------------------------------------------------- real agents


def keygen(state) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "clanagent.cli.agent_main", "keygen", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return next(ln.split()[-1] for ln in out.splitlines() if ln.startswith("machine key"))


def nat_config(home, name: str, iface: str, public: str | None, mesh_extra: str = "") -> None:
    (home / "agent.toml").write_text(
        f'state_dir = "{home / "state"}"\n'
        f'runtime_dir = "{home / "run"}"\n'
        f'[control]\nsocket = "{home / "control.sock"}"\n'
        f'[gossip]\nlisten = "0.0.0.0:7946"\nprofile = "local"\nname = "{name}"\n'
        f'[mesh]\ninterface = "{iface}"\nwg_port = 51820\nmdns = false\n'
        + (f'public_endpoints = ["{public}"]\n' if public else "")
        + mesh_extra
    )


class Clan:
    """Machines "a" and "b" behind the sites' NATs, "p" the public founder.
    Nobody types an address but p's (the seed and p's own public endpoint)."""

    names = ("a", "b", "p")

    def __init__(
        self, net: NatNet, tmp_path, p_tags: str = "server", p_mesh_extra: str = ""
    ) -> None:
        """`p_mesh_extra`: more `[mesh]` lines for p's agent.toml."""
        from clanagent.inventory import Anchor, parse_token, save_anchor

        self.net = net
        self.homes = {n: tmp_path / n for n in self.names}
        self.socks = {n: h / "control.sock" for n, h in self.homes.items()}
        self.ifaces = {n: f"{net.prefix}w{n}" for n in self.names}
        seed = f"{net.public_ip}:7946"
        for n, home in self.homes.items():
            home.mkdir()
            if n == "p":
                nat_config(home, n, self.ifaces[n], seed, p_mesh_extra)
            else:
                nat_config(home, n, self.ifaces[n], None)
        argv = [sys.executable, "-m", "clanagent.cli.agent_main", "run", "--config"]
        self.started = time.monotonic()
        net.spawn(2, [*argv, str(self.homes["p"] / "agent.toml")], self.homes["p"] / "agent.log")
        wait_until(self.socks["p"].exists, 20, "p to start")
        admin = tmp_path / "admin.key"
        clanctl(self.socks["p"], "clan", "init", "natclan", "--admin-key", str(admin),
                "--machine", "p", "--tags", p_tags)  # fmt: skip
        for n in ("a", "b"):
            key = keygen(self.homes[n] / "state")
            out = clanctl(self.socks["p"], "machine", "add", n, "--key", key, "--tags", "home",
                          "--admin-key", str(admin), "--yes")  # fmt: skip
            token = parse_token(
                next(ln.split()[-1] for ln in out.splitlines() if "clanagent join" in ln)
            )
            save_anchor(
                self.homes[n] / "state",
                Anchor(token.clan_id, token.name, token.admins, (seed,), token.machine),
            )
        # both start together (the benchmark times from here)
        self.ab_started = time.monotonic()
        for i, n in enumerate(("a", "b")):
            net.spawn(i, [*argv, str(self.homes[n] / "agent.toml")], self.homes[n] / "agent.log")
        for n in ("a", "b"):
            wait_until(self.socks[n].exists, 20, f"{n} to start")

    def path(self, frm: str, to: str) -> dict:
        return clanctl_json(self.socks[frm], "path", to)

    def logs(self) -> str:
        out = []
        for n, h in self.homes.items():
            log = h / "agent.log"
            if log.exists():
                out.append(f"--- {n}\n" + log.read_text()[-4000:])
        return "\n".join(out)
