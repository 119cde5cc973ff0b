"""Unit tests: the WireGuard reconciler, the UAPI codec/client and the netlink messages."""

from __future__ import annotations

import base64
import ipaddress
import socket
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink.generic.wireguard import (
    WG_CMD_GET_DEVICE,
    WG_CMD_SET_DEVICE,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    WGPEER_F_UPDATE_ONLY,
    wgmsg,
)

from clanagent.mesh import wgnetlink
from clanagent.mesh.uapi import (
    UapiClient,
    UapiError,
    UserspaceBackend,
    encode_set,
    parse_errno,
    parse_get,
)
from clanagent.mesh.wgnetlink import (
    KernelBackend,
    build_get_message,
    build_set_messages,
    parse_device,
)
from clanagent.mesh.wireguard import (
    KEEPALIVE,
    Backend,
    Device,
    Diff,
    InterfaceConfig,
    MeshPeer,
    PeerConfig,
    PeerStatus,
    PeerUpdate,
    WireGuardLocalError,
    WireGuardRemoteError,
    configure_order,
    desired_from,
    initiator,
    normalize_endpoint,
    reconcile,
)

K = [bytes([i]) * 32 for i in range(10)]
PRIV = b"\x40" * 32


def peer(i: int, endpoint=None, ips=None, ka=None) -> PeerConfig:
    return PeerConfig(K[i], endpoint, tuple(ips or (f"fd00::{i}/128",)), ka)


# --- value types ---------------------------------------------------------------


def test_peer_config_normalizes() -> None:
    p = PeerConfig(K[1], "[FD00:0::0001]:51820", ("10.0.0.1/32", "fd00::1/128", "10.0.0.1/32"), 0)
    assert p.endpoint == "[fd00::1]:51820"
    assert p.allowed_ips == ("10.0.0.1/32", "fd00::1/128")
    assert p.keepalive is None  # 0 and None are the same "off"
    assert normalize_endpoint("10.1.2.3:1") == "10.1.2.3:1"


@pytest.mark.parametrize(
    "endpoint",
    [
        "example.com:51820",
        "10.0.0.1",
        "10.0.0.1:0",
        "10.0.0.1:70000",
        ":5",
        "[fd00::1]:x",
        "1.2.3.4:+5",
    ],
)
def test_bad_endpoints(endpoint: str) -> None:
    with pytest.raises(WireGuardLocalError):
        PeerConfig(K[1], endpoint)


def test_bad_values() -> None:
    with pytest.raises(WireGuardLocalError):
        PeerConfig(b"short")
    with pytest.raises(WireGuardLocalError):
        PeerConfig(K[1], allowed_ips=("10.0.0.1/24",))  # host bits set
    with pytest.raises(WireGuardLocalError):
        PeerConfig(K[1], allowed_ips="fd00::1/128")  # a str is not a tuple
    with pytest.raises(WireGuardLocalError):
        PeerConfig(K[1], keepalive=70000)
    with pytest.raises(WireGuardLocalError):
        InterfaceConfig(PRIV, 51820, {K[2]: peer(1)})
    with pytest.raises(WireGuardLocalError):
        InterfaceConfig(PRIV, 70000)


# --- reconcile -----------------------------------------------------------------


def test_reconcile_from_empty_device() -> None:
    desired = InterfaceConfig(PRIV, 51820, {K[2]: peer(2), K[1]: peer(1, "10.0.0.1:5", ka=25)})
    d = reconcile(desired, Device(None, 0))
    assert d.private_key == PRIV and d.listen_port == 51820
    assert [p.public_key for p in d.add] == [K[1], K[2]]  # sorted: deterministic requests
    assert d.update == () and d.remove == ()
    assert not d.empty


def test_reconcile_identical_is_empty() -> None:
    peers = {K[1]: peer(1, "10.0.0.1:5", ka=25)}
    d = reconcile(InterfaceConfig(PRIV, 51820, peers), Device(PRIV, 51820, dict(peers)))
    assert d.empty and d == Diff()


def test_reconcile_only_changed_fields() -> None:
    actual = Device(
        PRIV,
        51820,
        {
            K[1]: peer(1, "10.0.0.1:5", ka=25),
            K[2]: peer(2, "10.0.0.2:5"),
            K[3]: peer(3, "10.0.0.3:5", ka=25),
            K[4]: peer(4),
        },
    )
    desired = InterfaceConfig(
        PRIV,
        51820,
        {
            K[1]: peer(1, "10.0.0.9:5", ka=25),  # endpoint moved
            K[2]: peer(2, None),  # no opinion on the endpoint: leave it
            K[3]: peer(3, "10.0.0.3:5", ips=("fd00::3/128", "10.1.0.3/32")),  # ips; keepalive off
        },
    )
    d = reconcile(desired, actual)
    assert d.private_key is None and d.listen_port is None and d.add == ()
    assert d.update == (
        PeerUpdate(K[1], endpoint="10.0.0.9:5"),
        PeerUpdate(K[3], allowed_ips=("10.1.0.3/32", "fd00::3/128"), keepalive=0),
    )
    assert d.remove == (K[4],)


def test_reconcile_listen_port_none_is_no_opinion() -> None:
    assert reconcile(InterfaceConfig(PRIV, None), Device(PRIV, 43210)).empty
    assert reconcile(InterfaceConfig(PRIV, 1), Device(PRIV, 43210)).listen_port == 1
    assert reconcile(InterfaceConfig(PRIV, 1), Device(K[5], 1)).private_key == PRIV


def _apply_model(dev: Device, diff: Diff) -> Device:
    """What a correct backend does with a diff (the UAPI/netlink semantics)."""
    peers = dict(dev.peers)
    for k in diff.remove:
        del peers[k]
    for p in diff.add:
        peers[p.public_key] = p
    for u in diff.update:
        old = peers[u.public_key]
        peers[u.public_key] = PeerConfig(
            u.public_key,
            u.endpoint if u.endpoint is not None else old.endpoint,
            u.allowed_ips if u.allowed_ips is not None else old.allowed_ips,
            u.keepalive if u.keepalive is not None else old.keepalive,
        )
    return Device(
        diff.private_key or dev.private_key,
        diff.listen_port if diff.listen_port is not None else dev.listen_port,
        peers,
    )


keys = st.sampled_from(K[:6])
peer_st = st.builds(
    lambda k, ep, ips, ka: PeerConfig(k, ep, ips, ka),
    keys,
    st.one_of(st.none(), st.sampled_from(["10.0.0.1:1", "10.0.0.2:2", "[fd00::1]:3"])),
    st.lists(st.sampled_from(["fd00::1/128", "fd00::2/128", "10.9.0.1/32"]), max_size=3).map(tuple),
    st.sampled_from([None, 25, 10]),
)
peers_st = st.lists(peer_st, max_size=6).map(lambda ps: {p.public_key: p for p in ps})


@given(peers_st, peers_st, st.sampled_from([None, 1, 2]), st.sampled_from([0, 1, 2]))
@settings(max_examples=300)
def test_reconcile_converges_and_is_minimal(want, have, want_port, have_port) -> None:
    desired = InterfaceConfig(PRIV, want_port, want)
    actual = Device(K[9], have_port, have)
    diff = reconcile(desired, actual)
    after = _apply_model(actual, diff)
    assert reconcile(desired, after).empty
    # Minimal: only peers that differ are touched, and an update never
    # repeats a value the device already has.
    assert set(diff.remove) == set(have) - set(want)
    assert {p.public_key for p in diff.add} == set(want) - set(have)
    for u in diff.update:
        old = have[u.public_key]
        assert not u.empty
        assert u.endpoint is None or u.endpoint != old.endpoint
        assert u.allowed_ips is None or u.allowed_ips != old.allowed_ips
        assert u.keepalive is None or (u.keepalive or None) != old.keepalive
    untouched = set(want) & set(have) - {u.public_key for u in diff.update}
    for k in untouched:
        assert _apply_model(actual, diff).peers[k] == have[k]


# --- initiator / desired_from ----------------------------------------------------


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_initiator_exactly_one_side(a: bytes, b: bytes) -> None:
    if a == b:
        with pytest.raises(WireGuardLocalError):
            initiator(a, b)
    else:
        assert initiator(a, b) != initiator(b, a)


def test_configure_order_responders_first() -> None:
    order = configure_order([K[2], K[7], K[1], K[7]])
    assert order == [K[7], K[2], K[1]]
    # everyone is configured after every peer it initiates to
    for i, a in enumerate(order):
        for b in order[i + 1 :]:
            assert initiator(b, a)


def test_desired_from() -> None:
    me_priv, me_pub = PRIV, K[3]
    peers = [
        MeshPeer(
            K[1],
            ipaddress.IPv6Address("fd00::1"),
            ipaddress.IPv4Address("10.99.0.1"),
            "10.0.0.1:51820",
        ),
        MeshPeer(K[5], ipaddress.IPv6Address("fd00::5"), None, "10.0.0.5:51820"),
        MeshPeer(K[6], ipaddress.IPv6Address("fd00::6"), None, None),
        MeshPeer(K[3], ipaddress.IPv6Address("fd00::3")),  # ourselves: skipped
    ]
    d = desired_from(me_priv, me_pub, 51820, peers)
    assert set(d.peers) == {K[1], K[5], K[6]}
    assert d.peers[K[1]].allowed_ips == ("10.99.0.1/32", "fd00::1/128")
    assert d.peers[K[5]].allowed_ips == ("fd00::5/128",)
    # K[1] < K[3]: it initiates to us, we only respond -> no keepalive.
    assert d.peers[K[1]].keepalive is None
    assert d.peers[K[1]].endpoint == "10.0.0.1:51820"
    # we initiate to K[5] -> keepalive; to K[6] we have no endpoint -> none.
    assert d.peers[K[5]].keepalive == KEEPALIVE
    assert d.peers[K[6]].keepalive is None and d.peers[K[6]].endpoint is None
    nat = desired_from(me_priv, me_pub, 51820, peers, behind_nat=True)
    assert {p.keepalive for p in nat.peers.values()} == {KEEPALIVE}


# --- UAPI codec ----------------------------------------------------------------


def test_encode_set_exact() -> None:
    diff = Diff(
        private_key=PRIV,
        listen_port=51820,
        add=(PeerConfig(K[1], "10.0.0.1:5", ("fd00::1/128", "10.9.0.1/32"), 25),),
        update=(PeerUpdate(K[2], keepalive=0), PeerUpdate(K[3], endpoint="[fd00::3]:7")),
        remove=(K[4],),
    )
    h = {i: K[i].hex() for i in range(5)}
    assert (
        encode_set(diff)
        == (
            f"set=1\nprivate_key={PRIV.hex()}\nlisten_port=51820\n"
            f"public_key={h[4]}\nremove=true\n"
            f"public_key={h[1]}\nendpoint=10.0.0.1:5\npersistent_keepalive_interval=25\n"
            "replace_allowed_ips=true\nallowed_ip=10.9.0.1/32\nallowed_ip=fd00::1/128\n"
            f"public_key={h[2]}\nupdate_only=true\npersistent_keepalive_interval=0\n"
            f"public_key={h[3]}\nupdate_only=true\nendpoint=[fd00::3]:7\n\n"
        ).encode()
    )


def test_encode_set_peer_without_allowed_ips_still_replaces() -> None:
    # An added peer with no allowed ips must not inherit any: replace with nothing.
    out = encode_set(Diff(add=(PeerConfig(K[1]),))).decode()
    assert out == f"set=1\npublic_key={K[1].hex()}\nreplace_allowed_ips=true\n\n"


SAMPLE_GET = (
    f"private_key={PRIV.hex()}\nlisten_port=51820\n"
    f"public_key={K[1].hex()}\npreshared_key={'00' * 32}\nprotocol_version=1\n"
    "endpoint=10.99.77.2:51821\nlast_handshake_time_sec=1700000000\n"
    "last_handshake_time_nsec=500000000\ntx_bytes=92\nrx_bytes=180\n"
    "persistent_keepalive_interval=25\nallowed_ip=fd00::2/128\nallowed_ip=10.99.200.2/32\n"
    f"public_key={K[2].hex()}\nprotocol_version=1\nlast_handshake_time_sec=0\n"
    "last_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\npersistent_keepalive_interval=0\n"
    "some_future_key=1\nerrno=0\n\n"
).encode()


def test_parse_get_sample() -> None:
    dev = parse_get(SAMPLE_GET)
    assert dev.private_key == PRIV and dev.listen_port == 51820
    assert dev.peers == {
        K[1]: PeerConfig(K[1], "10.99.77.2:51821", ("10.99.200.2/32", "fd00::2/128"), 25),
        K[2]: PeerConfig(K[2], None, (), None),
    }
    assert dev.status[K[1]] == PeerStatus(1700000000.5, 180, 92)
    assert dev.status[K[2]].last_handshake is None


@pytest.mark.parametrize(
    "reply, match",
    [
        (b"errno=22\n\n", "errno=22"),
        (b"listen_port=1\n\n", "no errno"),
        (b"listen_port=1\nerrno=0\n", "truncated"),
        (b"listen_port\nerrno=0\n\n", "malformed"),
        (b"=1\nerrno=0\n\n", "malformed"),
        (b"listen_port=99999\nerrno=0\n\n", "out of range"),
        (b"listen_port=-1\nerrno=0\n\n", "not a number"),
        (b"private_key=zz\nerrno=0\n\n", "hex bytes"),
        (b"private_key=" + b"zz" * 32 + b"\nerrno=0\n\n", "not hex"),
        (b"endpoint=1.2.3.4:5\nerrno=0\n\n", "before any public_key"),
        (b"public_key=" + K[1].hex().encode() + b"\nendpoint=nope\nerrno=0\n\n", "endpoint"),
        (b"public_key=" + K[1].hex().encode() + b"\nallowed_ip=x/1\nerrno=0\n\n", "CIDR"),
        (b"public_key=" + K[1].hex().encode() + b"\nlisten_port=1\nerrno=0\n\n", "inside a peer"),
        (
            b"public_key="
            + K[1].hex().encode() * 1
            + b"\npublic_key="
            + K[1].hex().encode()
            + b"\nerrno=0\n\n",
            "twice",
        ),
        ("listen_port=\u00e9\nerrno=0\n\n".encode(), "ASCII"),
    ],
)
def test_parse_get_rejects(reply: bytes, match: str) -> None:
    with pytest.raises(UapiError, match=match):
        parse_get(reply)


def test_parse_errno() -> None:
    parse_errno(b"errno=0\n\n")
    with pytest.raises(UapiError) as ei:
        parse_errno(b"errno=22\n\n")
    assert ei.value.errno == 22 and isinstance(ei.value, WireGuardRemoteError)
    with pytest.raises(UapiError):
        parse_errno(b"listen_port=1\nerrno=0\n\n")
    with pytest.raises(UapiError):
        parse_errno(b"")


@given(st.binary(max_size=300))
def test_parse_get_only_raises_uapi_error(data: bytes) -> None:
    try:
        parse_get(data)
    except UapiError:
        pass


def _get_reply(dev: Device) -> bytes:
    """Render a Device the way wireguard-go answers get=1 (test helper)."""
    lines = [f"private_key={dev.private_key.hex()}"] if dev.private_key else []
    lines.append(f"listen_port={dev.listen_port}")
    for k, p in dev.peers.items():
        lines.append(f"public_key={k.hex()}")
        if p.endpoint:
            lines.append(f"endpoint={p.endpoint}")
        lines.append(f"persistent_keepalive_interval={p.keepalive or 0}")
        lines += [f"allowed_ip={c}" for c in p.allowed_ips]
    return ("\n".join(lines + ["errno=0"]) + "\n\n").encode()


@given(peers_st, st.integers(0, 65535))
def test_get_roundtrip(peers, port) -> None:
    dev = Device(PRIV, port, peers)
    assert parse_get(_get_reply(dev)).peers == dev.peers
    assert parse_get(_get_reply(dev)).listen_port == port


# --- a fake UAPI server on a unix socket ---------------------------------------


class FakeUapi:
    """Speaks the UAPI: applies set=1 to a Device (with a tiny parser of its
    own, independent of the code under test) and answers get=1."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dev = Device(None, 0, {})
        self.requests: list[bytes] = []
        self.fail_errno = 0
        self.chunk = 7  # reply in small pieces to exercise reassembly

    def _apply(self, text: str) -> None:
        priv, port = self.dev.private_key, self.dev.listen_port
        peers = {
            k: dict(endpoint=p.endpoint, ips=list(p.allowed_ips), ka=p.keepalive)
            for k, p in self.dev.peers.items()
        }
        cur = None
        for line in text.split("\n")[1:]:
            if not line:
                continue
            k, v = line.split("=", 1)
            if k == "private_key":
                priv = bytes.fromhex(v)
            elif k == "listen_port":
                port = int(v)
            elif k == "public_key":
                cur = bytes.fromhex(v)
                peers.setdefault(cur, dict(endpoint=None, ips=[], ka=None))
            elif k == "remove":
                del peers[cur]
            elif k == "endpoint":
                peers[cur]["endpoint"] = v
            elif k == "persistent_keepalive_interval":
                peers[cur]["ka"] = int(v)
            elif k == "replace_allowed_ips":
                peers[cur]["ips"] = []
            elif k == "allowed_ip":
                peers[cur]["ips"].append(v)
        self.dev = Device(
            priv,
            port,
            {k: PeerConfig(k, p["endpoint"], tuple(p["ips"]), p["ka"]) for k, p in peers.items()},
        )

    async def handle(self, stream) -> None:
        async with stream:
            buf = b""
            while not buf.endswith(b"\n\n"):
                buf += await stream.receive_some(100)
            self.requests.append(buf)
            if self.fail_errno:
                reply = f"errno={self.fail_errno}\n\n".encode()
            elif buf == b"get=1\n\n":
                reply = _get_reply(self.dev)
            else:
                self._apply(buf.decode())
                reply = b"errno=0\n\n"
            for i in range(0, len(reply), self.chunk):
                await stream.send_all(reply[i : i + self.chunk])

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(self.path))
        sock.listen()
        listener = trio.SocketListener(sock)
        async with listener:
            task_status.started()
            await trio.serve_listeners(self.handle, [listener])


@pytest.fixture
async def fake_uapi(tmp_path, nursery):
    srv = FakeUapi(tmp_path / "wgt0.sock")
    await nursery.start(srv.serve)
    return srv


async def test_uapi_client_against_fake_server(fake_uapi: FakeUapi) -> None:
    with trio.fail_after(5):
        client = UapiClient(fake_uapi.path)
        desired = InterfaceConfig(
            PRIV, 51820, {K[1]: peer(1, "10.0.0.1:5", ka=25), K[2]: peer(2, "[fd00::2]:6")}
        )
        await client.set(reconcile(desired, await client.get()))
        assert fake_uapi.requests[-1] == encode_set(
            Diff(PRIV, 51820, (desired.peers[K[1]], desired.peers[K[2]]))
        )
        dev = await client.get()
        assert dev.private_key == PRIV and dev.listen_port == 51820
        assert dev.peers == desired.peers
        assert reconcile(desired, dev).empty
        n = len(fake_uapi.requests)
        await client.set(Diff())  # empty diff: no request at all
        assert len(fake_uapi.requests) == n
        # remove a peer and change one
        desired2 = InterfaceConfig(PRIV, 51820, {K[1]: peer(1, "10.0.0.7:5")})
        await client.set(reconcile(desired2, await client.get()))
        assert (await client.get()).peers == desired2.peers


async def test_uapi_client_errno(fake_uapi: FakeUapi) -> None:
    with trio.fail_after(5):
        fake_uapi.fail_errno = 22
        client = UapiClient(fake_uapi.path)
        with pytest.raises(UapiError, match="errno=22") as ei:
            await client.set(Diff(listen_port=1))
        assert ei.value.errno == 22
        with pytest.raises(UapiError, match="errno=22"):
            await client.get()


async def test_uapi_client_no_socket(tmp_path) -> None:
    with trio.fail_after(5), pytest.raises(WireGuardLocalError, match="cannot connect"):
        await UapiClient(tmp_path / "missing.sock").get()


async def test_uapi_client_truncated_reply(tmp_path, nursery) -> None:
    path = tmp_path / "t.sock"

    async def handler(stream) -> None:
        async with stream:
            await stream.receive_some(100)
            await stream.send_all(b"listen_port=1\n")  # then hang up

    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen()
    nursery.start_soon(trio.serve_listeners, handler, [trio.SocketListener(sock)])
    with trio.fail_after(5), pytest.raises(UapiError, match="truncated"):
        await UapiClient(path).get()


# --- UserspaceBackend ownership ----------------------------------------------------


async def test_userspace_backend_refuses_what_it_did_not_create(tmp_path) -> None:
    async def no_link(name: str) -> bool:
        return False

    async def has_link(name: str) -> bool:
        return True

    b = UserspaceBackend("wgt0", socket_dir=tmp_path, link_exists=no_link, binary="sh")
    assert isinstance(b, Backend) and b.kind == "userspace" and not b.owned
    with pytest.raises(WireGuardLocalError, match="not created"):
        await b.destroy()
    with pytest.raises(WireGuardLocalError, match="not created"):
        await b.get()
    with pytest.raises(WireGuardLocalError, match="not created"):
        await b.apply(Diff(listen_port=1))
    # a socket of that name already there (someone else's wireguard-go)
    (tmp_path / "wgt0.sock").touch()
    with pytest.raises(WireGuardLocalError, match="exists already"):
        await b.create()
    (tmp_path / "wgt0.sock").unlink()
    # a link of that name already there
    b2 = UserspaceBackend("wgt0", socket_dir=tmp_path, link_exists=has_link, binary="sh")
    with pytest.raises(WireGuardLocalError, match="exists already"):
        await b2.create()
    assert not b2.owned
    with pytest.raises(WireGuardLocalError, match="not found on PATH"):
        await UserspaceBackend("wgt0", binary="no-such-wireguard-go-binary").create()
    with pytest.raises(WireGuardLocalError):
        UserspaceBackend("a-name-longer-than-15")


async def test_userspace_backend_child_exits_early(tmp_path) -> None:
    """A 'wireguard-go' that dies at once is reported, not waited on for 5 s."""
    fake = tmp_path / "fake-wg"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)

    async def no_link(name: str) -> bool:
        return False

    b = UserspaceBackend("wgt1", socket_dir=tmp_path, link_exists=no_link, binary=str(fake))
    with trio.fail_after(4), pytest.raises(WireGuardLocalError, match="exited with 3"):
        await b.create()
    assert not b.owned


# --- netlink messages (kernel backend) ---------------------------------------------


def _roundtrip(msg: wgmsg) -> wgmsg:
    msg.encode()
    out = wgmsg(msg.data)
    out.decode()
    return out


def _peers_of(msg: wgmsg) -> list:
    return list(msg.get_attr("WGDEVICE_A_PEERS") or [])


def _b64(k: bytes) -> bytes:
    return base64.b64encode(k)


def test_netlink_set_message_attributes() -> None:
    diff = Diff(
        private_key=PRIV,
        listen_port=51820,
        add=(PeerConfig(K[1], "10.0.0.1:5", ("fd00::1/128", "10.9.0.1/32"), 25),),
        update=(
            PeerUpdate(K[2], endpoint="[fd00::2]:7"),
            PeerUpdate(K[3], allowed_ips=("fd00::3/128",), keepalive=0),
        ),
        remove=(K[4],),
    )
    (msg,) = [_roundtrip(m) for m in build_set_messages("wg7", diff)]
    assert msg["cmd"] == WG_CMD_SET_DEVICE and msg["version"] == 1
    assert msg.get_attr("WGDEVICE_A_IFNAME") == "wg7"
    assert msg.get_attr("WGDEVICE_A_PRIVATE_KEY") == _b64(PRIV)
    assert msg.get_attr("WGDEVICE_A_LISTEN_PORT") == 51820
    assert msg.get_attr("WGDEVICE_A_FLAGS") is None  # never REPLACE_PEERS
    rm, add, up_ep, up_ips = _peers_of(msg)

    assert rm.get_attr("WGPEER_A_PUBLIC_KEY") == _b64(K[4])
    assert rm.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REMOVE_ME
    assert rm.get_attr("WGPEER_A_ALLOWEDIPS") is None

    assert add.get_attr("WGPEER_A_PUBLIC_KEY") == _b64(K[1])
    assert add.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REPLACE_ALLOWEDIPS
    ep = add.get_attr("WGPEER_A_ENDPOINT")
    assert (ep["family"], ep["addr"], ep["port"]) == (socket.AF_INET, "10.0.0.1", 5)
    assert add.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == 25
    assert [a["addr"] for a in add.get_attr("WGPEER_A_ALLOWEDIPS")] == [
        "10.9.0.1/32",
        "fd00::1/128",
    ]

    assert up_ep.get_attr("WGPEER_A_FLAGS") == WGPEER_F_UPDATE_ONLY
    ep = up_ep.get_attr("WGPEER_A_ENDPOINT")
    assert (ep["family"], ep["addr"], ep["port"]) == (socket.AF_INET6, "fd00::2", 7)
    assert up_ep.get_attr("WGPEER_A_ALLOWEDIPS") is None
    assert up_ep.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") is None

    assert up_ips.get_attr("WGPEER_A_FLAGS") == WGPEER_F_UPDATE_ONLY | WGPEER_F_REPLACE_ALLOWEDIPS
    assert up_ips.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == 0
    assert up_ips.get_attr("WGPEER_A_ENDPOINT") is None
    assert [a["addr"] for a in up_ips.get_attr("WGPEER_A_ALLOWEDIPS")] == ["fd00::3/128"]


def test_netlink_set_messages_chunked() -> None:
    many = tuple(
        PeerConfig(bytes([i, 1]) + b"\0" * 30, None, (f"fd00::{i:x}/128",)) for i in range(40)
    )
    msgs = [_roundtrip(m) for m in build_set_messages("wg7", Diff(listen_port=9, add=many))]
    assert len(msgs) == 3
    assert [len(_peers_of(m)) for m in msgs] == [16, 16, 8]
    assert all(m.get_attr("WGDEVICE_A_IFNAME") == "wg7" for m in msgs)
    assert msgs[0].get_attr("WGDEVICE_A_LISTEN_PORT") == 9
    assert msgs[1].get_attr("WGDEVICE_A_LISTEN_PORT") is None
    sent = [p.get_attr("WGPEER_A_PUBLIC_KEY") for m in msgs for p in _peers_of(m)]
    assert sent == [_b64(p.public_key) for p in many]
    assert build_set_messages("wg7", Diff()) == []
    (only_dev,) = build_set_messages("wg7", Diff(private_key=PRIV))
    assert _peers_of(_roundtrip(only_dev)) == []


def _dump_reply(dev: Device, split_after: int | None = None) -> list[wgmsg]:
    """GET_DEVICE replies as the kernel would send them (optionally one peer's
    allowed ips split over two messages)."""

    def peer_attrs(p: PeerConfig, ips, with_rest=True):
        attrs = [["WGPEER_A_PUBLIC_KEY", _b64(p.public_key).decode()]]
        if with_rest:
            if p.endpoint:
                host, _, port = p.endpoint.rpartition(":")
                attrs.append(["WGPEER_A_ENDPOINT", {"addr": host.strip("[]"), "port": int(port)}])
            attrs.append(["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", p.keepalive or 0])
            attrs.append(["WGPEER_A_RX_BYTES", 10])
            attrs.append(["WGPEER_A_TX_BYTES", 20])
        attrs.append(["WGPEER_A_ALLOWEDIPS", wgnetlink._allowed_attrs(ips)])
        return {"attrs": attrs}

    first = build_get_message("wg7")
    first["attrs"] += [
        ["WGDEVICE_A_PRIVATE_KEY", _b64(PRIV).decode()],
        ["WGDEVICE_A_LISTEN_PORT", dev.listen_port],
    ]
    peers = list(dev.peers.values())
    msgs = [first]
    if split_after is None:
        first["attrs"].append(["WGDEVICE_A_PEERS", [peer_attrs(p, p.allowed_ips) for p in peers]])
    else:
        last = peers[-1]
        first["attrs"].append(
            [
                "WGDEVICE_A_PEERS",
                [peer_attrs(p, p.allowed_ips) for p in peers[:-1]]
                + [peer_attrs(last, last.allowed_ips[:split_after])],
            ]
        )
        second = build_get_message("wg7")
        second["attrs"].append(
            ["WGDEVICE_A_PEERS", [peer_attrs(last, last.allowed_ips[split_after:], False)]]
        )
        msgs.append(second)
    return [_roundtrip(m) for m in msgs]


def test_parse_device_from_dump() -> None:
    dev = Device(
        PRIV,
        51820,
        {
            K[1]: PeerConfig(K[1], "[fd00::9]:5", ("fd00::1/128",), 25),
            K[2]: PeerConfig(K[2], None, ("10.9.0.2/32", "fd00::2/128", "fd00::22/128"), None),
        },
    )
    for split in (None, 1):
        got = parse_device(_dump_reply(dev, split))
        assert got.private_key == PRIV and got.listen_port == 51820
        assert got.peers == dev.peers
        assert got.status[K[1]].rx_bytes == 10
    assert build_get_message("wg7")["cmd"] == WG_CMD_GET_DEVICE


class FakeTransport:
    def __init__(self, exists: bool = False) -> None:
        self.exists = exists
        self.calls: list[tuple] = []
        self.reply: list = []

    def link_exists(self, ifname):
        return self.exists

    def link_kind(self, ifname):
        return "wireguard" if self.exists else None

    def link_add(self, ifname):
        self.calls.append(("add", ifname))
        self.exists = True

    def link_del(self, ifname):
        self.calls.append(("del", ifname))
        self.exists = False

    def request(self, msg):
        self.calls.append(("set", _roundtrip(msg)))

    def dump(self, msg):
        self.calls.append(("get", msg.get_attr("WGDEVICE_A_IFNAME")))
        return self.reply


async def test_kernel_backend_with_fake_transport() -> None:
    t = FakeTransport()
    b = KernelBackend("wg7", transport=t)
    assert isinstance(b, Backend) and b.kind == "kernel"
    with pytest.raises(WireGuardLocalError, match="not created"):
        await b.destroy()
    await b.create()
    assert t.calls == [("add", "wg7")]
    t.reply = _dump_reply(Device(PRIV, 1, {K[1]: peer(1)}))
    dev = await b.get()
    assert dev.peers == {K[1]: peer(1)}
    await b.apply(reconcile(InterfaceConfig(PRIV, 1, {K[2]: peer(2)}), dev))
    (_, msg) = t.calls[-1]
    rm, add = _peers_of(msg)
    assert rm.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REMOVE_ME
    assert add.get_attr("WGPEER_A_PUBLIC_KEY") == _b64(K[2])
    n = len(t.calls)
    await b.apply(Diff())
    assert len(t.calls) == n  # nothing sent for an empty diff
    await b.destroy()
    assert t.calls[-1] == ("del", "wg7") and not b.owned


async def test_kernel_backend_refuses_existing_link() -> None:
    t = FakeTransport(exists=True)
    b = KernelBackend("wg7", transport=t)
    with pytest.raises(WireGuardLocalError, match="exists already"):
        await b.create()
    assert t.calls == [] and not b.owned


def test_modules_import_no_trio_in_core() -> None:
    import clanagent.mesh.wireguard as core

    assert "trio" not in core.__dict__
