"""The Scheduler and its handler: ``pgotask worker examples.flask_app.tasks:scheduler``."""

from __future__ import annotations

import logging

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sqla_pgotask import Scheduler, Task

from .models import SessionLocal, Signup

log = logging.getLogger(__name__)

scheduler = Scheduler(SessionLocal, concurrency=2, poll_interval=0.5)


def send_email(to: str, subject: str) -> None:
    """Stand-in for the app's mail client."""
    log.info("sending %r to %s", subject, to)


@scheduler.handler("send_welcome", max_attempts=5)
def send_welcome(session: Session, task: Task) -> object:
    """Send the welcome email and mark the signup: the mark commits with the task's success."""
    signup = session.scalar(select(Signup).where(Signup.email == task.payload["email"]))
    if signup is None:  # deleted since: nothing to do
        return {"skipped": "no such signup"}
    if signup.welcome_sent_at is not None:  # a repeated attempt (at-least-once)
        return {"skipped": "already sent"}
    # The email may go out twice if the worker dies right after this line; the
    # check above makes every later attempt a no-op once this commit landed.
    send_email(signup.email, "Welcome!")
    signup.welcome_sent_at = func.now()
    return {"sent_to": signup.email}
