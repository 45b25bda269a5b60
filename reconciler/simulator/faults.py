"""What goes wrong at the simulated providers, and how often.

`Faults` is a plain value: rates in 0..1 drawn with the simulator's seeded `random.Random`,
plus a few durations. It owns no state and no randomness; `World` (callback faults, drawn
when a task is created) and the app (request faults, drawn per request) do the drawing.

Request faults apply to the providers' query, list and batch endpoints (what Reconciler
polls), never to task creation, so a demo application that creates tasks is not broken by
them. Callback faults are drawn once per callback when its task is created, so changing
`sim.faults` later affects only new tasks' callbacks but every later request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_RATES = (
    "drop",
    "duplicate",
    "delay_rate",
    "reorder",
    "rate_limit",
    "server_error",
    "hang",
    "malformed",
)


@dataclass(frozen=True, slots=True)
class Faults:
    """Fault rates (0..1) and durations (seconds).

    Callbacks: `drop` (never sent), `duplicate` (sent twice), `delay` seconds added to the due
    time of a `delay_rate` share of callbacks, `reorder` (a task's intermediate callback is
    delivered after its terminal one).
    Requests: `rate_limit` (429 with `Retry-After: retry_after`), `server_error` (5xx),
    `hang` (no answer until the client gives up or the simulator stops), `malformed` (a body
    that is not JSON), `unknown_for` (seconds after creation during which the task is unknown).
    `providers` overrides everything for the named providers.
    """

    drop: float = 0.0
    duplicate: float = 0.0
    delay: float = 0.0
    delay_rate: float = 1.0
    reorder: float = 0.0
    rate_limit: float = 0.0
    retry_after: float = 1.0
    server_error: float = 0.0
    hang: float = 0.0
    malformed: float = 0.0
    unknown_for: float = 0.0
    providers: Mapping[str, Faults] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in _RATES:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Faults.{name} has value {value!r}: not a rate in 0..1.")
        for name in ("delay", "retry_after", "unknown_for"):
            if getattr(self, name) < 0:
                raise ValueError(f"Faults.{name} has value {getattr(self, name)!r}: negative.")

    def for_provider(self, provider: str) -> Faults:
        return self.providers.get(provider, self)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["providers"] = {name: f.to_dict() for name, f in self.providers.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Faults:
        """Build from JSON (the `PUT /_sim/faults` body); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault names: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name == "providers":
                if not isinstance(value, Mapping) or not all(
                    isinstance(v, Mapping) for v in value.values()
                ):
                    raise ValueError("Faults.providers must map provider names to objects")
                values[name] = {str(k): cls.from_dict(v) for k, v in value.items()}
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"Faults.{name} has value {value!r}: not a number.")
            else:
                values[name] = float(value)
        return cls(**values)
