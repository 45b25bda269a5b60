"""JSON text in and out: orjson, with the standard library for what orjson refuses.

orjson reads a webhook body in about a third of the time `json` takes and writes a task or
event in about a tenth, and the webhook path does both several times per delivery
(docs/benchmarks.md). Where the two read the same text differently:

- an integer beyond 64 bits is read as a float (no provider sends one: ids that long come as
  strings), so everything stored, metadata included, stays within what orjson writes;
- `NaN`, `Infinity`, a lone surrogate escape or nesting past 1,024 levels is refused by
  orjson; `loads` then asks `json`, which accepts the first three as before and answers the
  last with `RecursionError`, as callers expect.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(data: bytes | str) -> Any:
    """Parse JSON text; raises `ValueError` (or `RecursionError`) as `json.loads` does."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def dumps(data: object) -> str:
    """Compact JSON text with non-ASCII kept as is: the stored and served form."""
    return orjson.dumps(data).decode()
