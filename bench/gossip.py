"""The gossip benchmark: dissemination, detection, false positives, bandwidth.

Owns: the benchmark script (one simulated clan per size, phases run in a
fixed order on it), the result rows in `bench/results/gossip.json`, and the
printed table with the published anchors beside our numbers (see
`bench/README.md` for where the anchors come from).

Must never: change the protocol's config to look better than the LAN
defaults, or report a number it did not measure (a missing value is None).

Each size runs in its own child process (`python -m bench.gossip --one N`)
so that `peak_rss_mb` is that size's peak and not the largest run so far.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from clanagent.gossip.config import GossipConfig, push_pull_scale
from tests.sim.cluster import Cluster, peak_rss_mb
from tests.sim.network import Latency

__all__ = ["ANCHORS", "main", "run_size", "run_all"]

RESULTS = Path(__file__).resolve().parent / "results" / "gossip.json"

# Published reference points (bench/README.md explains each).
ANCHORS = {
    "serf_t9999_loss0_s": 2.2,  # Serf convergence simulator, 1000 nodes, fanout 3, 200 ms
    "serf_t9999_loss50_s": 4.4,
    "serf_max_kbit_per_node": 328.0,
    "memberlist_detect_s": 6.0,  # memberlist LAN defaults, stopped node
}
# What we aim for at 1000 nodes.
TARGETS = {
    "t100_loss0_s": 2.2,
    "t100_loss50_s": 4.4,
    "bytes_per_node_per_s": ANCHORS["serf_max_kbit_per_node"] * 1000 / 8,
    "detect_s": 6.0,
    "real_s_60_virtual_1000": 120.0,
}

ROW_KEYS = (
    "n",
    "loss",
    "phase",
    "t50_s",
    "t99_s",
    "t100_s",
    "reached_frac",
    "detect_s",
    "detect_max_s",
    "detect_runs_s",
    "false_positives",
    "suspicions",
    "suspect_events",
    "bytes_per_node_per_s",
    "virtual_s",
    "real_s",
    "peak_rss_mb",
    "join_s",
    "events_per_real_s",
)


def _row(n: int, loss: float, phase: str, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
    row.update(n=n, loss=loss, phase=phase, **values)
    row["mtu"] = _MTU
    row["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return row


class _Phase:
    """Times one phase in real and virtual seconds and counts driver events."""

    def __init__(self, c: Cluster) -> None:
        self.c = c

    def __enter__(self) -> _Phase:
        self.real0 = time.perf_counter()
        self.virt0 = self.c.now
        self.ev0 = self.c.driver.events
        return self

    def __exit__(self, *exc: object) -> None:
        self.real_s = time.perf_counter() - self.real0
        self.virtual_s = self.c.now - self.virt0
        ev = self.c.driver.events - self.ev0
        self.rate = ev / self.real_s if self.real_s > 0 else None

    def fields(self) -> dict[str, Any]:
        return {
            "real_s": round(self.real_s, 2),
            "virtual_s": round(self.virtual_s, 2),
            "events_per_real_s": None if self.rate is None else round(self.rate),
        }


def _spread(c: Cluster, n: int, loss: float, timeout: float, tag: str) -> dict[str, Any]:
    c.set_loss(loss)
    rec = c.publish(1, "bench", f"{tag}-{loss}", {"payload": "x" * 64})
    c.run_until_true(lambda: len(c.holders(rec)) == len(c.live()), timeout, check_every=0.05)
    reached = len(c.holders(rec)) / len(c.live())
    c.set_loss(0.0)
    r3 = lambda v: None if v is None else round(v, 3)  # noqa: E731
    return {
        "reached_frac": round(reached, 4),
        "t50_s": r3(c.time_to_fraction(rec, 0.5)),
        "t99_s": r3(c.time_to_fraction(rec, 0.99)),
        "t100_s": r3(c.time_to_fraction(rec, 1.0)),
    }


_MTU: int | None = None


def run_size(
    n: int, *, quick: bool = False, seed: int = 1, mtu: int | None = None
) -> list[dict[str, Any]]:
    """All phases on one clan of `n` nodes; returns one row per phase."""
    global _MTU
    _MTU = mtu
    rows: list[dict[str, Any]] = []
    # The steady window spans two whole push/pull intervals (180 s each at
    # 1000 nodes): shorter, it can miss the full-state exchanges, which are
    # most of a big clan's steady bytes (they grow with N).  It starts after
    # three intervals: the clan joined at one instant, and its exchanges,
    # first staggered within the plain 30 s, take a few jittered intervals to
    # spread over the stretched one; measured earlier, a window holds one
    # exchange per node or two, or part of one, depending on the phase.
    lan = GossipConfig.lan()
    interval = push_pull_scale(lan.push_pull_interval, n)
    window = 10.0 if quick else max(30.0, 2 * interval)
    # (The alive messages of the join are retransmitted for a while too.)
    settle = 5.0 if quick else max(30.0, 3 * interval)
    fp_duration = 20.0 if quick else 60.0
    c0 = time.perf_counter()
    c = Cluster(
        n,
        GossipConfig.lan(),
        seed=seed,
        latency=Latency.lan(),
        mtu=mtu,
        record_alive=False,  # N*N join events are not needed and cost memory
    )
    with _Phase(c) as ph:
        converged = c.wait_converged(timeout=120.0, check_every=0.5)
    join_s = round(ph.virtual_s, 2) if converged else None
    rows.append(
        _row(
            n,
            0.0,
            "join",
            join_s=join_s,
            **{**ph.fields(), "real_s": round(time.perf_counter() - c0, 2)},
        )
    )
    _log(rows[-1])

    with _Phase(c) as ph:
        c.run_for(settle)
        bw = c.bandwidth(window)
    rows.append(_row(n, 0.0, "steady", bytes_per_node_per_s=round(bw["mean"]), **ph.fields()))
    _log(rows[-1])

    with _Phase(c) as ph:
        spread = _spread(c, n, 0.0, 30.0, "loss0")
    rows.append(_row(n, 0.0, "spread", **spread, **ph.fields()))
    _log(rows[-1])

    # One victim at a time, each until every other member marked it dead.
    victims = 3 if n >= 100 else 1
    rows.append(_detect(c, n, 0.0, list(range(n - 1, n - 1 - victims, -1))))
    _log(rows[-1])

    for loss in (0.05, 0.10):
        c.wait_converged(timeout=30.0)
        start = c.now
        with _Phase(c) as ph:
            c.set_loss(loss)
            c.run_for(fp_duration)
            c.set_loss(0.0)
        rows.append(
            _row(
                n,
                loss,
                "false_positives",
                false_positives=len(c.false_positives(since=start)),
                suspicions=c.suspicions(since=start),
                suspect_events=c.suspect_events(since=start),
                **ph.fields(),
            )
        )
        _log(rows[-1])

    # Detection where suspicion is normal: 10 % of datagrams lost.
    c.wait_converged(timeout=30.0)
    first = n - 1 - victims
    rows.append(_detect(c, n, 0.10, list(range(first, first - victims, -1))))
    _log(rows[-1])

    # Last: half of all datagrams lost may cost members, which would spoil
    # any phase after it.
    c.wait_converged(timeout=30.0)
    with _Phase(c) as ph:
        spread = _spread(c, n, 0.5, 60.0, "loss50")
    rows.append(_row(n, 0.5, "spread", **spread, **ph.fields()))
    _log(rows[-1])
    return rows


def _detect(c: Cluster, n: int, loss: float, victims: list[int]) -> dict[str, Any]:
    """Crash each victim in turn (a random moment within a probe interval
    after the last was detected) at `loss`; the median and the slowest."""
    times: list[float | None] = []
    rng = random.Random(f"detect-{n}-{loss}")
    with _Phase(c) as ph:
        c.set_loss(loss)
        for victim in victims:
            c.run_for(rng.random())
            crashed_at = c.crash(victim)
            c.run_until_true(
                lambda v=victim, t=crashed_at: c.detection_time(v, t) is not None,
                90.0,
                check_every=0.05,
            )
            t = c.detection_time(victim, crashed_at)
            times.append(None if t is None else round(t, 3))
        c.set_loss(0.0)
    done = sorted(t for t in times if t is not None)
    median = done[len(done) // 2] if len(done) == len(times) and done else None
    return _row(
        n,
        loss,
        "detect",
        detect_s=median,
        detect_max_s=done[-1] if len(done) == len(times) and done else None,
        detect_runs_s=times,
        **ph.fields(),
    )


def _log(row: dict[str, Any]) -> None:
    shown = {k: v for k, v in row.items() if v is not None}
    print(json.dumps(shown), file=sys.stderr, flush=True)


def run_all(
    sizes: list[int], *, quick: bool = False, mtu: int | None = None
) -> list[dict[str, Any]]:
    """Each size in a child process; returns every row."""
    rows: list[dict[str, Any]] = []
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for n in sizes:
        cmd = [sys.executable, "-m", "bench.gossip", "--one", str(n)]
        if quick:
            cmd.append("--quick")
        if mtu is not None:
            cmd += ["--mtu", str(mtu)]
        proc = subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.PIPE, check=False)
        if proc.returncode != 0:
            print(f"gossip bench at n={n} failed (exit {proc.returncode})", file=sys.stderr)
            continue
        rows.extend(json.loads(proc.stdout))
    return rows


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}{unit}"
    return f"{v}{unit}"


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per size with every headline number and its anchor."""
    out = []
    for n in sorted({r["n"] for r in rows}):
        by = {(r["phase"], r["loss"]): r for r in rows if r["n"] == n}

        def get(phase: str, loss: float, key: str, by: dict = by) -> Any:
            return (by.get((phase, loss)) or {}).get(key)

        out.append(
            {
                "n": n,
                "join_s": get("join", 0.0, "join_s"),
                "t50_0": get("spread", 0.0, "t50_s"),
                "t99_0": get("spread", 0.0, "t99_s"),
                "t100_0": get("spread", 0.0, "t100_s"),
                "t50_50": get("spread", 0.5, "t50_s"),
                "t99_50": get("spread", 0.5, "t99_s"),
                "t100_50": get("spread", 0.5, "t100_s"),
                "reached_50": get("spread", 0.5, "reached_frac"),
                "detect_s": get("detect", 0.0, "detect_s"),
                "detect_max": get("detect", 0.0, "detect_max_s"),
                "detect_10": get("detect", 0.10, "detect_s"),
                "detect_max_10": get("detect", 0.10, "detect_max_s"),
                "fp_5": get("false_positives", 0.05, "false_positives"),
                "fp_10": get("false_positives", 0.10, "false_positives"),
                "susp_10": get("false_positives", 0.10, "suspicions"),
                "bytes_s": get("steady", 0.0, "bytes_per_node_per_s"),
                "real_60s": get("false_positives", 0.10, "real_s"),
                "virt_fp": get("false_positives", 0.10, "virtual_s"),
                "total_real_s": round(sum(r["real_s"] or 0 for r in rows if r["n"] == n), 1),
                "peak_rss_mb": max(r["peak_rss_mb"] or 0 for r in rows if r["n"] == n),
            }
        )
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = [
        ("n", "n"),
        ("join_s", "join s"),
        ("t50_0", "t50"),
        ("t99_0", "t99"),
        ("t100_0", "t100"),
        ("t50_50", "t50@50%"),
        ("t99_50", "t99@50%"),
        ("t100_50", "t100@50%"),
        ("reached_50", "held@50%"),
        ("detect_s", "detect"),
        ("detect_max", "max"),
        ("detect_10", "detect@10%"),
        ("detect_max_10", "max@10%"),
        ("fp_5", "FP@5%"),
        ("fp_10", "FP@10%"),
        ("susp_10", "susp@10%"),
        ("bytes_s", "B/node/s"),
        ("real_60s", "real s (10% run)"),
        ("total_real_s", "real s"),
        ("peak_rss_mb", "RSS MB"),
    ]
    table = [[h for _, h in cols]]
    for s in summarize(rows):
        table.append([_fmt(s[k]) for k, _ in cols])
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    for r in table:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))
    a = ANCHORS
    print(
        f"anchors: Serf model, 1000 nodes, fanout 3 / 200 ms: 99.99% in {a['serf_t9999_loss0_s']} s "
        f"(0% loss), {a['serf_t9999_loss50_s']} s (50% loss), <= {a['serf_max_kbit_per_node']:.0f} "
        f"kbit/s = {TARGETS['bytes_per_node_per_s']:.0f} B/s per node; memberlist LAN detects a "
        f"stopped node in ~{a['memberlist_detect_s']} s"
    )
    print(
        "times are virtual seconds after publication / crash; 'real s (10% run)' is the wall "
        "time of the 60-virtual-second run at 10% loss (target at 1000 nodes: < 120 s)"
    )
    for line in check_targets(rows):
        print(line)


def check_targets(rows: list[dict[str, Any]]) -> list[str]:
    """One "PASS/MISS target: ours" line per target, for the 1000-node run."""
    s = next((x for x in summarize(rows) if x["n"] == 1000), None)
    if s is None:
        return []
    t = TARGETS

    def line(ok: bool | None, what: str, ours: Any) -> str:
        mark = "PASS" if ok else ("MISS" if ok is not None else "----")
        return f"  [{mark}] {what}: {_fmt(ours)}"

    def below(v: Any, limit: float) -> bool | None:
        return None if v is None else v < limit

    return [
        "targets at n=1000:",
        line(
            below(s["t100_0"], t["t100_loss0_s"]),
            "100% hold a record < 2.2 s at 0% loss",
            s["t100_0"],
        ),
        line(
            below(s["t100_50"], t["t100_loss50_s"]),
            "100% hold a record < 4.4 s at 50% loss",
            s["t100_50"],
        ),
        line(
            below(s["bytes_s"], t["bytes_per_node_per_s"]),
            "steady bytes/node/s < 41000",
            s["bytes_s"],
        ),
        line(
            below(s["detect_max"], t["detect_s"]),
            "every member marks a stopped node dead < 6 s (slowest of 3)",
            s["detect_max"],
        ),
        line(
            below(s["detect_max_10"], t["detect_s"]),
            "... and at 10% loss (slowest of 3)",
            s["detect_max_10"],
        ),
        line(
            s["fp_10"] == 0 if s["fp_10"] is not None else None,
            "no false deaths at 10% loss",
            s["fp_10"],
        ),
        line(
            below(s["real_60s"], t["real_s_60_virtual_1000"]),
            "60 virtual s (10% loss) < 120 real s",
            s["real_60s"],
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gossip")
    p.add_argument("--one", type=int, help="run one size in this process; rows as JSON on stdout")
    p.add_argument("--quick", action="store_true", help="sizes 10 and 100, shorter phases")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--mtu",
        type=int,
        default=None,
        help="lose datagrams per IP fragment of this size (default: whole datagrams)",
    )
    p.add_argument(
        "--profile", action="store_true", help="with --one: cProfile the run, top 25 to stderr"
    )
    args = p.parse_args(argv)
    if args.one is not None:
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            rows = prof.runcall(run_size, args.one, quick=args.quick, mtu=args.mtu)
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
        else:
            rows = run_size(args.one, quick=args.quick, mtu=args.mtu)
        json.dump(rows, sys.stdout)
        return 0
    sizes = args.sizes or ([10, 100] if args.quick else [10, 100, 1000])
    rows = run_all(sizes, quick=args.quick, mtu=args.mtu)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print_table(rows)
    print(f"rows written to {args.out}")
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
