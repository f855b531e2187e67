"""OpenTelemetry tracing and metrics (``sqla_pgotask.otel``), with the SDK's in-memory exporters."""

from __future__ import annotations

import datetime as dt
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    NumberDataPoint,
    Sum,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, StatusCode
from sqlalchemy import create_engine, event, select, update
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import (
    ConfigurationError,
    Scheduler,
    Snooze,
    Task,
    TaskCancelledError,
    _tracing,
    add_many,
    otel,
)
from sqla_pgotask._metrics import QueueDepth, QueueDepthReader
from sqla_pgotask.otel import ATTR_ATTEMPT, ATTR_KIND, ATTR_OUTCOME, ATTR_QUEUE, ATTR_STATE
from tests.helpers import add_tasks, get_task

ROOT = Path(__file__).resolve().parent.parent

#: A database nobody listens on: connecting is refused at once.
UNREACHABLE_URL = "postgresql+psycopg://postgres@127.0.0.1:1/x"

Attributes = frozenset[tuple[str, Any]]


def attrs(**values: Any) -> Attributes:
    """Metric point attributes, by their OpenTelemetry names (``pgotask.queue=...``)."""
    return frozenset(values.items())


def key(kind: str, queue: str = "default", **more: Any) -> Attributes:
    return attrs(**{ATTR_KIND: kind, ATTR_QUEUE: queue}, **more)


def _noop(session: Session, task: Task) -> None:
    pass


class Boom(Exception):
    """A handler's failure, with a qualified name to find in ``error.type``."""


@dataclass
class Telemetry:
    """A tracer and a meter provider whose spans and metrics the test reads back."""

    exporter: InMemorySpanExporter = field(default_factory=InMemorySpanExporter)
    reader: InMemoryMetricReader = field(default_factory=InMemoryMetricReader)
    tracer_provider: TracerProvider = field(default_factory=TracerProvider)
    meter_provider: MeterProvider = field(init=False)

    def __post_init__(self) -> None:
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.tracer = self.tracer_provider.get_tracer("tests")

    def instrument(self, scheduler: Scheduler, **options: Any) -> None:
        otel.instrument(
            scheduler,
            tracer_provider=self.tracer_provider,
            meter_provider=self.meter_provider,
            **options,
        )

    def scheduler(
        self, session_factory: sessionmaker[Session], *noop_kinds: str, **options: Any
    ) -> Scheduler:
        """An instrumented scheduler, with a handler doing nothing for each of ``noop_kinds``."""
        scheduler = Scheduler(session_factory)
        self.instrument(scheduler, **options)
        for kind in noop_kinds:
            scheduler.handler(kind)(_noop)
        return scheduler

    def spans(self, prefix: str = "run ") -> list[ReadableSpan]:
        """The ended spans whose name starts with ``prefix``, in the order they ended."""
        return [s for s in self.exporter.get_finished_spans() if s.name.startswith(prefix)]

    def collect(self) -> dict[str, Metric]:
        """Every metric of one collection, by name."""
        data = self.reader.get_metrics_data()
        if data is None:
            return {}
        return {
            metric.name: metric
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
        }


def numbers(metric: Metric) -> dict[Attributes, float]:
    """The values of a counter's or a gauge's points, by their attributes."""
    assert isinstance(metric.data, (Sum, Gauge))
    points: dict[Attributes, float] = {}
    for point in metric.data.data_points:
        assert isinstance(point, NumberDataPoint)
        points[frozenset((point.attributes or {}).items())] = point.value
    return points


def histogram(metric: Metric) -> dict[Attributes, HistogramDataPoint]:
    assert isinstance(metric.data, Histogram)
    return {frozenset((p.attributes or {}).items()): p for p in metric.data.data_points}


def link_targets(span: ReadableSpan) -> list[tuple[int, int]]:
    """``(trace_id, span_id)`` of the spans ``span`` links to."""
    return [(link.context.trace_id, link.context.span_id) for link in span.links]


def ids(context: SpanContext) -> tuple[int, int]:
    return context.trace_id, context.span_id


def traceparent(context: SpanContext) -> dict[str, str]:
    flags = f"{context.trace_flags:02x}"
    return {"traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags}"}


def stored_contexts(session_factory: sessionmaker[Session]) -> list[dict[str, str] | None]:
    with session_factory() as session:
        return list(session.scalars(select(Task.trace_context).order_by(Task.id)))


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    tel = Telemetry()
    try:
        yield tel
    finally:
        # The enqueue listener and the context provider are process-wide.
        otel.uninstrument_enqueue()
        tel.tracer_provider.shutdown()
        tel.meter_provider.shutdown()


# -- spans -------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 10])
def test_each_attempt_gets_a_consumer_span_current_while_its_handler_runs(
    session_factory: sessionmaker[Session], telemetry: Telemetry, batch_size: int
) -> None:
    scheduler = Scheduler(session_factory)
    telemetry.instrument(scheduler)
    inside: dict[int, tuple[int, int]] = {}
    ended_before: list[int] = []

    @scheduler.handler("greet")
    def greet(session: Session, task: Task) -> None:
        inside[task.id] = ids(trace.get_current_span().get_span_context())
        # Not ended yet: the span ends once the attempt's outcome committed.
        ended_before.append(len(telemetry.spans()))

    first, second = add_tasks(session_factory, Task(kind="greet"), Task(kind="greet", queue="mail"))
    assert scheduler.run_until_idle(batch_size=batch_size) == 2

    spans = telemetry.spans()
    assert len(spans) == 2
    assert ended_before[0] == 0
    by_task = {int(str((s.attributes or {})["messaging.message.id"])): s for s in spans}
    for task_id, queue in ((first, "default"), (second, "mail")):
        span = by_task[task_id]
        assert span.name == "run greet"
        assert span.kind is SpanKind.CONSUMER
        assert span.parent is None  # a new trace, linked (here: to nothing) to the enqueuer
        assert span.links == ()
        assert span.status.status_code is StatusCode.UNSET
        assert span.instrumentation_scope is not None
        assert span.instrumentation_scope.name == "sqla_pgotask"
        assert dict(span.attributes or {}) == {
            "messaging.system": "pgotask",
            "messaging.operation.type": "process",
            "messaging.operation.name": "run",
            "messaging.destination.name": queue,
            "messaging.message.id": str(task_id),
            ATTR_KIND: "greet",
            ATTR_QUEUE: queue,
            ATTR_ATTEMPT: 1,
            ATTR_OUTCOME: "succeeded",
        }
        assert span.context is not None
        assert inside[task_id] == ids(span.context)


def test_spans_started_by_the_handler_are_children_of_the_attempt_span(
    session_factory: sessionmaker[Session], telemetry: Telemetry
) -> None:
    scheduler = Scheduler(session_factory)
    telemetry.instrument(scheduler)

    @scheduler.handler("work")
    def work(session: Session, task: Task) -> None:
        with telemetry.tracer.start_as_current_span("step"):
            pass

    add_tasks(session_factory, Task(kind="work"))
    scheduler.run_until_idle()
    (step,) = telemetry.spans("step")
    (attempt,) = telemetry.spans()
    assert attempt.context is not None and step.parent is not None
    assert ids(step.parent) == ids(attempt.context)
    assert attempt.start_time is not None and step.start_time is not None
    assert attempt.end_time is not None and step.end_time is not None
    assert attempt.start_time <= step.start_time and step.end_time <= attempt.end_time


def test_a_failing_task_ends_its_spans_with_an_error_each_attempt(
    session_factory: sessionmaker[Session], telemetry: Telemetry
) -> None:
    scheduler = Scheduler(session_factory)
    telemetry.instrument(scheduler)

    @scheduler.handler("bad", max_attempts=2, retry=0)
    def bad(session: Session, task: Task) -> None:
        raise Boom("no luck")

    add_tasks(session_factory, Task(kind="bad"))
    assert scheduler.run_until_idle() == 2  # retry=0: due again at once
    spans = telemetry.spans()
    assert [(s.attributes or {})[ATTR_ATTEMPT] for s in spans] == [1, 2]
    assert [(s.attributes or {})[ATTR_OUTCOME] for s in spans] == ["retry", "failed"]
    for span in spans:
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == "Boom: no luck"
        assert (span.attributes or {})["error.type"] == "tests.test_otel.Boom"
        (exception,) = [e for e in span.events if e.name == "exception"]
        assert (exception.attributes or {})["exception.type"] == "tests.test_otel.Boom"
        assert (exception.attributes or {})["exception.message"] == "no luck"


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [(Snooze(60), "snoozed"), (TaskCancelledError("stop"), "cancelled")],
)
def test_snoozed_and_cancelled_attempts_are_not_errors(
    session_factory: sessionmaker[Session], telemetry: Telemetry, exc: Exception, outcome: str
) -> None:
    scheduler = Scheduler(session_factory)
    telemetry.instrument(scheduler)

    @scheduler.handler("k", max_attempts=3)
    def k(session: Session, task: Task) -> None:
        raise exc

    add_tasks(session_factory, Task(kind="k"))
    assert scheduler.run_until_idle() == 1
    (span,) = telemetry.spans()
    assert (span.attributes or {})[ATTR_OUTCOME] == outcome
    assert span.status.status_code is StatusCode.UNSET
    assert "error.type" not in (span.attributes or {})
    assert [e.name for e in span.events] == []  # not recorded as an exception either


# -- trace context propagation -----------------------------------------------


def enqueue_with_add(session: Session) -> None:
    session.add(Task(kind="linked"))


def enqueue_with_add_many_kind(session: Session) -> None:
    add_many(session, "linked", [{"n": 1}, {"n": 2}])


def enqueue_with_add_many_rows(session: Session) -> None:
    add_many(session, [{"kind": "linked"}, Task(kind="linked", payload={"n": 2})])


def enqueue_with_add_many_ids(session: Session) -> None:
    assert len(add_many(session, "linked", [1, 2, 3], return_ids=True)) == 3


ENQUEUES: dict[str, Callable[[Session], None]] = {
    "session.add": enqueue_with_add,
    "add_many(kind, payloads)": enqueue_with_add_many_kind,
    "add_many(tasks)": enqueue_with_add_many_rows,
    "add_many(return_ids=True)": enqueue_with_add_many_ids,
}


@pytest.mark.parametrize("enqueue", ENQUEUES.values(), ids=ENQUEUES.keys())
def test_attempt_spans_link_to_the_span_that_enqueued_the_task(
    session_factory: sessionmaker[Session],
    telemetry: Telemetry,
    enqueue: Callable[[Session], None],
) -> None:
    scheduler = telemetry.scheduler(session_factory, "linked")

    with (
        telemetry.tracer.start_as_current_span("enqueue") as enqueuing,
        session_factory.begin() as session,
    ):
        enqueue(session)
    context = enqueuing.get_span_context()
    contexts = stored_contexts(session_factory)
    assert contexts and all(c == traceparent(context) for c in contexts)

    assert scheduler.run_until_idle() == len(contexts)
    spans = telemetry.spans()
    assert len(spans) == len(contexts)
    for span in spans:
        assert link_targets(span) == [ids(context)]
        assert span.parent is None  # linked to, not a child of, the enqueuing span


@pytest.mark.parametrize("enqueue", ENQUEUES.values(), ids=ENQUEUES.keys())
def test_tasks_enqueued_outside_a_span_record_no_context(
    session_factory: sessionmaker[Session],
    telemetry: Telemetry,
    enqueue: Callable[[Session], None],
) -> None:
    otel.instrument_enqueue()
    with session_factory.begin() as session:
        enqueue(session)
    contexts = stored_contexts(session_factory)
    assert contexts and all(c is None for c in contexts)


@pytest.mark.parametrize("enqueue", ENQUEUES.values(), ids=ENQUEUES.keys())
def test_without_instrumentation_no_context_is_recorded(
    session_factory: sessionmaker[Session],
    telemetry: Telemetry,
    enqueue: Callable[[Session], None],
) -> None:
    otel.instrument_enqueue()
    otel.uninstrument_enqueue()
    assert not event.contains(Task, "before_insert", otel._record_context)
    assert _tracing.current() is None
    with telemetry.tracer.start_as_current_span("enqueue"), session_factory.begin() as session:
        enqueue(session)
    contexts = stored_contexts(session_factory)
    assert contexts and all(c is None for c in contexts)


def test_instrument_enqueue_is_idempotent(telemetry: Telemetry) -> None:
    otel.instrument_enqueue()
    otel.instrument_enqueue()
    assert event.contains(Task, "before_insert", otel._record_context)
    with telemetry.tracer.start_as_current_span("enqueue") as span:
        assert _tracing.current() == traceparent(span.get_span_context())
    assert _tracing.current() is None  # outside any span
    otel.uninstrument_enqueue()  # once is enough
    assert not event.contains(Task, "before_insert", otel._record_context)
    otel.uninstrument_enqueue()  # and again is harmless


def test_an_explicit_trace_context_is_kept_and_linked(
    session_factory: sessionmaker[Session], telemetry: Telemetry
) -> None:
    scheduler = telemetry.scheduler(session_factory, "linked")

    with telemetry.tracer.start_as_current_span("elsewhere") as elsewhere:
        origin = elsewhere.get_span_context()
    with telemetry.tracer.start_as_current_span("enqueue"):
        (task_id,) = add_tasks(
            session_factory, Task(kind="linked", trace_context=traceparent(origin))
        )
    assert get_task(session_factory, task_id).trace_context == traceparent(origin)
    scheduler.run_until_idle()
    (span,) = telemetry.spans()
    assert link_targets(span) == [ids(origin)]


def test_a_replacing_duplicate_keeps_the_first_enqueuers_context(
    session_factory: sessionmaker[Session], telemetry: Telemetry
) -> None:
    scheduler = telemetry.scheduler(session_factory, "debounced")

    with telemetry.tracer.start_as_current_span("first") as first:
        (live,) = add_tasks(
            session_factory, Task(kind="debounced", dedup_key="k", payload={"n": 1})
        )
    with telemetry.tracer.start_as_current_span("second") as second:
        (duplicate,) = add_tasks(
            session_factory,
            Task(kind="debounced", dedup_key="k", on_duplicate="replace", payload={"n": 2}),
        )
    replaced, kept = get_task(session_factory, live), get_task(session_factory, duplicate)
    assert replaced.payload == {"n": 2}
    assert kept.result == {"duplicate_of": live, "replaced": True}
    assert replaced.trace_context == traceparent(first.get_span_context())
    assert kept.trace_context == traceparent(second.get_span_context())
    scheduler.run_until_idle()
    (span,) = telemetry.spans()
    assert link_targets(span) == [ids(first.get_span_context())]


@pytest.mark.parametrize(
    "trace_context",
    [{"traceparent": "not a traceparent"}, {"other": "header"}, {}],
    ids=["malformed", "no-traceparent", "empty"],
)
def test_an_unusable_trace_context_gives_no_link(
    session_factory: sessionmaker[Session],
    telemetry: Telemetry,
    trace_context: dict[str, str],
) -> None:
    scheduler = telemetry.scheduler(session_factory, "linked")

    (task_id,) = add_tasks(session_factory, Task(kind="linked"))
    with session_factory.begin() as session:  # as plain SQL could store it
        session.execute(update(Task).where(Task.id == task_id).values(trace_context=trace_context))
    assert scheduler.run_until_idle() == 1
    (span,) = telemetry.spans()
    assert span.links == ()
    assert (span.attributes or {})[ATTR_OUTCOME] == "succeeded"


def enqueue_child_with_add_and_flush(session: Session) -> None:
    session.add(Task(kind="child"))
    session.flush()


def enqueue_child_with_add(session: Session) -> None:
    # Flushed by the worker once the handler returned.
    session.add(Task(kind="child"))


def enqueue_child_with_add_many(session: Session) -> None:
    add_many(session, "child", [None])


# A plain ``session.add`` is flushed by the otel middleware, inside the span
# (the worker's own flush comes after the span stopped being current).
CHILD_ENQUEUES = [
    pytest.param(enqueue_child_with_add_and_flush, id="session.add+flush"),
    pytest.param(enqueue_child_with_add, id="session.add"),
    pytest.param(enqueue_child_with_add_many, id="add_many"),
]


@pytest.mark.parametrize("enqueue", CHILD_ENQUEUES)
def test_a_task_enqueued_by_a_handler_links_to_that_attempt(
    session_factory: sessionmaker[Session],
    telemetry: Telemetry,
    enqueue: Callable[[Session], None],
) -> None:
    scheduler = Scheduler(session_factory)
    telemetry.instrument(scheduler)  # propagate_context=True by default

    @scheduler.handler("parent")
    def parent(session: Session, task: Task) -> None:
        enqueue(session)

    @scheduler.handler("child")
    def child(session: Session, task: Task) -> None:
        pass

    add_tasks(session_factory, Task(kind="parent"))
    assert scheduler.run_until_idle() == 2
    (parent_span,) = telemetry.spans("run parent")
    (child_span,) = telemetry.spans("run child")
    assert parent_span.context is not None
    assert stored_contexts(session_factory) == [None, traceparent(parent_span.context)]
    assert link_targets(child_span) == [ids(parent_span.context)]


def test_propagate_context_false_records_no_context(
    session_factory: sessionmaker[Session], telemetry: Telemetry
) -> None:
    scheduler = telemetry.scheduler(session_factory, "linked", propagate_context=False)
    assert not event.contains(Task, "before_insert", otel._record_context)
    assert _tracing.current() is None

    with telemetry.tracer.start_as_current_span("enqueue"), session_factory.begin() as session:
        session.add(Task(kind="linked"))
        add_many(session, "linked", [1])
    assert stored_contexts(session_factory) == [None, None]
    assert scheduler.run_until_idle() == 2
    spans = telemetry.spans()
    assert len(spans) == 2 and all(s.links == () for s in spans)


# -- configuration -----------------------------------------------------------


def test_instrumenting_a_scheduler_twice_is_an_error(
    session_factory: sessionmaker[Session], telemetry: Telemetry
) -> None:
    scheduler = Scheduler(session_factory)
    telemetry.instrument(scheduler)
    with pytest.raises(ConfigurationError, match="already instrumented"):
        telemetry.instrument(scheduler)
    telemetry.instrument(Scheduler(session_factory))  # another scheduler is fine


def test_a_negative_queue_metrics_interval_is_an_error(
    session_factory: sessionmaker[Session], telemetry: Telemetry
) -> None:
    scheduler = Scheduler(session_factory)
    with pytest.raises(ConfigurationError, match="queue_metrics_interval"):
        telemetry.instrument(scheduler, queue_metrics_interval=-1)
    telemetry.instrument(scheduler)  # the failed call left the scheduler alone
    assert len(scheduler.hooks.middleware) == 1
    assert len(scheduler.hooks.on_outcome) == 1


def test_importing_the_core_imports_no_metrics_library() -> None:
    code = (
        "import sys, sqla_pgotask, sqla_pgotask.cli, sqla_pgotask.admin, "
        "sqla_pgotask.testing, sqla_pgotask.worker; "
        "assert not any(m.split('.')[0] in ('opentelemetry', 'prometheus_client') "
        "for m in sys.modules), sorted(sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]


# -- metrics -----------------------------------------------------------------


def test_attempt_counters_and_duration_by_outcome(
    session_factory: sessionmaker[Session], telemetry: Telemetry
) -> None:
    scheduler = telemetry.scheduler(session_factory, "ok", queue_metrics=False)

    @scheduler.handler("bad", max_attempts=1)
    def bad(session: Session, task: Task) -> None:
        raise Boom("bad")

    add_tasks(session_factory, Task(kind="ok"), Task(kind="ok", queue="q1"), Task(kind="bad"))
    assert scheduler.run_until_idle() == 3
    metrics = telemetry.collect()

    assert numbers(metrics["pgotask.attempt.started"]) == {
        key("ok"): 1,
        key("ok", "q1"): 1,
        key("bad"): 1,
    }
    succeeded = {ATTR_OUTCOME: "succeeded"}
    assert numbers(metrics["pgotask.attempt.finished"]) == {
        key("ok", **succeeded): 1,
        key("ok", "q1", **succeeded): 1,
        key("bad", **{ATTR_OUTCOME: "failed"}): 1,
    }
    assert metrics["pgotask.attempt.duration"].unit == "s"
    durations = histogram(metrics["pgotask.attempt.duration"])
    assert set(durations) == set(numbers(metrics["pgotask.attempt.finished"]))
    for point in durations.values():
        assert point.count == 1
        assert 0 <= point.sum < 5
        assert point.explicit_bounds[0] == 0.005  # the library's buckets, not the SDK's
    assert not any(name.startswith("pgotask.queue.") for name in metrics)


def test_counters_accumulate_over_attempts(
    session_factory: sessionmaker[Session], telemetry: Telemetry
) -> None:
    scheduler = telemetry.scheduler(session_factory, "ok", queue_metrics=False)

    @scheduler.handler("flaky", max_attempts=2, retry=0)
    def flaky(session: Session, task: Task) -> None:
        raise Boom("flaky")

    add_tasks(session_factory, Task(kind="ok"), Task(kind="ok"), Task(kind="flaky"))
    assert scheduler.run_until_idle(batch_size=10) == 4
    metrics = telemetry.collect()
    assert numbers(metrics["pgotask.attempt.started"]) == {key("ok"): 2, key("flaky"): 2}
    assert numbers(metrics["pgotask.attempt.finished"]) == {
        key("ok", **{ATTR_OUTCOME: "succeeded"}): 2,
        key("flaky", **{ATTR_OUTCOME: "retry"}): 1,
        key("flaky", **{ATTR_OUTCOME: "failed"}): 1,
    }
    counts = {a: p.count for a, p in histogram(metrics["pgotask.attempt.duration"]).items()}
    assert counts == {
        key("ok", **{ATTR_OUTCOME: "succeeded"}): 2,
        key("flaky", **{ATTR_OUTCOME: "retry"}): 1,
        key("flaky", **{ATTR_OUTCOME: "failed"}): 1,
    }


def state(kind: str, queue: str, name: str) -> Attributes:
    return key(kind, queue, **{ATTR_STATE: name})


def tasks_by_state(
    kind: str, queue: str, due: int, scheduled: int, running: int
) -> dict[Attributes, float]:
    return {
        state(kind, queue, "due"): due,
        state(kind, queue, "scheduled"): scheduled,
        state(kind, queue, "running"): running,
    }


def test_queue_gauges_report_live_tasks_and_fall_to_zero(
    session_factory: sessionmaker[Session], telemetry: Telemetry
) -> None:
    scheduler = Scheduler(session_factory)
    telemetry.instrument(scheduler, queue_metrics_interval=0)
    seen_while_running: list[dict[Attributes, float]] = []

    @scheduler.handler("k")
    def k(session: Session, task: Task) -> None:
        if task.payload == {"n": 0}:
            seen_while_running.append(numbers(telemetry.collect()["pgotask.queue.tasks"]))

    now = dt.datetime.now(dt.timezone.utc)
    add_tasks(
        session_factory,
        Task(kind="k", queue="a", payload={"n": 0}, run_at=now - dt.timedelta(seconds=60)),
        Task(kind="k", queue="a", payload={"n": 1}),
        Task(kind="k", queue="a", payload={"n": 2}),
        Task(kind="k", queue="b", run_at=now + dt.timedelta(hours=1)),
    )
    metrics = telemetry.collect()
    assert metrics["pgotask.queue.tasks"].unit == "{task}"
    assert numbers(metrics["pgotask.queue.tasks"]) == {
        **tasks_by_state("k", "a", due=3, scheduled=0, running=0),
        **tasks_by_state("k", "b", due=0, scheduled=1, running=0),
    }
    assert metrics["pgotask.queue.oldest_due_age"].unit == "s"
    ages = numbers(metrics["pgotask.queue.oldest_due_age"])
    assert set(ages) == {key("k", "a"), key("k", "b")}
    assert 60 <= ages[key("k", "a")] < 600
    assert ages[key("k", "b")] == 0

    assert scheduler.run_until_idle() == 3  # the task in "b" is not due
    # Its own task was running (claimed, committed) when the handler looked.
    assert seen_while_running == [
        {
            **tasks_by_state("k", "a", due=2, scheduled=0, running=1),
            **tasks_by_state("k", "b", due=0, scheduled=1, running=0),
        }
    ]
    metrics = telemetry.collect()
    assert numbers(metrics["pgotask.queue.tasks"]) == {
        **tasks_by_state("k", "a", due=0, scheduled=0, running=0),  # zero-filled
        **tasks_by_state("k", "b", due=0, scheduled=1, running=0),
    }
    assert numbers(metrics["pgotask.queue.oldest_due_age"]) == {
        key("k", "a"): 0,
        key("k", "b"): 0,
    }


def test_queue_gauges_read_the_database_at_most_every_interval(
    session_factory: sessionmaker[Session], telemetry: Telemetry
) -> None:
    scheduler = Scheduler(session_factory)
    telemetry.instrument(scheduler, queue_metrics_interval=3600)
    add_tasks(session_factory, Task(kind="k"))
    first = numbers(telemetry.collect()["pgotask.queue.tasks"])
    assert first[state("k", "default", "due")] == 1
    add_tasks(session_factory, Task(kind="k"), Task(kind="other"))
    assert numbers(telemetry.collect()["pgotask.queue.tasks"]) == first  # not read again


def test_queue_depth_reader_caches_and_zero_fills(
    session_factory: sessionmaker[Session],
) -> None:
    clock = [100.0]
    reader = QueueDepthReader(session_factory, interval=10, clock=lambda: clock[0])
    assert reader.read() == []  # nothing live, nothing seen
    add_tasks(session_factory, Task(kind="k", queue="q"))
    clock[0] += 9.9
    assert reader.read() == []  # cached
    clock[0] += 0.1
    (row,) = reader.read()
    assert (row.queue, row.kind, row.counts()) == (
        "q",
        "k",
        {"due": 1, "scheduled": 0, "running": 0},
    )
    assert row.oldest_due_seconds >= 0
    with session_factory.begin() as session:
        session.execute(update(Task).values(status="cancelled"))
    clock[0] += 10
    assert reader.read() == [QueueDepth("q", "k", 0, 0, 0, 0.0)]


def test_queue_depth_reader_rejects_a_negative_interval(
    session_factory: sessionmaker[Session],
) -> None:
    with pytest.raises(ValueError, match="interval"):
        QueueDepthReader(session_factory, interval=-0.5)


@pytest.fixture
def unreachable() -> Iterator[sessionmaker[Session]]:
    engine = create_engine(UNREACHABLE_URL, connect_args={"connect_timeout": 2})
    yield sessionmaker(engine)
    engine.dispose()


def test_queue_depth_reader_logs_and_reports_nothing_without_a_database(
    unreachable: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    reader = QueueDepthReader(unreachable, interval=0)
    with caplog.at_level(logging.WARNING, logger="sqla_pgotask.metrics"):
        assert reader.read() == []
    (record,) = [r for r in caplog.records if r.name == "sqla_pgotask.metrics"]
    assert record.levelno == logging.WARNING
    assert "queue depth" in record.getMessage()
    assert record.exc_info is not None


def test_queue_gauges_are_missing_without_a_database(
    unreachable: sessionmaker[Session], telemetry: Telemetry, caplog: pytest.LogCaptureFixture
) -> None:
    scheduler = Scheduler(unreachable)
    telemetry.instrument(scheduler, queue_metrics_interval=0)
    with caplog.at_level(logging.WARNING, logger="sqla_pgotask.metrics"):
        metrics = telemetry.collect()
    for name in ("pgotask.queue.tasks", "pgotask.queue.oldest_due_age"):
        assert name not in metrics or numbers(metrics[name]) == {}
    assert any(r.name == "sqla_pgotask.metrics" for r in caplog.records)


def test_queue_metrics_false_registers_no_gauges(
    session_factory: sessionmaker[Session], telemetry: Telemetry
) -> None:
    scheduler = telemetry.scheduler(session_factory, "k", queue_metrics=False)

    add_tasks(session_factory, Task(kind="k"), Task(kind="k", run_at=_later()))
    scheduler.run_until_idle()
    metrics = telemetry.collect()
    assert "pgotask.attempt.finished" in metrics
    assert sorted(name for name in metrics if name.startswith("pgotask.queue.")) == []


def _later() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
