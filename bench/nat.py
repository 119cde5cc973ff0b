"""The NAT traversal benchmark: first overlay ping between two machines behind
NATs, and relay throughput against a direct path.

Owns: real agents in network namespaces with nftables NAT routers
(`tests/_nat_netns.py`: sites a and b behind routers, p a public member,
nobody typing an address but p's), timing per NAT kind

  - `first_ping_s`: from starting a's and b's agents (p already runs the
    clan) to the first ping from a to b's overlay address that gets through,
    and `path`: the kind of a's chosen path to b then and a few seconds
    later -- `eim` (endpoint-independent NATs: punched, reflexive),
    `firewall` (public addresses behind stateful firewalls: punched),
    `symmetric` (b behind `masquerade random`: relayed by p);
  - `throughput_mbit`: iperf3 over the overlay (TCP, a -> b, `--seconds`)
    on the punched path (`eim`) and on the relayed one (`symmetric`), same
    veths, and their ratio: the relay is held to its per-pair limit (4 MiB/s,
    bursts of 1 MiB), which is what that ratio mostly shows, so
    `symmetric_unlimited` raises p's limits (`relay_pair_mibps` and
    `relay_max_*`) to measure the relay's own cost;

and `bench/results/nat.json` with every run and the medians.  Must never:
report a run that did not finish as a time (it is counted as failed), or
leave a namespace behind.

Needs root, ip, ping, nft, wireguard-go and iperf3 (`apt-get install -y
iperf3`); otherwise it says what is missing and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "nat.json"
KINDS = {
    # name: (site a's NAT, site b's NAT, p's tags, the path expected, p's [mesh] extra)
    "eim": ("eim", "eim", "server", "reflexive", ""),
    "firewall": ("firewall", "firewall", "server", "reflexive", ""),
    "symmetric": ("eim", "symmetric", "server,relay", "relay", ""),
    # the relay's own cost: its limits raised far above what the veths carry
    "symmetric_unlimited": (
        "eim",
        "symmetric",
        "server,relay",
        "relay",
        "relay_pair_mibps = 4096.0\nrelay_max_mibps = 4096.0\nrelay_max_pps = 4000000.0\n",
    ),
}
THROUGHPUT = ("eim", "symmetric", "symmetric_unlimited")


def _poll(pred, timeout: float, every: float = 0.1) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(every)
    return None


def missing() -> str | None:
    from tests._netns import netns_missing_reason

    for tool in ("nft", "iperf3"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install -y {'nftables' if tool == 'nft' else tool})"
    return netns_missing_reason()


def iperf(net, overlay_b: str, seconds: int) -> float | None:
    """Mbit/s a -> b over the overlay (TCP), None when iperf3 failed."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", net.hosts[1], "iperf3", "-s", "-1", "-p", "5299"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(0.5)
        r = subprocess.run(
            ["ip", "netns", "exec", net.hosts[0], "iperf3", "-c", overlay_b, "-p", "5299",
             "-t", str(seconds), "-J"],
            capture_output=True, text=True, timeout=seconds + 30,
        )  # fmt: skip
        if r.returncode != 0:
            return None
        return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
    except (subprocess.TimeoutExpired, KeyError, ValueError):
        return None
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


def one_run(name: str, k: int, seconds: int, throughput: bool) -> dict:
    from tests._nat_netns import Clan, NatNet

    mode_a, mode_b, p_tags, want, extra = KINDS[name]
    net = NatNet(mode_a, mode_b, prefix=f"bn{k}{time.monotonic_ns() % 1000}")
    row: dict = {"kind": name, "ok": False}
    tmp = Path(tempfile.mkdtemp(prefix="clanagent-bench-nat-"))
    try:
        net.setup()
        clan = Clan(net, tmp, p_tags=p_tags, p_mesh_extra=extra)
        ov_b = clan.path("p", "b")["overlay6"]
        took = _poll(lambda: net.ping(0, ov_b), 180, every=0.05)
        if took is None:
            row["error"] = "no ping within 180 s"
            return row
        row["first_ping_s"] = round(time.monotonic() - clan.ab_started, 2)
        row["path_at_first_ping"] = (clan.path("a", "b")["chosen"] or {}).get("kind")
        # the path it settles on (a punch window may hold it for its 12 s)
        settled = _poll(
            lambda: (
                ((clan.path("a", "b")["chosen"] or {}).get("kind") == want) and net.ping(0, ov_b)
            ),
            90,
            every=1.0,
        )
        row["path"] = (clan.path("a", "b")["chosen"] or {}).get("kind")
        if settled is None:
            row["error"] = f"path did not settle on {want} (is {row['path']})"
            return row
        if throughput:
            row["throughput_mbit"] = iperf(net, ov_b, seconds)
        row["ok"] = True
        return row
    finally:
        net.teardown()
        shutil.rmtree(tmp, ignore_errors=True)


def _median(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get("ok") and r.get(key) is not None]
    return round(statistics.median(vals), 2) if vals else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.nat")
    p.add_argument("--quick", action="store_true", help="one run per kind, 3 s of iperf3")
    p.add_argument("--runs", type=int, default=2, help="runs per NAT kind")
    p.add_argument("--seconds", type=int, default=10, help="iperf3 duration")
    p.add_argument("--only", choices=sorted(KINDS), action="append")
    args = p.parse_args(argv)
    why = missing()
    if why is not None:
        print(f"nat benchmark skipped: {why}")
        return 0
    runs, seconds = (1, 3) if args.quick else (args.runs, args.seconds)
    kinds = args.only or list(KINDS)
    rows: list[dict] = []
    for name in kinds:
        for k in range(runs):
            throughput = name in THROUGHPUT
            row = one_run(name, k, seconds, throughput)
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = {}
    for name in kinds:
        mine = [r for r in rows if r["kind"] == name]
        summary[name] = {
            "runs": len(mine),
            "failed": sum(not r["ok"] for r in mine),
            "first_ping_s": _median(mine, "first_ping_s"),
            "path": KINDS[name][3],
            "throughput_mbit": _median(mine, "throughput_mbit"),
        }
    direct = summary.get("eim", {}).get("throughput_mbit")

    def ratio(name: str) -> float | None:
        relayed = summary.get(name, {}).get("throughput_mbit")
        return round(relayed / direct, 3) if direct and relayed else None

    out = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": rows,
        "summary": summary,
        "relay_over_direct": ratio("symmetric"),
        "relay_unlimited_over_direct": ratio("symmetric_unlimited"),
        "note": "symmetric: the relay's default per-pair limit, 4 MiB/s (33.6 Mbit/s) "
        "with bursts of 1 MiB; symmetric_unlimited: limits raised to 4 GiB/s",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print()
    print(f"{'NAT kind':<20} {'path':<10} {'first ping':>11} {'iperf3 a->b':>12}  failed")
    for name, s in summary.items():
        fp = "-" if s["first_ping_s"] is None else f"{s['first_ping_s']:.1f} s"
        tp = "-" if s["throughput_mbit"] is None else f"{s['throughput_mbit']:.0f} Mbit/s"
        print(f"{name:<20} {s['path']:<10} {fp:>11} {tp:>12}  {s['failed']}/{s['runs']}")
    print(f"relay / direct throughput: {out['relay_over_direct']} (default limit), "
          f"{out['relay_unlimited_over_direct']} (limits raised)")  # fmt: skip
    print(f"wrote {RESULTS}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
