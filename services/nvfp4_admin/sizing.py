"""A model's shape from its config.json, and whether it fits a machine, for `estimate`.

The shape follows the Hugging Face decoder layout (Llama, Qwen2/3, Mistral and their MoE
variants): per layer q/k/v/o projections, a gated MLP (gate/up/down) or experts of one,
two norms; embeddings and lm_head. `Shape.tensors()` lists the tensors a checkpoint of
that shape holds, by their Hugging Face names, so the checkpoint size and the quantization
job's peak come from the same functions the worker applies to real safetensors headers
(nvfp4_common.sizing).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvfp4_common.errors import Nvfp4Error
from nvfp4_common.sizing import (
    GIB,
    CheckpointEstimate,
    PeakMemory,
    estimate_checkpoint,
    expert_count,
    gpu_need,
    gpu_placement,
    kv_bytes_per_value,
    layer_sizes,
    layerwise_peak,
    whole_model_peak,
)
from nvfp4_common.sizing import kv_bytes_per_token as _kv_bytes_per_token

# Families whose config omits tie_word_embeddings because their default is to tie.
_TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text", "gpt2", "phi"}
_QK_NORM = {"qwen3", "qwen3_moe", "olmo2", "gemma3", "gemma3_text"}
# Families with q/k/v biases whether or not their config says so.
_QKV_BIAS = {"qwen2", "qwen2_moe"}
# The estimate's machine is a DGX Spark: the GPU computes in BF16 out of host memory.
ESTIMATE_COMPUTE_DTYPE = "bfloat16"


class ConfigError(Nvfp4Error, ValueError):
    """The config lacks what a size estimate needs."""


def read_config(path: Path) -> tuple[dict[str, Any], Shape]:
    """A config.json and the shape it describes.

    Raises:
        ConfigError: the file is missing, not a JSON object, or lacks a size; the message
            names the file.
    """
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise ConfigError(f"a JSON object was expected, not {type(config).__name__}")
        return config, Shape.from_config(config)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except (OSError, ValueError, TypeError) as e:  # ConfigError is a ValueError
        raise ConfigError(f"cannot read {path}: {e}") from None


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
        experts = expert_count(cfg)
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
            attention_bias=bool(cfg.get("attention_bias") or cfg.get("qkv_bias"))
            or model_type in _QKV_BIAS,
            experts=experts,
            moe_intermediate=int(cfg.get("moe_intermediate_size") or 0) if experts else 0,
            shared_intermediate=int(cfg.get("shared_expert_intermediate_size") or 0),
            max_positions=cfg.get("max_position_embeddings"),
        )

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor of a checkpoint of this shape, as Hugging Face
        names and lays them out (a linear weight is out_features x in_features)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        yield "model.embed_tokens.weight", (self.vocab, h)
        for i in range(self.layers):
            p = f"model.layers.{i}"
            yield f"{p}.input_layernorm.weight", (h,)
            yield f"{p}.post_attention_layernorm.weight", (h,)
            for name, out in (("q", q), ("k", kv), ("v", kv)):
                yield f"{p}.self_attn.{name}_proj.weight", (out, h)
                if self.attention_bias:
                    yield f"{p}.self_attn.{name}_proj.bias", (out,)
            yield f"{p}.self_attn.o_proj.weight", (h, q)
            if self.model_type in _QK_NORM:
                yield f"{p}.self_attn.q_norm.weight", (self.head_dim,)
                yield f"{p}.self_attn.k_norm.weight", (self.head_dim,)
            if self.experts:
                yield f"{p}.mlp.gate.weight", (self.experts, h)  # the router
                m = self.moe_intermediate or self.intermediate
                for e in range(self.experts):
                    yield from _gated_mlp(f"{p}.mlp.experts.{e}", h, m)
                if self.shared_intermediate:
                    yield from _gated_mlp(f"{p}.mlp.shared_expert", h, self.shared_intermediate)
                    yield f"{p}.mlp.shared_expert_gate.weight", (1, h)
            else:
                yield from _gated_mlp(f"{p}.mlp", h, self.intermediate)
        yield "model.norm.weight", (h,)
        if not self.tied:  # a tied lm_head shares the embedding matrix and is not stored
            yield "lm_head.weight", (self.vocab, h)

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        return _kv_bytes_per_token(self.layers, self.kv_heads, self.head_dim, bytes_per_value)


def _gated_mlp(prefix: str, hidden: int, inner: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield f"{prefix}.gate_proj.weight", (inner, hidden)
    yield f"{prefix}.up_proj.weight", (inner, hidden)
    yield f"{prefix}.down_proj.weight", (hidden, inner)


@dataclass
class Sizes:
    params: int
    bf16_bytes: int
    quant_bytes: dict[str, int]
    bf16_kept_params: int  # parameters that stay BF16 in every quantized format
    excluded_modules: list[str]


def checkpoint_sizes(shape: Shape, exclude: tuple[str, ...] = ()) -> Sizes:
    """The BF16 source and its NVFP4 and FP8 exports (see nvfp4_common.sizing)."""
    tensors = list(shape.tensors())
    est: dict[str, CheckpointEstimate] = {
        fmt: estimate_checkpoint(tensors, fmt, exclude) for fmt in ("nvfp4", "fp8")
    }
    nvfp4 = est["nvfp4"]
    return Sizes(
        params=nvfp4.params,
        bf16_bytes=nvfp4.bf16_bytes,
        quant_bytes={fmt: e.output_bytes for fmt, e in est.items()},
        bf16_kept_params=nvfp4.kept_params,
        excluded_modules=list(nvfp4.kept_linears),
    )


def kv_bytes_per_token(shape: Shape, kv_bytes: int = 2) -> int:
    """K and V for every layer: layers x kv_heads x head_dim x 2 x bytes per value."""
    return shape.kv_bytes_per_token(kv_bytes)


# Calibration the estimate assumes for the layer-by-layer peak: JobSpec's defaults.
DEFAULT_CALIB = (512, 2048)
# Held-out windows a job measures by default (JobSpec.eval_samples): layer by layer they
# go through each layer beside the calibration activations.
DEFAULT_EVAL_SAMPLES = 32
# Machines `estimate` always answers for: (name, memory in GB as sold, GB left to the
# rest of the system). A Spark's 128 GB are shared with the CPU and the OS; an 80 GB
# card's memory is the GPU's own.
# (name, GB of memory, GB left to the system, discrete cards). A Spark's GPU computes out
# of its 128 GB of host memory; a card's job holds the model in the card's own memory and
# may spread it over several (nvfp4_common.sizing.gpu_placement).
MACHINES = (
    ("DGX Spark 128 GB", 128.0, 10.0, 0),
    ("80 GB GPU", 80.0, 0.0, 1),
    ("2 x 80 GB GPUs", 80.0, 0.0, 2),
    ("4 x 80 GB GPUs", 80.0, 0.0, 4),
)


@dataclass
class Fit:
    memory_gib: float
    reserve_gib: float
    quantize_peak_gib: float
    quantize_fits: bool
    layerwise_peak_gib: float
    layerwise_spills: bool  # activations spilled to disk to fit
    layerwise_fits: bool
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
    calib: tuple[int, int] = DEFAULT_CALIB,
) -> Fit:
    """Whether quantizing and serving fit in `memory_gib` (a Spark shares it with the CPU).

    Quantizing: the worker's own preflight rules (nvfp4_common.sizing.whole_model_peak
    and, layer by layer, layerwise_peak with `calib` = (samples, seq_len)) for a GPU that
    computes in BF16 out of host memory, so a model this says fits is one the worker
    accepts. Serving: vLLM takes gpu_memory_utilization x memory for weights,
    ~2 GiB + 5% of the weights for activations and graphs, and the rest for the KV cache.
    """
    quant_bytes = sizes.quant_bytes["fp8" if fmt == "fp8" else "nvfp4"]
    peak = whole_model_peak(sizes.params, ESTIMATE_COMPUTE_DTYPE, weights_in_host=True)
    peak_gib = peak.total / GIB
    util = max(0.05, min(0.90, math.floor((memory_gib - reserve_gib) / memory_gib * 20) / 20))
    weights = quant_bytes / GIB
    budget = util * memory_gib - weights - (2.0 + 0.05 * weights)
    kv_per_token = shape.kv_bytes_per_token(kv_bytes_per_value(fmt))
    kv_tokens = max(0, int(budget * GIB // kv_per_token))
    limit = shape.max_positions or kv_tokens
    step = 1024 if min(limit, kv_tokens) >= 1024 else 16
    max_len = min(limit, kv_tokens) // step * step
    lw_peak, spills = layerwise_fit(shape, memory_gib - reserve_gib, calib)
    return Fit(
        memory_gib=memory_gib,
        reserve_gib=reserve_gib,
        quantize_peak_gib=peak_gib,
        quantize_fits=peak_gib <= memory_gib - reserve_gib,
        layerwise_peak_gib=lw_peak.total / GIB,
        layerwise_spills=spills,
        layerwise_fits=lw_peak.total / GIB <= memory_gib - reserve_gib,
        weights_gib=weights,
        gpu_memory_utilization=util,
        kv_budget_gib=max(0.0, budget),
        kv_tokens=kv_tokens,
        max_model_len=max_len,
        concurrent_sequences=kv_tokens // max_len if max_len else 0,
        serve_fits=budget > 0 and max_len >= min(4096, limit),
    )


def layerwise_fit(
    shape: Shape, room_gib: float, calib: tuple[int, int] = DEFAULT_CALIB
) -> tuple[PeakMemory, bool]:
    """The layer-by-layer peak in `room_gib`: activations in memory when they fit, else
    spilled to disk (as the worker chooses); returns the peak and whether it spills."""
    sizes = layer_sizes(shape.tensors())
    samples, seq_len = calib
    evals = DEFAULT_EVAL_SAMPLES
    peak = layerwise_peak(
        sizes, samples, seq_len, ESTIMATE_COMPUTE_DTYPE, weights_in_host=True, eval_samples=evals
    )
    if peak.total / GIB <= room_gib:
        return peak, False
    spilled = layerwise_peak(
        sizes,
        samples,
        seq_len,
        ESTIMATE_COMPUTE_DTYPE,
        weights_in_host=True,
        spill=True,
        eval_samples=evals,
    )
    return spilled, True


@dataclass
class MachineFit:
    machine: str
    room_gib: float
    whole_model_gib: float
    whole_model_fits: bool
    layerwise_gib: float
    layerwise_fits: bool


def machine_fits(shape: Shape, calib: tuple[int, int] = DEFAULT_CALIB) -> list[MachineFit]:
    """Whether each machine of MACHINES can quantize a model of `shape`, whole and layer
    by layer, by the worker's rules (BF16 compute). On a card the whole model must fit its
    memory, spread over the machine's cards when one does not hold it; layer by layer the
    card holds a layer and one batch of activations, the rest of the activations being
    host memory or disk, and one card's memory is the figure compared."""
    params = sum(math.prod(s) for _, s in shape.tensors())
    sizes = layer_sizes(shape.tensors())
    out = []
    for name, memory_gb, reserve_gb, cards in MACHINES:
        room = (memory_gb - reserve_gb) * 1e9 / GIB
        layered, _ = layerwise_fit(shape, room, calib)
        if cards:
            budgets = gpu_placement(sizes, [int(room * GIB)] * cards)
            whole = gpu_need(sizes.bf16_bytes, len(budgets) if budgets else cards) / GIB
            fits = budgets is not None
        else:
            peak = whole_model_peak(params, ESTIMATE_COMPUTE_DTYPE, weights_in_host=True)
            whole, fits = peak.total / GIB, peak.total / GIB <= room
        out.append(
            MachineFit(
                name,
                room * max(1, cards),
                whole,
                fits,
                layered.total / GIB,
                layered.total / GIB <= room,
            )
        )
    return out
