"""Helpers of the GPU tests: the small model's shape, the CUDA skip, the pipeline call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from devkit.models import quantize_nvfp4

torch = pytest.importorskip("torch")

SMALL_SHAPE: dict[str, Any] = {
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 16384,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}


def cuda_available() -> bool:
    return bool(torch.cuda.is_available())


needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")]


def quantize(source: Path, calib: Path, models_dir: Path, device: str, name: str) -> Path:
    """The worker's pipeline, exactly as a job runs it."""
    return quantize_nvfp4(
        source, calib, models_dir, name, device=device, calib_seq_len=256, eval_samples=2
    )


def cuda_job(
    model: Path, calib: Path, models_dir: Path, name: str, **fields: Any
) -> dict[str, Any]:
    """A job on the GPU with 4 held-out windows (`fields`: more JobSpec fields), without
    vLLM's speed measurement (test_quantize_cuda checks that); its report, with the
    published checkpoint's path as `_path`."""
    path = quantize_nvfp4(
        model, calib, models_dir, name, device="cuda", calib_seq_len=256, eval_samples=4,
        served_speed=False, **fields,
    )  # fmt: skip
    rep = report(path)
    rep["_path"] = str(path)
    return rep


def report(checkpoint: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((checkpoint / "report.json").read_text())
    return data


def tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_nearly_same_checkpoint(a_dir: Path, b_dir: Path) -> None:
    """Same names, dtypes and shapes; values equal but for the odd rounding flip where GPU
    kernels may order sums differently (on the CPU the tests ask for bit for bit)."""
    a, b = tensors(a_dir), tensors(b_dir)
    assert sorted(a) == sorted(b)
    for key, x in a.items():
        y = b[key]
        assert (x.dtype, x.shape) == (y.dtype, y.shape), key
        same = (x.reshape(-1).view(torch.uint8) == y.reshape(-1).view(torch.uint8)).float()
        assert same.mean() > 0.999, key
