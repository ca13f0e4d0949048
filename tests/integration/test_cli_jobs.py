"""`nvfp4ctl jobs` and `workers list` against a real Redis.

Where a job must move (watch, --wait, logs --follow), a thread plays the worker through
JobQueue's worker-side calls (claim, set_progress, log, succeed/fail) — the same calls
nvfp4_worker makes — so no model has to be quantized.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from nvfp4_admin.cli import cli
from nvfp4_common.jobs import JobResult, JobState, Progress, Stage
from nvfp4_common.queue import JobQueue
from tests.conftest import RedisServer


def run(redis_url: str, *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env={"NVFP4_REDIS_URL": redis_url})


def submit(redis_url: str, *args: str) -> dict[str, Any]:
    out = run(redis_url, "jobs", "submit", *args, "--json")
    assert out.exit_code == 0, out.output
    return json.loads(out.output)


def test_submit_list_show_cancel_retry_purge(redis_url: str, queue: JobQueue) -> None:
    job = submit(
        redis_url,
        "Qwen/Qwen3-0.6B",
        "--format",
        "nvfp4-fp8kv",
        "--calib-samples",
        "16",
        "--calib-seq-len",
        "256",
        "--eval-samples",
        "0",
        "--exclude",
        "*down_proj*",
        "--exclude",
        "*layers.0.*",
        "--name",
        "qwen-small",
        "--priority",
        "high",
    )
    stored = queue.get(job["id"])
    assert stored.spec.format.value == "nvfp4-fp8kv"
    assert stored.spec.exclude == ["*down_proj*", "*layers.0.*"]
    assert (stored.spec.calib_samples, stored.spec.calib_seq_len, stored.spec.eval_samples) == (
        16,
        256,
        0,
    )
    assert stored.spec.output_name == "qwen-small" and stored.priority.value == "high"
    assert stored.spec.calib_dataset == "allenai/c4"  # unset options keep the job defaults
    other = submit(redis_url, "/models/base")

    listed = run(redis_url, "jobs", "list")
    assert listed.exit_code == 0
    assert job["id"] in listed.output and other["id"] in listed.output
    assert listed.output.splitlines()[0].split()[:3] == ["ID", "STATE", "PRIORITY"]
    only_queued = json.loads(run(redis_url, "jobs", "list", "--state", "queued", "--json").output)
    assert {j["id"] for j in only_queued} == {job["id"], other["id"]}

    shown = run(redis_url, "jobs", "show", job["id"])
    assert shown.exit_code == 0
    assert (
        "16 x 256 tokens from allenai/c4" in shown.output
        and "*down_proj*, *layers.0.*" in shown.output
    )

    cancelled = run(redis_url, "jobs", "cancel", job["id"])
    assert cancelled.output == f"{job['id']} cancelled\n"
    assert queue.get(job["id"]).state == JobState.CANCELLED
    assert "already cancelled" in run(redis_url, "jobs", "cancel", job["id"]).output
    assert (
        json.loads(run(redis_url, "jobs", "list", "--state", "cancelled", "--json").output)[0]["id"]
        == job["id"]
    )

    retried = run(redis_url, "jobs", "retry", job["id"])
    assert retried.exit_code == 0 and queue.get(job["id"]).state == JobState.QUEUED
    refused = run(redis_url, "jobs", "retry", other["id"])
    assert refused.exit_code == 1
    assert (
        refused.output
        == f"Error: job {other['id']} is queued; only failed or cancelled jobs can be retried\n"
    )

    run(redis_url, "jobs", "cancel", other["id"])
    kept = json.loads(run(redis_url, "jobs", "purge", "--older-than", "1h", "--json").output)
    assert kept == {"purged": []}
    time.sleep(0.01)
    purged = json.loads(run(redis_url, "jobs", "purge", "--older-than", "0s", "--json").output)
    assert purged == {"purged": [other["id"]]}
    gone = run(redis_url, "jobs", "show", other["id"])
    assert (
        gone.exit_code == 1
        and gone.output == f"Error: no job '{other['id']}' (it may have expired or been purged)\n"
    )


def test_running_job_cancel_is_requested(redis_url: str, queue: JobQueue) -> None:
    job = submit(redis_url, "m")
    assert queue.claim("w1") is not None
    out = run(redis_url, "jobs", "cancel", job["id"])
    assert "cancelling" in out.output and queue.cancel_requested(job["id"])


def _play_worker(queue: JobQueue, outcome: str) -> threading.Thread:
    def work() -> None:
        job = None
        while job is None:
            job = queue.claim("test-worker")
            time.sleep(0.05)
        for stage in (Stage.LOADING, Stage.CALIBRATING, Stage.EXPORTING):
            queue.set_progress(
                job, Progress(stage=stage, fraction=0.5, message=f"{stage.value} half")
            )
            queue.log(job.id, f"{stage.value} started")
            time.sleep(1.2)  # longer than the CLI's 0.5 s poll, so each stage is seen
        if outcome == "succeed":
            result = JobResult(
                output_name="m-NVFP4",
                output_path="/models/m-NVFP4",
                source_bytes=4000,
                output_bytes=1300,
                perplexity_base=10.0,
                perplexity_quant=10.5,
                perplexity_change_pct=5.0,
                duration_s=1.0,
            )
            queue.succeed(job, "test-worker", result)
        else:
            queue.fail(job, "test-worker", "calibration ran out of memory")

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_submit_wait_follows_progress_to_success(redis_url: str, queue: JobQueue) -> None:
    thread = _play_worker(queue, "succeed")
    out = run(redis_url, "jobs", "submit", "m", "--wait")
    thread.join(10)
    assert out.exit_code == 0, out.output
    assert "calibrating 50% (3/6)" in out.output and "calibrating half" in out.output
    assert out.output.rstrip().endswith("succeeded: /models/m-NVFP4")
    job_id = out.output.split()[1].rstrip(":")
    shown = run(redis_url, "jobs", "show", job_id)
    assert (
        "3.91 KiB -> 1.27 KiB (0.33x)" in shown.output and "10.00 -> 10.50 (+5.0%)" in shown.output
    )
    logs = run(redis_url, "jobs", "logs", job_id)
    assert logs.output.splitlines() == [
        "loading started",
        "calibrating started",
        "exporting started",
    ]


def test_watch_exits_1_when_the_job_fails(redis_url: str, queue: JobQueue) -> None:
    job = submit(redis_url, "m")
    thread = _play_worker(queue, "fail")
    out = run(redis_url, "jobs", "watch", job["id"])
    thread.join(10)
    assert out.exit_code == 1
    assert "failed: calibration ran out of memory" in out.output


def test_logs_follow_until_the_job_ends(redis_url: str, queue: JobQueue) -> None:
    job = submit(redis_url, "m")
    thread = _play_worker(queue, "succeed")
    out = run(redis_url, "jobs", "logs", job["id"], "--follow")
    thread.join(10)
    assert out.exit_code == 0
    assert out.output.splitlines() == [
        "loading started",
        "calibrating started",
        "exporting started",
    ]


def test_workers_list_shows_heartbeats(redis_url: str, queue: JobQueue) -> None:
    job = submit(redis_url, "m")
    queue.beat_worker("gpu-box-1234", host="gpu-box", pid=1234, job_id=job["id"])
    queue.beat_worker("gpu-box-5678", host="gpu-box", pid=5678, job_id=None)
    out = run(redis_url, "workers", "list")
    assert out.exit_code == 0
    lines = out.output.splitlines()
    assert lines[0].split() == ["WORKER", "HOST", "PID", "JOB", "HEARTBEAT", "STATE"]
    assert lines[1].split()[:4] == ["gpu-box-1234", "gpu-box", "1234", job["id"]]
    assert lines[2].split()[3] == "idle" and lines[2].split()[-1] == "alive"
    assert lines[-1] == "queued jobs: 1"
    data = json.loads(run(redis_url, "workers", "list", "--json").output)
    assert [w["job_id"] for w in data] == [job["id"], None] and all(w["alive"] for w in data)


@pytest.mark.parametrize(
    "args", [["jobs", "list"], ["jobs", "submit", "m"], ["workers", "list"], ["jobs", "show", "x"]]
)
def test_unreachable_redis_is_one_line(args: list[str]) -> None:
    out = CliRunner().invoke(cli, ["--redis-url", "redis://:topsecret@127.0.0.1:9/0", *args])
    assert out.exit_code == 1
    assert out.output.startswith("Error: cannot reach Redis at redis://:***@127.0.0.1:9/0: ")
    assert out.output.count("\n") == 1 and "topsecret" not in out.output


def test_wrong_password_is_one_line(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", password="right-password")
    server.start()
    try:
        bad = server.url.replace("right-password", "wrong-password")
        out = CliRunner().invoke(cli, ["--redis-url", bad, "jobs", "list"])
        assert out.exit_code == 1, out.output
        assert out.output.startswith("Error: Redis at redis://:***@127.0.0.1:")
        assert "refused the password" in out.output
        assert "wrong-password" not in out.output and out.output.count("\n") == 1
        ok = CliRunner().invoke(cli, ["--redis-url", server.url, "jobs", "list"])
        assert ok.exit_code == 0 and ok.output == "no jobs\n"
    finally:
        server.stop()


def test_debug_shows_the_traceback() -> None:
    out = CliRunner().invoke(
        cli, ["--debug", "--redis-url", "redis://127.0.0.1:9/0", "jobs", "list"]
    )
    assert out.exit_code == 1
    assert type(out.exception).__name__ == "ConnectionError"
