"""OpenTelemetry tracing and metrics for task attempts (``pip install 'sqla-pgotask[otel]'``).

::

    from sqla_pgotask import otel

    otel.instrument(scheduler)          # in the worker: spans and metrics
    otel.instrument_enqueue()           # in the web app: link tasks to their request

:func:`instrument` gives each attempt a ``CONSUMER`` span, ``run <kind>``,
current while the handler runs (so the handler's own spans are its
children) and ended once the attempt's outcome has committed, with that
outcome.  The span links to the span that enqueued the task, whose W3C
trace context :func:`instrument_enqueue` records in ``Task.trace_context``.
Metrics: attempts started and finished (by outcome), attempt duration, and
the live tasks and oldest due age per queue and kind, read from the database
at most every ``queue_metrics_interval`` seconds.

Only ``opentelemetry-api`` is needed; the application sets up the SDK and
its exporters (or passes ``tracer_provider``/``meter_provider``).  Without a
configured SDK every call is a no-op.  See ``docs/observability.md``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Mapping

from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, TracerProvider
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapper, Session

from sqla_pgotask import _tracing
from sqla_pgotask._metrics import (
    DURATION_BUCKETS,
    QUEUE_METRICS_INTERVAL,
    Instrumented,
    QueueDepthReader,
)
from sqla_pgotask.context import AttemptContext, Outcome, current_attempt
from sqla_pgotask.errors import qualified_name
from sqla_pgotask.middleware import CallNext
from sqla_pgotask.models import Task
from sqla_pgotask.scheduler import Scheduler

__all__ = [
    "ATTR_ATTEMPT",
    "ATTR_KIND",
    "ATTR_OUTCOME",
    "ATTR_QUEUE",
    "ATTR_STATE",
    "instrument",
    "instrument_enqueue",
    "uninstrument_enqueue",
]

_NAME = "sqla_pgotask"

#: The task's kind (spans and every metric).
ATTR_KIND = "pgotask.task.kind"
#: The task's queue (spans and every metric).
ATTR_QUEUE = "pgotask.queue"
#: The attempt's :class:`~sqla_pgotask.Outcome` value (spans, finished attempts, duration).
ATTR_OUTCOME = "pgotask.outcome"
#: The attempt number, from 1 (spans).
ATTR_ATTEMPT = "pgotask.task.attempt"
#: ``due``, ``scheduled`` or ``running`` (the ``pgotask.queue.tasks`` gauge).
ATTR_STATE = "pgotask.task.state"

# Outcomes whose span ends with an error status.
_ERRORS = {Outcome.FAILED, Outcome.RETRY, Outcome.LOST}

_instrumented = Instrumented("OpenTelemetry")
# Serialises instrument_enqueue() and uninstrument_enqueue().
_lock = threading.Lock()


def _version() -> str:
    from sqla_pgotask import __version__

    return __version__


def instrument(
    scheduler: Scheduler,
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    queue_metrics: bool = True,
    queue_metrics_interval: float = QUEUE_METRICS_INTERVAL,
    propagate_context: bool = True,
) -> None:
    """Trace and measure every attempt ``scheduler``'s workers run.

    Registers a middleware and an outcome hook on ``scheduler`` (before
    ``scheduler.run()``, as any middleware), and the metric instruments on
    ``meter_provider`` (default: the global one).  ``queue_metrics=False``
    leaves out the two queue gauges, which every worker process reports
    alike (keep them on one, or aggregate them with ``max``).
    ``propagate_context``: also record the trace context of the tasks this
    process enqueues (:func:`instrument_enqueue`), so tasks enqueued by
    handlers link to the attempt that enqueued them.

    Raises :class:`~sqla_pgotask.ConfigurationError` if ``scheduler`` is
    already instrumented.
    """
    _instrumented.check(scheduler, queue_metrics_interval)
    _instrumented.add(scheduler)
    tracer = trace.get_tracer(_NAME, _version(), tracer_provider=tracer_provider)
    meter = metrics.get_meter(_NAME, _version(), meter_provider=meter_provider)
    attempts = _Attempts(tracer, meter)
    scheduler.middleware(attempts.middleware)
    scheduler.on_outcome(attempts.on_outcome)
    if queue_metrics:
        _QueueGauges(meter, QueueDepthReader(scheduler.session_factory, queue_metrics_interval))
    if propagate_context:
        instrument_enqueue()


def instrument_enqueue() -> None:
    """Record the current trace context in every task this process enqueues.

    ``session.add(Task(...))`` and :func:`~sqla_pgotask.add_many` then store
    the W3C ``traceparent`` (and ``tracestate``) of the span current at the
    flush in ``Task.trace_context``, through the global propagator; a task
    enqueued outside any span gets ``None``.  A task whose
    ``trace_context`` is already set keeps it.  Idempotent.
    """
    with _lock:
        _tracing.set_provider(_inject)
        if not event.contains(Task, "before_insert", _record_context):
            event.listen(Task, "before_insert", _record_context)


def uninstrument_enqueue() -> None:
    """Undo :func:`instrument_enqueue`: record no trace context any more."""
    with _lock:
        _tracing.set_provider(None)
        if event.contains(Task, "before_insert", _record_context):
            event.remove(Task, "before_insert", _record_context)


def _inject() -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def _record_context(mapper: Mapper[Task], connection: Connection, task: Task) -> None:
    if task.trace_context is None:
        carrier = _tracing.current()
        if carrier is not None:  # else leave it unset: NULL, not a JSON null
            task.trace_context = carrier


def _links(trace_context: object) -> list[Link]:
    """A link to the enqueuing span, if ``trace_context`` names a valid one."""
    if not isinstance(trace_context, Mapping):
        return []
    carrier = {str(k): str(v) for k, v in trace_context.items()}
    span_context = trace.get_current_span(propagate.extract(carrier, context=Context()))
    context = span_context.get_span_context()
    return [Link(context)] if context.is_valid else []


class _Attempts:
    """The middleware and outcome hook: one span, and the counters, per attempt."""

    def __init__(self, tracer: trace.Tracer, meter: metrics.Meter) -> None:
        self.tracer = tracer
        self.started = meter.create_counter(
            "pgotask.attempt.started", unit="{attempt}", description="Task attempts started."
        )
        self.finished = meter.create_counter(
            "pgotask.attempt.finished",
            unit="{attempt}",
            description="Task attempts finished, by outcome (once it committed).",
        )
        self.duration = meter.create_histogram(
            "pgotask.attempt.duration",
            unit="s",
            description="Seconds each attempt's handler (and middleware) took, by outcome.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        # Open spans, until their attempt's outcome: an attempt that never
        # gets one (its process stopped under it) takes its span with it.
        self._spans: weakref.WeakKeyDictionary[AttemptContext, Span] = weakref.WeakKeyDictionary()

    def middleware(self, call_next: CallNext, session: Session, task: Task) -> object:
        ctx = current_attempt()
        self.started.add(1, {ATTR_KIND: ctx.kind, ATTR_QUEUE: ctx.queue})
        span = self.tracer.start_span(
            f"run {ctx.kind}",
            kind=SpanKind.CONSUMER,
            links=_links(task.trace_context),
            attributes={
                "messaging.system": "pgotask",
                "messaging.operation.type": "process",
                "messaging.operation.name": "run",
                "messaging.destination.name": ctx.queue,
                "messaging.message.id": str(ctx.task_id),
                ATTR_KIND: ctx.kind,
                ATTR_QUEUE: ctx.queue,
                ATTR_ATTEMPT: ctx.attempt,
            },
        )
        self._spans[ctx] = span
        # Exceptions are recorded with the outcome: a Snooze is no error.
        with trace.use_span(
            span, end_on_exit=False, record_exception=False, set_status_on_exception=False
        ):
            # The handler's writes are flushed inside call_next (see
            # middleware.compose): the tasks it adds record this span.
            return call_next(session, task)

    def on_outcome(
        self, ctx: AttemptContext, outcome: Outcome, error: BaseException | None
    ) -> None:
        attributes = {ATTR_KIND: ctx.kind, ATTR_QUEUE: ctx.queue, ATTR_OUTCOME: outcome.value}
        self.finished.add(1, attributes)
        if ctx.duration is not None:
            self.duration.record(ctx.duration, attributes)
        span = self._spans.pop(ctx, None)
        if span is None:  # its handler never ran (cancelled or lost before it started)
            return
        span.set_attribute(ATTR_OUTCOME, outcome.value)
        if outcome in _ERRORS:
            if error is not None:
                span.record_exception(error)
                span.set_attribute("error.type", qualified_name(type(error)))
                description = f"{type(error).__name__}: {error}"
            else:
                description = f"the attempt's outcome is {outcome.value}"
            span.set_status(Status(StatusCode.ERROR, description))
        span.end()


class _QueueGauges:
    """The ``pgotask.queue.tasks`` and ``pgotask.queue.oldest_due_age`` gauges."""

    def __init__(self, meter: metrics.Meter, reader: QueueDepthReader) -> None:
        self.reader = reader
        meter.create_observable_gauge(
            "pgotask.queue.tasks",
            callbacks=[self.tasks],
            unit="{task}",
            description="Live tasks per queue, kind and state (due, scheduled, running).",
        )
        meter.create_observable_gauge(
            "pgotask.worker.stuck_slots",
            callbacks=[self.stuck_slots],
            unit="{thread}",
            description="Handler threads of each worker stuck in a handler far past its timeout.",
        )
        meter.create_observable_gauge(
            "pgotask.queue.oldest_due_age",
            callbacks=[self.oldest_due_age],
            unit="s",
            description="Seconds the oldest due task has waited past its run_at (0: none due).",
        )

    def tasks(self, options: CallbackOptions) -> Iterable[Observation]:
        for row in self.reader.read():
            for state, count in row.counts().items():
                yield Observation(
                    count, {ATTR_QUEUE: row.queue, ATTR_KIND: row.kind, ATTR_STATE: state}
                )

    def stuck_slots(self, options: CallbackOptions) -> Iterable[Observation]:
        self.reader.read()
        for worker, count in self.reader.stuck_slots().items():
            yield Observation(count, {"pgotask.worker": worker})

    def oldest_due_age(self, options: CallbackOptions) -> Iterable[Observation]:
        for row in self.reader.read():
            yield Observation(row.oldest_due_seconds, {ATTR_QUEUE: row.queue, ATTR_KIND: row.kind})
