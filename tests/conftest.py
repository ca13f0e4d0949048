"""Shared fixtures: a private Redis server per test session, fresh settings per test."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from devkit.redis_server import RedisServer, free_port  # noqa: F401 - tests import both here
from nvfp4_common.queue import JobQueue
from nvfp4_common.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The session's Redis, emptied before each test."""
    redis.Redis.from_url(redis_server.url).flushall()
    yield redis_server.url


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def settings(redis_url: str, models_dir: Path) -> Settings:
    """Settings for one test: its own models folder, quick heartbeats."""
    return Settings(
        redis_url=redis_url,
        models_dir=models_dir,
        heartbeat_interval_s=0.2,
        heartbeat_timeout_s=2.0,
        cancel_grace_s=2.0,
        _env_file=None,  # type: ignore[call-arg]
    )


@pytest.fixture
def queue(settings: Settings) -> JobQueue:
    return JobQueue(settings)


@pytest.fixture
def job_settings(settings: Settings, tiny_model: Path, calib_file: Path) -> Settings:
    """Settings whose model roots hold the test model and the calibration text."""
    return settings.model_copy(update={"model_roots": [tiny_model.parent, calib_file.parent]})


@pytest.fixture
def start_worker(job_settings: Settings) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start `python -m nvfp4_worker` processes; stops whatever still runs at the end."""
    from tests.worker_harness import Workers

    workers = Workers(job_settings)
    yield workers.start
    workers.stop_all()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BF16 Qwen3 with its own tokenizer: for plumbing, not quality."""
    from tests.fixtures.models import make_tiny_qwen3

    return make_tiny_qwen3(tmp_path_factory.mktemp("src") / "tiny-qwen3")


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Offline English text (Project Gutenberg plays) as a .txt calibration file."""
    from tests.fixtures.text import write_text_file

    return write_text_file(tmp_path_factory.mktemp("data") / "calib.txt", max_chars=1_500_000)


@pytest.fixture
def record_stat(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Keep a figure docs/reliability.md quotes: with NVFP4_RELIABILITY_STATS=path set
    (`make reliability` sets it), append one JSON line of what a test tried and survived
    (faults, inputs, requests, jobs lost); bench/reliability_totals.py sums them."""

    def record(name: str, **values: object) -> None:
        line = json.dumps({"test": request.node.nodeid, "name": name, **values})
        print(line)
        target = os.environ.get("NVFP4_RELIABILITY_STATS")
        if target:
            with Path(target).open("a") as f:
                f.write(line + "\n")

    return record
