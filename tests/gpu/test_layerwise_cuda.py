"""Layer-by-layer jobs on a CUDA device: held-out quality measured layer by layer equals
the whole-model job's, and the quality-target search keeps the same layers and writes
the same checkpoint (tests/integration/test_layerwise.py checks the same on CPU)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .support import needs_cuda

pytestmark = needs_cuda


def run_job(model: Path, calib: Path, models_dir: Path, name: str, **fields: Any) -> dict[str, Any]:
    from nvfp4_common.jobs import JobSpec
    from nvfp4_common.settings import Settings
    from nvfp4_worker.pipeline import run
    from nvfp4_worker.reporter import PrintReporter

    settings = Settings(
        models_dir=models_dir,
        model_roots=[model.parent],
        device="cuda",
        hf_offline=True,
        _env_file=None,
    )
    spec = JobSpec(
        model=str(model),
        calib_dataset=str(calib),
        calib_samples=8,
        calib_seq_len=256,
        eval_samples=4,
        output_name=name,
        **fields,
    )
    result = run(spec, settings, PrintReporter(), job_id=f"gpu-{name}")
    report: dict[str, Any] = json.loads((Path(result.output_path) / "report.json").read_text())
    report["_path"] = result.output_path
    return report


def test_layerwise_quality_and_search_match_the_whole_model(
    small_bf16: tuple[Path, Path], tmp_path: Path
) -> None:
    import torch

    model, calib = small_bf16
    plain = run_job(model, calib, tmp_path, "lw-plain", layerwise=True)
    whole = run_job(model, calib, tmp_path, "whole-plain")
    assert plain["mode"] == "layerwise" and plain["device"] == "cuda"
    ev, wev = plain["evaluation"], whole["evaluation"]
    assert ev["perplexity_base"] == pytest.approx(wev["perplexity_base"], rel=1e-3)
    assert ev["kl"] == pytest.approx(wev["kl"], rel=0.05)
    # A KL target the every-layer candidate misses: both searches keep layers.
    target = {"max_kl": wev["kl"] * 0.6}
    w = run_job(model, calib, tmp_path, "whole-target", target=target)
    lw = run_job(model, calib, tmp_path, "lw-target", target=target, layerwise=True)
    assert lw["kept_layers"] and lw["kept_as"] == w["kept_as"]
    assert lw["evaluation"]["kl"] <= target["max_kl"]
    if lw["kept_layers"] == w["kept_layers"]:
        # Same names, dtypes and shapes; values equal but for the odd rounding flip where
        # GPU kernels may order sums differently (CPU: bit for bit, tests/integration).
        a = tensors(Path(w["_path"]))
        b = tensors(Path(lw["_path"]))
        assert sorted(a) == sorted(b)
        for key, x in a.items():
            y = b[key]
            assert (x.dtype, x.shape) == (y.dtype, y.shape), key
            same = (x.reshape(-1).view(torch.uint8) == y.reshape(-1).view(torch.uint8)).float()
            assert same.mean() > 0.999, key


def tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
