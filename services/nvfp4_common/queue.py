"""The job queue client: the only code that touches job keys in Redis.

Design (why each piece exists):
- A job is one Redis hash; state changes are Lua scripts (queue_scripts.py), so a job is
  always in exactly one of QUEUE, RUNNING or ENDED, even when a worker dies between two
  commands.
- A worker claims a job and increments its attempt counter in the same script, *before*
  the job runs: a worker killed by the OOM killer still uses up an attempt.
- A running job carries a heartbeat deadline; any worker re-queues jobs whose deadline
  passed (or fails them once attempts are used up), so a dead worker loses no job.
- Writes from a job's run are fenced by (worker id, attempt): a worker presumed dead
  that comes back cannot overwrite the job after it was re-queued.
- Everything stored is JSON or a plain string. No pickle.

Its errors (JobNotFound, InvalidTransition, CorruptJob) live in nvfp4_common.errors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from typing import Any, TypeVar

import redis
from pydantic import ValidationError

from nvfp4_common import keys
from nvfp4_common.errors import CorruptJob, InvalidTransition, JobNotFound
from nvfp4_common.jobs import Job, JobResult, JobSpec, JobState, Priority, Progress, Stage
from nvfp4_common.queue_scripts import Scripts
from nvfp4_common.settings import Settings

T = TypeVar("T")

# How long a caller that must not give up (a finished job recording its outcome, a CLI
# following a job) waits for Redis to come back. A restart with AOF takes seconds.
RECONNECT_FOR_S = 120.0


def through_restarts(
    call: Callable[[], T],
    for_s: float = RECONNECT_FOR_S,
    on_retry: Callable[[Exception, float], None] | None = None,
) -> T:
    """`call()`, retried with backoff while Redis is unreachable, for up to `for_s`."""
    deadline = time.monotonic() + for_s
    backoff = 0.25
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            if isinstance(e, redis.AuthenticationError) or time.monotonic() + backoff > deadline:
                raise
            if on_retry:
                on_retry(e, backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)


class CancelOutcome(StrEnum):
    """What `JobQueue.cancel` did."""

    CANCELLED = "cancelled"  # the job was queued: it ended now and will never run
    CANCELLING = "cancelling"  # the job is running: its worker was asked to stop it


def _parse(job_id: str, raw: dict[str, str]) -> Job:
    try:
        return Job.from_redis(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "job"
        raise CorruptJob(job_id, f"{where}: {err['msg']}") from None
    except ValueError as e:  # a JSON field that does not parse
        raise CorruptJob(job_id, str(e)) from None


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    heartbeat_age_s: float
    job_id: str | None
    host: str
    pid: int


class JobQueue:
    """Submit, inspect and control quantization jobs; also the worker's side of the queue."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        # decode_responses: every value we store is text (JSON or plain strings).
        self.redis: Any = client or redis.Redis.from_url(
            settings.redis_url,
            decode_responses=True,
            socket_connect_timeout=5,
            socket_timeout=10,
            health_check_interval=15,
            retry_on_timeout=True,
        )
        self._scripts = Scripts.register(self.redis)

    # --- client side --------------------------------------------------------------

    def submit(self, spec: JobSpec, priority: Priority = Priority.NORMAL) -> Job:
        job = Job(
            id=Job.new_id(),
            spec=spec,
            priority=priority,
            max_attempts=self.settings.max_attempts,
        )
        # A Redis counter, not the clock: two submits in the same millisecond (or from
        # hosts with skewed clocks) still run in the order Redis received them.
        score = priority.rank * 1e13 + self.redis.incr(keys.SUBMIT_SEQ)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.job(job.id), mapping={**job.to_redis(), "score": repr(score)})
            pipe.zadd(keys.QUEUE, {job.id: score})
            pipe.lpush(keys.WAKE, job.id)
            pipe.ltrim(keys.WAKE, 0, 999)
            pipe.execute()
        return job

    def get(self, job_id: str) -> Job:
        raw = self._read(job_id)
        if not raw:
            raise JobNotFound(job_id)
        return _parse(job_id, raw)

    def _read(self, job_id: str) -> dict[str, str]:
        try:
            return dict(self.redis.hgetall(keys.job(job_id)))
        except UnicodeDecodeError as e:  # decode_responses: a value that is not UTF-8 text
            raise CorruptJob(job_id, f"a field is not UTF-8 text ({e.reason})") from None

    def jobs(self, state: JobState | None = None, limit: int = 1000) -> list[Job]:
        """Jobs newest first, optionally in one state."""
        ids: list[str] = []
        ids += self.redis.zrange(keys.QUEUE, 0, limit - 1)
        ids += self.redis.zrange(keys.RUNNING, 0, -1)
        ids += self.redis.zrevrange(keys.ENDED, 0, limit - 1)
        jobs = []
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(keys.job(job_id))
            try:
                raws = pipe.execute()
            except UnicodeDecodeError:  # one hash is not text: read one by one to name it
                raws = [self._read(job_id) for job_id in ids]
        stale = []
        for job_id, raw in zip(ids, raws, strict=True):
            if not raw:
                stale.append(job_id)  # expired by its result TTL
                continue
            job = _parse(job_id, raw)
            if state is None or job.state == state:
                jobs.append(job)
        if stale:
            self.redis.zrem(keys.ENDED, *stale)
        jobs.sort(key=lambda j: j.created_at, reverse=True)
        return jobs[:limit]

    def queue_depth(self) -> int:
        return int(self.redis.zcard(keys.QUEUE))

    def cancel(self, job_id: str) -> CancelOutcome:
        """Cancel a job: a queued job ends at once; a running one is stopped by its worker.

        Raises:
            JobNotFound: no such job.
            InvalidTransition: the job already ended (succeeded, failed or cancelled).
        """
        out = self._scripts.cancel(
            keys=[keys.QUEUE, keys.ENDED, keys.job(job_id), keys.job_log(job_id)],
            args=[job_id, time.time(), self.settings.result_ttl_s],
        )
        if out is None:
            raise JobNotFound(job_id)
        if out.startswith("ended:"):
            state = out.removeprefix("ended:")
            raise InvalidTransition(f"job {job_id} already {state}; nothing to cancel")
        return CancelOutcome(out)

    def retry(self, job_id: str) -> Job:
        """Queue a failed or cancelled job again, with a fresh attempt budget."""
        out = self._scripts.retry(
            keys=[keys.ENDED, keys.QUEUE, keys.WAKE, keys.job(job_id), keys.job_log(job_id)],
            args=[job_id],
        )
        if out is None:
            raise JobNotFound(job_id)
        if out != 1:
            raise InvalidTransition(
                f"job {job_id} is {out}; only failed or cancelled jobs can be retried"
            )
        return self.get(job_id)

    def purge(self, older_than_s: float) -> list[str]:
        """Delete ended jobs that ended more than `older_than_s` ago. Returns their ids."""
        cutoff = time.time() - older_than_s
        ids = self.redis.zrangebyscore(keys.ENDED, "-inf", cutoff)
        if ids:
            with self.redis.pipeline(transaction=True) as pipe:
                for job_id in ids:
                    pipe.delete(keys.job(job_id), keys.job_log(job_id))
                pipe.zrem(keys.ENDED, *ids)
                pipe.execute()
        return list(ids)

    def logs(self, job_id: str, start: int = 0) -> list[str]:
        """Log lines of a job from index `start` of what is kept."""
        return list(self.redis.lrange(keys.job_log(job_id), start, -1))

    def follow_logs(self, job_id: str, poll_s: float = 0.5) -> Iterator[str]:
        """Yield log lines as they arrive until the job ends."""
        seen = 0
        while True:
            lines = through_restarts(partial(self.logs, job_id, seen))
            # The list is capped; when it rolled over, restart from what is kept.
            seen += len(lines)
            yield from lines
            if through_restarts(partial(self.get, job_id)).state.ended:
                yield from self.logs(job_id, seen)
                return
            time.sleep(poll_s)

    def workers(self) -> list[WorkerInfo]:
        now = time.time()
        out = []
        for worker_id, beat in self.redis.zrange(keys.WORKERS, 0, -1, withscores=True):
            age = now - beat
            if age > self.settings.heartbeat_timeout_s * 3:
                self.redis.zrem(keys.WORKERS, worker_id)  # long gone
                continue
            info = self.redis.hgetall(keys.worker(worker_id))
            out.append(
                WorkerInfo(
                    id=worker_id,
                    heartbeat_age_s=age,
                    job_id=info.get("job_id") or None,
                    host=info.get("host", ""),
                    pid=int(info.get("pid", 0) or 0),
                )
            )
        return out

    # --- worker side --------------------------------------------------------------

    def wait_for_work(self, timeout_s: float) -> None:
        """Block until a job is submitted or the timeout passes."""
        self.redis.blpop([keys.WAKE], timeout=timeout_s)

    def claim(self, worker_id: str) -> Job | None:
        while True:
            now = time.time()
            job_id = self._scripts.claim(
                keys=[keys.QUEUE, keys.RUNNING],
                args=[keys.JOB, worker_id, now, now + self.settings.heartbeat_timeout_s],
            )
            if not job_id:
                return None
            try:
                return self.get(job_id)
            except CorruptJob as e:
                # Raising here would crash every worker that claims the job, one after the
                # other, as the reaper re-queues it: end it as failed with the reason instead.
                attempt = self.redis.hget(keys.job(job_id), "attempts")
                reason = f"{e}; it was not run"
                self._end_attempt(job_id, attempt, worker_id, JobState.FAILED, error=reason)

    def heartbeat(self, job: Job, worker_id: str) -> bool:
        """Renew the job's deadline; False when this attempt no longer owns the job."""
        deadline = time.time() + self.settings.heartbeat_timeout_s
        return bool(
            self._scripts.heartbeat(
                keys=[keys.job(job.id), keys.RUNNING],
                args=[worker_id, job.attempts, deadline, job.id],
            )
        )

    def beat_worker(self, worker_id: str, host: str, pid: int, job_id: str | None) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(keys.WORKERS, {worker_id: time.time()})
            pipe.hset(
                keys.worker(worker_id),
                mapping={"host": host, "pid": str(pid), "job_id": job_id or ""},
            )
            pipe.expire(keys.worker(worker_id), int(self.settings.heartbeat_timeout_s * 3) + 1)
            pipe.execute()

    def remove_worker(self, worker_id: str) -> None:
        self.redis.zrem(keys.WORKERS, worker_id)
        self.redis.delete(keys.worker(worker_id))

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(keys.job(job_id), "cancel_requested") == "1"

    def set_progress(self, job: Job, progress: Progress) -> None:
        self.redis.hset(keys.job(job.id), "progress", progress.model_dump_json())

    def log(self, job_id: str, line: str) -> None:
        key = keys.job_log(job_id)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.rpush(key, line)
            pipe.ltrim(key, -self.settings.job_log_lines, -1)
            pipe.execute()

    def _end_attempt(
        self, job_id: str, attempt: int | str, worker_id: str, state: JobState, **fields: str
    ) -> bool:
        """End a running attempt in `state`, setting `fields`; False when fenced off."""
        pairs = [item for field in fields.items() for item in field]
        now, ttl = time.time(), self.settings.result_ttl_s
        return bool(
            self._scripts.end(
                keys=[keys.job(job_id), keys.RUNNING, keys.ENDED, keys.job_log(job_id)],
                args=[worker_id, attempt, state.value, now, ttl, job_id, *pairs],
            )
        )

    def succeed(self, job: Job, worker_id: str, result: JobResult) -> bool:
        progress = Progress(stage=Stage.DONE, fraction=1.0, message="done")
        return self._end_attempt(
            job.id,
            job.attempts,
            worker_id,
            JobState.SUCCEEDED,
            result=result.model_dump_json(),
            progress=progress.model_dump_json(),
            error="",
        )

    def fail(self, job: Job, worker_id: str, error: str) -> bool:
        return self._end_attempt(job.id, job.attempts, worker_id, JobState.FAILED, error=error)

    def mark_cancelled(self, job: Job, worker_id: str) -> bool:
        return self._end_attempt(
            job.id, job.attempts, worker_id, JobState.CANCELLED, error="cancelled while running"
        )

    def requeue_own(self, job: Job, worker_id: str, reason: str, refund: bool) -> bool:
        """Return this worker's attempt to the queue; `refund` un-counts the attempt."""
        return bool(
            self._scripts.requeue_own(
                keys=[keys.job(job.id), keys.RUNNING, keys.QUEUE, keys.WAKE],
                args=[worker_id, job.attempts, job.id, "1" if refund else "0", reason],
            )
        )

    def reap(self) -> list[tuple[str, str]]:
        """Re-queue or fail jobs of dead workers. Returns (job id, action) pairs."""
        out = self._scripts.reap(
            keys=[keys.RUNNING, keys.QUEUE, keys.ENDED, keys.WAKE],
            args=[keys.JOB, time.time(), self.settings.result_ttl_s, keys.JOB_LOG],
        )
        return list(zip(out[::2], out[1::2], strict=True))
