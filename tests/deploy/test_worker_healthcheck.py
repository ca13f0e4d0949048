"""The worker image's HEALTHCHECK (`python -m nvfp4_worker.healthcheck`) against a real
Redis and a real worker process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nvfp4_common.queue import JobQueue
from nvfp4_common.settings import Settings
from nvfp4_worker.healthcheck import check

pytestmark = pytest.mark.timeout(120)


def _env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVFP4_")}
    env.update(
        NVFP4_REDIS_URL=settings.redis_url,
        NVFP4_MODELS_DIR=str(settings.models_dir),
        NVFP4_HEARTBEAT_TIMEOUT_S=str(settings.heartbeat_timeout_s),
    )
    return env


def _healthcheck(settings: Settings, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nvfp4_worker.healthcheck"],
        env=_env(settings),
        cwd=cwd,  # no .env there
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_unhealthy_without_a_worker(settings: Settings, tmp_path: Path) -> None:
    out = _healthcheck(settings, tmp_path)
    assert out.returncode == 1
    assert "no worker on host" in out.stderr


def test_unhealthy_when_redis_is_unreachable(settings: Settings, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gone = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})
    out = _healthcheck(gone, tmp_path)
    assert out.returncode == 1
    assert "cannot read worker heartbeats" in out.stderr


def test_healthy_while_a_real_worker_runs_then_not(settings: Settings, tmp_path: Path) -> None:
    worker = subprocess.Popen(
        [sys.executable, "-m", "nvfp4_worker"],
        env=_env(settings),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while (out := _healthcheck(settings, tmp_path)).returncode != 0:
            assert worker.poll() is None, "the worker exited"
            assert time.time() < deadline, out.stderr
            time.sleep(0.5)
        assert out.stdout.strip() == "healthy"
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
    # A worker that stops cleanly removes its heartbeat: unhealthy at once.
    assert _healthcheck(settings, tmp_path).returncode == 1


def test_a_stale_heartbeat_or_another_hosts_worker_is_not_healthy(settings: Settings) -> None:
    queue = JobQueue(settings)
    host = socket.gethostname()
    queue.beat_worker("elsewhere-1", "some-other-host", 1, None)
    assert check(settings, host) == f"no worker on host {host!r} has sent a heartbeat"
    quick = settings.model_copy(update={"heartbeat_timeout_s": 0.5})
    queue.beat_worker("here-1", host, 1, None)
    assert check(quick, host) is None
    time.sleep(0.8)  # older than the timeout, younger than 3x (when entries are dropped)
    problem = check(quick, host)
    assert problem is not None and "s old" in problem
