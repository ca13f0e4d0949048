"""Shared fixtures: a private Redis server per test session, fresh settings per test."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from nvfp4_common.queue import JobQueue
from nvfp4_common.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A real redis-server on a free loopback port, in its own folder."""

    def __init__(self, workdir: Path, appendonly: bool = False, password: str | None = None):
        self.workdir = workdir
        self.port = free_port()
        self.appendonly = appendonly
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir)]
        args += ["--save", "", "--appendonly", "yes" if self.appendonly else "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.time() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


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
