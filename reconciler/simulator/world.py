"""The simulated providers' state: tasks, their lifecycle, callbacks due, and the request log.

A task's lifecycle is a pure function of time: `submitted` from creation, `processing` from
`processing_at`, terminal from `finished_at`. Nothing advances it; every answer is computed
from `clock.now()` when asked, so a `FakeClock` test moves tasks by moving the clock.

Callbacks are planned when a task is created (one per status change for Kling-shaped
providers, one at the end for AceData and Kie), with their callback faults already drawn,
and kept in a heap by due time. `Simulator` pops and sends them; this module does no I/O.
Rendering bodies is `shapes.py`'s job; HTTP is `app.py`'s.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import random
import string
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from reconciler.clock import Clock
from reconciler.simulator.faults import Faults

PROVIDERS = ("kling", "cometapi", "gateway", "acedata", "kie")
KLING_SHAPED = frozenset({"kling", "cometapi", "gateway"})
KLING_ACTIONS = frozenset(
    {
        "text2video",
        "image2video",
        "multi-image2video",
        "multi-elements",
        "video-extend",
        "lip-sync",
        "effects",
        "motion-control",
        "omni-video",
        "avatar/image2video",
    }
)
ACEDATA_ACTIONS = frozenset({"text2video", "image2video", "extend"})
KIE_ACTIONS = frozenset({"jobs", "veo"})
# "taskdto-legacy" is the TaskDto of older new-api builds, whose `fail_reason` on failure is
# Kling's top-level message "SUCCEED" instead of the reason (new-api PR #2532).
GATEWAY_RENDERINGS = frozenset(
    {"taskdto", "taskdto-legacy", "simplified", "kling-native", "openai"}
)

Status = Literal["submitted", "processing", "completed", "failed"]
TERMINAL = frozenset({"completed", "failed"})
DEFAULT_FAILURE = "Image pixel is invalid"


@dataclass(slots=True, eq=False)
class SimTask:
    provider: str
    task_id: str
    action: str
    created_at: datetime
    processing_at: datetime
    finished_at: datetime
    final_status: Status
    video_url: str | None
    video_id: str
    error_message: str | None
    callback_url: str | None = None
    external_task_id: str | None = None
    rendering: str | None = None
    job_id: str | None = None  # AceData: the upstream Kling id
    trace_id: str | None = None  # AceData

    def status_at(self, now: datetime) -> Status:
        if now >= self.finished_at:
            return self.final_status
        if now >= self.processing_at:
            return "processing"
        return "submitted"

    def changed_at(self, status: Status) -> datetime:
        """When the task entered `status`."""
        if status in TERMINAL:
            return self.finished_at
        return self.processing_at if status == "processing" else self.created_at

    def to_dict(self) -> dict[str, object]:
        return {
            "provider": self.provider,
            "task_id": self.task_id,
            "action": self.action,
            "final_status": self.final_status,
            "video_url": self.video_url,
            "error_message": self.error_message,
            "callback_url": self.callback_url,
            "external_task_id": self.external_task_id,
            "rendering": self.rendering,
            "job_id": self.job_id,
            "created_at": self.created_at.isoformat(),
            "processing_at": self.processing_at.isoformat(),
            "finished_at": self.finished_at.isoformat(),
        }


@dataclass(slots=True)
class PendingCallback:
    task: SimTask
    status: Status
    due_at: datetime
    dropped: bool = False
    duplicated: bool = False
    reordered: bool = False


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    provider: str
    method: str
    path: str
    query: dict[str, str]
    status: int  # 0: the request hung and got no answer
    at: datetime
    task_ids: tuple[str, ...]
    kind: str = "query"  # create | query | list | batch
    fault: str | None = None  # the request fault applied, if any


@dataclass(frozen=True, slots=True)
class CallbackRecord:
    """One callback the simulator sent, or dropped on purpose."""

    provider: str
    task_id: str
    status: Status
    url: str
    response_status: int | None  # None: dropped, or the POST failed (see `error`)
    due_at: datetime
    at: datetime
    dropped: bool = False
    duplicated: bool = False  # the second copy of a duplicated callback
    reordered: bool = False
    error: str | None = None
    body: bytes | None = None  # kept unless the simulator was told not to (benchmarks)


@dataclass(slots=True)
class _Index:
    """One (provider, action)'s tasks in creation order, for Kling's list endpoint."""

    tasks: list[SimTask] = field(default_factory=list)
    created: list[datetime] = field(default_factory=list)


class World:
    def __init__(
        self,
        clock: Clock,
        seed: int = 0,
        faults: Faults | None = None,
        *,
        processing_after: float = 5.0,
        finish_after: float = 60.0,
        fail_rate: float = 0.0,
    ) -> None:
        self.clock = clock
        self.faults = faults or Faults()
        self.processing_after = processing_after
        self.finish_after = finish_after
        self.fail_rate = fail_rate
        self.rng = random.Random(seed)  # ids and callback faults: follows creation order
        # Request faults and shuffles follow request order, which concurrency can change;
        # a separate generator keeps task ids reproducible whatever the requests do.
        self.request_rng = random.Random(f"{seed}:requests")
        self.tasks: dict[tuple[str, str], SimTask] = {}
        self.external_ids: dict[tuple[str, str], SimTask] = {}
        self.requests: list[RecordedRequest] = []
        self.request_counts: Counter[tuple[str, str]] = Counter()
        self.callbacks: list[CallbackRecord] = []
        self.callback_counts: Counter[str] = Counter()
        self._lists: dict[tuple[str, str], _Index] = {}
        self._due: list[tuple[datetime, int, PendingCallback]] = []
        # Called after callbacks are planned, so a sleeping delivery loop can wake up.
        self.on_planned: Callable[[], None] | None = None
        self._seq = itertools.count()

    # -- tasks -------------------------------------------------------------------------

    def create_task(
        self,
        provider: str,
        action: str | None = None,
        callback_url: str | None = None,
        outcome: Status | None = None,
        processing_after: float | None = None,
        finish_after: float | None = None,
        external_task_id: str | None = None,
        rendering: str | None = None,
        error_message: str | None = None,
    ) -> SimTask:
        """Create a task; raises ValueError on bad arguments (the messages name them)."""
        if provider not in PROVIDERS:
            raise ValueError(f"provider: unknown provider {provider!r}")
        action = action or ("jobs" if provider == "kie" else "text2video")
        if provider == "kie" and action not in KIE_ACTIONS:
            raise ValueError(f"action: Kie actions are 'jobs' and 'veo', not {action!r}")
        if provider != "kie" and (not action or action.startswith("/") or action.endswith("/")):
            raise ValueError(f"action: {action!r} is not an action")
        if provider == "gateway":
            rendering = rendering or "taskdto"
            if rendering not in GATEWAY_RENDERINGS:
                raise ValueError(f"rendering: unknown gateway rendering {rendering!r}")
        elif rendering is not None:
            raise ValueError("rendering: only gateway tasks have a rendering")
        if external_task_id is not None:
            if provider not in ("kling", "cometapi"):
                raise ValueError("external_task_id: only Kling and CometAPI tasks have one")
            if (provider, external_task_id) in self.external_ids:
                raise ValueError(f"external_task_id: {external_task_id!r} is already used")
        if outcome is None:
            outcome = "failed" if self.rng.random() < self.fail_rate else "completed"
        if outcome not in TERMINAL:
            raise ValueError(f"outcome: must be 'completed' or 'failed', not {outcome!r}")
        finish_after = self.finish_after if finish_after is None else finish_after
        if processing_after is None:  # a short finish_after alone shortens both phases
            processing_after = min(self.processing_after, finish_after)
        if not 0 <= processing_after <= finish_after:
            raise ValueError("processing_after: must be >= 0 and <= finish_after")

        now = self.clock.now()
        task_id = self._new_id(provider, rendering)
        task = SimTask(
            provider=provider,
            task_id=task_id,
            action=action,
            created_at=now,
            processing_at=now + timedelta(seconds=processing_after),
            finished_at=now + timedelta(seconds=finish_after),
            final_status=outcome,
            video_url=self._video_url(provider, action, task_id, now)
            if outcome == "completed"
            else None,
            video_id=str(self.rng.randrange(10**17, 10**18)),
            error_message=(error_message or DEFAULT_FAILURE) if outcome == "failed" else None,
            callback_url=callback_url,
            external_task_id=external_task_id,
            rendering=rendering,
        )
        if provider == "acedata":
            task.job_id = "Cj" + "".join(self.rng.choices(_B64, k=20))
            task.trace_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        self.tasks[provider, task_id] = task
        if external_task_id is not None:
            self.external_ids[provider, external_task_id] = task
        index = self._lists.setdefault((provider, action), _Index())
        index.tasks.append(task)
        index.created.append(now)
        if callback_url:
            self._plan_callbacks(task)
        return task

    def find(self, provider: str, task_id: str) -> SimTask | None:
        """The task by id (or, for Kling-shaped providers, external_task_id)."""
        task = self.tasks.get((provider, task_id))
        if task is None:
            task = self.external_ids.get((provider, task_id))
        return task

    def known(self, task: SimTask, now: datetime) -> bool:
        """False while the `unknown_for` fault hides a new task from queries."""
        unknown_for = self.faults.for_provider(task.provider).unknown_for
        return unknown_for <= 0 or now >= task.created_at + timedelta(seconds=unknown_for)

    def truth(self, provider: str, task_id: str) -> Status:
        task = self.find(provider, task_id)
        if task is None:
            raise KeyError(f"no {provider} task {task_id!r}")
        return task.status_at(self.clock.now())

    def page(
        self, provider: str, action: str, page_num: int, page_size: int, now: datetime
    ) -> list[SimTask]:
        """A page of one action's known tasks, newest first (Kling's list endpoint)."""
        index = self._lists.get((provider, action))
        if index is None:
            return []
        # Creation times are ordered (a clock never goes back), so the tasks still hidden by
        # `unknown_for` are a suffix: cut it with a bisection instead of a scan.
        end = len(index.tasks)
        unknown_for = self.faults.for_provider(provider).unknown_for
        if unknown_for > 0:
            end = bisect.bisect_right(index.created, now - timedelta(seconds=unknown_for))
        stop = end - (page_num - 1) * page_size
        start = max(0, stop - page_size)
        return index.tasks[start:stop][::-1] if stop > 0 else []

    def actions(self, provider: str) -> set[str]:
        return {action for (p, action) in self._lists if p == provider}

    # -- callbacks ---------------------------------------------------------------------

    def next_due_at(self) -> datetime | None:
        return self._due[0][0] if self._due else None

    def pop_due(self, now: datetime, limit: int | None = None) -> list[PendingCallback]:
        """Callbacks due at `now`, earliest first; at most `limit` of them."""
        due: list[PendingCallback] = []
        while self._due and self._due[0][0] <= now and (limit is None or len(due) < limit):
            due.append(heapq.heappop(self._due)[2])
        return due

    @property
    def pending_callbacks(self) -> int:
        return len(self._due)

    def _plan_callbacks(self, task: SimTask) -> None:
        faults = self.faults.for_provider(task.provider)
        statuses: list[Status]
        if task.provider in KLING_SHAPED:
            # Kling notifies on every status change, including the first; a phase of no
            # length is no status the task ever showed.
            statuses = []
            if task.processing_at > task.created_at:
                statuses.append("submitted")
            if task.finished_at > task.processing_at:
                statuses.append("processing")
            statuses.append(task.final_status)
        else:
            statuses = [task.final_status]
        plan = []
        for status in statuses:
            due_at = task.changed_at(status)
            if faults.delay > 0 and self.rng.random() < faults.delay_rate:
                due_at += timedelta(seconds=faults.delay)
            plan.append(
                PendingCallback(
                    task,
                    status,
                    due_at,
                    dropped=self.rng.random() < faults.drop,
                    duplicated=self.rng.random() < faults.duplicate,
                )
            )
        if len(plan) > 1 and self.rng.random() < faults.reorder:
            intermediate = plan.pop(-2)
            intermediate.reordered = True
            plan.append(intermediate)
        # Due times never go backwards within a task, so the heap keeps the plan's order.
        latest = plan[0].due_at
        for callback in plan:
            latest = callback.due_at = max(latest, callback.due_at)
            heapq.heappush(self._due, (callback.due_at, next(self._seq), callback))
        if self.on_planned is not None:
            self.on_planned()

    # -- requests ----------------------------------------------------------------------

    def record(self, request: RecordedRequest) -> None:
        self.requests.append(request)
        self.request_counts[request.provider, request.kind] += 1

    def record_callback(self, callback: CallbackRecord) -> None:
        self.callbacks.append(callback)
        if callback.dropped:
            self.callback_counts["dropped"] += 1
        elif callback.response_status is None:
            self.callback_counts["failed"] += 1
        else:
            self.callback_counts["sent"] += 1
        if callback.duplicated:
            self.callback_counts["duplicated"] += 1

    # -- ids ---------------------------------------------------------------------------

    def _new_id(self, provider: str, rendering: str | None) -> str:
        while True:
            if provider == "acedata":
                task_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
            elif provider == "kie":
                task_id = f"{self.rng.getrandbits(128):032x}"
            elif provider == "gateway" and rendering not in ("taskdto", "taskdto-legacy"):
                # Current new-api builds hand out public `task_` ids.
                task_id = "task_" + "".join(self.rng.choices(_ALNUM, k=32))
            else:
                task_id = str(self.rng.randrange(10**17, 10**18))
            if (provider, task_id) not in self.tasks:
                return task_id

    def _video_url(self, provider: str, action: str, task_id: str, now: datetime) -> str:
        if provider == "cometapi":
            return f"https://storage.fonedis.cc/kling/{task_id}/video.mp4"
        if provider == "acedata":
            return f"https://platform2.cdn.acedata.cloud/kling/{task_id}.mp4"
        if provider == "kie":
            return f"https://tempfile.aiquickdraw.com/v/{task_id}_{int(now.timestamp())}.mp4"
        n = self.rng.randrange(10**5, 10**6)
        return (
            f"https://cdn.klingai.com/bs2/upload-kling-api/{n}/{action}/{task_id}-0_raw_video_1.mp4"
        )


_ALNUM = string.ascii_letters + string.digits
_B64 = _ALNUM + "-_"
