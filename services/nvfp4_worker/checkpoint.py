"""What we can learn about a source checkpoint before loading its weights.

Every check here reads only config.json and safetensors headers, so bad input fails in
a second, before a large model is read into memory.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvfp4_common.jobs import QuantFormat
from nvfp4_common.sizing import LayerSizes, estimate_checkpoint
from nvfp4_common.sizing import layer_sizes as _layer_sizes
from nvfp4_worker.errors import JobError

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


def estimate_output_bytes(
    path: Path, fmt: QuantFormat, exclude: list[str], in_fp8: list[str] | None = None
) -> int:
    """The exported checkpoint's size from the safetensors headers, by the rule
    `nvfp4ctl estimate` applies to config.json (nvfp4_common.sizing.estimate_checkpoint):
    linear weights ModelOpt quantizes shrink to the format's width (FP8 for the modules
    `in_fp8` matches), everything else (embeddings, norms, lm_head, MoE routers,
    --exclude'd modules) is written as BF16."""
    shapes = [(name, shape) for name, shape, _ in _tensors(path)]
    return estimate_checkpoint(shapes, fmt.value, exclude, in_fp8 or ()).output_bytes


def layer_sizes(path: Path) -> LayerSizes:
    """The largest decoder layer, the embeddings and the head, from the headers: what
    the layer-by-layer memory rule (nvfp4_common.sizing.layerwise_peak) needs."""
    return _layer_sizes((name, shape) for name, shape, _ in _tensors(path))


def weights_dtype(path: Path) -> str | None:
    """The dtype of most of the source's weight elements ("BF16", "FP16", "FP32", or the
    safetensors name of another), from the headers; None for a folder without tensors."""
    sizes: Counter[str] = Counter()
    for _, shape, dtype in _tensors(path):
        # Element counts, not bytes: every dtype of a checkpoint counts alike.
        sizes[dtype] += math.prod(shape)
    if not sizes:
        return None
    name = sizes.most_common(1)[0][0]
    return _DTYPE_NAMES.get(name, name)


def _tensors(path: Path) -> list[tuple[str, list[int], str]]:
    """(name, shape, safetensors dtype) of every tensor of the folder's shards, read from
    the headers alone."""
    from safetensors import safe_open

    out: list[tuple[str, list[int], str]] = []
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                    tensor = handle.get_slice(key)
                    out.append((key, list(tensor.get_shape()), tensor.get_dtype()))
        except Exception as exc:  # safetensors raises its own error type for bad headers
            raise JobError(f"model weights {file.name} cannot be read: {exc}") from None
    return out
