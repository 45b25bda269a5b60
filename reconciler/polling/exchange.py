"""One batch exchange: drive the adapter's sans-I/O flow through a lane, each request sent
within the provider's limits (the first on the permit's token, each further one on a token
of its own) and under a timeout, and say how it ended (`Ending`).

How an error ends the exchange is the error class's own classification (`errors.Verdict`):
this module reports it to the lane's limits and hands the error on; it does not decide what
happens to the tasks (the loop does, through the service).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import aiohttp
import httpx

from reconciler.errors import ProviderError, ServerError, Timeout, Verdict
from reconciler.limits import Permit
from reconciler.metrics import Metrics
from reconciler.model import Task, iso
from reconciler.polling.lane import Lane
from reconciler.providers import PollFlow, PollResult, Provider

logger = logging.getLogger(__name__)

Step = httpx.Request | list[PollResult]


@dataclass(frozen=True, slots=True)
class Ending:
    """How one batch exchange ended, for its tasks:

    - `results`: the provider answered (one result per task it spoke of);
    - `error` alone: the exchange failed; the tasks back off;
    - `resume_at`: the provider is held (it said so, as `error`, or became held before the
      exchange was done): the tasks go back with it, due then;
    - nothing: abandoned while stopping; the tasks stay leased.
    """

    results: list[PollResult] | None = None
    error: ProviderError | None = None
    resume_at: datetime | None = None


class _Held(Exception):
    """The provider became held in the middle of an exchange: stop, hand back."""


class _Abandoned(Exception):
    """Stopping while an exchange waited for its turn."""


async def exchange(
    lane: Lane,
    permit: Permit,
    tasks: Sequence[Task],
    *,
    stop: asyncio.Event,
    metrics: Metrics,
    sent: Counter[str],
) -> Ending:
    """Run the flow for `tasks` (already `start`ed with `permit`). `limits.finish` is always
    called, also when cancelled, so that no probe or concurrency slot leaks. `sent` counts
    the requests sent, per provider."""
    name = lane.name
    verdict = Verdict.ABANDONED
    error: ProviderError | None = None
    ending = Ending()
    try:
        try:
            results = await _drive(lane, tasks, stop, metrics, sent)
        except ProviderError as failed:
            if failed.verdict is not Verdict.ANSWERED:
                raise
            # Single-task adapters say "unknown task" for the whole exchange.
            results = [PollResult(task.task_id, error=failed) for task in tasks]
        verdict, ending = Verdict.ANSWERED, Ending(results=results)
    except ProviderError as failed:
        verdict, error = failed.verdict, failed
        if verdict is Verdict.FAILED:
            logger.warning("%s: a poll of %d task(s) failed: %s", name, len(tasks), failed)
        ending = Ending(error=failed)
    except _Held:
        ending = Ending(resume_at=lane.limits.resume_at(lane.clock.now()))
    except _Abandoned:
        pass
    finally:
        now = lane.clock.now()
        held_until = lane.limits.finish(
            now,
            permit,
            verdict,
            retry_after=error.delay if verdict is Verdict.RATE_LIMITED and error else None,
            reason=str(error) if verdict is Verdict.REJECTED else None,
        )
        lane.ended(permit)
    if held_until is not None:
        # The tasks of the exchange that met the hold come back with the provider.
        if verdict is Verdict.RATE_LIMITED:
            logger.warning("%s: rate limited, holding requests until %s", name, iso(held_until))
        else:
            logger.error(
                "%s: credentials rejected, next probe at %s: %s", name, iso(held_until), error
            )
        ending = Ending(error=error, resume_at=lane.limits.resume_at(now))
    return ending


async def _drive(
    lane: Lane, tasks: Sequence[Task], stop: asyncio.Event, metrics: Metrics, sent: Counter[str]
) -> list[PollResult]:
    """Each request the flow yields is sent within the limits (the first on the token
    `start` took), each response sent back in."""
    flow = _start(lane.provider, tasks)
    try:
        step = _advance(lane.name, flow, None)
        first = True
        while isinstance(step, httpx.Request):
            if not first:
                await _take_turn(lane, stop)
            first = False
            response = await _send(lane, step, metrics, sent)
            step = _advance(lane.name, flow, response)
        return step
    finally:
        flow.close()


async def _take_turn(lane: Lane, stop: asyncio.Event) -> None:
    while True:
        if stop.is_set():
            raise _Abandoned()
        now = lane.clock.now()
        if lane.limits.stopped_until(now) is not None:
            raise _Held()
        wait_until = lane.limits.take_turn(now)
        if wait_until is None:
            return
        await lane.clock.sleep_until(wait_until, stop)


async def _send(
    lane: Lane, request: httpx.Request, metrics: Metrics, sent: Counter[str]
) -> httpx.Response:
    name = lane.name
    seconds = lane.provider.settings.request_timeout
    started = time.perf_counter()
    status = "error"
    try:
        async with asyncio.timeout(seconds):
            response = await lane.send(request)
        status = str(response.status_code)
        return response
    except TimeoutError:
        status = "timeout"
        raise Timeout(f"{name}: no answer within {seconds:g} s") from None
    except (aiohttp.ClientError, httpx.HTTPError, OSError) as error:
        # Connection refused, reset, protocol errors, a body that does not decode: the
        # provider is not answering.
        raise ServerError(f"{name}: {type(error).__name__}: {error}") from None
    finally:
        # The path only: never headers (Authorization) in logs.
        logger.debug("%s %s %s -> %s", name, request.method, request.url.path, status)
        sent[name] += 1
        metrics.provider_requests.labels(name, status).inc()
        metrics.provider_latency.labels(name).observe(time.perf_counter() - started)


def _start(provider: Provider, tasks: Sequence[Task]) -> PollFlow:
    try:
        return provider.poll(tasks)
    except ProviderError:
        raise
    except Exception as error:  # see `_advance`
        logger.exception("%s: the adapter failed to start a poll", provider.name)
        raise ServerError(
            f"{provider.name}: the adapter failed ({type(error).__name__})"
        ) from error


def _advance(name: str, flow: PollFlow, response: httpx.Response | None) -> Step:
    """The flow's next request, or its results when it is done."""
    try:
        return next(flow) if response is None else flow.send(response)
    except StopIteration as done:
        results: list[PollResult] = done.value
        return results
    except ProviderError:
        raise
    except Exception as error:
        # An adapter bug or an answer it did not foresee: counted like an unreadable answer
        # (backoff, breaker) instead of ending the loop.
        logger.exception("%s: the adapter failed on an answer", name)
        raise ServerError(f"{name}: the adapter failed ({type(error).__name__})") from error


__all__ = ["Ending", "exchange"]
