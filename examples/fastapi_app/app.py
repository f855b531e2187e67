"""The FastAPI application: ``uvicorn examples.fastapi_app.app:app``.

Path functions are plain ``def`` (FastAPI runs them in its thread pool) and
take a sync Session from :func:`get_session`: one transaction per request,
committed when the path function returns and rolled back when it raises
(``HTTPException`` included).  ``scope="function"`` makes that happen before
the response is sent, so a failing commit is a 500, never a 201 for a row
that does not exist.  The order and its ``send_receipt`` task are in that
transaction: a request that fails enqueues nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel, Field
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sqla_pgotask import Task

from .models import Order, SessionLocal


def get_session() -> Iterator[Session]:
    """This request's Session and transaction: commit on return, roll back on an exception."""
    with SessionLocal.begin() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


class OrderIn(BaseModel):
    """What a client posts to create an order."""

    reference: str = Field(min_length=1, max_length=64)
    email: str = Field(pattern=r".+@.+")
    total_cents: int = Field(ge=0)


class OrderOut(BaseModel):
    """An order as the API shows it."""

    id: int
    reference: str
    email: str
    total_cents: int
    receipt_sent: bool

    @classmethod
    def of(cls, order: Order) -> OrderOut:
        """The API's view of ``order``."""
        return cls(
            id=order.id,
            reference=order.reference,
            email=order.email,
            total_cents=order.total_cents,
            receipt_sent=order.receipt_sent_at is not None,
        )


class OrderCreated(OrderOut):
    """A new order, with the id of the task that sends its receipt."""

    task_id: int


def create_app() -> FastAPI:
    """The application and its routes."""
    app = FastAPI(title="sqla_pgotask FastAPI example")

    @app.post("/orders", status_code=201)
    def create_order(body: OrderIn, session: SessionDep) -> OrderCreated:
        order = Order(reference=body.reference, email=body.email, total_cents=body.total_cents)
        task = Task(kind="send_receipt", payload={"reference": body.reference})
        session.add_all([order, task])
        try:
            session.flush()  # both INSERTs; a second order with a reference fails here
        except IntegrityError:
            # Raising rolls the request's transaction back: the task added
            # above is gone with the order.
            raise HTTPException(409, f"order {body.reference} exists") from None
        return OrderCreated(**OrderOut.of(order).model_dump(), task_id=task.id)

    @app.get("/orders/{order_id}")
    def get_order(order_id: int, session: SessionDep) -> OrderOut:
        order = session.get(Order, order_id)
        if order is None:
            raise HTTPException(404, "no such order")
        return OrderOut.of(order)

    return app


app = create_app()
