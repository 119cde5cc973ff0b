"""Test helper: a small switched LAN of network namespaces, and agents in them.

Everything it creates is named with a per-run prefix and removed by
`teardown()`, even after a failure.  Addresses are private ones inside the
namespaces we create; nothing leaves this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=60)


def netns_missing_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "ping", "wireguard-go"):
        if shutil.which(tool) is None:
            return f"needs {tool} on PATH (see .ci/run)"
    if not Path("/dev/net/tun").exists():
        return "needs /dev/net/tun for wireguard-go"
    return None


class Lan:
    """One bridge in a switch namespace, with `n` host namespaces attached."""

    def __init__(
        self,
        n: int,
        prefix: str | None = None,
        subnet: str = "10.88.0",
        *,
        share_hosts_with: Lan | None = None,
        tag: str = "a",
    ) -> None:
        """`share_hosts_with`: a second LAN for the same host namespaces."""
        self.prefix = (
            share_hosts_with.prefix if share_hosts_with else (prefix or f"ca{os.getpid() % 10000}")
        )
        self.tag = tag
        self.sw = f"{self.prefix}-sw{tag}"
        self.hosts = [f"{self.prefix}-m{i}" for i in range(1, n + 1)]
        self.own_hosts = share_hosts_with is None
        self.subnet = subnet
        self.procs: list[subprocess.Popen] = []

    def ip(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def setup(self) -> None:
        sh("ip", "netns", "add", self.sw)
        sh("ip", "-n", self.sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.sw, "link", "set", "br0", "up")
        for i, ns in enumerate(self.hosts):
            if self.own_hosts:
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            host_if, sw_if = f"eth{self.tag}{i}", f"p{i}"
            sh(
                "ip",
                "link",
                "add",
                host_if,
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                sw_if,
                "netns",
                self.sw,
            )
            sh("ip", "-n", self.sw, "link", "set", sw_if, "master", "br0")
            sh("ip", "-n", self.sw, "link", "set", sw_if, "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", host_if)
            sh("ip", "-n", ns, "link", "set", host_if, "multicast", "on", "up")

    def cut(self, i: int, up: bool) -> None:
        """Take host i's cable out of the switch (or put it back)."""
        sh("ip", "-n", self.sw, "link", "set", f"p{i}", "up" if up else "down")

    def spawn(self, i: int, argv: list[str], log: Path) -> subprocess.Popen:
        f = log.open("w")
        p = subprocess.Popen(["ip", "netns", "exec", self.hosts[i], *argv], stderr=f, stdout=f)
        self.procs.append(p)
        return p

    def ping(self, i: int, addr: str, timeout: float = 1.0) -> bool:
        r = sh(
            "ip",
            "netns",
            "exec",
            self.hosts[i],
            "ping",
            "-c1",
            f"-W{max(1, int(timeout))}",
            addr,
            check=False,
        )
        return r.returncode == 0

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
        for ns in [*(self.hosts if self.own_hosts else []), self.sw]:
            sh("ip", "netns", "del", ns, check=False)


def agent_config(home: Path, name: str, iface: str, *, profile: str = "local") -> Path:
    cfg = home / "agent.toml"
    cfg.write_text(
        f'state_dir = "{home / "state"}"\n'
        f'runtime_dir = "{home / "run"}"\n'
        f'[control]\nsocket = "{home / "control.sock"}"\n'
        f'[gossip]\nlisten = "0.0.0.0:7946"\nprofile = "{profile}"\nname = "{name}"\n'
        f'[mesh]\ninterface = "{iface}"\nwg_port = 51820\nmdns = true\n'
    )
    return cfg


def clanctl(sock: Path, *args: str, check: bool = True) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "clanagent.cli.clanctl", "--socket", str(sock), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"clanctl {' '.join(args)}: {r.stderr}")
    return r.stdout


def clanctl_json(sock: Path, *args: str):
    return json.loads(clanctl(sock, "--json", *args))


def wait_until(pred, timeout: float, what: str, every: float = 0.2) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
