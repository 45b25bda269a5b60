"""`python -m reconciler.simulator`: the simulator as its own process, for benchmarks and demos.

It serves on loopback with the system clock and background callback delivery, prints one
JSON line `{"url": ..., "environ": {...}}` on stdout once it accepts connections, and runs
until SIGINT or SIGTERM. Drive it through `/_sim/tasks`, `/_sim/faults` and `/_sim/stats`.
Running it apart keeps its memory out of the measured process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence

from reconciler.simulator.faults import Faults
from reconciler.simulator.server import Simulator


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m reconciler.simulator", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processing-after", type=float, default=5.0, metavar="SECONDS")
    parser.add_argument("--finish-after", type=float, default=60.0, metavar="SECONDS")
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--faults", default="{}", help="Faults as JSON, e.g. '{\"drop\": 0.1}'")
    parser.add_argument(
        "--no-callback-bodies", action="store_true", help="do not keep sent bodies (memory)"
    )
    parser.add_argument(
        "--callback-concurrency",
        type=int,
        default=16,
        metavar="N",
        help="callbacks in flight at once (default 16)",
    )
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    sim = Simulator(
        seed=args.seed,
        faults=Faults.from_dict(json.loads(args.faults)),
        processing_after=args.processing_after,
        finish_after=args.finish_after,
        fail_rate=args.fail_rate,
        record_callback_bodies=not args.no_callback_bodies,
        delivery_concurrency=args.callback_concurrency,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with sim.serve(port=args.port):
        sim.start_background_delivery()
        print(json.dumps({"url": sim.url, "environ": sim.environ()}), flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    try:
        faults = json.loads(args.faults)
        if not isinstance(faults, dict):
            raise ValueError("not a JSON object")
        Faults.from_dict(faults)
    except ValueError as exc:
        print(f"--faults has value {args.faults!r}: {exc}", file=sys.stderr)
        return 2
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
