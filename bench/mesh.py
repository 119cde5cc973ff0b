"""The mesh benchmark: first ping over WireGuard, failover to another path,
and no false failover on a lossy link.

Owns: real agents in network namespaces (two switched LANs), timing
  - `first_ping_s`: from starting an agent in its namespace (with a join
    token) to its first successful ping of a peer's overlay address;
  - `failover_s`: from pulling the cable of the LAN its tunnel uses to the
    first ping that gets through on the other LAN;
  - `lossy`: both LANs drop 10 % of the IPv4 frames their switches
    forward, each way (nftables `numgen random`: this kernel has no netem),
    for `--lossy-seconds`; every failover of a path in use on either agent
    is a false one;
and `bench/results/mesh.json` with every run and the medians.  Must never:
report a run that did not finish as a time (it is counted as failed), or
leave a namespace or nftables table behind.

Needs root, ip, ping, nft and wireguard-go; otherwise it says what is missing
and writes nothing.  The backend is whatever the agent picks (here
wireguard-go: these machines have no WireGuard module).  `--kernel-guest`
measures the kernel backend instead, with the same runs inside a QEMU guest
(bench/mesh_kernel.py); its rows go under "kernel" in the same file, and
each mode keeps the other's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests._netns import Lan, agent_config, clanctl, clanctl_json, netns_missing_reason, sh

RESULTS = Path(__file__).resolve().parent / "results" / "mesh.json"
PY = sys.executable
LOSS_MOD = 10  # drop one frame in LOSS_MOD, each way: 10 %


def _poll(pred, timeout: float, every: float = 0.05) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(every)
    return None


# One echo request waits at most this long.  A whole second (Lan.ping's -W1)
# would quantise both times to steps of about a second; 0.2 s bounds the
# error of each measurement to about 0.2 s.
PING_WAIT = "0.2"


def _ping(lan: Lan, i: int, addr: str) -> bool:
    r = subprocess.run(
        ["ip", "netns", "exec", lan.hosts[i], "ping", "-c1", f"-W{PING_WAIT}", addr],
        capture_output=True,
    )
    return r.returncode == 0


class Pair:
    """m1 founds a clan, m2 joins it; both on two LANs (a and b).

    The class attributes and the `ctl`/`cli` methods are what
    bench/mesh_kernel.py changes for its run inside a QEMU guest (slower
    starts, in-process CLI calls, the `lan` gossip profile)."""

    AGENT = [PY, "-m", "clanagent.cli.agent_main", "run", "--config"]  # + the config path
    PROFILE = "local"  # the gossip profile of both agents
    START_TIMEOUT = 20.0  # m1's control socket
    PING_TIMEOUT = 30.0  # m2's first ping (and again after restarting m1)
    SETTLE_TIMEOUT = 30.0

    def ctl(self, sock: Path, *args: str) -> str:
        return clanctl(sock, *args)

    def ctl_json(self, sock: Path, *args: str):
        return clanctl_json(sock, *args)

    def cli(self, *args: str) -> str:
        """`clanagent ARGS` (keygen, join): its stdout."""
        argv = [PY, "-m", "clanagent.cli.agent_main", *args]
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    def __init__(self, run: int) -> None:
        self.lan_a = Lan(2, prefix=f"cb{run}", subnet="10.91.0", tag="a")
        self.lan_b = Lan(2, subnet="10.92.0", share_hosts_with=self.lan_a, tag="b")
        self.work = Path(tempfile.mkdtemp(prefix="clanagent-bench-mesh-"))
        self.homes = [self.work / "m1", self.work / "m2"]
        self.socks = [h / "control.sock" for h in self.homes]
        self.run = run
        self.overlay_m1 = ""
        self.lossy: list[str] = []  # the switch namespaces with a loss table
        self.agent_up_s: float | None = None

    def start(self) -> float | None:
        """Both agents up; the seconds from starting m2 to its first ping of m1
        (`agent_up_s`: to its control socket, the Python start-up)."""
        self.lan_a.setup()
        self.lan_b.setup()
        for i, h in enumerate(self.homes):
            h.mkdir()
            agent_config(h, f"m{i + 1}", f"cb{self.run}w{i + 1}", profile=self.PROFILE)
        argv = self.AGENT
        self.lan_a.spawn(0, [*argv, str(self.homes[0] / "agent.toml")], self.homes[0] / "agent.log")
        if _poll(self.socks[0].exists, self.START_TIMEOUT) is None:
            raise RuntimeError("m1 did not start")
        admin = self.work / "admin.key"
        self.ctl(
            self.socks[0], "clan", "init", "bench", "--admin-key", str(admin), "--machine", "m1"
        )
        out = self.cli("keygen", "--state-dir", str(self.homes[1] / "state"))
        key = next(ln.split()[-1] for ln in out.splitlines() if ln.startswith("machine key"))
        out = self.ctl(
            self.socks[0], "machine", "add", "m2", "--key", key, "--admin-key", str(admin), "--yes"
        )
        token = next(
            ln.split()[-1] for ln in out.splitlines() if ln.strip().startswith("clanagent join")
        )
        self.cli("join", token, "--state-dir", str(self.homes[1] / "state"))
        self.overlay_m1 = self.ctl_json(self.socks[0], "path", "m1")["overlay6"]
        t0 = time.monotonic()
        self.lan_a.spawn(1, [*argv, str(self.homes[1] / "agent.toml")], self.homes[1] / "agent.log")
        up = _poll(self.socks[1].exists, self.PING_TIMEOUT, every=0.02)
        self.agent_up_s = None if up is None else round(up, 3)
        left = self.PING_TIMEOUT - (time.monotonic() - t0)
        if _poll(lambda: _ping(self.lan_a, 1, self.overlay_m1), left, every=0.02) is None:
            return None
        return round(time.monotonic() - t0, 3)

    def restart_m1(self) -> bool:
        """Stop m1's agent and start it again (it republishes its endpoints
        record); True once m2 pings m1 again."""
        proc = self.lan_a.procs[0]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        argv = self.AGENT
        log = self.homes[0] / "agent.restarted.log"
        self.lan_a.procs[0] = self.lan_a.spawn(0, [*argv, str(self.homes[0] / "agent.toml")], log)
        self.lan_a.procs.pop()
        ok = _poll(lambda: _ping(self.lan_a, 1, self.overlay_m1), self.PING_TIMEOUT, every=0.1)
        return ok is not None

    def path(self, i: int) -> dict:
        """Agent i's view of its path to the other machine."""
        return self.ctl_json(self.socks[i], "path", "m2" if i == 0 else "m1")

    def settled(self, timeout: float | None = None, other_lan: bool = True) -> str | None:
        """Wait until m2 can fail over: a path in use with an RTT, and (with
        `other_lan`) a path on the other LAN with the peer's WireGuard port,
        which only m1's endpoints record tells.  None, or what is missing."""
        why = ["m2 has no path to m1"]

        def ready() -> bool:
            info = self.path(1)
            chosen = (info.get("chosen") or {}).get("address")
            if chosen is None:
                return False
            rows = info["paths"]
            cur = next((r for r in rows if r["address"] == chosen), None)
            subnet = chosen.rsplit(".", 1)[0] + "."
            other = [r for r in rows if not r["address"].startswith(subnet)]
            if cur is None or (other_lan and not other):
                why[0] = "the second LAN was never discovered"
            elif other_lan and not any(r["port_wg"] for r in other):
                why[0] = "m1's WireGuard port is not known for the second LAN (no endpoints record)"
            elif cur["rtt_ms"] is None or info["mesh_stats"].get("probes_answered", 0) < 3:
                why[0] = "the path in use was not probed yet"
            else:
                return True
            return False

        timeout = self.SETTLE_TIMEOUT if timeout is None else timeout
        return None if _poll(ready, timeout, every=0.2) is not None else why[0]

    def lans(self) -> tuple[Lan, Lan]:
        """(the LAN m2's tunnel to m1 uses, the other one)."""
        addr = (self.path(1).get("chosen") or {}).get("address") or ""
        a, b = self.lan_a, self.lan_b
        return (a, b) if addr.startswith(a.subnet) else (b, a)

    def backend(self) -> str:
        st = self.ctl_json(self.socks[1], "status")
        cap = next((c for c in st["capabilities"] if c["name"] == "mesh.wireguard"), None)
        return "?" if cap is None or not cap["available"] else cap["reason"].split()[0]

    def add_loss(self, lan: Lan) -> None:
        ns = lan.sw
        sh("ip", "netns", "exec", ns, "nft", "add", "table", "bridge", "loss")
        self.lossy.append(ns)
        sh(
            "ip", "netns", "exec", ns, "nft", "add", "chain", "bridge", "loss", "lossy",
            "{ type filter hook forward priority 0; }",
        )  # fmt: skip
        sh(
            "ip", "netns", "exec", ns, "nft", "add", "rule", "bridge", "loss", "lossy",
            "ether", "type", "ip", "numgen", "random", "mod", str(LOSS_MOD), "==", "0",
            "counter", "drop",
        )  # fmt: skip

    def loss_counters(self) -> tuple[int, int]:
        """(frames the loss rules dropped, frames that entered the switches: any kind)."""
        dropped = forwarded = 0
        for ns in self.lossy:
            out = sh("ip", "netns", "exec", ns, "nft", "-j", "list", "table", "bridge", "loss")
            for item in json.loads(out.stdout)["nftables"]:
                for expr in item.get("rule", {}).get("expr", []):
                    if "counter" in expr:
                        dropped += expr["counter"]["packets"]
            stats = sh("ip", "-n", ns, "-j", "-s", "link", "show", "type", "veth").stdout
            for link in json.loads(stats):
                forwarded += link["stats64"]["rx"]["packets"]
        return dropped, forwarded

    def close(self) -> None:
        for ns in self.lossy:
            sh("ip", "netns", "exec", ns, "nft", "delete", "table", "bridge", "loss", check=False)
        self.lan_a.teardown()
        self.lan_b.teardown()  # the agents' logs stay in self.work


def _ping_cost(pair: Pair) -> float:
    """The median wall time of one successful `_ping` call (process start-ups
    included): how finely the polling can see the moment pings flow again."""
    took = []
    for _ in range(3):
        t = time.monotonic()
        _ping(pair.lan_a, 1, pair.overlay_m1)
        took.append(time.monotonic() - t)
    return round(statistics.median(took), 3)


def one_run(run: int, pair_class: type[Pair] = Pair) -> dict:
    pair = pair_class(run)
    row: dict = {"run": run, "first_ping_s": None, "failover_s": None}
    try:
        row["first_ping_s"] = pair.start()
        row["agent_up_s"] = pair.agent_up_s
        missing = (
            None
            if row["first_ping_s"] is not None
            else f"no first ping within {pair.PING_TIMEOUT:.0f} s"
        )
        if missing is None:
            missing = pair.settled()
        if missing is not None:
            # Seen on main: m2 sometimes never gets m1's endpoints record (it
            # logs "record belongs to another clan" while joining), so it has
            # no WireGuard endpoint of its own for m1: no first ping when m2
            # is the initiator, no failover of its own.  A restarted m1
            # republishes the record; the failover is then measured as usual.
            row["m1_restarted"] = missing
            if not pair.restart_m1():
                row["error"] = f"{missing}; no ping after restarting m1"
                return row
            missing = pair.settled()
            if missing:
                row["error"] = f"{missing} (after restarting m1)"
                return row
        row["backend"] = pair.backend()
        used, other = pair.lans()
        t1 = time.monotonic()
        used.cut(1, up=False)  # pull m2's cable on the LAN its tunnel uses
        back = _poll(lambda: _ping(pair.lan_a, 1, pair.overlay_m1), 60, every=0.02)
        if back is not None:
            row["failover_s"] = round(time.monotonic() - t1, 3)
            row["from"] = used.subnet
            row["to"] = other.subnet
            row["ping_call_s"] = _ping_cost(pair)
        return row
    finally:
        pair.close()


_STATS = ("paths_failed", "paths_suspected", "failures_vetoed", "probes_sent", "probes_answered")


def lossy_run(seconds: float, run: int = 9) -> dict:
    """Both LANs up, the one in use losing 10 % each way: count failovers."""
    pair = Pair(run)
    row: dict = {"seconds": seconds, "loss_each_way": 1 / LOSS_MOD, "false_failovers": None}
    try:
        if pair.start() is None and not pair.restart_m1():  # see one_run
            row["error"] = "no first ping"
            return row
        row["backend"] = pair.backend()
        missing = pair.settled(other_lan=False)
        if missing:
            row["error"] = missing
            return row
        before = [pair.path(i)["mesh_stats"] for i in (0, 1)]
        chosen = [(pair.path(i).get("chosen") or {}).get("address") for i in (0, 1)]
        row["paths_in_use"] = {"m1": chosen[0], "m2": chosen[1]}
        pair.add_loss(pair.lan_a)  # every path is lossy: moving is never a cure
        pair.add_loss(pair.lan_b)
        changes = [0, 0]
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            time.sleep(1.0)
            for i in (0, 1):
                now = (pair.path(i).get("chosen") or {}).get("address")
                if now != chosen[i]:
                    changes[i] += 1
                    chosen[i] = now
        after = [pair.path(i)["mesh_stats"] for i in (0, 1)]
        dropped, forwarded = pair.loss_counters()
        delta = [{k: after[i].get(k, 0) - before[i].get(k, 0) for k in _STATS} for i in (0, 1)]
        row["per_agent"] = {f"m{i + 1}": {**delta[i], "path_changes": changes[i]} for i in (0, 1)}
        row["false_failovers"] = sum(d["paths_failed"] for d in delta)
        row["path_changes"] = sum(changes)
        sent = sum(d["probes_sent"] for d in delta)
        answered = sum(d["probes_answered"] for d in delta)
        row["probes_lost"] = round(1 - answered / sent, 3) if sent else None
        row["frames_dropped"] = dropped
        row["frames_in"] = forwarded
        return row
    finally:
        pair.close()


def _table(result: dict) -> None:
    rows = result["rows"]
    runs = result["runs"]
    names = {"userspace": "wireguard-go", "kernel": "kernel WireGuard"}
    label = f"{names.get(result['backend'], result['backend'])}, namespaces"
    print()
    print(f"{'backend':<30} {'metric':<14} {'median':>8} {'min':>8} {'max':>8}  runs")
    for name in ("first_ping_s", "failover_s"):
        vals = [r[name] for r in rows if r[name] is not None]
        if vals:
            print(
                f"{label:<30} {name:<14} {statistics.median(vals):>8.3f} {min(vals):>8.3f} "
                f"{max(vals):>8.3f}  {len(vals)}/{runs}"
            )
        else:
            print(f"{label:<30} {name:<14} {'-':>8} {'-':>8} {'-':>8}  0/{runs}")
    k = result.get("kernel")
    if not k:
        print(f"{'kernel WireGuard, QEMU guest':<30} (not measured yet: --kernel-guest)")
    for name in ("first_ping_s", "failover_s") if k else ():
        vals = [r[name] for r in k["rows"] if r[name] is not None]
        cells = (
            f"{statistics.median(vals):>8.3f} {min(vals):>8.3f} {max(vals):>8.3f}"
            if vals
            else f"{'-':>8} {'-':>8} {'-':>8}"
        )
        print(f"{'kernel WireGuard, QEMU guest':<30} {name:<14} {cells}  {len(vals)}/{k['runs']}")
    if k:
        print(f"  (kernel: {k['date']}, {k['label']})")
    lossy = result.get("lossy")
    if lossy:
        print()
        if lossy.get("false_failovers") is None:
            print(f"lossy link: not measured ({lossy.get('error')})")
        else:
            print(
                f"lossy link ({lossy['loss_each_way']:.0%} each way on both LANs, "
                f"{lossy['seconds']:.0f} s): false failovers {lossy['false_failovers']}, "
                f"path changes {lossy['path_changes']}, probes lost {lossy['probes_lost']:.1%}, "
                f"frames dropped {lossy['frames_dropped']} of {lossy['frames_in']} in"
            )
            for name, d in lossy["per_agent"].items():
                print(
                    f"  {name}: suspected {d['paths_suspected']}, vetoed by WireGuard "
                    f"{d['failures_vetoed']}, failed {d['paths_failed']}, "
                    f"probes {d['probes_answered']}/{d['probes_sent']} answered"
                )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mesh")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="one run, a 30 s lossy run")
    p.add_argument(
        "--lossy-seconds",
        type=float,
        default=180.0,
        help="how long the lossy link runs (0: skip it)",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--kernel-guest",
        action="store_true",
        help="measure the kernel backend inside a QEMU guest instead (bench/mesh_kernel.py)",
    )
    p.add_argument(
        "--guest-budget",
        type=float,
        default=900.0,
        help="--kernel-guest: no run starts after this many guest seconds",
    )
    args = p.parse_args(argv)
    if args.kernel_guest:
        from bench.mesh_kernel import host_main

        return host_main(1 if args.quick else args.runs, args.guest_budget, args.out)
    missing = netns_missing_reason() or (None if shutil.which("nft") else "needs nft on PATH")
    if missing:
        print(f"mesh benchmark skipped: {missing}")
        return 0
    runs = 1 if args.quick else args.runs
    lossy_seconds = min(args.lossy_seconds, 30.0) if args.quick else args.lossy_seconds
    rows = []
    # Runs that never got to the failover are retried (and counted as failed),
    # up to twice as many attempts: the medians need `runs` finished runs.
    r = 0
    while sum(1 for x in rows if x["failover_s"] is not None) < runs and r < 2 * runs:
        row = one_run(r)
        rows.append(row)
        print(
            f"run {r}: first ping {row['first_ping_s']} s, failover {row['failover_s']} s"
            + (f" (m1 restarted: {row['m1_restarted']})" if row.get("m1_restarted") else "")
            + (f" ({row['error']})" if row.get("error") else ""),
            flush=True,
        )
        r += 1
    firsts = [r["first_ping_s"] for r in rows if r["first_ping_s"] is not None]
    fails = [r["failover_s"] for r in rows if r["failover_s"] is not None]
    result = {
        "backend": next((r["backend"] for r in rows if r.get("backend")), "?"),
        "first_ping_s": round(statistics.median(firsts), 3) if firsts else None,
        "failover_s": round(statistics.median(fails), 3) if fails else None,
        "runs": len(rows),
        "failed_runs": sum(1 for r in rows if r["first_ping_s"] is None or r["failover_s"] is None),
        "rows": rows,
    }
    if lossy_seconds > 0:
        print(f"lossy link for {lossy_seconds:.0f} s ...", flush=True)
        for attempt in range(3):  # a start that never pinged is no lossy run
            result["lossy"] = lossy_run(lossy_seconds, run=9 - attempt)
            if result["lossy"].get("error") != "no first ping":
                break
    if args.out.exists():  # the kernel backend's rows (--kernel-guest) stay
        kernel = json.loads(args.out.read_text()).get("kernel")
        if kernel:
            result["kernel"] = kernel
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    _table(result)
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
