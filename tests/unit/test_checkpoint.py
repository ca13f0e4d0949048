"""What the worker reads from a source checkpoint's safetensors headers before loading it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nvfp4_common.jobs import QuantFormat
from nvfp4_worker import checkpoint
from nvfp4_worker.errors import JobError

LAYERS = ("model.layers.0", "model.layers.1")


def write_model(folder: Path, dtype: torch.dtype, shards: int = 1) -> Path:
    """Two layers of linear weights and norms, plus embeddings, in `shards` files."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"model.embed_tokens.weight": torch.zeros(64, 32, dtype=dtype)}
    for layer in LAYERS:
        for proj in ("mlp.up_proj", "mlp.down_proj", "self_attn.q_proj"):
            tensors[f"{layer}.{proj}.weight"] = torch.zeros(32, 32, dtype=dtype)
        tensors[f"{layer}.input_layernorm.weight"] = torch.zeros(32, dtype=dtype)
    names = sorted(tensors)
    for k in range(shards):
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, str(folder / f"model-{k + 1:05d}-of-{shards:05d}.safetensors"))
    return folder


@pytest.mark.parametrize(
    ("dtype", "label"),
    [(torch.bfloat16, "BF16"), (torch.float16, "FP16"), (torch.float32, "FP32")],
)
def test_source_dtype_comes_from_the_headers(
    tmp_path: Path, dtype: torch.dtype, label: str
) -> None:
    assert checkpoint.weights_dtype(write_model(tmp_path / "m", dtype, shards=2)) == label


def test_source_dtype_is_that_of_most_weights(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", torch.float16)
    save_file({"extra.norm": torch.zeros(8, dtype=torch.float32)}, str(folder / "x.safetensors"))
    assert checkpoint.weights_dtype(folder) == "FP16"
    assert checkpoint.weights_dtype(tmp_path) is None  # no safetensors at all


def test_unreadable_header_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(JobError, match="model weights model.safetensors cannot be read"):
        checkpoint.weights_dtype(folder)


def test_estimate_keeps_modules_matched_by_a_wildcard_exclusion(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", torch.bfloat16)
    fmt = QuantFormat.NVFP4
    plain = checkpoint.estimate_output_bytes(folder, fmt, [])
    down = checkpoint.estimate_output_bytes(folder, fmt, ["model.layers.*.mlp.down_proj"])
    one = checkpoint.estimate_output_bytes(folder, fmt, ["layers.1.mlp.down_proj"])
    # A kept 32x32 weight is written in BF16 (2 bytes) instead of 0.5 + 1/16 bytes and
    # two float32 per-tensor scales.
    per_module = 32 * 32 * 2 - (32 * 32 * (0.5 + 1 / 16) + 8)
    assert one - plain == per_module
    assert down - plain == 2 * per_module
