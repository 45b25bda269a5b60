"""What CometAPI and the relay gateways have in common: both pass Kling's task API through
under `/kling/v1/…` with a Bearer key, one query per task.

Owns the query path and the one-request-per-task poll flow. Each subclass owns its answers'
shapes and error envelopes; Kling's task object is read by `kling_task.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import httpx

from reconciler.model import Observation, Task
from reconciler.providers.base import PollFlow, Provider, one_by_one, read_answer
from reconciler.providers.kling_task import kling_path, quote_id


class KlingPassthrough(Provider):
    batch_size = 1  # no batch query

    def query_request(self, task: Task) -> httpx.Request:
        """`GET {base}/kling/v1/{family}/{action}/{id}`."""
        path = kling_path(task.action, self.default_action)
        return httpx.Request("GET", f"{self.base_url}/kling/v1/{path}/{quote_id(task.task_id)}")

    def poll(self, tasks: Sequence[Task]) -> PollFlow:
        return (yield from one_by_one(tasks, self.query_request, self.observe_answer))

    def observe_answer(self, task: Task, response: httpx.Response) -> Observation:
        # A query answer comes in the shapes a callback may have.
        return self.parse_callback(read_answer(response, self))
