import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).parent.parent / "systemd" / "clanagent.service"


def parse_unit() -> dict[str, dict[str, list[str]]]:
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out[section] = {}
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key, []).append(value)
    return out


def test_unit_has_what_the_issue_asks_for():
    unit = parse_unit()
    svc = unit["Service"]
    assert svc["Type"] == ["notify"]
    assert svc["WatchdogSec"] and svc["Restart"] == ["on-failure"]
    assert svc["StateDirectory"] == ["clanagent"]
    assert svc["RuntimeDirectory"][0].split()[0] == "clanagent"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert svc[key] == ["yes"], key
    assert svc["ProtectSystem"] == ["strict"]
    caps = set(svc["CapabilityBoundingSet"][0].split())
    assert "CAP_NET_ADMIN" in caps
    assert not caps & {"CAP_SYS_PTRACE", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_BOOT"}
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (apt install systemd)"
)
def test_systemd_analyze_verify(tmp_path):
    # verify checks that ExecStart exists: point it at this checkout's clanagent.
    exe = Path(sys.executable).parent / "clanagent"
    assert exe.exists(), "clanagent console script is not installed in this venv"
    text = UNIT.read_text().replace("/usr/local/bin/clanagent", str(exe))
    unit = tmp_path / "clanagent.service"
    unit.write_text(text)
    r = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # It exits 0 on some unknown settings; any message about our unit is a failure too.
    problems = [ln for ln in (r.stdout + r.stderr).splitlines() if "clanagent.service" in ln]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


def test_the_check_would_catch_a_bad_unit(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze (apt install systemd)")
    exe = Path(sys.executable).parent / "clanagent"
    unit = tmp_path / "clanagent.service"
    unit.write_text(
        UNIT.read_text()
        .replace("/usr/local/bin/clanagent", str(exe))
        .replace("Type=notify", "Type=notifyy")
    )
    r = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert "clanagent.service" in r.stdout + r.stderr


def test_what_the_generator_sandbox_needs_is_fenced():
    # CAP_SYS_ADMIN is there for the secret generator's `unshare --net` only
    # (tests/test_systemd_guest.py runs it under the unit): no mount(2), so it
    # cannot undo ProtectSystem; no namespace kind but net.
    svc = parse_unit()["Service"]
    caps = set(svc["CapabilityBoundingSet"][0].split())
    assert {"CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID"} <= caps
    assert svc["SystemCallFilter"] == ["~@mount"]
    assert svc["RestrictNamespaces"] == ["net"]
    assert svc["NoNewPrivileges"] == ["yes"] and svc["AmbientCapabilities"] == [""]
    # ProtectKernelTunables stays; the one sysctl the agent writes is let through.
    assert svc["ProtectKernelTunables"] == ["yes"]
    rw = svc["ReadWritePaths"][0].split()
    assert [p for p in rw if p.startswith("/proc")] == ["/proc/sys/net/ipv6/conf/all/forwarding"]


def test_the_unit_lifts_the_open_file_limit():
    # systemd's default soft limit (1024) is what 1,100 idle connections exhausted.
    assert parse_unit()["Service"]["LimitNOFILE"] == ["65536"]


def _limits_after(code: str) -> list[int]:
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert r.returncode == 0, r.stderr
    return [int(x) for x in r.stdout.split()]


def test_the_agent_raises_its_soft_fd_limit_to_the_cap():
    # In a child: the limit is per process, and a lowered hard limit cannot come back.
    soft, hard, ret_soft = _limits_after(
        "import resource\n"
        "from clanagent.cli.agent_main import raise_fd_limit\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 2048))\n"
        "got = raise_fd_limit(cap=1500)\n"
        "print(*resource.getrlimit(resource.RLIMIT_NOFILE), got[0])\n"
    )
    assert (soft, hard, ret_soft) == (1500, 2048, 1500)
    # below the cap, the hard limit bounds it; a higher soft limit is never lowered
    assert _limits_after(
        "import resource\n"
        "from clanagent.cli.agent_main import raise_fd_limit\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 1000))\n"
        "raise_fd_limit(cap=65536)\n"
        "a = resource.getrlimit(resource.RLIMIT_NOFILE)[0]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (900, 1000))\n"
        "raise_fd_limit(cap=512)\n"
        "print(a, resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    ) == [1000, 900]
