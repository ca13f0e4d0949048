"""The serving preflight: memory fit from fabricated /proc/meminfo, checkpoint facts,
and the args validation that runs before it. Pure functions; no Ray, no vLLM."""

from __future__ import annotations

import json
from pathlib import Path

import gpu_vllm
import pytest

from nvfp4_admin.sizing import Shape
from nvfp4_common.meminfo import parse_meminfo
from nvfp4_common.settings import Settings
from nvfp4_serve.checkpoint import CheckpointError, inspect_checkpoint
from nvfp4_serve.config import load_args
from nvfp4_serve.preflight import GIB, PreflightError, plan_memory


def meminfo(total_gib: float, available_gib: float) -> str:
    kb = 1024 * 1024
    return (
        f"MemTotal:       {int(total_gib * kb)} kB\n"
        f"MemFree:        {int(available_gib * kb * 0.5)} kB\n"
        f"MemAvailable:   {int(available_gib * kb)} kB\n"
        "HugePages_Total:       0\n"
    )


# A 32B-class NVFP4 checkpoint on a 128 GB DGX Spark: 19.4 GB of weights,
# Qwen3-32B KV: 64 layers x 8 KV heads x 128 dims x 2 (K,V) x 2 bytes = 256 KiB/token.
KV_32B = 2 * 64 * 8 * 128 * 2
W_32B = int(19.4e9)


def test_parse_meminfo_reads_kb_as_bytes() -> None:
    info = parse_meminfo(meminfo(8, 4))
    assert info["MemTotal"] == 8 * GIB
    assert info["MemAvailable"] == 4 * GIB
    assert info["HugePages_Total"] == 0


def test_fits_and_suggests_utilization_within_free_memory() -> None:
    plan = plan_memory(
        meminfo(119.7, 110),
        weights_bytes=W_32B,
        kv_bytes_per_token=KV_32B,
        max_model_len=8192,
        overhead_bytes=2 * GIB,
        gpu_memory_utilization=0.85,
    )
    assert plan.kv_cache_bytes == KV_32B * 8192 == 2 * GIB
    assert plan.needed_bytes == W_32B + 4 * GIB
    # (110 - 1 GiB headroom) / 119.7 = 0.910...; rounded down
    assert plan.suggested_gpu_memory_utilization == 0.91
    assert plan.suggested_gpu_memory_utilization * plan.total_bytes <= plan.available_bytes


def test_utilization_above_free_memory_is_refused_with_a_value_that_fits() -> None:
    # Another process holds 60 GiB of the shared pool: 0.9 x 119.7 GiB cannot be had.
    with pytest.raises(PreflightError) as err:
        plan_memory(
            meminfo(119.7, 60),
            weights_bytes=W_32B,
            kv_bytes_per_token=KV_32B,
            max_model_len=8192,
            overhead_bytes=2 * GIB,
            gpu_memory_utilization=0.9,
        )
    msg = str(err.value)
    assert "gpu_memory_utilization=0.9" in msg
    assert "between 0.19 and 0.49" in msg  # 22.07 GiB needed; (60-1)/119.7 free


def test_model_that_does_not_fit_is_refused_with_a_shorter_context() -> None:
    with pytest.raises(PreflightError) as err:
        plan_memory(
            meminfo(32, 24),
            weights_bytes=W_32B,
            kv_bytes_per_token=KV_32B,
            max_model_len=32768,  # 8 GiB of KV cache
            overhead_bytes=2 * GIB,
            gpu_memory_utilization=None,
        )
    msg = str(err.value)
    assert msg.startswith("model does not fit")
    assert "weights 18.07 GiB" in msg and "KV cache 8.00 GiB" in msg
    # (24 - 1 - 2) GiB - 18.07 GiB = 2.93 GiB left = 12010 whole tokens of 256 KiB
    assert "lower max_model_len to 12010" in msg


def test_weights_alone_too_big_says_smaller_checkpoint() -> None:
    with pytest.raises(PreflightError, match="serve a smaller checkpoint"):
        plan_memory(
            meminfo(16, 12),
            weights_bytes=W_32B,
            kv_bytes_per_token=KV_32B,
            max_model_len=1024,
            overhead_bytes=GIB,
            gpu_memory_utilization=None,
        )


def test_cpu_serving_ignores_utilization() -> None:
    plan = plan_memory(
        meminfo(24, 20),
        weights_bytes=200 * 1024**2,
        kv_bytes_per_token=1024,
        max_model_len=2048,
        overhead_bytes=GIB,
        gpu_memory_utilization=None,
    )
    assert plan.needed_bytes < 2 * GIB


def test_meminfo_without_available_is_an_error() -> None:
    with pytest.raises(PreflightError, match="MemAvailable"):
        plan_memory(
            "MemTotal: 100 kB\n",
            weights_bytes=1,
            kv_bytes_per_token=1,
            max_model_len=1,
            overhead_bytes=0,
            gpu_memory_utilization=None,
        )


# --- checkpoint facts that feed the preflight ------------------------------------------


def write_checkpoint(path: Path, quant_algo: str | None, kv_algo: str | None = None) -> Path:
    path.mkdir()
    config = {
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "hidden_size": 256,
        "max_position_embeddings": 4096,
    }
    (path / "config.json").write_text(json.dumps(config))
    if quant_algo:
        quant = {"quant_algo": quant_algo, "kv_cache_quant_algo": kv_algo, "group_size": 16}
        (path / "hf_quant_config.json").write_text(json.dumps({"quantization": quant}))
    (path / "model-00001.safetensors").write_bytes(b"\0" * 1000)
    (path / "model-00002.safetensors").write_bytes(b"\0" * 500)
    return path


def test_nvfp4_checkpoint_maps_to_vllm_modelopt_fp4(tmp_path: Path) -> None:
    ckpt = inspect_checkpoint(write_checkpoint(tmp_path / "m", "NVFP4"))
    assert ckpt.vllm_quantization == "modelopt_fp4"
    assert ckpt.weights_bytes == 1500
    assert ckpt.max_position_embeddings == 4096
    assert ckpt.kv_bytes_per_token == 2 * 4 * 2 * 64 * 2


def test_fp8_kv_cache_halves_kv_bytes(tmp_path: Path) -> None:
    ckpt = inspect_checkpoint(write_checkpoint(tmp_path / "m", "FP8", kv_algo="FP8"))
    assert ckpt.vllm_quantization == "modelopt"
    assert ckpt.kv_bytes_per_token == 2 * 4 * 2 * 64


def test_kv_bytes_agree_with_estimate_and_bench(tmp_path: Path) -> None:
    # One rule (nvfp4_common.sizing.kv_bytes_per_token) behind serving's preflight,
    # `nvfp4ctl estimate` and bench/gpu_vllm.py's bandwidth bound.
    folder = write_checkpoint(tmp_path / "m", "NVFP4")
    shape = Shape.from_config({**json.loads((folder / "config.json").read_text()), "vocab_size": 1})
    served = inspect_checkpoint(folder).kv_bytes_per_token
    assert served == shape.kv_bytes_per_token(2) == gpu_vllm.checkpoint_kv_bytes_per_token(folder)


def test_unquantized_checkpoint_has_no_quantization(tmp_path: Path) -> None:
    assert inspect_checkpoint(write_checkpoint(tmp_path / "m", None)).vllm_quantization is None


def test_unservable_modelopt_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="vLLM serves only"):
        inspect_checkpoint(write_checkpoint(tmp_path / "m", "INT4_AWQ"))


# --- args validation ---------------------------------------------------------------------


def settings(**kw: object) -> Settings:
    return Settings(_env_file=None, **kw)  # type: ignore[call-arg]


def test_args_override_settings() -> None:
    s = settings(serve_model="/m/a", serve_max_model_len=4096)
    args = load_args(s, {"max_model_len": 1024, "model_name": "x"})
    assert (args.model, args.max_model_len, args.served_name) == ("/m/a", 1024, "x")
    assert load_args(s, {}).served_name == "a"


def test_autoscaling_from_settings() -> None:
    s = settings(serve_model="org/m", serve_autoscaling=True, serve_max_replicas=4)
    args = load_args(s, None)
    assert args.autoscaling is not None and args.autoscaling.max_replicas == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "no model: pass args.model or set NVFP4_SERVE_MODEL"),
        ({"model": "m", "max_model_lenn": 5}, "unknown arg 'max_model_lenn'"),
        ({"model": "m", "accelerator": "tpu"}, "accelerator: Input should be 'gpu' or 'cpu'"),
        ({"model": "m", "engine_kwargs": {"max_model_len": 5}}, "use the top-level args"),
        (
            {"model": "m", "autoscaling": {"min_replicas": 3, "max_replicas": 2}},
            "min_replicas (3) must not exceed max_replicas (2)",
        ),
        (
            {"model": "m", "num_replicas": 2, "autoscaling": {"max_replicas": 2}},
            "set num_replicas or autoscaling, not both",
        ),
    ],
)
def test_bad_args_say_how_to_fix(args: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as err:
        load_args(settings(), args)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
