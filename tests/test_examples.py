"""The example apps in examples/: Flask and FastAPI, each enqueueing in its request transaction.

The apps run in-process (Flask's test client, FastAPI's ``TestClient``)
against this test's own database; their ``SessionLocal`` is rebound to it for
the test.  The slow tests run the real ``pgotask worker`` on each example's
scheduler, configured as in production, by ``DATABASE_URL``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from flask import Flask
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from examples.fastapi_app import app as fastapi_app
from examples.fastapi_app import models as fastapi_models
from examples.fastapi_app import tasks as fastapi_tasks
from examples.flask_app import app as flask_app
from examples.flask_app import models as flask_models
from examples.flask_app import tasks as flask_tasks
from sqla_pgotask import Task, TaskStatus
from tests.helpers import wait_until
from tests.helpers.processes import pgotask_worker


def all_tasks(engine: Engine) -> list[Task]:
    """Every task in the database, oldest first."""
    with Session(engine) as session:
        return list(session.scalars(select(Task).order_by(Task.id)))


@pytest.fixture
def flask_db(engine: Engine) -> Iterator[Engine]:
    """The Flask example's tables in this test's database, and its sessionmaker bound to it."""
    flask_models.init_db(engine)
    flask_models.SessionLocal.configure(bind=engine)
    yield engine
    flask_models.SessionLocal.configure(bind=flask_models.engine)


@pytest.fixture
def fastapi_db(engine: Engine) -> Iterator[Engine]:
    """The FastAPI example's tables in this test's database, and its sessionmaker bound to it."""
    fastapi_models.init_db(engine)
    fastapi_models.SessionLocal.configure(bind=engine)
    yield engine
    fastapi_models.SessionLocal.configure(bind=fastapi_models.engine)


# -- Flask ---------------------------------------------------------------------


def test_flask_signup_enqueues_and_the_handler_marks_it(flask_db: Engine) -> None:
    client = flask_app.create_app().test_client()

    created = client.post("/signups", json={"email": "ada@example.com"})

    assert created.status_code == 201, created.text
    body = created.get_json()
    assert body["email"] == "ada@example.com"
    assert body["welcome_sent"] is False
    [task] = all_tasks(flask_db)
    assert (task.id, task.kind, task.status) == (body["task_id"], "send_welcome", "pending")
    assert task.payload == {"email": "ada@example.com"}
    with Session(flask_db) as session:
        signup = session.get(flask_models.Signup, body["id"])
        assert signup is not None
        assert signup.welcome_sent_at is None

    assert flask_tasks.scheduler.run_until_idle() == 1

    assert client.get(f"/signups/{body['id']}").get_json()["welcome_sent"] is True
    [task] = all_tasks(flask_db)
    assert task.status == TaskStatus.SUCCEEDED
    assert task.result == {"sent_to": "ada@example.com"}


def test_flask_duplicate_signup_enqueues_nothing(flask_db: Engine) -> None:
    client = flask_app.create_app().test_client()
    assert client.post("/signups", json={"email": "ada@example.com"}).status_code == 201

    again = client.post("/signups", json={"email": "ada@example.com"})

    assert again.status_code == 409
    assert len(all_tasks(flask_db)) == 1
    assert client.post("/signups", json={"email": "bob@example.com"}).status_code == 201
    assert [t.payload["email"] for t in all_tasks(flask_db)] == [
        "ada@example.com",
        "bob@example.com",
    ]


def test_flask_view_raising_after_adding_the_task_leaves_nothing(flask_db: Engine) -> None:
    app: Flask = flask_app.create_app()

    @app.post("/broken")
    def broken() -> str:
        session = flask_app.db_session()
        session.add(flask_models.Signup(email="ada@example.com"))
        session.add(Task(kind="send_welcome", payload={"email": "ada@example.com"}))
        session.flush()  # the rows are in the transaction, not yet committed
        raise RuntimeError("after the task was added")

    response = app.test_client().post("/broken")

    assert response.status_code == 500
    assert all_tasks(flask_db) == []
    with Session(flask_db) as session:
        assert session.scalars(select(flask_models.Signup)).all() == []
    assert flask_tasks.scheduler.run_until_idle() == 0


def test_flask_rejects_a_bad_body(flask_db: Engine) -> None:
    client = flask_app.create_app().test_client()

    assert client.post("/signups", json={"name": "ada"}).status_code == 400
    assert client.get("/signups/1").status_code == 404
    assert all_tasks(flask_db) == []


@pytest.mark.slow
def test_flask_worker_process_runs_the_task(
    flask_db: Engine, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)  # how the worker finds the database
    client = flask_app.create_app().test_client()
    with pgotask_worker(
        database_url, tmp_path, scheduler="examples.flask_app.tasks:scheduler"
    ) as worker:
        worker.wait_started()
        signup_id = client.post("/signups", json={"email": "ada@example.com"}).get_json()["id"]

        wait_until(
            lambda: client.get(f"/signups/{signup_id}").get_json()["welcome_sent"],
            30,
            message="the worker to send the welcome email",
        )
    [task] = all_tasks(flask_db)
    assert task.status == TaskStatus.SUCCEEDED


# -- FastAPI -------------------------------------------------------------------

ORDER = {"reference": "A-1001", "email": "ada@example.com", "total_cents": 4200}


def test_fastapi_order_enqueues_and_the_handler_marks_it(fastapi_db: Engine) -> None:
    client = TestClient(fastapi_app.create_app())

    created = client.post("/orders", json=ORDER)

    assert created.status_code == 201, created.text
    body = created.json()
    assert body["reference"] == "A-1001"
    assert body["receipt_sent"] is False
    [task] = all_tasks(fastapi_db)
    assert (task.id, task.kind, task.status) == (body["task_id"], "send_receipt", "pending")
    assert task.payload == {"reference": "A-1001"}
    with Session(fastapi_db) as session:
        order = session.get(fastapi_models.Order, body["id"])
        assert order is not None
        assert (order.total_cents, order.receipt_sent_at) == (4200, None)

    assert fastapi_tasks.scheduler.run_until_idle() == 1

    assert client.get(f"/orders/{body['id']}").json()["receipt_sent"] is True
    [task] = all_tasks(fastapi_db)
    assert task.status == TaskStatus.SUCCEEDED
    assert task.result == {"sent_to": "ada@example.com"}


def test_fastapi_duplicate_order_enqueues_nothing(fastapi_db: Engine) -> None:
    client = TestClient(fastapi_app.create_app())
    assert client.post("/orders", json=ORDER).status_code == 201

    again = client.post("/orders", json={**ORDER, "email": "eve@example.com"})

    assert again.status_code == 409
    [task] = all_tasks(fastapi_db)
    assert task.payload == {"reference": "A-1001"}
    assert fastapi_tasks.scheduler.run_until_idle() == 1


def test_fastapi_path_raising_after_adding_the_task_leaves_nothing(fastapi_db: Engine) -> None:
    app = fastapi_app.create_app()

    @app.post("/broken")
    def broken(session: fastapi_app.SessionDep) -> None:
        session.add(fastapi_models.Order(reference="A-1", email="ada@example.com", total_cents=1))
        session.add(Task(kind="send_receipt", payload={"reference": "A-1"}))
        session.flush()  # the rows are in the transaction, not yet committed
        raise RuntimeError("after the task was added")

    response = TestClient(app, raise_server_exceptions=False).post("/broken")

    assert response.status_code == 500
    assert all_tasks(fastapi_db) == []
    with Session(fastapi_db) as session:
        assert session.scalars(select(fastapi_models.Order)).all() == []
    assert fastapi_tasks.scheduler.run_until_idle() == 0


def test_fastapi_rejects_a_bad_body(fastapi_db: Engine) -> None:
    client = TestClient(fastapi_app.create_app())

    assert client.post("/orders", json={**ORDER, "total_cents": -1}).status_code == 422
    assert client.get("/orders/1").status_code == 404
    assert all_tasks(fastapi_db) == []


@pytest.mark.slow
def test_fastapi_worker_process_runs_the_task(
    fastapi_db: Engine, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)  # how the worker finds the database
    client = TestClient(fastapi_app.create_app())
    with pgotask_worker(
        database_url, tmp_path, scheduler="examples.fastapi_app.tasks:scheduler"
    ) as worker:
        worker.wait_started()
        order_id = client.post("/orders", json=ORDER).json()["id"]

        wait_until(
            lambda: client.get(f"/orders/{order_id}").json()["receipt_sent"],
            30,
            message="the worker to send the receipt",
        )
    [task] = all_tasks(fastapi_db)
    assert task.status == TaskStatus.SUCCEEDED


def test_session_factories_are_the_apps_own() -> None:
    assert isinstance(flask_models.SessionLocal, sessionmaker)
    assert flask_tasks.scheduler.session_factory is flask_models.SessionLocal
    assert fastapi_tasks.scheduler.session_factory is fastapi_models.SessionLocal
