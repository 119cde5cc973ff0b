"""Interactive VM consoles: the signed request, the agent-to-agent handshake, and
a real VM's shell reached through the control socket (`clanctl vm console`)."""

from __future__ import annotations

import os
import socket
import time

import nacl.signing
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from clanagent.control.client import ClientError, ControlClient
from clanagent.vmhost.attach import ConsoleServer, open_remote
from clanagent.vmhost.console_codec import MAX_FRAME, FrameReader, encode_frame
from clanagent.vmhost.requests import (
    NONCE_LEN,
    NonceCache,
    parse_console,
    sign_console,
)
from clanagent.vmhost.spec import VmHostLocalError
from clanagent.wire import WireError

ADMIN = nacl.signing.SigningKey.generate()
ADMINS = frozenset({bytes(ADMIN.verify_key)})


def _req(vm="web", machine="m1", at=None, nonce=None, key=ADMIN):
    return sign_console(
        key, vm, machine, int(time.time()) if at is None else at, nonce or os.urandom(NONCE_LEN)
    )


# -- the signed request ----------------------------------------------------------------


def test_console_request_roundtrip_and_forgeries():
    req = _req()
    assert parse_console(req.to_wire(), ADMINS) == req
    intruder = nacl.signing.SigningKey.generate()
    with pytest.raises(WireError, match="not signed by an admin"):
        parse_console(_req(key=intruder).to_wire(), ADMINS)
    for field, value in (("vm", "db"), ("machine", "m2"), ("at", req.at + 1)):
        with pytest.raises(WireError, match="bad signature"):
            parse_console({**req.to_wire(), field: value}, ADMINS)
    with pytest.raises(WireError, match="bad signature"):
        parse_console({**req.to_wire(), "nonce": os.urandom(NONCE_LEN)}, ADMINS)
    with pytest.raises(WireError, match="nonce"):
        parse_console({**req.to_wire(), "nonce": b"short"}, ADMINS)
    with pytest.raises(WireError, match="expected"):
        parse_console({**req.to_wire(), "extra": 1}, ADMINS)
    # a start/stop order's signature is not a console request's
    from clanagent.vmhost.requests import sign_request

    order = sign_request(ADMIN, "web", "start", req.at)
    with pytest.raises(WireError, match="bad signature"):
        parse_console({**req.to_wire(), "sig": order.sig}, ADMINS)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.none(),
        st.integers(),
        st.binary(max_size=64),
        st.dictionaries(
            st.sampled_from(["vm", "machine", "at", "nonce", "admin", "sig", "x"]),
            st.one_of(st.integers(), st.text(max_size=80), st.binary(max_size=80), st.none()),
        ),
    )
)
def test_console_request_parser_only_raises_wire_error(body):
    try:
        parse_console(body, ADMINS)
    except WireError:
        pass
    else:  # pragma: no cover - a random body never carries a valid signature
        raise AssertionError("accepted a random body")


def test_nonce_cache_refuses_replays_stale_and_future():
    cache = NonceCache(window=300)
    now = int(time.time())
    req = _req(at=now)
    cache.check(req, now)
    with pytest.raises(WireError, match="replayed"):
        cache.check(req, now + 1)
    with pytest.raises(WireError, match="clock"):
        cache.check(_req(at=now - 301), now)
    with pytest.raises(WireError, match="clock"):
        cache.check(_req(at=now + 301), now)
    # old nonces are forgotten once a replay of them would be stale anyway
    cache.check(_req(at=now + 400), now + 400)
    assert req.nonce not in cache._seen
    small = NonceCache(window=300, limit=2)
    small.check(_req(at=now), now)
    small.check(_req(at=now), now)
    with pytest.raises(WireError, match="too many"):
        small.check(_req(at=now), now)


# -- the handshake framing ----------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(1, 50))
def test_frame_reader_only_raises_wire_error(data, step):
    reader = FrameReader()
    try:
        for i in range(0, len(data), step):
            reader.feed(data[i : i + step])
    except WireError:
        pass


def test_frame_reader_keeps_what_follows_and_refuses_oversize():
    reader = FrameReader()
    frame = encode_frame({"ok": True})
    assert reader.feed(frame[:3]) is None
    assert reader.feed(frame[3:] + b"console bytes") == {"ok": True}
    assert reader.rest == b"console bytes"
    with pytest.raises(WireError, match="exceeds"):
        FrameReader().feed((MAX_FRAME + 1).to_bytes(4, "big"))
    assert FrameReader().feed(encode_frame({"a": 1})[:5]) is None  # incomplete
    bad = b"\x00\x00\x00\x01\x05"  # a frame holding the integer 5
    with pytest.raises(WireError, match="map"):
        FrameReader().feed(bad)
    with pytest.raises(ValueError):
        encode_frame({"x": b"y" * MAX_FRAME})


# -- agent to agent, over TCP (here ::1; between machines the overlay) ----------------------


class Echo:
    """A stand-in for a VM console: upper-cases what it receives."""

    def __init__(self) -> None:
        self.busy = False

    def attach(self, vm: str):
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def cm():
            if self.busy:
                raise VmHostLocalError(f"VM {vm}'s console is in use")
            self.busy = True
            a, b = trio.testing.memory_stream_pair()

            async def serve():
                while data := await b.receive_some():
                    await b.send_all(data.upper())

            try:
                async with trio.open_nursery() as n:
                    n.start_soon(serve)
                    yield a
                    n.cancel_scope.cancel()
            finally:
                self.busy = False

        return cm()


async def _serve(nursery, authorize, attach) -> tuple[ConsoleServer, int]:
    server = ConsoleServer(authorize, attach)
    port = await nursery.start(server.serve, "::1", 0)
    return server, port


async def test_remote_console_session_and_refusals():
    import trio.testing  # noqa: F401

    echo = Echo()
    cache = NonceCache()

    async def authorize(hello):
        req = parse_console(hello, ADMINS)
        if req.machine != "m1":
            raise WireError(f"console request is for machine {req.machine}, this is m1")
        cache.check(req, int(time.time()))
        return req.vm

    async with trio.open_nursery() as n:
        server, port = await _serve(n, authorize, echo.attach)
        good = _req()
        async with open_remote("::1", port, good.to_wire()) as s:
            await s.send_all(b"hello")
            got = b""
            with trio.fail_after(5):
                while len(got) < 5:
                    got += await s.receive_some()
            assert got == b"HELLO"
            # one session per console: a second one is refused with the reason
            with pytest.raises(VmHostLocalError, match="in use"):
                async with open_remote("::1", port, _req().to_wire()):
                    pass
        assert server.stats.sessions == 1
        # replayed, forged, for another machine: refused with a reason, nothing attached
        for hello, why in (
            (good.to_wire(), "replayed"),
            (_req(key=nacl.signing.SigningKey.generate()).to_wire(), "not signed by an admin"),
            (_req(machine="m2").to_wire(), "for machine m2"),
            ({"garbage": 1}, "expected"),
        ):
            with pytest.raises(VmHostLocalError, match=why):
                async with open_remote("::1", port, hello):
                    pass
        # garbage and oversized handshakes, and a silent client, do not hurt the server
        for junk in (b"\xff" * 10, (1 << 20).to_bytes(4, "big"), b"\x00\x00\x00\x03abc"):
            sock = trio.socket.socket(socket.AF_INET6)
            await sock.connect(("::1", port))
            await sock.send(junk)
            with trio.fail_after(6):
                answer = await sock.recv(4096)
            assert b"ok" in answer or answer == b""
            sock.close()
        async with open_remote("::1", port, _req().to_wire()) as s:
            await s.send_all(b"again")
            with trio.fail_after(5):
                assert await s.receive_some() == b"AGAIN"
        assert server.stats.sessions == 2 and server.stats.refused >= 6
        n.cancel_scope.cancel()


def test_process_started_at_reads_proc():
    import subprocess

    from clanagent.vmhost.backend import process_started_at

    before = int(time.time())
    p = subprocess.Popen(["sleep", "5"])
    try:
        started = process_started_at(p.pid)
        assert started is not None and before - 1 <= started <= time.time() + 1
    finally:
        p.kill()
        p.wait()
    assert process_started_at(p.pid) is None  # gone
    assert process_started_at(os.getpid()) <= time.time()


async def test_console_server_survives_resets_and_floods():
    """A connection reset at once, and more connections than the cap, hurt nothing."""
    import struct

    import trio.testing  # noqa: F401

    from clanagent.vmhost.attach import MAX_SESSIONS

    echo = Echo()

    async def authorize(hello):
        return parse_console(hello, ADMINS).vm

    async with trio.open_nursery() as n:
        server, port = await _serve(n, authorize, echo.attach)
        for _ in range(20):  # connect and reset (RST) before the server looks
            sock = trio.socket.socket(socket.AF_INET6)
            await sock.connect(("::1", port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        await trio.sleep(0.2)
        # a flood of silent connections: those beyond the cap are closed at once
        flood = []
        for _ in range(MAX_SESSIONS + 8):
            sock = trio.socket.socket(socket.AF_INET6)
            await sock.connect(("::1", port))
            flood.append(sock)
        await trio.sleep(0.3)
        closed = 0
        for sock in flood:
            with trio.move_on_after(0.05):
                if await sock.recv(10) == b"":
                    closed += 1
        assert closed >= 8
        for sock in flood:
            sock.close()
        await trio.sleep(0.2)
        async with open_remote("::1", port, _req().to_wire()) as s:
            await s.send_all(b"still here")
            with trio.fail_after(5):
                assert await s.receive_some() == b"STILL HERE"
        n.cancel_scope.cancel()


async def test_remote_console_unreachable_host_is_a_clear_error():
    with pytest.raises(VmHostLocalError, match="cannot reach"):
        async with open_remote("::1", 1, _req().to_wire(), timeout=2):
            pass


# -- a real VM's shell through the control socket --------------------------------------------

from .test_vmhost_qemu import _missing, vm_assets, vm_decl  # noqa: E402, F401 (a fixture)


def _session(sock_path: str, request: dict, send: bytes, until: bytes, timeout=30) -> bytes:
    with ControlClient(sock_path, timeout=10) as c:
        s, early = c.attach("vm.console", {"request": request})
    buf = early
    s.settimeout(timeout)
    try:
        s.sendall(send)
        deadline = time.monotonic() + timeout
        while until not in buf and time.monotonic() < deadline:
            data = s.recv(65536)
            if not data:
                break
            buf += data
    finally:
        s.close()
    return buf


@pytest.mark.integration
@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
async def test_console_of_a_real_vm(tmp_path, vm_assets):  # noqa: F811
    from clanagent.identity import load_or_create
    from clanagent.inventory import make_version

    from .test_inventory_agent import call, genesis, machine_entry, start, wait_until
    from .test_services_agent import cfg_for

    vmlinux, initrd = vm_assets
    ident = load_or_create(tmp_path / "s1")[0]
    doc = genesis(ADMIN, {"m1": machine_entry(ident, ["vmhost"])})
    doc["vms"]["web"] = vm_decl(vmlinux, initrd)  # on m1, 128 MiB, no network
    v = make_version(doc, [], int(time.time()), "vm", [ADMIN])
    pid = None
    try:
        with trio.fail_after(90):
            async with trio.open_nursery() as n:
                a1, _ = await start(n, cfg_for(tmp_path, 1))
                submitted = time.time()
                await call(a1, "inventory.submit", {"version": v.to_wire(), "init": True})
                from clanagent.vmhost.backend import RunDir
                from clanagent.vmhost.console import ConsoleLog

                console = RunDir(str(tmp_path / "s1" / "vms" / "web")).console
                await wait_until(
                    lambda: ConsoleLog(console).contains(b"VM_READY"), "the guest to boot", 60
                )
                pid = a1.vms.handles["web"].pid
                sock = a1.cfg.control.socket
                # the status carries the boot time (the QEMU process's start, from /proc)
                await wait_until(
                    lambda: {r["vm"]: r for r in a1.vm_api.rows()}["web"].get("booted"),
                    "the boot time in the status",
                    10,
                )
                booted = {r["vm"]: r for r in await call(a1, "vm.list")}["web"]["booted"]
                assert submitted - 2 <= booted <= time.time() + 1
                out = await trio.to_thread.run_sync(
                    _session, sock, _req().to_wire(), b"echo answer-$((6*7))\n", b"answer-42"
                )
                assert b"answer-42" in out
                # the session's output also lands in the console log (written by
                # the log's own reader: shortly after the session saw it)
                await wait_until(
                    lambda: ConsoleLog(console).contains(b"answer-42"), "the console log", 10
                )
                # refusals come back as errors, the VM and the agent carry on
                for request, code, why in (
                    (
                        _req(key=nacl.signing.SigningKey.generate()).to_wire(),
                        "permission_denied",
                        "not signed by an admin",
                    ),
                    (_req(vm="nope").to_wire(), "invalid_params", "no VM 'nope'"),
                    (_req(machine="m9").to_wire(), "invalid_params", "no machine 'm9'"),
                ):
                    with pytest.raises(ClientError) as exc:
                        await trio.to_thread.run_sync(_session, sock, request, b"", b"x", 1)
                    assert exc.value.code == code and why in exc.value.message
                replay = _req()
                await trio.to_thread.run_sync(_session, sock, replay.to_wire(), b"true\n", b"#")
                with pytest.raises(ClientError, match="replayed"):
                    await trio.to_thread.run_sync(_session, sock, replay.to_wire(), b"", b"x", 1)
                # one session at a time
                with ControlClient(sock, timeout=10) as c:
                    held, _ = await trio.to_thread.run_sync(
                        c.attach, "vm.console", {"request": _req().to_wire()}
                    )
                try:
                    with pytest.raises(ClientError, match="in use"):
                        await trio.to_thread.run_sync(
                            _session, sock, _req().to_wire(), b"", b"x", 1
                        )
                finally:
                    held.close()
                # once the first one hangs up, a new session gets the shell again
                await trio.sleep(0.3)
                out = await trio.to_thread.run_sync(
                    _session, sock, _req().to_wire(), b"echo again-$((1+1))\n", b"again-2"
                )
                assert b"again-2" in out
                # clanctl itself, stdin piped (a terminal would be put in raw mode)
                import base64
                import subprocess
                import sys

                keyfile = tmp_path / "admin.key"
                keyfile.write_text(base64.b64encode(bytes(ADMIN)).decode())
                keyfile.chmod(0o600)
                r = await trio.to_thread.run_sync(
                    lambda: subprocess.run(
                        [
                            sys.executable,
                            "-m",
                            "clanagent.cli.clanctl",
                            "--socket",
                            str(sock),
                            "vm",
                            "console",
                            "web",
                            "--admin-key",
                            str(keyfile),
                        ],
                        input=b"echo via-clanctl-$((2*3))\n",
                        capture_output=True,
                        timeout=30,
                    )
                )
                assert r.returncode == 0, r.stderr
                assert b"via-clanctl-6" in r.stdout
                assert a1.vms.handles["web"].pid == pid  # the VM never restarted
                n.cancel_scope.cancel()
    finally:
        if pid:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


async def test_splice_drops_a_side_that_stops_reading_and_an_idle_session(autojump_clock):
    """A stuck client must not stall the guest's serial output; an idle session ends."""
    from trio.testing import lockstep_stream_pair

    from clanagent.vmhost.attach import splice

    vm_side, vm_peer = lockstep_stream_pair()
    # lockstep: a send waits for the other end to read, and the client never reads
    client_side, client_peer = lockstep_stream_pair()

    async def guest_prints() -> None:
        with trio.move_on_after(60):
            while True:
                await vm_peer.send_all(b"x" * 65536)

    async with trio.open_nursery() as n:
        n.start_soon(guest_prints)
        with trio.fail_after(30):
            why = await splice(vm_side, client_side, send_timeout=5, idle_timeout=1000)
        assert why == "stalled"
        n.cancel_scope.cancel()
    a, a_peer = lockstep_stream_pair()
    b, b_peer = lockstep_stream_pair()
    with trio.fail_after(120):
        why = await splice(a, b, send_timeout=5, idle_timeout=60)
    assert why == "idle"
