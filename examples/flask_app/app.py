"""The Flask application: ``flask --app examples.flask_app.app run``.

Each request gets one Session (in ``flask.g``) and so one transaction.  It
commits when the view returned a response below 400, before the response is
sent, and rolls back otherwise (an error status, an exception).  The signup row
and its ``send_welcome`` task are in that transaction: a request that fails
enqueues nothing.
"""

from __future__ import annotations

from flask import Flask, Response, abort, g, jsonify, request
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sqla_pgotask import Task

from .models import SessionLocal, Signup


def db_session() -> Session:
    """This request's Session, begun on first use."""
    if "db_session" not in g:
        g.db_session = SessionLocal()
    session: Session = g.db_session
    return session


def create_app() -> Flask:
    """The application, with its routes and its per-request transaction."""
    app = Flask(__name__)

    @app.after_request
    def end_transaction(response: Response) -> Response:
        # Runs before the response is sent: a failing commit becomes a 500.
        session: Session | None = g.pop("db_session", None)
        if session is not None:
            with session:
                if response.status_code < 400:
                    session.commit()
                else:
                    session.rollback()
        return response

    @app.teardown_request
    def discard_session(exc: BaseException | None) -> None:
        # Only reached with a session left when the view raised: close() rolls back.
        session: Session | None = g.pop("db_session", None)
        if session is not None:
            session.close()

    @app.post("/signups")
    def create_signup() -> tuple[Response, int]:
        email = (request.get_json(silent=True) or {}).get("email")
        if not isinstance(email, str) or "@" not in email:
            abort(400, description="a JSON body with an 'email' is required")
        session = db_session()
        signup = Signup(email=email)
        task = Task(kind="send_welcome", payload={"email": email})
        session.add_all([signup, task])
        try:
            session.flush()  # both INSERTs; a second signup for an email fails here
        except IntegrityError:
            # The response is an error, so the transaction rolls back: the task
            # added above is gone with the signup.
            abort(409, description=f"{email} already signed up")
        return jsonify({**signup.as_dict(), "task_id": task.id}), 201

    @app.get("/signups/<int:signup_id>")
    def get_signup(signup_id: int) -> Response:
        signup = db_session().get(Signup, signup_id)
        if signup is None:
            abort(404)
        return jsonify(signup.as_dict())

    return app


app = create_app()
