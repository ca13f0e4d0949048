"""A whole-model job spread over two cards writes the checkpoint a one-card job writes.

The first card's free memory is read as just enough for the embeddings and one decoder
layer (memory.gpu_free is the one thing replaced), so the small model must spread:
accelerate places it within the worker's budgets and moves activations between the
cards. Needs two CUDA cards; skipped on one (the placement rule itself is checked
against accelerate's on every machine: tests/unit/test_layerwise_sizing.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .support import assert_nearly_same_checkpoint, cuda_job, needs_cuda

torch = pytest.importorskip("torch")

pytestmark = [
    *needs_cuda,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]


def test_whole_model_spread_over_two_cards_matches_one(
    small_bf16: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nvfp4_common.sizing import GPU_RESERVE_BYTES
    from nvfp4_worker import checkpoint, memory

    model, calib = small_bf16
    one = cuda_job(model, calib, tmp_path, "one-card")
    assert one["memory"]["gpus"] == 1

    sizes = checkpoint.layer_sizes(model)
    embedding = 2 * sizes.embedding_params
    largest = max(embedding, sizes.head_bf16_bytes - embedding)
    first = GPU_RESERVE_BYTES + int(1.5 * (largest + embedding + 2 * sizes.largest_layer_params))
    real = memory.gpu_free
    monkeypatch.setattr(memory, "gpu_free", lambda device: [first, *real(device)[1:]])
    two = cuda_job(model, calib, tmp_path, "two-cards")
    assert two["memory"]["gpus"] == 2

    ev1, ev2 = one["evaluation"], two["evaluation"]
    assert ev2["perplexity_base"] == pytest.approx(ev1["perplexity_base"], rel=1e-3)
    assert ev2["kl"] == pytest.approx(ev1["kl"], rel=0.05)
    assert_nearly_same_checkpoint(Path(one["_path"]), Path(two["_path"]))
