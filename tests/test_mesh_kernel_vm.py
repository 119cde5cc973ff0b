"""Integration: the kernel WireGuard backend, for real, inside a QEMU guest.

The machines that run these tests have no WireGuard module in their own
kernel, so the guest boots Debian's kernel (`linux-image-amd64` ships
`wireguard.ko`) with a tiny initramfs (`_kernel_guest/init.sh`, busybox and
the virtio + 9p modules; built and booted by `_kernel_guest/boot.py`) that
mounts the host's root read-only over 9p and runs `_kernel_guest/guest.sh`
in it.  There `_kernel_guest/scenario.py`
starts three real agents in network namespaces and checks, with the stock
`ip`, `ping` and `wg`, that they build the mesh through pyroute2's WireGuard
netlink API: backend choice, pings, `wg show` against the desired state,
VM /128 routes, an endpoint change, a restart that adopts the interface
without a flap, a machine removed from the inventory, and a restart with
WireGuard turned off that removes the interface the earlier run left.  The guest prints
one JSON line on the serial console; each test below asserts one property
of it.  The guest boots once per module (about 2 minutes under TCG).

Skips with one line where QEMU, the kernel image, its wireguard.ko or a static
busybox is missing.  It runs under TCG, as in CI (CLANAGENT_KGUEST_ACCEL=kvm
asks for KVM; on the nested-virtualisation machine it was written on, a KVM
guest hung before its kernel printed anything).
"""

from __future__ import annotations

import json

import pytest

from tests._kernel_guest.boot import BOOT_TIMEOUT, accel, boot, missing

REASON = missing()
pytestmark = [
    pytest.mark.root,
    pytest.mark.integration,
    pytest.mark.skipif(REASON is not None, reason=REASON or ""),
]


@pytest.fixture(scope="module")
def guest(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("kguest")
    result, text, wall = boot(out)
    print(f"\nkernel WireGuard guest ({accel()}): {wall:.1f} s wall, boot to power-off")
    if not result:
        pytest.fail("the guest printed no KGUEST_RESULT; console tail:\n" + text[-6000:])
    if result.get("error"):
        print("guest error:", result["error"], "\nconsole tail:\n" + text[-6000:])
    result["_wall"] = wall
    return result


def _check(guest: dict, name: str):
    """The guest's (ok, detail) for one property; a property it never reached fails."""
    got = guest.get("checks", {}).get(name)
    assert got is not None, f"the guest did not get to {name!r}: {guest.get('error')}"
    return got


def test_module_autoloaded_by_creating_the_link(guest) -> None:
    ok, detail = _check(guest, "module_autoloaded")
    assert ok, detail


def test_agents_choose_the_kernel_backend(guest) -> None:
    ok, detail = _check(guest, "backend_kernel")
    assert ok, detail


def test_interfaces_are_kernel_wireguard_links(guest) -> None:
    ok, detail = _check(guest, "links_are_kernel_wireguard")
    assert ok, detail


def test_everyone_pings_everyone_over_the_overlay(guest) -> None:
    ok, detail = _check(guest, "pings")
    assert ok, detail


def test_wg_show_agrees_with_the_desired_state(guest) -> None:
    ok, detail = _check(guest, "wg_show_matches_desired")
    assert ok, detail


def test_vm_route_in_allowed_ips(guest) -> None:
    ok, detail = _check(guest, "vm_route_in_allowed_ips")
    assert ok, detail


def test_restart_adopts_the_interface_without_a_flap(guest) -> None:
    ok, detail = _check(guest, "restart_adopts_without_flap")
    assert ok, detail


def test_changed_endpoint_is_applied(guest) -> None:
    ok, detail = _check(guest, "endpoint_change_applied")
    assert ok, detail


def test_removed_machine_leaves_every_peer_list(guest) -> None:
    ok, detail = _check(guest, "removed_machine_gone")
    assert ok, detail


def test_wireguard_turned_off_removes_the_interface_left_behind(guest) -> None:
    ok, detail = _check(guest, "wireguard_off_removes_interface")
    assert ok, detail


def test_guest_finished_within_budget(guest) -> None:
    # Boot, three agents, every step and power-off; the scenario's own timings
    # are in guest["timings"] (printed with -s).
    print("guest timings:", json.dumps(guest.get("timings", {})))
    print("guest notes:", json.dumps(guest.get("notes", {})))
    assert guest["_wall"] < BOOT_TIMEOUT and not guest.get("error"), guest.get("error")
