"""A model spread over several cards carries accelerate's hooks on each placed part (they
move activations from card to card); ModelOpt must calibrate, evaluate and export it as
it does a plain model. This machine has no GPU, so the parts are all placed on the CPU,
each with its own hook, as pipeline._load's `device_map="sequential"` places them on
cards (tests/gpu/test_spread_cuda.py runs the job itself on two cards). Real ModelOpt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from nvfp4_common.jobs import QuantFormat
from nvfp4_worker import calibration, cpu_ops, evaluate, quantize
from nvfp4_worker.sources import CalibSource


def quantize_and_export(source: Path, calib: Path, out: Path, hooks: bool) -> float | None:
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cpu_ops.install()
    tokenizer = AutoTokenizer.from_pretrained(source)
    windows = calibration.build_windows(tokenizer, CalibSource("t", (calib,)), 8, 2, 128)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    if hooks:
        parts = ["model.embed_tokens", "model.rotary_emb"]
        parts += [f"model.layers.{i}" for i in range(len(model.model.layers))]
        parts += ["model.norm", "lm_head"]
        model = dispatch_model(
            model, device_map=dict.fromkeys(parts, "cpu"), main_device="cpu", force_hooks=True
        )
        hooked = {name for name, m in model.named_modules() if hasattr(m, "_hf_hook")}
        assert set(parts) <= hooked
    cpu = torch.device("cpu")
    cfg = quantize.build_config(QuantFormat.NVFP4, [])
    quantize.quantize(model, cfg, calibration.make_forward_loop(windows.calib, cpu, noop))
    perplexity = evaluate.measure(model, windows.held_out, cpu).perplexity
    quantize.export(model, tokenizer, out)
    return perplexity


def noop(*_: Any) -> None:
    pass


@pytest.mark.slow
def test_modelopt_quantizes_and_exports_a_hooked_model_as_a_plain_one(
    tiny_model: Path, calib_file: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    plain = quantize_and_export(tiny_model, calib_file, tmp_path / "plain", hooks=False)
    hooked = quantize_and_export(tiny_model, calib_file, tmp_path / "hooked", hooks=True)
    assert plain is not None and hooked == plain
    a = {k: v for f in (tmp_path / "plain").glob("*.safetensors") for k, v in load_file(f).items()}
    b = {k: v for f in (tmp_path / "hooked").glob("*.safetensors") for k, v in load_file(f).items()}
    assert sorted(a) == sorted(b)
    assert any(v.dtype == torch.uint8 for v in a.values())  # packed NVFP4 weights
    for key, x in a.items():
        y = b[key]
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), key
