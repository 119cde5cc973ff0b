"""VMs on the clan overlay: kernel cmdline and argv, spec fingerprint, guest image,
the VM service's status records, and (integration) a VM on machine 1 that
machine 2 pings over WireGuard.

The integration test runs two real agents in network namespaces (tests/_netns.py,
wireguard-go), applies an inventory with `[vms.web] networks = ["clan"]`, boots
the VM under TCG on m1 and pings its overlay address from m2's namespace: the
packet goes m2 -> WireGuard -> m1 (allowed-ips from m1's vm-status record) ->
m1's tap (route ADDR/128) -> the guest, and back.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, replace
from types import SimpleNamespace

import pytest

from clanagent.mesh.overlay import vm_ip6
from clanagent.vmhost import image
from clanagent.vmhost.backend import RunDir
from clanagent.vmhost.lifecycle import VmExited, VmStarted
from clanagent.vmhost.network import plan_nics
from clanagent.vmhost.qemu import build_command
from clanagent.vmhost.spec import (
    CLAN_GATEWAY,
    VmSpec,
    VmSpecError,
    clan_cmdline,
    clan_mac,
)

CLAN = b"clan-one"
ADDR = str(vm_ip6(CLAN, "web"))


def _opt(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def _argv(spec: VmSpec, taps=("tap0",)):
    nics = [replace(n, tap=t) for n, t in zip(plan_nics(spec), taps, strict=False)]
    return build_command(spec, RunDir("/r/web"), "tcg", tsc_khz=2_600_000, nics=nics)


def test_cmdline_and_argv_for_a_clan_vm():
    spec = VmSpec("web", "/k", initrd="/i", networks=("clan",), overlay_ip6=ADDR)
    argv = _argv(spec)
    append = _opt(argv, "-append")[0]
    net = ipaddress.IPv6Network(f"{ADDR}/48", strict=False)
    assert (
        f"clan.ip6={ADDR} clan.net={net} clan.gw={CLAN_GATEWAY} clan.mac={clan_mac('web')}"
        in append
    )
    assert str(net) == "fd37:2326:4e9b::/48" and CLAN_GATEWAY == "fe80::1"
    assert append.startswith("console=ttyS0") and "tsc_early_khz=2600000" in append
    assert _opt(argv, "-device")[-1] == f"virtio-net-device,netdev=net0,mac={clan_mac('web')}"


def test_only_the_clan_nic_gets_the_mac():
    spec = VmSpec("web", "/k", initrd="/i", networks=("lan", "clan"), overlay_ip6=ADDR)
    devices = [d for d in _opt(_argv(spec, ("t0", "t1")), "-device") if "virtio-net" in d]
    assert devices == [
        "virtio-net-device,netdev=net0",
        f"virtio-net-device,netdev=net1,mac={clan_mac('web')}",
    ]


def test_no_clan_words_without_the_network_the_address_or_a_tap():
    for spec, taps in (
        (VmSpec("web", "/k", initrd="/i", networks=("lan",)), ("t0",)),
        (VmSpec("web", "/k", initrd="/i", networks=("clan",)), ("t0",)),  # no address
        (VmSpec("web", "/k", initrd="/i", networks=("lan",), overlay_ip6=ADDR), ("t0",)),
        (VmSpec("web", "/k", initrd="/i", networks=("clan",), overlay_ip6=ADDR), ()),
    ):
        argv = _argv(spec, taps)
        assert "clan." not in _opt(argv, "-append")[0]
        assert not any("mac=" in d for d in _opt(argv, "-device"))
    assert clan_cmdline(VmSpec("web", "/k", networks=("lan",), overlay_ip6=ADDR)) == ""


def test_clan_mac_is_local_unicast_and_stable():
    mac = clan_mac("web")
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01 and len(mac.split(":")) == 6
    assert mac == clan_mac("web") != clan_mac("db")


def test_fingerprint_unchanged_for_vms_without_an_address():
    spec = VmSpec("web", "/k", initrd="/i", networks=("lan",))
    # what fingerprint() computed before the field existed
    old = asdict(spec)
    del old["overlay_ip6"]
    blob = json.dumps(old, sort_keys=True, separators=(",", ":")).encode()
    assert spec.fingerprint() == hashlib.sha256(blob).hexdigest()[:16]
    clan = VmSpec("web", "/k", initrd="/i", networks=("clan",), overlay_ip6=ADDR)
    assert clan.fingerprint() != VmSpec("web", "/k", initrd="/i", networks=("clan",)).fingerprint()


def test_from_inventory_takes_the_address_and_checks_it():
    entry = {"kernel": "/k", "networks": ["clan"]}
    assert VmSpec.from_inventory("web", entry, overlay_ip6=ADDR).overlay_ip6 == ADDR
    assert VmSpec.from_inventory("web", entry).overlay_ip6 == ""
    with pytest.raises(VmSpecError, match="bad overlay address"):
        VmSpec.from_inventory("web", entry, overlay_ip6="10.0.0.1")


def test_guest_init_configures_the_clan_nic_before_ready():
    init = image.INIT
    assert init.index(b"VM_NET_READY $CIP") < init.index(b"echo VM_READY")
    for word in (b"clan.ip6=", b"clan.net=", b"clan.gw=", b"clan.mac=", b"accept_dad"):
        assert word in init
    names = [n for n, _ in image._NET_MODULES]
    assert names == [
        "virtio_ring",
        "virtio",
        "virtio_mmio",
        "failover",
        "net_failover",
        "virtio_net",
    ]
    assert b"for m in " + " ".join(names).encode() + b"; do" in init


def test_image_problem_names_a_missing_net_module(monkeypatch):
    if image.image_problem() is not None:
        pytest.skip(f"no image here anyway: {image.image_problem()}")
    kver = image._kernels()[-1].removeprefix("/boot/vmlinuz-")
    real = os.path.exists
    missing = f"/lib/modules/{kver}/kernel/drivers/net/virtio_net.ko"
    monkeypatch.setattr(image.os.path, "exists", lambda p: p != missing and real(p))
    monkeypatch.setattr(image, "_builtin", lambda kver: set())
    assert image.image_problem() == f"needs {missing} (apt install linux-image-amd64)"
    # a kernel that has it built in needs no .ko
    monkeypatch.setattr(image, "_builtin", lambda kver: {"drivers/net/virtio_net.ko"})
    assert image.image_problem() is None
    assert "virtio_net" not in [n for n, _ in image._modules(kver)]


# --- the VM service's records and rows (no VM, no trio I/O) ----------------------------


def _ports_with(tmp_path, records):
    key = b"\x01" * 32
    doc = {
        "machines": {"m1": {"node_key": key, "tags": []}},
        "vms": {
            "web": {"machines": ["m1"], "tags": [], "count": 1, "networks": ["clan"]},
            "plain": {"machines": ["m1"], "tags": [], "count": 1, "networks": []},
        },
    }
    from clanagent.inventory import select

    inv = SimpleNamespace(
        doc=doc,
        clan_id=CLAN,
        machine_by_node_key=lambda k: SimpleNamespace(name="m1"),
        placement=lambda vm: tuple(select.placement(doc, vm)),
        vms_on=lambda machine: tuple(select.vms_for(doc, machine)),
    )
    from dataclasses import replace

    from ._fake_ports import FakeInventory, fake_ports

    ports = fake_ports(inventory=FakeInventory(inv))
    store = SimpleNamespace(of_kind=lambda kind: [r for r in records if r.kind == kind])
    ports = replace(ports, store=store)
    return ports, ports.bus.published


def _service(ports, tmp_path):
    from clanagent.vmhost.service import VmService

    return VmService(ports, state_dir=tmp_path, runtime_dir=tmp_path / "run")


async def test_status_record_names_the_address_only_while_running(tmp_path):
    from clanagent.vmhost.service import _overlay_of

    ports, published = _ports_with(tmp_path, [])
    inv = ports.inventory.inventory
    assert _overlay_of(inv, "web") == ADDR and _overlay_of(inv, "plain") == ""
    svc = _service(ports, tmp_path)
    spec = VmSpec("web", "/k", initrd="/i", networks=("clan",), overlay_ip6=ADDR)
    svc.reconciler.set_desired({"web": spec})
    svc._overlay = {"web": ADDR}
    svc.reconciler.poll(0.0)  # StartVm: "starting"
    await svc._publish_status()
    assert published[-1].body["state"] == "starting" and published[-1].body["overlay"] == ""
    svc.reconciler.handle(VmStarted("web"), 0.0)
    await svc._publish_status()
    assert (published[-1].kind, published[-1].key) == ("vm-status", "web")
    assert published[-1].body["state"] == "running" and published[-1].body["overlay"] == ADDR
    svc.reconciler.handle(VmExited("web", "boom"), 1.0)
    await svc._publish_status()
    assert published[-1].body["state"] == "crashed" and published[-1].body["overlay"] == ""


def test_clan_vms_rows_show_the_overlay_address(tmp_path):
    rec = SimpleNamespace(
        kind="vm-status",
        key="web",
        origin=b"\x01" * 32,  # m1's node key: a host speaks for its own VMs only
        body={"vm": "web", "machine": "m1", "state": "running", "reason": "", "accel": "tcg"},
    )
    ports, _ = _ports_with(tmp_path, [rec])
    rows = {r["vm"]: r for r in _service(ports, tmp_path).clan_vms()}
    assert rows["web"]["overlay"] == ADDR and rows["web"]["state"] == "running"
    assert rows["plain"]["overlay"] == "" and rows["plain"]["state"] == "unknown"


# --- integration: m2 pings a VM on m1 over WireGuard -----------------------------------


def _integration_missing() -> str | None:
    from ._netns import netns_missing_reason
    from .test_vmhost_qemu import _missing

    return netns_missing_reason() or _missing() or image.image_problem()


_SKIP = _integration_missing()


@pytest.mark.root
@pytest.mark.integration
@pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
def test_m2_pings_a_vm_on_m1_over_wireguard(tmp_path):
    from ._netns import Lan, clanctl, clanctl_json, wait_until
    from .test_mesh_netns import overlay_of, start_clan

    kernel, initrd = image.build_image(tmp_path / "img")
    lan = Lan(2)
    lan.setup()
    homes = []
    try:
        homes, socks, _ = start_clan(lan, tmp_path, 2)
        m1 = overlay_of(socks[0], "m1")
        wait_until(lambda: lan.ping(1, m1), 40, "m2 to reach m1 over WireGuard")
        inv = tmp_path / "inventory.toml"
        inv.write_text(
            clanctl(socks[0], "inventory", "show")
            + f'\n[vms.web]\nmachines = ["m1"]\nmemory_mb = 128\nnetworks = ["clan"]\n'
            f'kernel = "{kernel}"\ninitrd = "{initrd}"\n'
        )
        clanctl(
            socks[0],
            "inventory",
            "apply",
            str(inv),
            "--admin-key",
            str(tmp_path / "admin.key"),
            "--yes",
        )

        def web_row():
            rows = clanctl_json(socks[1], "vm", "list")
            return next((r for r in rows if r["vm"] == "web"), {})

        wait_until(lambda: web_row().get("state") == "running", 30, "m2 to see the VM running")
        addr = web_row()["overlay"]
        clan_net = ipaddress.IPv6Network(f"{m1}/64", strict=False)
        assert ipaddress.IPv6Address(addr) in clan_net
        assert addr in clanctl(socks[1], "vm", "list")  # the OVERLAY column
        console = homes[0] / "state" / "vms" / "web" / "console.log"
        wait_until(
            lambda: console.exists() and f"VM_NET_READY {addr}".encode() in console.read_bytes(),
            30,
            "the guest to configure its clan NIC",
        )
        took = wait_until(lambda: lan.ping(1, addr), 30, "m2 to ping the VM over WireGuard")
        print(f"m2 -> VM {addr}: ping ok {took:.2f} s after the guest was up")
        wg = subprocess.run(
            ["ip", "netns", "exec", lan.hosts[1], "wg", "show", f"{lan.prefix}w2", "allowed-ips"],
            capture_output=True,
            text=True,
        ).stdout
        assert f"{addr}/128" in wg
        route = subprocess.run(
            ["ip", "-n", lan.hosts[0], "-6", "route", "show", addr],
            capture_output=True,
            text=True,
        ).stdout
        assert route.startswith(addr) and " dev vm" in route
        # m2 opens the VM's serial console over the mesh (m2's agent -> m1's
        # agent on its overlay address), and the guest pings m2's overlay address
        m2 = overlay_of(socks[0], "m2")

        def over_console(typed: str) -> bytes:
            r = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "clanagent.cli.clanctl",
                    "--socket",
                    str(socks[1]),
                    "vm",
                    "console",
                    "web",
                    "--admin-key",
                    str(tmp_path / "admin.key"),
                    "--linger",
                    "5",
                ],
                input=typed.encode(),
                capture_output=True,
                timeout=60,
            )
            assert r.returncode == 0, r.stderr
            return r.stdout

        out = over_console(f"ping -c1 -W3 {m2} >/dev/null && echo GUEST-REACHED-$((40+2))\n")
        assert b"GUEST-REACHED-42" in out, out[-2000:]

        # A guest that claims its host's overlay address must not get a packet
        # out (m1's policy rules drop it): m2 counts the echo requests it gets.
        def echos_at_m2() -> int:
            snmp = subprocess.run(
                ["ip", "netns", "exec", lan.hosts[1], "cat", "/proc/net/snmp6"],
                capture_output=True,
                text=True,
            ).stdout
            return int(
                next(ln.split()[1] for ln in snmp.splitlines() if ln.startswith("Icmp6InEchos "))
            )

        before = echos_at_m2()
        out = over_console(
            f"ip -6 addr add {m1}/128 dev eth0\n"
            f"ping -c2 -W1 -I {m1} {m2} >/dev/null; echo SPOOF-$((1+1))-TRIED\n"
        )
        assert b"SPOOF-2-TRIED" in out, out[-2000:]
        assert echos_at_m2() == before, "a spoofed packet from the VM reached m2"
        rules = subprocess.run(
            ["ip", "-n", lan.hosts[0], "-6", "rule", "show"], capture_output=True, text=True
        ).stdout
        assert f"from {addr} iif vm" in rules and "blackhole" in rules, rules
    finally:
        lan.teardown()
        # VMs outlive their agent on purpose (a restart adopts them): stop ours.
        for pidfile in tmp_path.glob("m*/state/vms/*/vmm.pid"):
            try:
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        for home in homes:
            log = home / "agent.log"
            if log.exists() and "Traceback" in log.read_text():
                print(log.read_text()[-3000:])
