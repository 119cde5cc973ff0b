"""Real agent processes for the clanctl tests, and clanctl/clanagent run as the user runs them.

Owns: starting `clanagent run` on loopback with a config file, waiting for
its control socket, and stopping it.  Must never: leave an agent running
after the test (the context manager terminates it).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ctl(sock: Path, *args: str, stdin: str | None = None, timeout: float = 60):
    """`clanctl --socket SOCK ARGS...` as a process (stdout, stderr, returncode)."""
    return subprocess.run(
        [sys.executable, "-m", "clanagent.cli.clanctl", "--socket", str(sock), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin if stdin is not None else "",
    )


def clanagent(*args: str, timeout: float = 60):
    return subprocess.run(
        [sys.executable, "-m", "clanagent.cli.agent_main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_config(d: Path, name: str, port: int | None = None) -> Path:
    cfg = d / f"{name}.toml"
    listen = f"127.0.0.1:{port}" if port else "127.0.0.1:0"
    cfg.write_text(
        f'state_dir = "{d / name}"\n'
        f'[control]\nsocket = "{d / (name + ".sock")}"\n'
        f'[gossip]\nlisten = "{listen}"\nprofile = "local"\nname = "{name}"\n'
        "[mesh]\nwireguard = false\nmdns = false\n"  # loopback only
        "[web]\nport = 0\n"
    )
    return cfg


@contextmanager
def running_agent(cfg: Path, sock: Path, log: Path):
    """`clanagent run --config CFG` until the block ends; yields the process."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "clanagent.cli.agent_main", "run", "--config", str(cfg)],
            stderr=out,
        )
        try:
            deadline = time.monotonic() + 20
            while not sock.exists():
                assert proc.poll() is None, f"agent exited: {log.read_text()}"
                assert time.monotonic() < deadline, "agent did not start"
                time.sleep(0.05)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for(pred, timeout: float, what: str):
    """Poll `pred` (a query of a real process: there is no event to await) until truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
