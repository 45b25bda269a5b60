"""The JSON codec: orjson, with the standard library for what orjson refuses, read as orjson
would have read it; and `flaw`, which tells what cannot be stored."""

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
        # Not JSON, but what Python's json writes: read as the numbers they name.
        ('{"progress": NaN}', "nan"),
        ('{"x": Infinity}', math.inf),
        ('{"x": -Infinity}', -math.inf),
        ('{"x": 1e400}', math.inf),
        # A string cut inside a UTF-16 pair: the replacement character, keys included.
        ('{"x": "a\\ud800b"}', "a\ufffdb"),
        ('{"x": ["\\udfff", {"\\udc00": 1}]}', ["\ufffd", {"\ufffd": 1}]),
        ('{"x": "\\ud83c\\udfac", "y": NaN}', "\U0001f3ac"),  # a whole pair stays
        # Integers as orjson reads them, also when the body had to be read by json.
        ('{"x": 18446744073709551616, "y": NaN}', 1.8446744073709552e19),
        ('{"x": -9223372036854775809, "y": NaN}', -9.223372036854775809e18),
        ('{"x": 18446744073709551615, "y": NaN}', 18446744073709551615),
        ('{"x": -1' + "0" * 400 + ', "y": NaN}', -math.inf),
    ],
)
def test_what_orjson_refuses_is_read_as_orjson_would_have(text: str, expected: Any) -> None:
    value = next(iter(codec.loads(text).values()))
    if expected == "nan":
        assert math.isnan(value)
    else:
        assert value == expected
        assert type(value) is type(expected)


@given(st.text(st.characters(categories=["Cs", "Lo", "Cc"]), max_size=10))
def test_every_string_read_can_be_written(text: str) -> None:
    """Whatever a sender's escapes say, what is read is written back without an error."""
    escaped = json.dumps({text: [text]})  # ASCII escapes: a lone surrogate as \udXXX
    value = codec.loads(escaped)
    assert codec.loads(codec.dumps(value)) == value


def test_errors_are_those_of_json() -> None:
    with pytest.raises(ValueError):
        codec.loads(b"hello")
    with pytest.raises(ValueError):
        codec.loads(b'{"a": "\xff"}')
    with pytest.raises(ValueError):
        codec.loads(b'{"a": 1' + b"0" * 5000 + b', "b": NaN}')  # past int()'s digit limit
    with pytest.raises(RecursionError):
        codec.loads(b"[" * 100_000 + b"]" * 100_000)


def test_integers_beyond_64_bits_read_as_floats() -> None:
    assert codec.loads(b"[18446744073709551615]") == [18446744073709551615]
    assert codec.loads(b"[18446744073709551616]") == [1.8446744073709552e19]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({"x": 1, "y": [None, {"z": "é"}]}, None),
        ({"x": math.nan}, "metadata.x is NaN, which is not a JSON number"),
        ({"x": [1, {"y": math.inf}]}, "metadata.x[1].y is Infinity, which is not a JSON number"),
        ({"a": -math.inf, "b": math.nan}, "metadata.a is -Infinity, which is not a JSON number"),
        (json.loads("[" * 128 + "]" * 128), None),
        (json.loads("[" * 129 + "]" * 129), "metadata nests deeper than 128 levels"),
        ({"a": json.loads("[" * 128 + "]" * 128)}, "metadata nests deeper than 128 levels"),
    ],
)
def test_flaw_names_what_cannot_be_stored(value: Any, problem: str | None) -> None:
    assert codec.flaw(value, "metadata") == problem


@given(values)
def test_what_has_no_flaw_is_written(value: Any) -> None:
    assert codec.flaw(value, "value") is None
    assert codec.loads(codec.dumps(value)) == value


def test_flaw_reads_orjson_depth_without_recursion() -> None:
    deepest = codec.loads(b"[" * 1024 + b"]" * 1024)
    assert codec.flaw(deepest, "metadata") == "metadata nests deeper than 128 levels"
    assert codec.flaw(deepest, "metadata", max_depth=2000) is None
