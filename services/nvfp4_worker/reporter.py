"""How a running job reports progress and log lines."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Protocol

import redis

from nvfp4_common.jobs import Job, Progress, Stage
from nvfp4_common.queue import JobQueue


class Reporter(Protocol):
    def progress(self, stage: Stage, fraction: float = 0.0, message: str = "") -> None: ...

    def log(self, message: str) -> None: ...


class RedisReporter:
    """Writes progress to the job's hash and log lines to its capped log list.

    Progress updates are rate-limited: a calibration loop may report every batch, and
    Redis needs to hear about it only a few times a second. Both are best effort: while
    Redis restarts the job keeps running (its lines still go to stderr), and the next
    update after Redis is back brings the job's progress up to date.
    """

    def __init__(self, queue: JobQueue, job: Job, min_interval_s: float = 0.25) -> None:
        self.queue = queue
        self.job = job
        self.min_interval_s = min_interval_s
        self._last: tuple[Stage, float] | None = None

    def progress(self, stage: Stage, fraction: float = 0.0, message: str = "") -> None:
        now = time.monotonic()
        fraction = min(max(fraction, 0.0), 1.0)
        if (
            self._last
            and self._last[0] == stage
            and fraction < 1.0
            and now - self._last[1] < self.min_interval_s
        ):
            return
        self._last = (stage, now)
        progress = Progress(stage=stage, fraction=fraction, message=message)
        try:
            self.queue.set_progress(self.job, progress)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            print(f"progress not recorded (redis unavailable: {e})", file=sys.stderr, flush=True)

    def log(self, message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message}"
        print(line, file=sys.stderr, flush=True)
        # Already on stderr, which the worker's log keeps.
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            self.queue.log(self.job.id, line)


class PrintReporter:
    """For running the pipeline without a queue (benchmarks, scripts)."""

    def progress(self, stage: Stage, fraction: float = 0.0, message: str = "") -> None:
        print(f"[{stage.value} {fraction:4.0%}] {message}", file=sys.stderr, flush=True)

    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)
