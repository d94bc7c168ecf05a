"""``palaute ingest --processes N``: the supervisor's restart policy and its refusals.

The restart policy is driven with explicit times (``_check(now)``) on children that really
run and exit; the whole command under load is tested in tests/e2e/test_ingest_workers.py.
"""

from __future__ import annotations

import subprocess
import sys

from fleet.ingest.supervisor import HEALTHY_RUN_S, MAX_BACKOFF_S, Supervisor
from tests.services.ingest import PALAUTE


class ExitingSupervisor(Supervisor):
    """Children that exit at once with code 3 instead of running a worker."""

    def command(self, index: int) -> list[str]:
        return [sys.executable, "-c", "raise SystemExit(3)"]


def wait_children(supervisor: Supervisor) -> None:
    for child in supervisor._children:
        if child.process is not None:
            child.process.wait(timeout=10)


def test_a_child_that_keeps_dying_waits_longer_each_time_and_a_healthy_one_not_at_all(
        ) -> None:
    supervisor = ExitingSupervisor(1, worker_id="w", metrics_port=0, metrics_host="",
                                   connect_timeout=1)
    child = supervisor._children[0]
    supervisor._start(child)
    backoffs = []
    for _ in range(7):
        wait_children(supervisor)
        died = child.started + 0.1
        supervisor._check(died)
        assert child.process is None  # not restarted before its backoff is over
        backoffs.append(child.backoff_s)
        supervisor._check(child.restart_at - 0.01)
        assert child.process is None
        supervisor._check(child.restart_at)
        assert child.process is not None
    assert backoffs == [1, 2, 4, 8, 16, 30, 30] and MAX_BACKOFF_S == 30
    assert supervisor.restarts == 7
    # A child that ran for a while before dying is restarted at once.
    wait_children(supervisor)
    supervisor._check(child.started + HEALTHY_RUN_S)
    assert child.process is not None and supervisor.restarts == 8
    wait_children(supervisor)


def test_children_get_their_own_ids_ports_and_the_supervisor_pid() -> None:
    supervisor = Supervisor(3, worker_id="ingest-a", metrics_port=9400, metrics_host="0.0.0.0",
                            connect_timeout=5)
    argv = supervisor.command(3)
    assert argv[argv.index("--worker-id") + 1] == "ingest-a-3"
    assert argv[argv.index("--metrics-port") + 1] == "9402"
    assert argv[argv.index("--processes") + 1] == "1"
    assert "--supervisor-pid" in argv
    unmetered = Supervisor(2, worker_id="x", metrics_port=0, metrics_host="127.0.0.1",
                           connect_timeout=5)
    assert unmetered.command(2)[unmetered.command(2).index("--metrics-port") + 1] == "0"


def test_impossible_process_counts_and_ports_are_refused_with_a_reason() -> None:
    for argv, env, expected in (
            (["--processes", "0"], {}, "--processes must be at least 1"),
            (["--processes", "4", "--metrics-port", "65534"], {}, "do not fit below 65536"),
            # Without a shared subscription every process would get every message.
            (["--processes", "2"], {"PALAUTE_INGEST_SHARED_GROUP": ""}, "run one process"),
            ([], {"PALAUTE_INGEST_PROCESSES": "3", "PALAUTE_INGEST_SHARED_GROUP": ""},
             "--processes 3 needs a shared subscription")):
        done = subprocess.run([str(PALAUTE), "ingest", *argv], capture_output=True, text=True,
                              timeout=30, env={"PALAUTE_DB_URL": "sqlite:///:memory:",
                                               "PATH": "/usr/bin:/bin", **env})
        assert done.returncode != 0 and expected in done.stderr, done.stderr
