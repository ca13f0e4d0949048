"""Layer-by-layer jobs on a CUDA device: held-out quality measured layer by layer equals
the whole-model job's, and the quality-target search keeps the same layers and writes
the same checkpoint (tests/integration/test_layerwise.py checks the same on CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from devkit.models import quantize_nvfp4

from .support import needs_cuda, report

pytestmark = needs_cuda


def run_job(model: Path, calib: Path, models_dir: Path, name: str, **fields: Any) -> dict[str, Any]:
    """A job on the GPU with 4 held-out windows; its report, with its path as `_path`."""
    path = quantize_nvfp4(
        model, calib, models_dir, name, device="cuda", calib_seq_len=256, eval_samples=4,
        **fields,
    )  # fmt: skip
    rep = report(path)
    rep["_path"] = str(path)
    return rep


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


def test_a_model_the_card_cannot_hold_goes_layer_by_layer(
    small_bf16: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The card's free memory read as less than the whole model needs (memory.gpu_free is
    the one thing replaced): the job chooses layer-by-layer mode by itself and says why."""
    from nvfp4_common.sizing import GPU_RESERVE_BYTES
    from nvfp4_worker import checkpoint, memory

    model, calib = small_bf16
    sizes = checkpoint.layer_sizes(model)
    monkeypatch.setattr(
        memory, "gpu_free", lambda device: [GPU_RESERVE_BYTES + sizes.bf16_bytes // 2]
    )
    rep = run_job(model, calib, tmp_path, "card-too-small")
    assert rep["mode"] == "layerwise"
    assert rep["memory"]["peak_gpu_bytes"] < sizes.bf16_bytes
