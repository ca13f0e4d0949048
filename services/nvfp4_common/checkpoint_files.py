"""Is a checkpoint folder whole? Checks shared by serving, `nvfp4ctl serve deploy` and the
worker, so a damaged copy is refused with one line naming the file, before an engine
starts (and crash-loops) or a job loads weights.

Reads only small files (config.json, hf_quant_config.json) and each safetensors header (8
bytes of length, then JSON), so it takes milliseconds for any model size and needs neither
torch nor the safetensors package.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from nvfp4_common.errors import CheckpointError

# ModelOpt's quant_algo -> the quantization name vLLM 0.32 registers for it.
# vLLM serves only the FP8 and NVFP4 families of ModelOpt formats, and MIXED_PRECISION
# checkpoints whose layers each use one of them (`quantized_layers`).
MODELOPT_TO_VLLM = {
    "NVFP4": "modelopt_fp4",
    "W4A16_NVFP4": "modelopt_fp4",
    "FP8": "modelopt",
    "MIXED_PRECISION": "modelopt_mixed",
}
# NVFP4 scales blocks of 16 values; vLLM's NVFP4 kernels handle no other block size.
NVFP4_GROUP_SIZE = 16
# Any one of these is a tokenizer transformers/vLLM can load (fast, SentencePiece,
# Mistral's tekken, byte-level BPE vocab, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tekken.json", "vocab.json", "*.tiktoken")
# safetensors refuses headers above 100 MB; a bigger length means a damaged file.
_MAX_HEADER_BYTES = 100_000_000


def read_json_object(file: Path) -> dict[str, Any]:
    """A JSON file that must hold an object."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{file} is not UTF-8 text; copy it again") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{file} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno});"
            " copy it again or re-export the checkpoint"
        ) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} must hold a JSON object, not {type(value).__name__}")
    return value


def quant_section(folder: Path) -> dict[str, Any] | None:
    """The `quantization` section of hf_quant_config.json, checked; None when unquantized."""
    file = folder / "hf_quant_config.json"
    if not file.is_file():
        return None
    quant = read_json_object(file).get("quantization")
    if not isinstance(quant, dict):
        raise CheckpointError(
            f"{file} has no 'quantization' section; re-export the checkpoint with ModelOpt"
        )
    algo = quant.get("quant_algo")
    if algo not in MODELOPT_TO_VLLM:
        raise CheckpointError(
            f"{folder} is ModelOpt {algo}; vLLM serves only"
            f" {sorted(MODELOPT_TO_VLLM)} ModelOpt checkpoints"
        )
    if algo == "MIXED_PRECISION":
        _check_layers(file, quant.get("quantized_layers"))
    elif MODELOPT_TO_VLLM[algo] == "modelopt_fp4" and quant.get("group_size") != NVFP4_GROUP_SIZE:
        raise CheckpointError(
            f"{file}: {algo} needs group_size {NVFP4_GROUP_SIZE}, not"
            f" {quant.get('group_size')!r}; re-export the checkpoint with ModelOpt"
        )
    return quant


def _check_layers(file: Path, layers: Any) -> None:
    """A MIXED_PRECISION checkpoint's per-layer formats: each one vLLM serves."""
    if not isinstance(layers, dict) or not layers:
        raise CheckpointError(f"{file}: MIXED_PRECISION without 'quantized_layers'; re-export it")
    for name, layer in layers.items():
        algo = layer.get("quant_algo") if isinstance(layer, dict) else None
        if algo not in MODELOPT_TO_VLLM or algo == "MIXED_PRECISION":
            raise CheckpointError(f"{file}: layer {name} is ModelOpt {algo}; vLLM cannot serve it")
        group = layer.get("group_size", NVFP4_GROUP_SIZE)
        if MODELOPT_TO_VLLM[algo] == "modelopt_fp4" and group != NVFP4_GROUP_SIZE:
            raise CheckpointError(
                f"{file}: layer {name} ({algo}) needs group_size {NVFP4_GROUP_SIZE}, not {group!r}"
            )


def check_safetensors(file: Path) -> None:
    """Refuse a shard whose header is damaged or whose data is shorter or longer than the
    header says (a copy cut short by a full disk or an interrupted download)."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{file} is truncated ({size} bytes); copy it again")
        (length,) = struct.unpack("<Q", prefix)
        if length == 0 or length > _MAX_HEADER_BYTES or 8 + length > size:
            raise CheckpointError(
                f"{file} has a damaged header (length {length}, file {size} bytes); copy it again"
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw)
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise CheckpointError(f"{file} has a damaged header (not safetensors JSON)") from None
    data = size - 8 - length
    need = max(ends, default=0)
    if need != data:
        what = "truncated" if need > data else "longer than its header says"
        raise CheckpointError(
            f"{file} is {what}: its header describes {need} bytes of tensor data, the file"
            f" holds {data}; copy it again"
        )


def has_tokenizer(folder: Path) -> bool:
    return any(any(folder.glob(pattern)) for pattern in TOKENIZER_FILES)


def check_folder(folder: Path, tokenizer: bool = True) -> None:
    """Everything a server needs from a local checkpoint folder is there and intact.

    Args:
        folder: the checkpoint folder.
        tokenizer: require tokenizer files (False when the engine gets another tokenizer).

    Raises:
        CheckpointError: one line naming the file and the problem.
    """
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist; check the path")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json; point model at a Hugging Face folder")
    read_json_object(folder / "config.json")
    quant_section(folder)
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{folder} holds no *.safetensors weights")
    for shard in shards:
        check_safetensors(shard)
    if tokenizer and not has_tokenizer(folder):
        raise CheckpointError(
            f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the base"
            " model's tokenizer files into it"
        )
