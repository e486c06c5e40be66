"""The daemon's wire format: encode/decode round trips and malformed lines."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.daemon.protocol import ProtocolError, decode, encode, escape, unescape

KEYS = st.from_regex(r"[a-z_][a-z0-9_]{0,15}", fullmatch=True)


def test_encode_plain_and_escaped_values():
    line = encode({"ok": 1, "message": "needs 8.000 GPU-h (2 x h100 x 4:00:00)", "none": None})
    assert line == b"ok=1 message=needs%208.000%20GPU-h%20%282%20x%20h100%20x%204:00:00%29\n"
    assert decode(line) == {"ok": "1", "message": "needs 8.000 GPU-h (2 x h100 x 4:00:00)"}


def test_tokens_need_no_escaping():
    token = "glt1.eyJhY2N0IjoicGh5c2ljcyJ9.QUJD-_x"
    assert escape(token) == token


def test_booleans_and_utf8():
    assert decode(encode({"covers": True, "name": "Zoë=x y%"})) == {"covers": "1",
                                                                   "name": "Zoë=x y%"}


@pytest.mark.parametrize("line", [
    b"", b"   \n", b"op", b"op=ping op=ping", b"Op=ping", b"9x=1", b"op=%zz", b"op=%4",
    b"op=\xff", b"op=%FF%FE", b"op=a\tb", b"a=b\x00", b"=1",
])
def test_malformed_lines_raise_protocol_error(line):
    with pytest.raises(ProtocolError):
        decode(line)


def test_extra_spaces_are_tolerated():
    assert decode(b"op=ping  x=1 \n") == {"op": "ping", "x": "1"}


@given(st.dictionaries(KEYS, st.text(max_size=60), min_size=1, max_size=8))
@settings(max_examples=400)
def test_round_trip(fields):
    assert decode(encode(fields)) == fields


@given(st.text(max_size=80))
def test_escape_round_trip(text):
    escaped = escape(text)
    assert " " not in escaped and "\n" not in escaped and "=" not in escaped
    assert unescape(escaped) == text


@given(st.binary(max_size=200))
@settings(max_examples=500)
def test_decode_never_raises_anything_else(data):
    try:
        result = decode(data)
    except ProtocolError:
        return
    assert isinstance(result, dict) and result
