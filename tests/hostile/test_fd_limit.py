"""A real agent held at its open-file limit still persists records and answers.

Issue 12, item 5: "at its fd limit the agent still persists records and
answers `clanctl status`".  The listener caps keep an agent far below
`LimitNOFILE`, so this test lowers the limit of a running founder (prlimit)
to a few descriptors above what it holds, then fills the rest with idle
gossip connections.  While it sits at the limit (its gossip accept loop
counts EMFILE), root's `status` answers within 1 s, an admin's edit through
`clanctl` is taken, and the new inventory version is on disk.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

from clanagent.store import Store

from .attacker import tcp_connections
from .conftest import STATUS_DEADLINE, _free_port, call, clanagent, clanctl, wait_for

HEADROOM = 24  # descriptors left above what the idle founder holds


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _gossip_counters(sock) -> dict:
    return call(sock, "status")["counters"]["gossip"]


def test_at_its_fd_limit_the_agent_persists_records_and_answers_status(tmp_path):
    home = tmp_path / "m1"
    home.mkdir()
    sock = home / "control.sock"
    admin = tmp_path / "admin.key"
    (home / "agent.toml").write_text(
        f'state_dir = "{home / "state"}"\n'
        f'runtime_dir = "{home / "run"}"\n'
        f'[control]\nsocket = "{sock}"\n'
        f'[gossip]\nlisten = "127.0.0.1:{_free_port()}"\nprofile = "local"\nname = "m1"\n'
        "[mesh]\nwireguard = false\nmdns = false\n"
    )
    argv = [sys.executable, "-m", "clanagent.cli.agent_main", "run", "--config"]
    with (home / "agent.log").open("a") as log:
        proc = subprocess.Popen([*argv, str(home / "agent.toml")], stderr=log)
    held: list = []
    try:
        wait_for(lambda: call(sock, "status")["gossip_addr"], 20, "the agent to listen")
        clanctl(sock, "clan", "init", "fdlimit", "--admin-key", str(admin), "--machine", "m1")
        wait_for(lambda: call(sock, "status")["gossip_addr"], 20, "gossip under the clan")
        addr = call(sock, "status")["gossip_addr"]
        versions = call(sock, "inventory.show")["versions"]
        time.sleep(1)  # start-up writes done

        limit = _fds(proc.pid) + HEADROOM
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (limit, limit))
        before = _gossip_counters(sock)["accept_errors"]
        for i in range(8):  # 8 loopback sources x 32: more than the headroom
            held += tcp_connections(addr, 32, source=f"127.0.0.{2 + i}")
        wait_for(
            lambda: _gossip_counters(sock)["accept_errors"] > before,
            10,
            "the gossip accept loop to meet EMFILE",
        )
        # (the reserve comes back once the status call above has closed)
        wait_for(lambda: _fds(proc.pid) >= limit - 1, 5, "the agent to sit at its fd limit")

        # At the limit: status answers within the deadline, every time.
        for _ in range(5):
            t0 = time.monotonic()
            call(sock, "status")
            assert time.monotonic() - t0 < STATUS_DEADLINE

        # ... and an admin's edit is taken and persisted.
        out = clanagent("keygen", "--state-dir", str(tmp_path / "spare"))
        key = next(ln.split()[-1] for ln in out.splitlines() if ln.startswith("machine key"))
        clanctl(sock, "machine", "add", "spare", "--key", key, "--admin-key", str(admin), "--yes")
        wait_for(
            lambda: call(sock, "inventory.show")["versions"] > versions,
            10,
            "the new inventory version",
        )
        assert _gossip_counters(sock)["accept_errors"] > before  # still at the limit
        assert proc.poll() is None
    finally:
        for s in held:
            s.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log = (home / "agent.log").read_text(errors="replace")
    assert proc.returncode in (0, -15), log[-3000:]
    # The new version is on disk: a fresh store over the agent's files holds it.
    store = Store.open(home / "state" / "records")
    inventory = [r for r in store.records() if r.kind == "inventory"]
    assert len(inventory) == versions + 1, (len(inventory), versions)
    # Nothing failed but accepting: no request, write or task met EMFILE.
    assert "Traceback" not in log and "control request failed" not in log, log[-3000:]
