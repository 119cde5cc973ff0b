"""Real agents at clan scale: N `clanagent run` processes in one clan on loopback.

What it measures, for each N (default 10, 50 and 100; `--sizes` for others):

| field | how |
| --- | --- |
| `join_s` | from spawning the last agent until every agent's `status` counts N members alive (itself included) |
| `edit_s` | from submitting an inventory edit to m1 (one tag changed, signed with the admin key by the code `clanctl inventory apply` runs) until every agent has published `inventory.head` for the new document; `--edits` times |
| `kill_s` | from a `kill -9` of one agent until every other agent has published `member.dead` for it; `--kills` times, one victim after another |
| `idle` | per agent, between two samples `--idle` seconds apart after `--settle` seconds of quiet: CPU % of one core (utime + stime from /proc/PID/stat), RSS (VmRSS from /proc/PID/status), store fsyncs/s and gossip bytes/s sent (from the `counters` in `status`, see `_sample`) |

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

Times are the agents' own: a thread per agent reads its `events` stream,
whose events carry the agent's wall clock (`ts`), so a slow bench or a slow
control socket does not stretch them (see `Watch`).  The control sockets are
polled only to learn when a phase is over, and for the time of agents whose
stream broke (`from_poll` counts those).  A phase that does not finish
within its timeout reports `null` and how many agents got there.  Many
numbers per size (several edits, several kills, N agents at idle) are
summarised as median, min and max.

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
import threading
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
    started_at: dict[str, float] = field(default_factory=dict)  # wall time of each spawn

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
        # Only the founder's port must be known in advance (it is every
        # token's seed); the others take one from the kernel when they start,
        # so a port picked here cannot be taken by another program during the
        # minutes a large clan takes to start (seen at N=100).
        port = _free_port() if m == self.names[0] else 0
        (home / "agent.toml").write_text(
            f'state_dir = "{home / "state"}"\n'
            f'runtime_dir = "{home / "run"}"\n'
            f'[control]\nsocket = "{self.sock(m)}"\n'
            f'[gossip]\nlisten = "127.0.0.1:{port}"\nprofile = "{PROFILE}"\n'
            f'name = "{m}"\n'
            "[mesh]\nwireguard = false\nmdns = false\n"
        )

    def start(self, m: str, timeout: float = 60.0) -> None:
        argv = [sys.executable, "-m", "clanagent.cli.agent_main", "run"]
        argv += ["--config", str(self.home(m) / "agent.toml")]
        self.started_at[m] = time.time()
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


# -- events -----------------------------------------------------------------------


class Watch:
    """One agent's `events` stream, read by a thread.

    Each event carries `ts`, the agent's wall clock when it published it, so
    times taken from events do not depend on how fast this process polls."""

    def __init__(self, sock: Path) -> None:
        self.events: list[dict[str, Any]] = []
        self.broken = False  # the stream ended or lost events: poll instead
        self._client = ControlClient(sock, timeout=30.0)
        self._client.connect()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for ev in self._client.stream("events"):
                if ev.get("type") == "events.dropped":
                    self.broken = True
                self.events.append(ev)  # list.append is atomic
        except Exception:  # the agent stopped, or close() below
            pass
        self.broken = True

    def first(self, pred: Callable[[dict[str, Any]], bool]) -> float | None:
        return next((ev["ts"] for ev in list(self.events) if pred(ev)), None)

    def last(self, pred: Callable[[dict[str, Any]], bool], until: float) -> float | None:
        hits = [ev["ts"] for ev in list(self.events) if pred(ev) and ev["ts"] <= until]
        return hits[-1] if hits else None

    def close(self) -> None:
        sock = self._client._sock  # shut down, not only closed: that wakes the reader
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._client.close()
        self._thread.join(timeout=5)


# -- polling --------------------------------------------------------------------


def wait_all(
    names: list[str], done: Callable[[str], bool], timeout: float
) -> tuple[dict[str, float], float]:
    """Ask each agent in `names` until `done(name)`, then leave it alone.

    Returns ({name: wall time when it was seen done}, median round seconds).
    An agent whose call fails (busy, starting) is simply asked again."""
    t0 = time.monotonic()
    pending = list(names)
    seen: dict[str, float] = {}
    rounds: list[float] = []
    while pending and time.monotonic() - t0 < timeout:
        r0 = time.monotonic()
        for m in list(pending):
            if _quietly(done, m):
                seen[m] = time.time()
                pending.remove(m)
        rounds.append(time.monotonic() - r0)
        if pending:
            time.sleep(max(0.0, 0.2 - rounds[-1]))
    return seen, statistics.median(rounds) if rounds else 0.0


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


def _is_alive_event(ev: dict[str, Any]) -> bool:
    return ev["type"].startswith("member.") and ev.get("state") == "alive"


def phase_join(clan: Clan, timeout: float) -> dict[str, Any]:
    """Each agent's join time is its last `member.alive` event before it was
    seen counting N alive (the poll's time where no event was caught)."""
    n = len(clan.names)
    first = clan.names[0]
    watches = {first: Watch(clan.sock(first))}
    t_start = time.monotonic()
    try:
        for m in clan.names[1:]:
            clan.start(m)
            watches[m] = Watch(clan.sock(m))
        started = time.monotonic() - t_start
        t_last = clan.started_at[clan.names[-1]]

        def sees_all(m: str) -> bool:
            return call(clan.sock(m), "status")["members"].get("alive", 0) >= n

        seen, rnd = wait_all(clan.names, sees_all, timeout)
        each, from_poll = {}, 0
        for m, t_seen in seen.items():
            ts = watches[m].last(_is_alive_event, t_seen)
            from_poll += ts is None
            each[m] = max(0.0, (t_seen if ts is None else ts) - t_last)
    finally:
        for w in watches.values():
            w.close()
    return {
        "start_all_s": round(started, 2),
        "join_s": round(max(each.values()), 3) if len(each) == n else None,
        "joined": len(each),
        "join_each_s": spread(list(each.values())),
        "join_from_poll": from_poll,
        "poll_round_s": round(rnd, 3),
    }


def _timed_by_events(
    names: list[str], pred: Callable[[dict[str, Any]], bool], poll: Callable[[str], bool],
    t0: float, watches: dict[str, Watch], timeout: float,
) -> dict[str, Any]:  # fmt: skip
    """Wait until every agent in `names` has an event matching `pred` (or,
    if its stream broke, answers `poll`); seconds from `t0` for each."""

    def done(m: str) -> bool:
        w = watches[m]
        return w.first(pred) is not None or (w.broken and poll(m))

    seen, rnd = wait_all(names, done, timeout)
    each, from_poll = [], 0
    for m, t_seen in seen.items():
        ts = watches[m].first(pred)
        from_poll += ts is None
        each.append((t_seen if ts is None else ts) - t0)
    return {
        "reached": len(seen),
        "of": len(names),
        "s": round(max(each), 3) if len(seen) == len(names) else None,
        "from_poll": from_poll,
        "poll_round_s": round(rnd, 3),
    }


def _watch_all(clan: Clan) -> dict[str, Watch]:
    watches = {m: Watch(clan.sock(m)) for m in clan.alive()}
    time.sleep(1.0)  # let every agent take the subscription before anything happens
    return watches


def phase_edit(clan: Clan, count: int, timeout: float) -> dict[str, Any]:
    """From just before `inventory.submit` to each agent's `inventory.head`
    event for the new document (the event names the document's hash)."""
    from clanagent.inventory.edit import read_admin_key, seal_and_sign
    from clanagent.inventory.model import doc_hash

    first = clan.names[0]
    key = read_admin_key(clan.admin_key, follow_symlinks=True)
    runs: list[float] = []
    detail = []
    watches = _watch_all(clan)
    try:
        for i in range(count):
            with ControlClient(clan.sock(first), timeout=60.0) as c:
                shown = c.call("inventory.show", {})
                doc = copy.deepcopy(shown["doc"])
                doc["machines"][first]["tags"] = [f"bench-{i}-{int(time.time())}"]
                version = seal_and_sign(
                    doc,
                    parents=shown["leaves"],
                    keys=[key],
                    message=f"bench edit {i}",
                    now=int(time.time()),
                    readable=c.call("inventory.endpoints"),
                )
                ticks0 = _clan_cpu_ticks(clan)
                t0 = time.time()
                want = c.call("inventory.submit", {"version": version.to_wire(), "init": False})[
                    "hash"
                ]

            def is_head(ev: dict[str, Any], doc: str = doc_hash(version.doc).hex()) -> bool:
                return ev["type"] == "inventory.head" and ev.get("hash") == doc

            def has_it(m: str, want: bytes = want) -> bool:
                return call(clan.sock(m), "inventory.show")["leaves"] == [want]

            names = [m for m in clan.alive() if m in watches]
            got = _timed_by_events(names, is_head, has_it, t0, watches, timeout)
            # CPU all agents used from the submit to the end of the phase
            # (seconds of one core): near cores x edit_s means the machine,
            # not the protocol, set the pace
            got["cpu_s"] = round((_clan_cpu_ticks(clan) - ticks0) / CLK_TCK, 2)
            got["wall_s"] = round(time.time() - t0, 2)
            detail.append(got)
            if got["s"] is None:
                break
            runs.append(got["s"])
    finally:
        for w in watches.values():
            w.close()
    return {"edit_s": spread(runs), "edits": detail}


def phase_kill(clan: Clan, count: int, timeout: float) -> dict[str, Any]:
    """From the `kill -9` to each other agent's `member.dead` event for the victim."""
    runs: list[float] = []
    detail = []
    watches = _watch_all(clan)
    try:
        for victim in list(reversed(clan.names[1:]))[:count]:
            vid = clan.node_ids[victim]
            proc = clan.procs[victim]
            if proc.poll() is not None:
                raise RuntimeError(f"agent {victim} exited by itself:\n{clan.log_tail(victim)}")
            names = [m for m in clan.alive() if m != victim and m in watches]

            def state_of(m: str, vid: str = vid) -> str:
                rows = call(clan.sock(m), "peers")
                return next((r["state"] for r in rows if r["node_id"] == vid), "unknown")

            def is_dead(ev: dict[str, Any], vid: str = vid) -> bool:
                return ev["type"] == "member.dead" and ev.get("node_id") == vid

            # A kill only measures detection where the victim was seen alive.
            alive_before = sum(_quietly(state_of, m) == "alive" for m in names)
            t0 = time.time()
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            got = _timed_by_events(
                names, is_dead, lambda m: state_of(m) == "dead", t0, watches, timeout
            )
            got["victim_alive_before_in"] = alive_before
            detail.append(got)
            if got["s"] is None:
                break
            runs.append(got["s"])
    finally:
        for w in watches.values():
            w.close()
    return {"kill_s": spread(runs), "kills": detail}


def _proc_cpu_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


def _clan_cpu_ticks(clan: Clan) -> int:
    total = 0
    for p in clan.procs.values():
        if p.poll() is None:
            try:
                total += _proc_cpu_ticks(p.pid)
            except OSError:  # exited meanwhile
                pass
    return total


def _proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# What the gossip bytes sent were for (the node's bytes_sent_* counters):
# records is the record part of membership and gossip datagrams.
SENT_BY = ("membership", "gossip", "ae", "records")


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
        "sent_by": {w: counters.get("gossip", {}).get(f"bytes_sent_{w}", 0) for w in SENT_BY},
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
    sent_by: dict[str, list[float]] = {w: [] for w in SENT_BY}
    for m in names:
        a, b = before[m], after[m]
        if a is None or b is None:
            continue
        dt = b["t"] - a["t"]
        cpu_pct.append(100 * (b["cpu"] - a["cpu"]) / CLK_TCK / dt)
        store.append((b["store"] - a["store"]) / dt)
        sent.append((b["sent"] - a["sent"]) / dt)
        for w in SENT_BY:
            sent_by[w].append((b["sent_by"][w] - a["sent_by"][w]) / dt)
    source = next((a["store_counter"] for a in before.values() if a), "-")
    return {
        "window_s": window,
        "sampled": len(cpu_pct),
        "cpu_pct": spread(cpu_pct),
        "rss_mb": spread(rss),
        "store_per_s": spread(store),
        "store_counter": source,
        "bytes_sent_per_s": spread(sent),
        "bytes_sent_per_s_by": {w: spread(v) for w, v in sent_by.items()},
        "cpu_pct_total": round(sum(cpu_pct), 1),
    }


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
            # before stop: agents that died on their own, plus the kill -9 victims
            row["agents_exited"] = {
                m: p.returncode for m, p in clan.procs.items() if p.poll() is not None
            }
            clan.stop()
        if args.keep or "error" in row:
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
        edit, kill = _fmt(r.get("edit_s")), _fmt(r.get("kill_s"))
        for name, tries in (("edit", r.get("edits")), ("kill", r.get("kills"))):
            if tries and tries[-1]["s"] is None:  # say how far the one that timed out got
                part = f" ({tries[-1]['reached']}/{tries[-1]['of']})"
                edit, kill = (edit + part, kill) if name == "edit" else (edit, kill + part)
        if any(k["victim_alive_before_in"] < k["of"] for k in r.get("kills", [])):
            kill += " *"  # some agents did not see the victim alive before the kill
        lines.append(
            f"| {r['n']} | {join} | {edit} | {kill} "
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
    sizes = args.sizes or ([3] if args.quick else [10, 50, 100])
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
