"""Deduplication: adding a task whose (kind, dedup_key) is live is a no-op, or a debounce."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import Scheduler, Task, TaskStatus, add_many


def _live(session: Session, kind: str = "k") -> list[Task]:
    return list(
        session.scalars(
            select(Task)
            .where(Task.kind == kind, Task.status.in_([TaskStatus.PENDING, TaskStatus.RUNNING]))
            .order_by(Task.id)
        )
    )


def test_duplicate_add_is_a_no_op_and_the_transaction_goes_on(session: Session) -> None:
    first = Task(kind="k", dedup_key="user:7", payload={"n": 1})
    session.add(first)
    session.flush()
    duplicate = Task(kind="k", dedup_key="user:7", payload={"n": 2})
    session.add(duplicate)
    session.flush()  # no IntegrityError
    # The transaction is usable: more work in it succeeds.
    session.add(Task(kind="k", dedup_key="user:8"))
    session.flush()

    assert [t.dedup_key for t in _live(session)] == ["user:7", "user:8"]
    session.refresh(first)
    assert first.payload == {"n": 1}  # ignored: the original is untouched
    assert duplicate.status is TaskStatus.CANCELLED
    assert duplicate.duplicate_of == first.id
    assert duplicate.result == {"duplicate_of": first.id, "replaced": False}
    assert duplicate.finished_at is not None


def test_keys_are_per_kind_and_tasks_without_a_key_never_collide(session: Session) -> None:
    session.add_all(
        [
            Task(kind="a", dedup_key="x"),
            Task(kind="b", dedup_key="x"),
            Task(kind="a"),
            Task(kind="a"),
        ]
    )
    session.flush()
    pending = session.scalar(
        select(func.count()).select_from(Task).where(Task.status == TaskStatus.PENDING)
    )
    assert pending == 4


def test_a_duplicate_of_a_running_task_is_a_no_op(session: Session) -> None:
    first = Task(kind="k", dedup_key="d")
    session.add(first)
    session.flush()
    session.execute(
        text(
            "UPDATE pgotask_task SET status = 'running', locked_by = 'w', "
            "lease_expires_at = now() WHERE id = :id"
        ),
        {"id": first.id},
    )
    duplicate = Task(kind="k", dedup_key="d", on_duplicate="replace", payload={"new": True})
    session.add(duplicate)
    session.flush()
    assert duplicate.duplicate_of == first.id
    assert duplicate.result == {"duplicate_of": first.id, "replaced": False}


def test_the_key_is_free_once_the_task_finished(session: Session) -> None:
    for status in ("succeeded", "failed", "cancelled"):
        task = Task(kind=f"k-{status}", dedup_key="d")
        session.add(task)
        session.flush()
        session.execute(
            text("UPDATE pgotask_task SET status = :s WHERE id = :id"), {"s": status, "id": task.id}
        )
        again = Task(kind=f"k-{status}", dedup_key="d")
        session.add(again)
        session.flush()
        assert again.status is TaskStatus.PENDING
        assert again.duplicate_of is None


def test_replace_debounces_the_pending_task(session: Session) -> None:
    now: dt.datetime = session.execute(select(func.now())).scalar_one()
    soon = now + dt.timedelta(seconds=5)
    first = Task(kind="k", dedup_key="doc:1", payload={"v": 1}, run_at=soon)
    session.add(first)
    session.flush()
    later = soon + dt.timedelta(seconds=30)
    update = Task(
        kind="k",
        dedup_key="doc:1",
        payload={"v": 2},
        run_at=later,
        priority=3,
        queue="other",
        max_attempts=9,
        on_duplicate="replace",
    )
    session.add(update)
    session.flush()
    session.refresh(first)
    assert (first.payload, first.run_at, first.priority, first.queue, first.max_attempts) == (
        {"v": 2},
        later,
        3,
        "other",
        9,
    )
    assert first.status is TaskStatus.PENDING
    assert update.duplicate_of == first.id
    assert update.result == {"duplicate_of": first.id, "replaced": True}


def test_plain_sql_duplicates_are_no_ops_too(session: Session) -> None:
    insert = text(
        "INSERT INTO pgotask_task (kind, dedup_key, payload, on_duplicate) "
        "VALUES ('k', 'd', CAST(:p AS jsonb), :mode) RETURNING id, status"
    )
    first = session.execute(insert, {"p": '{"v": 1}', "mode": None}).one()
    dup = session.execute(insert, {"p": '{"v": 2}', "mode": None}).one()
    rep = session.execute(insert, {"p": '{"v": 3}', "mode": "replace"}).one()
    assert (first.status, dup.status, rep.status) == ("pending", "cancelled", "cancelled")
    assert [t.payload for t in _live(session)] == [{"v": 3}]


def test_add_many_deduplicates_within_the_call_and_against_the_table(session: Session) -> None:
    session.add(Task(kind="k", dedup_key="a", payload={"v": 0}))
    session.flush()
    ids = add_many(
        session,
        [
            {"kind": "k", "dedup_key": "a", "payload": {"v": 1}},
            {"kind": "k", "dedup_key": "b", "payload": {"v": 2}},
            {"kind": "k", "dedup_key": "b", "payload": {"v": 3}, "on_duplicate": "replace"},
            {"kind": "k", "dedup_key": "c", "payload": {"v": 4}},
            Task(kind="k", dedup_key="c", payload={"v": 5}),
        ],
        return_ids=True,
    )
    assert len(ids) == 5
    assert [(t.dedup_key, t.payload) for t in _live(session)] == [
        ("a", {"v": 0}),
        ("b", {"v": 3}),
        ("c", {"v": 4}),
    ]


def test_an_unknown_on_duplicate_is_refused_before_anything_is_sent(session: Session) -> None:
    with pytest.raises(ValueError, match="on_duplicate must be 'ignore', 'replace' or None"):
        Task(kind="k", dedup_key="d", on_duplicate="merge")
    with pytest.raises(ValueError, match=r"task 1: on_duplicate must be"):
        add_many(
            session,
            [{"kind": "k", "dedup_key": "d"}, {"kind": "k", "dedup_key": "e", "on_duplicate": 1}],
        )
    assert _live(session) == []


def test_handler_task_takes_on_duplicate(session_factory: sessionmaker[Session]) -> None:
    scheduler = Scheduler(session_factory)

    @scheduler.handler("k")
    def handle(session: Session, task: Task) -> None:
        pass

    task = scheduler.task("k", {"v": 1}, dedup_key="d", on_duplicate="replace")
    assert (task.dedup_key, task.on_duplicate) == ("d", "replace")


@pytest.mark.parametrize("mode", [None, "replace"])
def test_concurrent_duplicate_adds_make_one_task_and_fail_no_transaction(
    session_factory: sessionmaker[Session], mode: str | None
) -> None:
    n = 8
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def add(i: int) -> None:
        try:
            with session_factory.begin() as session:
                session.execute(text("SELECT 1"))  # the transaction has begun
                barrier.wait(timeout=10)
                session.add(Task(kind="k", dedup_key="same", payload={"i": i}, on_duplicate=mode))
                session.flush()
                # The application's own write in the same transaction.
                session.execute(text("SELECT pg_sleep(0.01)"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    with session_factory() as session:
        live = _live(session)
        assert len(live) == 1
        rows: Any = session.execute(
            text("SELECT status, result FROM pgotask_task WHERE id <> :id"), {"id": live[0].id}
        ).all()
        assert len(rows) == n - 1
        assert {status for status, _ in rows} == {"cancelled"}
        assert {result["duplicate_of"] for _, result in rows} == {live[0].id}
        replaced = [result["replaced"] for _, result in rows]
        if mode == "replace":
            # Each add after the first updated the pending task in turn.
            assert replaced == [True] * (n - 1)
            assert live[0].payload["i"] in range(n)
        else:
            assert replaced == [False] * (n - 1)
