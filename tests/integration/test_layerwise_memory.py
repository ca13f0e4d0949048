"""A model over twice the worker's memory limit quantizes layer by layer, serves in vLLM
and generates (bench/layerwise_memory.py, run as CI runs it).

The limit is the worker's own setting (worker_memory_limit_gb), the one its preflight
plans by: this machine's cgroup files are read-only, so no kernel limit is set, and the
test checks the job's measured peak RSS (ru_maxrss of its process) against the limit
instead. Real ModelOpt on CPU, real vLLM (CPU build). About 4-5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from devkit.serve_cluster import serve_env_available

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.serve
@pytest.mark.skipif(not serve_env_available(), reason="needs .venv-serve (make envs)")
def test_model_twice_the_memory_limit_quantizes_serves_and_generates(tmp_path: Path) -> None:
    out = tmp_path / "layerwise_memory.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "layerwise_memory.py"),
            *("--layers", "154", "--hidden", "1024", "--inner", "2816"),
            *("--limit-gib", "1.6", "--serve", "--work", str(tmp_path), "--out", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = json.loads(out.read_text())
    print(json.dumps(row, indent=2))  # the figures, in CI's log
    assert row["model_over_limit"] >= 2.0
    assert row["mode"] == "layerwise"
    assert "quantizing layer by layer" in row["why"]
    assert row["peak_rss_bytes"] < row["memory_limit_bytes"]
    assert row["vllm_error"] is None and row["vllm_generated_tokens"] == 8
