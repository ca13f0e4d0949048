"""The worker's NVFP4 quantization on a CUDA device, checked against the CPU path."""

from __future__ import annotations

import json
from pathlib import Path

from .support import needs_cuda, quantize, report

pytestmark = needs_cuda


def tensors(checkpoint: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    out: dict[str, object] = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_pipeline_runs_on_the_gpu(gpu_nvfp4: Path) -> None:
    rep = report(gpu_nvfp4)
    assert rep["device"] == "cuda"
    assert rep["compute_dtype"] == "bfloat16"
    # The model sat on the GPU: its peak allocation is at least the BF16 weights.
    assert rep["memory"]["peak_gpu_bytes"] >= rep["size"]["source_bytes"] * 0.9
    quant = json.loads((gpu_nvfp4 / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "NVFP4"
    assert quant["group_size"] == 16
    # NVFP4's relative weight error is about 0.095 per layer on Gaussian weights.
    err = rep["evaluation"]["weight_error"]
    assert err["layers"] == 2 * 7
    assert 0.07 < err["mean"] < 0.12
    # vLLM, in this same environment ("auto"), loaded the export and generated on the GPU.
    served = rep["served"]
    assert served["engine"].startswith("vLLM ") and served["device"] != "cpu", served
    assert served["decode_tok_s"] > 0 and served["throughput_tok_s"] > 0


def test_packed_weights_and_scales_have_nvfp4_layout(gpu_nvfp4: Path) -> None:
    import torch

    t = tensors(gpu_nvfp4)
    w = t["model.layers.0.mlp.down_proj.weight"]
    scale = t["model.layers.0.mlp.down_proj.weight_scale"]
    assert w.dtype == torch.uint8 and tuple(w.shape) == (512, 1024 // 2)  # two FP4 per byte
    assert scale.dtype == torch.float8_e4m3fn and tuple(scale.shape) == (512, 1024 // 16)
    assert t["lm_head.weight"].dtype == torch.bfloat16  # always kept in high precision


def test_gpu_and_cpu_paths_write_the_same_weights(
    small_bf16: tuple[Path, Path], gpu_nvfp4: Path, tmp_path: Path
) -> None:
    """The CPU port of ModelOpt's block quantization must pack what the CUDA op packs."""
    import torch

    model, calib = small_bf16
    cpu = quantize(model, calib, tmp_path, "cpu", "small-cpu")
    g, c = tensors(gpu_nvfp4), tensors(cpu)
    assert sorted(g) == sorted(c)
    for name in g:
        a, b = g[name], c[name]
        if name.endswith(".weight") and a.dtype == torch.uint8:
            same = (a == b).float().mean().item()
            assert same > 0.999, f"{name}: only {same:.4%} of packed bytes agree"
        elif name.endswith("weight_scale"):
            same = (a.float() == b.float()).float().mean().item()
            assert same > 0.999, f"{name}: only {same:.4%} of block scales agree"
        elif name.endswith("input_scale"):
            # Activation ranges come from BF16 (GPU) vs FP32 (CPU) forward passes.
            assert torch.allclose(a.float(), b.float(), rtol=0.05), name
