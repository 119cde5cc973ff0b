"""The VM service on its ports alone: an in-memory backend, an in-memory bus, a virtual clock.

What goes in is what the agent hands it (a real inventory, records arriving
on the bus); what comes out is what the agent would gossip (records on the
bus, checked with the same body check as the agent's own records). No
process, no socket, no agent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import nacl.signing
import pytest
import trio
import trio.testing

from clanagent import records
from clanagent.identity import Identity
from clanagent.inventory import Anchor, make_version
from clanagent.inventory.manager import InventoryManager
from clanagent.vmhost.backend import Backend
from clanagent.vmhost.requests import REQUEST_KIND, sign_request
from clanagent.vmhost.service import (
    LOGS_KIND,
    LOGS_REQUEST_KIND,
    VM_STATUS_KIND,
    VmService,
)
from clanagent.vmhost.spec import HostLimits
from clanagent.wire import SignedRecord

from ._fake_ports import fake_ports
from ._fake_vm_backend import FakeHost, FakeVmBackend, fake_backends, inline
from .test_inventory_agent import genesis, machine_entry

STATUS_FIELDS = {
    "vm", "machine", "state", "reason", "accel", "pid", "crashes", "booted", "overlay", "at",
}  # fmt: skip


class Clan:
    """m1 hosts VM "web" (by tag), m2 hosts nothing; the service runs as m1."""

    def __init__(self, tmp_path, host: FakeHost | None = None) -> None:
        self.tmp = tmp_path
        self.admin = nacl.signing.SigningKey.generate()
        self.m1, self.m2 = Identity.generate(), Identity.generate()
        kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
        kernel.write_bytes(b"not a kernel: the fake backend never reads it")
        initrd.write_bytes(b"")
        self.doc = genesis(
            self.admin,
            {"m1": machine_entry(self.m1, ["vmhost"]), "m2": machine_entry(self.m2, [])},
        )
        self.doc["vms"]["web"] = {
            "machines": [],
            "tags": ["vmhost"],
            "count": 1,
            "vcpus": 1,
            "memory_mb": 128,
            "kernel": str(kernel),
            "initrd": str(initrd),
            "rootfs": "",
            "disk_mb": 0,
            "networks": [],
            "secrets": [],
            "backend": "auto",
            "graphics": False,
        }
        version = make_version(self.doc, [], int(time.time()), "vms", [self.admin])
        anchor = Anchor(self.doc["clan"]["id"], "test", tuple(self.doc["clan"]["admins"]))
        self.inventory = InventoryManager(anchor)
        self.inventory.offer_version(version)
        self.version = version
        assert self.inventory.inventory is not None
        self.host = host if host is not None else FakeHost()
        self.ports = fake_ports(self.m1, inventory=self.inventory, check=self._check)
        self.heard: list[tuple[float, SignedRecord]] = []
        self._changed = trio.Event()
        self.ports.bus.subscribe([VM_STATUS_KIND, LOGS_KIND], self._hear)
        self.host.listeners.append(self._poke)

    def _check(self, kind: str, key: str, body: Any) -> bool:
        """The agent's own-record check (`Agent.check_own_record`): the body as
        every peer will judge it."""
        ctx = records.RecordContext(now=self.ports.clock.wall(), inventory=self.inventory.inventory)
        trial = SignedRecord.create(self.m1, kind, key, 1, body, clan=self.inventory.anchor.clan_id)
        try:
            records.validate(trial, ctx)
        except records.Refusal:
            return False
        return True

    def _hear(self, rec: SignedRecord) -> None:
        self.heard.append((trio.current_time(), rec))
        self._poke()

    def _poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def service(self) -> VmService:
        return VmService(
            self.ports,
            state_dir=self.tmp / "state",
            runtime_dir=self.tmp / "run",
            backends=lambda: fake_backends(self.host),
            host_limits=lambda: HostLimits.from_totals(4, 8192),
            run_sync=inline,
        )

    def status(self, vm: str = "web") -> dict[str, Any] | None:
        rec = self.ports.store.get(self.m1.public_key, VM_STATUS_KIND, vm)
        return None if rec is None else rec.body

    async def until(self, what: Callable[[], bool]) -> float:
        """Wait until a record on the bus (or a change on the fake host) makes
        `what` true; return when it did."""
        while not what():
            await self._changed.wait()
        return trio.current_time()

    def deliver(self, ident: Identity, kind: str, key: str, body: Any, version: int = 1) -> None:
        """A peer's record arrives (gossip stored it): the bus hands it to subscribers."""
        rec = SignedRecord.create(ident, kind, key, version, body)
        assert self.ports.bus.deliver(rec)


def run(main: Callable[[], Any]) -> None:
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_fake_is_a_backend():
    assert isinstance(FakeVmBackend(), Backend)


def test_a_placed_vm_runs_reports_and_stops_on_an_order_from_the_bus(tmp_path):
    clan = Clan(tmp_path)
    svc = clan.service()

    async def main() -> None:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(svc.run)
                await clan.until(lambda: (clan.status() or {}).get("state") == "running")
                assert clan.host.started == ["web"]
                body = clan.status()
                assert set(body) == STATUS_FIELDS
                assert body["machine"] == "m1" and body["accel"] == "fake"
                assert body["pid"] == svc.handles["web"].pid and body["reason"] == ""
                assert body["at"] == int(clan.ports.clock.wall())  # the clock port
                assert clan.ports.bus.refused == []  # every body passed the peers' check
                caps = svc.capability()
                assert caps.available and "default fake" in caps.reason

                # m2 gossips an admin's stop order: it reaches the service through the bus
                await trio.sleep(0.5)  # (any moment between two ticks)
                ordered = trio.current_time()
                req = sign_request(clan.admin, "web", "stop", int(clan.ports.clock.wall()))
                clan.deliver(clan.m2, REQUEST_KIND, "web", req.to_wire())
                stopped = await clan.until(
                    lambda: (clan.status() or {}).get("state") == "stopped (by an admin)"
                )
                assert stopped == ordered  # woken by the record, not at the next tick
                assert clan.host.stopped == [("web", "poweroff")] and not clan.host.running
                assert "web" not in svc.handles and clan.status()["pid"] == 0

                # and a start order brings it back
                req = sign_request(clan.admin, "web", "start", req.at + 1)
                clan.deliver(clan.m2, REQUEST_KIND, "web", req.to_wire(), version=2)
                await clan.until(lambda: (clan.status() or {}).get("state") == "running")
                assert clan.host.started == ["web", "web"]
                assert clan.ports.bus.refused == []
                nursery.cancel_scope.cancel()

    run(main)


def test_an_inventory_change_through_the_port_stops_a_vm_at_once(tmp_path):
    clan = Clan(tmp_path)
    svc = clan.service()

    async def main() -> None:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(svc.run)
                await clan.until(lambda: (clan.status() or {}).get("state") == "running")
                await trio.sleep(0.5)
                doc = {**clan.doc, "vms": {}}
                v2 = make_version(doc, [clan.version.hash], int(time.time()), "-", [clan.admin])
                changed = trio.current_time()
                clan.inventory.offer_version(v2)  # the InventoryView tells its listeners
                assert await clan.until(lambda: clan.host.stopped != []) == changed
                assert clan.host.stopped == [("web", "poweroff")]
                # (its last status names a VM no longer placed here: peers would
                # refuse it, so the agent's own check keeps it back)
                assert [k for k, _, _ in clan.ports.bus.refused] == [VM_STATUS_KIND]
                nursery.cancel_scope.cancel()

    run(main)


def test_placement_is_computed_once_per_inventory_version_not_every_tick(tmp_path, monkeypatch):
    """Placement hashes every candidate machine of every VM (VMs x machines
    in a clan of 1000): the service computes it when the inventory changes,
    not on each tick."""
    from clanagent.inventory import select

    calls: list[str] = []
    real = select.vms_for

    def counting(doc, machine):
        calls.append(machine)
        return real(doc, machine)

    monkeypatch.setattr(select, "vms_for", counting)
    clan = Clan(tmp_path)
    svc = clan.service()

    async def main() -> None:
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                await nursery.start(svc.run)
                await clan.until(lambda: (clan.status() or {}).get("state") == "running")
                await trio.sleep(30.0)  # about 15 ticks
                assert calls == ["m1"]
                doc = {**clan.doc, "vms": {}}
                v2 = make_version(doc, [clan.version.hash], int(time.time()), "-", [clan.admin])
                clan.inventory.offer_version(v2)
                await clan.until(lambda: clan.host.stopped != [])  # the new placement acted on
                await trio.sleep(30.0)
                assert calls == ["m1", "m1"]
                nursery.cancel_scope.cancel()

    run(main)


def test_a_restarted_service_adopts_the_fake_vm(tmp_path):
    clan = Clan(tmp_path)

    async def main() -> None:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                first = clan.service()
                await nursery.start(first.run)
                await clan.until(lambda: (clan.status() or {}).get("state") == "running")
                pid = first.handles["web"].pid
                nursery.cancel_scope.cancel()  # the agent stops: the VM runs on
            assert list(clan.host.running) and clan.host.stopped == []
            async with trio.open_nursery() as nursery:
                second = clan.service()
                await nursery.start(second.run)
                assert second.handles["web"].adopted and second.handles["web"].pid == pid
                await trio.sleep(10)
                assert clan.host.started == ["web"]  # never started twice
                assert clan.status()["state"] == "running"
                nursery.cancel_scope.cancel()

    run(main)


def test_a_logs_request_on_the_bus_is_answered_with_the_tail(tmp_path):
    clan = Clan(tmp_path)
    svc = clan.service()
    svc.local_tail = lambda name, max_bytes=16 * 1024: b"booting\nVM_READY\n"

    async def main() -> None:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(svc.run)
                await clan.until(lambda: (clan.status() or {}).get("state") == "running")
                await trio.sleep(0.5)
                asked = trio.current_time()
                clan.deliver(
                    clan.m2, LOGS_REQUEST_KIND, "web", {"at": int(clan.ports.clock.wall())}
                )
                answered = await clan.until(
                    lambda: clan.ports.store.get(clan.m1.public_key, LOGS_KIND, "web") is not None
                )
                assert answered == asked
                body = clan.ports.store.get(clan.m1.public_key, LOGS_KIND, "web").body
                assert body["machine"] == "m1" and body["tail"] == b"booting\nVM_READY\n"
                assert clan.ports.bus.refused == []
                nursery.cancel_scope.cancel()

    run(main)


@pytest.mark.parametrize("kind", ["vm-status", "topology"])
def test_other_machines_records_do_not_wake_the_service(tmp_path, kind):
    clan = Clan(tmp_path)
    svc = clan.service()
    clan.deliver(clan.m2, kind, "web", {"anything": 1})
    assert not svc._wakeup.is_set()
    clan.deliver(clan.m2, REQUEST_KIND, "x", {"anything": 1})
    assert svc._wakeup.is_set()


def test_an_unchanged_status_is_refreshed_unpushed_and_a_change_is_pushed(tmp_path):
    """vm-status is soft: an unchanged status goes out again before its TTL
    runs out, by anti-entropy only (push=False); a change is pushed."""
    refresh = records.spec(VM_STATUS_KIND).refresh
    clan = Clan(tmp_path)
    svc = clan.service()

    async def main() -> None:
        with trio.fail_after(4 * refresh):
            async with trio.open_nursery() as nursery:
                await nursery.start(svc.run)
                await clan.until(lambda: (clan.status() or {}).get("state") == "running")
                bus = clan.ports.bus
                first = len(bus.published)
                assert bus.unpushed == []  # every change so far was pushed
                await trio.sleep(refresh * 1.05)
                refreshed = bus.published[first:]
                assert refreshed and bus.unpushed == refreshed
                assert all(r.body["state"] == "running" for r in refreshed)
                req = sign_request(clan.admin, "web", "stop", int(clan.ports.clock.wall()))
                clan.deliver(clan.m2, REQUEST_KIND, "web", req.to_wire())
                await clan.until(lambda: (clan.status() or {}).get("state") != "running")
                assert bus.published[-1] not in bus.unpushed  # the change: pushed
                nursery.cancel_scope.cancel()

    run(main)


def test_a_logs_request_for_a_stopped_vm_placed_here_is_answered(tmp_path):
    """A VM placed here but stopped (and never run: no console log) still gets
    an answer, an empty tail from this machine, so `clanctl vm logs` on
    another machine does not wait for an answer nobody would give."""
    clan = Clan(tmp_path)
    svc = clan.service()

    async def main() -> None:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(svc.run)
                await clan.until(lambda: (clan.status() or {}).get("state") == "running")
                req = sign_request(clan.admin, "web", "stop", int(clan.ports.clock.wall()))
                clan.deliver(clan.m2, REQUEST_KIND, "web", req.to_wire())
                await clan.until(lambda: "web" not in svc.handles)
                assert svc.local_tail("web") is None  # the fake leaves no console log
                clan.deliver(
                    clan.m2, LOGS_REQUEST_KIND, "web", {"at": int(clan.ports.clock.wall())}
                )
                await clan.until(
                    lambda: clan.ports.store.get(clan.m1.public_key, LOGS_KIND, "web") is not None
                )
                body = clan.ports.store.get(clan.m1.public_key, LOGS_KIND, "web").body
                assert body["machine"] == "m1" and body["tail"] == b""
                assert clan.ports.bus.refused == []
                nursery.cancel_scope.cancel()

    run(main)
