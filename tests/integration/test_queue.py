"""The job queue's guarantees, against a real Redis server."""

from __future__ import annotations

import json
import time

import pytest
import redis

from nvfp4_common import keys
from nvfp4_common.errors import InvalidTransition, JobNotFound, Nvfp4Error
from nvfp4_common.jobs import JobResult, JobSpec, JobState, Priority, Progress, Stage
from nvfp4_common.queue import CancelOutcome, JobQueue
from nvfp4_common.serve_history import ServeHistory
from nvfp4_common.settings import Settings

SPEC = JobSpec(model="Qwen/Qwen3-0.6B", calib_samples=8, calib_seq_len=64)


def _result() -> JobResult:
    return JobResult(
        output_name="out", output_path="/models/out", source_bytes=10, output_bytes=4, duration_s=1
    )


def test_submit_then_get_round_trips_every_field(queue: JobQueue) -> None:
    spec = SPEC.model_copy(update={"exclude": ["*mlp.gate*"], "output_name": "q-nvfp4"})
    job = queue.submit(spec, Priority.HIGH)
    got = queue.get(job.id)
    assert got.spec == spec
    assert got.state == JobState.QUEUED
    assert got.priority == Priority.HIGH
    assert got.attempts == 0
    assert got.max_attempts == queue.settings.max_attempts


def test_everything_stored_is_json_or_plain_text_never_pickle(queue: JobQueue) -> None:
    job = queue.submit(SPEC)
    queue.claim("w1")
    queue.log(job.id, "hello")
    raw = redis.Redis.from_url(queue.settings.redis_url)
    for key in raw.scan_iter(keys.PREFIX + "*"):
        kind = raw.type(key).decode()
        values: list[bytes] = []
        if kind == "hash":
            values = list(raw.hgetall(key).values())
        elif kind == "list":
            values = raw.lrange(key, 0, -1)
        for value in values:
            assert not value.startswith(b"\x80"), f"pickle protocol header in {key!r}"
            value.decode("utf-8")  # plain text
    stored = raw.hgetall(keys.job(job.id))
    assert json.loads(stored[b"spec"])["model"] == SPEC.model


def test_get_unknown_job_raises(queue: JobQueue) -> None:
    with pytest.raises(JobNotFound, match="no job 'nope'"):
        queue.get("nope")


def test_higher_priority_runs_first_then_first_come_first_served(queue: JobQueue) -> None:
    low = queue.submit(SPEC, Priority.LOW)
    # Many submits land in the same millisecond: order must still be submit order.
    normals = [queue.submit(SPEC, Priority.NORMAL) for _ in range(30)]
    high = queue.submit(SPEC, Priority.HIGH)
    order = [queue.claim("w").id for _ in range(32)]  # type: ignore[union-attr]
    assert order == [high.id, *(job.id for job in normals), low.id]
    assert queue.claim("w") is None


def test_claim_counts_the_attempt_before_the_job_runs(queue: JobQueue) -> None:
    job = queue.submit(SPEC)
    claimed = queue.claim("w1")
    assert claimed is not None and claimed.id == job.id
    assert claimed.state == JobState.RUNNING
    assert claimed.attempts == 1
    assert claimed.worker_id == "w1"
    assert claimed.started_at is not None


def test_list_filters_by_state(queue: JobQueue) -> None:
    a = queue.submit(SPEC)
    b = queue.submit(SPEC)
    c = queue.submit(SPEC)
    running = queue.claim("w")
    assert running is not None and running.id == a.id
    queue.cancel(c.id)
    assert {j.id for j in queue.jobs()} == {a.id, b.id, c.id}
    assert [j.id for j in queue.jobs(JobState.RUNNING)] == [a.id]
    assert [j.id for j in queue.jobs(JobState.QUEUED)] == [b.id]
    assert [j.id for j in queue.jobs(JobState.CANCELLED)] == [c.id]


def test_cancel_queued_job_removes_it_from_the_queue(queue: JobQueue) -> None:
    job = queue.submit(SPEC)
    assert queue.cancel(job.id) == "cancelled"
    assert queue.get(job.id).state == JobState.CANCELLED
    assert queue.claim("w") is None


def test_cancel_running_job_asks_its_worker(queue: JobQueue) -> None:
    job = queue.submit(SPEC)
    claimed = queue.claim("w")
    assert claimed is not None
    assert queue.cancel(job.id) == "cancelling"
    assert queue.cancel_requested(job.id)
    assert queue.mark_cancelled(claimed, "w")
    assert queue.get(job.id).state == JobState.CANCELLED


def test_cancel_succeeded_job_is_refused(queue: JobQueue) -> None:
    queue.submit(SPEC)
    claimed = queue.claim("w")
    assert claimed is not None
    queue.succeed(claimed, "w", _result())
    with pytest.raises(InvalidTransition, match="already succeeded"):
        queue.cancel(claimed.id)


def test_cancel_answers_one_type_and_refuses_any_ended_job(queue: JobQueue) -> None:
    queued = queue.submit(SPEC)
    assert queue.cancel(queued.id) is CancelOutcome.CANCELLED
    with pytest.raises(InvalidTransition, match="already cancelled; nothing to cancel"):
        queue.cancel(queued.id)
    queue.submit(SPEC)
    claimed = queue.claim("w")
    assert claimed is not None
    assert queue.cancel(claimed.id) is CancelOutcome.CANCELLING
    queue.fail(claimed, "w", "bad input")
    with pytest.raises(InvalidTransition, match="already failed") as info:
        queue.cancel(claimed.id)
    assert isinstance(info.value, Nvfp4Error)  # the CLI prints it as one line
    with pytest.raises(JobNotFound):
        queue.cancel("nope")


def test_retry_puts_a_failed_job_back_with_fresh_attempts(queue: JobQueue) -> None:
    job = queue.submit(SPEC)
    claimed = queue.claim("w")
    assert claimed is not None
    queue.fail(claimed, "w", "boom")
    assert queue.get(job.id).error == "boom"
    again = queue.retry(job.id)
    assert again.state == JobState.QUEUED
    assert again.attempts == 0 and again.error is None
    assert queue.claim("w2").id == job.id  # type: ignore[union-attr]


def test_retry_of_a_queued_job_is_refused(queue: JobQueue) -> None:
    job = queue.submit(SPEC)
    with pytest.raises(InvalidTransition, match="only failed or cancelled"):
        queue.retry(job.id)


def test_progress_and_logs_are_recorded_and_capped(queue: JobQueue) -> None:
    job = queue.submit(SPEC)
    claimed = queue.claim("w")
    assert claimed is not None
    queue.set_progress(claimed, Progress(stage=Stage.CALIBRATING, fraction=0.5, message="4/8"))
    for i in range(queue.settings.job_log_lines + 5):
        queue.log(job.id, f"line {i}")
    got = queue.get(job.id)
    assert got.progress.stage == Stage.CALIBRATING and got.progress.fraction == 0.5
    lines = queue.logs(job.id)
    assert len(lines) == queue.settings.job_log_lines
    assert lines[-1] == f"line {queue.settings.job_log_lines + 4}"


def test_ended_jobs_expire_after_the_result_ttl(settings: Settings) -> None:
    q = JobQueue(settings.model_copy(update={"result_ttl_s": 60}))
    job = q.submit(SPEC)
    claimed = q.claim("w")
    assert claimed is not None
    q.log(job.id, "x")
    q.succeed(claimed, "w", _result())
    ttl = q.redis.ttl(keys.job(job.id))
    assert 0 < ttl <= 60
    assert 0 < q.redis.ttl(keys.job_log(job.id)) <= 60
    # Once Redis expired it, listing forgets it too.
    q.redis.delete(keys.job(job.id))
    assert q.jobs() == []
    assert q.redis.zcard(keys.ENDED) == 0


def test_dead_worker_job_is_requeued_after_heartbeat_timeout(queue: JobQueue) -> None:
    job = queue.submit(SPEC)
    claimed = queue.claim("dead-worker")
    assert claimed is not None
    assert queue.reap() == []  # heartbeat still fresh
    time.sleep(queue.settings.heartbeat_timeout_s + 0.1)
    assert queue.reap() == [(job.id, "requeued")]
    again = queue.get(job.id)
    assert again.state == JobState.QUEUED
    assert "dead-worker stopped sending heartbeats" in (again.error or "")
    second = queue.claim("w2")
    assert second is not None and second.attempts == 2


def test_job_fails_with_a_clear_reason_when_attempts_run_out(settings: Settings) -> None:
    q = JobQueue(settings.model_copy(update={"max_attempts": 2, "heartbeat_timeout_s": 0.2}))
    job = q.submit(SPEC)
    for _ in range(2):
        assert q.claim("w") is not None
        time.sleep(0.3)
        q.reap()
    final = q.get(job.id)
    assert final.state == JobState.FAILED
    assert final.attempts == 2
    assert "attempt 2 of 2; giving up" in (final.error or "")


def test_heartbeat_keeps_a_slow_job_alive(settings: Settings) -> None:
    q = JobQueue(settings.model_copy(update={"heartbeat_timeout_s": 0.5}))
    q.submit(SPEC)
    claimed = q.claim("w")
    assert claimed is not None
    for _ in range(4):
        time.sleep(0.25)
        assert q.heartbeat(claimed, "w")
        assert q.reap() == []
    assert q.get(claimed.id).state == JobState.RUNNING


def test_a_requeued_attempt_is_fenced_off(settings: Settings) -> None:
    """A worker presumed dead that comes back cannot overwrite the job."""
    q = JobQueue(settings.model_copy(update={"heartbeat_timeout_s": 0.2}))
    job = q.submit(SPEC)
    stale = q.claim("slow")
    assert stale is not None
    time.sleep(0.3)
    q.reap()
    fresh = q.claim("fast")
    assert fresh is not None and fresh.attempts == 2
    assert not q.heartbeat(stale, "slow")
    assert not q.succeed(stale, "slow", _result())
    assert q.get(job.id).state == JobState.RUNNING
    assert q.succeed(fresh, "fast", _result())
    assert q.get(job.id).state == JobState.SUCCEEDED


def test_graceful_requeue_refunds_the_attempt(queue: JobQueue) -> None:
    job = queue.submit(SPEC)
    claimed = queue.claim("w")
    assert claimed is not None
    assert queue.requeue_own(claimed, "w", "worker shut down", refund=True)
    again = queue.get(job.id)
    assert again.state == JobState.QUEUED and again.attempts == 0


def test_purge_deletes_only_old_ended_jobs(queue: JobQueue) -> None:
    old = queue.submit(SPEC)
    queue.cancel(old.id)
    queued = queue.submit(SPEC)
    time.sleep(0.2)
    recent = queue.submit(SPEC)
    queue.cancel(recent.id)
    assert queue.purge(older_than_s=0.1) == [old.id]
    with pytest.raises(JobNotFound):
        queue.get(old.id)
    assert queue.get(recent.id).state == JobState.CANCELLED
    assert queue.get(queued.id).state == JobState.QUEUED


def test_workers_are_listed_with_their_current_job(queue: JobQueue) -> None:
    queue.beat_worker("w1", "host-a", 123, "job-1")
    queue.beat_worker("w2", "host-b", 456, None)
    workers = {w.id: w for w in queue.workers()}
    assert workers["w1"].job_id == "job-1" and workers["w1"].pid == 123
    assert workers["w2"].job_id is None
    assert workers["w1"].heartbeat_age_s < 5
    queue.remove_worker("w1")
    assert [w.id for w in queue.workers()] == ["w2"]


def test_production_settings_refuse_the_development_redis() -> None:
    with pytest.raises(ValueError, match="NVFP4_REDIS_URL must be set in production"):
        Settings(env="production", _env_file=None)  # type: ignore[call-arg]


def test_serve_history_is_newest_first_capped_and_pops(queue: JobQueue) -> None:
    history = ServeHistory(queue.redis)
    assert history.configs() == [] and history.pop() is None
    for n in range(4):
        history.push({"applications": [{"name": f"app-{n}"}]}, keep=3)
    assert [c["applications"][0]["name"] for c in history.configs()] == ["app-3", "app-2", "app-1"]
    assert history.pop() == {"applications": [{"name": "app-3"}]}
    assert len(history.configs()) == 2
