"""Every adapter against the simulator over real HTTP: queries through the lifecycle, batches
where the provider has them, and each failure kind the loop acts on.

The simulator shares no code with the adapters (an import contract enforces it), so these
tests check the adapters against an independent rendering of each provider's shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import httpx
import pytest

from reconciler import errors
from reconciler.clock import FakeClock
from reconciler.config import Settings
from reconciler.model import Source, Status, Task
from reconciler.providers import PROVIDERS, PollResult, Provider
from reconciler.simulator import Faults, Simulator

CASES = [
    ("kling", "text2video", None),
    ("kling", "image2video", None),
    ("cometapi", "text2video", None),
    ("cometapi", "avatar/image2video", None),
    ("gateway", "text2video", "taskdto"),
    ("gateway", "text2video", "taskdto-legacy"),
    ("gateway", "text2video", "simplified"),
    ("gateway", "text2video", "kling-native"),
    ("gateway", "text2video", "openai"),
    ("acedata", "text2video", None),
    ("kie", "jobs", None),
    ("kie", "veo", None),
]


def adapter(sim: Simulator, clock: FakeClock, name: str, **env: str) -> Provider:
    settings = Settings.from_environ({**sim.environ(), **env})
    return PROVIDERS[name](settings.providers[name], clock)


def task_for(provider: str, task_id: str, action: str, clock: FakeClock) -> Task:
    now = clock.now()
    return Task(
        provider,
        task_id,
        action,
        Status.SUBMITTED,
        now,
        now,
        now + timedelta(days=1),
        Source.REGISTER,
        registered=True,
    )


async def drive(
    provider: Provider, tasks: Sequence[Task], client_timeout: float = 10.0
) -> list[PollResult]:
    """Send the adapter's requests the way the loop does, with its own auth."""
    async with httpx.AsyncClient(timeout=client_timeout) as client:
        flow = provider.poll(tasks)
        try:
            request = next(flow)
            while True:
                response = await client.send(request, auth=provider.auth())
                request = flow.send(response)
        except StopIteration as done:
            results: list[PollResult] = done.value
            return results


@pytest.mark.parametrize(("name", "action", "rendering"), CASES)
@pytest.mark.parametrize("outcome", ["completed", "failed"])
async def test_query_through_the_lifecycle(
    sim: Simulator,
    clock: FakeClock,
    name: str,
    action: str,
    rendering: str | None,
    outcome: str,
) -> None:
    created = sim.create_task(
        name,
        action,
        outcome=outcome,
        processing_after=10,  # type: ignore[arg-type]
        finish_after=60,
        rendering=rendering,
    )
    provider = adapter(sim, clock, name)
    task = task_for(name, created.task_id, action, clock)
    seen = []
    for seconds in (1, 20, 70):
        clock.set(created.created_at + timedelta(seconds=seconds))
        [result] = await drive(provider, [task])
        assert result.error is None, result.error
        assert result.observation is not None
        seen.append(result.observation.effective_status)
    truth = sim.truth(name, created.task_id)
    assert truth == outcome
    final = Status(truth)
    # Kie's Veo API has no queued state, and a few renderings start at processing.
    assert seen[0] in (Status.SUBMITTED, Status.PROCESSING)
    assert seen[1] is Status.PROCESSING
    assert seen[2] is final
    last = (await drive(provider, [task]))[0].observation
    assert last is not None
    if final is Status.COMPLETED:
        assert [video.url for video in last.videos] == [created.video_url]
    else:
        assert last.error, "a failure keeps its reason"
        assert last.error != "SUCCEED"


@pytest.mark.parametrize("name", ["kling", "acedata"])
async def test_batch_answers_many_tasks_in_fewer_requests(
    sim: Simulator, clock: FakeClock, name: str
) -> None:
    created = [
        sim.create_task(name, "text2video", outcome="completed", finish_after=30) for _ in range(12)
    ]
    clock.advance(40)
    provider = adapter(sim, clock, name)
    assert provider.batch_size > 1
    tasks = [task_for(name, c.task_id, "text2video", clock) for c in created]
    before = len(sim.requests)
    results = await drive(provider, tasks)
    assert len(sim.requests) - before < len(tasks)
    by_id = {r.task_id: r for r in results}
    for c in created:
        observation = by_id[c.task_id].observation
        assert observation is not None and observation.effective_status is Status.COMPLETED
        assert observation.videos[0].url == c.video_url


@pytest.mark.parametrize("name", ["kling", "cometapi", "gateway", "acedata", "kie"])
async def test_unknown_task_is_not_found(sim: Simulator, clock: FakeClock, name: str) -> None:
    provider = adapter(sim, clock, name)
    action = "jobs" if name == "kie" else "text2video"
    try:
        [result] = await drive(provider, [task_for(name, "no-such-task", action, clock)])
    except errors.NotFound:
        return  # single-task adapters may say so for the whole exchange
    assert isinstance(result.error, errors.NotFound)


@pytest.mark.parametrize("name", ["kling", "cometapi", "gateway", "acedata", "kie"])
async def test_task_unknown_for_its_first_seconds(
    sim: Simulator, clock: FakeClock, name: str
) -> None:
    sim.faults = Faults(unknown_for=30)
    action = "jobs" if name == "kie" else "text2video"
    created = sim.create_task(name, action, finish_after=60)
    provider = adapter(sim, clock, name)
    task = task_for(name, created.task_id, action, clock)
    try:
        [early] = await drive(provider, [task])
        assert isinstance(early.error, errors.NotFound)
    except errors.NotFound:
        pass
    clock.advance(31)
    [later] = await drive(provider, [task])
    assert later.observation is not None


FAILURES: list[tuple[str, Faults, type[errors.ProviderError]]] = [
    ("rate limited", Faults(rate_limit=1.0, retry_after=7), errors.RateLimited),
    ("server error", Faults(server_error=1.0), errors.ServerError),
    ("malformed answer", Faults(malformed=1.0), errors.ServerError),
]


@pytest.mark.parametrize("name", ["kling", "cometapi", "gateway", "acedata", "kie"])
@pytest.mark.parametrize(
    ("kind", "faults", "expected"), FAILURES, ids=[case[0] for case in FAILURES]
)
async def test_failure_kinds(
    sim: Simulator,
    clock: FakeClock,
    name: str,
    kind: str,
    faults: Faults,
    expected: type[errors.ProviderError],
) -> None:
    action = "jobs" if name == "kie" else "text2video"
    created = sim.create_task(name, action)
    sim.faults = faults
    provider = adapter(sim, clock, name)
    with pytest.raises(expected) as raised:
        await drive(provider, [task_for(name, created.task_id, action, clock)])
    if isinstance(raised.value, errors.RateLimited):
        assert raised.value.retry_after == 7


@pytest.mark.parametrize("name", ["kling", "cometapi", "gateway", "acedata", "kie"])
async def test_rejected_credentials(sim: Simulator, clock: FakeClock, name: str) -> None:
    action = "jobs" if name == "kie" else "text2video"
    created = sim.create_task(name, action)
    wrong = (
        {"KLING_SECRET_KEY": "not-the-secret-key-at-all-32-bytes!"}
        if name == "kling"
        else {
            {
                "cometapi": "COMETAPI_KEY",
                "gateway": "GATEWAY_API_KEY",
                "acedata": "ACEDATA_API_TOKEN",
                "kie": "KIE_API_KEY",
            }[name]: "wrong-key"
        }
    )
    provider = adapter(sim, clock, name, **wrong)
    with pytest.raises(errors.AuthRejected):
        await drive(provider, [task_for(name, created.task_id, action, clock)])


async def test_hanging_answer_times_out(sim: Simulator, clock: FakeClock) -> None:
    created = sim.create_task("acedata", "text2video")
    sim.faults = Faults(hang=1.0)
    provider = adapter(sim, clock, "acedata")
    with pytest.raises(httpx.ReadTimeout):
        await drive(
            provider,
            [task_for("acedata", created.task_id, "text2video", clock)],
            client_timeout=0.2,
        )
