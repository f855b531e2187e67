"""What the metrics and tracing integrations cost: draining and enqueueing, with and without.

Drain: each round enqueues ``--n`` no-op tasks with ``add_many`` and drains
them with ``run_until_idle(batch_size=100)`` (100 tasks per claim and
per commit, so the per-task costs show) of one of three schedulers, in turn: bare,
instrumented for Prometheus (its own registry), and instrumented with
OpenTelemetry (the SDK, a batch span processor with an exporter that drops
the spans, and a metric reader).  Enqueue: ``--n`` tasks added with
``session.add`` inside a span, with and without ``otel.instrument_enqueue()``
(which writes the trace context in each row).  The report gives tasks/s at
the median over the rounds and the time ratios against the bare runs of the
same rounds (the machine is shared and noisy: only ratios mean anything).

    .venv/bin/python benchmarks/instrumentation_overhead.py [--n 5000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import Scheduler, Task, add_many, otel, prometheus
from sqla_pgotask.migrate import upgrade

DEFAULT_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DATABASE = "pgotask_bench_instrumentation"


class _DropSpans(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _scheduler(factory: sessionmaker[Session]) -> Scheduler:
    scheduler = Scheduler(factory, retention=None)

    @scheduler.handler("noop")
    def noop(session: Session, task: Task) -> None:
        pass

    return scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default=DEFAULT_SERVER, help="server URL (any database)")
    parser.add_argument("--n", type=int, default=5000, help="tasks per operation")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    admin = create_engine(args.server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"))
        conn.execute(text(f"CREATE DATABASE {DATABASE}"))
    url = make_url(args.server).set(database=DATABASE)
    engine: Engine = create_engine(url)
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(_DropSpans()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    tracer = tracer_provider.get_tracer("bench")
    try:
        upgrade(engine)
        factory = sessionmaker(engine)
        bare, with_prometheus, with_otel = (_scheduler(factory) for _ in range(3))
        prometheus.instrument(with_prometheus, registry=CollectorRegistry())
        otel.instrument(
            with_otel,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            propagate_context=False,
        )

        def drain(scheduler: Scheduler) -> Callable[[], float]:
            def run() -> float:
                with factory.begin() as session:
                    add_many(session, "noop", [None] * args.n)
                start = time.perf_counter()
                assert scheduler.run_until_idle(batch_size=100) == args.n
                return time.perf_counter() - start

            return run

        def enqueue(traced: bool) -> Callable[[], float]:
            def run() -> float:
                if traced:
                    otel.instrument_enqueue()
                try:
                    start = time.perf_counter()
                    with tracer.start_as_current_span("request"), factory.begin() as session:
                        session.add_all([Task(kind="other") for _ in range(args.n)])
                    return time.perf_counter() - start
                finally:
                    otel.uninstrument_enqueue()

            return run

        variants = {
            "drain, bare": drain(bare),
            "drain, prometheus": drain(with_prometheus),
            "drain, otel": drain(with_otel),
            "session.add, bare": enqueue(False),
            "session.add, trace context": enqueue(True),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, run in variants.items():
                times[name].append(run())
            with engine.begin() as conn:
                conn.execute(text("TRUNCATE pgotask_task CASCADE"))
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        for name, median in medians.items():
            print(f"{name:28s} {args.n / median:9.0f} tasks/s")
        for name in ("drain, prometheus", "drain, otel"):
            print(f"{name}: time / bare = {medians[name] / medians['drain, bare']:.2f}")
        ratio = medians["session.add, trace context"] / medians["session.add, bare"]
        print(f"session.add: time with trace context / without = {ratio:.2f}")
    finally:
        tracer_provider.shutdown()
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"))
        admin.dispose()


if __name__ == "__main__":
    main()
