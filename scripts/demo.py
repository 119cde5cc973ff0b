"""`make demo`: start a small local clan and show it working.

For now: one agent with a temporary state dir and control socket; clanctl
status and whoami against it; a clean stop.  Nothing is left behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(cmd: list[str]) -> None:
    shown = " ".join(["clanctl", *cmd[3:]]) if cmd[2] == "clanagent.cli.clanctl" else " ".join(cmd)
    print(f"$ {shown}", flush=True)
    r = subprocess.run(cmd, text=True, capture_output=True, timeout=30)
    print(r.stdout.rstrip())
    if r.returncode != 0:
        print(r.stderr.rstrip())
        raise SystemExit(f"demo: '{shown}' failed with exit code {r.returncode}")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="clanagent-demo-"))
    sock = work / "control.sock"
    log_path = work / "agent.log"
    banner(f"starting one agent (state in {work})")
    with log_path.open("w") as log:
        agent = subprocess.Popen(
            [
                PY,
                "-m",
                "clanagent.cli.agent_main",
                "run",
                "--config",
                "/dev/null",
                "--state-dir",
                str(work / "state"),
                "--control-socket",
                str(sock),
                "--listen",
                "",
            ],
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            if agent.poll() is not None or time.monotonic() > deadline:
                print(log_path.read_text())
                raise SystemExit("demo: the agent did not start; its log is above")
            time.sleep(0.05)
        ctl = [PY, "-m", "clanagent.cli.clanctl", "--socket", str(sock)]
        banner("clanctl status")
        show([*ctl, "status"])
        banner("clanctl whoami")
        show([*ctl, "whoami"])
        banner("stopping the agent (SIGTERM)")
        t0 = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        rc = agent.wait(timeout=10)
        print(f"agent exited with code {rc} after {time.monotonic() - t0:.2f} s")
        banner("the agent's log")
        print(log_path.read_text().rstrip())
        return rc
    finally:
        if agent.poll() is None:
            agent.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
