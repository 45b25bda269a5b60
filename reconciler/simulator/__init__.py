"""A simulator of the five video providers (SPEC §6): a real HTTP server on loopback.

It accepts task creation, moves tasks through their lifecycle on a clock, answers each
provider's query, list and batch endpoints in that provider's exact shapes, sends callbacks,
and injects faults. Tests, benchmarks and `serve --demo` use it.

It imports only the stdlib, starlette, uvicorn, httpx, pyjwt and `reconciler.clock`: a fake
that shared parsing code with the adapters would prove nothing.

    world.py   tasks, lifecycle, planned callbacks, request log (no I/O)
    shapes.py  each provider's exact JSON (pure)
    auth.py    test credentials; Kling JWT and Bearer checks
    faults.py  Faults: what goes wrong and how often
    app.py     the Starlette routes: provider endpoints and /_sim control
    server.py  Simulator: serving, callback delivery
"""

from reconciler.simulator.faults import Faults
from reconciler.simulator.server import Simulator
from reconciler.simulator.world import CallbackRecord, RecordedRequest, SimTask

__all__ = ["CallbackRecord", "Faults", "RecordedRequest", "SimTask", "Simulator"]
