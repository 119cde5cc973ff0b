import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clanagent.control.protocol import (
    ControlError,
    ErrorCode,
    FrameDecoder,
    RequestError,
    encode_frame,
    parse_request,
)
from clanagent.wire import Limits, pack

LIMITS = Limits(max_frame=4096)


def test_frame_roundtrip_and_split_feeding():
    frames = [encode_frame({"id": i, "method": "status"}) for i in range(3)]
    data = b"".join(frames)
    dec = FrameDecoder(4096)
    got = []
    for i in range(len(data)):  # one byte at a time
        got += dec.feed(data[i : i + 1])
    assert [parse_request(f, LIMITS).id for f in got] == [0, 1, 2]
    assert dec.pending == 0


def test_oversized_length_is_fatal_and_sticky():
    dec = FrameDecoder(100)
    with pytest.raises(ControlError) as exc:
        dec.feed(struct.pack(">I", 101) + b"x")
    assert exc.value.code == ErrorCode.TOO_LARGE
    with pytest.raises(ControlError):
        dec.feed(encode_frame({"id": 1, "method": "status"}))


def test_frame_at_limit_is_accepted():
    body = pack({"id": 1, "method": "x" * 50})
    dec = FrameDecoder(len(body))
    assert dec.feed(struct.pack(">I", len(body)) + body) == [body]


@pytest.mark.parametrize(
    "msg, code, rid",
    [
        ([1, 2], ErrorCode.BAD_REQUEST, None),
        ({"method": "status"}, ErrorCode.BAD_REQUEST, None),
        ({"id": True, "method": "status"}, ErrorCode.BAD_REQUEST, None),
        ({"id": -1, "method": "status"}, ErrorCode.BAD_REQUEST, None),
        ({"id": 3}, ErrorCode.BAD_REQUEST, 3),
        ({"id": 3, "method": ""}, ErrorCode.BAD_REQUEST, 3),
        ({"id": 3, "method": "status", "params": []}, ErrorCode.BAD_REQUEST, 3),
        ({"id": 3, "method": "status", "v": "1"}, ErrorCode.BAD_REQUEST, 3),
        ({"id": 3, "method": "status", "extra": 1}, ErrorCode.BAD_REQUEST, 3),
    ],
)
def test_bad_requests(msg, code, rid):
    with pytest.raises(ControlError) as exc:
        parse_request(pack(msg), LIMITS)
    assert exc.value.code == code
    if rid is not None:
        assert isinstance(exc.value, RequestError) and exc.value.request_id == rid


def test_malformed_msgpack_is_bad_request():
    with pytest.raises(ControlError) as exc:
        parse_request(b"\xc1\x00", LIMITS)
    assert exc.value.code == ErrorCode.BAD_REQUEST


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_control_error(data):
    try:
        req = parse_request(data, LIMITS)
    except ControlError:
        return
    assert isinstance(req.id, int) and isinstance(req.method, str)


@given(st.binary(max_size=600), st.integers(min_value=1, max_value=50))
def test_decoder_never_raises_anything_else(data, chunk):
    dec = FrameDecoder(256)
    try:
        for i in range(0, len(data), chunk):
            for frame in dec.feed(data[i : i + chunk]):
                assert len(frame) <= 256
    except ControlError as exc:
        assert exc.code == ErrorCode.TOO_LARGE
