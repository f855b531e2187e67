"""The one claim → run → settle loop, which every runner drives.

:class:`TaskLoop` puts the parts together: a :class:`~.claims.ClaimSource`
(plain or limited) claims, a :class:`~.run.BatchRunner` runs the claimed
tasks in batches and settles each batch in its transaction (:mod:`.settle`).
The threaded worker's handler threads each drive one (claiming for
themselves, so a CPU-bound handler never waits for another thread to hand it
work); ``Scheduler.run_until_idle()`` and ``testing.drain()`` drive one in
the caller's thread with :meth:`TaskLoop.run_until_idle`.  What differs
between them is only what they do around it: waiting, counting, reporting.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from sqla_pgotask.config.handlers import Handler
from sqla_pgotask.context import AttemptContext, Outcome
from sqla_pgotask.engine.claims import ClaimSource
from sqla_pgotask.engine.rows import Claimed
from sqla_pgotask.engine.run import BatchLostError, BatchRunner, Item, new_context

Outcomes = list[tuple[AttemptContext, Outcome]]


class TaskLoop:
    """Claims from ``source`` and runs what it claimed with ``runner``."""

    def __init__(
        self, source: ClaimSource, runner: BatchRunner, handlers: Mapping[str, Handler]
    ) -> None:
        self.source = source
        self.runner = runner
        self.handlers = handlers

    def claim(self, limit: int) -> tuple[list[Item], Claimed]:
        """Claim up to ``limit`` tasks; each with the context of its attempt, and the claim."""
        tasks = self.source.claim(limit)
        handlers = self.handlers
        return [(task, new_context(task, handlers[task.kind])) for task in tasks], tasks

    def run(
        self,
        items: Sequence[Item],
        *,
        on_outcomes: Callable[[Outcomes], None] | None = None,
        on_start: Callable[[AttemptContext], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_stop: Callable[[list[Item]], None] | None = None,
        on_lost: Callable[[BatchLostError], None] | None = None,
    ) -> Outcomes:
        """Run ``items`` batch after batch; every outcome, in the order the batches settled.

        ``on_outcomes`` sees each batch's outcomes once it committed.  Once
        ``should_stop()``, the items not started go to ``on_stop`` (to be
        given back) and the loop ends.  If the database fails under a
        batch, ``on_lost`` gets the error (the started attempts, their
        outcome unknown) and the loop goes on with the rest; without
        ``on_lost``, the items not settled are given back and the error
        raised.
        """
        done: Outcomes = []
        rest = list(items)
        runner = self.runner
        while rest:
            if should_stop is not None and should_stop():
                if on_stop is not None:
                    on_stop(rest)
                break
            try:
                outcomes, rest = runner.run_chunk(rest, on_start=on_start, should_stop=should_stop)
            except BatchLostError as lost:
                if on_lost is None:
                    self.give_back(rest)
                    raise
                on_lost(lost)
                rest = lost.rest
                continue
            except BaseException:
                # Interrupted (Ctrl-C): what did not commit goes back (the
                # release is fenced: what did commit is kept).
                self.give_back(rest)
                raise
            self.source.finished(ctx.task_id for ctx, _ in outcomes)
            if on_outcomes is not None:
                on_outcomes(outcomes)
            done += outcomes
        return done

    def run_until_idle(
        self,
        *,
        batch_size: int,
        max_tasks: int | None = None,
        on_outcomes: Callable[[Outcomes], None] | None = None,
        when_idle: Callable[[], bool] | None = None,
    ) -> int:
        """Claim and run until nothing is due; return how many attempts ran.

        At most ``batch_size`` tasks per claim and ``max_tasks`` attempts in
        all.  ``when_idle()``, called when a claim found nothing, may make
        more due and return ``True`` to go on.
        """
        count = 0
        while max_tasks is None or count < max_tasks:
            limit = batch_size if max_tasks is None else min(batch_size, max_tasks - count)
            items, claimed = self.claim(limit)
            if not items:
                if claimed.refused:  # the claim took only tasks that cannot run (now failed)
                    continue
                if when_idle is not None and when_idle():
                    continue
                break
            try:
                outcomes = self.run(items, on_outcomes=on_outcomes)
            except BatchLostError as lost:
                raise lost.cause from None
            count += len(outcomes)
        return count

    def give_back(self, items: Sequence[Item]) -> int:
        """Claimed tasks that will not run here: back to pending, attempt refunded."""
        return self.runner.release([(task.id, ctx.attempt) for task, ctx in items])
