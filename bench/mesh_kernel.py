"""The mesh benchmark with the kernel WireGuard backend, inside a QEMU guest.

Owns: on the host (`python -m bench.mesh --kernel-guest`, or this module
run directly), one TCG boot of Debian's kernel with the host's root over 9p
(tests/_kernel_guest/boot.py, the guest of tests/test_mesh_kernel_vm.py)
running this module again inside the guest; there, `bench.mesh.one_run`
unchanged on `GuestPair` (m1 and m2 on two switched LANs in namespaces,
first ping, then the LAN path in use is cut and the seconds until pings
flow over the other LAN), with agents that pick the kernel backend (the
module autoloads when the first WireGuard link is created).  Each finished
run comes back as a `KGUEST_ROW {json}` line on the serial console (so a
guest that overruns its time still reports the runs it finished), then
one `KGUEST_RESULT {json}`.  The host writes them under `"kernel"` in
bench/results/mesh.json, every row labelled `"backend": "kernel", "where":
"QEMU guest (TCG)"`, beside the wireguard-go rows (the previous `"kernel"`
section moves to `"kernel_earlier"`, the last four kept).

Must never: run the guest side outside the guest (it leaves kernel
interfaces to the guest's power-off), or report a run that did not finish
as a time.

No lossy-link run here: under TCG the probe timeouts (0.25 s minimum)
measure the emulator's stalls as much as the link.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.mesh import PY, RESULTS, Pair, one_run

GUEST_ENV = "KGUEST_MODULE"  # set (by guest.sh's kernel command line) only in the guest
WHERE = "QEMU guest (TCG)"
# One guest run: two agent starts under TCG (about 30 s each, Python over 9p),
# settling, the failover and teardown.  Used to stop starting runs in time.
RUN_ESTIMATE_S = 150.0


class GuestPair(Pair):
    """`Pair` for the guest: the agent of tests/_kernel_guest/agent.py (the
    product's, VMs on the in-memory backend: no room for VMs in the guest),
    the `lan` gossip profile (`local`'s 0.2 s probe timeouts mark machines
    dead when TCG is starved), longer start-up waits, and clanctl/clanagent
    called in-process (a Python start-up over 9p under TCG costs seconds)."""

    AGENT = [PY, "-m", "tests._kernel_guest.agent"]
    PROFILE = "lan"
    START_TIMEOUT = 120.0
    PING_TIMEOUT = 150.0
    SETTLE_TIMEOUT = 120.0

    def ctl(self, sock: Path, *args: str) -> str:
        from clanagent.cli import clanctl as clanctl_cli

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = clanctl_cli.main(["--socket", str(sock), "--timeout", "60", *args])
        if rc != 0:
            raise RuntimeError(f"clanctl {' '.join(args)}: rc {rc}: {err.getvalue().strip()}")
        return out.getvalue()

    def ctl_json(self, sock: Path, *args: str):
        return json.loads(self.ctl(sock, "--json", *args))

    def cli(self, *args: str) -> str:
        from clanagent.cli import agent_main

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = agent_main.main(list(args))
        if rc:
            raise RuntimeError(f"clanagent {' '.join(args)}: rc {rc}")
        return out.getvalue()


def guest_main() -> int:
    """Inside the guest: runs until KGUEST_RUNS failovers finished, at most
    2 x that many attempts, and no run started after KGUEST_BUDGET s."""
    runs = int(os.environ.get("KGUEST_RUNS", "5"))
    budget = float(os.environ.get("KGUEST_BUDGET", "900"))
    t0 = time.monotonic()
    rows: list[dict] = []
    error = None
    loaded_before = Path("/sys/module/wireguard").exists()
    try:
        r = 0
        while sum(1 for x in rows if x["failover_s"] is not None) < runs and r < 2 * runs:
            if rows and time.monotonic() - t0 + RUN_ESTIMATE_S > budget:
                print(f"KGUEST out of time after {len(rows)} runs", flush=True)
                break
            try:
                row = one_run(r, GuestPair)
            except Exception as exc:  # a run that broke is a failed run, not the end
                row = {"run": r, "first_ping_s": None, "failover_s": None, "error": repr(exc)}
            row["guest_s"] = round(time.monotonic() - t0, 1)
            rows.append(row)
            print("KGUEST_ROW " + json.dumps(row), flush=True)
            r += 1
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
    notes = {"module loaded before the agents": loaded_before, "runs_wanted": runs}
    print("KGUEST_RESULT " + json.dumps({"rows": rows, "notes": notes, "error": error}), flush=True)
    return 0


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f}/{five:.1f}/{fifteen:.1f}"


def summarise(rows: list[dict], label: str) -> dict:
    for r in rows:
        r["backend_seen"] = r.pop("backend", None)  # what the agent's status said
        r["backend"] = "kernel"
        r["where"] = WHERE
    firsts = [r["first_ping_s"] for r in rows if r["first_ping_s"] is not None]
    ups = [r["agent_up_s"] for r in rows if r.get("agent_up_s") is not None]
    calls = [r["ping_call_s"] for r in rows if r.get("ping_call_s") is not None]
    fails = [r["failover_s"] for r in rows if r["failover_s"] is not None]
    med = lambda v: round(statistics.median(v), 3) if v else None  # noqa: E731
    return {
        "backend": "kernel",
        "where": WHERE,
        "label": label,
        "first_ping_s": med(firsts),
        "agent_up_s": med(ups),
        "failover_s": med(fails),
        "failover_range_s": [min(fails), max(fails)] if fails else None,
        "ping_call_s": med(calls),
        "runs": len(rows),
        "failed_runs": sum(1 for r in rows if r["first_ping_s"] is None or r["failover_s"] is None),
        "rows": rows,
    }


def host_main(runs: int = 5, budget: float = 900.0, out: Path = RESULTS) -> int:
    """Boot the guest, collect its rows, write them under "kernel" in OUT."""
    from tests._kernel_guest.boot import accel, boot, missing

    why = missing()
    if why:
        print(f"kernel mesh benchmark skipped: {why}")
        return 0
    load_before = _load()
    work = Path(tempfile.mkdtemp(prefix="clanagent-bench-kguest-"))
    print(f"booting the guest ({accel()}), {runs} runs, {budget:.0f} s budget ...", flush=True)
    result, text, wall = boot(
        work,
        "bench.mesh_kernel",
        timeout=budget + 300,
        env={"KGUEST_RUNS": str(runs), "KGUEST_BUDGET": str(int(budget))},
        compile_dirs=("clanagent", "tests", "bench"),
    )
    rows = result.get("rows")
    if rows is None:  # no final line: the rows it finished
        rows = [
            json.loads(ln.removeprefix("KGUEST_ROW "))
            for ln in text.splitlines()
            if ln.startswith("KGUEST_ROW ")
        ]
    print(f"guest console: {work / 'console.log'}")
    if not rows:
        print("the guest reported no run; console tail:\n" + text[-4000:])
        return 1
    label = (
        f"{WHERE}: accel {accel()}, 2 vCPUs, 1.5 GB, on a 2-core host, load average "
        f"{load_before} before and {_load()} after (1/5/15 min); guest wall {wall:.0f} s"
    )
    section = summarise(rows, label)
    section["date"] = time.strftime("%Y-%m-%d", time.gmtime())
    if result.get("error"):
        section["error"] = result["error"]
    if result.get("notes"):
        section["notes"] = result["notes"]
    data = json.loads(out.read_text()) if out.exists() else {}
    if data.get("kernel"):  # earlier guest runs (another load, another day) stay
        data["kernel_earlier"] = [data["kernel"], *data.get("kernel_earlier", [])][:4]
    data["kernel"] = section
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    for r in rows:
        print(
            f"run {r['run']}: first ping {r['first_ping_s']} s (agent up {r.get('agent_up_s')} s),"
            f" failover {r['failover_s']} s, backend {r['backend_seen']}"
            + (f" ({r['error']})" if r.get("error") else "")
        )
    print(
        f"kernel WireGuard, {WHERE}: first ping median {section['first_ping_s']} s, "
        f"failover median {section['failover_s']} s "
        f"({len(rows) - section['failed_runs']} of {len(rows)} runs finished)"
    )
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(guest_main() if os.environ.get(GUEST_ENV) else host_main())
