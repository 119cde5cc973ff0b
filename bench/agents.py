"""Real agents at clan scale: N `clanagent run` processes in one clan on loopback.

What it measures, for each N (default 10 and 50; `--sizes 10,50,100`):

| field | how |
| --- | --- |
| `join_s` | from the last agent's start until every agent's `status` counts N members alive (itself included) |
| `edit_s` | from submitting an inventory edit to m1 (one tag changed, signed with the admin key by the code `clanctl inventory apply` runs) until every agent's inventory head is that version; `--edits` times |
| `kill_s` | from a `kill -9` of one agent until every other agent's peer table says it is dead; `--kills` times, one victim after another |
| `idle` | per agent, over `--idle` seconds after `--settle` seconds of quiet: CPU % of one core (utime + stime from /proc/PID/stat), RSS (VmRSS from /proc/PID/status, at the end), store fsyncs/s and gossip bytes/s sent (from the `counters` in `status`, see `_idle_rates`) |

How the clan is made, as a user makes it: the agents run with the `lan`
gossip profile, WireGuard and mDNS off, each with its own state directory,
control socket and gossip port on 127.0.0.1.  m1 starts, `clanctl clan init`
founds the clan; every other machine runs `clanagent keygen`; one
`clanctl inventory apply` of the shown inventory plus a `[machines.NAME]`
table per machine key admits them all in one edit (adding 100 machines one
`clanctl machine add` at a time would take minutes); `clanctl invite NAME`
prints each token and `clanagent join TOKEN` writes each anchor.  Those CLI
commands run in this process through their `main()` (same code, no Python
start-up per command).  Then the agents start one after another, each once
the previous one answers `status`, so the start-up CPU of 100 Python
processes does not land inside `join_s`.

Times are taken by polling the control sockets (the bench's own `status`,
`peers` and `inventory.show` calls); each agent is polled until it meets the
condition, then left alone, so the resolution is one polling round (reported
as `poll_round_s`).  A phase that does not finish within its timeout reports
`null` and how many agents got there.  Many numbers per size (several edits,
several kills, N agents at idle) are summarised as median, min and max.

The agents share the machine's cores with each other and with this process:
at N=100 on 2 cores the run measures contention as much as the agent.

Results: `bench/results/agents.json` (one entry per N, merged with what the
file already holds for other sizes), and a table on stdout.

Must never: leave an agent running (every process started is stopped in a
`finally`), or be imported by the product or the unit tests.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clanagent.cli import agent_main, clanctl
from clanagent.control.client import ControlClient

RESULTS = Path(__file__).resolve().parent / "results" / "agents.json"
PROFILE = "lan"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the clan -------------------------------------------------------------------


def _cli(main: Callable[[list[str]], int], *argv: str) -> str:
    """Run a CLI's main() in this process; its stdout, or raise with it."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    if rc != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {rc}\n{out.getvalue()}{err.getvalue()}")
    return out.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(sock: Path, method: str, params: dict | None = None, timeout: float = 5.0) -> Any:
    with ControlClient(sock, timeout=timeout) as c:
        return c.call(method, params or {})


@dataclass
class Clan:
    work: Path
    names: list[str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    node_ids: dict[str, str] = field(default_factory=dict)

    @property
    def admin_key(self) -> Path:
        return self.work / "admin.key"

    def home(self, m: str) -> Path:
        return self.work / m

    def sock(self, m: str) -> Path:
        return self.work / m / "control.sock"

    def write_config(self, m: str) -> None:
        home = self.home(m)
        home.mkdir()
        (home / "agent.toml").write_text(
            f'state_dir = "{home / "state"}"\n'
            f'runtime_dir = "{home / "run"}"\n'
            f'[control]\nsocket = "{self.sock(m)}"\n'
            f'[gossip]\nlisten = "127.0.0.1:{_free_port()}"\nprofile = "{PROFILE}"\n'
            f'name = "{m}"\n'
            "[mesh]\nwireguard = false\nmdns = false\n"
        )

    def start(self, m: str, timeout: float = 60.0) -> None:
        argv = [sys.executable, "-m", "clanagent.cli.agent_main", "run"]
        argv += ["--config", str(self.home(m) / "agent.toml")]
        with (self.home(m) / "agent.log").open("a") as log:
            self.procs[m] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[m].poll() is not None:
                raise RuntimeError(f"agent {m} exited:\n{self.log_tail(m)}")
            with contextlib.suppress(Exception):
                st = call(self.sock(m), "status", timeout=2.0)
                if st["gossip_addr"]:
                    self.node_ids[m] = st["node_id"]
                    return
            time.sleep(0.05)
        raise RuntimeError(f"agent {m} did not answer status within {timeout} s")

    def log_tail(self, m: str) -> str:
        return (self.home(m) / "agent.log").read_text(errors="replace")[-2000:]

    def alive(self) -> list[str]:
        return [m for m in self.names if m in self.procs and self.procs[m].poll() is None]

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def found_clan(work: Path, n: int) -> Clan:
    """m1 founds the clan; m2..mN are admitted in one inventory edit and join."""
    from clanagent.identity import parse_machine_key

    clan = Clan(work, [f"m{i}" for i in range(1, n + 1)])
    for m in clan.names:
        clan.write_config(m)
    first, others = clan.names[0], clan.names[1:]
    clan.start(first)
    s1 = str(clan.sock(first))
    _cli(clanctl.main, "--socket", s1, "clan", "init", "bench", "--admin-key", str(clan.admin_key))
    tables = []
    for m in others:
        out = _cli(agent_main.main, "keygen", "--state-dir", str(clan.home(m) / "state"))
        key = next(ln.split()[-1] for ln in out.splitlines() if ln.startswith("machine key"))
        node_key, box_key, wg_key = parse_machine_key(key)
        tables.append(
            f"\n[machines.{m}]\nnode_key = {json.dumps(node_key.hex())}\n"
            f"box_key = {json.dumps(box_key.hex())}\n"
            f"wg_key = {json.dumps(base64.b64encode(wg_key).decode())}\n"
        )
    if others:
        shown = _cli(clanctl.main, "--socket", s1, "inventory", "show")
        head, sep, rest = shown.partition("\n[networks]")
        inv = work / "inventory.toml"
        inv.write_text(head + "".join(tables) + sep + rest)
        _cli(
            clanctl.main, "--socket", s1, "inventory", "apply", str(inv),
            "--admin-key", str(clan.admin_key), "--yes", "-m", f"admit {len(others)} machines",
        )  # fmt: skip
    for m in others:
        token = _cli(clanctl.main, "--socket", s1, "invite", m).strip()
        _cli(agent_main.main, "join", token, "--state-dir", str(clan.home(m) / "state"))
    return clan


# -- polling --------------------------------------------------------------------


def wait_all(
    clan: Clan, names: list[str], done: Callable[[str], bool], timeout: float
) -> tuple[dict[str, float], float, float]:
    """Poll each agent in `names` until `done(name)`; seconds each took from now.

    Returns (times of the agents that got there, median round length, t0).
    An agent whose call fails (busy, starting) is simply asked again."""
    t0 = time.monotonic()
    pending = list(names)
    times: dict[str, float] = {}
    rounds: list[float] = []
    while pending and time.monotonic() - t0 < timeout:
        r0 = time.monotonic()
        for m in list(pending):
            ok = False
            with contextlib.suppress(Exception):
                ok = done(m)
            if ok:
                times[m] = time.monotonic() - t0
                pending.remove(m)
        rounds.append(time.monotonic() - r0)
        if pending:
            time.sleep(max(0.0, 0.1 - rounds[-1]))
    return times, statistics.median(rounds) if rounds else 0.0, t0


def _quietly(fn: Callable[[str], Any], m: str) -> Any:
    try:
        return fn(m)
    except Exception:  # an agent too busy to answer
        return None


def spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "count": len(values),
    }


# -- phases ---------------------------------------------------------------------


def phase_join(clan: Clan, timeout: float) -> dict[str, Any]:
    t_start = time.monotonic()
    for m in clan.names[1:]:
        clan.start(m)
    started = time.monotonic() - t_start
    n = len(clan.names)

    def sees_all(m: str) -> bool:
        return call(clan.sock(m), "status")["members"].get("alive", 0) >= n

    times, rnd, _ = wait_all(clan, clan.names, sees_all, timeout)
    return {
        "start_all_s": round(started, 2),
        "join_s": round(max(times.values()), 3) if len(times) == n else None,
        "joined": len(times),
        "join_each_s": spread(list(times.values())),
        "poll_round_s": round(rnd, 3),
    }


def _proc_cpu_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


def _proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _sample(clan: Clan, m: str) -> dict[str, Any]:
    """One agent's counters now: its CPU ticks, store counter and gossip bytes sent."""
    counters = call(clan.sock(m), "status", timeout=30.0)["counters"]
    t = time.monotonic()
    rec = counters.get("records", {})
    store, source = rec.get("store_fsyncs"), "store_fsyncs"
    if store is None:  # this store does not count fsyncs: count the records it wrote
        store, source = rec.get("store_written", 0), "store_written"
    return {
        "t": t,
        "cpu": _proc_cpu_ticks(clan.procs[m].pid),
        "store": store,
        "store_counter": source,
        "sent": counters.get("gossip", {}).get("bytes_sent", 0),
    }


def phase_idle(clan: Clan, settle: float, window: float) -> dict[str, Any]:
    """Rates per agent between two samples `window` seconds apart (each agent
    its own interval, so slow `status` answers under load do not skew them)."""
    time.sleep(settle)
    names = clan.alive()
    before = {m: _quietly(lambda m: _sample(clan, m), m) for m in names}
    time.sleep(window)
    after = {m: _quietly(lambda m: _sample(clan, m), m) for m in names}
    rss = [_proc_rss_mb(clan.procs[m].pid) for m in names]
    cpu_pct, store, sent = [], [], []
    for m in names:
        a, b = before[m], after[m]
        if a is None or b is None:
            continue
        dt = b["t"] - a["t"]
        cpu_pct.append(100 * (b["cpu"] - a["cpu"]) / CLK_TCK / dt)
        store.append((b["store"] - a["store"]) / dt)
        sent.append((b["sent"] - a["sent"]) / dt)
    source = next((a["store_counter"] for a in before.values() if a), "-")
    return {
        "window_s": window,
        "sampled": len(cpu_pct),
        "cpu_pct": spread(cpu_pct),
        "rss_mb": spread(rss),
        "store_per_s": spread(store),
        "store_counter": source,
        "bytes_sent_per_s": spread(sent),
        "cpu_pct_total": round(sum(cpu_pct), 1),
    }


def _head(sock: Path) -> list[bytes]:
    return call(sock, "inventory.show")["leaves"]


def phase_edit(clan: Clan, count: int, timeout: float) -> dict[str, Any]:
    from clanagent.cli._inventory_cmds import _seal_and_sign, load_admin_key

    first = clan.names[0]
    key = load_admin_key(clan.admin_key)
    runs: list[float] = []
    detail = []
    for i in range(count):
        with ControlClient(clan.sock(first), timeout=10.0) as c:
            shown = c.call("inventory.show", {})
            doc = copy.deepcopy(shown["doc"])
            doc["machines"][first]["tags"] = [f"bench-{i}-{int(time.time())}"]
            version = _seal_and_sign(c, doc, shown, [key], f"bench edit {i}")
            t_submit = time.monotonic()
            result = c.call("inventory.submit", {"version": version.to_wire(), "init": False})
        want = result["hash"]
        names = clan.alive()

        def has_it(m: str, want: bytes = want) -> bool:
            return _head(clan.sock(m)) == [want]

        times, rnd, t0 = wait_all(clan, names, has_it, timeout)
        lag = t0 - t_submit  # the submit call's return to the first poll
        done = len(times) == len(names)
        detail.append({"reached": len(times), "of": len(names), "poll_round_s": round(rnd, 3)})
        if not done:
            break
        runs.append(max(times.values()) + lag)
    return {"edit_s": spread(runs), "edits": detail}


def phase_kill(clan: Clan, count: int, timeout: float) -> dict[str, Any]:
    runs: list[float] = []
    detail = []
    for victim in list(reversed(clan.names[1:]))[:count]:
        vid = clan.node_ids[victim]
        proc = clan.procs[victim]
        names = [m for m in clan.alive() if m != victim]

        def state_of(m: str, vid: str = vid) -> str:
            rows = call(clan.sock(m), "peers")
            return next((r["state"] for r in rows if r["node_id"] == vid), "unknown")

        # A kill only measures detection where the victim was seen alive.
        alive_before = sum(_quietly(state_of, m) == "alive" for m in names)
        os.kill(proc.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        proc.wait()
        times, rnd, t0 = wait_all(clan, names, lambda m: state_of(m) == "dead", timeout)
        detail.append(
            {
                "reached": len(times),
                "of": len(names),
                "victim_alive_before_in": alive_before,
                "poll_round_s": round(rnd, 3),
            }
        )
        if len(times) != len(names):
            break
        runs.append(max(times.values()) + t0 - t_kill)
    return {"kill_s": spread(runs), "kills": detail}


# -- one size -------------------------------------------------------------------


def run_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="cab-", dir="/tmp"))  # short: socket paths
    work.chmod(0o755)
    t_begin = time.monotonic()
    clan: Clan | None = None
    row: dict[str, Any] = {"n": n, "profile": PROFILE}
    try:
        clan = found_clan(work, n)
        row.update(phase_join(clan, args.join_timeout))
        print(f"  n={n} join: {row['join_s']} s ({row['joined']}/{n})", flush=True)
        row["idle"] = phase_idle(clan, args.settle, args.idle)
        print(f"  n={n} idle: cpu {row['idle']['cpu_pct']}", flush=True)
        row.update(phase_edit(clan, args.edits, args.edit_timeout))
        print(f"  n={n} edit: {row['edit_s']}", flush=True)
        row.update(phase_kill(clan, args.kills, args.kill_timeout))
        print(f"  n={n} kill: {row['kill_s']}", flush=True)
    except Exception as exc:  # record what broke and keep the other sizes
        row["error"] = f"{type(exc).__name__}: {exc}"
        print(f"  n={n} failed: {row['error']}", flush=True)
    finally:
        if clan is not None:
            row["agents_exited"] = [
                m for m, p in clan.procs.items() if p.poll() is not None
            ]  # before stop: agents that died on their own, plus the kill -9 victims
            clan.stop()
        if args.keep:
            print(f"  n={n}: logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    row["real_s"] = round(time.monotonic() - t_begin, 1)
    return row


# -- output ---------------------------------------------------------------------


def _fmt(s: dict[str, float] | None, unit: str = "", digits: int = 2) -> str:
    if s is None:
        return "-"
    med, lo, hi = (f"{s[k]:.{digits}f}" for k in ("median", "min", "max"))
    return f"{med}{unit} ({lo}-{hi})"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| N | join s | edit s | kill -9 seen s | idle CPU % | RSS MB | store/s | B/s sent |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in sorted(rows, key=lambda r: r["n"]):
        idle = r.get("idle") or {}
        join = "-" if r.get("join_s") is None else f"{r['join_s']:.2f}"
        if r.get("join_s") is None and "joined" in r:
            join = f"- ({r['joined']}/{r['n']})"
        kill = _fmt(r.get("kill_s"))
        if any(k["victim_alive_before_in"] < k["of"] for k in r.get("kills", [])):
            kill += " *"  # some agents did not see the victim alive before the kill
        lines.append(
            f"| {r['n']} | {join} | {_fmt(r.get('edit_s'))} | {kill} "
            f"| {_fmt(idle.get('cpu_pct'))} | {_fmt(idle.get('rss_mb'), digits=0)} "
            f"| {_fmt(idle.get('store_per_s'), digits=1)} "
            f"| {_fmt(idle.get('bytes_sent_per_s'), digits=0)} |"
        )
    return "\n".join(lines)


def _git_head() -> str:
    with contextlib.suppress(Exception):
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.agents")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--quick", action="store_true", help="3 agents, short phases (a smoke test)")
    p.add_argument("--settle", type=float, default=10.0, help="quiet seconds before idle")
    p.add_argument("--idle", type=float, default=30.0, help="idle measuring window, seconds")
    p.add_argument("--edits", type=int, default=3)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--join-timeout", type=float, default=180.0)
    p.add_argument("--edit-timeout", type=float, default=120.0)
    p.add_argument("--kill-timeout", type=float, default=120.0)
    p.add_argument("--label", default="", help="a note stored with the results")
    p.add_argument("--keep", action="store_true", help="keep the agents' directories and logs")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.settle, args.idle, args.edits, args.kills = 1.0, 3.0, 1, 1
    sizes = args.sizes or ([3] if args.quick else [10, 50])
    rows = []
    for n in sizes:
        print(f"n={n}: founding the clan", flush=True)
        row = run_size(n, args)
        row.update(
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            commit=_git_head(),
            label=args.label,
            cores=os.cpu_count(),
        )
        rows.append(row)
    text = table(rows)
    print(text)
    print("median (min-max); store/s counts", rows[0].get("idle", {}).get("store_counter", "-"))
    if " *" in text:
        print("* some agents did not see the victim alive before the kill (clan not converged)")
    if not args.quick:  # a smoke test's rows are no result
        old = json.loads(args.out.read_text()) if args.out.exists() else []
        merged = [r for r in old if r["n"] not in sizes] + rows
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(sorted(merged, key=lambda r: r["n"]), indent=1) + "\n")
        print(f"rows written to {args.out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
