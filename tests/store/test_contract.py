"""What every backend promises (store/base.py's `Store`), run on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest

from reconciler.errors import StoreError
from reconciler.model import Change, Commit, EventType, Outcome, Source, Status, Task, TaskRef
from reconciler.state import new_task
from reconciler.store import Store
from reconciler.store.base import Accepted, Decide, NewDelivery, Rejected
from tests.store.conftest import OpenStore

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def creating(ref: TaskRef, status: Status = Status.SUBMITTED, **fields: object) -> Decide:
    def decide(task: Task | None) -> Change | None:
        if task is not None:
            return None
        planned: dict[str, object] = {"next_poll_at": NOW + timedelta(seconds=60)}
        created = new_task(ref, "text2video", NOW, 3600, Source.REGISTER).replace(
            status=status, version=1, **(planned | fields)
        )
        return Change(created, EventType.REGISTERED, None)

    return decide


def progressing(progress: int) -> Decide:
    def decide(task: Task | None) -> Change | None:
        assert task is not None
        moved = task.replace(status=Status.PROCESSING, progress=progress, version=task.version + 1)
        return Change(moved, EventType.PROCESSING, task.status)

    return decide


def delivery(body: bytes, provider: str = "kling") -> NewDelivery:
    return NewDelivery(
        provider, NOW, {"content-type": "application/json"}, body, hashlib.sha256(body).hexdigest()
    )


async def test_apply_creates_changes_and_numbers_events(any_store: Store) -> None:
    ref = TaskRef("kling", "a")
    created = await any_store.apply([ref], creating(ref))
    assert created.created and created.event_seq == 1 and created.task is not None
    moved = await any_store.apply([ref], progressing(40))
    assert not moved.created and moved.event_seq == 2
    unchanged = await any_store.apply([ref], creating(ref))  # decides nothing: the task as is
    assert unchanged.task == moved.task and unchanged.event_seq is None
    assert not unchanged.created
    nothing = await any_store.apply([TaskRef("kling", "none")], lambda task: None)
    assert (nothing.task, nothing.created, nothing.event_seq) == (None, False, None)
    task = await any_store.get_task(ref)
    assert task is not None and task.progress == 40 and task.version == 2
    assert await any_store.get_task(TaskRef("kling", "none")) is None
    assert await any_store.last_seq() == 2


async def test_events_are_served_with_their_seq_and_filtered(any_store: Store) -> None:
    for provider, task_id in (("kling", "a"), ("kie", "b"), ("kling", "c")):
        ref = TaskRef(provider, task_id)
        await any_store.apply([ref], creating(ref))
    await any_store.apply([TaskRef("kling", "a")], progressing(10))
    rows = await any_store.events_after(0, 10)
    assert [row.seq for row in rows] == [1, 2, 3, 4]
    for row in rows:
        body = json.loads(row.body)
        assert body["seq"] == row.seq and body["type"] == row.type
        assert row.body.startswith('{"seq":') and body["task"]["task_id"] == row.task_id
    assert [r.seq for r in await any_store.events_after(1, 2)] == [2, 3]
    assert [r.seq for r in await any_store.events_after(0, 10, provider="kling")] == [1, 3, 4]
    assert [r.seq for r in await any_store.events_after(0, 10, "kling", "a")] == [1, 4]
    assert await any_store.events_after(4, 10) == []


async def test_concurrent_writes_commit_together_with_contiguous_seqs(backend: OpenStore) -> None:
    commits: list[Commit] = []
    async with backend(on_commit=commits.append) as store:

        async def write(n: int) -> None:
            ref = TaskRef("kling", f"t{n}")
            result = await store.apply([ref], creating(ref))
            assert result.created
            # Resumed after the commit: every reader sees it now.
            assert await store.get_task(ref) is not None

        await asyncio.gather(*(write(n) for n in range(200)))
        assert [row.seq for row in await store.events_after(0, 1000)] == list(range(1, 201))
    written = [commit for commit in commits if commit.events]
    assert sum(commit.events for commit in written) == 200
    assert len(written) <= 20, len(written)  # far fewer than 200 transactions
    assert max(commit.last_seq for commit in written) == 200


async def test_ingest_dedupes_and_keeps_rejected(any_store: Store) -> None:
    ref = TaskRef("kling", "a")

    def interpret(d: NewDelivery) -> Accepted | Rejected:
        if d.body == b"bad":
            return Rejected("bad_payload", "not JSON")
        return Accepted([ref], creating(ref))

    first, dup, bad = await asyncio.gather(
        any_store.ingest(delivery(b'{"x":1}'), interpret),
        any_store.ingest(delivery(b'{"x":1}'), interpret),
        any_store.ingest(delivery(b"bad"), interpret),
    )
    assert first.outcome is Outcome.APPLIED and first.task is not None
    assert first.task_json is not None and json.loads(first.task_json)["task_id"] == "a"
    assert dup.duplicate and dup.task is not None and dup.task.task_id == "a"
    assert bad.outcome is Outcome.REJECTED and bad.error == Rejected("bad_payload", "not JSON")
    assert bad.task is None and bad.task_json is None
    later = await any_store.ingest(delivery(b'{"x":1}'), interpret)
    assert later.duplicate and later.task_json == first.task_json
    stored = await any_store.deliveries()
    assert [d.outcome for d in stored] == [
        Outcome.APPLIED,
        Outcome.DUPLICATE,
        Outcome.REJECTED,
        Outcome.DUPLICATE,
    ]
    assert stored[2].body == b"bad" and stored[2].error == "not JSON"
    assert stored[0].headers == {"content-type": "application/json"}
    assert stored[0].received_at == NOW and stored[0].task_id == "a"
    assert [d.id for d in await any_store.deliveries(ids=[stored[1].id])] == [stored[1].id]
    assert await any_store.deliveries(ids=[]) == []
    assert [e.seq for e in await any_store.events_after(0, 10)] == [1]
    # A fixed interpreter re-applies the rejected delivery.
    other = TaskRef("kling", "b")
    replayed = await any_store.replay(stored[2].id, lambda d: Accepted([other], creating(other)))
    assert replayed.outcome is Outcome.APPLIED and replayed.delivery_id == stored[2].id
    assert (await any_store.deliveries(rejected_only=True)) == []
    with pytest.raises(StoreError, match="no delivery"):
        await any_store.replay(10_000, interpret)


async def test_a_conflicting_terminal_report_is_counted(any_store: Store) -> None:
    ref = TaskRef("kling", "done")
    await any_store.apply([ref], creating(ref, Status.COMPLETED, next_poll_at=None))

    def conflicting(d: NewDelivery) -> Accepted:
        def decide(task: Task | None) -> Change | None:
            assert task is not None
            return Change(task.replace(conflicts=task.conflicts + 1), None, task.status)

        return Accepted([ref], decide)

    result = await any_store.ingest(delivery(b'{"failed":1}'), conflicting)
    assert result.outcome is Outcome.CONFLICT
    assert (await any_store.get_task(ref)).conflicts == 1  # type: ignore[union-attr]


async def test_a_callback_names_a_registered_task_by_its_external_id(any_store: Store) -> None:
    registered = TaskRef("kling", "my-id")
    await any_store.apply([registered], creating(registered))
    # The callback's own id is unknown; the first existing candidate wins.
    result = await any_store.ingest(
        delivery(b"{}"), lambda d: Accepted([TaskRef("kling", "84225"), registered], progressing(5))
    )
    assert result.outcome is Outcome.APPLIED and result.task is not None
    assert result.task.task_id == "my-id"
    assert await any_store.get_task(TaskRef("kling", "84225")) is None


async def test_lease_pushes_due_tasks_forward(any_store: Store) -> None:
    for n in range(5):
        ref = TaskRef("kling", f"t{n}")
        await any_store.apply([ref], creating(ref))
    assert await any_store.next_due_at() == NOW + timedelta(seconds=60)
    assert await any_store.lease_due(NOW, 10, 30) == []
    due = await any_store.lease_due(NOW + timedelta(seconds=60), 3, 30)
    assert len(due) == 3
    # Leased tasks come back as they were due; the store holds them until the lease ends.
    assert {task.next_poll_at for task in due} == {NOW + timedelta(seconds=60)}
    assert (await any_store.get_task(due[0].ref)).next_poll_at == NOW + timedelta(seconds=90)  # type: ignore[union-attr]
    again = await any_store.lease_due(NOW + timedelta(seconds=60), 10, 30)
    assert len(again) == 2 and not {t.ref for t in again} & {t.ref for t in due}
    assert await any_store.next_due_at() == NOW + timedelta(seconds=90)
    # A full write after a lease keeps what the decision planned, not the lease.
    await any_store.apply([due[0].ref], progressing(20))
    moved = await any_store.get_task(due[0].ref)
    assert moved is not None and moved.next_poll_at == NOW + timedelta(seconds=90)


async def test_a_lease_of_one_provider_takes_only_its_due_tasks(any_store: Store) -> None:
    for n, provider in enumerate(["kie", "kling", "kie", "acedata", "kie"]):
        ref = TaskRef(provider, f"t{n}")
        await any_store.apply([ref], creating(ref))
    due = NOW + timedelta(seconds=60)
    assert await any_store.lease_due(NOW, 10, 30, "kie") == []  # none due yet
    kie = await any_store.lease_due(due, 2, 30, "kie")
    kie += await any_store.lease_due(due, 10, 30, "kie")
    assert sorted(t.task_id for t in kie) == ["t0", "t2", "t4"]
    assert await any_store.lease_due(due, 10, 30, "kie") == []  # all of Kie's are leased
    rest = await any_store.lease_due(due, 10, 30)
    assert sorted(t.task_id for t in rest) == ["t1", "t3"]  # the others were left due


async def test_a_change_of_counters_only_reads_back_whole(any_store: Store) -> None:
    """A poll that learns nothing new moves only the task's counters and poll time, which a
    backend may write as such; what reads back is the task as decided, every field."""
    ref = TaskRef("acedata", "counted")
    await any_store.apply([ref], creating(ref, metadata={"user": 'Zoë \u2028 "q"'}))
    before = await any_store.get_task(ref)
    assert before is not None
    later = NOW + timedelta(seconds=120)

    def counted(task: Task | None) -> Change | None:
        assert task is not None
        bumped = task.replace(polls=task.polls + 1, version=task.version + 1, poll_failures=2)
        return Change(bumped.replace(next_poll_at=later), None)

    result = await any_store.apply([ref], counted)
    expected = before.replace(
        polls=before.polls + 1, version=before.version + 1, poll_failures=2, next_poll_at=later
    )
    assert result.task == expected
    assert await any_store.get_task(ref) == expected
    [leased] = await any_store.lease_due(later, 10, 30)
    assert leased == expected


async def test_list_tasks_pages_newest_first(any_store: Store) -> None:
    for n in range(5):
        ref = TaskRef("kling" if n % 2 else "kie", f"t{n}")
        await any_store.apply(
            [ref], creating(ref, Status.PROCESSING if n > 2 else Status.SUBMITTED)
        )
    page = await any_store.list_tasks(limit=3)
    assert [t.task_id for t in page] == ["t3", "t1", "t4"]  # same instant: by key, descending
    last = page[-1]
    rest = await any_store.list_tasks(
        limit=3, before=(last.created_at, last.provider, last.task_id)
    )
    assert [t.task_id for t in rest] == ["t2", "t0"]
    assert [t.task_id for t in await any_store.list_tasks(provider="kie")] == ["t4", "t2", "t0"]
    assert [t.task_id for t in await any_store.list_tasks(status="processing")] == ["t3", "t4"]
    counts = {(s.provider, s.status, s.source): s.count for s in await any_store.settled_counts()}
    assert counts == {
        ("kie", "submitted", "register"): 2,
        ("kie", "processing", "register"): 1,
        ("kling", "submitted", "register"): 1,
        ("kling", "processing", "register"): 1,
    }


async def test_times_and_awkward_text_read_back_exactly(any_store: Store) -> None:
    ref = TaskRef("kling", "t\u00e9")
    odd = {"nul": "a\u0000b", "emoji": "\U0001f3ac", "quote": '"}', "deep": [[[{"x": None}]]]}
    moment = NOW + timedelta(microseconds=123_457)

    def decide(task: Task | None) -> Change:
        made = new_task(ref, "text2video", moment, 60, Source.REGISTER)
        return Change(
            made.replace(metadata=odd, error="bad\u0000word", next_poll_at=moment),
            EventType.REGISTERED,
            None,
        )

    await any_store.apply([ref], decide)
    task = await any_store.get_task(ref)
    assert task is not None and task.metadata == odd and task.error == "bad\u0000word"
    assert task.created_at == moment and task.next_poll_at == moment
    [event] = await any_store.events_after(0, 1)
    assert json.loads(event.body)["task"]["metadata"] == odd
    rejected = await any_store.ingest(
        delivery(b"\x00"), lambda d: Rejected("invalid_json", "byte \x00 is not JSON")
    )
    assert rejected.outcome is Outcome.REJECTED
    [stored] = await any_store.deliveries(ids=[rejected.delivery_id])
    assert stored.body == b"\x00" and stored.error is not None and "not JSON" in stored.error


async def test_close_is_idempotent_and_refuses_later_writes(backend: OpenStore) -> None:
    store = backend()
    async with store:
        await store.ping()
    await store.close()
    ref = TaskRef("kling", "late")
    with pytest.raises(StoreError):
        await store.apply([ref], creating(ref))
    with pytest.raises(StoreError):
        async with store:
            pass


async def test_a_lone_replica_leads_at_once(any_store: Store) -> None:
    async with asyncio.timeout(10), any_store.leadership() as lost:
        assert not lost.is_set()
        await any_store.ping()  # the lock holds no connection a reader needs


async def test_a_change_that_moves_no_indexed_column_is_read_back_everywhere(
    any_store: Store,
) -> None:
    """Most polls change only the poll time, the counters and the JSON: the row is updated
    in place. Every read must still see it, and a batch that also moves its status must
    not lose that move."""
    ref = TaskRef("kie", "quiet")
    await any_store.apply([ref], creating(ref))

    def polled(seconds: float) -> Decide:
        def decide(task: Task | None) -> Change | None:
            assert task is not None
            later = NOW + timedelta(seconds=seconds)
            return Change(
                task.replace(polls=task.polls + 1, version=task.version + 1, next_poll_at=later),
                None,
            )

        return decide

    await any_store.apply([ref], polled(200))
    task = await any_store.get_task(ref)
    assert task is not None and (task.polls, task.version) == (1, 2)
    assert task.next_poll_at == NOW + timedelta(seconds=200)
    assert await any_store.next_due_at() == NOW + timedelta(seconds=200)
    assert [t.task_id for t in await any_store.list_tasks(status="submitted")] == ["quiet"]

    # In one batch: a quiet change, then a status move, then another quiet change.
    await asyncio.gather(
        any_store.apply([ref], polled(300)),
        any_store.apply([ref], progressing(50)),
        any_store.apply([ref], polled(400)),
    )
    task = await any_store.get_task(ref)
    assert task is not None and task.status is Status.PROCESSING and task.progress == 50
    assert task.next_poll_at == NOW + timedelta(seconds=400) and task.version == 5
    assert await any_store.list_tasks(status="submitted") == []
    assert [t.task_id for t in await any_store.list_tasks(status="processing")] == ["quiet"]
    counts = {(s.status, s.source): s.count for s in await any_store.settled_counts()}
    assert counts == {("processing", "register"): 1}


async def test_a_decision_after_a_lease_sees_what_changed_since(any_store: Store) -> None:
    """A leased task is read again when its poll's result is applied: whatever was written
    meanwhile (a webhook) is what the rule decides on, not the task as it was leased."""
    ref = TaskRef("acedata", "leased")
    await any_store.apply([ref], creating(ref))
    [leased] = await any_store.lease_due(NOW + timedelta(seconds=60), 10, 30)
    assert leased.status is Status.SUBMITTED
    await any_store.apply([ref], progressing(70))  # a webhook meanwhile
    seen: list[Task] = []

    def record(task: Task | None) -> Change | None:
        assert task is not None
        seen.append(task)
        return None

    await any_store.apply([ref], record)
    assert seen[0].status is Status.PROCESSING and seen[0].progress == 70
    assert seen[0].next_poll_at == NOW + timedelta(seconds=90)  # the lease's column
    # Unchanged since its lease, it reads back as leased, with the lease's poll time.
    [again] = await any_store.lease_due(NOW + timedelta(seconds=90), 10, 30)
    await any_store.apply([ref], record)
    assert seen[1] == again.replace(next_poll_at=NOW + timedelta(seconds=120))
