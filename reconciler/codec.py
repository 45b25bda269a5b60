"""JSON text in and out: orjson, with the standard library for what orjson refuses.

orjson reads a webhook body in about a third of the time `json` takes and writes a task or
event in about a tenth, and the webhook path does both several times per delivery
(docs/benchmarks.md).

Senders also write what is not JSON, and what orjson refuses: `NaN`, `Infinity` and
`-Infinity` (Python's `json` writes them), numbers beyond the double range (`1e400`), and
lone surrogate escapes (`"\\ud83c"`, a JavaScript string cut inside a UTF-16 pair). A body
is not refused for them, since they may sit in a field nobody reads: `loads` then asks
`json`, and returns what orjson would have returned had it accepted them:

- an integer beyond 64 bits is a float, as orjson reads it; beyond any float, an infinity;
- a lone surrogate is U+FFFD, the replacement character (what a browser's `TextEncoder`
  makes of one), so that every string can be written back as UTF-8;
- `NaN` and the infinities are the non-finite floats they name.

JSON has no non-finite numbers: `dumps` writes them as `null`, and a JSON answer refuses them.
So what is read can be written back unchanged except non-finite numbers and nesting deeper
than `dumps` writes (254 levels). Whoever stores a decoded value checks it with `flaw` first
(a registration's metadata); the provider adapters read numbers through
`providers.base.number`, which takes finite ones only. Nesting past 1,024 levels is refused
by both readers; `json` answers it with `RecursionError`, as callers expect.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

# Deepest nesting a stored value may have: `dumps` writes 254 levels, and a value sits a
# level or two down in the task and event that carry it.
MAX_DEPTH = 128
_INT64_MIN = -(2**63)
_UINT64_END = 2**64
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def loads(data: bytes | str) -> Any:
    """Parse JSON text; raises `ValueError` (or `RecursionError`) as `json.loads` does."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return _mended(json.loads(data, parse_int=_integer))


def dumps(data: object) -> str:
    """Compact JSON text with non-ASCII kept as is: the stored and served form."""
    return orjson.dumps(data).decode()


def _integer(text: str) -> int | float:
    value = int(text)
    if _INT64_MIN <= value < _UINT64_END:
        return value
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _mended(value: Any) -> Any:
    """`value` with each lone surrogate in its strings and keys replaced by U+FFFD. (`json`
    pairs a valid surrogate pair into one character, so every surrogate left is lone.)"""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_mended(item) for item in value]
    if isinstance(value, dict):
        return {_mended(key): _mended(item) for key, item in value.items()}
    return value


def flaw(value: object, name: str, max_depth: int = MAX_DEPTH) -> str | None:
    """Why `value`, as `loads` returned it, cannot be stored and served back as it is, as a
    sentence about `name` naming where (`metadata.a[2]`); None when it can."""
    stack: list[tuple[object, str, int]] = [(value, name, 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            number = "NaN" if math.isnan(item) else "Infinity" if item > 0 else "-Infinity"
            return f"{where} is {number}, which is not a JSON number"
        children: list[tuple[object, str]]
        if isinstance(item, dict):
            children = [(child, f"{where}.{key}") for key, child in item.items()]
        elif isinstance(item, list):
            children = [(child, f"{where}[{index}]") for index, child in enumerate(item)]
        else:
            continue
        if depth == max_depth:
            return f"{name} nests deeper than {max_depth} levels"
        # Reversed: the first problem in reading order is the one reported.
        stack.extend((child, path, depth + 1) for child, path in reversed(children))
    return None
