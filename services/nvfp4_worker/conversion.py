"""Checkpoint tensors as a transformers model names and shapes them.

transformers 5 converts some tensors when it loads a model: the experts of an MoE layer,
stored one by one in the checkpoint (`mlp.experts.7.gate_proj.weight`), become one 3-D
tensor per projection (`mlp.experts.gate_up_proj`, gate and up concatenated). A
layer-by-layer job reads a layer's tensors itself, so it applies the same conversion,
with transformers' own rules for the model (`get_model_conversion_mapping`) and its own
operations, to the few tensors of one layer. ModelOpt's export writes the experts one by
one again, as it does for a whole model.

Checked against transformers 5.19 (tests/integration/test_layerwise.py compares a tiny
Qwen3-MoE quantized layer by layer with the whole-model job); the transformers names used
are all imported in `_rules`, the one place to look when transformers changes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch


def _rules(model: Any) -> tuple[list[Any], list[Any], Any]:
    """transformers' renamings and converters for `model`, and its key sort order."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
    )

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    return renamings, converters, dot_natural_key


class Names:
    """The model's name of each checkpoint tensor, for one model class."""

    def __init__(self, model: Any) -> None:  # a transformers PreTrainedModel
        from transformers.core_model_loading import rename_source_key

        self._renamings, self._converters, self._order = _rules(model)
        self._rename = rename_source_key
        self._by_pattern = {p: c for c in self._converters for p in c.source_patterns}

    def target(self, key: str) -> str:
        """The model tensor the checkpoint tensor `key` goes into."""
        return str(self._rename(key, self._renamings, self._converters)[0])

    def convert(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint tensors (every source of each target among them) as the model's."""
        out: dict[str, torch.Tensor] = {}
        pending: dict[str, Any] = {}
        for key in sorted(tensors, key=self._order):  # expert 10 after expert 9
            target, pattern = self._rename(key, self._renamings, self._converters)
            if pattern is None:
                out[target] = tensors[key]
                continue
            converter = pending.setdefault(target, copy.deepcopy(self._by_pattern[pattern]))
            converter.add_tensor(target, key, pattern, tensors[key])
        for target, converter in pending.items():
            out.update(converter.convert(target))
        return out

    def shapes(self, shapes: Mapping[str, Iterable[int]]) -> dict[str, list[int]]:
        """The model's tensor shapes from the checkpoint's, converted on the meta device
        (nothing is read or allocated)."""
        meta = {
            k: torch.empty(list(s), dtype=torch.bfloat16, device="meta") for k, s in shapes.items()
        }
        return {k: list(v.shape) for k, v in self.convert(meta).items()}
