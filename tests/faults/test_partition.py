"""Scenario 9: a network partition of one worker host.

One worker runs in a network namespace of its own
(:class:`~tests.helpers.faults.IsolatedHost`), joined to this host by a
veth pair; it reaches the server on the host's end of the link (the server
listens there too).  Another worker runs on this host.  While both drain
the queue, the test cuts the isolated worker's link for longer than the
lease, then heals it:

* during the partition, the worker outside must rescue the isolated
  worker's tasks and go on;
* once healed, the isolated worker's late work must be fenced out (its
  batches roll back: no task committed twice) and it must rejoin (claim and
  commit again).

Nothing may be lost or committed twice.

The server cannot tell a partitioned client from an idle one: the isolated
worker's open transactions stay open on it, with their row locks, and a
rescued task whose row or ledger entry such a transaction holds waits for it.
Parametrized by the server's TCP settings: the operating system's defaults
(the server notices nothing before the heal), and keepalives with a user
timeout of a few seconds (the server drops the partitioned connections
during the partition, so every rescued task finishes before the heal).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import make_url

from sqla_pgotask.embedded import EmbeddedPostgres
from tests.helpers.faults import (
    Fleet,
    IsolatedHost,
    Probe,
    ScenarioResult,
    allow_clients_from,
    check_ledger,
    prepare_database,
    report,
    stopwatch,
    wait_for,
)

pytestmark = pytest.mark.slow

TASKS = 2_000
#: Added when the link is back, so that there is work to rejoin.
TOP_UP = 1_500
TASK_SLEEP = 0.01
#: Longer than the test app's lease (2 s) and dead_after (1.5 s).
PARTITION = 6.0
#: Server settings that make it drop a silent client after about 2 s.
KEEPALIVES = {
    "tcp_keepalives_idle": 1,
    "tcp_keepalives_interval": 1,
    "tcp_keepalives_count": 2,
    "tcp_user_timeout": 2000,
}


@pytest.fixture(params=["default", "keepalives"])
def server_tcp(request: pytest.FixtureRequest) -> str:
    """The server's TCP settings: the system's defaults, or short keepalives."""
    value: str = request.param
    return value


@pytest.fixture
def partition_server(isolated_host: IsolatedHost, server_tcp: str) -> Iterator[EmbeddedPostgres]:
    """A server that also listens on the host's end of the isolated host's link."""
    settings: dict[str, str | int] = {"listen_addresses": f"127.0.0.1,{isolated_host.host_address}"}
    if server_tcp == "keepalives":
        settings.update(KEEPALIVES)
    with EmbeddedPostgres(settings=settings) as server:
        allow_clients_from(server, isolated_host.address)
        prepare_database(server.url)
        yield server


def _enqueue(probe: Probe, count: int) -> None:
    probe.enqueue(count, payload={"sleep": TASK_SLEEP})


def test_partition_of_one_worker_host(
    isolated_host: IsolatedHost,
    partition_server: EmbeddedPostgres,
    server_tcp: str,
    tmp_path: Path,
) -> None:
    url = partition_server.url
    inside_url = make_url(url).set(host=isolated_host.host_address)
    inside_url_text = inside_url.render_as_string(hide_password=False)
    isolated_host.wait_reaches(inside_url_text)
    for side in ("outside", "inside"):
        (tmp_path / side).mkdir()
    with (
        Probe(url) as probe,
        Fleet(url, tmp_path / "outside", "--concurrency", "4") as outside,
        Fleet(
            inside_url_text,
            tmp_path / "inside",
            "--concurrency",
            "4",
            prefix=isolated_host.prefix,
        ) as inside,
        stopwatch() as elapsed,
    ):
        outside.start(1)
        (isolated,) = inside.start(1)
        worker_id = wait_for(
            lambda: probe.scalar(
                "SELECT id FROM pgotask_worker WHERE pid = :pid", pid=isolated.pid
            ),
            10,
            message="the isolated worker to register",
        )
        _enqueue(probe, TASKS)
        total = TASKS
        wait_for(
            lambda: (
                probe.scalar(
                    "SELECT count(*) FROM fault_ledger WHERE worker_pid = :pid", pid=isolated.pid
                )
                >= 50
            ),
            30,
            message="the isolated worker to be busy",
        )

        cut = isolated_host.cut()
        stranded = [
            row[0]
            for row in probe.rows(
                "SELECT id FROM pgotask_task WHERE status = 'running' AND locked_by = :w",
                w=worker_id,
            )
        ]
        done_at_cut = probe.count("status = 'succeeded'")
        # The worker outside finds the isolated one silent and rescues its tasks.
        first_rescue = wait_for(
            lambda: probe.scalar(
                "SELECT min(created_at) FROM pgotask_task_error "
                "WHERE exception_type = 'sqla_pgotask.WorkerLost' AND message LIKE :m",
                m=f"worker {worker_id} %",
            ),
            PARTITION,
            message="a rescue of the isolated worker's tasks",
        )
        time.sleep(max(0.0, cut + PARTITION - time.time()))
        done_in_partition = probe.count("status = 'succeeded'") - done_at_cut
        rescued_in_partition = probe.count(
            "id = ANY(:ids) AND locked_by IS DISTINCT FROM :w", ids=stranded, w=worker_id
        )
        stranded_done_in_partition = probe.count(
            "id = ANY(:ids) AND status = 'succeeded'", ids=stranded
        )
        # What the server still holds for the isolated worker, and who waits for it.
        stale_open = probe.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE client_addr = CAST(:a AS inet) "
            "AND state LIKE 'idle in transaction%'",
            a=isolated_host.address,
        )
        waiting_on_locks = probe.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        )
        assert isolated.alive(), "the isolated worker died of the partition"

        healed = isolated_host.heal()
        _enqueue(probe, TOP_UP)
        total += TOP_UP
        # It rejoins: heart-beats again, then commits tasks it claimed after the heal.
        back = wait_for(
            lambda: probe.scalar(
                "SELECT last_heartbeat_at FROM pgotask_worker "
                "WHERE id = :w AND last_heartbeat_at > to_timestamp(:t)",
                w=worker_id,
                t=healed,
            ),
            30,
            message="the isolated worker to heart-beat again",
        )
        rejoined = wait_for(
            lambda: probe.scalar(
                "SELECT min(written_at) FROM fault_ledger l "
                "JOIN pgotask_task t ON t.id = l.task_id "
                "WHERE l.worker_pid = :pid AND t.started_at > to_timestamp(:t)",
                pid=isolated.pid,
                t=healed,
            ),
            30,
            message="the isolated worker to commit a task claimed after the heal",
        )
        wait_for(lambda: probe.unfinished() == 0, 60, interval=0.1, message="every task to finish")
        run_time = elapsed()
        stranded_done = probe.done_at(stranded)
        codes = outside.stop() + inside.stop()
        fenced = isolated.log().count("claim lost, its writes were rolled back")
        reasons = [
            row[0]
            for row in probe.rows(
                "SELECT DISTINCT substring(message from ': (its [a-z ]+);') "
                "FROM pgotask_task_error WHERE message LIKE :m",
                m=f"worker {worker_id} %",
            )
        ]
        check = check_ledger(probe)
    report(
        ScenarioResult(
            scenario=f"9. network partition of a worker host (server TCP {server_tcp})",
            tasks=check.tasks,
            faults=1,
            lost=check.lost,
            duplicated=check.duplicated,
            recover_s=first_rescue.timestamp() - cut,
            total_s=run_time,
            recover_what="cut to the first of its tasks rescued",
            extra={
                "partition_s": PARTITION,
                "stranded": len(stranded),
                "rescued_in_partition": rescued_in_partition,
                "stranded_done_in_partition": stranded_done_in_partition,
                "stranded_done_after_cut_s": None
                if stranded_done is None
                else round(stranded_done - cut, 2),
                "done_in_partition": done_in_partition,
                "stale_transactions_at_heal": stale_open,
                "waiting_on_locks_at_heal": waiting_on_locks,
                "heartbeat_back_s": round(back.timestamp() - healed, 2),
                "rejoined_s": round(rejoined.timestamp() - healed, 2),
                "fenced": fenced,
                "reasons": reasons,
                "rerun": check.rerun,
                "max_attempt": check.max_attempts_seen,
                "errors": check.errors_by_type,
            },
        )
    )
    check.assert_clean(total)
    assert codes == [0, 0]
    assert stranded, "the isolated worker held no task when its link was cut"
    assert done_in_partition > 0, "the worker outside stopped during the partition"
    assert fenced > 0, "no late work of the isolated worker was turned away"
    if server_tcp == "keepalives":
        # The server dropped the silent connections: nothing waited for the heal.
        assert stale_open == 0
        assert stranded_done_in_partition == len(stranded)
