"""The VM benchmark: from `clanctl vm start` to the guest's ready marker,
beside the bare QEMU command to the same marker (and a q35 boot for scale).

Owns: `bench/results/vm.json` (rows: backend, machine_type, bare_ms,
agent_ms, overhead_ms, runs) and a short table.  Medians of `--runs`
(default 10) boots, bare and agent side by side in one run.  Needs qemu, a
kernel and busybox-static (it says which is missing otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clanagent.vmhost.image import build_image, image_problem
from clanagent.vmhost.qemu import host_tsc_khz

RESULTS = Path(__file__).resolve().parent / "results" / "vm.json"
PY = sys.executable
MARKER = b"VM_READY"


def _bare_boot(argv: list[str], timeout: float = 60.0) -> float | None:
    t0 = time.monotonic()
    p = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
    )
    buf = b""
    try:
        assert p.stdout is not None
        os.set_blocking(p.stdout.fileno(), False)
        while time.monotonic() - t0 < timeout:
            try:
                chunk = p.stdout.read(65536)
            except BlockingIOError:
                chunk = None
            if chunk:
                buf += chunk
                if MARKER in buf:
                    return time.monotonic() - t0
            elif p.poll() is not None:
                return None
            else:
                time.sleep(0.002)
        return None
    finally:
        p.kill()
        p.wait()


def bare_argv(machine: str, kernel: str, initrd: str) -> list[str]:
    khz = host_tsc_khz()
    append = "console=ttyS0 quiet panic=-1" + (f" tsc_early_khz={khz}" if khz else "")
    return [
        "qemu-system-x86_64",
        "-M",
        machine,
        "-accel",
        "tcg",
        "-m",
        "128",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-kernel",
        kernel,
        "-initrd",
        initrd,
        "-append",
        append,
    ]


def _ctl(sock: Path, *args: str) -> str:
    return subprocess.run(
        [PY, "-m", "clanagent.cli.clanctl", "--socket", str(sock), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def agent_boots(
    work: Path, kernel: str, initrd: str, runs: int, cli: list[float] | None = None
) -> list[float]:
    home = work / "m1"
    home.mkdir()
    sock = home / "control.sock"
    (home / "agent.toml").write_text(
        f'state_dir = "{home / "state"}"\nruntime_dir = "{home / "run"}"\n'
        f'[control]\nsocket = "{sock}"\n'
        '[gossip]\nlisten = "127.0.0.1:0"\nprofile = "local"\nname = "m1"\n'
        "[mesh]\nwireguard = false\nmdns = false\n"
    )
    log = (home / "agent.log").open("w")
    agent = subprocess.Popen(
        [PY, "-m", "clanagent.cli.agent_main", "run", "--config", str(home / "agent.toml")],
        stderr=log,
    )
    admin = work / "admin.key"
    times: list[float] = []
    try:
        while not sock.exists():
            time.sleep(0.05)
        _ctl(sock, "clan", "init", "bench", "--admin-key", str(admin), "--machine", "m1")
        inv = work / "inventory.toml"
        inv.write_text(
            _ctl(sock, "inventory", "show")
            + (
                f'\n[vms.bench]\nmachines = ["m1"]\nmemory_mb = 128\n'
                f'kernel = "{kernel}"\ninitrd = "{initrd}"\n'
            )
        )
        console = home / "state" / "vms" / "bench" / "console.log"
        _ctl(sock, "inventory", "apply", str(inv), "--admin-key", str(admin), "--yes")
        _ctl(sock, "vm", "stop", "bench", "--admin-key", str(admin))  # each run starts it

        def state() -> str:
            rows = json.loads(_ctl(sock, "--json", "vm", "list"))
            return next((r["state"] for r in rows if r["vm"] == "bench"), "")

        for _ in range(runs):
            deadline = time.monotonic() + 30
            while not state().startswith("stopped") and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.1)  # requests are ordered by their second
            before = console.stat().st_size if console.exists() else 0
            t0 = time.monotonic()
            _ctl(sock, "vm", "start", "bench", "--admin-key", str(admin))
            if cli is not None:
                cli.append(time.monotonic() - t0)  # the clanctl process, start to exit
            while time.monotonic() - t0 < 60:
                if console.exists() and MARKER in console.read_bytes()[before:]:
                    times.append(time.monotonic() - t0)
                    break
                time.sleep(0.005)
            time.sleep(1.1)
            _ctl(sock, "vm", "stop", "bench", "--admin-key", str(admin))
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=10)
        log.close()
        for pidfile in (home / "state" / "vms").glob("*/vmm.pid"):
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vm")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="3 runs")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    missing = image_problem()
    if missing:
        print(f"vm benchmark skipped: {missing}")
        return 0
    runs = 3 if args.quick else args.runs
    work = Path(tempfile.mkdtemp(prefix="clanagent-bench-vm-"))
    try:
        kernel, initrd = build_image(work / "image")
        bzimage = sorted(Path("/boot").glob("vmlinuz-*"))[-1]
        bare = [
            t for t in (_bare_boot(bare_argv("microvm", kernel, initrd)) for _ in range(runs)) if t
        ]
        q35 = [
            t
            for t in (
                _bare_boot(bare_argv("q35", str(bzimage), initrd)) for _ in range(max(1, runs // 3))
            )
            if t
        ]
        cli: list[float] = []
        agent = agent_boots(work, kernel, initrd, runs, cli)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def ms(v: list[float]) -> float | None:
        return round(statistics.median(v) * 1000, 1) if v else None

    rows = [
        {
            "backend": "qemu",
            "machine_type": "microvm",
            "bare_ms": ms(bare),
            "agent_ms": ms(agent),
            "overhead_ms": (round(ms(agent) - ms(bare), 1) if bare and agent else None),
            "runs": runs,
            "bare_ok": len(bare),
            "agent_ok": len(agent),
            "accel": "tcg",
            # clanctl is a new Python process per command: its start-up (imports)
            # is in agent_ms; without it, what the agent itself adds:
            "clanctl_ms": ms(cli),
            "overhead_without_clanctl_ms": (
                round(ms(agent) - ms(bare) - ms(cli), 1) if bare and agent and cli else None
            ),
        },
        {
            "backend": "qemu",
            "machine_type": "q35",
            "bare_ms": ms(q35),
            "agent_ms": None,
            "overhead_ms": None,
            "runs": max(1, runs // 3),
            "bare_ok": len(q35),
            "agent_ok": 0,
            "accel": "tcg",
        },
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"{'machine':<8} {'bare ms':>8} {'agent ms':>9} {'overhead':>9}  runs")
    for r in rows:
        print(
            f"{r['machine_type']:<8} {r['bare_ms'] or '-':>8} {r['agent_ms'] or '-':>9} "
            f"{r['overhead_ms'] if r['overhead_ms'] is not None else '-':>9}  {r['runs']}"
        )
    r0 = rows[0]
    print(
        f"clanctl process (start to exit): {r0['clanctl_ms']} ms; overhead without it: "
        f"{r0['overhead_without_clanctl_ms']} ms"
    )
    print("target: under 50 ms of agent overhead; microvm well under q35")
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
