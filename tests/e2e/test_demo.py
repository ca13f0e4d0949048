"""`make demo` end to end: the demo script with a tiny model, on real Redis, Ray Serve,
vLLM (CPU build) and a worker process; everything it started is stopped at the end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serve_harness import serve_env_available

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import localstack  # noqa: E402

pytestmark = [pytest.mark.serve, pytest.mark.timeout(1500)]


def test_demo_quantizes_deploys_answers_and_cleans_up(tmp_path: Path) -> None:
    if not serve_env_available():
        pytest.fail(".venv-serve is missing: run `make install-serve`")
    run = subprocess.run(
        [sys.executable, "scripts/demo.py", "--tiny", "--models-dir", str(tmp_path / "models"),
         "--results-dir", str(tmp_path / "results")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1400,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # one stream, in the order it happened
    )  # fmt: skip
    out = run.stdout
    # Nothing the stack started outlives the run, failed or not: not even Ray or vLLM
    # workers that left their process group (they carry the stack's marker too).
    marker = re.search(rf"{localstack.MARKER}=([0-9a-f]+)", out)
    assert marker, out[-6000:]
    assert localstack.marked_pids(marker.group(1)) == [], out[-6000:]
    assert not Path(f"/tmp/nvfp4-ray-{marker.group(1)}").exists()  # Ray's session folder
    assert run.returncode == 0, out[-6000:]
    # Each step of the story happened, in order.
    steps = [
        "serving the BF16 model",
        "succeeded: ",
        "deploying the NVFP4 checkpoint with zero downtime",
        "switching / to",
        "Q: What is the capital of France?",
        "## Calibration",  # the model card
        "BF16 vs NVFP4 on this machine",
        "stopping everything",
        "local stack stopped",
    ]
    position = 0
    for step in steps:  # each one after the one before
        position = out.find(step, position)
        assert position >= 0, f"{step!r} missing or out of order:\n{out[-6000:]}"
    assert (tmp_path / "models" / "tiny-qwen3-NVFP4" / "hf_quant_config.json").exists()
    assert (tmp_path / "results" / "demo-nvfp4.json").exists()
    assert not (ROOT / ".run" / "stack.json").exists()
