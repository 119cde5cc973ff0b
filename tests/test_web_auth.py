"""The web console's sans-IO parts: login tokens, sessions, request checks, JSON messages."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clanagent.control.protocol import ControlError, ErrorCode, Request, RequestError
from clanagent.web.auth import (
    LOGIN_TTL,
    MAX_LOGIN_TOKENS,
    MAX_SESSIONS,
    SESSION_IDLE,
    SESSION_TTL,
    Authenticator,
    AuthError,
    check_host,
    check_origin,
)
from clanagent.web.messages import Auth, Cancel, decode_message, encode, to_json
from clanagent.wire import Limits

LIMITS = Limits(max_frame=4096)

# -- login tokens and sessions ------------------------------------------------------


def test_a_login_token_works_once():
    auth = Authenticator()
    token = auth.mint_login(100.0)
    session = auth.redeem(token, 101.0)
    assert auth.check(session, 102.0) == "write"
    with pytest.raises(AuthError, match="already used"):
        auth.redeem(token, 103.0)
    assert token not in repr(auth.__dict__)  # only digests are kept


def test_a_login_token_expires():
    auth = Authenticator()
    token = auth.mint_login(0.0)
    with pytest.raises(AuthError, match="expired"):
        auth.redeem(token, LOGIN_TTL)
    assert auth.counts == {"login_tokens": 0, "sessions": 0}


@pytest.mark.parametrize("bad", [None, "", 7, "x" * 129, ["t"], "forged-token"])
def test_forged_or_malformed_tokens_are_refused(bad):
    auth = Authenticator()
    auth.mint_login(0.0)
    with pytest.raises(AuthError, match="clanctl ui"):
        auth.redeem(bad, 1.0)
    with pytest.raises(AuthError, match="not logged in"):
        auth.check(bad, 1.0)


def test_a_failed_redeem_does_not_burn_other_tokens():
    auth = Authenticator()
    good = auth.mint_login(0.0)
    with pytest.raises(AuthError):
        auth.redeem(good[:-1] + ("A" if good[-1] != "A" else "B"), 1.0)
    assert auth.check(auth.redeem(good, 2.0), 3.0) == "write"


def test_sessions_expire_when_idle_and_at_their_age_limit():
    auth = Authenticator()
    s = auth.redeem(auth.mint_login(0.0), 0.0)
    assert auth.check(s, SESSION_IDLE - 1) == "write"  # use keeps it alive
    with pytest.raises(AuthError):
        auth.check(s, 2 * SESSION_IDLE)
    s2 = auth.redeem(auth.mint_login(0.0), 0.0)
    t = 0.0
    while t + SESSION_IDLE / 2 < SESSION_TTL:
        t += SESSION_IDLE / 2
        auth.check(s2, t)
    with pytest.raises(AuthError):
        auth.check(s2, SESSION_TTL)


def test_logout_ends_a_session():
    auth = Authenticator()
    s = auth.redeem(auth.mint_login(0.0), 0.0)
    assert auth.end(s) and not auth.end(s) and not auth.end(None)
    with pytest.raises(AuthError):
        auth.check(s, 1.0)


def test_tokens_and_sessions_are_bounded():
    auth = Authenticator()
    tokens = [auth.mint_login(float(i)) for i in range(MAX_LOGIN_TOKENS + 5)]
    assert auth.counts["login_tokens"] == MAX_LOGIN_TOKENS
    with pytest.raises(AuthError):
        auth.redeem(tokens[0], 30.0)  # the oldest made room
    sessions = [auth.redeem(auth.mint_login(40.0 + i), 40.0 + i) for i in range(MAX_SESSIONS + 3)]
    assert auth.counts["sessions"] == MAX_SESSIONS
    with pytest.raises(AuthError):
        auth.check(sessions[0], 200.0)
    assert auth.check(sessions[-1], 200.0) == "write"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["mint", "redeem", "check"]), st.integers(0, 5), st.floats(0, 50)
        ),
        max_size=40,
    )
)
def test_no_token_is_ever_redeemed_twice(ops):
    auth = Authenticator(login_ttl=100.0)
    tokens: list[str] = []
    used: set[str] = set()
    sessions: list[str] = []
    now = 0.0
    for op, i, dt in ops:
        now += dt
        if op == "mint":
            tokens.append(auth.mint_login(now))
        elif op == "redeem" and tokens:
            t = tokens[i % len(tokens)]
            try:
                sessions.append(auth.redeem(t, now))
                assert t not in used
                used.add(t)
            except AuthError:
                pass
        elif op == "check" and sessions:
            try:
                auth.check(sessions[i % len(sessions)], now)
            except AuthError:
                pass


# -- Host and Origin -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["127.0.0.1:7780", "localhost:7780", "[::1]:7780", "LOCALHOST:7780"]
)
def test_loopback_hosts_are_accepted(host):
    check_host(host, 7780)


@pytest.mark.parametrize(
    "host", [None, "", "evil.example:7780", "127.0.0.1", "127.0.0.1:7781", "127.0.0.1.nip.io:7780"]
)
def test_other_hosts_are_rebinding(host):
    with pytest.raises(AuthError, match="rebinding"):
        check_host(host, 7780)


@pytest.mark.parametrize(
    "origin",
    [None, "null", "http://evil.example", "https://127.0.0.1:7780", "http://127.0.0.1:9999"],
)
def test_foreign_origins_are_refused(origin):
    with pytest.raises(AuthError):
        check_origin(origin, 7780)
    check_origin("http://127.0.0.1:7780", 7780)


# -- JSON messages --------------------------------------------------------------------------


def test_requests_decode_into_control_requests():
    msg = decode_message('{"id": 3, "method": "status"}', LIMITS)
    assert msg == Request(3, 1, "status", {})
    assert decode_message('{"auth": "s"}', LIMITS) == Auth("s")
    assert decode_message('{"id": 4, "cancel": true}', LIMITS) == Cancel(4)


@pytest.mark.parametrize(
    "text, code, rid",
    [
        ("{", ErrorCode.BAD_REQUEST, None),
        ("[1, 2]", ErrorCode.BAD_REQUEST, None),
        ('{"id": NaN, "method": "x"}', ErrorCode.BAD_REQUEST, None),
        ('{"id": 1, "method": "x", "params": {"a": Infinity}}', ErrorCode.BAD_REQUEST, None),
        ('{"method": "status"}', ErrorCode.BAD_REQUEST, None),
        ('{"id": -1, "method": "status"}', ErrorCode.BAD_REQUEST, None),
        ('{"id": 5}', ErrorCode.BAD_REQUEST, 5),
        ('{"id": 5, "method": "x", "extra": 1}', ErrorCode.BAD_REQUEST, 5),
        ('{"id": 5, "method": "x", "params": []}', ErrorCode.BAD_REQUEST, 5),
        ('{"id": 5, "method": "x", "params": {"n": 1e400}}', ErrorCode.BAD_REQUEST, None),
        (
            '{"id": 5, "method": "x", "params": {"n": 123456789012345678901234567890}}',
            ErrorCode.BAD_REQUEST,
            5,
        ),
        ('{"id": 5, "method": "x", "v": "1"}', ErrorCode.BAD_REQUEST, 5),
        ('{"auth": 1}', ErrorCode.BAD_REQUEST, None),
        ('{"id": 1, "cancel": false}', ErrorCode.BAD_REQUEST, None),
        ("[" * 100000 + "]" * 100000, ErrorCode.TOO_LARGE, None),
        (
            # too deep for the control protocol's decoder (which sees no id yet)
            '{"id": 1, "method": "x", "params": {"p": ' + "[" * 40 + "]" * 40 + "}}",
            ErrorCode.BAD_REQUEST,
            None,
        ),
    ],
)
def test_bad_messages_get_clear_errors(text, code, rid):
    with pytest.raises(ControlError) as exc:
        decode_message(text, LIMITS)
    assert exc.value.code == code, exc.value.message
    got = exc.value.request_id if isinstance(exc.value, RequestError) else None
    assert got == rid
    assert exc.value.message


def test_deep_json_within_the_size_limit_is_refused():
    deep = "[" * 3000 + "]" * 3000
    with pytest.raises(ControlError):
        decode_message(deep, Limits(max_frame=1 << 20))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_arbitrary_text_only_ever_raises_control_errors(text):
    try:
        decode_message(text, LIMITS)
    except ControlError:
        pass


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["id", "method", "params", "v", "auth", "cancel", "x"]),
        json_values,
        max_size=5,
    )
)
def test_arbitrary_json_objects_decode_or_get_an_error(obj):
    try:
        msg = decode_message(json.dumps(obj), LIMITS)
    except ControlError as exc:
        assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE)
        return
    assert isinstance(msg, (Auth, Cancel, Request))


def test_bytes_become_hex_in_one_place():
    value = {"k": b"\x00\xff", "l": (b"a", {1, 2}), "f": float("nan"), "n": None}
    assert to_json(value) == {"k": "00ff", "l": ["61", [1, 2]], "f": None, "n": None}
    assert json.loads(encode({"id": 1, "ok": True, "result": value}))["result"]["k"] == "00ff"
