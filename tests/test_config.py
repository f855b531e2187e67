"""Configuration errors are precise and early; retry strategies compute what they say."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import (
    ConfigurationError,
    ConstantBackoff,
    ExponentialBackoff,
    Scheduler,
    Task,
    UnknownKindError,
)
from sqla_pgotask.config.retry import CallableBackoff, as_strategy


@pytest.fixture
def factory() -> sessionmaker[Session]:
    # Nothing here connects: create_engine is lazy.
    return sessionmaker(create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none"))


def noop(session: Session, task: Task) -> None:
    pass


def test_scheduler_needs_a_sessionmaker() -> None:
    with pytest.raises(ConfigurationError, match="sessionmaker"):
        Scheduler(object())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"concurrency": 0}, "concurrency must be an integer >= 1"),
        ({"concurrency": True}, "concurrency"),
        ({"queues": "emails"}, "not a string"),
        ({"queues": []}, "non-empty queue names"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"lease_seconds": -1}, "lease_seconds"),
    ],
)
def test_bad_scheduler_settings(
    factory: sessionmaker[Session], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Scheduler(factory, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 0}, "max_attempts must be an integer >= 1"),
        ({"max_attempts": 1.5}, "max_attempts"),
        ({"retry": "soon"}, "retry must be"),
        ({"retry": True}, "retry must be"),
        ({"queue": ""}, "queue must be"),
        ({"non_retryable": (ValueError, "x")}, "non_retryable"),
    ],
)
def test_bad_handler_settings(
    factory: sessionmaker[Session], kwargs: dict[str, object], message: str
) -> None:
    scheduler = Scheduler(factory)
    with pytest.raises(ConfigurationError, match=message):
        scheduler.handler("k", **kwargs)(noop)  # type: ignore[arg-type]


def test_kind_registered_twice(factory: sessionmaker[Session]) -> None:
    scheduler = Scheduler(factory)
    scheduler.handler("k")(noop)
    with pytest.raises(ConfigurationError, match="already registered"):
        scheduler.handler("k")(noop)
    with pytest.raises(ConfigurationError, match="non-empty string"):
        scheduler.handler("")(noop)


def test_no_handlers(factory: sessionmaker[Session]) -> None:
    with pytest.raises(ConfigurationError, match="no handlers"):
        Scheduler(factory).run_until_idle()


def test_handler_object_builds_tasks_and_stays_callable(factory: sessionmaker[Session]) -> None:
    scheduler = Scheduler(factory)
    calls: list[int] = []

    @scheduler.handler("send", queue="emails", max_attempts=7)
    def send(session: Session, task: Task) -> int:
        calls.append(1)
        return 42

    task = send.task({"to": "a"}, priority=3, dedup_key="a")
    assert (task.kind, task.queue, task.payload, task.priority, task.dedup_key) == (
        "send",
        "emails",
        {"to": "a"},
        3,
        "a",
    )
    assert send.task(queue="other").queue == "other"
    assert scheduler.task("send", {"x": 1}).queue == "emails"
    assert send(None, task) == 42  # type: ignore[arg-type]
    assert scheduler.handlers["send"].max_attempts == 7
    with pytest.raises(UnknownKindError, match="no handler is registered for task kind 'nope'"):
        scheduler.task("nope")


def test_exponential_backoff_bounds() -> None:
    strategy = ExponentialBackoff(base=2, factor=3, max_delay=100, jitter=0.5)
    for _ in range(50):
        assert 1.0 <= strategy.delay(1) <= 2.0
        assert 9.0 <= strategy.delay(3) <= 18.0
        assert 50.0 <= strategy.delay(10) <= 100.0
        assert 50.0 <= strategy.delay(10_000) <= 100.0
    assert ExponentialBackoff(jitter=0).delay(4) == 8.0
    with pytest.raises(ConfigurationError):
        ExponentialBackoff(jitter=2)
    with pytest.raises(ConfigurationError):
        ExponentialBackoff(factor=0.5)


def test_strategies_from_what_handler_accepts() -> None:
    assert as_strategy(5) == ConstantBackoff(5.0)
    assert as_strategy(None) == ExponentialBackoff()
    assert isinstance(as_strategy(lambda attempt: attempt * 10.0), CallableBackoff)
    assert as_strategy(lambda attempt: -1.0).delay(1) == 0.0
    with pytest.raises(ConfigurationError):
        ConstantBackoff(-1)
