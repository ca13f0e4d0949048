"""Every recipe's export loads and generates in vLLM (CPU), and so do the two kinds the
quality search publishes: a layer kept in BF16, and a layer kept in FP8 (MIXED_PRECISION).

The tiny Qwen3 is quantized with each recipe of nvfp4_common.recipes.RECIPES through the
worker pipeline (real ModelOpt, in this interpreter); one .venv-serve interpreter then loads
every export in turn with vllm.LLM, which pays vLLM's import and start-up once.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from devkit.models import quantize_mixed
from nvfp4_common.jobs import JobSpec
from nvfp4_common.recipes import RECIPES
from nvfp4_common.settings import Settings
from nvfp4_worker import pipeline
from nvfp4_worker.reporter import PrintReporter
from tests.serve_harness import SERVE_PYTHON, serve_env_available

pytestmark = [
    pytest.mark.serve,
    pytest.mark.skipif(not serve_env_available(), reason="needs .venv-serve (make install-serve)"),
]

KEPT_LAYER = "model.layers.0"

# Runs in .venv-serve: load each folder, generate greedily, report one JSON line per folder.
LOAD_EACH = """
import gc, json, sys

def main():
    from vllm import LLM, SamplingParams

    import torch
    from nvfp4_serve import vllm_plugin

    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    amx = torch.cpu._is_amx_tile_supported
    for name, folder in json.loads(sys.argv[1]).items():
        # "(no AMX)": as in a process where vLLM's AMX FP8 kernel is unavailable
        torch.cpu._is_amx_tile_supported = (lambda: False) if "no AMX" in name else amx
        before = vllm_plugin.LOADED.get("fp8", 0)
        try:
            llm = LLM(model=folder, enforce_eager=True, max_model_len=256, seed=0)
            out = llm.generate(["The sea is"], params, use_tqdm=False)[0].outputs[0]
            result = {"name": name, "tokens": len(out.token_ids), "text": out.text,
                      "fp8_emulated": vllm_plugin.LOADED.get("fp8", 0) - before}
            del llm
        except Exception as exc:  # report it and go on: one line per folder
            result = {"name": name, "error": f"{type(exc).__name__}: {exc}"[:500]}
        gc.collect()
        print("RESULT " + json.dumps(result), flush=True)

if __name__ == "__main__":
    main()
"""


@pytest.fixture(scope="module")
def exports(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, calib_file: Path
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipes")
    settings = Settings(
        models_dir=root / "models",
        model_roots=[tiny_model.parent, calib_file.parent],
        hf_cache_dir=root / "hub",
        hf_offline=True,
        device="cpu",
        min_free_disk_gb=0.01,
        _env_file=None,  # type: ignore[call-arg]
    )
    settings.models_dir.mkdir()
    specs = {name: {"recipe": name} for name in RECIPES} | {
        "nvfp4+bf16-layer": {"exclude": [f"{KEPT_LAYER}.*"]}
    }
    out = {}
    for name, extra in specs.items():
        spec = JobSpec(
            model=str(tiny_model),
            calib_dataset=str(calib_file),
            calib_samples=4,
            calib_seq_len=128,
            eval_samples=1,
            output_name=f"tiny-{name.replace('+', '-')}",
            **extra,  # type: ignore[arg-type]
        )
        result = pipeline.run(spec, settings, PrintReporter(), f"job-{len(out)}")
        out[name] = Path(result.output_path)
    out["nvfp4+fp8-layer"] = quantize_mixed(tiny_model, root / "mixed", KEPT_LAYER)
    return out


def test_each_recipe_exports_a_standard_nvfp4_checkpoint(exports: dict[str, Path]) -> None:
    mixed = json.loads((exports["nvfp4+fp8-layer"] / "hf_quant_config.json").read_text())
    layers = mixed["quantization"]["quantized_layers"]
    assert mixed["quantization"]["quant_algo"] == "MIXED_PRECISION"
    assert {v["quant_algo"] for k, v in layers.items() if k.startswith(f"{KEPT_LAYER}.")} == {"FP8"}
    assert {v["quant_algo"] for k, v in layers.items() if not k.startswith(f"{KEPT_LAYER}.")} == {
        "NVFP4"
    }
    for name, folder in exports.items():
        if name == "nvfp4+fp8-layer":
            continue
        quant = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]
        assert quant["quant_algo"] == "NVFP4", name
        report = json.loads((folder / "report.json").read_text())
        assert report["recipe"] == (name if name in RECIPES else "nvfp4"), name
    kept = json.loads((exports["nvfp4+bf16-layer"] / "hf_quant_config.json").read_text())
    excluded = kept["quantization"]["exclude_modules"]
    assert any(m.startswith(KEPT_LAYER) for m in excluded), excluded
    attention = json.loads((exports["nvfp4-mlp-only"] / "hf_quant_config.json").read_text())
    assert any("self_attn" in m for m in attention["quantization"]["exclude_modules"])


def test_vllm_loads_and_generates_with_every_export(exports: dict[str, Path]) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("NVFP4_")},
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine: quicker to start
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_HOST_IP": "127.0.0.1",
    }
    folders = {name: str(folder) for name, folder in exports.items()}
    folders["nvfp4+fp8-layer (no AMX)"] = folders["nvfp4+fp8-layer"]
    proc = subprocess.run(
        [str(SERVE_PYTHON), "-c", LOAD_EACH, json.dumps(folders)],
        env=env,
        capture_output=True,
        text=True,
        timeout=360,
    )
    results = {
        r["name"]: r
        for r in (
            json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")
        )
    }
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(results) == set(folders), proc.stderr[-3000:]
    failed = {name: r["error"] for name, r in results.items() if "error" in r}
    assert not failed, failed
    for name, r in results.items():
        assert r["tokens"] == 8, (name, r)
    # Without AMX the FP8 layers (4 fused linears of one decoder layer) run on our kernel.
    assert results["nvfp4+fp8-layer (no AMX)"]["fp8_emulated"] == 4, results
