"""Hypothesis strategies for hostile request bodies, and the JSON text that carries them.

Bodies are built as Python values and written by `encode`, which writes what a careless or
malicious sender writes and `json.dumps` would not: NaN and infinities, integers and
exponents beyond any float, lone UTF-16 surrogate escapes, and nesting deeper than a parser
may allow. Callback bodies start from the real payload shapes the provider tests use
(tests/providers/payloads/, from PROVIDERS.md) with some of their values replaced.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from reconciler.config import PROVIDER_NAMES

PAYLOADS = Path(__file__).parent.parent / "providers" / "payloads"


@dataclass(frozen=True)
class Raw:
    """JSON text written as is: a number no float holds, or nesting no encoder writes."""

    text: str


def deep(depth: int, opener: str = "[") -> Raw:
    closer = "]" if opener == "[" else "}"
    if opener == "{":
        return Raw('{"a":' * depth + "0" + closer * depth)
    return Raw(opener * depth + closer * depth)


def encode(value: Any) -> bytes:
    """The JSON text of `value`, with `Raw` pieces spliced in, NaN and infinities as Python's
    `json` writes them, and strings ASCII-escaped (so a lone surrogate is `\\udXXX`)."""
    return _text(value).encode()


def _text(value: Any) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_text(item) for item in value) + "]"
    return json.dumps(value)  # floats: NaN, Infinity, -Infinity; any int; escaped strings


NUMBERS = [
    math.nan,
    math.inf,
    -math.inf,
    1e308,
    -1e308,
    5e-324,
    -0.0,
    0,
    -1,
    2**63 - 1,
    2**64,
    -(2**63) - 1,
    10**30,
    10**400,
    1e11,
    253402300799999,  # 9999-12-31T23:59:59.999Z in epoch milliseconds
    253402300800000,  # a millisecond later: past what a datetime holds
    Raw("1e400"),
    Raw("-1e400"),
    Raw("1e-400"),
    Raw("1" + "0" * 5000),  # past Python's default digit limit for int()
]

STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",
    "\udfff",
    "x\udc00y",
    "\u2028",
    "\ufeff",
    "🎬",
    "é",
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "1e308%",
    "-5%",
    "100%",
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
    "0000-00-00 00:00:00",
    "../../etc/passwd",
    "%00",
    "a/b?c#d",
    "\\",
    "x" * 300,
    # JSON inside a string, as Kie's resultJson carries it.
    '{"resultUrls": ["\\ud800"]}',
    '{"resultUrls": [NaN], "resultUrl": Infinity}',
    '{"resultUrls": ["https://cdn.example/\\u0000.mp4"]}',
]

DEEP = [deep(64), deep(300), deep(300, "{"), deep(1100), deep(5000)]

numbers = st.sampled_from(NUMBERS) | st.floats() | st.integers(-(10**400), 10**400)
strings = (
    st.sampled_from(STRINGS)
    | st.text(max_size=20)
    # Lone surrogates, control characters, other scripts and odd spaces.
    | st.text(st.characters(categories=["Cs", "Cc", "Lo", "Zs"]), max_size=8)
)
scalars = numbers | strings | st.none() | st.booleans()
hostile = st.recursive(
    scalars | st.sampled_from(DEEP),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(strings, inner, max_size=3),
    max_leaves=8,
)


# --- POST /tasks -------------------------------------------------------------------------


def mostly(usual: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`usual` three times in four, else `odd`: enough ordinary values to reach the store."""
    return st.integers(0, 3).flatmap(lambda n: odd if n == 0 else usual)


registrations = mostly(
    st.fixed_dictionaries(
        {
            "provider": mostly(st.sampled_from(PROVIDER_NAMES), scalars),
            "task_id": mostly(st.text(min_size=1, max_size=12), scalars),
        },
        optional={
            "action": mostly(st.sampled_from(["text2video", "jobs", "veo"]), scalars),
            "metadata": mostly(st.dictionaries(strings, hostile, max_size=4), hostile),
            "deadline_seconds": mostly(st.floats(min_value=0.001, max_value=1e9), numbers),
        },
    ),
    hostile,
)


# --- POST /callbacks/{provider} ----------------------------------------------------------


def _bodies(provider: str) -> list[Any]:
    """The bodies of the provider's payload files that its adapter reads as a callback (the
    files that expect an observation, not an error), and its query answers that do (relays
    forward those as callbacks)."""
    bodies = []
    for path in sorted((PAYLOADS / provider).glob("*.json")):
        case = json.loads(path.read_text(encoding="utf-8"))
        if case.get("via") in ("callback", "poll") and "error" not in case:
            bodies.append(case["body"])
        elif "callback" in case and "raises" not in case:
            bodies.append(case["callback"])
    return bodies


SAMPLES = {provider: _bodies(provider) for provider in PROVIDER_NAMES}


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path to every value inside `value` (not `value` itself)."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, child in items:
        yield (*prefix, key)
        if isinstance(child, dict | list):
            yield from _paths(child, (*prefix, key))


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> None:
    _get(value, path[:-1])[path[-1]] = new


def _like(original: Any) -> st.SearchStrategy[Any]:
    """A hostile value for a field that held `original`: mostly one of the same kind (a
    string for a string, a number for a number), which the adapter then reads, else any."""
    if isinstance(original, str):
        return mostly(strings, hostile)
    if isinstance(original, int | float) and not isinstance(original, bool):
        return mostly(numbers, hostile)
    return hostile


@st.composite
def callbacks(draw: st.DrawFn, provider: str) -> Any:
    """A real payload of `provider` with one to four of its values (at any depth) replaced
    by hostile ones."""
    body = copy.deepcopy(draw(st.sampled_from(SAMPLES[provider])))
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_paths(body))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        _replace(body, path, draw(_like(_get(body, path))))
    return body


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        value = value[step]
    return value
