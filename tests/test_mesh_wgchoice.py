"""Which WireGuard backend a machine gets, and why (mesh/wgchoice.py), with fake probes.

The kernel is tried by creating (or adopting) the link; wireguard-go is the
fallback; the reason is what `clanctl status` shows.  The kernel backend's
adoption rule (our own private key, or an empty unkeyed link) and its
release-on-stop run against a fake netlink transport here; the real kernel
runs them in tests/test_mesh_kernel_vm.py.
"""

from __future__ import annotations

import base64

import pytest
import trio
from pyroute2.netlink.generic.wireguard import WG_CMD_SET_DEVICE

from clanagent.capabilities import _wireguard
from clanagent.mesh.wgchoice import Choice, KernelAttempt, close_backend, decide, open_backend
from clanagent.mesh.wgnetlink import KernelBackend
from clanagent.mesh.wireguard import Device, PeerConfig, WireGuardLocalError

from .test_mesh_wireguard import PRIV, _dump_reply

OURS, THEIRS, PEER = PRIV, bytes([2]) * 32, bytes([3]) * 32


def _reply(dev: Device) -> list:
    """A GET_DEVICE dump of DEV, whose private key may be another one or none."""
    msgs = _dump_reply(dev)
    attrs = [a for a in msgs[0]["attrs"] if a[0] != "WGDEVICE_A_PRIVATE_KEY"]
    if dev.private_key is not None:
        attrs.append(["WGDEVICE_A_PRIVATE_KEY", base64.b64encode(dev.private_key).decode()])
    msgs[0]["attrs"] = attrs
    return msgs


# -- decide: the table ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "wg_go", "tun", "kind", "reason"),
    [
        (KernelAttempt("created"), None, False, "kernel", "kernel (netlink)"),
        (KernelAttempt("adopted"), None, False, "kernel", "kernel (netlink), adopted"),
        (
            KernelAttempt("unavailable", "[Errno 95] Operation not supported"),
            "/usr/bin/wireguard-go",
            True,
            "userspace",
            "userspace (wireguard-go): kernel module not available: [Errno 95] Operation not",
        ),
        (KernelAttempt("unavailable", "nope"), None, True, None, "no wireguard-go on PATH"),
        (KernelAttempt("unavailable", "nope"), "/x/wireguard-go", False, None, "/dev/net/tun"),
        # the name is taken by something not ours: wireguard-go would collide too
        (KernelAttempt("taken", "wg0: exists already"), "/x/wireguard-go", True, None, "wg0"),
    ],
)
def test_decide(attempt, wg_go, tun, kind, reason) -> None:
    got = decide(attempt, wg_go, tun)
    assert got.kind == kind
    assert got.reason.startswith(reason) or reason in got.reason, got.reason


def test_kernel_attempt_outcomes_are_checked() -> None:
    with pytest.raises(ValueError):
        KernelAttempt("maybe")


# -- open_backend: the shell, with fake backends ------------------------------------------


class FakeKernel:
    kind = "kernel"

    def __init__(self, name: str, result: str | Exception) -> None:
        self.name = name
        self.result = result
        self.released = self.destroyed = False

    async def open(self, private_key: bytes) -> str:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result

    async def release(self) -> None:
        self.released = True

    async def destroy(self) -> None:
        self.destroyed = True


class FakeUserspace:
    kind = "userspace"

    def __init__(self, name: str, fail: bool = False) -> None:
        self.name = name
        self.created = self.destroyed = False
        self.fail = fail

    async def create(self) -> None:
        if self.fail:
            raise WireGuardLocalError("wireguard-go exited with 1")
        self.created = True

    async def destroy(self) -> None:
        self.destroyed = True


def _open(kernel_result, *, wg_go="/usr/bin/wireguard-go", tun_ok=True, tmp_path, us_fail=False):
    made: dict[str, object] = {}

    def kernel(name):
        made["kernel"] = FakeKernel(name, kernel_result)
        return made["kernel"]

    def userspace(name):
        made["userspace"] = FakeUserspace(name, us_fail)
        return made["userspace"]

    tun = tmp_path / "tun"
    if tun_ok:
        tun.touch()

    async def go():
        return await open_backend(
            "wg0", OURS, kernel=kernel, userspace=userspace, which=lambda n: wg_go, tun=tun
        )

    backend, choice = trio.run(go)
    return backend, choice, made


def test_kernel_when_it_can_create_the_link(tmp_path) -> None:
    backend, choice, made = _open("created", tmp_path=tmp_path)
    assert backend is made["kernel"] and choice == Choice("kernel", "kernel (netlink)")
    assert "userspace" not in made  # wireguard-go is not even started


def test_falls_back_to_wireguard_go_with_the_kernel_error(tmp_path) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    err = NetlinkError(95, "Operation not supported")
    backend, choice, made = _open(err, tmp_path=tmp_path)
    assert backend is made["userspace"] and backend.created
    assert choice.kind == "userspace"
    assert choice.reason.startswith("userspace (wireguard-go): kernel module not available: ")
    assert choice.reason.endswith("creating a wireguard link: Operation not supported (errno 95)")


def test_no_backend_at_all_is_a_reason_not_an_error(tmp_path) -> None:
    backend, choice, made = _open(OSError("no module"), wg_go=None, tmp_path=tmp_path)
    assert backend is None and choice.kind is None and "no module" in choice.reason
    backend, choice, _ = _open(OSError("no module"), tmp_path=tmp_path, us_fail=True)
    assert backend is None and "wireguard-go failed: wireguard-go exited with 1" in choice.reason


def test_a_foreign_interface_of_that_name_is_not_worked_around(tmp_path) -> None:
    taken = WireGuardLocalError("wg0: an interface of that name exists already (kind veth)")
    backend, choice, made = _open(taken, tmp_path=tmp_path)
    assert backend is None and "exists already" in choice.reason and "userspace" not in made


def test_stop_keeps_the_kernel_interface_and_ends_wireguard_go() -> None:
    k, u = FakeKernel("wg0", "created"), FakeUserspace("wg0")
    trio.run(close_backend, k)
    trio.run(close_backend, u)
    assert k.released and not k.destroyed
    assert u.destroyed


# -- KernelBackend.open: create, adopt or refuse (fake netlink) --------------------------


class Netlink:
    def __init__(self, kind: str | None, device: Device | None = None) -> None:
        self.kind = kind
        self.device = device
        self.calls: list[str] = []

    def link_exists(self, ifname):
        return self.kind is not None

    def link_kind(self, ifname):
        return self.kind

    def link_add(self, ifname):
        self.calls.append("add")
        self.kind = "wireguard"

    def link_del(self, ifname):
        self.calls.append("del")
        self.kind = None

    def request(self, msg):
        assert msg["cmd"] == WG_CMD_SET_DEVICE
        self.calls.append("set")

    def dump(self, msg):
        self.calls.append("get")
        return _reply(self.device)


def _kopen(t: Netlink) -> tuple[KernelBackend, str]:
    b = KernelBackend("wg7", transport=t)

    async def go():
        return await b.open(OURS)

    return b, trio.run(go)


def test_kernel_open_creates_a_missing_link() -> None:
    t = Netlink(None)
    b, how = _kopen(t)
    assert how == "created" and b.owned and not b.adopted and t.calls == ["add"]


def test_kernel_open_adopts_our_own_interface_untouched() -> None:
    dev = Device(OURS, 51820, {PEER: PeerConfig(PEER, "10.0.0.2:51820", ("fd00::2/128",), 25)})
    t = Netlink("wireguard", dev)
    b, how = _kopen(t)
    assert how == "adopted" and b.owned and b.adopted
    assert t.calls == ["get"]  # read, never re-created nor reconfigured
    trio.run(b.release)
    assert not b.owned and t.kind == "wireguard"  # release leaves it in place


def test_kernel_open_adopts_an_unkeyed_empty_link() -> None:
    # we created it and stopped before the first reconcile set the key
    b, how = _kopen(Netlink("wireguard", Device(None, 0, {})))
    assert how == "adopted"


@pytest.mark.parametrize(
    ("kind", "device", "match"),
    [
        ("veth", None, "kind veth"),
        ("", None, "kind tun"),  # e.g. a wireguard-go TUN
        ("wireguard", Device(THEIRS, 51820, {}), "another private key"),
        # unkeyed but with peers: someone is configuring it
        (
            "wireguard",
            Device(None, 0, {PEER: PeerConfig(PEER, None, ("fd00::2/128",), None)}),
            "another private key",
        ),
    ],
)
def test_kernel_open_refuses_what_is_not_ours(kind, device, match) -> None:
    t = Netlink(kind, device)
    b = KernelBackend("wg7", transport=t)

    async def go():
        await b.open(OURS)

    with pytest.raises(WireGuardLocalError, match=match):
        trio.run(go)
    assert not b.owned and "add" not in t.calls and "del" not in t.calls and "set" not in t.calls


# -- the capability hint ---------------------------------------------------------------------


def test_capability_hint(tmp_path, monkeypatch) -> None:
    import clanagent.capabilities as caps

    monkeypatch.setattr(caps, "has_net_admin", lambda: True)
    mods = tmp_path / "lib"
    (mods / "kernel/drivers/net/wireguard").mkdir(parents=True)
    no_sys = tmp_path / "sys-none"
    monkeypatch.setattr(caps.shutil, "which", lambda name: None)
    assert not _wireguard(no_sys, mods).available
    (mods / "kernel/drivers/net/wireguard/wireguard.ko").touch()
    assert _wireguard(no_sys, mods).reason == "kernel (netlink): module on disk"
    assert _wireguard(tmp_path, mods).reason == "kernel (netlink): module loaded"
    (mods / "kernel/drivers/net/wireguard/wireguard.ko").unlink()
    (mods / "modules.builtin").write_text("kernel/drivers/net/wireguard/wireguard.ko\n")
    assert _wireguard(no_sys, mods).reason == "kernel (netlink): built in"


# -- the mesh shows the choice (what `clanctl status` prints) ----------------------------------


async def test_mesh_reports_the_backend_and_why(tmp_path, monkeypatch) -> None:
    import ipaddress

    import clanagent.mesh.wgchoice as wgchoice
    from clanagent.mesh import netlink

    from .test_mesh_service_ports import FakeBackend, World

    why = "userspace (wireguard-go): kernel module not available: (95, 'Operation not supported')"
    backend = FakeBackend()
    closed: list = []

    async def fake_open(name, private_key):
        return backend, Choice("userspace", why)

    async def fake_close(b):
        closed.append(b)

    async def ok(*args, **kw):
        return True

    monkeypatch.setattr(wgchoice, "open_backend", fake_open)
    monkeypatch.setattr(wgchoice, "close_backend", fake_close)
    for name in ("ensure_address", "set_link_state", "ensure_route"):
        monkeypatch.setattr(netlink, name, ok)
    svc = World().service(tmp_path)
    svc.overlay6 = ipaddress.IPv6Address("fd00::1")
    await svc._start_wireguard()
    (row,) = [c for c in svc.capabilities() if c.name == "mesh.wireguard"]
    assert row.available and row.reason.startswith(why + "; interface clan0")
    await svc._stop_wireguard()
    assert closed == [backend] and svc.backend is None

    async def no_backend(name, private_key):
        return None, Choice(None, "no WireGuard: kernel module not available: x; no wireguard-go")

    monkeypatch.setattr(wgchoice, "open_backend", no_backend)
    await svc._start_wireguard()
    (row,) = [c for c in svc.capabilities() if c.name == "mesh.wireguard"]
    assert not row.available and row.reason.startswith("no WireGuard: kernel module")


# -- a start without a mesh removes what an earlier run left --------------------------------


def _leftover(t: Netlink) -> bool:
    from clanagent.mesh.wgchoice import remove_leftover

    async def go():
        return await remove_leftover("wg7", OURS, kernel=lambda n: KernelBackend(n, transport=t))

    return trio.run(go)


def test_leftover_interface_of_ours_is_removed() -> None:
    dev = Device(OURS, 51820, {PEER: PeerConfig(PEER, "10.0.0.2:51820", ("fd00::2/128",), 25)})
    t = Netlink("wireguard", dev)
    assert _leftover(t) is True
    assert t.calls == ["get", "del"] and t.kind is None
    # an unkeyed empty link is ours too (we stopped before the first reconcile)
    t = Netlink("wireguard", Device(None, 0, {}))
    assert _leftover(t) is True and t.calls[-1] == "del"


@pytest.mark.parametrize(
    ("kind", "device"),
    [
        (None, None),  # nothing there
        ("veth", None),
        ("", None),  # a TUN (wireguard-go's, or anyone's)
        ("wireguard", Device(THEIRS, 51820, {})),
        ("wireguard", Device(None, 0, {PEER: PeerConfig(PEER, None, ("fd00::2/128",), None)})),
    ],
)
def test_leftover_removal_leaves_what_is_not_ours(kind, device) -> None:
    t = Netlink(kind, device)
    assert _leftover(t) is False
    assert "del" not in t.calls


def test_leftover_removal_never_raises() -> None:
    class Broken(Netlink):
        def link_kind(self, ifname):
            raise PermissionError("EPERM")

    assert _leftover(Broken("wireguard")) is False


def test_leftover_check_without_such_an_interface_loads_no_netlink() -> None:
    from clanagent.mesh.wgchoice import remove_leftover

    # no kernel factory given, no netns: the name is looked up with one ioctl
    assert trio.run(remove_leftover, "clanw-none-zz", OURS) is False


async def test_mesh_turned_off_removes_our_leftover_interface(tmp_path, monkeypatch) -> None:
    import dataclasses

    import clanagent.mesh.wgchoice as wgchoice

    from .test_mesh_service_ports import World

    asked: list = []

    async def fake_remove(name, private_key):
        asked.append((name, private_key))
        return True

    async def never_open(name, private_key):
        raise AssertionError("a mesh turned off opens no backend")

    monkeypatch.setattr(wgchoice, "remove_leftover", fake_remove)
    monkeypatch.setattr(wgchoice, "open_backend", never_open)
    world = World()
    svc = world.service(tmp_path)
    svc.cfg = dataclasses.replace(svc.cfg, wireguard=False)
    await svc._start_wireguard()
    assert asked == [("clan0", world.ports.identity.wg_private)]
    (row,) = [c for c in svc.capabilities() if c.name == "mesh.wireguard"]
    assert not row.available
    assert "disabled (mesh.wireguard = false)" in row.reason
    assert "removed clan0 left by an earlier run" in row.reason
    assert svc.backend is None
