"""Tests for clanagent.inventory.token: the join token text form."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clanagent.inventory.token import TOKEN_PREFIX, Token, TokenError, make_token, parse_token
from clanagent.wire import pack

CLAN = bytes(range(16))
ADMINS = [b"\x02" * 32, b"\x01" * 32]


def good() -> str:
    return make_token(CLAN, "home", ADMINS, ["198.51.100.7:7946", "[2001:db8::1]:7946"], "alpha")


def encode_raw(value) -> str:
    body = pack(value)
    raw = body + hashlib.blake2b(body, digest_size=4).digest()
    return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_round_trip():
    tok = parse_token(good())
    assert tok == Token(
        CLAN, "home", tuple(sorted(ADMINS)), ("198.51.100.7:7946", "[2001:db8::1]:7946"), "alpha"
    )
    assert "=" not in good() and good().startswith("clan1.")
    assert parse_token("  " + good() + "\n") == tok  # pasted with whitespace
    # The token re-encodes to itself: one token, one spelling.
    assert make_token(tok.clan_id, tok.name, tok.admins, tok.seeds, tok.machine) == good()


def test_wrong_prefix():
    with pytest.raises(TokenError, match="must start with 'clan1.'"):
        parse_token("clan2." + good()[6:])
    with pytest.raises(TokenError, match="must start with"):
        parse_token("")


def test_every_single_character_typo_and_truncation_is_caught():
    text = good()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for i in range(len(TOKEN_PREFIX), len(text)):
        c = text[i]
        wrong = alphabet[(alphabet.index(c) + 1) % 64]
        with pytest.raises(TokenError, match="mistyped or truncated"):
            parse_token(text[:i] + wrong + text[i + 1 :])
    for n in range(len(TOKEN_PREFIX), len(text)):
        with pytest.raises(TokenError, match="mistyped or truncated"):
            parse_token(text[:n])


def test_not_base64():
    with pytest.raises(TokenError, match="not valid base64url"):
        parse_token(TOKEN_PREFIX + "abc$def")
    with pytest.raises(TokenError, match="not valid base64url"):
        parse_token(good() + "=")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"v": 2}, "version 2 is not supported"),
        ({"clan": b"short"}, "field clan"),
        ({"name": ""}, "field name"),
        ({"admins": []}, "field admins"),
        ({"admins": [b"\x01" * 31]}, "field admins"),
        ({"admins": [b"\x01" * 32, b"\x01" * 32]}, "listed twice"),
        ({"seeds": ["no-port"]}, "field seeds"),
        ({"seeds": ["host:99999"]}, "out of range"),
        ({"seeds": ["host:"]}, "field seeds"),
        ({"machine": "Alpha"}, "field machine"),
        ({"extra": 1}, "wrong fields"),
    ],
)
def test_bad_fields_with_valid_checksum(change, message):
    value = {
        "v": 1,
        "clan": CLAN,
        "name": "home",
        "admins": ADMINS,
        "seeds": [],
        "machine": "alpha",
    }
    value.update(change)
    with pytest.raises(TokenError, match=message):
        parse_token(encode_raw(value))


def test_not_msgpack_with_valid_checksum():
    raw = b"\xc1\xc1\xc1"
    text = base64.urlsafe_b64encode(raw + hashlib.blake2b(raw, digest_size=4).digest())
    with pytest.raises(TokenError, match="malformed"):
        parse_token(TOKEN_PREFIX + text.decode().rstrip("="))


def test_make_token_checks_fields():
    with pytest.raises(TokenError, match="field machine"):
        make_token(CLAN, "home", ADMINS, [], "bad name")
    with pytest.raises(TokenError, match="field clan"):
        make_token(b"x", "home", ADMINS, [], "alpha")


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200),
        st.text(alphabet="ABCDEFabcdef0123456789-_", max_size=200).map(TOKEN_PREFIX.__add__),
        st.binary(max_size=200).map(
            lambda b: (
                TOKEN_PREFIX
                + base64.urlsafe_b64encode(b + hashlib.blake2b(b, digest_size=4).digest())
                .decode()
                .rstrip("=")
            )
        ),
    )
)
def test_any_string_gives_token_or_token_error(s):
    try:
        tok = parse_token(s)
    except TokenError as exc:
        assert str(exc)
        return
    assert isinstance(tok, Token)
