"""Jobs through Redis to real worker processes running real ModelOpt quantization."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from safetensors import safe_open

from nvfp4_common.jobs import Job, JobSpec, JobState, Stage
from nvfp4_common.queue import JobQueue
from nvfp4_common.settings import Settings

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def job_settings(settings: Settings, tiny_model: Path, calib_file: Path) -> Settings:
    """Settings whose model roots hold the test model and the calibration text."""
    return settings.model_copy(update={"model_roots": [tiny_model.parent, calib_file.parent]})


@pytest.fixture
def q(job_settings: Settings) -> JobQueue:
    return JobQueue(job_settings)


@pytest.fixture
def start_worker(job_settings: Settings) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start `python -m nvfp4_worker` processes; stops whatever is still running at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "NVFP4_REDIS_URL": job_settings.redis_url,
            "NVFP4_MODELS_DIR": str(job_settings.models_dir),
            "NVFP4_MODEL_ROOTS": json.dumps([str(p) for p in job_settings.model_roots]),
            "NVFP4_HEARTBEAT_INTERVAL_S": str(job_settings.heartbeat_interval_s),
            "NVFP4_HEARTBEAT_TIMEOUT_S": str(job_settings.heartbeat_timeout_s),
            "NVFP4_CANCEL_GRACE_S": str(job_settings.cancel_grace_s),
            "NVFP4_HF_OFFLINE": "true",
            "HF_HUB_OFFLINE": "1",
        }
        proc = subprocess.Popen([sys.executable, "-m", "nvfp4_worker", *args], env=env)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_for(q: JobQueue, job_id: str, until: Callable[[Job], bool], timeout: float = 300) -> Job:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = q.get(job_id)
        if until(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"timed out; job is {q.get(job_id)!r}")


def calibrating(q: JobQueue, job_id: str) -> None:
    """Wait until the job is calibrating; fail at once if it ended instead."""
    job = wait_for(q, job_id, lambda j: j.progress.stage == Stage.CALIBRATING or ended(j), 120)
    assert not job.state.ended, f"job ended before calibrating: {job.error}"


def ended(job: Job) -> bool:
    return job.state.ended


def spec(model: Path, calib: Path, **kw: object) -> JobSpec:
    fields: dict[str, object] = {
        "model": str(model),
        "calib_dataset": str(calib),
        "calib_samples": 8,
        "calib_seq_len": 64,
        "eval_samples": 2,
    }
    fields.update(kw)
    return JobSpec.model_validate(fields)


def test_job_from_redis_is_quantized_to_nvfp4_by_a_worker_process(
    q: JobQueue,
    start_worker: Callable[..., subprocess.Popen[bytes]],
    tiny_model: Path,
    calib_file: Path,
) -> None:
    job = q.submit(spec(tiny_model, calib_file, output_name="tiny-nvfp4"))
    worker = start_worker("--burst")
    done = wait_for(q, job.id, ended)
    assert worker.wait(60) == 0
    assert done.state == JobState.SUCCEEDED, done.error
    assert done.attempts == 1
    assert done.progress.stage == Stage.DONE
    assert done.result is not None and done.result.output_bytes < done.result.source_bytes

    out = q.settings.models_dir / "tiny-nvfp4"
    assert Path(done.result.output_path) == out
    quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "NVFP4" and quant["group_size"] == 16
    assert any("lm_head" in m for m in quant["exclude_modules"])
    dtypes: dict[str, str] = {}
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                dtypes[name] = str(f.get_slice(name).get_dtype())
    assert dtypes["model.layers.0.mlp.down_proj.weight"] == "U8"
    assert dtypes["model.layers.0.mlp.down_proj.weight_scale"] == "F8_E4M3"
    assert dtypes["model.layers.0.mlp.down_proj.weight_scale_2"] == "F32"
    assert dtypes["lm_head.weight"] == "BF16"
    report = json.loads((out / "report.json").read_text())
    assert report["job_id"] == job.id
    assert (out / "README.md").read_text().count("NVFP4") >= 2
    stages = "\n".join(q.logs(job.id))
    assert "succeeded" in stages


def test_bad_input_fails_in_one_line_and_the_worker_goes_on(
    q: JobQueue,
    start_worker: Callable[..., subprocess.Popen[bytes]],
    tiny_model: Path,
    calib_file: Path,
) -> None:
    missing = q.submit(spec(tiny_model.parent / "no-such-model", calib_file))
    no_data = q.submit(spec(tiny_model, calib_file.parent / "missing.txt"))
    good = q.submit(spec(tiny_model, calib_file, output_name="after-bad-input"))
    worker = start_worker("--burst")
    for bad in (missing, no_data):
        failed = wait_for(q, bad.id, ended)
        assert failed.state == JobState.FAILED
        assert failed.error and "\n" not in failed.error and "Traceback" not in failed.error
        assert failed.attempts == 1  # bad input is not retried
    assert wait_for(q, good.id, ended).state == JobState.SUCCEEDED
    assert worker.wait(60) == 0
    assert sorted(p.name for p in q.settings.models_dir.iterdir()) == ["after-bad-input"]


def _job_process(worker: subprocess.Popen[bytes]) -> psutil.Process:
    deadline = time.time() + 30
    while time.time() < deadline:
        children = psutil.Process(worker.pid).children()
        if children:
            return children[0]
        time.sleep(0.05)
    raise AssertionError("worker started no job process")


def test_worker_killed_mid_job_is_retried_and_publishes_once(
    q: JobQueue,
    start_worker: Callable[..., subprocess.Popen[bytes]],
    tiny_model: Path,
    calib_file: Path,
) -> None:
    job = q.submit(spec(tiny_model, calib_file, calib_samples=64, output_name="survivor"))
    first = start_worker()
    child = _job_process(first)
    calibrating(q, job.id)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    child.wait(10)  # the job process dies with its worker
    assert q.get(job.id).state == JobState.RUNNING  # until the heartbeat times out

    start_worker("--burst")
    done = wait_for(q, job.id, ended)
    assert done.state == JobState.SUCCEEDED, done.error
    assert done.attempts == 2
    assert any(
        "stopped sending heartbeats" in line or "attempt 2" in line for line in q.logs(job.id)
    )
    # Published exactly once, and no temporary folder left behind.
    assert sorted(p.name for p in q.settings.models_dir.iterdir()) == ["survivor"]


def test_cancel_stops_a_running_job_promptly_and_frees_its_process(
    q: JobQueue,
    start_worker: Callable[..., subprocess.Popen[bytes]],
    tiny_model: Path,
    calib_file: Path,
) -> None:
    job = q.submit(spec(tiny_model, calib_file, calib_samples=2000, calib_seq_len=256))
    worker = start_worker()
    child = _job_process(worker)
    calibrating(q, job.id)
    asked = time.time()
    assert q.cancel(job.id) == "cancelling"
    done = wait_for(q, job.id, ended, timeout=30)
    took = time.time() - asked
    assert done.state == JobState.CANCELLED
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert list(q.settings.models_dir.iterdir()) == []
    assert worker.poll() is None  # the worker keeps serving
    print(f"cancel took {took:.2f} s")


def test_cancel_of_a_queued_job_means_it_never_runs(
    q: JobQueue,
    start_worker: Callable[..., subprocess.Popen[bytes]],
    tiny_model: Path,
    calib_file: Path,
) -> None:
    job = q.submit(spec(tiny_model, calib_file))
    q.cancel(job.id)
    worker = start_worker("--burst")
    assert worker.wait(60) == 0
    assert q.get(job.id).state == JobState.CANCELLED
    assert q.get(job.id).attempts == 0
