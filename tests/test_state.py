"""The state rules of SPEC §1: table tests per rule, then Hypothesis properties over
sequences of observations (terminal absorbs, no going back, idempotence, order independence).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.model import EventType, Observation, Source, Status, Task, TaskRef, Video
from reconciler.state import Registration, expire, fail, merge, new_task, register

T0 = datetime(2026, 1, 1, tzinfo=UTC)
REF = TaskRef("kling", "t1")
URL = "https://cdn.example/v.mp4"
VIDEO = Video(URL, None, 5.1, "v1")
DAY = 86400.0

# Everything a reader sees of a task (its JSON) except the counters that every report moves.
VISIBLE = (
    "status",
    "provider_status",
    "progress",
    "videos",
    "error",
    "metadata",
    "action",
    "registered",
    "deadline_at",
    "completed_at",
    "updated_at",
    "source",
    "external_task_id",
)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def task(status: Status = Status.SUBMITTED, **changes: Any) -> Task:
    base = new_task(REF, "text2video", T0, DAY, Source.WEBHOOK).replace(
        status=status, version=1, **changes
    )
    if status.terminal and "completed_at" not in changes:
        base = base.replace(completed_at=T0)
    return base


def obs(status: Status | None, **fields: Any) -> Observation:
    if status is Status.COMPLETED and "videos" not in fields:
        fields["videos"] = (VIDEO,)
    return Observation("t1", status, **fields)


def visible(t: Task) -> dict[str, Any]:
    return {name: getattr(t, name) for name in VISIBLE}


# --- merge: every status pair ----------------------------------------------------------

S, P, C, F, E = (
    Status.SUBMITTED,
    Status.PROCESSING,
    Status.COMPLETED,
    Status.FAILED,
    Status.EXPIRED,
)
NO_URL = "completed-without-url"

STATUS_TABLE = [
    # task status, observation status, final status, event, conflicts
    (S, None, S, EventType.SUBMITTED, 0),
    (S, S, S, EventType.SUBMITTED, 0),
    (S, P, P, EventType.PROCESSING, 0),
    (S, C, C, EventType.COMPLETED, 0),
    (S, NO_URL, P, EventType.PROCESSING, 0),
    (S, F, F, EventType.FAILED, 0),
    (P, None, P, EventType.PROCESSING, 0),
    (P, S, P, None, 0),
    (P, P, P, EventType.PROCESSING, 0),
    (P, C, C, EventType.COMPLETED, 0),
    (P, NO_URL, P, EventType.PROCESSING, 0),
    (P, F, F, EventType.FAILED, 0),
    (C, None, C, None, 0),
    (C, S, C, None, 0),
    (C, P, C, None, 0),
    (C, C, C, None, 0),
    (C, NO_URL, C, None, 0),
    (C, F, C, None, 1),
    (F, None, F, None, 0),
    (F, S, F, None, 0),
    (F, P, F, None, 0),
    (F, C, F, None, 1),
    (F, NO_URL, F, None, 0),
    (F, F, F, None, 0),
    (E, None, E, None, 0),
    (E, S, E, None, 0),
    (E, P, E, None, 0),
    (E, C, E, None, 1),
    (E, NO_URL, E, None, 0),
    (E, F, E, None, 1),
]


@pytest.mark.parametrize(("before", "said", "after", "event", "conflicts"), STATUS_TABLE)
def test_merge_status_pairs(
    before: Status,
    said: Status | str | None,
    after: Status,
    event: EventType | None,
    conflicts: int,
) -> None:
    current = task(before, provider_status="old")
    if said == NO_URL:
        observation = obs(Status.COMPLETED, provider_status="new", videos=())
    else:
        assert said is None or isinstance(said, Status)
        observation = obs(said, provider_status="new")
    change = merge(current, observation, at(10), Source.POLL)
    assert change.task.status is after
    assert change.event == event
    assert change.previous_status is before
    assert change.task.conflicts == conflicts
    assert change.task.polls == 1
    assert change.task.version == current.version + 1
    if event is None:
        assert visible(change.task) == visible(current)
    else:
        assert change.task.provider_status == "new"
        assert change.task.updated_at == at(10)
        assert change.task.source is Source.POLL
    assert (change.task.completed_at is not None) == after.terminal


def test_terminal_completion_sets_completed_at_videos_and_progress() -> None:
    change = merge(task(P, progress=40), obs(C, provider_status="succeed"), at(7), Source.WEBHOOK)
    assert change.task.completed_at == at(7)
    assert change.task.videos == (VIDEO,)
    assert change.task.progress == 100
    assert change.task.error is None


def test_failure_keeps_its_error_and_ignores_videos() -> None:
    failed = obs(F, error="content policy", videos=(VIDEO,), provider_status="failed")
    change = merge(task(P), failed, at(3), Source.POLL)
    assert change.task.status is F
    assert change.task.error == "content policy"
    assert change.task.videos == ()


def test_completion_does_not_take_an_error_message() -> None:
    change = merge(task(P), obs(C, error="fail_reason: none"), at(3), Source.POLL)
    assert change.task.error is None


# --- progress --------------------------------------------------------------------------


def test_first_progress_writes_an_event() -> None:
    change = merge(task(P, provider_status="run"), obs(P, progress=10), at(1), Source.POLL)
    assert change.event is EventType.PROCESSING
    assert change.task.progress == 10
    assert change.task.progress_event_at == at(1)


@pytest.mark.parametrize(
    ("interval", "elapsed", "event"),
    [
        (5.0, 0.0, None),
        (5.0, 4.999, None),
        (5.0, 5.0, EventType.PROCESSING),
        (5.0, 60.0, EventType.PROCESSING),
        (0.0, 0.0, EventType.PROCESSING),
        (30.0, 29.0, None),
    ],
)
def test_progress_events_are_coalesced(
    interval: float, elapsed: float, event: EventType | None
) -> None:
    current = task(P, progress=10, progress_event_at=at(100), updated_at=at(100))
    change = merge(current, obs(P, progress=20), at(100 + elapsed), Source.POLL, interval)
    assert change.event == event
    assert change.task.progress == 20  # the value is kept even when its event is not
    assert change.task.updated_at == at(100 + elapsed)
    expected_mark = at(100) if event is None else at(100 + elapsed)
    assert change.task.progress_event_at == expected_mark


def test_status_change_is_never_coalesced() -> None:
    current = task(S, progress=10, progress_event_at=at(100))
    change = merge(current, obs(P, progress=20), at(101), Source.POLL)
    assert change.event is EventType.PROCESSING
    change = merge(change.task, obs(C), at(102), Source.POLL)
    assert change.event is EventType.COMPLETED


def test_progress_with_another_visible_change_is_not_coalesced() -> None:
    current = task(P, progress=10, provider_status="queued", progress_event_at=at(100))
    change = merge(current, obs(P, progress=20, provider_status="running"), at(101), Source.POLL)
    assert change.event is EventType.PROCESSING


@pytest.mark.parametrize("said", [None, 0, 10, 49, 50])
def test_progress_never_goes_backwards(said: int | None) -> None:
    current = task(P, progress=50, provider_status="running")
    change = merge(current, obs(P, progress=said, provider_status="running"), at(9), Source.POLL)
    assert change.task.progress == 50
    assert change.event is None
    assert change.task.updated_at == current.updated_at


def test_a_failures_synthetic_100_percent_is_ignored() -> None:
    change = merge(task(P, progress=40), obs(F, progress=100), at(3), Source.POLL)
    assert change.task.status is F
    assert change.task.progress == 40
    change = merge(task(P), obs(F, progress=100), at(3), Source.POLL)
    assert change.task.progress is None


def test_completion_is_100_percent_even_without_a_figure() -> None:
    change = merge(task(S), obs(C, progress=None), at(3), Source.POLL)
    assert change.task.progress == 100


# --- success without a result URL ------------------------------------------------------


@pytest.mark.parametrize("videos", [(), (Video(""),), (Video("", cover_url="c"), Video(""))])
def test_success_without_url_stays_running_and_remembers_since_when(
    videos: tuple[Video, ...],
) -> None:
    first = merge(task(P), obs(C, videos=videos, provider_status="succeed"), at(5), Source.POLL)
    assert first.task.status is P
    assert not first.task.terminal
    assert first.task.completed_at is None
    assert first.task.videos == ()
    assert first.task.result_missing_since == at(5)
    assert first.event is EventType.PROCESSING  # provider_status moved to "succeed"

    again = merge(first.task, obs(C, videos=videos, provider_status="succeed"), at(9), Source.POLL)
    assert again.task.result_missing_since == at(5)
    assert again.event is None

    done = merge(again.task, obs(C, provider_status="succeed"), at(12), Source.POLL)
    assert done.task.status is C
    assert done.task.result_missing_since is None
    assert done.event is EventType.COMPLETED


def test_result_missing_is_cleared_by_a_running_report() -> None:
    first = merge(task(P), obs(C, videos=()), at(5), Source.POLL)
    assert first.task.result_missing_since == at(5)
    cleared = merge(first.task, obs(P), at(6), Source.POLL)
    assert cleared.task.result_missing_since is None


# --- unknown status words --------------------------------------------------------------


@pytest.mark.parametrize("before", [S, P])
def test_unknown_status_word_keeps_the_status_and_shows_the_word(before: Status) -> None:
    current = task(before, provider_status="known")
    change = merge(current, obs(None, provider_status="mystery"), at(2), Source.WEBHOOK)
    assert change.task.status is before
    assert change.task.provider_status == "mystery"
    assert change.event == EventType.for_status(before)
    assert change.task.callbacks == 1


def test_unknown_status_word_never_ends_a_task() -> None:
    current = task(P)
    for n in range(5):
        current = merge(
            current, obs(None, provider_status=f"w{n}", progress=100), at(n), Source.POLL
        ).task
    assert current.status is P
    assert current.completed_at is None


# --- provider updated_at ---------------------------------------------------------------


def test_older_report_at_equal_rank_is_ignored() -> None:
    current = task(P, provider_status="b", progress=50, provider_updated_at=at(50))
    stale = obs(P, provider_status="a", progress=60, provider_updated_at=at(40))
    change = merge(current, stale, at(60), Source.POLL)
    assert change.event is None
    assert visible(change.task) == visible(current)
    assert change.task.provider_updated_at == at(50)
    assert change.task.polls == 1


def test_newer_report_at_equal_rank_is_taken() -> None:
    current = task(P, provider_status="b", provider_updated_at=at(50))
    change = merge(
        current, obs(P, provider_status="c", provider_updated_at=at(55)), at(60), Source.POLL
    )
    assert change.task.provider_status == "c"
    assert change.task.provider_updated_at == at(55)


def test_equal_updated_at_or_none_is_not_stale() -> None:
    current = task(P, provider_status="b", provider_updated_at=at(50))
    same = merge(
        current, obs(P, provider_status="c", provider_updated_at=at(50)), at(1), Source.POLL
    )
    assert same.task.provider_status == "c"
    unstamped = merge(current, obs(P, provider_status="d"), at(1), Source.POLL)
    assert unstamped.task.provider_status == "d"
    assert unstamped.task.provider_updated_at == at(50)


def test_higher_rank_wins_over_an_older_updated_at() -> None:
    current = task(S, provider_updated_at=at(50))
    change = merge(current, obs(P, provider_updated_at=at(40)), at(60), Source.POLL)
    assert change.task.status is P
    assert change.task.provider_updated_at == at(50)  # never moves back
    done = merge(change.task, obs(F, error="x", provider_updated_at=at(10)), at(61), Source.POLL)
    assert done.task.status is F


def test_older_unknown_word_does_not_overwrite_a_newer_report() -> None:
    current = task(P, provider_status="running", provider_updated_at=at(50))
    change = merge(
        current,
        obs(None, provider_status="mystery", provider_updated_at=at(40)),
        at(60),
        Source.POLL,
    )
    assert change.event is None
    assert change.task.provider_status == "running"
    newer = merge(
        current,
        obs(None, provider_status="mystery", provider_updated_at=at(51)),
        at(60),
        Source.POLL,
    )
    assert newer.task.provider_status == "mystery"
    assert newer.task.provider_updated_at == at(51)


# --- conflicts, counters, version, updated_at ------------------------------------------


def test_conflicting_terminal_report_is_counted_and_changes_nothing_else() -> None:
    done = merge(task(P), obs(C, provider_status="succeed"), at(5), Source.WEBHOOK).task
    change = merge(done, obs(F, error="boom", provider_status="failed"), at(9), Source.WEBHOOK)
    assert change.event is None
    assert change.task.conflicts == 1
    assert visible(change.task) == visible(done)
    assert change.task.callbacks == done.callbacks + 1
    again = merge(change.task, obs(F, error="boom"), at(10), Source.POLL)
    assert again.task.conflicts == 2
    same = merge(again.task, obs(C, provider_status="succeed"), at(11), Source.POLL)
    assert same.task.conflicts == 2


@pytest.mark.parametrize(
    ("source", "callbacks", "polls"),
    [
        (Source.WEBHOOK, 1, 0),
        (Source.POLL, 0, 1),
        (Source.REGISTER, 0, 0),
        (Source.RECONCILER, 0, 0),
    ],
)
@pytest.mark.parametrize("before", [S, P, C])
@pytest.mark.parametrize("said", [None, S, P, C])
def test_counters_follow_the_source(
    source: Source, callbacks: int, polls: int, before: Status, said: Status | None
) -> None:
    current = task(before, callbacks=3, polls=7)
    change = merge(current, obs(said), at(1), source)
    assert change.task.callbacks == 3 + callbacks
    assert change.task.polls == 7 + polls
    assert change.task.version == current.version + 1


def test_updated_at_moves_only_on_a_visible_change() -> None:
    current = task(P, provider_status="running", progress=30, updated_at=at(1))
    quiet = merge(current, obs(P, provider_status="running", progress=30), at(5), Source.POLL)
    assert quiet.event is None
    assert quiet.task.updated_at == at(1)
    assert quiet.task.source is Source.WEBHOOK  # what last *changed* it
    loud = merge(current, obs(P, provider_status="running", progress=31), at(6), Source.POLL)
    assert loud.task.updated_at == at(6)
    assert loud.task.source is Source.POLL


def test_quiet_bookkeeping_is_kept() -> None:
    current = task(P, provider_status="running")
    seen = obs(P, provider_status="running", external_task_id="ext-1", provider_updated_at=at(3))
    change = merge(current, seen, at(5), Source.POLL)
    assert change.event is None
    assert change.task.external_task_id == "ext-1"
    assert change.task.provider_updated_at == at(3)
    kept = merge(change.task, obs(P, external_task_id="ext-2"), at(6), Source.POLL)
    assert kept.task.external_task_id == "ext-1"


def test_action_from_a_report_applies_only_to_unregistered_tasks() -> None:
    unregistered = merge(task(P), obs(P, action="image2video"), at(1), Source.WEBHOOK)
    assert unregistered.task.action == "image2video"
    registered = merge(
        task(P, registered=True), obs(P, action="image2video"), at(1), Source.WEBHOOK
    )
    assert registered.task.action == "text2video"


# --- register --------------------------------------------------------------------------


def test_register_a_new_task() -> None:
    change = register(None, Registration(REF, metadata={"user": 1}), T0, "text2video", DAY)
    assert change is not None
    assert change.event is EventType.REGISTERED
    assert change.previous_status is None
    created = change.task
    assert (created.provider, created.task_id, created.action) == ("kling", "t1", "text2video")
    assert created.status is S
    assert created.registered
    assert created.metadata == {"user": 1}
    assert created.source is Source.REGISTER
    assert created.version == 1
    assert created.created_at == created.updated_at == T0
    assert created.deadline_at == T0 + timedelta(seconds=DAY)


def test_register_with_action_deadline_and_external_id() -> None:
    request = Registration(REF, "image2video", {}, 60.0, "ext-9")
    change = register(None, request, T0, "text2video", DAY)
    assert change is not None
    assert change.task.action == "image2video"
    assert change.task.deadline_at == at(60)
    assert change.task.external_task_id == "ext-9"


def test_registration_is_idempotent_and_merges_metadata() -> None:
    first = register(None, Registration(REF, metadata={"a": 1}), T0, "text2video", DAY)
    assert first is not None
    assert register(first.task, Registration(REF, metadata={"a": 1}), at(5), "x", DAY) is None
    assert register(first.task, Registration(REF), at(5), "x", DAY) is None
    merged = register(first.task, Registration(REF, metadata={"b": 2}), at(5), "x", DAY)
    assert merged is not None
    assert merged.event is None
    assert merged.task.metadata == {"a": 1, "b": 2}
    assert merged.task.updated_at == at(5)
    assert merged.task.version == first.task.version + 1
    overwritten = register(merged.task, Registration(REF, metadata={"a": 3}), at(6), "x", DAY)
    assert overwritten is not None
    assert overwritten.task.metadata == {"a": 3, "b": 2}
    # A later registration does not move the action, deadline or status.
    again = register(merged.task, Registration(REF, "effects", {"c": 1}, 5.0), at(7), "x", DAY)
    assert again is not None
    assert again.task.action == "text2video"
    assert again.task.deadline_at == merged.task.deadline_at


def test_registering_a_callback_created_task_logs_registered_once() -> None:
    created = new_task(REF, "text2video", T0, DAY, Source.WEBHOOK)
    running = merge(
        created, obs(P, progress=20, external_task_id="ext"), at(1), Source.WEBHOOK
    ).task
    assert not running.registered
    change = register(
        running, Registration(REF, metadata={"u": 1}, deadline_seconds=120), at(4), "x", DAY
    )
    assert change is not None
    assert change.event is EventType.REGISTERED
    assert change.previous_status is P
    assert change.task.status is P
    assert change.task.progress == 20
    assert change.task.registered
    assert change.task.source is Source.REGISTER
    assert change.task.deadline_at == at(120)  # counted from when the task was first seen
    assert change.task.external_task_id == "ext"
    assert change.task.callbacks == running.callbacks
    assert register(change.task, Registration(REF, metadata={"u": 1}), at(5), "x", DAY) is None
    later = register(change.task, Registration(REF, metadata={"u": 2}), at(5), "x", DAY)
    assert later is not None and later.event is None


def test_registering_a_terminal_task_keeps_it_terminal() -> None:
    done = merge(task(P), obs(C), at(1), Source.WEBHOOK).task
    change = register(done, Registration(REF), at(2), "x", DAY)
    assert change is not None
    assert change.event is EventType.REGISTERED
    assert change.task.status is C
    assert change.task.completed_at == at(1)


# --- expire and fail -------------------------------------------------------------------


@pytest.mark.parametrize("before", [S, P])
def test_expire_a_running_task(before: Status) -> None:
    change = expire(task(before, progress=30), at(DAY))
    assert change is not None
    assert change.event is EventType.EXPIRED
    assert change.previous_status is before
    assert change.task.status is E
    assert change.task.error == "no terminal status by the deadline"
    assert change.task.source is Source.RECONCILER
    assert change.task.completed_at == change.task.updated_at == at(DAY)
    assert change.task.progress == 30


@pytest.mark.parametrize("before", [C, F, E])
def test_expire_and_fail_leave_terminal_tasks_alone(before: Status) -> None:
    assert expire(task(before), at(DAY)) is None
    assert fail(task(before), at(DAY), "x") is None


def test_fail_a_running_task() -> None:
    change = fail(task(P), at(30), "not found at provider")
    assert change is not None
    assert change.event is EventType.FAILED
    assert change.task.status is F
    assert change.task.error == "not found at provider"
    assert change.task.source is Source.RECONCILER
    assert change.task.version == 2


# --- properties ------------------------------------------------------------------------

PROPERTY = settings(max_examples=150, deadline=None)
WORDS = ("queued", "running", "succeed", "failed", "weird", None)

videos_st = st.one_of(
    st.just(()),
    st.tuples(st.builds(Video, st.sampled_from([URL, "https://cdn.example/w.mp4"]))),
    st.tuples(st.just(Video(""))),
)
observation_st = st.builds(
    Observation,
    task_id=st.just("t1"),
    status=st.one_of(st.none(), st.sampled_from(Status)),
    provider_status=st.sampled_from(WORDS),
    progress=st.one_of(st.none(), st.integers(0, 100)),
    videos=videos_st,
    error=st.sampled_from([None, "boom", "quota"]),
    provider_updated_at=st.one_of(st.none(), st.integers(0, 60).map(at)),
)
step_st = st.tuples(observation_st, st.sampled_from(Source), st.floats(0, 10))
start_st = st.sampled_from([Status.SUBMITTED, Status.PROCESSING])


def start(status: Status) -> Task:
    return new_task(REF, "text2video", T0, DAY, Source.REGISTER).replace(status=status, version=1)


def rank(status: Status) -> int:
    return status.rank


@PROPERTY
@given(start_st, st.lists(step_st, max_size=12), st.floats(0, 10))
def test_property_terminal_states_absorb(
    first: Status, steps: list[tuple[Observation, Source, float]], interval: float
) -> None:
    current, now = start(first), T0
    settled: dict[str, Any] | None = None
    for observation, source, gap in steps:
        now += timedelta(seconds=gap)
        change = merge(current, observation, now, source, interval)
        if settled is not None:
            assert change.event is None
            assert visible(change.task) == settled
        current = change.task
        if current.terminal and settled is None:
            settled = visible(current)
            assert current.completed_at is not None


@PROPERTY
@given(start_st, st.lists(step_st, max_size=12))
def test_property_the_lifecycle_never_goes_back(
    first: Status, steps: list[tuple[Observation, Source, float]]
) -> None:
    current, now = start(first), T0
    for observation, source, gap in steps:
        now += timedelta(seconds=gap)
        change = merge(current, observation, now, source)
        assert change.task.status.rank >= current.status.rank
        if current.progress is not None:
            assert change.task.progress is not None
            assert change.task.progress >= current.progress
        assert change.task.version == current.version + 1
        assert change.task.updated_at >= current.updated_at
        current = change.task


@PROPERTY
@given(
    start_st,
    st.lists(step_st, max_size=8),
    observation_st,
    st.sampled_from(Source),
    st.floats(0, 10),
)
def test_property_the_same_observation_twice_changes_nothing(
    first: Status,
    steps: list[tuple[Observation, Source, float]],
    repeated: Observation,
    source: Source,
    gap: float,
) -> None:
    current, now = start(first), T0
    for observation, step_source, step_gap in steps:
        now += timedelta(seconds=step_gap)
        current = merge(current, observation, now, step_source).task
    once = merge(current, repeated, now, source).task
    twice = merge(once, repeated, now + timedelta(seconds=gap), source)
    assert twice.event is None
    assert visible(twice.task) == visible(once)
    assert twice.task.result_missing_since == once.result_missing_since


def apply_all(observations: list[Observation], first: Status = Status.SUBMITTED) -> Task:
    current = start(first)
    for n, observation in enumerate(observations):
        current = merge(current, observation, at(n + 1), Source.WEBHOOK).task
    return current


@PROPERTY
@given(st.lists(observation_st, max_size=10).flatmap(st.permutations))
def test_property_the_first_terminal_report_wins_in_any_order(
    observations: list[Observation],
) -> None:
    final = apply_all(observations)
    effective = [o.effective_status for o in observations if o.effective_status is not None]
    terminal = [status for status in effective if status.terminal]
    if terminal:
        assert final.status is terminal[0]
        conflicting = sum(status is not terminal[0] for status in terminal[1:])
        assert final.conflicts == conflicting
    elif Status.PROCESSING in effective:
        assert final.status is Status.PROCESSING
    else:
        assert final.status is Status.SUBMITTED


@st.composite
def history(draw: st.DrawFn, stamped: bool = True) -> list[Observation]:
    """One task's real lifecycle as a provider reports it, in provider order: submitted
    reports, running reports with rising progress (transient unknown words among them),
    maybe a success whose URL is not there yet, and at most one terminal outcome. Any report
    may be delivered more than once."""
    steps: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 2))):
        steps.append({"status": Status.SUBMITTED, "provider_status": "queued"})
    progress = sorted(draw(st.lists(st.integers(0, 99), max_size=4)))
    for value in progress:
        if draw(st.booleans()):
            steps.append({"status": None, "provider_status": "weird", "progress": value})
        steps.append({"status": Status.PROCESSING, "provider_status": "running", "progress": value})
    outcome = draw(st.sampled_from(["none", "completed", "failed", "missing-then-completed"]))
    last = progress[-1] if progress else 0
    if outcome == "missing-then-completed":
        steps.append({"status": Status.COMPLETED, "provider_status": "succeed", "progress": last})
    if outcome in ("completed", "missing-then-completed"):
        steps.append({"status": Status.COMPLETED, "provider_status": "succeed", "videos": (VIDEO,)})
    if outcome == "failed":
        steps.append(
            {"status": Status.FAILED, "provider_status": "failed", "error": "boom", "progress": 100}
        )
    reports = [
        Observation("t1", provider_updated_at=at(n) if stamped else None, **fields)
        for n, fields in enumerate(steps)
    ]
    repeats = draw(st.lists(st.sampled_from(reports), max_size=3)) if reports else []
    return reports + repeats


def outcome(t: Task) -> dict[str, Any]:
    fields: dict[str, Any] = {"status": t.status}
    if t.terminal:
        fields.update(provider_status=t.provider_status, videos=t.videos, error=t.error)
        if t.status is not Status.FAILED:  # a failure keeps whatever progress it had reached
            fields["progress"] = t.progress
    return fields


@PROPERTY
@given(history().flatmap(lambda h: st.tuples(st.just(h), st.permutations(h))))
def test_property_orderings_of_a_stamped_history_end_in_the_same_state(
    reports: tuple[list[Observation], list[Observation]],
) -> None:
    in_order, shuffled = reports
    expected, got = apply_all(in_order), apply_all(shuffled)
    assert outcome(got) == outcome(expected)
    if not expected.terminal:
        assert got.provider_status == expected.provider_status
        assert got.progress == expected.progress
    assert got.conflicts == expected.conflicts == 0
    assert got.result_missing_since is None or not got.terminal


@PROPERTY
@given(history(stamped=False).flatmap(lambda h: st.tuples(st.just(h), st.permutations(h))))
def test_property_orderings_of_an_unstamped_history_end_in_the_same_outcome(
    reports: tuple[list[Observation], list[Observation]],
) -> None:
    in_order, shuffled = reports
    assert outcome(apply_all(shuffled)) == outcome(apply_all(in_order))
