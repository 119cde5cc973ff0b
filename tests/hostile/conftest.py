"""The hostile suite's clan: three real agent processes on loopback, plus mallory.

`m1`, `m2` and `m3` are `clanagent run` processes founded the way a user
founds a clan (`clan init`, `machine add`, `clanagent join`).  `mallory` is a
fourth machine that the admin added honestly: its keys are admitted, but no
agent runs for it.  The tests drive it with the attacker in `attacker.py`, so
it can say anything a malicious member could say, signed with its real key.

Every test ends by checking that the clan is still healthy: every agent
process alive and `status` answered within 1 s on each control socket.
"""

from __future__ import annotations

import json
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from clanagent.control.client import ControlClient
from clanagent.identity import Identity, load_or_create
from clanagent.inventory.token import parse_token

MACHINES = ("m1", "m2", "m3")
STATUS_DEADLINE = 1.0
FD_LIMIT = 1024  # what the issue promises: `clanctl status` answers within 1 s

# A service with a rotating secret (so runaway rotation would show) and a VM
# placed on m1 (so forged VM status for it would show).  The VM's kernel does
# not exist: m1 reports it failed, which is fine; nobody else may speak for it.
SERVICE_AND_VM = """
[services.vpn]
type = "wireguard-vpn"
[services.vpn.roles.server]
machines = ["m1"]
exports = ["address"]
[services.vpn.roles.client]
machines = ["m2", "m3"]
imports = ["vpn.server"]
[services.vpn.secrets.psk]
generator = "password"
length = 32
scope = "role:client"
rotate_days = 30

[vms.web]
machines = ["m1"]
memory_mb = 128
kernel = "/nonexistent/vmlinuz"
"""


def _systemd_fd_limit() -> None:
    # systemd's default soft limit, and no way up: the worst case of a unit
    # that sets no LimitNOFILE.
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def clanctl(sock: Path, *args: str, check: bool = True, timeout: float = 60) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "clanagent.cli.clanctl", "--socket", str(sock), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"clanctl {' '.join(args)}: exit {r.returncode}\n{r.stdout}{r.stderr}")
    return r.stdout


def clanagent(*args: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "clanagent.cli.agent_main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return r.stdout


def call(sock: Path, method: str, params: dict | None = None, timeout: float = 5.0):
    with ControlClient(sock, timeout=timeout) as c:
        return c.call(method, params or {})


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except Exception:  # an agent still starting: try again
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Clan:
    work: Path
    admin_key: Path
    socks: dict[str, Path] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    gossip: dict[str, str] = field(default_factory=dict)  # name -> "127.0.0.1:PORT"
    metrics: dict[str, str] = field(default_factory=dict)  # name -> its /metrics "127.0.0.1:PORT"
    clan_id: bytes = b""
    mallory: Identity | None = None

    def start(self, m: str) -> None:
        home = self.work / m
        argv = [sys.executable, "-m", "clanagent.cli.agent_main", "run"]
        argv += ["--config", str(home / "agent.toml")]
        with (home / "agent.log").open("a") as log:
            self.procs[m] = subprocess.Popen(argv, stderr=log, preexec_fn=_systemd_fd_limit)
        wait_for(lambda: self.socks[m].exists(), 20, f"agent {m} to start")
        wait_for(lambda: call(self.socks[m], "status")["gossip_addr"], 20, f"{m} to listen")
        self.gossip[m] = call(self.socks[m], "status")["gossip_addr"]

    def status_time(self, m: str) -> float:
        """Seconds `status` took on m's control socket (raises if it failed)."""
        t0 = time.monotonic()
        call(self.socks[m], "status", timeout=5.0)
        return time.monotonic() - t0

    def log_of(self, m: str) -> str:
        return (self.work / m / "agent.log").read_text(errors="replace")

    def assert_healthy(self) -> None:
        """Every agent runs and answers `status` within STATUS_DEADLINE."""
        for m in MACHINES:
            proc = self.procs[m]
            assert proc.poll() is None, (
                f"agent {m} exited ({proc.returncode}):\n{self.log_of(m)[-3000:]}"
            )
            took = min(self.status_time(m) for _ in range(3))
            assert took < STATUS_DEADLINE, f"{m} answered status in {took:.2f} s"

    def members_alive(self, m: str) -> set[str]:
        rows = json.loads(clanctl(self.socks[m], "--json", "machines"))
        return {r["name"] for r in rows if r.get("online")}

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def found_clan(work: Path, control: str = "") -> Clan:
    """`control`: extra lines for each agent's [control] section (read_group, say)."""
    work.chmod(0o755)
    clan = Clan(work=work, admin_key=work / "admin.key")
    for m in MACHINES:
        home = work / m
        home.mkdir()
        clan.socks[m] = home / "control.sock"
        clan.metrics[m] = f"127.0.0.1:{_free_port()}"
        (home / "agent.toml").write_text(
            f'state_dir = "{home / "state"}"\n'
            f'runtime_dir = "{home / "run"}"\n'
            f'[control]\nsocket = "{clan.socks[m]}"\n{control}'
            # a fixed port, so that an agent started again is found where it was
            f'[gossip]\nlisten = "127.0.0.1:{_free_port()}"\nprofile = "local"\nname = "{m}"\n'
            "[mesh]\nwireguard = false\nmdns = false\n"
            f'[metrics]\nlisten = "{clan.metrics[m]}"\n'
        )
    clan.start("m1")
    sock1 = clan.socks["m1"]
    clanctl(sock1, "clan", "init", "hostile", "--admin-key", str(clan.admin_key), "--machine", "m1")

    def add(name: str, state: Path) -> str:
        out = clanagent("keygen", "--state-dir", str(state))
        key = next(ln.split()[-1] for ln in out.splitlines() if ln.startswith("machine key"))
        added = clanctl(
            sock1, "machine", "add", name, "--key", key, "--admin-key", str(clan.admin_key), "--yes"
        )
        return next(
            ln.split()[-1] for ln in added.splitlines() if ln.strip().startswith("clanagent join")
        )

    for m in ("m2", "m3"):
        token = add(m, work / m / "state")
        clanagent("join", token, "--state-dir", str(work / m / "state"))
        clan.start(m)
    token = add("mallory", work / "mallory")
    clan.clan_id = parse_token(token).clan_id
    clan.mallory, _ = load_or_create(work / "mallory")

    inv = work / "inventory.toml"
    inv.write_text(clanctl(sock1, "inventory", "show") + SERVICE_AND_VM)
    clanctl(sock1, "inventory", "apply", str(inv), "--admin-key", str(clan.admin_key), "--yes")

    def settled() -> bool:
        for m in MACHINES:
            if clan.members_alive(m) != set(MACHINES):
                return False
            if not call(clan.socks[m], "secrets.list"):
                return False
        return True

    wait_for(settled, 60, "every agent to see the whole clan and its secrets")
    return clan


@pytest.fixture(scope="module")
def _clans(request, tmp_path_factory):
    # A test module may set up its clan: `clan_setup()` returns extra lines
    # for the agents' [control] section (read_group, say) and whether the
    # clan must live where every local user can reach its sockets (pytest's
    # own tmp directories are 0700).
    setup = getattr(request.module, "clan_setup", None)
    control, shared = setup() if setup is not None else ("", False)
    made: list[Path] = []

    def workdir() -> Path:
        if not shared:
            return tmp_path_factory.mktemp("hostile")
        made.append(Path(tempfile.mkdtemp(prefix="clanhostile-")))
        return made[-1]

    held: list[Clan] = [found_clan(workdir(), control)]
    try:
        yield held, workdir, control
    finally:
        held[-1].stop()
        for d in made:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def clan(_clans):
    """The module's clan; founded anew when an earlier test left an agent
    stopped (that test has failed already; the next attack deserves a
    healthy target)."""
    held, workdir, control = _clans
    if any(p.poll() is not None for p in held[-1].procs.values()):
        held[-1].stop()
        held.append(found_clan(workdir(), control))
    return held[-1]
