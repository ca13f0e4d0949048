"""Jobs through Redis to real worker processes running real ModelOpt quantization.

A worker killed mid-job and Redis restarts are in tests/reliability/test_worker_faults.py.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from safetensors import safe_open

from nvfp4_common.jobs import JobState, Stage
from nvfp4_common.queue import JobQueue
from nvfp4_common.settings import Settings
from tests.worker_harness import calibrating, ended, job_process, spec, wait_for

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def q(job_settings: Settings) -> JobQueue:
    return JobQueue(job_settings)


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


def test_cancel_stops_a_running_job_promptly_and_frees_its_process(
    q: JobQueue,
    start_worker: Callable[..., subprocess.Popen[bytes]],
    tiny_model: Path,
    calib_file: Path,
) -> None:
    job = q.submit(spec(tiny_model, calib_file, calib_samples=2000, calib_seq_len=256))
    worker = start_worker()
    child = job_process(worker)
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
