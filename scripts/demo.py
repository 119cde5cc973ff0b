"""`make demo`: start a small local clan and show it working.

Three agents on loopback, each with its own state dir and control socket.
The first listens on a free port; the other two are given only that one
seed address.  They find each other by gossip, and `clanctl peers` against
each shows the other two alive.  Then one is stopped and the others see it
leave.  Nothing is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable
N = 3


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def clanctl(sock: Path, *args: str, show: bool = True) -> str:
    cmd = [PY, "-m", "clanagent.cli.clanctl", "--socket", str(sock), *args]
    if show:
        print(f"$ clanctl --socket {sock} {' '.join(args)}", flush=True)
    r = subprocess.run(cmd, text=True, capture_output=True, timeout=30)
    if r.returncode != 0:
        raise SystemExit(f"demo: clanctl {' '.join(args)} failed: {r.stderr.strip()}")
    if show:
        print(r.stdout.rstrip(), flush=True)
    return r.stdout


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise SystemExit(f"demo: timed out waiting for {what}")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="clanagent-demo-"))
    procs: list[subprocess.Popen] = []
    socks = [work / f"m{i}" / "control.sock" for i in range(1, N + 1)]
    logs = [work / f"m{i}" / "agent.log" for i in range(1, N + 1)]
    try:
        seed = ""
        for i in range(1, N + 1):
            home = work / f"m{i}"
            home.mkdir()
            cfg = home / "agent.toml"
            join = f'join = ["{seed}"]\n' if seed else ""
            cfg.write_text(
                f'state_dir = "{home / "state"}"\n'
                f'[control]\nsocket = "{socks[i - 1]}"\n'
                f'[gossip]\nlisten = "127.0.0.1:0"\nprofile = "local"\nname = "m{i}"\n'
                f'clan_id = "{"c1a2" * 8}"\n{join}'
            )
            banner(f"starting agent m{i}" + (f" (seed {seed})" if seed else ""))
            with logs[i - 1].open("w") as log:
                procs.append(
                    subprocess.Popen(
                        [PY, "-m", "clanagent.cli.agent_main", "run", "--config", str(cfg)],
                        stderr=log,
                    )
                )
            sock = socks[i - 1]
            wait_for(lambda s=sock: s.exists(), 15, f"agent m{i} to start")
            status = json.loads(clanctl(sock, "--json", "status", show=False))
            print(f"m{i}: node {status['short_id']}, gossip on {status['gossip_addr']}")
            if not seed:
                seed = status["gossip_addr"]

        def everyone_sees_everyone() -> bool:
            for sock in socks:
                peers = json.loads(clanctl(sock, "--json", "peers", show=False))
                if sum(p["state"] == "alive" for p in peers) != N - 1:
                    return False
            return True

        t0 = time.monotonic()
        wait_for(everyone_sees_everyone, 30, "the agents to find each other")
        print(f"\nall {N} agents see each other alive after {time.monotonic() - t0:.1f} s")
        for sock in socks:
            banner(f"peers seen by {sock.parent.name}")
            clanctl(sock, "peers")
        banner("m1 status")
        clanctl(socks[0], "status")

        banner("stopping m3 (SIGTERM: it leaves gracefully)")
        procs[2].send_signal(signal.SIGTERM)
        procs[2].wait(timeout=10)

        def m3_gone() -> bool:
            peers = json.loads(clanctl(socks[0], "--json", "peers", show=False))
            return any(p["name"] == "m3" and p["state"] in ("left", "dead") for p in peers)

        wait_for(m3_gone, 30, "m1 to notice m3 left")
        clanctl(socks[0], "peers")
        banner("m1's log")
        print("\n".join(ln for ln in logs[0].read_text().splitlines() if "level=debug" not in ln))
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
