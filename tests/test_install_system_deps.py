"""scripts/install-system-deps.sh: what it installs as root, what it prints without.

The script runs for real with fake `dpkg-query`, `apt-get` and `id` first on
PATH (each records its arguments), so no package is touched.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "install-system-deps.sh"


def _fake_bin(tmp: Path, installed: set[str], uid: int) -> Path:
    bin_ = tmp / "bin"
    bin_.mkdir()
    (bin_ / "dpkg-query").write_text(
        "#!/bin/sh\n"
        'for p in "$@"; do last=$p; done\n'
        f'case " {" ".join(sorted(installed))} " in *" $last "*) '
        'printf "install ok installed";; *) exit 1;; esac\n'
    )
    (bin_ / "apt-get").write_text(f'#!/bin/sh\necho "$*" >> {tmp}/apt.log\n')
    (bin_ / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    return bin_


def _run(tmp: Path, what: str, installed: set[str], uid: int, **env: str):
    bin_ = _fake_bin(tmp, installed, uid)
    osr = tmp / "os-release"
    osr.write_text(env.pop("os_release", "ID=debian\n"))
    r = subprocess.run(
        ["sh", str(SCRIPT), what],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "PATH": f"{bin_}:/usr/bin:/bin",
            "CLANAGENT_OS_RELEASE": str(osr),
            **env,
        },
    )
    log = tmp / "apt.log"
    return r, log.read_text().splitlines() if log.exists() else []


ALL = {
    "python3-venv iproute2 iputils-ping wireguard-tools wireguard-go qemu-system-x86",
    "linux-image-amd64 busybox-static kmod util-linux systemd passwd tor chromium",
    "chromium-driver nftables zbar-tools zsh fish prometheus",
}
ALL = {p for line in ALL for p in line.split()}


def test_as_root_installs_only_what_is_missing_and_says_so(tmp_path):
    r, apt = _run(tmp_path, "test", ALL - {"wireguard-go", "tor"}, uid=0)
    assert r.returncode == 0, r.stderr
    assert apt == ["update -qq", "install -y -qq --no-install-recommends wireguard-go tor"]
    assert "installed: wireguard-go tor" in r.stdout


def test_demo_needs_a_subset_of_test(tmp_path):
    r, apt = _run(tmp_path, "demo", ALL - {"tor", "chromium", "qemu-system-x86"}, uid=0)
    assert r.returncode == 0, r.stderr
    assert apt[-1] == "install -y -qq --no-install-recommends qemu-system-x86"


def test_ubuntu_gets_its_own_kernel_and_chromium_names(tmp_path):
    installed = ALL - {"linux-image-amd64", "chromium", "chromium-driver"}
    r, apt = _run(tmp_path, "test", installed, uid=0, os_release="ID=ubuntu\nID_LIKE=debian\n")
    assert apt[-1].split()[4:] == [
        "linux-image-generic",
        "chromium-browser",
        "chromium-chromedriver",
    ]


def test_nothing_missing_runs_no_apt(tmp_path):
    r, apt = _run(tmp_path, "test", ALL, uid=0)
    assert (r.returncode, r.stdout, apt) == (0, "", [])


@pytest.mark.parametrize("uid,env", [(1000, {}), (0, {"CLANAGENT_NO_APT": "1"})])
def test_without_root_prints_the_exact_line_and_goes_on(tmp_path, uid, env):
    r, apt = _run(tmp_path, "test", ALL - {"busybox-static"}, uid=uid, **env)
    assert r.returncode == 0 and apt == []
    assert "apt-get install -y --no-install-recommends busybox-static" in r.stdout


def test_bad_argument_is_a_usage_error(tmp_path):
    r, _ = _run(tmp_path, "everything", ALL, uid=0)
    assert r.returncode == 2 and "usage" in r.stderr
