"""`nvfp4ctl estimate`: sizes from config.json, checked against the seed's Qwen3-32B numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from nvfp4_admin.cli import cli
from nvfp4_admin.sizing import GIB, Shape, checkpoint_sizes, kv_bytes_per_token, memory_fit

# Qwen3-32B's shape (its config.json, abridged): untied embeddings, 64 layers.
QWEN3_32B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 5120,
    "num_hidden_layers": 64,
    "intermediate_size": 25600,
    "vocab_size": 151936,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "tie_word_embeddings": False,
    "max_position_embeddings": 40960,
}


def test_seed_sizes_for_qwen3_32b() -> None:
    shape = Shape.from_config(QWEN3_32B)
    sizes = checkpoint_sizes(shape)
    # The seed: 61.03 GB in BF16, ~19.4 GB in NVFP4 ((61.03 - 3.1) x 4.5/16 + 3.1).
    assert sizes.bf16_bytes / GIB == pytest.approx(61.03, abs=0.1)
    assert sizes.quant_bytes["nvfp4"] / GIB == pytest.approx(19.4, abs=0.3)
    embeddings = 2 * 151936 * 5120 * 2  # embed_tokens + lm_head, BF16
    rule = (sizes.bf16_bytes - embeddings) * 4.5 / 16 + embeddings
    assert sizes.quant_bytes["nvfp4"] == pytest.approx(rule, rel=0.005)
    assert sizes.params / 1e9 == pytest.approx(32.76, abs=0.01)
    # KV cache: 64 layers x 8 KV heads x 128 x (K and V) x 2 bytes.
    assert kv_bytes_per_token(shape) == 64 * 8 * 128 * 2 * 2 == 262144


def test_estimate_command_table_and_json(tmp_path: Path) -> None:
    folder = tmp_path / "qwen3-32b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN3_32B))
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    out = CliRunner().invoke(cli, ["estimate", str(folder)])
    assert out.exit_code == 0, out.output
    assert "61.02 GiB" in out.output and "19.25 GiB" in out.output
    assert "256.00 KiB BF16" in out.output
    assert "--max-model-len 40960" in out.output
    data = json.loads(
        CliRunner().invoke(cli, ["estimate", str(folder / "config.json"), "--json"]).output
    )
    assert data["params"] == 32762123264
    assert data["kv_bytes_per_token"] == {"bf16": 262144, "fp8": 131072}
    assert data["fit"]["quantize_fits"] and data["fit"]["serve_fits"]
    assert data["weights_on_disk_bytes"] is None  # a bare config.json has no folder to look in


def test_memory_options_are_decimal_gb(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(QWEN3_32B))
    out = CliRunner().invoke(cli, ["estimate", str(cfg)])
    # A DGX Spark's 128 GB are 119.2 GiB, the unit every size here is given in.
    assert "in 128 GB = 119.2 GiB (9.3 GiB left to the system)" in out.output
    data = json.loads(CliRunner().invoke(cli, ["estimate", str(cfg), "--json"]).output)
    assert data["fit"]["memory_gib"] == pytest.approx(128e9 / GIB)
    assert data["fit"]["reserve_gib"] == pytest.approx(10e9 / GIB)


def test_memory_fit_on_a_small_machine() -> None:
    shape = Shape.from_config(QWEN3_32B)
    sizes = checkpoint_sizes(shape)
    fit = memory_fit(shape, sizes, "nvfp4", memory_gib=32, reserve_gib=4)
    assert not fit.quantize_fits  # 61 GiB of BF16 weights cannot be loaded in 32 GiB
    assert fit.gpu_memory_utilization == 0.85
    budget = 0.85 * 32 - fit.weights_gib - (2 + 0.05 * fit.weights_gib)
    assert fit.kv_tokens == int(budget * GIB // 262144)
    assert fit.max_model_len % 1024 == 0 and fit.max_model_len <= fit.kv_tokens
    fp8kv = memory_fit(shape, sizes, "nvfp4-fp8kv", memory_gib=32, reserve_gib=4)
    assert fp8kv.kv_tokens == pytest.approx(2 * fit.kv_tokens, abs=2)


def test_exclusions_and_tied_embeddings_change_sizes() -> None:
    base = checkpoint_sizes(Shape.from_config(QWEN3_32B))
    excl = checkpoint_sizes(Shape.from_config(QWEN3_32B), exclude=("*down_proj*",))
    assert len(excl.excluded_modules) == 64 + 1  # every down_proj plus lm_head
    assert excl.quant_bytes["nvfp4"] > base.quant_bytes["nvfp4"]
    assert excl.bf16_bytes == base.bf16_bytes
    tied = checkpoint_sizes(Shape.from_config({**QWEN3_32B, "tie_word_embeddings": True}))
    assert base.params - tied.params == 151936 * 5120


def test_moe_routers_stay_bf16() -> None:
    moe = {
        **QWEN3_32B,
        "model_type": "qwen3_moe",
        "num_hidden_layers": 2,
        "num_experts": 8,
        "moe_intermediate_size": 768,
    }
    sizes = checkpoint_sizes(Shape.from_config(moe))
    routers = [m for m in sizes.excluded_modules if m.endswith("mlp.gate")]
    assert routers == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def test_bad_config_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "bert"}))
    out = CliRunner().invoke(cli, ["estimate", str(cfg)])
    assert out.exit_code == 1
    assert out.output == (
        f"Error: cannot read {cfg}: config.json has no hidden_size; is it a decoder LLM config?\n"
    )
    cfg.write_text("{not json")
    out = CliRunner().invoke(cli, ["estimate", str(cfg)])
    assert out.exit_code == 1 and out.output.startswith("Error: cannot read")
    cfg.write_text("[1]")
    out = CliRunner().invoke(cli, ["estimate", str(cfg)])
    assert out.output == f"Error: cannot read {cfg}: a JSON object was expected, not list\n"
    (tmp_path / "empty").mkdir()
    out = CliRunner().invoke(cli, ["estimate", str(tmp_path / "empty")])
    assert out.exit_code == 1 and out.output.endswith("config.json does not exist\n")


def test_only_nvfp4_fp8kv_has_an_fp8_kv_cache() -> None:
    # FP8_DEFAULT_CFG quantizes weights and activations only: vLLM keeps a BF16 KV cache.
    shape = Shape.from_config(QWEN3_32B)
    sizes = checkpoint_sizes(shape)
    fp8 = memory_fit(shape, sizes, "fp8", memory_gib=64, reserve_gib=4)
    budget = 0.9 * 64 - fp8.weights_gib - (2 + 0.05 * fp8.weights_gib)
    assert fp8.kv_tokens == int(budget * GIB // kv_bytes_per_token(shape, 2))
