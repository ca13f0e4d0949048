"""Submit -> running latency with an idle worker (target p50 <= 50 ms).

Starts a private Redis and one real worker process, submits jobs one at a time and reads
how long each waited before a worker claimed it (the job's own `started_at - created_at`,
both stamped on this machine). The jobs name a missing model, so each fails at once
without loading any weights; the claim is what is measured.

    .venv/bin/python bench/queue_latency.py [--jobs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devkit.redis_server import RedisServer
from nvfp4_common.jobs import JobSpec
from nvfp4_common.queue import JobQueue
from nvfp4_common.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/queue_latency.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis")
        server.start()
        models = Path(tmp) / "models"
        models.mkdir()
        settings = Settings(redis_url=server.url, models_dir=models, _env_file=None)  # type: ignore[call-arg]
        queue = JobQueue(settings)
        env = {**os.environ, "NVFP4_REDIS_URL": server.url, "NVFP4_MODELS_DIR": str(models)}
        worker = subprocess.Popen(
            [sys.executable, "-m", "nvfp4_worker"], env=env, stderr=subprocess.DEVNULL
        )
        try:
            time.sleep(2)  # let the worker reach its idle wait
            waits_ms = []
            for _ in range(args.jobs):
                job = queue.submit(JobSpec(model=str(models / "missing"), calib_dataset="x.txt"))
                while (current := queue.get(job.id)).started_at is None:
                    time.sleep(0.001)
                waits_ms.append((current.started_at - current.created_at) * 1000)
                # Wait until the worker is idle again before the next submit.
                while not queue.get(job.id).state.ended or any(w.job_id for w in queue.workers()):
                    time.sleep(0.01)
                time.sleep(0.1)
        finally:
            worker.terminate()
            worker.wait(30)
            server.stop()

    waits_ms.sort()
    result = {
        "jobs": args.jobs,
        "p50_ms": statistics.median(waits_ms),
        "p95_ms": waits_ms[int(0.95 * (len(waits_ms) - 1))],
        "max_ms": waits_ms[-1],
        "target_p50_ms": 50,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| jobs | p50 (ms) | p95 (ms) | max (ms) | target p50 |")
    print("|---|---|---|---|---|")
    print(
        f"| {args.jobs} | {result['p50_ms']:.1f} | {result['p95_ms']:.1f} "
        f"| {result['max_ms']:.1f} | <= 50 ms |"
    )


if __name__ == "__main__":
    main()
