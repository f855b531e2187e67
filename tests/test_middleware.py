"""Middleware around handler attempts, outcome hooks, and the fields of the worker's log records."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import (
    AttemptContext,
    ConfigurationError,
    NonRetryableError,
    Outcome,
    Scheduler,
    Snooze,
    Task,
    TaskCancelledError,
    TaskStatus,
    current_attempt,
)
from sqla_pgotask.engine import run as _execute
from sqla_pgotask.middleware import CallNext
from sqla_pgotask.testing import drain
from tests.helpers import Ledger, add_tasks, get_task, ledger_ids, running, wait_until

Seen = list[tuple[int, Outcome, BaseException | None]]


@pytest.mark.parametrize("batch_size", [1, 10])
def test_middleware_wraps_each_attempt_in_its_transaction_and_order(
    app: sessionmaker[Session], batch_size: int
) -> None:
    trail: list[str] = []

    def outer(call_next: CallNext, session: Session, task: Task) -> object:
        assert current_attempt().task_id == task.id
        trail.append(f"outer>{task.kind}")
        # The middleware's writes are the attempt's: they commit with it, or not at all.
        session.add(Ledger(task_id=task.id, note="middleware"))
        try:
            return call_next(session, task)
        finally:
            trail.append(f"outer<{task.kind}")

    scheduler = Scheduler(app, middleware=[outer])

    @scheduler.middleware
    def inner(call_next: CallNext, session: Session, task: Task) -> object:
        trail.append(f"inner>{task.kind}")
        result = call_next(session, task)
        return {"wrapped": result}

    @scheduler.handler("ok")
    def ok(session: Session, task: Task) -> object:
        trail.append("handler")
        return 1

    @scheduler.handler("boom", max_attempts=1)
    def boom(session: Session, task: Task) -> object:
        raise RuntimeError("boom")

    ok_id, boom_id = add_tasks(app, Task(kind="ok"), Task(kind="boom"))
    assert scheduler.run_until_idle(batch_size=batch_size) == 2
    assert trail[:5] == ["outer>ok", "inner>ok", "handler", "outer<ok", "outer>boom"]
    assert get_task(app, ok_id).result == {"wrapped": 1}
    assert get_task(app, boom_id).status is TaskStatus.FAILED
    assert ledger_ids(app) == [ok_id]  # the failed attempt's middleware write rolled back


@pytest.mark.parametrize(
    ("exc", "status", "outcome"),
    [
        (Snooze(60), TaskStatus.PENDING, Outcome.SNOOZED),
        (TaskCancelledError("stop"), TaskStatus.CANCELLED, Outcome.CANCELLED),
        (NonRetryableError("bad"), TaskStatus.FAILED, Outcome.FAILED),
        (ValueError("again"), TaskStatus.PENDING, Outcome.RETRY),
    ],
)
def test_middleware_sees_exceptions_and_hooks_see_the_committed_outcome(
    app: sessionmaker[Session], exc: Exception, status: TaskStatus, outcome: Outcome
) -> None:
    seen_by_middleware: list[BaseException] = []
    outcomes: Seen = []
    scheduler = Scheduler(app)

    @scheduler.middleware
    def watch(call_next: CallNext, session: Session, task: Task) -> object:
        try:
            return call_next(session, task)
        except Exception as error:
            seen_by_middleware.append(error)
            raise

    @scheduler.on_outcome
    def record(ctx: AttemptContext, result: Outcome, error: BaseException | None) -> None:
        assert ctx.duration is not None and ctx.duration >= 0
        outcomes.append((ctx.task_id, result, error))

    @scheduler.handler("k", max_attempts=3)
    def k(session: Session, task: Task) -> None:
        raise exc

    (task_id,) = add_tasks(app, Task(kind="k"))
    scheduler.run_until_idle()
    assert seen_by_middleware == [exc]  # unchanged, and the worker treats it as usual
    assert get_task(app, task_id).status is status
    assert outcomes == [(task_id, outcome, exc)]


def test_outcome_hooks_run_after_commit_and_their_errors_are_logged(
    app: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    statuses: list[TaskStatus] = []

    def broken(ctx: AttemptContext, outcome: Outcome, error: BaseException | None) -> None:
        raise RuntimeError("hook bug")

    def check_committed(ctx: AttemptContext, outcome: Outcome, error: BaseException | None) -> None:
        # Another connection already sees the outcome: the hook runs after the commit.
        statuses.append(get_task(app, ctx.task_id).status)

    scheduler = Scheduler(app, on_outcome=[broken, check_committed])

    @scheduler.handler("ok")
    def ok(session: Session, task: Task) -> None:
        pass

    add_tasks(app, Task(kind="ok"), Task(kind="ok"))
    with caplog.at_level(logging.ERROR, logger="sqla_pgotask.worker"):
        assert scheduler.run_until_idle(batch_size=10) == 2
    assert statuses == [TaskStatus.SUCCEEDED] * 2
    errors = [r for r in caplog.records if r.getMessage().startswith("outcome hook")]
    assert len(errors) == 2 and errors[0].exc_info is not None


def test_middleware_runs_in_a_worker_and_in_drain(app: sessionmaker[Session]) -> None:
    kinds: list[str] = []
    scheduler = Scheduler(app, poll_interval=0.1)

    @scheduler.middleware
    def note(call_next: CallNext, session: Session, task: Task) -> object:
        kinds.append(task.kind)
        return call_next(session, task)

    @scheduler.handler("ok")
    def ok(session: Session, task: Task) -> None:
        pass

    with running(scheduler):
        add_tasks(app, Task(kind="ok"))
        wait_until(lambda: kinds == ["ok"])
    with app() as session:
        session.add(Task(kind="ok"))
        session.flush()
        assert drain(scheduler, session).succeeded == 1
    assert kinds == ["ok", "ok"]


def test_middleware_and_hooks_must_be_callable(app: sessionmaker[Session]) -> None:
    with pytest.raises(ConfigurationError, match="middleware must be callable"):
        Scheduler(app, middleware=["nope"])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match="on_outcome hook must be callable"):
        Scheduler(app).on_outcome(42)  # type: ignore[arg-type]


def test_task_log_records_carry_structured_fields(
    app: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    scheduler = Scheduler(app)

    @scheduler.handler("ok", queue="mail")
    def ok(session: Session, task: Task) -> None:
        pass

    @scheduler.handler("boom", max_attempts=2)
    def boom(session: Session, task: Task) -> None:
        raise RuntimeError("boom")

    ok_id, boom_id = add_tasks(app, Task(kind="ok", queue="mail"), Task(kind="boom"))
    # caplog's handler on the worker's logger object itself, at INFO: other
    # tests may have reconfigured logging (the CLI's basicConfig, Alembic's
    # fileConfig) in this process.
    worker_logger = _execute.logger
    level = worker_logger.level
    worker_logger.addHandler(caplog.handler)
    worker_logger.setLevel(logging.INFO)
    caplog.handler.setLevel(logging.INFO)
    try:
        scheduler.run_until_idle(queues=["mail", "default"])
    finally:
        worker_logger.removeHandler(caplog.handler)
        worker_logger.setLevel(level)
    records = [r.__dict__ for r in caplog.records if hasattr(r, "task_id")]
    by_task = {(r["task_id"], r["levelno"]): r for r in records}
    done = by_task[(ok_id, logging.INFO)]
    assert [done[f] for f in ("kind", "attempt", "queue", "outcome")] == [
        "ok",
        1,
        "mail",
        "succeeded",
    ]
    assert isinstance(done["duration"], float) and done["duration"] >= 0
    failed = by_task[(boom_id, logging.WARNING)]
    assert [failed[f] for f in ("kind", "attempt", "queue", "outcome", "error_type")] == [
        "boom",
        1,
        "default",
        "retry",
        "RuntimeError",
    ]
    assert isinstance(failed["duration"], float)
    assert (boom_id, logging.INFO) in by_task  # the outcome record, after the commit
    for record in records:  # every record about a task has the same fields
        for name in ("task_id", "kind", "attempt", "queue", "outcome", "duration"):
            assert name in record, (record["msg"], name)
