"""Real worker processes (`python -m nvfp4_worker`) for tests, and waiting on jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from nvfp4_common.jobs import Job, JobSpec, Stage
from nvfp4_common.queue import JobQueue
from nvfp4_common.settings import Settings


class Workers:
    """Starts workers configured like `settings`; `stop_all` ends whatever still runs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.procs: list[subprocess.Popen[bytes]] = []

    def env(self) -> dict[str, str]:
        s = self.settings
        return {
            **os.environ,
            "NVFP4_REDIS_URL": s.redis_url,
            "NVFP4_MODELS_DIR": str(s.models_dir),
            "NVFP4_MODEL_ROOTS": json.dumps([str(p) for p in s.model_roots]),
            "NVFP4_HEARTBEAT_INTERVAL_S": str(s.heartbeat_interval_s),
            "NVFP4_HEARTBEAT_TIMEOUT_S": str(s.heartbeat_timeout_s),
            "NVFP4_CANCEL_GRACE_S": str(s.cancel_grace_s),
            "NVFP4_HF_OFFLINE": "true",
            "HF_HUB_OFFLINE": "1",
            # Tests run several workers on one host: none of them takes the metrics port.
            "NVFP4_WORKER_METRICS_PORT": "0",
        }

    def start(self, *args: str, **popen: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nvfp4_worker", *args],
            env=self.env(),
            **popen,  # type: ignore[call-overload]
        )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def job_process(worker: subprocess.Popen[bytes]) -> psutil.Process:
    """The process a worker started for its current job attempt."""
    deadline = time.time() + 30
    while time.time() < deadline:
        children = psutil.Process(worker.pid).children()
        if children:
            return children[0]
        time.sleep(0.05)
    raise AssertionError("worker started no job process")


def wait_for(q: JobQueue, job_id: str, until: Callable[[Job], bool], timeout: float = 300) -> Job:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = q.get(job_id)
        if until(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"timed out; job is {q.get(job_id)!r}")


def ended(job: Job) -> bool:
    return job.state.ended


def calibrating(q: JobQueue, job_id: str) -> None:
    """Wait until the job is calibrating; fail at once if it ended instead."""
    job = wait_for(q, job_id, lambda j: j.progress.stage == Stage.CALIBRATING or ended(j), 120)
    assert not job.state.ended, f"job ended before calibrating: {job.error}"


def kill_while_calibrating(q: JobQueue, job_id: str, worker: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker's job process once `job_id` calibrates, as an OOM kill does."""
    child = job_process(worker)
    calibrating(q, job_id)
    child.kill()


def published(settings: Settings) -> list[str]:
    """The folders in the models directory: finished outputs, and any left-over temp."""
    return sorted(p.name for p in settings.models_dir.iterdir())


def spec(model: Path, calib: Path, **kw: object) -> JobSpec:
    """A small job: a few short calibration samples, two evaluation samples."""
    fields: dict[str, object] = {
        "model": str(model),
        "calib_dataset": str(calib),
        "calib_samples": 8,
        "calib_seq_len": 64,
        "eval_samples": 2,
    }
    fields.update(kw)
    return JobSpec.model_validate(fields)
