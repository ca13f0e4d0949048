"""vLLM on the GPU loads the worker's NVFP4 export and generates with an FP4 kernel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .support import needs_cuda

pytestmark = needs_cuda
pytest.importorskip("vllm")

# Run in a child process: vLLM keeps GPU memory until its process ends.
SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], max_model_len=512, gpu_memory_utilization=0.3,
          enforce_eager=True, seed=0)
params = SamplingParams(max_tokens=16, ignore_eos=True, temperature=0.0)
out = llm.generate([{"prompt_token_ids": [10, 20, 30, 40]}], params, use_tqdm=False)
print("RESULT " + json.dumps({
    "tokens": list(out[0].outputs[0].token_ids),
    "text": out[0].outputs[0].text,
    "quantization": llm.llm_engine.model_config.quantization,
}))
"""


def run_vllm(model: Path) -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, log[-3000:]
    return json.loads(lines[-1][7:]), log


def test_vllm_serves_the_nvfp4_export(gpu_nvfp4: Path) -> None:
    result, log = run_vllm(gpu_nvfp4)
    assert result["quantization"] == "modelopt_fp4"
    assert len(result["tokens"]) == 16
    assert result["text"]  # the padded tokenizer decodes every id
    # Hopper has no FP4 tensor cores: vLLM must pick a weight-only FP4 kernel (Marlin),
    # Blackwell a native one; either way the log names an NVFP4 kernel.
    assert "Fp4" in log or "FP4" in log, log[-3000:]
