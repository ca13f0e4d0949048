"""ModelOpt post-training quantization and the Hugging Face checkpoint export.

The configs are ModelOpt's own presets (a recipe names one: nvfp4_common.recipes),
copied and extended, never edited in place: every job starts from the same preset.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nvfp4_common.jobs import QuantFormat
from nvfp4_common.recipes import DEFAULT_RECIPE, RECIPES
from nvfp4_common.sizing import exclusion_pattern
from nvfp4_worker.errors import JobError

# Always kept in high precision: the output projection dominates quality loss for small
# models, and vLLM expects it unquantized in ModelOpt checkpoints.
ALWAYS_EXCLUDED = ("lm_head",)


def _preset(fmt: QuantFormat, recipe: str | None) -> dict[str, Any]:
    import modelopt.torch.quantization as mtq

    if fmt is QuantFormat.FP8:
        return copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    cfg = copy.deepcopy(getattr(mtq, RECIPES[recipe or DEFAULT_RECIPE].preset))
    if fmt is QuantFormat.NVFP4_FP8_KV:
        # FP8 K/V quantizers on the attention BMMs: the checkpoint gets k_scale/v_scale and
        # hf_quant_config.json says kv_cache_quant_algo FP8.
        cfg["quant_cfg"].extend(copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"]))
    return cfg


def build_config(fmt: QuantFormat, exclude: list[str], recipe: str | None = None) -> dict[str, Any]:
    """The ModelOpt quantization config for a job: the recipe's preset plus our exclusions."""
    cfg = _preset(fmt, recipe)
    for glob in [*ALWAYS_EXCLUDED, *exclude]:
        cfg["quant_cfg"].append({"quantizer_name": exclusion_pattern(glob), "enable": False})
    return cfg


def quantize(
    model: torch.nn.Module, cfg: dict[str, Any], forward_loop: Callable[[torch.nn.Module], None]
) -> torch.nn.Module:
    """Insert quantizers and calibrate them with `forward_loop` (in place)."""
    import modelopt.torch.quantization as mtq

    try:
        return mtq.quantize(model, cfg, forward_loop)
    except RuntimeError as exc:
        # ModelOpt refuses a config that enables no weight quantizer (all excluded).
        if "no weight quantizer is enabled" in str(exc):
            raise JobError("the exclude patterns leave no layer to quantize") from None
        raise


def quantized_layer_count(model: torch.nn.Module) -> int:
    """Modules whose weight quantizer is enabled (0 means the exclusions removed everything)."""
    count = 0
    for module in model.modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if quantizer is not None and getattr(quantizer, "is_enabled", False):
            count += 1
    return count


def export(model: torch.nn.Module, tokenizer: Any, export_dir: Path) -> dict[str, Any]:
    """Write the unified HF checkpoint, tokenizer and generation config.

    Returns hf_quant_config.json's content.
    """
    from modelopt.torch.export import export_hf_checkpoint

    # A model computed in FP32 (CPU) would export its unquantized tensors (embeddings,
    # lm_head, norms) as FP32: cast the parameters, but not the quantizers' FP32 amax
    # buffers, whose precision sets the scales.
    # Other floating buffers (AWQ's pre_quant_scale, rotary tables) follow the weights:
    # export runs a forward pass, which fails on mixed FP32/BF16 operands.
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != torch.bfloat16:
                param.data = param.data.to(torch.bfloat16)
        for module in model.modules():
            for name, buf in module.named_buffers(recurse=False):
                if buf.is_floating_point() and "amax" not in name and buf.dtype != torch.bfloat16:
                    setattr(module, name, buf.to(torch.bfloat16))
    config = getattr(model, "config", None)
    if config is not None:
        config.dtype = torch.bfloat16
    # dtype must be a torch dtype: configs that carry the string "bfloat16" make export
    # fail with "Invalid device string: 'bfloat16'".
    with torch.no_grad():
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=export_dir)
    tokenizer.save_pretrained(export_dir)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and not (export_dir / "generation_config.json").exists():
        generation_config.save_pretrained(export_dir)
    quant_config_file = export_dir / "hf_quant_config.json"
    if not quant_config_file.exists():
        raise RuntimeError("export wrote no hf_quant_config.json")
    result: dict[str, Any] = json.loads(quant_config_file.read_text())
    return result
