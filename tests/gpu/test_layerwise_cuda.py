"""Layer-by-layer jobs on a CUDA device: held-out quality measured layer by layer equals
the whole-model job's, and the quality-target search keeps the same layers and writes
the same checkpoint (tests/integration/test_layerwise.py checks the same on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .support import assert_nearly_same_checkpoint, cuda_job, needs_cuda

pytestmark = needs_cuda


def test_layerwise_quality_and_search_match_the_whole_model(
    small_bf16: tuple[Path, Path], tmp_path: Path
) -> None:

    model, calib = small_bf16
    plain = cuda_job(model, calib, tmp_path, "lw-plain", layerwise=True)
    whole = cuda_job(model, calib, tmp_path, "whole-plain")
    assert plain["mode"] == "layerwise" and plain["device"] == "cuda"
    ev, wev = plain["evaluation"], whole["evaluation"]
    assert ev["perplexity_base"] == pytest.approx(wev["perplexity_base"], rel=1e-3)
    assert ev["kl"] == pytest.approx(wev["kl"], rel=0.05)
    # A KL target the every-layer candidate misses: both searches try the recipe ladder
    # (nvfp4, nvfp4-4over6), pick the same closest recipe and keep layers of it.
    target = {"max_kl": wev["kl"] * 0.6}
    w = cuda_job(model, calib, tmp_path, "whole-target", target=target)
    lw = cuda_job(model, calib, tmp_path, "lw-target", target=target, layerwise=True)
    assert lw["recipe"] == w["recipe"]
    assert lw["kept_layers"] and lw["kept_as"] == w["kept_as"]
    assert lw["evaluation"]["kl"] <= target["max_kl"]
    if lw["kept_layers"] == w["kept_layers"]:
        assert_nearly_same_checkpoint(Path(w["_path"]), Path(lw["_path"]))


def test_a_model_the_card_cannot_hold_goes_layer_by_layer(
    small_bf16: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The card's free memory read as less than the whole model needs (memory.gpu_free is
    the one thing replaced): the job chooses layer-by-layer mode by itself, and its peak
    GPU memory stays below the model's size. The model is the small one, 32 layers deep:
    at 2 layers the lm_head and one window's logits alone outweigh it (109.5 MB peak
    against 43 MB on an H100, 2026-12-07), which says nothing about the bound."""
    from gpu_model import make_model

    from nvfp4_common.sizing import GPU_RESERVE_BYTES
    from nvfp4_worker import checkpoint, memory

    from .support import SMALL_SHAPE

    _, calib = small_bf16
    model = tmp_path / "deep-bf16"
    make_model(model, {**SMALL_SHAPE, "num_hidden_layers": 32}, device="cuda")
    sizes = checkpoint.layer_sizes(model)
    assert sizes.bf16_bytes > 4 * sizes.largest_layer_params * 2 + sizes.head_bf16_bytes
    monkeypatch.setattr(
        memory, "gpu_free", lambda device: [GPU_RESERVE_BYTES + sizes.bf16_bytes // 2]
    )
    rep = cuda_job(model, calib, tmp_path, "card-too-small")
    assert rep["mode"] == "layerwise"
    assert rep["memory"]["peak_gpu_bytes"] < sizes.bf16_bytes


def test_moe_layerwise_matches_the_whole_model(
    small_bf16: tuple[Path, Path], tmp_path: Path
) -> None:
    """A tiny Qwen3-MoE on CUDA: experts read apart and fused layer by layer give the
    whole-model job's checkpoint and held-out figures (on CPU: bit for bit,
    tests/integration/test_layerwise.py)."""
    from devkit.models import make_tiny_qwen3

    model, calib = small_bf16
    moe = make_tiny_qwen3(model.parent / "tiny-moe", experts=4)
    whole = cuda_job(moe, calib, tmp_path, "moe-whole")
    layered = cuda_job(moe, calib, tmp_path, "moe-lw", layerwise=True)
    assert layered["mode"] == "layerwise"
    ev, wev = layered["evaluation"], whole["evaluation"]
    assert ev["perplexity_base"] == pytest.approx(wev["perplexity_base"], rel=1e-3)
    assert_nearly_same_checkpoint(Path(whole["_path"]), Path(layered["_path"]))


def test_free_card_memory_read_without_a_context_agrees_with_cuda() -> None:
    """memory.gpu_free reads NVML (no CUDA context on cards a job may not use); its figure
    errs low by at most the driver's reserve against CUDA's own reading, never high."""
    import torch

    from nvfp4_common.sizing import GIB
    from nvfp4_worker import memory

    free = memory.gpu_free(torch.device("cuda"))
    assert len(free) == torch.cuda.device_count()
    cuda_free = torch.cuda.mem_get_info(0)[0]
    assert cuda_free - 2 * GIB < free[0] <= cuda_free + 64 * 2**20
