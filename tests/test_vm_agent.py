"""Micro VMs placed by the inventory, run by the agent, adopted after a restart."""

from __future__ import annotations

import os
import signal
import time

import nacl.signing
import pytest
import trio

from clanagent.identity import load_or_create
from clanagent.inventory import Anchor, make_version, save_anchor
from clanagent.vmhost.backend import RunDir, read_pidfile
from clanagent.vmhost.console import ConsoleLog

from .test_inventory_agent import call, genesis, machine_entry, start, wait_until
from .test_services_agent import cfg_for
from .test_vmhost_qemu import _missing, vm_assets  # noqa: F401 (a fixture)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_missing() is not None, reason=_missing() or ""),
]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return open(f"/proc/{pid}/stat").read().split()[2] != "Z"


async def test_agent_runs_adopts_and_reports_vms(tmp_path, vm_assets):  # noqa: F811
    vmlinux, initrd = vm_assets
    admin = nacl.signing.SigningKey.generate()
    ident = load_or_create(tmp_path / "s1")[0]
    ident2 = load_or_create(tmp_path / "s2")[0]
    doc = genesis(admin, {"m1": machine_entry(ident, ["vmhost"]), "m2": machine_entry(ident2, [])})
    vm = {
        "machines": [],
        "tags": ["vmhost"],
        "count": 1,
        "vcpus": 1,
        "memory_mb": 128,
        "kernel": vmlinux,
        "initrd": initrd,
        "rootfs": "",
        "disk_mb": 0,
        "networks": [],
        "secrets": [],
        "backend": "auto",
        "graphics": False,
    }
    doc["vms"]["web"] = vm
    doc["vms"]["broken"] = {**vm, "kernel": str(tmp_path / "no-such-vmlinux")}
    doc["vms"]["huge"] = {**vm, "memory_mb": 4194304}
    doc["vms"]["fc"] = {**vm, "backend": "firecracker"}  # no firecracker (or KVM) here
    v = make_version(doc, [], int(time.time()), "vms", [admin])
    rundir = RunDir(str(tmp_path / "s1" / "vms" / "web"))
    pid = None
    try:
        with trio.fail_after(90):
            async with trio.open_nursery() as n:
                a1, scope = await start(n, cfg_for(tmp_path, 1))
                await call(a1, "inventory.submit", {"version": v.to_wire(), "init": True})

                def rows():
                    return {r["vm"]: r for r in a1.vm_api.rows()}

                await wait_until(
                    lambda: rows().get("web", {}).get("state") == "running", "the VM to run", 40
                )
                await wait_until(
                    lambda: ConsoleLog(rundir.console).contains(b"VM_READY"),
                    "the guest to report ready",
                    30,
                )
                listed = {r["vm"]: r for r in await call(a1, "vm.list")}
                assert listed["web"]["accel"] in ("tcg", "kvm") and listed["web"]["machine"] == "m1"
                assert listed["broken"]["state"] == "failed"
                assert "no-such-vmlinux" in listed["broken"]["reason"]
                assert listed["huge"]["state"] == "failed" and "memory" in listed["huge"]["reason"]
                assert listed["fc"]["state"] == "failed"
                assert "backend firecracker is not usable here" in listed["fc"]["reason"]
                caps = {c["name"]: c for c in (await call(a1, "status"))["capabilities"]}
                assert caps["vms"]["available"]
                pid = read_pidfile(rundir.pidfile)
                assert pid
                # the agent stops: the VM keeps running
                scope.cancel()
                await trio.sleep(0.5)
                os.kill(pid, 0)
                # a new agent adopts it instead of starting another
                a1b, _ = await start(n, cfg_for(tmp_path, 1))
                await wait_until(
                    lambda: (
                        {r["vm"]: r for r in a1b.vm_api.rows()}.get("web", {}).get("state")
                        == "running"
                    ),
                    "adoption",
                    30,
                )
                assert read_pidfile(rundir.pidfile) == pid
                assert a1b.vms.handles["web"].adopted

                # admin orders, signed with the admin key, from the control socket
                from clanagent.control.client import ClientError
                from clanagent.vmhost.requests import sign_request

                def state():
                    return {r["vm"]: r for r in a1b.vm_api.rows()}.get("web", {}).get("state")

                intruder = nacl.signing.SigningKey.generate()
                with pytest.raises(ClientError) as exc:
                    await call(
                        a1b,
                        "vm.request",
                        {
                            "request": sign_request(
                                intruder, "web", "stop", int(time.time())
                            ).to_wire()
                        },
                    )
                assert "not signed by an admin" in exc.value.message
                req = sign_request(admin, "web", "stop", int(time.time()))
                reply = await call(a1b, "vm.request", {"request": req.to_wire()})
                assert reply["hosts"] == ["m1"]
                await wait_until(lambda: state() == "stopped (by an admin)", "the stop", 30)
                await wait_until(lambda: not _alive(pid), "qemu to exit", 10)
                req = sign_request(admin, "web", "start", int(time.time()) + 1)
                await call(a1b, "vm.request", {"request": req.to_wire()})
                await wait_until(lambda: state() == "running", "the start", 40)
                pid = read_pidfile(rundir.pidfile)
                await wait_until(
                    lambda: ConsoleLog(rundir.console).tail().count(b"VM_READY") >= 2,
                    "the second boot",
                    30,
                )

                # another machine reads the console over the mesh
                save_anchor(
                    tmp_path / "s2",
                    Anchor(
                        doc["clan"]["id"],
                        "t",
                        tuple(doc["clan"]["admins"]),
                        (a1b.gossip.addr,),
                        "m2",
                    ),
                )
                a2, _ = await start(n, cfg_for(tmp_path, 2))
                await wait_until(lambda: a2.inventory.inventory is not None, "m2's inventory", 20)
                since = int(time.time())
                with trio.fail_after(20):
                    while True:
                        got = await call(a2, "vm.logs", {"name": "web", "since": since})
                        if not got.get("pending"):
                            break
                        await trio.sleep(0.2)
                assert got["machine"] == "m1" and b"VM_READY" in got["tail"]
                assert {r["vm"]: r for r in await call(a2, "vm.list")}["web"][
                    "state"
                ] == "running"  # and m2 sees it running on m1
                n.cancel_scope.cancel()
    finally:
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
