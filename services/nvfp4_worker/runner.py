"""One job attempt, run in a fresh process by the worker (`python -m nvfp4_worker.runner`).

The process records the outcome itself (succeeded or failed, fenced by worker id and
attempt) and exits 0. Any other exit is handled by the worker: a signal means it was
killed (re-queued while attempts remain), another code is a crash.
"""

from __future__ import annotations

import os
import sys
import traceback

from nvfp4_common.jobs import JobState
from nvfp4_common.queue import JobQueue, through_restarts
from nvfp4_common.settings import get_settings
from nvfp4_worker.errors import JobError
from nvfp4_worker.reporter import RedisReporter

# The recorded error is shown on one line by `nvfp4ctl jobs list/show` and the job API;
# details (tracebacks, long tool output) belong in the job's log.
ERROR_MAX_CHARS = 500


def one_line(text: str, limit: int = ERROR_MAX_CHARS) -> str:
    """`text` with every run of whitespace (newlines included) made one space, cut to
    `limit` characters: messages embed exception text, which is often several lines."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3].rstrip() + "..."


def main(argv: list[str]) -> int:
    job_id, worker_id, attempt = argv[0], argv[1], int(argv[2])
    settings = get_settings()
    queue = JobQueue(settings)
    job = queue.get(job_id)
    if job.state != JobState.RUNNING or job.worker_id != worker_id or job.attempts != attempt:
        return 0  # re-queued or cancelled before we started: nothing to do
    reporter = RedisReporter(queue, job)
    reporter.log(f"attempt {job.attempts} of {job.max_attempts} on {worker_id}")
    try:
        # Imported here so the worker loop itself never loads torch.
        from nvfp4_worker.pipeline import run as run_pipeline

        result = run_pipeline(job.spec, settings, reporter, job.id)
    # The outcome is recorded through a Redis restart: an hour of calibration must not
    # be lost to a few seconds without Redis.
    except JobError as e:
        reason = one_line(str(e)) or "failed (no reason given)"
        reporter.log(f"failed: {reason}")
        if reason != str(e):  # the log keeps the whole text, one entry per line
            for line in str(e).splitlines():
                reporter.log(f"  {line}")
        through_restarts(lambda: queue.fail(job, worker_id, reason))
        return 0
    except Exception as e:  # a bug: keep the traceback in the job's log
        for line in traceback.format_exc().splitlines()[-30:]:
            reporter.log(line)
        error = one_line(f"internal error: {type(e).__name__}: {e}")
        through_restarts(lambda: queue.fail(job, worker_id, error))
        return 0
    reporter.log(f"succeeded: {result.output_path}")
    through_restarts(lambda: queue.succeed(job, worker_id, result))
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown (seconds with torch and CUDA loaded): the outcome is
    # recorded, the OS frees the memory, and the worker is free for the next job sooner.
    os._exit(code)
