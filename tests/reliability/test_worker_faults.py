"""Faults around quantization jobs: nothing lost, nothing published twice.

- A worker SIGKILLed during calibration: the job is retried by another worker and
  succeeds; attempts are recorded; the output is published once, with no partial folder.
- Only the job process SIGKILLed (what a cgroup OOM kill does): the worker runs on, the
  job runs again (the attempt counts) or, with no attempt left, fails naming the signal.
- A worker dies while the only other worker is busy: the busy worker re-queues its job.
- Redis restarted (AOF on, as in docker-compose.yml) while one job runs and others
  wait: every job is still there afterwards and succeeds; the worker and a CLI following
  the job reconnect with backoff; the running job does not lose its attempt.
"""

from __future__ import annotations

import ast
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nvfp4_common.jobs import JobState, Priority
from nvfp4_common.queue import JobQueue
from nvfp4_common.settings import Settings
from tests.conftest import RedisServer
from tests.worker_harness import (
    Workers,
    calibrating,
    ended,
    job_process,
    kill_while_calibrating,
    published,
    spec,
    wait_for,
)

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[2]


def test_worker_killed_during_calibration_is_retried_and_publishes_once(
    job_settings: Settings,
    start_worker: Callable[..., subprocess.Popen[bytes]],
    tiny_model: Path,
    calib_file: Path,
    record_stat: Callable[..., None],
) -> None:
    q = JobQueue(job_settings)
    job = q.submit(spec(tiny_model, calib_file, calib_samples=64, output_name="survivor"))
    first = start_worker()
    child = job_process(first)
    calibrating(q, job.id)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    child.wait(10)  # the job process dies with its worker
    assert q.get(job.id).state == JobState.RUNNING  # until the heartbeat times out
    # A burst worker exits when nothing is queued: start it once the dead worker's
    # heartbeat deadline has passed, so that it finds the job to re-queue.
    time.sleep(job_settings.heartbeat_timeout_s + 0.5)

    start_worker("--burst")
    done = wait_for(q, job.id, ended)
    assert done.state == JobState.SUCCEEDED, done.error
    assert done.attempts == 2
    assert any(
        "stopped sending heartbeats" in line or "attempt 2" in line for line in q.logs(job.id)
    )
    # Published exactly once, and no temporary folder left behind.
    assert published(q.settings) == ["survivor"]
    record_stat("worker_sigkill", faults=1, jobs=1, jobs_lost=0)


def test_job_process_killed_alone_is_requeued_or_failed_and_the_worker_runs_on(
    job_settings: Settings,
    start_worker: Callable[..., subprocess.Popen[bytes]],
    tiny_model: Path,
    calib_file: Path,
    record_stat: Callable[..., None],
) -> None:
    q = JobQueue(job_settings)
    # One attempt only: the kill ends the job, and the error says why in one line.
    single = JobQueue(job_settings.model_copy(update={"max_attempts": 1}))
    last = single.submit(spec(tiny_model, calib_file, calib_samples=500, calib_seq_len=128))
    worker = start_worker()
    kill_while_calibrating(q, last.id, worker)  # the job process alone, not the worker
    failed = wait_for(q, last.id, ended, timeout=60)
    assert failed.state == JobState.FAILED and failed.attempts == 1
    assert failed.error == "job process killed by SIGKILL (out of memory?) on attempt 1 of 1"
    assert worker.poll() is None, "the worker must keep running"

    # Attempts left: re-queued, and the same worker runs it again to success.
    job = q.submit(spec(tiny_model, calib_file, calib_samples=64, output_name="after-oom"))
    kill_while_calibrating(q, job.id, worker)
    done = wait_for(q, job.id, ended)
    assert done.state == JobState.SUCCEEDED, done.error
    assert done.attempts == 2  # the killed attempt counts
    reason = "job process killed by SIGKILL (out of memory?) on attempt 1 of 3; re-queued"
    assert any(line.endswith(reason) for line in q.logs(job.id)), q.logs(job.id)
    assert worker.poll() is None
    assert published(q.settings) == ["after-oom"]
    record_stat("job_process_sigkill", faults=2, jobs=2, jobs_lost=0)


def test_a_busy_worker_requeues_the_job_of_a_dead_worker(
    job_settings: Settings,
    start_worker: Callable[..., subprocess.Popen[bytes]],
    tiny_model: Path,
    calib_file: Path,
    record_stat: Callable[..., None],
) -> None:
    q = JobQueue(job_settings)
    long = q.submit(spec(tiny_model, calib_file, calib_samples=2000, calib_seq_len=256))
    worker = start_worker()
    job_process(worker)  # the only worker is busy from here on
    orphan = q.submit(spec(tiny_model, calib_file, output_name="orphan"))
    claimed = q.claim("dead-worker")  # a worker that dies at once: it never renews its beat
    assert claimed is not None and claimed.id == orphan.id

    timeout_s = job_settings.heartbeat_timeout_s
    requeued = wait_for(q, orphan.id, lambda j: j.state != JobState.RUNNING, timeout_s * 2 + 5)
    assert requeued.state == JobState.QUEUED
    assert requeued.error == "attempt 1 lost: worker dead-worker stopped sending heartbeats"
    assert q.get(long.id).state == JobState.RUNNING  # found while busy, not between jobs

    q.cancel(orphan.id)
    q.cancel(long.id)
    assert wait_for(q, long.id, ended, timeout=30).state == JobState.CANCELLED
    assert worker.poll() is None
    record_stat("dead_worker_while_busy", faults=1, jobs=2, jobs_lost=0)


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis-aof", appendonly=True)
    server.start()
    yield server
    server.stop()


def test_redis_restart_loses_no_job_and_everyone_reconnects(
    aof_redis: RedisServer,
    job_settings: Settings,
    tiny_model: Path,
    calib_file: Path,
    tmp_path: Path,
    record_stat: Callable[..., None],
) -> None:
    # A heartbeat timeout longer than the restart: the running job keeps its attempt.
    settings = job_settings.model_copy(
        update={"redis_url": aof_redis.url, "heartbeat_timeout_s": 15.0}
    )
    q = JobQueue(settings)
    running = q.submit(
        spec(
            tiny_model,
            calib_file,
            calib_samples=256,
            calib_seq_len=128,
            output_name="through-restart",
        )
    )
    waiting = [
        q.submit(spec(tiny_model, calib_file, output_name=f"queued-{i}"), priority)
        for i, priority in enumerate([Priority.LOW, Priority.NORMAL, Priority.HIGH])
    ]
    workers = Workers(settings)
    worker_log = tmp_path / "worker.log"
    cli_log = tmp_path / "watch.log"
    with worker_log.open("wb") as wlog, cli_log.open("wb") as clog:
        try:
            worker = workers.start(stdout=wlog, stderr=subprocess.STDOUT)
            calibrating(q, running.id)
            watch = subprocess.Popen(
                [sys.executable, "-m", "nvfp4_admin", "jobs", "watch", running.id],
                env=workers.env(),
                stdout=clog,
                stderr=subprocess.STDOUT,
            )
            before = {job.id: job.state for job in q.jobs()}

            aof_redis.stop()  # SIGTERM, as `docker compose restart redis` sends
            down = subprocess.run(
                [sys.executable, "-m", "nvfp4_admin", "jobs", "list"],
                env=workers.env(),
                capture_output=True,
                text=True,
                timeout=60,
            )
            time.sleep(2)  # the worker and the CLI see Redis gone
            aof_redis.start()

            # Nothing lost and nothing moved back. The running job may finish in the
            # moment after the restart (its outcome write waits for Redis), so a state
            # can only stay or move forward.
            after = {job.id: job.state for job in q.jobs()}
            assert after.keys() == before.keys(), "jobs lost across the restart"
            forward = {
                JobState.QUEUED: {JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED},
                JobState.RUNNING: {JobState.RUNNING, JobState.SUCCEEDED},
                JobState.SUCCEEDED: {JobState.SUCCEEDED},  # the high-priority one ran first
            }
            moved_back = {
                i: (before[i], after[i]) for i in before if after[i] not in forward[before[i]]
            }
            assert not moved_back, moved_back
            assert before[running.id] == JobState.RUNNING
            ids = [running.id, *(job.id for job in waiting)]
            done = [wait_for(q, job_id, ended, timeout=300) for job_id in ids]
            assert watch.wait(60) == 0
            assert worker.poll() is None, "the worker must keep running"
        finally:
            workers.stop_all()

    assert [job.state for job in done] == [JobState.SUCCEEDED] * 4, [j.error for j in done]
    assert done[0].attempts == 1, "the running job was re-queued"
    # While Redis was down the CLI said so in one line, and exited 1.
    assert down.returncode == 1 and len(down.stderr.strip().splitlines()) == 1, down.stderr
    assert "Traceback" not in down.stderr
    assert "redis unavailable" in worker_log.read_text()
    watched = cli_log.read_text()
    assert "redis unavailable" in watched and "succeeded:" in watched, watched
    assert published(settings) == ["queued-0", "queued-1", "queued-2", "through-restart"]
    record_stat("redis_restart", faults=1, jobs=4, jobs_lost=0)


def test_serving_never_talks_to_redis() -> None:
    """Why a Redis restart cannot affect serving: no serving module imports a Redis
    client or the job queue (the app reads its model from settings and files)."""
    banned = {"redis", "nvfp4_common.queue", "nvfp4_common.keys"}
    for path in sorted((ROOT / "services" / "nvfp4_serve").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            hit = banned.intersection(n for n in names) | {
                n for n in names if n.split(".")[0] == "redis"
            }
            assert not hit, f"{path.name} imports {hit}"
