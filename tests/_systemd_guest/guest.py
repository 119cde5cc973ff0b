"""Runs inside the systemd guest as clanprobe.service (root, system python3, stdlib only).

Owns: installing clanagent exactly as the README's "Run it under systemd"
section says (its shell block, run line by line from the checkout, with
`sudo ` dropped and three changes because the guest has no network and
runs under TCG: the venv is made `--without-pip` (ensurepip byte-compiles
pip for minutes) and the test's own pip installs into it; the checkout path
becomes the wheel built from it, with `--no-index`; the runtime
dependencies, as installed in the test's venv, are unpacked into the venv
just before.  `control.group` is set in agent.toml before the start, as
the README's text says), then checking the
unit under systemd: READY, status text, watchdog pings, `clanctl status` as
root, as a member of `control.group` and (refused) as a non-member, kernel
WireGuard made by the agent, a `kill -9` brought back by Restart=on-failure,
a clean stop within TimeoutStopSec, and finally the agent's own code for a
VM tap with IPv6 forwarding and the sandboxed secret generator, run under
every line of the unit except Type/ExecStart/watchdog/restart
(sandbox_probe.py).  Prints one `KGUEST_RESULT {json}` line:
{"checks": {name: [ok, detail]}, "timings": {...}, "error": str}.

Must never: wait without a deadline, or stop before printing its result.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

TREE = Path(os.environ.get("SYSD_TREE", "/nonexistent"))
WHEEL = os.environ.get("SYSD_WHEEL", "")
DEPS = os.environ.get("SYSD_DEPS", "")
HOST_PYTHON = os.environ.get("KGUEST_PYTHON", "")
UNIT = "clanagent"
GROUP, MEMBER, OUTSIDER = "clanops", "alice", "mallory"
PROBE_DIR = Path("/usr/local/lib/clanprobe")
T0 = time.monotonic()
checks: dict[str, list] = {}
timings: dict[str, float] = {}
log: list[str] = []
os.environ["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def sh(cmd: str | list[str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run CMD (a shell line when a str) from the checkout, as the README's steps expect."""
    r = subprocess.run(
        cmd,
        cwd=TREE,
        shell=isinstance(cmd, str),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    log.append(f"$ {cmd} -> {r.returncode}\n{(r.stdout + r.stderr)[-800:]}")
    return r


def check(name: str, ok: bool, detail: object) -> bool:
    checks[name] = [bool(ok), str(detail)[-1500:]]
    timings[name] = round(time.monotonic() - T0, 1)
    print(f"KGUEST check {name}: {'ok' if ok else 'FAIL'} {str(detail)[:300]}", flush=True)
    return ok


def show(*props: str) -> dict[str, str]:
    r = sh(["systemctl", "show", UNIT, *(f"--property={p}" for p in props)])
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


def until(what, timeout: float, step: float = 0.5):
    """Poll WHAT() until it returns something true or TIMEOUT passes; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(step)


def readme_steps() -> list[str]:
    text = (TREE / "README.md").read_text()
    section = text.split("## Run it under systemd", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]


def unit_value(key: str) -> str:
    m = re.search(rf"^{key}=(.*)$", (TREE / "systemd/clanagent.service").read_text(), re.M)
    return m.group(1).strip() if m else ""


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min)?", value)
    assert m, value
    return float(m.group(1)) * {"ms": 0.001, "s": 1, None: 1, "min": 60}[m.group(2)]


def install_as_readme_says() -> bool:
    steps = readme_steps()
    for step in steps:
        line = step.replace("sudo ", "")
        if line.startswith("journalctl") and " -f" in line:
            continue  # follows the journal forever; read at the end instead
        if line.startswith("python3 -m venv "):
            # ensurepip byte-compiles pip for minutes under TCG: pip comes from
            # the test's venv instead (`pip --python` installs into this venv).
            line = line.replace("python3 -m venv ", "python3 -m venv --without-pip ")
        if "/bin/pip install " in line:
            venv = line.split("/bin/pip", 1)[0]
            site = sh(
                [
                    f"{venv}/bin/python",
                    "-c",
                    "import sysconfig; print(sysconfig.get_path('purelib'))",
                ]
            )
            t = time.monotonic()
            r = sh(["tar", "-xf", DEPS, "-C", site.stdout.strip()])
            timings["unpack_dependencies_s"] = round(time.monotonic() - t, 1)
            if r.returncode:
                return check("readme_install", False, f"copying the dependencies: {r.stderr}")
            line = re.sub(
                r"^\S+/bin/pip install \S+",
                f"{HOST_PYTHON} -m pip --python {venv}/bin/python install --no-index {WHEEL}",
                line,
            )
        if line.startswith("systemctl enable"):
            # README: "To let non-root users run clanctl, set control.group and add them to it".
            sh(f"groupadd {GROUP} && useradd -M -N -G {GROUP} {MEMBER} && useradd -M -N {OUTSIDER}")
            Path("/etc/clanagent/agent.toml").write_text(f'[control]\ngroup = "{GROUP}"\n')
        t = time.monotonic()
        r = sh(line, timeout=300)
        timings[f"step: {line[:60]}"] = round(time.monotonic() - t, 1)
        if r.returncode != 0:
            return check(
                "readme_install", False, f"{step!r} -> {r.returncode}: {r.stdout}{r.stderr}"
            )
    return check("readme_install", True, f"{len(steps)} steps")


def main() -> None:
    if not install_as_readme_says():
        return
    s = show(
        "ActiveState", "SubState", "StatusText", "MainPID", "WatchdogTimestampMonotonic", "Type"
    )
    # Type=notify: `systemctl enable --now` returns once READY=1 arrived.
    check(
        "ready",
        s["ActiveState"] == "active" and s["SubState"] == "running" and s["Type"] == "notify",
        s,
    )
    check(
        "status_text",
        re.fullmatch(r"node \S+ running", s["StatusText"]) is not None,
        s["StatusText"],
    )
    wd0, pid0 = s["WatchdogTimestampMonotonic"], s["MainPID"]

    root = sh("clanctl status")
    check("clanctl_root", root.returncode == 0 and "node" in root.stdout, root.stdout + root.stderr)
    member = sh(["runuser", "-u", MEMBER, "--", "clanctl", "status"])
    outsider = sh(["runuser", "-u", OUTSIDER, "--", "clanctl", "status"])
    check(
        "clanctl_group_member",
        member.returncode == 0 and outsider.returncode != 0,
        f"member rc={member.returncode} {member.stdout[-300:]}{member.stderr[-300:]}; "
        f"non-member rc={outsider.returncode} {outsider.stderr[-300:]}",
    )

    # A clan makes the agent build its mesh: the kernel backend if the unit lets it.
    init = sh("cd /root && clanctl clan init home --out /root/inventory.toml")

    def wg_up():
        link = sh("ip -d link show clan0")
        st = sh("clanctl status")
        return (
            "wireguard" in link.stdout
            and "kernel (netlink)" in st.stdout
            and (link.stdout, st.stdout)
        )

    got = until(wg_up, 90, 1)
    st = sh("clanctl status").stdout
    wg_line = next((ln for ln in st.splitlines() if "wireguard" in ln.lower()), st[-400:])
    check(
        "kernel_wireguard", bool(got), f"init rc={init.returncode} {init.stderr[-300:]}; {wg_line}"
    )

    # The agent pings the watchdog well within WatchdogSec.
    wd_sec = seconds(unit_value("WatchdogSec"))
    t = time.monotonic()
    wd1 = until(
        lambda: (
            (v := show("WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]) != wd0 and v
        ),
        wd_sec,
    )
    check(
        "watchdog_pings",
        bool(wd1) and show("NRestarts")["NRestarts"] == "0",
        f"{wd0} -> {wd1} after {time.monotonic() - t:.1f} s (WatchdogSec={wd_sec:g})",
    )

    # kill -9: Restart=on-failure brings it back, READY again.
    sh(["kill", "-9", pid0])
    t = time.monotonic()

    def back():
        s = show("ActiveState", "SubState", "MainPID", "NRestarts")
        return (
            s["ActiveState"] == "active"
            and s["SubState"] == "running"
            and s["MainPID"] not in ("0", pid0)
            and s
        )

    got = until(back, 60)
    again = sh("clanctl status")
    timings["restart_after_kill_s"] = round(time.monotonic() - t, 1)
    check(
        "restart_after_kill",
        bool(got) and got["NRestarts"] == "1" and again.returncode == 0,
        f"{got or show('ActiveState', 'SubState', 'NRestarts', 'Result')} clanctl rc={again.returncode}",
    )

    # A clean stop within TimeoutStopSec.
    limit = seconds(unit_value("TimeoutStopSec"))
    t = time.monotonic()
    stop = sh(["systemctl", "stop", UNIT], timeout=limit + 60)
    took = time.monotonic() - t
    timings["stop_s"] = round(took, 2)
    s = show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    check(
        "clean_stop",
        stop.returncode == 0
        and took < limit
        and s["Result"] == "success"
        and s["ActiveState"] == "inactive",
        f"{took:.2f} s (TimeoutStopSec={limit:g}) {s}",
    )

    sandbox_probe()


def sandbox_probe() -> None:
    """The agent's code for a VM tap + IPv6 forwarding and the generator sandbox,
    run under the unit's own lines (a oneshot copy of the installed unit)."""
    PROBE_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copy(TREE / "tests/_systemd_guest/sandbox_probe.py", PROBE_DIR / "sandbox_probe.py")
    # Off first, so the probe has to turn it on through the sandbox.
    Path("/proc/sys/net/ipv6/conf/all/forwarding").write_text("0\n")
    text = Path("/etc/systemd/system/clanagent.service").read_text()
    exe = re.search(r"^ExecStart=(\S+)", text, re.M).group(1)
    python = str(Path(os.path.realpath(exe)).parent / "python")
    out = "/run/clanprobe-sandbox.json"
    lines = []
    for ln in text.splitlines():
        key = ln.split("=", 1)[0]
        if key in ("Type", "NotifyAccess", "WatchdogSec", "Restart", "RestartSec"):
            continue
        if key == "ExecStart":
            ln = f"Type=oneshot\nExecStart={python} {PROBE_DIR}/sandbox_probe.py\nStandardOutput=file:{out}"
        lines.append(ln)
    Path("/etc/systemd/system/clanprobe-sandbox.service").write_text("\n".join(lines) + "\n")
    sh("systemctl daemon-reload")
    r = sh("systemctl start clanprobe-sandbox", timeout=180)
    try:
        got = json.loads(Path(out).read_text())
    except (OSError, ValueError) as e:
        got = {}
        err = (
            f"start rc={r.returncode} {r.stderr[-500:]}; no probe output: {e}; "
            + sh("journalctl -u clanprobe-sandbox --no-pager | tail -20").stdout
        )
        for name in ("vm_tap", "ipv6_forwarding", "generator_sandbox"):
            check(name, False, err)
    for name, (ok, detail) in got.items():
        check(name, ok, detail)


if __name__ == "__main__":
    error = ""
    try:
        main()
    except Exception:  # noqa: BLE001 - reported to the host
        error = traceback.format_exc()
    timings["total_s"] = round(time.monotonic() - T0, 1)
    journal = sh(f"journalctl -u {UNIT} --no-pager -o short-monotonic | tail -40").stdout
    failed = [n for n, (ok, _) in checks.items() if not ok]
    result = {
        "checks": checks,
        "timings": timings,
        "error": error,
        "journal": journal if failed or error else "",
        "log": log[-30:] if failed or error else [],
    }
    sys.stdout.write("KGUEST_RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
