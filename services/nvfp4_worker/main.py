"""The worker loop: claim a job, run it in a fresh process, watch it, repeat.

Each job runs in its own child process (`nvfp4_worker.runner`) because:
- GPU memory is only reliably returned when the process that used it exits;
- a cancel must stop a job promptly, even inside a long CUDA kernel or calibration loop;
- a job killed by the OOM killer takes only its own process down, and the worker
  re-queues it (the attempt still counts, so a job that always runs out of memory ends).
The parent stays small and keeps renewing the job's heartbeat while the child works; it
also re-queues jobs of dead workers (busy or idle) and serves Prometheus metrics.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

import redis

from nvfp4_common.jobs import Job
from nvfp4_common.queue import JobQueue
from nvfp4_common.settings import Settings, mask_url
from nvfp4_worker.metrics import WorkerMetrics, serve
from nvfp4_worker.publish import remove_stale

log = logging.getLogger("nvfp4_worker")


class Worker:
    def __init__(
        self,
        settings: Settings,
        queue: JobQueue | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue or JobQueue(settings)
        self.metrics = metrics or WorkerMetrics(self.queue)
        self.id = settings.worker_name
        self.host = socket.gethostname()
        self._stopping = False
        # Wait at most this long between looks at Redis (cancel requests, shutdown).
        self._poll_s = min(0.5, settings.heartbeat_interval_s)
        # A busy worker looks for dead workers' jobs this often, so they are re-queued
        # within 1.5 heartbeat timeouts even when no worker is idle. The reap is one short
        # script over the running set.
        self._reap_every_s = max(settings.heartbeat_interval_s, settings.heartbeat_timeout_s / 2)

    def stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        if not self._stopping:
            log.info("shutting down (signal %s)", signum)
        self._stopping = True

    def run(self, burst: bool = False) -> None:
        """Work until stopped; with `burst`, return once the queue is empty."""
        log.info("worker %s started (redis %s)", self.id, mask_url(self.settings.redis_url))
        backoff = 0.5
        while not self._stopping:
            try:
                self.queue.beat_worker(self.id, self.host, os.getpid(), None)
                self._reap()
                job = self.queue.claim(self.id)
                backoff = 0.5
                if job is None:
                    if burst:
                        break
                    self.queue.wait_for_work(timeout_s=1.0)
                    continue
                self._run(job)
            except redis.ConnectionError as e:
                # Redis restarting: keep the worker alive and try again, backing off.
                log.warning("redis unavailable (%s); retrying in %.1f s", e, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
        with contextlib.suppress(redis.ConnectionError):
            self.queue.remove_worker(self.id)
        log.info("worker %s stopped", self.id)

    def _reap(self) -> None:
        for job_id, action in self.queue.reap():
            log.warning("job %s of a dead worker: %s", job_id, action)

    def _run(self, job: Job) -> None:
        started = time.monotonic()
        self.metrics.job_started()
        outcome = None
        try:
            outcome = self._supervise(job)
        finally:
            self.metrics.job_ended(outcome, time.monotonic() - started)

    def _supervise(self, job: Job) -> str | None:
        """Run one attempt in a child process; returns how it ended (metrics.OUTCOMES),
        None when the job process found nothing to do."""
        log.info("job %s attempt %d/%d: %s", job.id, job.attempts, job.max_attempts, job.spec.model)
        child = subprocess.Popen(
            [sys.executable, "-m", "nvfp4_worker.runner", job.id, self.id, str(job.attempts)],
            start_new_session=True,  # its own process group, so a cancel reaches its children
            preexec_fn=_die_with_parent,
        )
        next_beat = 0.0
        next_reap = time.monotonic() + self._reap_every_s
        while True:
            try:
                code = child.wait(timeout=self._poll_s)
                break
            except subprocess.TimeoutExpired:
                pass
            try:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.settings.heartbeat_interval_s
                    self.queue.beat_worker(self.id, self.host, os.getpid(), job.id)
                    if not self.queue.heartbeat(job, self.id) and not self._ending(job):
                        log.warning(
                            "job %s: this attempt no longer owns the job; stopping it", job.id
                        )
                        self._kill(child)
                        return "requeued"
                    if time.monotonic() >= next_reap:
                        next_reap = time.monotonic() + self._reap_every_s
                        self._reap()
                if self.queue.cancel_requested(job.id):
                    self._kill(child)
                    self._remove_partial_output(job)
                    self.queue.mark_cancelled(job, self.id)
                    log.info("job %s cancelled", job.id)
                    return "cancelled"
            except redis.ConnectionError as e:
                # The job keeps running; if Redis stays away past the heartbeat timeout the
                # job is re-queued and this attempt is fenced off when we get back.
                log.warning("redis unavailable during job %s: %s", job.id, e)
            if self._stopping:
                self._kill(child)
                self._remove_partial_output(job)
                self.queue.requeue_own(job, self.id, "worker shut down; re-queued", refund=True)
                log.info("job %s re-queued for another worker", job.id)
                return "requeued"
        return self._after_exit(job, code)

    def _ending(self, job: Job) -> bool:
        """True when the job process itself just recorded the outcome and is exiting."""
        current = self.queue.get(job.id)
        return current.state.ended and current.worker_id == self.id

    def _after_exit(self, job: Job, code: int) -> str | None:
        if code == 0:
            return self._recorded_outcome(job)  # the job process recorded it itself
        self._remove_partial_output(job)
        if code < 0:
            # A cgroup OOM kill (the container's memory limit) hits the job process only.
            reason = f"job process killed by {signal.Signals(-code).name}"
            if -code == signal.SIGKILL:
                reason += " (out of memory?)"
            where = f"on attempt {job.attempts} of {job.max_attempts}"
            if job.attempts < job.max_attempts:
                # The attempt counts: a job that always runs out of memory ends.
                self.queue.requeue_own(job, self.id, f"{reason} {where}; re-queued", refund=False)
                self._job_log(job, f"{reason} {where}; re-queued")
                log.warning("job %s: %s; re-queued", job.id, reason)
                return "requeued"
            self.queue.fail(job, self.id, f"{reason} {where}")
            self._job_log(job, f"{reason} {where}; no attempts left")
            log.error("job %s: %s; no attempts left", job.id, reason)
            return "failed"
        self.queue.fail(job, self.id, f"job process exited with code {code}; see the worker log")
        return "failed"

    def _recorded_outcome(self, job: Job) -> str | None:
        try:
            current = self.queue.get(job.id)
        except (redis.RedisError, LookupError, ValueError):
            return None
        mine = current.worker_id == self.id and current.attempts == job.attempts
        return current.state.value if mine and current.state.ended else None

    def _job_log(self, job: Job, message: str) -> None:
        """A line in the job's own log (what `nvfp4ctl jobs logs` shows), best effort."""
        with contextlib.suppress(redis.RedisError):
            self.queue.log(job.id, f"{time.strftime('%H:%M:%S')} {message}")

    def _remove_partial_output(self, job: Job) -> None:
        """Delete the temp folder of an attempt that was stopped or died. Done while this
        worker still owns the attempt, so it never touches another attempt's folder."""
        for path in remove_stale(self.settings.models_dir, job.id):
            log.info("job %s: removed partial output %s", job.id, path.name)

    def _kill(self, child: subprocess.Popen[bytes]) -> None:
        """SIGTERM the job's process group, then SIGKILL after the grace period."""
        for sig, wait_s in ((signal.SIGTERM, self.settings.cancel_grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                child.wait()
                return
            try:
                child.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue


def _die_with_parent() -> None:
    """In the job process: get SIGKILL when the worker dies, so an orphan never keeps
    holding GPU memory or publishes for a job that was re-queued."""
    if sys.platform == "linux":
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from nvfp4_common.errors import InvalidSettings
    from nvfp4_common.settings import get_settings

    parser = argparse.ArgumentParser(prog="python -m nvfp4_worker", description=__doc__)
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = get_settings()
    except InvalidSettings as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    worker = Worker(settings)
    port = settings.worker_metrics_port
    if port:
        try:
            serve(worker.metrics, port)
            log.info("metrics on port %d at /metrics", port)
        except OSError as e:  # e.g. a second worker on this host: run on, without metrics
            log.warning("metrics endpoint not started on port %d: %s", port, e.strerror or e)
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    worker.run(burst=args.burst)
    return 0
