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
    assert not caps & {"CAP_SYS_ADMIN", "CAP_SYS_MODULE", "CAP_SYS_PTRACE", "CAP_DAC_OVERRIDE"}
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
