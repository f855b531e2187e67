"""The operator subcommands of ``pgotask``: stats, list, show, retry, cancel, check, enqueue.

The query logic is :mod:`sqla_pgotask.admin`; this module parses arguments
and prints (tables on a terminal, ``--json`` for scripts).  Exit codes are
those of :mod:`sqla_pgotask.cli`; ``check`` exits 1 when a check fails, and
``show``, ``retry ID`` and ``cancel ID`` exit 1 for an id they cannot act on.
See ``docs/operations.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from sqlalchemy import func

from sqla_pgotask._exit_codes import EXIT_ERROR, EXIT_OK, EXIT_SCHEMA, UsageError
from sqla_pgotask.admin import (
    LIVE_STATUSES,
    TaskFilter,
    cancel_tasks,
    get_task,
    health,
    list_tasks,
    queue_stats,
    retry_tasks,
)
from sqla_pgotask.cli.arguments import (
    MAX_BATCH,
    batch_size_option,
    duration,
    int4,
    non_empty,
    payload,
    positive_duration,
    positive_int4,
    positive_seconds,
    queue_name,
    run_at,
    seconds_or_duration,
    shown,
    task_id,
    text,
    whole_number,
)
from sqla_pgotask.cli.database import database_options, sessions
from sqla_pgotask.cli.output import dump_json, terminal_text
from sqla_pgotask.models import Task, TaskStatus

# -- output helpers ----------------------------------------------------------------


def _when(value: dt.datetime | None) -> str:
    return "-" if value is None else value.isoformat(timespec="seconds")


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if not math.isfinite(seconds):  # since -infinity
        return "forever"
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO) -> None:
    cells = [[str(c) for c in headers], *([terminal_text(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


class ProgressBar:
    """A one-line ``\\r`` progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.enabled = self.stream.isatty()
        self.drawn = False

    def __call__(self, done: int, total: int | None = None) -> None:
        if not self.enabled:
            return
        if total is None:  # a total not known in advance: the count so far
            self.stream.write(f"\r{self.label}: {done}")
            self.stream.flush()
            self.drawn = True
            return
        width = 30
        filled = width if total == 0 else width * done // total
        percent = 100 if total == 0 else 100 * done // total
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {done}/{total} ({percent}%)")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def _task_dict(task: Task) -> dict[str, Any]:
    return {
        "id": task.id,
        "kind": task.kind,
        "queue": task.queue,
        "status": task.status.value,
        "priority": task.priority,
        "payload": task.payload,
        "attempts": task.attempts,
        "max_attempts": task.max_attempts,
        "dedup_key": task.dedup_key,
        "run_at": _iso(task.run_at),
        "created_at": _iso(task.created_at),
        "started_at": _iso(task.started_at),
        "finished_at": _iso(task.finished_at),
        "locked_by": task.locked_by,
        "lease_expires_at": _iso(task.lease_expires_at),
        "cancel_requested_at": _iso(task.cancel_requested_at),
        "result": task.result,
        "schedule": task.schedule,
        "slot": _iso(task.slot),
    }


def _attempts(task: Task) -> str:
    return f"{task.attempts}/{'-' if task.max_attempts is None else task.max_attempts}"


def _filter(args: argparse.Namespace, statuses: Sequence[TaskStatus] = ()) -> TaskFilter:
    return TaskFilter(
        statuses=list(dict.fromkeys(statuses or getattr(args, "status", None) or ())),
        kinds=args.kind or (),
        queues=args.queue or (),
        older_than=args.older_than,
    )


# -- commands --------------------------------------------------------------------


def cmd_stats(args: argparse.Namespace) -> int:
    """Task counts per queue and kind, the oldest due task's age, and throughput."""
    with sessions(args) as factory, factory() as session:
        stats = queue_stats(session)
    if args.json:
        print(
            dump_json(
                {
                    "rows": [
                        {k: v for k, v in vars(r).items() if k != "finished_recently"}
                        | {"finished_last_window": r.finished_recently}
                        for r in stats.rows
                    ],
                    "window_seconds": stats.window.total_seconds(),
                    "throughput_per_minute": stats.throughput_per_minute,
                }
            )
        )
        return EXIT_OK
    if not stats.rows:
        print("no tasks")
    else:
        _table(
            [
                "QUEUE",
                "KIND",
                "DUE",
                "LATER",
                "RUNNING",
                "SUCCEEDED",
                "FAILED",
                "CANCELLED",
                "OLDEST DUE",
            ],
            [
                [
                    *(r.queue, r.kind, r.due, r.scheduled, r.running),
                    *(r.succeeded, r.failed, r.cancelled, _age(r.oldest_due_seconds)),
                ]
                for r in stats.rows
            ],
            sys.stdout,
        )
    minutes = stats.window.total_seconds() / 60
    print(f"throughput: {stats.throughput_per_minute:.1f} tasks/min (last {minutes:g} min)")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    """List tasks, newest first, filtered by status, kind, queue and age."""
    with sessions(args) as factory, factory() as session:
        tasks = list_tasks(session, _filter(args), limit=args.limit)
        found = [_task_dict(t) for t in tasks]
        rows = [
            [
                t.id,
                t.kind,
                t.queue,
                t.status.value,
                _attempts(t),
                _when(t.run_at),
                _when(t.finished_at),
            ]
            for t in tasks
        ]
    if args.json:
        print(dump_json(found))
    elif not rows:
        print("no matching tasks")
    else:
        _table(
            ["ID", "KIND", "QUEUE", "STATUS", "ATTEMPTS", "RUN_AT", "FINISHED_AT"], rows, sys.stdout
        )
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    """Show one task: every column, its payload, and each failed attempt with its traceback."""
    with sessions(args) as factory, factory() as session:
        task = get_task(session, args.id)
        if task is None:
            print(f"pgotask: error: no task with id {args.id}", file=sys.stderr)
            return EXIT_ERROR
        columns = _task_dict(task)
        errors: list[dict[str, Any]] = [
            {
                "attempt": e.attempt,
                "exception_type": e.exception_type,
                "message": e.message,
                "traceback": e.traceback,
                "worker": e.worker,
                "created_at": _iso(e.created_at),
            }
            for e in task.errors
        ]
    if args.json:
        print(dump_json(columns | {"errors": errors}))
        return EXIT_OK
    for name, value in columns.items():
        if name in ("payload", "result"):
            continue
        print(f"{name + ':':<21}{'-' if value is None else terminal_text(value)}")
    print("payload:")
    print(_indent(dump_json(columns["payload"], indent=2, sort_keys=True)))
    if columns["result"] is not None:
        print("result:")
        print(_indent(dump_json(columns["result"], indent=2, sort_keys=True)))
    print(f"errors: {len(errors) or 'none'}")
    for error in errors:
        print(
            terminal_text(
                f"  attempt {error['attempt']} at {error['created_at']} on "
                f"{error['worker'] or '-'}: {error['exception_type']}: {error['message']}"
            )
        )
        if error["traceback"]:
            print(_indent(error["traceback"].rstrip("\n"), "    "))
    return EXIT_OK


def _indent(lines: str, prefix: str = "  ") -> str:
    """``lines`` indented, each one safe for a terminal (``\\r`` and the like escaped)."""
    return "\n".join(prefix + terminal_text(line) for line in lines.split("\n"))


def cmd_retry(args: argparse.Namespace) -> int:
    """Put failed (or cancelled) tasks back to pending, due now, with more attempts."""
    ids: list[int] | None = args.ids or None
    statuses = [
        s
        for s, on in ((TaskStatus.FAILED, args.failed), (TaskStatus.CANCELLED, args.cancelled))
        if on
    ]
    filtering = bool(args.kind or args.queue or args.older_than is not None)
    if ids and (statuses or filtering):
        raise UsageError("give task ids or filters (--failed, --cancelled, --kind, ...), not both")
    if not ids and not statuses:
        raise UsageError("give task ids, or --failed and/or --cancelled (with optional filters)")
    progress = ProgressBar("retrying")
    with sessions(args, check=False) as factory:
        try:
            result = retry_tasks(
                factory,
                None if ids else _filter(args, statuses),
                ids=ids,
                extra_attempts=args.attempts,
                batch_size=args.batch_size,
                progress=progress,
            )
        finally:
            progress.close()
    if args.json:
        print(
            json.dumps(
                {
                    "retried": len(result.retried),
                    "retried_ids": result.retried,
                    "skipped_duplicates": result.skipped_duplicates,
                    "not_retryable": result.not_retryable,
                }
            )
        )
    else:
        noun = "task" if len(result.retried) == 1 else "tasks"
        print(f"retried {len(result.retried)} {noun} (each gets {args.attempts} more attempt(s))")
        for number in result.skipped_duplicates:
            print(f"skipped task {number}: a pending or running task has its kind and dedup_key")
        for number in result.not_retryable:
            print(f"skipped task {number}: no failed or cancelled task with this id")
    if ids and (result.skipped_duplicates or result.not_retryable):
        return EXIT_ERROR
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel pending tasks; flag running ones (cancelled when their handler returns)."""
    ids: list[int] | None = args.ids or None
    where = _filter(args)
    if ids and not where.is_empty:
        raise UsageError("give task ids or filters (--status, --kind, ...), not both")
    if not ids and where.is_empty and not args.all:
        raise UsageError(
            "give task ids, filters (--status, --kind, --queue, --older-than), or --all"
        )
    if ids and args.all:
        raise UsageError("give task ids or --all, not both")
    progress = ProgressBar("cancelling")
    with sessions(args, check=False) as factory:
        try:
            result = cancel_tasks(
                factory,
                None if ids else where,
                ids=ids,
                batch_size=args.batch_size,
                progress=progress,
            )
        finally:
            progress.close()
    if args.json:
        print(
            json.dumps(
                {
                    "cancelled": result.cancelled,
                    "requested": result.requested,
                    "not_cancellable": result.not_cancellable,
                }
            )
        )
    else:
        print(
            f"cancelled {len(result.cancelled)} pending task(s); "
            f"requested cancellation of {len(result.requested)} running task(s)"
        )
        for number in result.not_cancellable:
            print(f"skipped task {number}: no pending or running task with this id")
    return EXIT_ERROR if ids and result.not_cancellable else EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    """Health probe: schema, live workers, stuck tasks, backlog age; exit 0 only when healthy."""
    with sessions(args, check=False) as factory:
        report = health(
            factory,
            worker_timeout=None if args.no_workers else args.worker_timeout,
            stuck_after=args.stuck_after,
            max_age=None if args.max_age is None else args.max_age.total_seconds(),
        )
    code = EXIT_OK if report.ok else EXIT_SCHEMA if not report.schema_ok else EXIT_ERROR
    if args.json:
        checks = [{"name": c.name, "ok": c.ok, "detail": c.detail, **c.data} for c in report.checks]
        print(dump_json({"ok": report.ok, "checks": checks}))
    else:
        for check in report.checks:
            print(f"{'ok' if check.ok else 'FAIL':<5}{check.name}: {terminal_text(check.detail)}")
    if not report.ok:
        for problem in report.problems:
            print(
                f"pgotask: unhealthy: {problem.name}: {terminal_text(problem.detail)}",
                file=sys.stderr,
            )
    return code


def cmd_enqueue(args: argparse.Namespace) -> int:
    """Add one task (as an application would), and print its id."""
    when: dt.datetime | dt.timedelta | None = args.run_at
    task = Task(kind=args.kind, payload=args.payload, queue=args.queue, priority=args.priority)
    if args.dedup_key is not None:
        task.dedup_key = args.dedup_key
    if args.max_attempts is not None:
        task.max_attempts = args.max_attempts
    if isinstance(when, dt.timedelta):
        task.run_at = func.now() + when  # the database's clock
    elif when is not None:
        task.run_at = when
    with sessions(args) as factory, factory.begin() as session:
        session.add(task)
        session.flush()
        session.refresh(task)
        new_id, duplicate_of, due = task.id, task.duplicate_of, task.run_at
    if args.json:
        print(dump_json({"id": new_id, "duplicate_of": duplicate_of, "run_at": _iso(due)}))
    elif duplicate_of is not None:
        print(
            f"duplicate of task {duplicate_of} (same kind and dedup_key): nothing to run "
            f"(task {new_id} is stored cancelled)"
        )
    else:
        print(
            terminal_text(
                f"enqueued task {new_id} ({args.kind}, queue {args.queue}, run_at {_when(due)})"
            )
        )
    return EXIT_OK


# -- argument types ---------------------------------------------------------------


def _status(allowed: Sequence[TaskStatus]) -> Any:
    names = ", ".join(s.value for s in allowed)

    def parse(value: str) -> TaskStatus:
        try:
            status = TaskStatus(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"unknown status {shown(value)} (choose from {names})"
            ) from None
        if status not in allowed:
            raise argparse.ArgumentTypeError(f"expected one of {names}, got {shown(value)}")
        return status

    return parse


_kind = non_empty("the task kind")
_dedup_key = non_empty("the dedup key")
_kind_filter = text("a task kind")


# -- parser ------------------------------------------------------------------------


def _filters(parser: argparse.ArgumentParser, *, statuses: Sequence[TaskStatus] | None) -> None:
    if statuses is not None:
        parser.add_argument(
            "--status",
            action="append",
            type=_status(statuses),
            metavar="STATUS",
            help=f"{', '.join(s.value for s in statuses)} (repeatable)",
        )
    parser.add_argument(
        "--kind", action="append", type=_kind_filter, metavar="KIND", help="task kind (repeatable)"
    )
    parser.add_argument(
        "--queue", action="append", type=queue_name, metavar="Q", help="queue (repeatable)"
    )
    parser.add_argument(
        "--older-than",
        type=duration,
        default=None,
        metavar="AGE",
        help="created more than AGE ago: 30s, 15m, 12h, 7d",
    )


def add_commands(commands: Any) -> None:
    """Add the operator subcommands to ``pgotask``'s subparsers."""
    all_statuses = list(TaskStatus)

    stats = commands.add_parser(
        "stats", help="task counts per queue and kind", description=cmd_stats.__doc__
    )
    database_options(stats)
    stats.set_defaults(func=cmd_stats)

    listing = commands.add_parser(
        "list", help="list tasks, newest first", description=cmd_list.__doc__
    )
    _filters(listing, statuses=all_statuses)
    listing.add_argument(
        "--limit",
        type=whole_number(1, MAX_BATCH),
        default=50,
        metavar="N",
        help=f"at most N tasks, N up to {MAX_BATCH} (default: 50)",
    )
    database_options(listing)
    listing.set_defaults(func=cmd_list)

    show = commands.add_parser(
        "show", help="show one task and its errors", description=cmd_show.__doc__
    )
    show.add_argument("id", type=task_id, help="the task id")
    database_options(show)
    show.set_defaults(func=cmd_show)

    retry = commands.add_parser(
        "retry", help="run failed or cancelled tasks again", description=cmd_retry.__doc__
    )
    retry.add_argument("ids", nargs="*", type=task_id, metavar="ID", help="task ids")
    retry.add_argument(
        "--failed", action="store_true", help="retry every failed task matching the filters"
    )
    retry.add_argument(
        "--cancelled", action="store_true", help="retry every cancelled task matching the filters"
    )
    _filters(retry, statuses=None)
    retry.add_argument(
        "--attempts",
        type=positive_int4,
        default=1,
        metavar="N",
        help="attempts each task gets: max_attempts becomes attempts + N (default: 1)",
    )
    batch_size_option(retry, 1_000, "tasks per transaction")
    database_options(retry)
    retry.set_defaults(func=cmd_retry)

    cancel = commands.add_parser(
        "cancel", help="cancel pending or running tasks", description=cmd_cancel.__doc__
    )
    cancel.add_argument("ids", nargs="*", type=task_id, metavar="ID", help="task ids")
    _filters(cancel, statuses=LIVE_STATUSES)
    cancel.add_argument(
        "--all", action="store_true", help="every pending and running task (no filter)"
    )
    batch_size_option(cancel, 1_000, "tasks per transaction")
    database_options(cancel)
    cancel.set_defaults(func=cmd_cancel)

    check = commands.add_parser(
        "check", help="health probe (exit 0 when healthy)", description=cmd_check.__doc__
    )
    check.add_argument(
        "--worker-timeout",
        type=positive_seconds,
        default=60.0,
        metavar="S",
        help="a worker is alive if it sent a heartbeat in the last S seconds (default: 60)",
    )
    check.add_argument("--no-workers", action="store_true", help="do not require a live worker")
    check.add_argument(
        "--stuck-after",
        type=seconds_or_duration,
        default=60.0,
        metavar="S",
        help="a running task is stuck when its lease expired over S seconds ago (default: 60)",
    )
    check.add_argument(
        "--max-age",
        type=positive_duration,
        default=None,
        metavar="AGE",
        help="fail if a due task has waited longer than AGE (30s, 15m, ...; default: no limit)",
    )
    database_options(check)
    check.set_defaults(func=cmd_check)

    enqueue = commands.add_parser("enqueue", help="add a task", description=cmd_enqueue.__doc__)
    enqueue.add_argument("kind", type=_kind, help="the task kind")
    enqueue.add_argument(
        "--payload", type=payload, default={}, metavar="JSON", help="JSON payload (default: {})"
    )
    enqueue.add_argument(
        "--run-at",
        type=run_at,
        default=None,
        metavar="WHEN",
        help="ISO 8601 time with a time zone, or a delay: +30s, +15m, +2h, +1d (default: now)",
    )
    enqueue.add_argument(
        "--queue", type=queue_name, default="default", help="queue (default: default)"
    )
    enqueue.add_argument(
        "--priority", type=int4, default=0, help="higher runs first (default: 0; a 32-bit integer)"
    )
    enqueue.add_argument(
        "--dedup-key", type=_dedup_key, default=None, metavar="KEY", help="deduplication key"
    )
    enqueue.add_argument(
        "--max-attempts",
        type=positive_int4,
        default=None,
        metavar="N",
        help="default: the handler's setting",
    )
    database_options(enqueue)
    enqueue.set_defaults(func=cmd_enqueue)


__all__ = ["add_commands"]
