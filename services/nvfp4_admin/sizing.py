"""Sizes and memory fit of a model from its config.json alone (no weights needed).

Counting follows the Hugging Face decoder layout (Llama, Qwen2/3, Mistral and their MoE
variants): per layer q/k/v/o projections, a gated MLP (gate/up/down) or experts of one,
two norms; embeddings and lm_head. What stays in BF16 after quantization: embeddings,
lm_head, norms, biases, MoE routers and any module matching an exclude pattern.

Bytes per quantized weight: NVFP4 = 4-bit value + one FP8 (E4M3) scale per 16 values
= 4.5 bits; FP8 = 8 bits. Per-tensor float32 scales are counted too but are negligible.
Sizes are binary (GiB = 2**30 bytes).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

GIB = 2**30
BITS_PER_WEIGHT = {"bf16": 16.0, "nvfp4": 4.5, "nvfp4-fp8kv": 4.5, "fp8": 8.0}
# ModelOpt keeps these in high precision by default (besides lm_head): MoE routers.
DEFAULT_EXCLUDES = ("*lm_head*", "*router*", "*mlp.gate", "*shared_expert_gate*")
# Families whose config omits tie_word_embeddings because their default is to tie.
_TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text", "gpt2", "phi"}
_QK_NORM = {"qwen3", "qwen3_moe", "olmo2", "gemma3", "gemma3_text"}


class ConfigError(ValueError):
    """The config lacks what a size estimate needs."""


@dataclass(frozen=True)
class Shape:
    model_type: str
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    attention_bias: bool = False
    experts: int = 0
    moe_intermediate: int = 0
    shared_intermediate: int = 0
    max_positions: int | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Shape:
        cfg = config.get("text_config") or config  # multimodal configs nest the LLM's
        model_type = str(cfg.get("model_type") or config.get("model_type") or "unknown")

        def need(*names: str) -> int:
            for n in names:
                if cfg.get(n) is not None:
                    return int(cfg[n])
            raise ConfigError(f"config.json has no {names[0]}; is it a decoder LLM config?")

        hidden = need("hidden_size", "n_embd", "d_model")
        heads = need("num_attention_heads", "n_head")
        experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
        tied = cfg.get("tie_word_embeddings")
        return cls(
            model_type=model_type,
            hidden=hidden,
            layers=need("num_hidden_layers", "n_layer"),
            intermediate=int(cfg.get("intermediate_size") or cfg.get("ffn_dim") or 4 * hidden),
            vocab=need("vocab_size"),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            tied=bool(tied) if tied is not None else model_type in _TIED_BY_DEFAULT,
            attention_bias=bool(cfg.get("attention_bias")) or model_type == "qwen2",
            experts=experts,
            moe_intermediate=int(cfg.get("moe_intermediate_size") or 0) if experts else 0,
            shared_intermediate=int(cfg.get("shared_expert_intermediate_size") or 0),
            max_positions=cfg.get("max_position_embeddings"),
        )

    def linears(self) -> list[tuple[str, int]]:
        """(module name, weight count) of every linear layer, lm_head included."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        out: list[tuple[str, int]] = []
        for i in range(self.layers):
            p = f"model.layers.{i}"
            out += [
                (f"{p}.self_attn.q_proj", h * q),
                (f"{p}.self_attn.k_proj", h * kv),
                (f"{p}.self_attn.v_proj", h * kv),
                (f"{p}.self_attn.o_proj", q * h),
            ]
            if self.experts:
                m = self.moe_intermediate or self.intermediate
                out.append((f"{p}.mlp.gate", h * self.experts))
                for e in range(self.experts):
                    out += [
                        (f"{p}.mlp.experts.{e}.{n}_proj", h * m) for n in ("gate", "up", "down")
                    ]
                if self.shared_intermediate:
                    s = self.shared_intermediate
                    out += [
                        (f"{p}.mlp.shared_expert.{n}_proj", h * s) for n in ("gate", "up", "down")
                    ]
                    out.append((f"{p}.mlp.shared_expert_gate", h))
            else:
                m = self.intermediate
                out += [(f"{p}.mlp.{n}_proj", h * m) for n in ("gate", "up", "down")]
        out.append(("lm_head", self.vocab * h))
        return out

    def other_params(self) -> int:
        """Embeddings, norms and biases: never quantized. lm_head is a linear (above)."""
        per_layer = 2 * self.hidden
        if self.model_type in _QK_NORM:
            per_layer += 2 * self.head_dim
        if self.attention_bias:
            per_layer += (self.heads + 2 * self.kv_heads) * self.head_dim
        return self.vocab * self.hidden + self.layers * per_layer + self.hidden


@dataclass
class Sizes:
    params: int
    bf16_bytes: int
    quant_bytes: dict[str, int]
    bf16_kept_params: int  # parameters that stay BF16 in every quantized format
    excluded_modules: list[str] = field(default_factory=list)


def checkpoint_sizes(shape: Shape, exclude: tuple[str, ...] = ()) -> Sizes:
    patterns = (*DEFAULT_EXCLUDES, *exclude)
    kept = shape.other_params()
    quantized = 0
    n_quant_tensors = 0
    excluded: list[str] = []
    for name, count in shape.linears():
        if name == "lm_head" and shape.tied:
            continue  # shares the embedding matrix, counted there
        if any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(name + ".weight", p) for p in patterns):
            kept += count
            excluded.append(name)
        else:
            quantized += count
            n_quant_tensors += 1
    params = kept + quantized
    quant = {}
    for fmt in ("nvfp4", "fp8"):
        # Per quantized linear: a float32 weight scale and a float32 input scale.
        quant[fmt] = int(quantized * BITS_PER_WEIGHT[fmt] / 8) + 2 * kept + 8 * n_quant_tensors
    return Sizes(params, 2 * params, quant, kept, excluded)


def kv_bytes_per_token(shape: Shape, kv_bytes: int = 2) -> int:
    """K and V for every layer: layers x kv_heads x head_dim x 2 x bytes per value."""
    return shape.layers * shape.kv_heads * shape.head_dim * 2 * kv_bytes


@dataclass
class Fit:
    memory_gib: float
    reserve_gib: float
    quantize_peak_gib: float
    quantize_fits: bool
    weights_gib: float
    gpu_memory_utilization: float
    kv_budget_gib: float
    kv_tokens: int
    max_model_len: int
    concurrent_sequences: int
    serve_fits: bool


def memory_fit(
    shape: Shape,
    sizes: Sizes,
    fmt: str,
    memory_gib: float,
    reserve_gib: float,
    calib_seq_len: int,
) -> Fit:
    """Whether quantizing and serving fit in `memory_gib` (a Spark shares it with the CPU).

    Quantizing holds the BF16 model, the exported checkpoint while it is written, one
    calibration forward pass (activations and float32 logits) and ~2 GiB of runtime.
    Serving: vLLM takes gpu_memory_utilization x memory for weights, ~2 GiB + 5% of the
    weights for activations and graphs, and the rest for the KV cache.
    """
    quant_bytes = sizes.quant_bytes["fp8" if fmt == "fp8" else "nvfp4"]
    activations = calib_seq_len * (shape.hidden * 2 * 16 + shape.vocab * 4)
    peak = (sizes.bf16_bytes + quant_bytes + activations) / GIB + 2.0
    util = max(0.05, min(0.90, math.floor((memory_gib - reserve_gib) / memory_gib * 20) / 20))
    weights = quant_bytes / GIB
    budget = util * memory_gib - weights - (2.0 + 0.05 * weights)
    kv_per_token = kv_bytes_per_token(shape, 1 if fmt in ("fp8", "nvfp4-fp8kv") else 2)
    kv_tokens = max(0, int(budget * GIB // kv_per_token))
    limit = shape.max_positions or kv_tokens
    step = 1024 if min(limit, kv_tokens) >= 1024 else 16
    max_len = min(limit, kv_tokens) // step * step
    return Fit(
        memory_gib=memory_gib,
        reserve_gib=reserve_gib,
        quantize_peak_gib=peak,
        quantize_fits=peak <= memory_gib - reserve_gib,
        weights_gib=weights,
        gpu_memory_utilization=util,
        kv_budget_gib=max(0.0, budget),
        kv_tokens=kv_tokens,
        max_model_len=max_len,
        concurrent_sequences=kv_tokens // max_len if max_len else 0,
        serve_fits=budget > 0 and max_len >= min(4096, limit),
    )
