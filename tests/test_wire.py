"""Tests for clanagent.wire: canonical codec, limits, typed records, signed envelopes."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import msgpack
import nacl.public
import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clanagent.identity import Identity, clamp_curve25519
from clanagent.wire import (
    DEFAULT_LIMITS,
    MAX_VERSION,
    RECORD_SIGNATURE_DOMAIN,
    CheckedRecord,
    Limits,
    NodeInfo,
    Range,
    Record,
    SignedRecord,
    Size,
    WireError,
    pack,
    record_class,
    record_type,
    unpack,
)

# ----------------------------------------------------------------- helpers

MAX_INT = 2**64 - 1
MIN_INT = -(2**63)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(MIN_INT, MAX_INT)
    | st.floats(allow_nan=False)
    | st.text(max_size=16)
    | st.binary(max_size=16)
)
wire_values = st.recursive(
    scalars,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4)
    ),
    max_leaves=20,
)
# Deep enough that generated values never trip the depth limit by accident.
ROOMY = Limits(max_depth=64)


def fixed_identity(seed: int) -> Identity:
    return Identity(
        nacl.signing.SigningKey(bytes([seed]) * 32),
        nacl.public.PrivateKey(bytes([seed + 1]) * 32),
        clamp_curve25519(bytes([seed + 2]) * 32),
    )


ALICE = fixed_identity(1)
BOB = fixed_identity(2)


def raw_envelope(signer: bytes, payload: bytes, signature: bytes) -> bytes:
    return msgpack.packb([signer, payload, signature], use_bin_type=True)


def signed_raw(identity: Identity, payload: bytes) -> bytes:
    """An envelope for an arbitrary payload with a *valid* signature over it."""
    sig = identity.sign(RECORD_SIGNATURE_DOMAIN + payload)
    return raw_envelope(identity.public_key, payload, sig)


def header(**over: Any) -> dict[str, Any]:
    h: dict[str, Any] = {"clan": b"", "kind": "k", "key": "x", "version": 1, "body": None}
    h.update(over)
    return h


def reason(exc: pytest.ExceptionInfo[WireError]) -> str:
    return exc.value.reason


# -------------------------------------------------------------- canonical


def test_pinned_encoding() -> None:
    assert pack({"b": 1, "a": [1, b"x"]}) == bytes.fromhex("82a1619201c40178a16201")
    # Keys sort by UTF-8 bytes, not by encoded length: "aa" < "b" < "z" < "é".
    assert list(unpack(pack({"é": 0, "z": 0, "b": 0, "aa": 0}))) == ["aa", "b", "z", "é"]
    assert pack(1.0) == b"\xcb" + struct.pack(">d", 1.0)  # float64, never float32
    assert pack(1) == b"\x01"  # shortest int


@given(st.dictionaries(st.text(max_size=8), scalars, max_size=12), st.randoms())
def test_insertion_order_does_not_change_bytes(d: dict[str, Any], rnd: Any) -> None:
    items = list(d.items())
    rnd.shuffle(items)
    shuffled = dict(items)
    assert pack(d) == pack(shuffled)
    assert pack({"outer": d}) == pack({"outer": shuffled})
    assert pack([d]) == pack([dict(reversed(items))])


@given(wire_values)
def test_round_trip(value: Any) -> None:
    data = pack(value)
    back = unpack(data, ROOMY)
    assert back == value
    assert pack(back) == data  # the encoding of a decoded value is the same bytes


@given(st.binary(max_size=64))
def test_arbitrary_bytes_unpack_or_wire_error(data: bytes) -> None:
    try:
        unpack(data)
    except WireError:
        pass


@given(wire_values, st.data())
def test_mutated_encodings_unpack_or_wire_error(value: Any, data: st.DataObject) -> None:
    enc = bytearray(pack(value))
    i = data.draw(st.integers(0, len(enc) - 1))
    enc[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(enc)))
    try:
        unpack(bytes(enc[:cut]))
    except WireError:
        pass


@pytest.mark.parametrize(
    "value",
    [float("nan"), {1: "x"}, {b"k": 1}, {None: 1}, object(), 2**64, -(2**63) - 1, {"a": {2: 3}}],
)
def test_pack_rejects_unencodable(value: Any) -> None:
    with pytest.raises(WireError):
        pack(value)


# ----------------------------------------------------------------- limits


@pytest.mark.parametrize(
    "head",
    [
        b"\xdb\xff\xff\xff\xff",  # str32, 4 GB
        b"\xc6\xff\xff\xff\xff",  # bin32
        b"\xdd\xff\xff\xff\xff",  # array32
        b"\xdf\xff\xff\xff\xff",  # map32
        b"\xc9\xff\xff\xff\xff\x01",  # ext32
    ],
)
def test_huge_length_claims_are_rejected_cheaply(head: bytes) -> None:
    with pytest.raises(WireError):
        unpack(head)
    with pytest.raises(WireError):
        unpack(head + b"\x00" * 64)
    with pytest.raises(WireError):
        unpack(b"\x91" + head)  # nested too


def test_frame_limit_at_and_over() -> None:
    lim = Limits(max_frame=100)
    at = pack(b"x" * 98)  # bin8: 2 header bytes
    assert len(at) == 100
    assert unpack(at, lim) == b"x" * 98
    over = pack(b"x" * 99)
    with pytest.raises(WireError, match="exceeds limit 100") as e:
        unpack(over, lim)
    assert "101" in reason(e)


def nested(depth: int, kind: str) -> Any:
    v: Any = 0
    for _ in range(depth):
        v = [v] if kind == "list" else {"k": v}
    return v


@pytest.mark.parametrize("kind", ["list", "map"])
def test_depth_limit_at_and_over(kind: str) -> None:
    d = DEFAULT_LIMITS.max_depth
    assert unpack(pack(nested(d, kind))) == nested(d, kind)
    with pytest.raises(WireError, match="nesting deeper"):
        unpack(pack(nested(d + 1, kind)))
    small = Limits(max_depth=3)
    unpack(pack(nested(3, kind)), small)
    with pytest.raises(WireError, match="nesting deeper"):
        unpack(pack(nested(4, kind)), small)


@pytest.mark.parametrize(
    ("field", "make"),
    [
        ("max_str", lambda n: "s" * n),
        ("max_bin", lambda n: b"b" * n),
        ("max_array", lambda n: [0] * n),
        ("max_map", lambda n: {f"{i:03d}": 0 for i in range(n)}),
    ],
)
def test_per_type_limits_at_and_over(field: str, make: Any) -> None:
    lim = Limits(**{field: 20})
    assert unpack(pack(make(20)), lim) == make(20)
    with pytest.raises(WireError, match="exceeds"):
        unpack(pack(make(21)), lim)
    # Nested inside a map the limit applies the same way.
    with pytest.raises(WireError, match="exceeds"):
        unpack(pack({"v": make(21)}), lim)


def test_rejects_trailing_bytes() -> None:
    with pytest.raises(WireError, match="2 trailing bytes"):
        unpack(pack({"a": 1}) + b"\x00\x00")


@pytest.mark.parametrize(
    "data",
    [
        b"\xd4\x01\x00",  # fixext1
        b"\xc7\x00\x05",  # ext8, length 0
        msgpack.packb(msgpack.ExtType(3, b"abc")),
        b"\xd6\xff\x00\x00\x00\x00",  # timestamp ext
    ],
)
def test_rejects_ext_types(data: bytes) -> None:
    with pytest.raises(WireError):
        unpack(data)


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb({1: "x"}),
        msgpack.packb({b"bin": 1}, use_bin_type=True),
        msgpack.packb({"ok": {b"bin": 1}}, use_bin_type=True),
        msgpack.packb([{2.5: 1}], strict_types=False),
    ],
)
def test_rejects_non_str_keys(data: bytes) -> None:
    with pytest.raises(WireError):
        unpack(data)


def test_rejects_nan_in_any_encoding() -> None:
    with pytest.raises(WireError, match="NaN"):
        unpack(b"\xcb" + struct.pack(">d", math.nan))
    with pytest.raises(WireError, match="NaN"):
        unpack(b"\xca" + struct.pack(">f", math.nan))
    with pytest.raises(WireError, match="NaN"):
        unpack(pack({"a": [1, 2]})[:-1] + b"\xcb" + struct.pack(">d", math.nan))


def test_rejects_bad_utf8_empty_and_non_bytes() -> None:
    with pytest.raises(WireError):
        unpack(b"\xa2\xff\xfe")
    with pytest.raises(WireError):
        unpack(b"")
    with pytest.raises(WireError):
        unpack("text")  # type: ignore[arg-type]


# ---------------------------------------------------------- typed records


@dataclass(frozen=True, slots=True)
class Peer(Record):
    public_key: bytes
    addr: str | None

    def __post_init__(self) -> None:
        if len(self.public_key) != 32:
            raise WireError("public_key: expected 32 bytes")


@record_type
@dataclass(frozen=True, slots=True)
class Sample(Record):
    KIND: ClassVar[str] = "test-sample"
    count: int
    ratio: float
    flag: bool
    name: str
    blob: bytes
    nothing: None
    tags: list[str]
    labels: dict[str, int]
    maybe: int | None
    either: int | str
    peers: tuple[Peer, ...]
    extra: Any


@dataclass(frozen=True, slots=True)
class Tree(Record):
    value: int
    children: list[Tree]


def sample_wire(**over: Any) -> dict[str, Any]:
    w: dict[str, Any] = {
        "count": 3,
        "ratio": 0.5,
        "flag": True,
        "name": "n",
        "blob": b"\x00",
        "nothing": None,
        "tags": ["a", "b", "c"],
        "labels": {"x": 1},
        "maybe": None,
        "either": "s",
        "peers": [{"public_key": b"k" * 32, "addr": "10.0.0.1"}],
        "extra": {"anything": [1, "goes"]},
    }
    w.update(over)
    return w


peers = st.builds(Peer, public_key=st.binary(min_size=32, max_size=32), addr=st.none() | st.text())
samples = st.builds(
    Sample,
    count=st.integers(MIN_INT, MAX_INT),
    ratio=st.floats(allow_nan=False),
    flag=st.booleans(),
    name=st.text(),
    blob=st.binary(),
    nothing=st.none(),
    tags=st.lists(st.text(), max_size=4),
    labels=st.dictionaries(st.text(), st.integers(MIN_INT, MAX_INT), max_size=4),
    maybe=st.none() | st.integers(0, 10),
    either=st.integers(0, 10) | st.text(),
    peers=st.lists(peers, max_size=3).map(tuple),
    extra=wire_values,
)


@given(samples)
def test_record_round_trip(rec: Sample) -> None:
    wire = rec.to_wire()
    assert set(wire) == set(sample_wire())
    back = Sample.from_wire(unpack(pack(wire), ROOMY))
    assert back == rec
    assert isinstance(back.peers, tuple) and all(isinstance(p, Peer) for p in back.peers)


def test_record_registry() -> None:
    assert record_class("node-info") is NodeInfo
    assert record_class("test-sample") is Sample
    with pytest.raises(WireError, match="unknown record kind"):
        record_class("no-such-kind")
    with pytest.raises(TypeError, match="already"):

        @record_type
        @dataclass(frozen=True)
        class Clash(Record):
            KIND: ClassVar[str] = "node-info"
            x: int

    with pytest.raises(TypeError, match="frozen"):

        @record_type
        @dataclass
        class Mutable(Record):
            KIND: ClassVar[str] = "test-mutable"
            x: int


def test_node_info_round_trip() -> None:
    info = NodeInfo(name="n1", version="0.1", addrs=["10.0.0.1:7946"])
    assert info.to_wire() == {"name": "n1", "version": "0.1", "addrs": ["10.0.0.1:7946"]}
    assert NodeInfo.from_wire(info.to_wire()) == info


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ({**sample_wire(), "bogus": 1}, "body.bogus: unknown field"),
        ({k: v for k, v in sample_wire().items() if k != "name"}, "body.name: missing field"),
        (sample_wire(count="3"), "body.count: expected int, got str"),
        (sample_wire(count=True), "body.count: expected int, got bool"),  # bool is not an int
        (sample_wire(flag=1), "body.flag: expected bool, got int"),
        (sample_wire(ratio=1), "body.ratio: expected float, got int"),
        (sample_wire(blob="00"), "body.blob: expected bytes, got str"),
        (sample_wire(nothing=0), "body.nothing: expected nil, got int"),
        (sample_wire(tags=["a", "b", 3]), "body.tags[2]: expected str, got int"),
        (sample_wire(tags="abc"), "body.tags: expected array, got str"),
        (sample_wire(labels={"x": 1, "y": "2"}), "body.labels['y']: expected int, got str"),
        (sample_wire(maybe="x"), "body.maybe: expected int, got str"),
        (sample_wire(either=1.5), "body.either: expected int | str, got float"),
        (
            sample_wire(peers=[{"public_key": b"k" * 32, "addr": None}, {"public_key": b"k"}]),
            "body.peers[1].addr: missing field",
        ),
        (
            sample_wire(peers=[{"public_key": b"k" * 31, "addr": None}]),
            "body.peers[0]: public_key: expected 32 bytes",  # __post_init__ constraint
        ),
        (
            sample_wire(peers=[{"public_key": b"k" * 32, "addr": 7}]),
            "body.peers[0].addr: expected str, got int",
        ),
        ([1, 2], "body: expected map, got list"),
    ],
)
def test_schema_errors_name_the_path(wire: Any, expected: str) -> None:
    with pytest.raises(WireError) as e:
        Sample.from_wire(wire, path="body")
    assert reason(e) == expected


def test_schema_error_without_root_path() -> None:
    with pytest.raises(WireError) as e:
        NodeInfo.from_wire({"name": "n", "version": "v", "addrs": ["a", None]})
    assert reason(e) == "addrs[1]: expected str, got nil"


def test_recursive_record_type() -> None:
    t = Tree(1, [Tree(2, []), Tree(3, [Tree(4, [])])])
    assert Tree.from_wire(unpack(pack(t.to_wire()))) == t
    bad = {"value": 1, "children": [{"value": 2, "children": [{"value": "x", "children": []}]}]}
    with pytest.raises(WireError) as e:
        Tree.from_wire(bad)
    assert reason(e) == "children[0].children[0].value: expected int, got str"


def test_to_wire_checks_types_too() -> None:
    with pytest.raises(WireError, match=r"^addrs\[0\]: expected str, got int$"):
        NodeInfo(name="n", version="v", addrs=[1]).to_wire()  # type: ignore[list-item]
    good = Sample.from_wire(sample_wire())
    with pytest.raises(WireError, match=r"^count: expected int, got bool$"):
        dataclasses.replace(good, count=False).to_wire()
    peer = {"public_key": b"k" * 32, "addr": None}
    with pytest.raises(WireError, match=r"^peers\[0\]: expected Peer, got dict$"):
        dataclasses.replace(good, peers=(peer,)).to_wire()


@given(wire_values)
def test_from_wire_on_arbitrary_values_is_record_or_wire_error(value: Any) -> None:
    for cls in (Sample, NodeInfo, Tree, Peer):
        try:
            rec = cls.from_wire(value)
        except WireError:
            continue
        assert rec.to_wire() == value


# ---------------------------------------- bounds, enums, arrays, checked records


class Colour(enum.IntEnum):
    RED = 0
    BLUE = 1


@dataclass(frozen=True, slots=True)
class Bounded(Record):
    n: Annotated[int, Range(1, 10)]
    name: Annotated[str, Size(1, 3)]
    blob: Annotated[bytes, Size(0, 2)]
    items: Annotated[list[int], Size(0, 2)]
    colour: Colour


@dataclass(frozen=True, slots=True)
class Msg(CheckedRecord):
    WIRE_ARRAY: ClassVar[bool] = True
    seq: Annotated[int, Range(0, 255)]
    who: Annotated[str, Size(1, 8)]
    parts: Annotated[tuple[Bounded, ...], Size(0, 2)] = ()
    note: str | None = None


GOOD_BOUNDED = {"n": 1, "name": "abc", "blob": b"", "items": [1, 2], "colour": 1}


def test_bounds_are_checked_at_and_over_the_limits() -> None:
    rec = Bounded.from_wire(GOOD_BOUNDED)
    assert rec.colour is Colour.BLUE and rec.to_wire() == GOOD_BOUNDED
    assert Bounded.from_wire({**GOOD_BOUNDED, "n": 10}).n == 10
    for field, bad, reason in [
        ("n", 0, "body.n: 0 is outside 1..10"),
        ("n", 11, "body.n: 11 is outside 1..10"),
        ("n", True, "body.n: expected int, got bool"),
        ("name", "", "body.name: length 0 is outside 1..3"),
        ("name", "abcd", "body.name: length 4 is outside 1..3"),
        ("blob", b"abc", "body.blob: length 3 is outside 0..2"),
        ("items", [1, 2, 3], "body.items: 3 items, not 0..2"),
        ("items", [1, "x"], "body.items[1]: expected int, got str"),
        ("colour", 2, "body.colour: 2 is not a Colour"),
        ("colour", "RED", "body.colour: expected int, got str"),
    ]:
        with pytest.raises(WireError) as e:
            Bounded.from_wire({**GOOD_BOUNDED, field: bad}, path="body")
        assert e.value.reason == reason


def test_array_form_round_trips_and_checks_its_length() -> None:
    msg = Msg(7, "me", (Bounded.from_wire(GOOD_BOUNDED),), "hi")
    wire = msg.to_wire()
    assert wire == [7, "me", [GOOD_BOUNDED], "hi"]
    assert Msg.from_wire(unpack(pack(wire))) == msg
    for bad, reason in [
        ({"seq": 7}, "expected array, got dict"),
        ([7, "me", []], "expected an array of 4, got 3"),
        ([7, "me", [], None, 1], "expected an array of 4, got 5"),
        ([256, "me", [], None], "seq: 256 is outside 0..255"),
        ([7, "me", [GOOD_BOUNDED] * 3, None], "parts: 3 items, not 0..2"),
        ([7, "me", [{**GOOD_BOUNDED, "n": 0}], None], "parts[0].n: 0 is outside 1..10"),
        ([7, "me", [], b"x"], "note: expected str, got bytes"),
    ]:
        with pytest.raises(WireError) as e:
            Msg.from_wire(bad)
        assert e.value.reason == reason


def test_a_checked_record_is_checked_when_built_too() -> None:
    Msg(0, "a")
    for args, reason in [
        ((256, "a"), "seq: 256 is outside 0..255"),
        ((1, ""), "who: length 0 is outside 1..8"),
        ((True, "a"), "seq: expected int, got bool"),
        ((1, "a", [Bounded.from_wire(GOOD_BOUNDED)]), "parts: expected array, got list"),
        ((1, "a", ("not a Bounded",)), "parts[0]: expected Bounded, got str"),
    ]:
        with pytest.raises(WireError) as e:
            Msg(*args)
        assert e.value.reason == reason


def test_a_checked_record_keeps_its_rules_in_its_annotations() -> None:
    @dataclass(frozen=True, slots=True)
    class Ruled(CheckedRecord):
        n: int

        def __post_init__(self) -> None:
            if self.n > 1:
                raise WireError("n too big")

    # Decoding would skip __post_init__ (fields are checked while converting).
    with pytest.raises(TypeError, match="annotations"):
        Ruled.from_wire({"n": 1})


def test_bounds_on_types_they_do_not_fit_are_refused() -> None:
    @dataclass(frozen=True, slots=True)
    class Wrong(Record):
        s: Annotated[str, Range(0, 1)]

    with pytest.raises(TypeError, match="Range"):
        Wrong.from_wire({"s": "x"})


# ---------------------------------------------------------- signed records


def test_create_decode_round_trip() -> None:
    info = NodeInfo(name="n1", version="0.1.0", addrs=["10.0.0.1:7946"])
    rec = SignedRecord.create(ALICE, "node-info", "self", 7, info, clan=b"C" * 32)
    data = rec.encode()
    back = SignedRecord.decode(data)
    assert back == rec
    assert (back.origin, back.clan, back.kind, back.key, back.version) == (
        ALICE.public_key,
        b"C" * 32,
        "node-info",
        "self",
        7,
    )
    assert back.body == info.to_wire()
    assert back.parse_body() == info
    assert back.parse_body(NodeInfo) == info
    with pytest.raises(WireError, match="not Sample"):
        back.parse_body(Sample)
    assert back.size == len(data)
    assert back.record_id == hashlib.blake2b(data, digest_size=32).digest()
    assert back.payload == pack(
        {
            "clan": b"C" * 32,
            "kind": "node-info",
            "key": "self",
            "version": 7,
            "body": info.to_wire(),
        }
    )
    assert ALICE.public_key.hex()[:16] in repr(back)


def test_pinned_record() -> None:
    # Ed25519 signatures are deterministic, so a fixed key gives fixed bytes;
    # this catches any unintended change to the envelope or signed message.
    sk = nacl.signing.SigningKey(bytes(range(32)))
    ident = Identity(sk, nacl.public.PrivateKey(bytes(32)), clamp_curve25519(bytes(32)))
    info = NodeInfo("n1", "0.1.0", ["10.0.0.1:7946"])
    rec = SignedRecord.create(ident, "node-info", "self", 7, info, clan=b"C" * 32)
    assert rec.size == 225
    assert rec.record_id.hex() == (
        "69c05f7946856e911733b18c2afe6274c0614a05cd06fe63a3c5697e3fdeb7b4"
    )


def test_any_signer_with_public_key_and_sign_works() -> None:
    class Stub:
        def __init__(self) -> None:
            self._sk = nacl.signing.SigningKey.generate()
            self.public_key = bytes(self._sk.verify_key)

        def sign(self, data: bytes) -> bytes:
            return self._sk.sign(data).signature

    stub = Stub()
    rec = SignedRecord.create(stub, "k", "", 1, [1, 2])
    assert SignedRecord.decode(rec.encode()).origin == stub.public_key


def test_every_flipped_bit_is_rejected() -> None:
    data = SignedRecord.create(ALICE, "node-info", "self", 3, {"a": [1, 2.5, "x"]}).encode()
    SignedRecord.decode(data)
    for i in range(len(data) * 8):
        bad = bytearray(data)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(WireError):
            SignedRecord.decode(bytes(bad))


@given(st.data())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_flipped_bit_in_arbitrary_record_is_rejected(data: st.DataObject) -> None:
    body = data.draw(wire_values)
    enc = SignedRecord.create(BOB, "kind", "key", 1, body).encode()
    i = data.draw(st.integers(0, len(enc) * 8 - 1))
    bad = bytearray(enc)
    bad[i // 8] ^= 1 << (i % 8)
    with pytest.raises(WireError):
        SignedRecord.decode(bytes(bad), ROOMY)


def test_signed_by_a_claiming_b_fails() -> None:
    payload = pack(header())
    sig = ALICE.sign(RECORD_SIGNATURE_DOMAIN + payload)
    with pytest.raises(WireError, match="bad signature"):
        SignedRecord.decode(raw_envelope(BOB.public_key, payload, sig))
    # verify=False is for bytes we verified before storing; it skips only the signature.
    assert SignedRecord.decode(raw_envelope(BOB.public_key, payload, sig), verify=False)


def test_signature_without_domain_is_rejected() -> None:
    payload = pack(header())
    sig = ALICE.sign(payload)  # no domain separation
    with pytest.raises(WireError, match="bad signature"):
        SignedRecord.decode(raw_envelope(ALICE.public_key, payload, sig))


def test_valid_raw_helper_really_decodes() -> None:
    # Guards the tests below: they fail only for the reason they target.
    assert SignedRecord.decode(signed_raw(ALICE, pack(header()))).kind == "k"


@pytest.mark.parametrize(
    "payload",
    [
        # float32 for a value float64 would encode (0.5 is exact in both)
        pack(header(body=None)).replace(b"\xa4body\xc0", b"\xa4body\xca" + struct.pack(">f", 0.5)),
        # version as uint64 instead of a positive fixint
        pack(header(version=1)).replace(
            b"\xa7version\x01", b"\xa7version\xcf" + (1).to_bytes(8, "big")
        ),
        # str8 header for a short kind
        pack(header(kind="k")).replace(b"\xa4kind\xa1k", b"\xa4kind\xd9\x01k"),
        # keys out of order
        msgpack.packb(
            {"kind": "k", "clan": b"", "key": "x", "version": 1, "body": None}, use_bin_type=True
        ),
        # out of order inside the body
        msgpack.packb(
            {"body": {"b": 1, "a": 2}, "clan": b"", "key": "x", "kind": "k", "version": 1},
            use_bin_type=True,
        ),
        # duplicate key: map of 6 pairs with "key" twice
        b"\x86" + pack(header())[1:].replace(b"\xa3key\xa1x", b"\xa3key\xa1y\xa3key\xa1x"),
    ],
    ids=["float32", "wide-int", "wide-str", "key-order", "body-key-order", "duplicate-key"],
)
def test_non_canonical_payload_is_rejected_even_if_signed(payload: bytes) -> None:
    with pytest.raises(WireError, match="canonical"):
        SignedRecord.decode(signed_raw(ALICE, payload))


def test_non_canonical_float32_header_really_is_float32() -> None:
    payload = pack(header(body=None)).replace(
        b"\xa4body\xc0", b"\xa4body\xca" + struct.pack(">f", 0.5)
    )
    assert unpack(payload)["body"] == 0.5  # decodes fine as plain msgpack


def test_non_canonical_envelope_is_rejected() -> None:
    rec = SignedRecord.create(ALICE, "k", "x", 1, None)
    # signer as bin16 instead of bin8: same content, different bytes
    wide = b"\x93\xc5\x00\x20" + rec.signer + rec.encode()[35:]
    assert unpack(wide)[0] == rec.signer
    with pytest.raises(WireError, match="envelope is not canonical"):
        SignedRecord.decode(wide)
    as_array16 = b"\xdc\x00\x03" + rec.encode()[1:]
    with pytest.raises(WireError, match="envelope is not canonical"):
        SignedRecord.decode(as_array16)


@pytest.mark.parametrize(
    ("hdr", "match"),
    [
        (header(version=0), "header.version: 0 is outside"),
        (header(version=MAX_VERSION + 1), "header.version"),
        (header(version=True), "header.version: expected int, got bool"),
        (header(version=-1), "header.version"),
        (header(kind=""), "header.kind: empty"),
        (header(kind="k" * 65), "header.kind: longer than 64"),
        (header(kind="é" * 33), "header.kind: longer than 64"),  # 66 UTF-8 bytes
        (header(key="k" * 257), "header.key: longer than 256"),
        (header(key=1), "header.key: expected str"),
        (header(clan="c"), "header.clan: expected bytes"),
        (header(clan=b"c" * 65), "header.clan: 65 bytes exceeds"),
        ({**header(), "extra": 1}, "header.extra: unknown field"),
        ({k: v for k, v in header().items() if k != "body"}, "header.body: missing field"),
    ],
)
def test_bad_headers_are_rejected(hdr: dict[str, Any], match: str) -> None:
    with pytest.raises(WireError, match=match):
        SignedRecord.decode(signed_raw(ALICE, pack(hdr)))


def test_header_bounds_at_limit_are_accepted() -> None:
    hdr = header(kind="k" * 64, key="k" * 256, version=MAX_VERSION, clan=b"c" * 64)
    rec = SignedRecord.decode(signed_raw(ALICE, pack(hdr)))
    assert (len(rec.kind), len(rec.key), rec.version) == (64, 256, MAX_VERSION)


@pytest.mark.parametrize(
    "env",
    [
        pack([b"s" * 32, pack(header())]),
        pack([b"s" * 32, pack(header()), b"g" * 64, b""]),
        pack({"signer": b"s" * 32}),
        pack([b"s" * 31, pack(header()), b"g" * 64]),
        pack([b"s" * 32, pack(header()), b"g" * 63]),
        pack(["s" * 32, pack(header()), b"g" * 64]),
        pack([b"s" * 32, header(), b"g" * 64]),
        pack([b"s" * 32, pack(header()) + b"\x00", b"g" * 64]),
        pack([b"s" * 32, pack([1, 2]), b"g" * 64]),
    ],
)
def test_bad_envelope_structure(env: bytes) -> None:
    with pytest.raises(WireError):
        SignedRecord.decode(env)


def test_create_refuses_what_decode_would_reject() -> None:
    for bad in ({"version": 0}, {"kind": ""}, {"key": "k" * 257}, {"clan": "str"}):
        args = {"kind": "k", "key": "", "version": 1, **bad}
        with pytest.raises(WireError):
            SignedRecord.create(ALICE, body=None, **args)
    with pytest.raises(WireError):
        SignedRecord.create(ALICE, "k", "", 1, {"x": float("nan")})
    with pytest.raises(WireError, match="not 'other'"):
        SignedRecord.create(ALICE, "other", "", 1, NodeInfo("n", "v", []))


def test_record_frame_limit() -> None:
    rec = SignedRecord.create(ALICE, "k", "", 1, b"z" * 100)
    data = rec.encode()
    assert SignedRecord.decode(data, Limits(max_frame=len(data))) == rec
    with pytest.raises(WireError, match="exceeds limit"):
        SignedRecord.decode(data, Limits(max_frame=len(data) - 1))


def test_decode_accepts_bytes_like() -> None:
    data = SignedRecord.create(ALICE, "k", "", 1, 1).encode()
    assert SignedRecord.decode(memoryview(data)).body == 1
    assert SignedRecord.decode(bytearray(data)).body == 1


@given(st.binary(max_size=300))
def test_decode_arbitrary_bytes_raises_only_wire_error(data: bytes) -> None:
    try:
        SignedRecord.decode(data)
    except WireError:
        pass


VALID = SignedRecord.create(ALICE, "node-info", "self", 9, {"addrs": ["a", "b"], "n": 1}).encode()


@given(st.data())
def test_decode_mutated_records_raises_only_wire_error(data: st.DataObject) -> None:
    buf = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["set", "insert", "delete"]))
        i = data.draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "set" and buf:
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        elif buf:
            del buf[i : i + data.draw(st.integers(1, 8))]
    try:
        rec = SignedRecord.decode(bytes(buf))
    except WireError:
        return
    # Only an unchanged record may decode (e.g. an insert undone by a delete).
    assert bytes(buf) == VALID and rec.encode() == VALID
