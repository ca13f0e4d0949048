"""A MIXED_PRECISION export (NVFP4 with one layer kept in FP8, as the quality search keeps
it) quantized on CUDA and served by vLLM on the GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from devkit.models import quantize_mixed

from .support import needs_cuda

pytestmark = needs_cuda
pytest.importorskip("vllm")

KEPT = "model.layers.0"

# Runs in a fresh interpreter (vLLM wants its own CUDA context): one JSON line.
LOAD = """
import json, sys
def main():
    from vllm import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], enforce_eager=True, max_model_len=256,
              gpu_memory_utilization=0.3, seed=0)
    quant = llm.llm_engine.vllm_config.model_config.quantization
    out = llm.generate(["The sea is"], SamplingParams(temperature=0, max_tokens=8,
                       ignore_eos=True), use_tqdm=False)[0].outputs[0]
    print("RESULT " + json.dumps({"quantization": quant, "tokens": len(out.token_ids)}))
if __name__ == "__main__":
    main()
"""


@pytest.fixture(scope="module")
def mixed(small_bf16: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    source, _ = small_bf16
    return quantize_mixed(source, tmp_path_factory.mktemp("mixed") / "small-mixed", KEPT, "cuda")


def test_vllm_serves_a_mixed_precision_export_on_the_gpu(mixed: Path) -> None:
    quant = json.loads((mixed / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "MIXED_PRECISION"
    layers = quant["quantized_layers"].items()
    assert {v["quant_algo"] for k, v in layers if k.startswith(f"{KEPT}.")} == {"FP8"}
    assert {v["quant_algo"] for k, v in layers if not k.startswith(f"{KEPT}.")} == {"NVFP4"}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD, str(mixed)],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=400,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][7:])
    assert result == {"quantization": "modelopt_mixed", "tokens": 8}
