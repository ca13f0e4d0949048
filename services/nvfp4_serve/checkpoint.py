"""What serving needs to know about a checkpoint before vLLM loads it.

Reads only small files (config.json, hf_quant_config.json) and the sizes of the
safetensors shards, so it runs in the driver in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The file checks live in nvfp4_common so `nvfp4ctl serve deploy` refuses exactly what
# build_app refuses, before it changes anything.
from nvfp4_common.checkpoint_files import (
    MODELOPT_TO_VLLM,
    CheckpointError,
    quant_section,
    read_json_object,
)
from nvfp4_common.sizing import kv_bytes_per_token


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    quant_algo: str | None  # ModelOpt's name, None for an unquantized checkpoint
    vllm_quantization: str | None
    max_position_embeddings: int | None
    weights_bytes: int
    kv_bytes_per_token: int


def resolve_local(model: str) -> Path | None:
    """The local folder of `model`: itself, or its Hugging Face cache snapshot if cached."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or model.startswith("."):
        raise CheckpointError(f"model folder {model} does not exist; check the path")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # not in the cache (or no hub library): vLLM will download it
        return None


def _kv_bytes_per_token(config: dict, kv_quant_algo: str | None) -> int:
    text = config.get("text_config", config)  # multimodal configs nest the LLM's
    layers = int(text.get("num_hidden_layers", 0))
    heads = int(text.get("num_attention_heads", 1))
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or text.get("hidden_size", 0) // max(heads, 1))
    elem = 1 if kv_quant_algo == "FP8" else 2  # FP8 KV cache vs BF16/FP16
    return kv_bytes_per_token(layers, kv_heads, head_dim, elem)


def inspect_checkpoint(path: Path) -> Checkpoint:
    """Read a local checkpoint folder's quantization, context length and sizes."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json; point model at a Hugging Face folder")
    config = read_json_object(config_file)

    quant_algo = kv_algo = None
    quant = quant_section(path)  # raises for a section vLLM cannot serve
    if quant is not None:
        quant_algo = quant.get("quant_algo")
        kv_algo = quant.get("kv_cache_quant_algo")

    text = config.get("text_config", config)
    max_pos = text.get("max_position_embeddings")
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    if weights == 0:
        raise CheckpointError(f"{path} holds no *.safetensors weights")
    return Checkpoint(
        path=path,
        quant_algo=quant_algo,
        vllm_quantization=MODELOPT_TO_VLLM.get(quant_algo) if quant_algo else None,
        max_position_embeddings=int(max_pos) if max_pos else None,
        weights_bytes=weights,
        kv_bytes_per_token=_kv_bytes_per_token(config, kv_algo),
    )
