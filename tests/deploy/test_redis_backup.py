"""The Redis backup and restore of docs/operations.md, step by step, with a real redis-server
configured as in docker-compose.yml (AOF on, fsync every second, RDB snapshots off).

Only the containers are left out: the same redis-server and redis-cli commands run here
on local folders instead of the redis-data volume.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

from nvfp4_common.jobs import JobSpec
from nvfp4_common.queue import JobQueue
from nvfp4_common.settings import Settings

PASSWORD = "backup-test-password"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, data: Path, *args: str, password: str | None = PASSWORD) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.port = _free_port()
        self.password = password
        cmd = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(data)]
        cmd += ["--save", "", *args]
        if password:
            cmd += ["--requirepass", password]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        self.client = redis.Redis(port=self.port, password=password, decode_responses=True)
        deadline = time.time() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.exceptions.BusyLoadingError:
                time.sleep(0.05)
            except redis.ConnectionError:
                assert time.time() < deadline, "redis did not start"
                time.sleep(0.05)

    def cli(self, *args: str) -> str:
        env = {**os.environ, "REDISCLI_AUTH": self.password or ""}
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout

    def stop(self) -> None:
        self.proc.terminate()  # SIGTERM: Redis flushes its AOF and exits, as under Docker
        assert self.proc.wait(10) == 0


def test_online_rdb_backup_restores_the_job_queue(tmp_path: Path) -> None:
    live, restored, backups = tmp_path / "live", tmp_path / "restored", tmp_path / "backups"
    for d in (live, restored, backups):
        d.mkdir()
    server = Server(live, "--appendonly", "yes", "--appendfsync", "everysec")
    settings = Settings(redis_url=f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0", _env_file=None)  # type: ignore[call-arg]
    jobs = [JobQueue(settings).submit(JobSpec(model=f"org/model-{i}")) for i in range(3)]
    # Backup, online: redis-cli --rdb streams a consistent snapshot.
    server.cli("--rdb", str(backups / "backup.rdb"))
    server.stop()

    # The trap the procedure avoids: with AOF on, Redis ignores a dump.rdb.
    shutil.copy(backups / "backup.rdb", restored / "dump.rdb")
    naive = Server(restored, "--appendonly", "yes")
    assert naive.client.dbsize() == 0
    naive.stop()

    # The documented restore: no AOF, load dump.rdb with AOF off, then turn AOF on.
    shutil.rmtree(restored / "appendonlydir")
    loader = Server(restored, "--appendonly", "no", password=None)
    assert loader.client.dbsize() > 0
    loader.cli("CONFIG", "SET", "appendonly", "yes")
    deadline = time.time() + 30
    while "aof_rewrite_in_progress:0" not in loader.cli("INFO", "persistence") or (
        "aof_enabled:1" not in loader.cli("INFO", "persistence")
    ):
        assert time.time() < deadline, "AOF rewrite did not finish"
        time.sleep(0.1)
    loader.stop()

    # Normal start, as in compose: everything is back, from the AOF.
    server = Server(restored, "--appendonly", "yes", "--appendfsync", "everysec")
    queue = JobQueue(
        settings.model_copy(update={"redis_url": f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"})
    )
    try:
        assert {j.id for j in queue.jobs()} == {j.id for j in jobs}
        assert queue.queue_depth() == 3
        assert queue.get(jobs[0].id).spec.model == "org/model-0"
    finally:
        server.stop()
