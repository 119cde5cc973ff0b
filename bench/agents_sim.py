"""The whole-agent simulator benchmark: what N whole agents cost at steady state.

Owns: the benchmark script over `tests/sim/agents.py` (N whole agents --
gossip node, store, inventory, record checks and every service the
simulator runs -- on a virtual clock and an in-memory network), the result
rows in `bench/results/agents_sim.json`, and the printed table.

Must never: report a number it did not measure (a missing value is None),
or change a part's settings to look better than the agent's defaults (the
`lan` gossip profile, the services' own intervals).

Each size runs in its own child process (`python -m bench.agents_sim --one
N`) so that `peak_rss_mb` is that size's peak. Phases, in this order:

| phase | what is measured |
| --- | --- |
| join | `join_s`: all N agents start at t=0 through one seed, until every agent sees every other alive |
| found | `found_s`: the admin's genesis (every machine, one service with a shared secret, one VM on n5) from n0 until it arrived in every store |
| secret | `secret_s`: from the genesis until the generated secret's record arrived in every store |
| early | right after the secret arrived everywhere: `early_bytes_per_node_per_s` (mean, p50, max over agents) sent over 30 virtual seconds, and `early_published_per_s` by record kind |
| steady | the same, `settle_s` later (3 anti-entropy intervals, `push_pull_scale`), over one whole topology refresh period (`topology.refresh_for(N)`: 300 s up to 30 machines, 10 s per machine beyond, at most 10 000 s; every machine republishes its view once in it): `steady_bytes_per_node_per_s`, `steady_published_per_s`. With `--amortized` (the default from N=500, where a whole period is hours of simulation): a `base` window of 300 s rounded up to whole push-pull intervals (360 s at 1000) with no refresh in it, then one refresh `wave` (every machine's view refreshed at a random moment within min(10 % of the period, 100 s), the window running 5 push-pull intervals past it, rounded up to whole intervals, and checked complete: every agent holds every refreshed view), and `steady` = base + (wave - base) x wave window / refresh period (`steady_method`) |
| (both) | `*_bytes_by_message`: the same bytes split by gossip message type (ping, ack, push_pull, record, ae_request, ae_reply, ...) |
| edit | `edit_s`: an inventory edit from n1 until it arrived in every store |
| detect | `detect_s`: a crashed agent until every other agent marked it dead |

Times are virtual seconds except `real_s` (wall clock, the whole size).
Agents share decoded records (`shared_record_decoding`): bodies are
read-only, so no decision changes, and N agents in one process do not each
hold a copy of every record.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nacl.signing
import trio

from clanagent.gossip.config import push_pull_scale
from clanagent.topology import refresh_for
from tests.sim import agents as simagents
from tests.sim.agents import AgentSim, run_sim

__all__ = ["main", "run_size"]

RESULTS = Path(__file__).resolve().parent / "results" / "agents_sim.json"
ADMIN = nacl.signing.SigningKey(bytes([7]) * 32)
SETTLE_INTERVALS = 3  # anti-entropy intervals between the early and the steady window


def _message_bytes(into: dict[str, int]) -> Any:
    """A SimNet tap adding each datagram's bytes to `into` by gossip message type."""
    import msgpack

    from clanagent.gossip.node import MsgType

    def tap(src: str, dst: str, data: bytes) -> None:
        try:
            _, items = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception:  # noqa: BLE001 - a probe: an odd datagram is counted as such
            into["undecodable"] = into.get("undecodable", 0) + len(data)
            return
        sizes = [(item[0], len(msgpack.packb(item))) for item in items]
        total = sum(n for _, n in sizes) or 1
        for mtype, n in sizes:
            try:
                name = MsgType(mtype).name.lower()
            except ValueError:
                name = str(mtype)
            # the datagram's framing shared out in proportion
            into[name] = into.get(name, 0) + round(len(data) * n / total)

    return tap


def _view_version(agent: Any) -> int:
    rec = agent.store.get(agent.identity.public_key, "topology", "")
    return 0 if rec is None else rec.version


def _r(v: float | None, nd: int = 2) -> float | None:
    return None if v is None else round(v, nd)


async def _measure(
    n: int,
    workdir: Path,
    settle: float | None,
    window: float,
    steady_window: float,
    timeout: float,
    version_floor: bool = True,
    amortized: bool = False,
) -> dict[str, Any]:
    row: dict[str, Any] = {"n": n, "version_floor": version_floor}
    sim = AgentSim(
        n,
        admins=[bytes(ADMIN.verify_key)],
        seed=1,
        workdir=workdir,
        service_starters=simagents.ALL_SERVICES,
        version_floor=version_floor,
    )
    row["services"] = [s.__name__ for s in simagents.ALL_SERVICES]
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        await sim.start(nursery)
        ok = await sim.wait_for(sim.converged, timeout)
        row["join_s"] = _r(trio.current_time() - t0) if ok else None

        doc = simagents.genesis_doc(sim)
        doc["services"]["backup"] = simagents.backup_service(["n1", "n2", "n3"], ["n4"])
        doc["machines"]["n5"]["tags"] = ["base", "vmhost"]
        doc["vms"]["web"] = simagents.vm_entry(workdir, ["vmhost"])
        g = simagents.sign_version(doc, [], "genesis", ADMIN)
        sim["n0"].submit_inventory(g)
        rec = sim["n0"].store.get(sim["n0"].identity.public_key, "inventory", g.hash.hex())
        await sim.wait_for(lambda: sim.all_hold(rec), timeout)
        row["found_s"] = _r(sim.spread(rec)["seconds"])

        def secret():
            return [r for r in sim["n1"].store.of_kind("secret") if r.key == "backup/repokey"]

        t_g = sim.published_at[rec.record_id]
        ok = await sim.wait_for(lambda: bool(secret()) and sim.all_hold(secret()[0]), timeout)
        row["secret_s"] = _r(trio.current_time() - t_g) if ok else None

        async def window_of(name: str, window: float) -> None:
            before = dict(sim.published)
            t_start = trio.current_time()
            by_type: dict[str, int] = {}
            tap = _message_bytes(by_type)
            sim.net.taps.append(tap)
            bw = await sim.bandwidth(window)
            sim.net.taps.remove(tap)
            live = len(sim.live())
            row[f"{name}_bytes_by_message"] = {
                k: round(v / window / live, 1)
                for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])
            }
            row[f"{name}_at_s"] = _r(t_start)
            row[f"{name}_window_s"] = _r(window)
            row[f"{name}_bytes_per_node_per_s"] = {k: round(v, 1) for k, v in bw.items()}
            row[f"{name}_published_per_s"] = {
                k: round((v - before.get(k, 0)) / window, 3)
                for k, v in sorted(sim.published.items())
                if v - before.get(k, 0)
            }

        await window_of("early", window)
        # Steady state: a few anti-entropy intervals later (a new origin's
        # watermark moves by anti-entropy claims, so the first exchanges
        # after founding still resend records).
        if settle is None:
            settle = SETTLE_INTERVALS * push_pull_scale(sim.config.push_pull_interval, n)
        row["settle_s"] = _r(settle)
        await trio.sleep(settle)
        if not amortized:
            await window_of("steady", steady_window)
            row["steady_method"] = "one whole refresh period"
        else:
            # Both windows span whole push-pull intervals: each agent starts
            # one exchange per interval on average.  (Before the intervals
            # were jittered the clan's exchanges ran in step, and a 300 s
            # window held one exchange per agent or two: at 1000, 479 or 957
            # B/s of push-pull in two runs.)
            interval = push_pull_scale(sim.config.push_pull_interval, n)
            await window_of("base", _whole(min(300.0, steady_window), interval))
            period = refresh_for(n)
            spread = min(0.1 * period, 100.0)
            t = trio.current_time()
            rng = random.Random(5)
            for a in sim.live():
                a.parts["topology"].policy.next_refresh = t + rng.uniform(0.0, spread)
            before = {a.addr: _view_version(a) for a in sim.live()}
            wave = _whole(spread + 5 * interval, interval)
            await window_of("wave", wave)
            row["wave_refreshed"] = sum(1 for a in sim.live() if _view_version(a) > before[a.addr])

            def held() -> float:
                live = sim.live()
                got = sum(
                    1
                    for a in live
                    for b in live
                    if (r := b.store.get(a.identity.public_key, "topology", "")) is not None
                    and r.version == _view_version(a)
                )
                return got / (len(live) ** 2)

            # anti-entropy carries the refreshes: measure on, one push-pull
            # interval at a time, until every agent holds every refreshed view
            burst = dict(row["wave_bytes_per_node_per_s"])
            tails = 0
            while held() < 1.0 and tails < 20:
                bw = await sim.bandwidth(interval)
                burst = {
                    k: (burst[k] * wave + bw[k] * interval) / (wave + interval)
                    for k in ("mean", "p50", "max")
                }
                wave += interval
                tails += 1
            row["wave_held"] = round(held(), 4)
            row["wave_window_s"] = _r(wave)
            row["wave_bytes_per_node_per_s"] = {k: round(v, 1) for k, v in burst.items()}
            base = row["base_bytes_per_node_per_s"]
            row["steady_bytes_per_node_per_s"] = {
                k: round(base[k] + (burst[k] - base[k]) * wave / period, 1)
                for k in ("mean", "p50", "max")
            }
            row["steady_method"] = (
                f"amortized: base + (wave - base) x {wave:.0f} s / {period:.0f} s"
            )
        row["records_held_n0"] = len(sim["n0"].store)
        sizes: dict[str, list[int]] = {}
        for rec in sim["n0"].store.records():
            sizes.setdefault(rec.kind, []).append(rec.size)
        row["record_bytes_by_kind_n0"] = {
            k: {"count": len(v), "mean": round(sum(v) / len(v))} for k, v in sorted(sizes.items())
        }

        doc2 = copy.deepcopy(g.doc)
        doc2["machines"]["n5"]["tags"] = ["base", "edited"]
        v2 = simagents.sign_version(doc2, [g.hash], "edit", ADMIN)
        sim["n1"].submit_inventory(v2)
        rec2 = sim["n1"].store.get(sim["n1"].identity.public_key, "inventory", v2.hash.hex())
        await sim.wait_for(lambda: sim.all_hold(rec2), timeout)
        row["edit_s"] = _r(sim.spread(rec2)["seconds"])

        victim = sim.addrs[-1]
        crashed = trio.current_time()
        sim[victim].crash()
        await sim.wait_for(lambda: sim.detection_time(victim, crashed) is not None, 120)
        row["detect_s"] = _r(sim.detection_time(victim, crashed))
        row["false_deaths"] = len(sim.false_deaths())
        row["virtual_s"] = _r(trio.current_time())
        row["peak_in_flight_mb"] = round(sim.net.stats["peak_in_flight_bytes"] / 2**20, 1)
        nursery.cancel_scope.cancel()
    return row


AMORTIZE_FROM = 500  # machines: a whole refresh period is then hours of simulation


def _whole(seconds: float, interval: float) -> float:
    """`seconds` rounded up to a whole number of `interval`s (at least one)."""
    return interval * max(1, math.ceil(seconds / interval - 1e-9))


def run_size(
    n: int, *, quick: bool = False, version_floor: bool = True, amortized: bool | None = None
) -> dict[str, Any]:
    wall0 = time.perf_counter()
    # The steady window spans a whole refresh period of the topology kind
    # (every machine republishes its links once in it): shorter, it would
    # measure whether a refresh wave happened to fall inside.
    settle, window, steady = (30.0, 10.0, 10.0) if quick else (None, 30.0, refresh_for(n))
    with (
        tempfile.TemporaryDirectory(prefix="agents-sim-") as tmp,
        simagents.shared_record_decoding(),
    ):
        if amortized is None:
            amortized = not quick and n >= AMORTIZE_FROM
        row = run_sim(
            lambda: _measure(
                n, Path(tmp), settle, window, steady, 120.0, version_floor, amortized and not quick
            )
        )
    row["real_s"] = round(time.perf_counter() - wall0, 1)
    row["peak_rss_mb"] = round(AgentSim.peak_rss_mb(), 1)
    return row


def run_all(
    sizes: list[int], *, quick: bool, version_floor: bool = True, amortized: bool | None = None
) -> list[dict[str, Any]]:
    rows = []
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    for n in sizes:
        cmd = [sys.executable, "-m", "bench.agents_sim", "--one", str(n)]
        if quick:
            cmd.append("--quick")
        if not version_floor:
            cmd.append("--no-version-floor")
        if amortized is not None:
            cmd.append("--amortized" if amortized else "--whole-period")
        proc = subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.PIPE, check=False)
        if proc.returncode != 0:
            print(f"n={n}: the run failed (exit {proc.returncode})", file=sys.stderr)
            continue
        row = json.loads(proc.stdout)
        print(_line(row), flush=True)
        rows.append(row)
    return rows


def _fmt(v: Any) -> str:
    return "-" if v is None else str(v)


def _line(row: dict[str, Any]) -> str:
    bw = row.get("steady_bytes_per_node_per_s") or {}
    early = row.get("early_bytes_per_node_per_s") or {}
    return (
        f"n={row['n']:5d} join {_fmt(row['join_s'])} s, found {_fmt(row['found_s'])} s, "
        f"secret {_fmt(row['secret_s'])} s, edit {_fmt(row['edit_s'])} s, "
        f"detect {_fmt(row['detect_s'])} s, early B/node/s mean {_fmt(early.get('mean'))}, "
        f"steady B/node/s mean {_fmt(bw.get('mean'))} "
        f"p50 {_fmt(bw.get('p50'))} max {_fmt(bw.get('max'))}; real {row['real_s']} s, "
        f"RSS {row['peak_rss_mb']} MB"
    )


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            check=False,
        )
    except OSError:
        return None
    return out.stdout.decode().strip() or None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.agents_sim")
    p.add_argument("--one", type=int, help="run one size in this process; a row as JSON on stdout")
    p.add_argument("--quick", action="store_true", help="N=20 only, short phases")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--no-version-floor",
        action="store_true",
        help="diagnostic: record versions count up by one (no wall-clock floor); not saved",
    )
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--amortized",
        dest="amortized",
        action="store_const",
        const=True,
        help=f"steady state from a base window and one refresh wave (default from N={AMORTIZE_FROM})",
    )
    how.add_argument(
        "--whole-period",
        dest="amortized",
        action="store_const",
        const=False,
        help="steady state over one whole refresh period (default below that)",
    )
    args = p.parse_args(argv)
    floor = not args.no_version_floor
    if args.one is not None:
        row = run_size(args.one, quick=args.quick, version_floor=floor, amortized=args.amortized)
        json.dump(row, sys.stdout)
        return 0
    sizes = args.sizes or ([20] if args.quick else [100, 300, 1000])
    rows = run_all(sizes, quick=args.quick, version_floor=floor, amortized=args.amortized)
    if not args.quick and floor:
        old = json.loads(args.out.read_text()) if args.out.exists() else {}
        by_n = {r["n"]: r for r in old.get("rows", [])}
        by_n.update({r["n"]: r for r in rows})
        doc = {
            "date": datetime.date.today().isoformat(),
            "commit": _commit(),
            "rows": [by_n[k] for k in sorted(by_n)],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"rows written to {args.out}")
    return 0 if len(rows) == len(sizes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
