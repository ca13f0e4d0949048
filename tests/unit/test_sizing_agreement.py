"""`nvfp4ctl estimate` and the worker agree about the same model.

The estimate reads config.json; the worker reads the safetensors headers of the real
checkpoint. Each model here is built by transformers from its config and saved with
save_pretrained (tiny, random, BF16), so the headers carry the names and shapes a Hugging
Face checkpoint of that architecture really has: a dense Qwen3, a Llama with tied
embeddings, and two MoE models with router gates (Qwen3-MoE; Qwen2-MoE with a shared
expert and its gate). The last test quantizes and exports two of them with ModelOpt itself
(about 15 s, most of it importing ModelOpt) and checks the estimate to the byte.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from nvfp4_admin.cli import cli
from nvfp4_admin.sizing import Shape, checkpoint_sizes, memory_fit
from nvfp4_common.jobs import QuantFormat
from nvfp4_common.sizing import GIB, estimate_checkpoint, whole_model_peak
from nvfp4_worker import checkpoint, memory

DENSE = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
    "tie_word_embeddings": False,
    "max_position_embeddings": 512,
}
TIED = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "tie_word_embeddings": True,
    "max_position_embeddings": 512,
}
MOE = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
    "tie_word_embeddings": False,
    "max_position_embeddings": 512,
}
MOE_SHARED = {
    "model_type": "qwen2_moe",
    "architectures": ["Qwen2MoeForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "tie_word_embeddings": False,
    "max_position_embeddings": 512,
}
MODELS = {"dense": DENSE, "tied": TIED, "moe": MOE, "moe-shared": MOE_SHARED}


def save_model(folder: Path, config: dict[str, Any]) -> Path:
    """A random BF16 model of this config, saved as transformers saves it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k != "model_type"}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(config["model_type"], **fields), dtype=torch.bfloat16
    )
    model.save_pretrained(folder)
    return folder


def header_bytes(folder: Path) -> int:
    """Bytes of the safetensors files that are not tensor data: length field and header."""
    total = 0
    for file in folder.glob("*.safetensors"):
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
        total += 8 + length
    return total


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp(request.param), MODELS[request.param])


def shape_of(folder: Path) -> Shape:
    return Shape.from_config(json.loads((folder / "config.json").read_text()))


def test_config_shape_lists_the_checkpoints_tensors(model: Path) -> None:
    on_disk = {name: shape for name, shape, _ in checkpoint._tensors(model)}
    from_config = {name: list(shape) for name, shape in shape_of(model).tensors()}
    assert from_config == on_disk


@pytest.mark.parametrize("fmt", list(QuantFormat))
@pytest.mark.parametrize("exclude", [(), ("mlp.down_proj",), ("*layers.1.*",)])
def test_checkpoint_size_agrees(model: Path, fmt: QuantFormat, exclude: tuple[str, ...]) -> None:
    shape = shape_of(model)
    admin = checkpoint_sizes(shape, exclude)
    worker = checkpoint.estimate_output_bytes(model, fmt, list(exclude))
    key = "fp8" if fmt is QuantFormat.FP8 else "nvfp4"
    assert admin.quant_bytes[key] == worker
    assert admin.bf16_bytes == sum(f.stat().st_size for f in model.glob("*.safetensors")) - (
        header_bytes(model)
    )


def test_routers_and_lm_head_stay_bf16(model: Path) -> None:
    shape = shape_of(model)
    kept = set(estimate_checkpoint(shape.tensors(), "nvfp4").kept_linears)
    expected = set() if shape.tied else {"lm_head"}
    for i in range(shape.layers):
        if shape.experts:
            expected.add(f"model.layers.{i}.mlp.gate")
        if shape.shared_intermediate:
            expected.add(f"model.layers.{i}.mlp.shared_expert_gate")
    assert kept == expected


@pytest.mark.parametrize(
    ("compute", "in_host"),
    [(torch.bfloat16, True), (torch.float32, True), (torch.bfloat16, False)],
)
def test_quantize_peak_is_the_workers_preflight(
    model: Path, compute: torch.dtype, in_host: bool
) -> None:
    info = checkpoint.inspect_config(model, "m")
    dtype = checkpoint.weights_dtype(model)
    assert dtype == "BF16"
    params = checkpoint_sizes(shape_of(model)).params
    rule = whole_model_peak(params, str(compute).removeprefix("torch."), in_host)
    # The worker counts the file bytes, safetensors headers included: the same rule applied
    # to a few bytes more, on the safe side.
    headers = header_bytes(model)
    tensor_only = memory.estimate(info.source_bytes - headers, dtype, compute, in_host)
    assert tensor_only == rule
    with_headers = memory.estimate(info.source_bytes, dtype, compute, in_host)
    assert 0 <= with_headers.total - rule.total <= 3 * headers


def test_estimate_reports_the_workers_figure(model: Path) -> None:
    """`nvfp4ctl estimate` on a Spark: BF16 weights in host memory, the worker's rule."""
    out = CliRunner().invoke(cli, ["estimate", str(model), "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    info = checkpoint.inspect_config(model, "m")
    need = memory.estimate(
        info.source_bytes - header_bytes(model), "BF16", torch.bfloat16, in_host=True
    )
    assert report["fit"]["quantize_peak_gib"] * GIB == pytest.approx(need.total, abs=1)
    assert report["nvfp4_bytes"] == checkpoint.estimate_output_bytes(model, QuantFormat.NVFP4, [])
    shape = shape_of(model)
    fit = memory_fit(shape, checkpoint_sizes(shape), "nvfp4", 100.0, 0.0)
    assert fit.quantize_peak_gib == report["fit"]["quantize_peak_gib"]


@pytest.mark.parametrize("name", ["moe-shared", "tied"])
@pytest.mark.parametrize("fmt", [QuantFormat.NVFP4, QuantFormat.FP8])
def test_estimate_is_what_modelopt_exports(tmp_path: Path, name: str, fmt: QuantFormat) -> None:
    """The estimate against a real ModelOpt quantization and export of the same model."""
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    from nvfp4_worker import cpu_ops, quantize

    source = save_model(tmp_path / "source", MODELS[name])
    cpu_ops.install()  # ModelOpt's NVFP4 fake quantization is CUDA-only
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    ids = torch.randint(0, MODELS[name]["vocab_size"], (2, 16))
    cfg = quantize.build_config(fmt, ["mlp.down_proj"])
    model = quantize.quantize(model, cfg, lambda m: m(ids))
    with torch.no_grad():
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=tmp_path / "out")
    out = tmp_path / "out"
    written = sum(f.stat().st_size for f in out.glob("*.safetensors")) - header_bytes(out)
    assert checkpoint.estimate_output_bytes(source, fmt, ["mlp.down_proj"]) == written
