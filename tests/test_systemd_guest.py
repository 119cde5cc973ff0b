"""Integration: systemd/clanagent.service under a real systemd, in a QEMU guest.

`test_systemd_unit.py` only checks the unit's syntax.  Here a TCG guest
boots Debian's kernel with systemd as PID 1 over the host's root (read-only
9p under a tmpfs overlay; `_systemd_guest/init.sh`, booted by
`_kernel_guest/boot.py`), installs the agent exactly as the README's
"Run it under systemd" block says (`_systemd_guest/guest.py`) and checks the
unit's promises and that its hardening leaves what the agent needs working.
One boot per module (about a minute and a half under TCG); each test asserts
one check of it.

Skips with one line where QEMU, the kernel image or its modules, a static
busybox, systemd or python3-venv is missing, or without root.
"""

from __future__ import annotations

import json

import pytest

from tests._kernel_guest.boot import accel
from tests._systemd_guest.boot import BOOT_TIMEOUT, boot, missing

REASON = missing()
pytestmark = [
    pytest.mark.root,
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(REASON is not None, reason=REASON or ""),
]


@pytest.fixture(scope="module")
def guest(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sysguest")
    result, text, wall = boot(out)
    print(f"\nsystemd guest ({accel()}): {wall:.1f} s wall, boot to power-off")
    if not result:
        pytest.fail("the guest printed no KGUEST_RESULT; console tail:\n" + text[-6000:])
    if result.get("error") or not all(ok for ok, _ in result["checks"].values()):
        print("guest error:", result.get("error"), "\njournal:\n" + result.get("journal", ""))
        print("\n".join(result.get("log", [])))
    result["_wall"] = wall
    return result


def _check(guest: dict, name: str) -> None:
    got = guest["checks"].get(name)
    assert got is not None, f"the guest did not get to {name!r}: {guest.get('error')}"
    ok, detail = got
    assert ok, detail


@pytest.mark.parametrize(
    "name",
    [
        "readme_install",
        "ready",
        "status_text",
        "clanctl_root",
        "clanctl_group_member",
        "kernel_wireguard",
        "watchdog_pings",
        "restart_after_kill",
        "clean_stop",
        "vm_tap",
        "ipv6_forwarding",
        "generator_sandbox",
    ],
)
def test_unit_under_systemd(guest, name) -> None:
    _check(guest, name)


def test_guest_finished_within_budget(guest) -> None:
    print("guest timings:", json.dumps(guest.get("timings", {})))
    assert guest["_wall"] < BOOT_TIMEOUT and not guest.get("error"), guest.get("error")
