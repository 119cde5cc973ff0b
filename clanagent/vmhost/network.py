"""The host side of a VM's network, the same for every backend: taps, the clan route, policy rules.

Owns: the NICs a VmSpec asks for (`plan_nics`: one tap per entry of
`networks`, named deterministically; the clan NIC's MAC), creating those taps
before the VMM starts and removing exactly them once it is gone (the names
are recorded in the VM's runtime dir first, so an agent restart or a crash
half-way removes the same ones), and for the clan NIC (spec.CLAN_NETWORK)
of a VM with an overlay address: the gateway address on the tap, the route
to the VM's /128, the IPv6 policy rules that keep the tap honest, and IPv6
forwarding.  QEMU, Firecracker and cloud-hypervisor each only pass the taps
and MACs on to their VMM.

Decisions worth knowing:
- The clan network is a routed tap, not a bridge: the host end gets
  fe80::1/64 (no DAD: the guest uses it as its gateway at once) and a route
  to the VM's overlay /128.  The mesh routes the /128 to this machine over
  WireGuard; the route goes away with the tap.
- Policy rules instead of a packet filter (see `clan_rules`).
- IPv6 forwarding is turned on in the namespace and never turned off:
  something else may rely on it.
- With `netns`, the taps live in that namespace and the VMM must run there
  too (a VMM attaches to a tap by name in its own namespace): `exec_prefix`.

Must never: shell out to `ip` for netlink work (mesh/netlink.py speaks
rtnetlink), remove a link it did not record for this VM, turn IPv6
forwarding off, or block the event loop (the async methods run the netlink
work in `trio.to_thread`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from clanagent.durable import atomic_write
from clanagent.mesh import netlink
from clanagent.mesh.netlink import NetlinkHelperError, Rule6
from clanagent.vmhost.backend import RunDir
from clanagent.vmhost.spec import CLAN_GATEWAY, CLAN_NETWORK, VmHostLocalError, VmSpec, clan_mac

__all__ = [
    "Nic",
    "VmNetwork",
    "VmNetworkError",
    "clan_rules",
    "enable_ipv6_forwarding",
    "plan_nics",
    "tap_name",
]

log = logging.getLogger("clanagent.vmhost.network")

TAPS_FILE = "taps"  # one tap name a line
CLAN_RULES_FILE = "clan-rules"  # "TAP ADDR [MESH-INTERFACE]"
_FORWARDING = "/proc/sys/net/ipv6/conf/all/forwarding"


class VmNetworkError(VmHostLocalError):
    """A tap, route or rule could not be set up (the VM is not started)."""


@dataclass(frozen=True)
class Nic:
    """One NIC of a VM: the host tap its VMM attaches to, and what goes with it."""

    network: str  # the inventory's name for it ("clan", "lan", ...)
    tap: str
    mac: str = ""  # "": the VMM picks one
    overlay_ip6: str = ""  # clan NIC of a VM with an address: routed to this tap

    @property
    def clan(self) -> bool:
        return bool(self.overlay_ip6)


def tap_name(vm: str, index: int) -> str:
    """A deterministic tap name within IFNAMSIZ (15 chars): vm<hash>-<index>."""
    return f"vm{hashlib.sha256(vm.encode()).hexdigest()[:8]}-{index}"


def plan_nics(spec: VmSpec) -> tuple[Nic, ...]:
    """The NICs `spec` asks for, in order; only the clan NIC of a VM with an
    overlay address gets a MAC (the guest finds that NIC by it)."""
    nics = []
    for i, network in enumerate(spec.networks):
        clan = network == CLAN_NETWORK and bool(spec.overlay_ip6)
        nics.append(
            Nic(
                network,
                tap_name(spec.name, i),
                clan_mac(spec.name) if clan else "",
                spec.overlay_ip6 if clan else "",
            )
        )
    return tuple(nics)


def clan_rules(tap: str, addr: str, mesh_interface: str = "") -> list[Rule6]:
    """Policy rules that keep a clan tap honest (no packet filter needed).

    From the tap only the VM's own address is routed (a guest cannot send as
    its host or a sibling); to the VM only what comes in over the mesh
    interface or from this host (a LAN neighbour that routes the clan prefix
    here reaches nothing).  Local delivery (the `local` table at priority 0)
    is looked up first, so NDP and the gateway still work."""
    vm = f"{addr}/128"
    rules = [Rule6(30100, iif=tap, src=vm), Rule6(30101, iif=tap, blackhole=True)]
    if mesh_interface:
        rules.append(Rule6(30102, iif=mesh_interface, dst=vm))
    rules += [Rule6(30103, iif="lo", dst=vm), Rule6(30104, dst=vm, blackhole=True)]
    return rules


class VmNetwork:
    """Sets up and tears down the host side of VMs' NICs, in `netns` or ours.

    `clan_interface`: the mesh's WireGuard interface, the only way in to a
    clan tap from outside this machine."""

    def __init__(self, *, netns: str | None = None, clan_interface: str = "") -> None:
        self.netns = netns
        self.clan_interface = clan_interface

    def exec_prefix(self) -> list[str]:
        """What to put before a VMM's argv so it runs where its taps are."""
        # `ip netns exec` execs the VMM, so the pid a backend holds is the VMM's.
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    async def setup(self, spec: VmSpec, run: RunDir) -> tuple[Nic, ...]:
        """Create the taps (and the clan route and rules) `spec` asks for."""
        nics = plan_nics(spec)
        if nics:
            await trio.to_thread.run_sync(self.setup_sync, nics, run)
        return nics

    async def teardown(self, run: RunDir) -> None:
        """Remove what `setup` made for the VM in `run` (after its VMM is gone)."""
        await trio.to_thread.run_sync(self.teardown_sync, run)

    # -- blocking forms (run in a worker thread) --------------------------------------

    def setup_sync(self, nics: Sequence[Nic], run: RunDir) -> None:
        # Whatever an earlier run of this VM left (its VMM is gone: the
        # backend checked) goes first, so a changed spec leaks no tap.
        self.teardown_sync(run)
        try:
            # Recorded before anything is made: a crash half-way still leaves
            # the names for the next teardown.
            _record(run, TAPS_FILE, "".join(f"{n.tap}\n" for n in nics))
            for nic in nics:
                netlink.ensure_tap_sync(nic.tap, self.netns)
            for nic in nics:
                if nic.clan:
                    self._route_clan(nic, run)
        except (NetlinkHelperError, OSError) as e:
            with contextlib.suppress(NetlinkHelperError, OSError):
                self.teardown_sync(run)
            raise VmNetworkError(f"vm {run.name}: {e}") from None

    def _route_clan(self, nic: Nic, run: RunDir) -> None:
        ns = self.netns
        netlink.ensure_address_sync(nic.tap, f"{CLAN_GATEWAY}/64", ns)
        netlink.replace_route_sync(nic.tap, f"{nic.overlay_ip6}/128", ns)
        _record(run, CLAN_RULES_FILE, f"{nic.tap} {nic.overlay_ip6} {self.clan_interface}\n")
        for rule in clan_rules(nic.tap, nic.overlay_ip6, self.clan_interface):
            netlink.ensure_rule_sync(rule, ns)
        enable_ipv6_forwarding(ns)

    def teardown_sync(self, run: RunDir) -> None:
        # Best effort, never raises for the kernel's sake: a link or namespace
        # already gone took its routes and rules with it.
        rules_path = os.path.join(run.path, CLAN_RULES_FILE)
        try:
            with open(rules_path) as f:
                tap, addr, *iface = f.read().split()
        except FileNotFoundError:
            pass
        except ValueError:
            os.unlink(rules_path)
        else:
            for rule in clan_rules(tap, addr, iface[0] if iface else self.clan_interface):
                self._quietly(netlink.remove_rule_sync, rule, self.netns)
            os.unlink(rules_path)
        taps_path = os.path.join(run.path, TAPS_FILE)
        try:
            with open(taps_path) as f:
                taps = f.read().split()
        except FileNotFoundError:
            return
        for tap in taps:
            # The /128 route and the gateway address go with the link.
            self._quietly(netlink.remove_link_sync, tap, self.netns)
        os.unlink(taps_path)

    @staticmethod
    def _quietly(fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except NetlinkHelperError as e:
            log.warning("vm network teardown: %s", e)


def _record(run: RunDir, name: str, text: str) -> None:
    # Atomic, not fsynced: after a power cut the taps are gone too.
    atomic_write(os.path.join(run.path, name), text.encode(), mode=0o600, sync=False)


def enable_ipv6_forwarding(netns: str | None = None) -> None:
    """Route between the clan taps and the mesh interface (in `netns`, or ours)."""
    if netns is None:
        _write_forwarding()
        return
    # /proc/sys/net belongs to the namespace of the thread that opens it, and
    # setns moves only the calling thread: a throwaway thread moves and writes.
    failure: list[BaseException] = []

    def in_netns() -> None:
        try:
            from pyroute2.netns import setns

            setns(netns, flags=0)
            _write_forwarding()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            failure.append(e)

    t = threading.Thread(target=in_netns, name=f"ipv6-forwarding-{netns}")
    t.start()
    t.join()
    if failure:
        raise OSError(f"cannot enable IPv6 forwarding in netns {netns}: {failure[0]}")


def _write_forwarding() -> None:
    with open(_FORWARDING) as f:
        if f.read().strip() == "1":
            return
    with open(_FORWARDING, "w") as f:
        f.write("1\n")
