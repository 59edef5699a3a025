import base64

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from dask_gateway_common.tokens import (
    check_token_header,
    decode_basic,
    new_token,
    parse_authorization,
    tokens_equal,
)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("token abc", ("token", "abc")),
        ("Bearer  abc  ", ("bearer", "abc")),
        ("  TOKEN\tabc def", ("token", "abc def")),
        ("Basic dXNlcjpwdw==", ("basic", "dXNlcjpwdw==")),
    ],
)
def test_parse_authorization_ok(value, expected):
    assert parse_authorization(value) == expected


@pytest.mark.parametrize("value", [None, "", "   ", "token", "token   ", "abc", 42, b"token x"])
def test_parse_authorization_rejects(value):
    assert parse_authorization(value) is None


@given(st.one_of(st.none(), st.text(), st.binary(), st.integers()))
def test_parse_authorization_never_raises(value):
    result = parse_authorization(value)
    if result is not None:
        scheme, credentials = result
        assert scheme == scheme.lower() and scheme
        assert credentials == credentials.strip() and credentials


def test_tokens_equal():
    assert tokens_equal("abc", "abc")
    assert tokens_equal("abc", b"abc")
    assert tokens_equal("é", "é".encode())
    assert not tokens_equal("abc", "abd")
    assert not tokens_equal("abc", "abcd")
    assert not tokens_equal("abc", None)  # type: ignore[arg-type]
    assert not tokens_equal(1, 1)  # type: ignore[arg-type]
    assert not tokens_equal("\ud800", "\ud800")  # not encodable


def test_check_token_header():
    assert check_token_header("token s3cret", "s3cret")
    assert check_token_header("Bearer s3cret", "s3cret")
    assert check_token_header("TOKEN s3cret ", "s3cret")
    assert not check_token_header("Basic s3cret", "s3cret")
    assert not check_token_header("token wrong", "s3cret")
    assert not check_token_header("s3cret", "s3cret")
    assert not check_token_header(None, "s3cret")
    assert not check_token_header("token ", "")
    assert not check_token_header("token x", "")


def _basic(text: str) -> str:
    return base64.b64encode(text.encode("latin-1")).decode()


def test_decode_basic():
    assert decode_basic(_basic("alice:pw")) == ("alice", "pw")
    assert decode_basic(_basic("alice:pw:with:colons")) == ("alice", "pw:with:colons")
    assert decode_basic(_basic("alice:")) == ("alice", "")
    assert decode_basic(_basic(":pw")) == ("", "pw")
    assert decode_basic(_basic("jos\xe9:p\xe4ss")) == ("jos\xe9", "p\xe4ss")


@pytest.mark.parametrize("value", ["", "!!!", "abc", _basic("nocolon"), "dXNlcjpwdw", "é"])
def test_decode_basic_rejects(value):
    assert decode_basic(value) is None


@given(st.text())
def test_decode_basic_never_raises(value):
    decode_basic(value)


@given(
    st.text(alphabet=st.characters(max_codepoint=255)), st.text(st.characters(max_codepoint=255))
)
def test_decode_basic_roundtrip(user, password):
    assume(":" not in user)
    assert decode_basic(_basic(f"{user}:{password}")) == (user, password)


def test_new_token():
    a, b = new_token(), new_token()
    assert a != b
    assert len(a) == 64
    int(a, 16)
