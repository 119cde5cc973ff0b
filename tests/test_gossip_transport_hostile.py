"""Hostile bytes against the gossip handshake and the session frame cipher.

Issue 12: anyone who can reach the gossip port and knows the clan tag (it is
in clear in every HELLO) must not be able to stop an agent.  The only
outcome of a bad handshake message, of any length and content, is
`RemoteProtocolError` with the handshake in its sticky ERROR state; the only
outcome of a bad session frame is `RemoteProtocolError` with the cipher
closed.  The first tests are the regression for the reported crash (a FINISH
whose ciphertext is shorter than the AEAD tag); the hypothesis tests build
structured-but-wrong messages (each message type x each field replaced by a
wrong type, size or value, plus missing and extra fields) against the state
that expects that message and against every other state.  The last tests send
the crash over real sockets, to the peer listener and to a whole agent, and
check that the listener still completes a genuine handshake afterwards.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from clanagent.gossip import handshake as handshake_module
from clanagent.gossip import session as session_module
from clanagent.gossip.errors import RemoteProtocolError
from clanagent.gossip.handshake import Handshake, MsgType, Role, State
from clanagent.gossip.peer import (
    CLOSE_POLICY_VIOLATION,
    PeerSession,
    open_peer_session,
    serve_peers,
)
from clanagent.gossip.session import TAG_BYTES, SessionCipher
from clanagent.identity import Identity
from clanagent.wire import pack, unpack

ALICE = Identity.generate()  # initiator
BOB = Identity.generate()  # responder / listener
MALLORY = Identity.generate()  # attacker: knows the clan tag, holds no admitted key
CLAN = b"clan-of-the-hostile-tests"
GUARD = 20

# The encrypted identity payload {k: 32 bytes, s: 64 bytes} plus the tag.
IDENTITY_CIPHERTEXT = len(pack({"k": bytes(32), "s": bytes(64)})) + TAG_BYTES

# X25519 u-coordinates of small order, with their non-canonical encodings
# (u + p) and the ignored top bit set: every one must be refused.
_P = 2**255 - 19
_SMALL_ORDER_U = [
    0,
    1,
    0x00B8495F16056286FDB1329CEB8D09DA6AC49FF1FAE35616AEB8413B7C7AEBE0,
    0x57119FD0DD4E22D8868E1C58C45C44045BEF839C55B1D0B1248C50A3BC959C5F,
    _P - 1,
]
LOW_ORDER_POINTS = sorted(
    (c + top).to_bytes(32, "little")
    for u in _SMALL_ORDER_U
    for c in ([u, u + _P] if u + _P < 1 << 255 else [u])  # u + p: non-canonical
    for top in (0, 1 << 255)  # X25519 ignores the top bit
)


def always(_key: bytes) -> bool:
    return True


def seeded(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


# Which side receives message type t, and in which state.
RECEIVER = {
    MsgType.HELLO: (Role.RESPONDER, State.START),
    MsgType.REPLY: (Role.INITIATOR, State.WAIT_REPLY),
    MsgType.FINISH: (Role.RESPONDER, State.WAIT_FINISH),
    MsgType.CONFIRM: (Role.INITIATOR, State.WAIT_CONFIRM),
}
RECEIVING_STATES = list(RECEIVER.values())


def at(role: Role, state: State, seed: int = 0) -> tuple[Handshake, bytes]:
    """A handshake of `role` in `state`, and the genuine message it expects."""
    i = Handshake(Role.INITIATOR, ALICE, CLAN, always, rng=seeded(2 * seed))
    r = Handshake(Role.RESPONDER, BOB, CLAN, always, rng=seeded(2 * seed + 1))
    data = i.start()
    for k in range(4):
        receiver = r if k % 2 == 0 else i
        if receiver.role is role and receiver.state is state:
            return receiver, data
        data = receiver.receive(data)
    raise AssertionError(f"no {role} in {state}")


BOUNDARY = "could not be processed"  # the last-resort boundary's reason


def assert_refused(h: Handshake, data: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        h.receive(data)
    # Refused by a check that expected it, not caught by the last resort.
    assert BOUNDARY not in info.value.reason
    assert info.value.__cause__ is None
    assert h.state is State.ERROR
    assert not h.done
    with pytest.raises(RemoteProtocolError, match="already failed"):
        h.receive(data)  # sticky


# -- the reported crash ------------------------------------------------------


def test_one_byte_finish_ciphertext_is_a_handshake_failure() -> None:
    responder, _ = at(Role.RESPONDER, State.WAIT_FINISH)
    with pytest.raises(RemoteProtocolError, match="FINISH"):
        responder.receive(pack({"t": int(MsgType.FINISH), "x": b"\x00"}))
    assert responder.state is State.ERROR


def test_finish_ciphertext_of_every_wrong_length_is_a_handshake_failure() -> None:
    rnd = random.Random(12)
    for n in range(0, 301):
        if n == IDENTITY_CIPHERTEXT:
            continue
        responder, _ = at(Role.RESPONDER, State.WAIT_FINISH)
        assert_refused(responder, pack({"t": int(MsgType.FINISH), "x": rnd.randbytes(n)}))


def test_reply_ciphertext_of_every_wrong_length_is_a_handshake_failure() -> None:
    rnd = random.Random(13)
    for n in range(0, 301):
        if n == IDENTITY_CIPHERTEXT:
            continue
        initiator, genuine = at(Role.INITIATOR, State.WAIT_REPLY)
        reply = unpack(genuine)
        reply["x"] = rnd.randbytes(n)
        assert_refused(initiator, pack(reply))


def test_the_genuine_ciphertexts_have_the_expected_length() -> None:
    # Guards the constant the length checks use against a format change.
    _, reply = at(Role.INITIATOR, State.WAIT_REPLY)
    _, finish = at(Role.RESPONDER, State.WAIT_FINISH)
    assert len(unpack(reply)["x"]) == len(unpack(finish)["x"]) == IDENTITY_CIPHERTEXT


@pytest.mark.parametrize("fault", [ValueError, TypeError, KeyError, RuntimeError, AssertionError])
def test_an_unexpected_exception_inside_receive_is_a_handshake_failure(
    monkeypatch: pytest.MonkeyPatch, fault: type[Exception]
) -> None:
    # The last-resort boundary: whatever a library or a bug raises while one
    # message is processed ends this handshake, and only this handshake.
    # The fault is injected where no check of ours expects one.
    def broken(*_args: Any) -> bytes:
        raise fault("injected fault")

    responder, finish = at(Role.RESPONDER, State.WAIT_FINISH)
    # The key schedule runs after FINISH authenticated: nothing there may fail.
    monkeypatch.setattr(handshake_module, "_kdf", broken)
    with pytest.raises(RemoteProtocolError) as info:
        responder.receive(finish)
    assert responder.state is State.ERROR
    assert isinstance(info.value.__cause__, fault)  # kept for the shell's log
    assert "injected fault" not in info.value.reason  # never the library's text
    with pytest.raises(RemoteProtocolError, match="already failed"):
        responder.receive(finish)


def test_an_admit_callback_that_raises_is_a_handshake_failure() -> None:
    def admit(_key: bytes) -> bool:
        raise LookupError("inventory not loaded")

    i = Handshake(Role.INITIATOR, ALICE, CLAN, always)
    r = Handshake(Role.RESPONDER, BOB, CLAN, admit)
    finish = i.receive(r.receive(i.start()))
    assert finish is not None
    with pytest.raises(RemoteProtocolError):
        r.receive(finish)
    assert r.state is State.ERROR


# -- structured-but-wrong messages --------------------------------------------

non_bytes = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.lists(st.integers(0, 3), max_size=3)
    | st.dictionaries(st.sampled_from("tvcexmks"), st.integers(0, 3), max_size=2)
)
non_int = (
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.lists(st.integers(0, 3), max_size=3)
    | st.dictionaries(st.sampled_from("tvcexmks"), st.integers(0, 3), max_size=2)
)


def wrong_bytes(size: int, genuine: bytes) -> st.SearchStrategy[Any]:
    wrong_size = st.binary(max_size=300).filter(lambda b: len(b) != size)
    # Same size, other content: wrong for every field where it is tried
    # (a clan tag, a ciphertext, a MAC, the responder's ephemeral).
    same_size = st.binary(min_size=size, max_size=size).filter(lambda b: b != genuine)
    return non_bytes | wrong_size | same_size


def wrong_value(msg_type: MsgType, field: str, genuine: Any) -> st.SearchStrategy[Any]:
    if field == "t":
        return non_int | st.integers(-(2**63), 2**64 - 1).filter(lambda t: t != genuine)
    if msg_type is MsgType.HELLO and field == "v":
        bad_pairs = st.sampled_from(
            [[2, 1], [0, 0], [2, 3], [-1, 1], [1, 65536], [65536, 65537], [True, True], [1.0, 1.0]]
        )
        bad_shapes = st.lists(st.integers(0, 3), max_size=4).filter(lambda v: len(v) != 2)
        mixed = st.lists(non_int, min_size=2, max_size=2)
        return non_bytes.filter(lambda v: not isinstance(v, list)) | bad_pairs | bad_shapes | mixed
    if msg_type is MsgType.REPLY and field == "v":
        return non_int | st.integers(-(2**63), 2**64 - 1).filter(lambda v: v != genuine)
    if msg_type is MsgType.HELLO and field == "e":
        # Any other 32 bytes are a valid ephemeral: only wrong sizes, types
        # and the small-order points are wrong here.
        wrong_size = st.binary(max_size=300).filter(lambda b: len(b) != 32)
        return non_bytes | wrong_size | st.sampled_from(LOW_ORDER_POINTS)
    if msg_type is MsgType.REPLY and field == "e":
        return wrong_bytes(32, genuine) | st.sampled_from(LOW_ORDER_POINTS)
    assert isinstance(genuine, bytes), (msg_type, field)
    return wrong_bytes(len(genuine), genuine)


@st.composite
def wrong_messages(draw: st.DrawFn) -> tuple[MsgType, dict[str, Any]]:
    msg_type = draw(st.sampled_from(list(MsgType)))
    _, genuine_raw = at(*RECEIVER[msg_type])
    msg = unpack(genuine_raw)
    how = draw(st.sampled_from(["replace", "replace", "replace", "drop", "add"]))
    field = draw(st.sampled_from(sorted(msg)))
    if how == "replace":
        msg[field] = draw(wrong_value(msg_type, field, msg[field]))
    elif how == "drop":
        del msg[field]
    else:
        extra = draw(st.text(min_size=1, max_size=3).filter(lambda k: k not in msg))
        msg[extra] = draw(non_bytes | st.binary(max_size=40))
    return msg_type, msg


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=wrong_messages())
def test_structured_but_wrong_messages_only_ever_fail_the_handshake(
    case: tuple[MsgType, dict[str, Any]],
) -> None:
    msg_type, msg = case
    data = pack(msg)
    # To the state that expects this message type, and to every other one.
    for role, state in RECEIVING_STATES:
        h, _ = at(role, state)
        assert_refused(h, data)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=600), where=st.sampled_from(RECEIVING_STATES))
def test_random_bytes_only_ever_fail_the_handshake(data: bytes, where: tuple[Role, State]) -> None:
    h, _ = at(*where)
    assert_refused(h, data)


@pytest.mark.parametrize("where", RECEIVING_STATES, ids=lambda w: f"{w[0].value}-{w[1].value}")
def test_random_bytes_of_every_length_fail_the_handshake(where: tuple[Role, State]) -> None:
    rnd = random.Random(repr(where))
    for n in [*range(0, 301), 511, 512, 513, 4096, 1 << 16, 1 << 20]:
        h, _ = at(*where)
        assert_refused(h, rnd.randbytes(n))


def test_small_order_ephemerals_fail_on_both_sides() -> None:
    for point in LOW_ORDER_POINTS:
        responder, hello = at(Role.RESPONDER, State.START)
        assert_refused(responder, pack({**unpack(hello), "e": point}))
        initiator, reply = at(Role.INITIATOR, State.WAIT_REPLY)
        assert_refused(initiator, pack({**unpack(reply), "e": point}))


def test_every_field_of_every_message_is_checked_at_decode() -> None:
    # Systematic, so a failure names the field that slipped: each message
    # type x each field x (each wrong type, each wrong size, dropped), plus an
    # extra field, against the state that expects the message.
    wrong_types: list[Any] = [None, True, False, -1, 2**64 - 1, 1.5, "x", [], [1, 1], {}]
    for role, state in RECEIVING_STATES:
        _, genuine_raw = at(role, state)
        genuine = unpack(genuine_raw)
        variants: list[dict[str, Any]] = [{**genuine, "z": 0}, {**genuine, "": b""}]
        for field, value in genuine.items():
            variants.append({k: v for k, v in genuine.items() if k != field})
            variants += [{**genuine, field: w} for w in wrong_types]
            if isinstance(value, bytes):
                n = len(value)
                sizes = {0, 1, n - 1, n + 1, 2 * n, TAG_BYTES - 1, TAG_BYTES, 256}
                variants += [{**genuine, field: bytes(k)} for k in sorted(sizes - {n})]
            else:
                variants += [{**genuine, field: w} for w in (0, 2, 65535, 65536, b"\x01")]
        for msg in variants:
            data = pack(msg)
            if data == genuine_raw:  # (True == 1 in Python, not on the wire)
                continue
            h, _ = at(role, state)
            assert_refused(h, data)


# -- the session cipher --------------------------------------------------------


def cipher_pair() -> tuple[SessionCipher, SessionCipher]:
    i = Handshake(Role.INITIATOR, ALICE, CLAN, always)
    r = Handshake(Role.RESPONDER, BOB, CLAN, always)
    confirm = r.receive(i.receive(r.receive(i.start())))
    assert confirm is not None and i.receive(confirm) is None
    return i.cipher, r.cipher


@pytest.mark.parametrize("frame", ["text frame", 17, None, [b"x" * 40], {"x": 1}, 1.5])
def test_a_frame_of_the_wrong_type_is_a_bad_frame(frame: Any) -> None:
    _, rx = cipher_pair()
    with pytest.raises(RemoteProtocolError, match="frame"):
        rx.open(frame)
    assert rx.closed


@pytest.mark.parametrize("fault", [ValueError, TypeError, RuntimeError])
def test_a_library_error_while_opening_is_a_bad_frame(
    monkeypatch: pytest.MonkeyPatch, fault: type[Exception]
) -> None:
    tx, rx = cipher_pair()
    frame = tx.seal(b"payload")

    def broken(*_args: Any) -> bytes:
        raise fault("injected")

    monkeypatch.setattr(session_module, "crypto_aead_xchacha20poly1305_ietf_decrypt", broken)
    with pytest.raises(RemoteProtocolError, match="frame"):
        rx.open(frame)
    assert rx.closed


@settings(max_examples=200, deadline=None)
@given(frame=st.binary(max_size=300) | non_bytes)
def test_anything_received_is_a_bad_frame(frame: Any) -> None:
    rx = SessionCipher(b"a" * 32, b"b" * 32)
    with pytest.raises(RemoteProtocolError):
        rx.open(frame)
    assert rx.closed


# -- over real sockets ---------------------------------------------------------


async def _echo(session: PeerSession) -> None:
    while True:
        await session.send(b"echo:" + await session.receive())


@asynccontextmanager
async def raw_ws(port: int) -> AsyncIterator[WebSocketConnection]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, f"127.0.0.1:{port}", "/")
            yield ws
            nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


async def send_short_finish(port: int, clan: bytes) -> None:
    """HELLO (the clan tag is all the attacker needs), then a 1-byte FINISH;
    the listener must refuse it with a policy-violation close."""
    hs = Handshake(Role.INITIATOR, MALLORY, clan, always)
    async with raw_ws(port) as ws:
        await ws.send_message(hs.start())
        reply = unpack(await ws.get_message())
        assert reply["t"] == MsgType.REPLY
        await ws.send_message(pack({"t": int(MsgType.FINISH), "x": b"\x00"}))
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason.code == CLOSE_POLICY_VIOLATION


@pytest.mark.integration
async def test_the_peer_listener_survives_a_short_finish_and_still_serves() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                lambda task_status: serve_peers(
                    "127.0.0.1", 0, BOB, CLAN, always, _echo, timeout=5, task_status=task_status
                )
            )
            for _ in range(3):  # "repeat it forever"
                await send_short_finish(port, CLAN)
            async with open_peer_session(
                f"ws://127.0.0.1:{port}/", ALICE, CLAN, always, timeout=5
            ) as s:
                assert s.peer_public_key == BOB.public_key
                await s.send(b"still there?")
                assert await s.receive() == b"echo:still there?"
            nursery.cancel_scope.cancel()


@pytest.mark.integration
async def test_an_agent_survives_a_short_finish_and_still_admits_peers(tmp_path) -> None:
    from clanagent.agent import Agent
    from clanagent.config import Config, ControlConfig, GossipSection, MeshSection

    clan = bytes.fromhex("ab" * 16)
    cfg = Config(
        state_dir=str(tmp_path / "state"),
        control=ControlConfig(socket=str(tmp_path / "control.sock")),
        mesh=MeshSection(wireguard=False, mdns=False),
        gossip=GossipSection(
            listen="127.0.0.1:0", join=[], profile="local", name="target", clan_id=clan.hex()
        ),
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            agent = Agent(cfg)
            await nursery.start(agent.run)
            port = agent.gossip.port
            assert port
            for _ in range(3):
                await send_short_finish(port, clan)
            async with open_peer_session(
                f"ws://127.0.0.1:{port}/", ALICE, clan, always, timeout=5
            ) as s:
                assert s.peer_public_key == agent.identity.public_key
            nursery.cancel_scope.cancel()
