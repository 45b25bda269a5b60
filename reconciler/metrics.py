"""Prometheus collectors (SPEC §2 "Operations"). One `Metrics` per running service, each with
its own registry, so that tests can run many services in one process.

Figures that live in the database (tasks by status, how tasks were settled, reconciler lag)
are refreshed by the `/metrics` handler just before it renders, and those retention bounds
(the oldest kept seq, the database's size) by the pruner after each pass; counters are
incremented where things happen. No label ever carries a secret or a task id.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.deliveries = Counter(
            "reconciler_deliveries",
            "Webhook deliveries by provider and outcome.",
            ["provider", "outcome"],
            registry=r,
        )
        self.polls = Counter(
            "reconciler_polls",
            "Provider poll results by provider and outcome.",
            ["provider", "outcome"],
            registry=r,
        )
        self.provider_requests = Counter(
            "reconciler_provider_requests",
            "HTTP requests sent to providers.",
            ["provider", "status"],
            registry=r,
        )
        self.provider_latency = Histogram(
            "reconciler_provider_latency_seconds",
            "Provider request latency.",
            ["provider"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.events = Counter(
            "reconciler_events_written", "Events appended to the log.", registry=r
        )
        self.tasks = Gauge(
            "reconciler_tasks", "Tasks by provider and status.", ["provider", "status"], registry=r
        )
        self.settled = Gauge(
            "reconciler_tasks_settled",
            "Terminal tasks by provider and by what settled them: callback, poll, failed "
            "(by the reconciler: not found, no result) or expired.",
            ["provider", "by"],
            registry=r,
        )
        self.lag = Gauge(
            "reconciler_lag_seconds",
            "How far behind schedule the oldest due poll is (0 when none is due).",
            registry=r,
        )
        self.breakers_open = Gauge(
            "reconciler_breaker_open",
            "1 while a provider's circuit breaker is open.",
            ["provider"],
            registry=r,
        )
        self.provider_paused = Gauge(
            "reconciler_provider_paused",
            "1 while a provider is paused for rejected credentials.",
            ["provider"],
            registry=r,
        )
        self.pruned = Counter(
            "reconciler_pruned_rows",
            "Rows removed by retention, by kind: events, deliveries, tasks.",
            ["kind"],
            registry=r,
        )
        self.oldest_seq = Gauge(
            "reconciler_oldest_seq",
            "The seq of the oldest event kept in the log (with none kept, the seq the next "
            "event gets); a cursor below it minus one gets 410 cursor_expired.",
            registry=r,
        )
        self.database_bytes = Gauge(
            "reconciler_database_bytes",
            "Size of the database on disk (SQLite: the file and its WAL; PostgreSQL: "
            "pg_database_size).",
            registry=r,
        )

        # The labelled children per (provider, outcome): `labels()` takes a lock and builds a
        # key on every call (9 us), and these are counted on every webhook and every poll.
        self._delivered: dict[tuple[str, str], Any] = {}
        self._polled: dict[tuple[str, str], Any] = {}

    def delivered(self, provider: str, outcome: str) -> None:
        """Count one webhook delivery."""
        _child(self._delivered, self.deliveries, provider, outcome).inc()

    def polled(self, provider: str, outcome: str, tasks: int = 1) -> None:
        """Count the poll results of `tasks` tasks."""
        _child(self._polled, self.polls, provider, outcome).inc(tasks)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _child(cache: dict[tuple[str, str], Any], counter: Counter, provider: str, outcome: str) -> Any:
    """`counter.labels(provider, outcome)`, made once and kept in `cache`."""
    key = (provider, outcome)
    child = cache.get(key)
    if child is None:
        child = cache[key] = counter.labels(provider, outcome)
    return child
