"""What we can learn about a source checkpoint before loading its weights.

Every check here reads only config.json and safetensors headers, so bad input fails in
a second, before a large model is read into memory.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvfp4_common.jobs import QuantFormat
from nvfp4_worker.errors import JobError

# Bytes per weight element in the output: NVFP4 = 4 bits + one FP8 scale per 16 values.
_BYTES_PER_ELEMENT = {
    QuantFormat.NVFP4: 0.5 + 1 / 16,
    QuantFormat.NVFP4_FP8_KV: 0.5 + 1 / 16,
    QuantFormat.FP8: 1.0,
}
_KEPT_NAMES = ("embed", "lm_head", "norm", "wte", "wpe")
# safetensors dtype names as a model card says them.
_DTYPE_NAMES = {"BF16": "BF16", "F16": "FP16", "F32": "FP32", "F64": "FP64"}


@dataclass(frozen=True)
class SourceInfo:
    config: Any  # transformers PretrainedConfig
    model_type: str
    max_positions: int | None
    source_bytes: int  # safetensors bytes on disk


def inspect_config(path: Path, name: str) -> SourceInfo:
    """Refuse folders that are not a causal LM transformers can build without remote code."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except ValueError as exc:
        model_type = _raw_model_type(path)
        if model_type is None:
            raise JobError(f"model {name}: config.json has no model_type") from None
        raise JobError(
            f"model {name}: unsupported architecture {model_type!r} (not known to this"
            " transformers version; remote code is not run)"
        ) from exc
    except OSError as exc:
        raise JobError(f"model {name}: config.json cannot be read ({exc})") from None
    model_type = str(config.model_type)
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = list(getattr(config, "architectures", None) or [])
    # The declared head decides (a BertForMaskedLM is not causal although BERT has a
    # causal-LM class); without one, the model type must have a causal-LM class at all.
    is_causal = (
        any(
            a in causal_classes or a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures
        )
        if architectures
        else model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )
    if not is_causal:
        heads = ", ".join(architectures) or model_type
        raise JobError(f"model {name} is not a causal language model ({heads})")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    max_positions = getattr(text_config, "max_position_embeddings", None)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return SourceInfo(config, model_type, max_positions, size)


def _raw_model_type(path: Path) -> str | None:
    import json

    try:
        value = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value else None


def estimate_output_bytes(path: Path, fmt: QuantFormat, exclude: list[str]) -> int:
    """The exported checkpoint's size from the safetensors headers: 2-D weights of linear
    layers shrink to the format's width, everything else is written as BF16."""
    from safetensors import safe_open

    per_element = _BYTES_PER_ELEMENT[fmt]
    # The same match ModelOpt makes (quantize.exclusion_pattern): fnmatch of `*glob*`, so
    # "model.layers.*.mlp.down_proj" counts every layer's down_proj as kept.
    excluded = tuple(f"*{p.strip('*')}*" for p in exclude if p.strip("*"))
    total = 0.0
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                    shape = handle.get_slice(key).get_shape()
                    numel = 1
                    for dim in shape:
                        numel *= dim
                    kept = any(k in key for k in _KEPT_NAMES) or any(
                        fnmatch.fnmatch(key, e) for e in excluded
                    )
                    quantized = len(shape) == 2 and key.endswith(".weight") and not kept
                    total += numel * (per_element if quantized else 2)
        except Exception as exc:  # safetensors raises its own error type for bad headers
            raise JobError(f"model weights {file.name} cannot be read: {exc}") from None
    return int(total)


def weights_dtype(path: Path) -> str | None:
    """The dtype of most of the source's weight elements ("BF16", "FP16", "FP32", or the
    safetensors name of another), from the headers; None for a folder without tensors."""
    from safetensors import safe_open

    sizes: Counter[str] = Counter()
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                    tensor = handle.get_slice(key)
                    numel = 1
                    for dim in tensor.get_shape():
                        numel *= dim
                    # Element counts, not bytes: every dtype of a checkpoint counts alike.
                    sizes[tensor.get_dtype()] += numel
        except Exception as exc:  # safetensors raises its own error type for bad headers
            raise JobError(f"model weights {file.name} cannot be read: {exc}") from None
    if not sizes:
        return None
    name = sizes.most_common(1)[0][0]
    return _DTYPE_NAMES.get(name, name)
