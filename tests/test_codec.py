"""The JSON codec: orjson, with the standard library for what orjson refuses."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler import codec

# JSON values orjson writes: integers within 64 bits, finite floats, any text.
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


@given(values)
def test_what_is_written_reads_back_the_same(value: Any) -> None:
    text = codec.dumps(value)
    assert codec.loads(text) == value
    assert codec.loads(text.encode()) == value
    assert json.loads(text) == value  # and it is JSON any reader takes


def test_text_is_compact_and_keeps_non_ascii() -> None:
    assert codec.dumps({"a": [1, "é"], "b": None}) == '{"a":[1,"é"],"b":null}'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"progress": NaN}', "nan"),  # the standard library's reading, as before orjson
        ('{"x": "\\ud800"}', "\ud800"),
        ('{"x": Infinity}', math.inf),
    ],
)
def test_what_orjson_refuses_is_read_as_json_reads_it(text: str, expected: Any) -> None:
    value = next(iter(codec.loads(text).values()))
    if expected == "nan":
        assert math.isnan(value)
    else:
        assert value == expected


def test_errors_are_those_of_json() -> None:
    with pytest.raises(ValueError):
        codec.loads(b"hello")
    with pytest.raises(ValueError):
        codec.loads(b'{"a": "\xff"}')
    with pytest.raises(RecursionError):
        codec.loads(b"[" * 100_000 + b"]" * 100_000)


def test_integers_beyond_64_bits_read_as_floats() -> None:
    assert codec.loads(b"[18446744073709551615]") == [18446744073709551615]
    assert codec.loads(b"[18446744073709551616]") == [1.8446744073709552e19]
