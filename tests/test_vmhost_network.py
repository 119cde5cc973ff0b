"""vmhost/network.py: the NICs a spec asks for, the clan rules, and (root) the
real taps, gateway address, /128 route, policy rules and forwarding in a
throwaway network namespace, and their removal.

The namespace tests read the kernel's state back with `ip` (the product
itself speaks rtnetlink through mesh/netlink.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import trio

from clanagent.mesh.netlink import Rule6
from clanagent.mesh.overlay import vm_ip6
from clanagent.vmhost.backend import RunDir
from clanagent.vmhost.network import (
    Nic,
    VmNetwork,
    VmNetworkError,
    clan_rules,
    plan_nics,
    tap_name,
)
from clanagent.vmhost.spec import VmSpec, clan_mac

ADDR = str(vm_ip6(b"clan-one", "web"))


def test_plan_nics_names_every_tap_and_gives_only_the_clan_nic_a_mac():
    spec = VmSpec("web", "/k", networks=("lan", "clan"), overlay_ip6=ADDR)
    assert plan_nics(spec) == (
        Nic("lan", tap_name("web", 0)),
        Nic("clan", tap_name("web", 1), clan_mac("web"), ADDR),
    )
    assert [n.clan for n in plan_nics(spec)] == [False, True]
    # on the clan network but without an address: a bare tap
    assert plan_nics(VmSpec("web", "/k", networks=("clan",))) == (Nic("clan", tap_name("web", 0)),)
    assert plan_nics(VmSpec("web", "/k")) == ()


def test_tap_names_fit_ifnamsiz_and_are_stable():
    assert tap_name("a-very-long-vm-name-indeed", 3) == tap_name("a-very-long-vm-name-indeed", 3)
    assert len(tap_name("a-very-long-vm-name-indeed", 12)) <= 15
    assert tap_name("a", 0) != tap_name("b", 0)


def test_clan_rules_let_in_only_the_mesh_and_this_host_and_out_only_the_vm():
    vm = f"{ADDR}/128"
    assert clan_rules("tap0", ADDR, "wg0") == [
        Rule6(30100, iif="tap0", src=vm),
        Rule6(30101, iif="tap0", blackhole=True),
        Rule6(30102, iif="wg0", dst=vm),
        Rule6(30103, iif="lo", dst=vm),
        Rule6(30104, dst=vm, blackhole=True),
    ]
    # no mesh interface known: nothing comes in from outside at all
    assert [r.priority for r in clan_rules("tap0", ADDR)] == [30100, 30101, 30103, 30104]


def test_exec_prefix_runs_the_vmm_where_its_taps_are():
    assert VmNetwork().exec_prefix() == []
    assert VmNetwork(netns="ns1").exec_prefix() == ["ip", "netns", "exec", "ns1"]


# --- root: a real namespace -----------------------------------------------------------


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespace and tap)"
    if shutil.which("ip") is None or not os.path.exists("/dev/net/tun"):
        return "needs iproute2 and /dev/net/tun"
    return None


@pytest.fixture
def netns():
    ns = f"vmn{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    yield ns
    subprocess.run(["ip", "netns", "del", ns])


def ip(ns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "-n", ns, *args], capture_output=True, text=True, check=False
    ).stdout


def _links(ns: str) -> set[str]:
    return {
        line.split(":")[1].strip().split("@")[0]
        for line in ip(ns, "-o", "link", "show").splitlines()
    }


def _forwarding(ns: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "cat", "/proc/sys/net/ipv6/conf/all/forwarding"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.mark.root
@pytest.mark.integration
@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
async def test_setup_and_teardown_in_a_namespace(netns, tmp_path):
    run = RunDir(str(tmp_path / "web"))
    run.ensure()
    net = VmNetwork(netns=netns, clan_interface="wg0")
    spec = VmSpec("web", "/k", networks=("lan", "clan"), overlay_ip6=ADDR)
    lan, clan = tap_name("web", 0), tap_name("web", 1)
    subprocess.run(["ip", "-n", netns, "tuntap", "add", "wg0", "mode", "tun"], check=True)
    assert _forwarding(netns) == "0"  # a new namespace starts without it
    with trio.fail_after(20):
        nics = await net.setup(spec, run)
    assert [n.tap for n in nics] == [lan, clan]
    assert {lan, clan} <= _links(netns)
    for tap in (lan, clan):
        assert ",UP" in ip(netns, "link", "show", tap)
        assert "tun type tap pi off" in ip(netns, "-d", "link", "show", tap)
    # the gateway: usable at once (no DAD, never "tentative")
    addrs = ip(netns, "-6", "addr", "show", "dev", clan)
    assert "inet6 fe80::1/64 scope link nodad" in addrs and "tentative" not in addrs
    assert "fe80::1" not in ip(netns, "-6", "addr", "show", "dev", lan)
    route = ip(netns, "-6", "route", "show", f"{ADDR}/128")
    assert route.startswith(f"{ADDR} dev {clan} ")
    rules = ip(netns, "-6", "rule", "show")
    for want in (
        f"30100:\tfrom {ADDR} iif {clan} lookup main",
        f"30101:\tfrom all iif {clan} blackhole",
        f"30102:\tfrom all to {ADDR} iif wg0 lookup main",
        f"30103:\tfrom all to {ADDR} iif lo lookup main",
        f"30104:\tfrom all to {ADDR} blackhole",
    ):
        assert want in rules, rules
    assert _forwarding(netns) == "1"
    with open(os.path.join(run.path, "taps")) as f:
        assert f.read().split() == [lan, clan]

    # setting up again (an agent restart, a VMM restart) changes nothing
    with trio.fail_after(20):
        await net.setup(spec, run)
    assert ip(netns, "-6", "rule", "show") == rules

    # the teardown may be done by a later agent that knows only the runtime dir
    with trio.fail_after(20):
        await VmNetwork(netns=netns).teardown(run)
    assert not {lan, clan} & _links(netns)
    assert "3010" not in ip(netns, "-6", "rule", "show")
    assert ip(netns, "-6", "route", "show", f"{ADDR}/128") == ""
    assert not os.path.exists(os.path.join(run.path, "taps"))
    assert not os.path.exists(os.path.join(run.path, "clan-rules"))
    assert _forwarding(netns) == "1"  # never turned off
    with trio.fail_after(20):
        await net.teardown(run)  # nothing recorded: nothing to do


@pytest.mark.root
@pytest.mark.integration
@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
async def test_a_changed_spec_leaves_no_old_tap_or_rule(netns, tmp_path):
    run = RunDir(str(tmp_path / "web"))
    run.ensure()
    net = VmNetwork(netns=netns, clan_interface="wg0")
    with trio.fail_after(20):
        await net.setup(VmSpec("web", "/k", networks=("lan", "clan"), overlay_ip6=ADDR), run)
        # the VM's next start has only the clan NIC (now the first)
        await net.setup(VmSpec("web", "/k", networks=("clan",), overlay_ip6=ADDR), run)
    assert tap_name("web", 1) not in _links(netns)
    rules = ip(netns, "-6", "rule", "show")
    assert f"iif {tap_name('web', 1)}" not in rules and f"iif {tap_name('web', 0)}" in rules
    with trio.fail_after(20):
        await net.teardown(run)
    assert "3010" not in ip(netns, "-6", "rule", "show")


@pytest.mark.root
@pytest.mark.integration
@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
async def test_a_failed_setup_removes_what_it_made(netns, tmp_path):
    run = RunDir(str(tmp_path / "web"))
    run.ensure()
    # taps, address and route go in; the rule naming the mesh interface is
    # refused (longer than IFNAMSIZ), so the VM must not start half-wired
    net = VmNetwork(netns=netns, clan_interface="x" * 16)
    spec = VmSpec("web", "/k", networks=("lan", "clan"), overlay_ip6=ADDR)
    with trio.fail_after(20), pytest.raises(VmNetworkError, match="vm web: "):
        await net.setup(spec, run)
    assert not {tap_name("web", 0), tap_name("web", 1)} & _links(netns)
    assert "3010" not in ip(netns, "-6", "rule", "show")
    assert os.listdir(run.path) == []
    with trio.fail_after(20), pytest.raises(VmNetworkError, match="cannot open netns"):
        await VmNetwork(netns=f"{netns}-missing").setup(spec, run)
    assert os.listdir(run.path) == []
