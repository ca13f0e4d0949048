"""Sizes and memory rules of a quantization job: the one place they are written.

`nvfp4ctl estimate` (from config.json), the worker (from the source's safetensors
headers, before it loads weights) and serving's memory check all take their numbers from
here, so they cannot disagree about the same model. Everything is a pure function of its
arguments: no torch, no files. Callers read config.json, safetensors headers and
/proc/meminfo and pass in what they found. Sizes are binary (GiB = 2**30 bytes).

What stays unquantized follows ModelOpt 0.47's own presets: NVFP4_DEFAULT_CFG and
FP8_DEFAULT_CFG both end with `modelopt_recipes/configs/ptq/units/
default_disabled_quantizers.yaml`, which disables the quantizers of `*lm_head*`,
`*router*`, `*mlp.gate.*` (MoE routers of Qwen2/3-MoE, DeepSeek, ...),
`*block_sparse_moe.gate*` (Mixtral), `*mlp.shared_expert_gate.*` and every
`nn.Embedding`; norms are not linear layers and get no quantizer at all. A module whose
weight quantizer is disabled is exported as it was, in BF16. The router gate is small
(experts x hidden) but sits on every token's path, which is why ModelOpt keeps it.
Checked on a tiny Qwen3-MoE with transformers 5.17: its router (Qwen3MoeTopKRouter) is
not even an nn.Linear, so it gets no quantizer; the export writes `mlp.gate.weight`
unquantized, lists it in hf_quant_config.json's exclude_modules next to lm_head and
model.embed_tokens, and writes each expert's gate/up/down_proj as NVFP4 under its own
2-D name, as the source checkpoint names them.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

GIB = 2**30


def gib(n: float) -> str:
    """Bytes as GiB for a message: 1.50 GiB."""
    return f"{n / GIB:.2f} GiB"


# -- the model's config -------------------------------------------------------------------

# Where configs give the number of routed experts of an MoE layer: Qwen2/3-MoE, Mixtral and
# gpt-oss, DeepSeek.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def expert_count(config: Mapping[str, Any]) -> int:
    """Routed experts per MoE layer from a (text) config's fields; 0 for a dense model."""
    return next((int(config[k]) for k in EXPERT_COUNT_KEYS if config.get(k)), 0)


# -- formats -----------------------------------------------------------------------------

# Bits per stored weight. NVFP4: a 4-bit E2M1 value plus one FP8 (E4M3) scale per block of
# 16 values = 4.5 bits; FP8: one byte. The per-tensor float32 scales come on top
# (PER_TENSOR_SCALE_BYTES).
BITS_PER_WEIGHT = {"bf16": 16.0, "nvfp4": 4.5, "nvfp4-fp8kv": 4.5, "fp8": 8.0}
NVFP4_BLOCK = 16
# Per quantized linear, float32 scalars: NVFP4 weight_scale_2 + input_scale; FP8
# weight_scale + input_scale.
PER_TENSOR_SCALE_BYTES = 8
# Everything that is not quantized is written in BF16 (export runs with dtype=bfloat16).
KEPT_BYTES_PER_PARAM = 2

# Bytes per element of the dtypes a job computes in (torch names).
COMPUTE_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


def quantized_weight_bytes(rows: int, cols: int, fmt: str) -> int:
    """Bytes of one exported (rows x cols) linear weight with its scales.

    NVFP4 packs two values per byte and stores one FP8 scale per 16 values of a row;
    a row not a multiple of 16 long still takes a whole last block.
    """
    if fmt in ("nvfp4", "nvfp4-fp8kv"):
        data = rows * math.ceil(cols / 2) + rows * math.ceil(cols / NVFP4_BLOCK)
    elif fmt == "fp8":
        data = rows * cols
    else:
        raise ValueError(f"unknown quantization format {fmt!r}")
    return data + PER_TENSOR_SCALE_BYTES


# -- which weights are quantized ---------------------------------------------------------

# The name patterns of ModelOpt 0.47's default_disabled_quantizers.yaml, verbatim, matched
# as ModelOpt matches them: fnmatch against a quantizer's name, e.g.
# "model.layers.0.mlp.gate.weight_quantizer". Its nn.Embedding rule works by class, not
# by name: see NOT_LINEAR.
MODELOPT_DISABLED = (
    "*block_sparse_moe.gate*",
    "*linear_attn.conv1d*",
    "*self_attention.conv1d*",
    "*linear_attn.in_proj_a*",
    "*linear_attn.in_proj_b*",
    "*lm_head*",
    "*mixer.conv1d*",
    "*mlp.gate.*",
    "*mlp.shared_expert_gate.*",
    "*output_layer*",
    "*proj_out.*",
    "*router*",
    "mtp.*",
    "output.*",
    "*embed_vision*",
    "*vision_tower*",
    "*visual*",
    "*vision_model*",
    "*multi_modal_projector*",
)
# 2-D weights that are not linear layers, known by name where only a tensor list is at
# hand (safetensors headers): embeddings (ModelOpt disables nn.Embedding) and norms.
NOT_LINEAR = ("embed", "wte", "wpe", "norm")


def exclusion_pattern(glob: str) -> str:
    """A user's module glob as the quantizer-name pattern the worker gives ModelOpt:
    `*glob*`, so "layers.1.mlp.down_proj" matches model.layers.1.mlp.down_proj's
    quantizers (and, as in ModelOpt, layers.10-19's too)."""
    return f"*{glob.strip('*')}*"


def is_kept_linear(module: str, exclude: Sequence[str] = ()) -> bool:
    """True when ModelOpt leaves this linear module unquantized: one of its default
    exclusions (lm_head, MoE routers) or a user's --exclude glob."""
    quantizer = f"{module}.weight_quantizer"
    patterns = (*MODELOPT_DISABLED, *(exclusion_pattern(g) for g in exclude if g.strip("*")))
    return any(fnmatch.fnmatch(quantizer, p) for p in patterns)


def is_linear_weight(name: str, shape: Sequence[int]) -> bool:
    """A tensor that is the weight of a linear layer, judged from its name and shape."""
    return (
        len(shape) == 2
        and name.endswith(".weight")
        and not any(hint in name for hint in NOT_LINEAR)
    )


# -- the exported checkpoint -------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointEstimate:
    """The exported checkpoint of one format, from the source's tensor list."""

    fmt: str
    params: int
    quantized_params: int
    output_bytes: int
    kept_linears: tuple[str, ...]  # linear modules left in BF16: lm_head, routers, --exclude

    @property
    def bf16_bytes(self) -> int:
        return KEPT_BYTES_PER_PARAM * self.params

    @property
    def kept_params(self) -> int:
        return self.params - self.quantized_params


def estimate_checkpoint(
    tensors: Iterable[tuple[str, Sequence[int]]],
    fmt: str,
    exclude: Sequence[str] = (),
    in_fp8: Sequence[str] = (),
) -> CheckpointEstimate:
    """Size of the checkpoint ModelOpt exports in `fmt` from tensors (name, shape).

    Linear weights that ModelOpt quantizes shrink to the format's width plus their
    scales (FP8's for the modules `in_fp8` matches: a MIXED_PRECISION export); everything
    else (embeddings, norms, biases, lm_head, routers, excluded
    modules) is written in BF16. The FP8 KV cache's k_scale/v_scale scalars (8 bytes a
    layer) are not counted.
    """
    params = quantized = output = 0
    kept: list[str] = []
    for name, shape in tensors:
        numel = math.prod(shape)
        params += numel
        if is_linear_weight(name, shape):
            module = name.removesuffix(".weight")
            if not is_kept_linear(module, exclude):
                quantized += numel
                layer_fmt = "fp8" if in_fp8 and is_kept_linear(module, in_fp8) else fmt
                output += quantized_weight_bytes(shape[0], shape[1], layer_fmt)
                continue
            kept.append(module)
        output += KEPT_BYTES_PER_PARAM * numel
    return CheckpointEstimate(fmt, params, quantized, output, tuple(kept))


# -- KV cache ----------------------------------------------------------------------------


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, bytes_per_value: int = 2) -> int:
    """K and V for every layer: layers x kv_heads x head_dim x 2 x bytes per value."""
    return layers * kv_heads * head_dim * 2 * bytes_per_value


def kv_bytes_per_value(fmt: str) -> int:
    """KV cache element size vLLM uses for a checkpoint of `fmt`: only nvfp4-fp8kv asks
    for an FP8 cache (its checkpoint says kv_cache_quant_algo FP8); plain FP8 and NVFP4
    quantize weights and activations and leave the cache in BF16."""
    return 1 if fmt == "nvfp4-fp8kv" else 2


# -- peak memory of a quantization job ---------------------------------------------------

RUNTIME_BYTES = 2 * GIB
# Tokens per calibration forward batch (nvfp4_worker.calibration): keeps activation
# memory flat whatever the sequence length; a layer-by-layer job that spills its
# activations holds one such batch of them at a time.
CALIB_BATCH_TOKENS = 4096


@dataclass(frozen=True)
class PeakMemory:
    """A job's estimated peak of host memory, in bytes, by part (see whole_model_peak)."""

    rule: str  # which peak rule made it, e.g. "whole-model"
    weights: int  # resident weights in the compute dtype, where they are host memory
    working: int  # what else grows with the model: export, activations, copies
    runtime: int  # torch, ModelOpt, CUDA context, tokenizer, calibration text
    compute_dtype: str

    @property
    def total(self) -> int:
        return self.weights + self.working + self.runtime


def whole_model_peak(params: int, compute_dtype: str, weights_in_host: bool) -> PeakMemory:
    """Peak host memory of quantizing the whole model at once (ModelOpt's PTQ + export).

    With B = the model in BF16 (2 bytes per parameter):

        need = W (the weights in the compute dtype, where they sit in host memory)
             + B / 2 (what else grows with the model: export's quantized tensors, one
               calibration or evaluation batch of activations; on a discrete GPU, the
               host-side copies made while loading and exporting)
             + 2 GiB (torch, ModelOpt, the CUDA context, tokenizer, calibration text)

    W is B on a GPU (BF16) and 2 x B on a CPU in float32. On a CPU, and on a GPU without
    memory of its own (DGX Spark / GB10), the weights are host memory; on a discrete GPU
    they are not, so W counts as 0 there.

    Measured (docs/benchmarks.md): an 8B model, B = 15.3 GiB, peaked at 22.2 GiB of GPU
    memory (W + 0.46 B; the rule says W + 0.5 B) and 8.0 GiB of host RSS on an H200 (the
    rule for a discrete GPU: 0.5 B + 2 GiB = 9.6 GiB). SmolLM2-135M on a CPU in float32,
    B = 269 MB, peaked at 1.86-2.07 GB (the rule: 0.54 + 0.13 GB + 2 GiB = 2.8 GB). Small
    models are dominated by the fixed part. Not yet measured on a GB10.

    This is the rule the worker refuses jobs by, and `nvfp4ctl estimate` reports the same
    figure. The estimate used to add its own parts instead: BF16 model + the quantized
    checkpoint + one calibration pass (seq_len x (32 x hidden + 4 x vocab) bytes) + 2 GiB,
    about 1.3 B + 3.5 GiB in NVFP4; for Qwen3-32B on a Spark 83.7 GiB against this rule's 93.5
    GiB. This rule was kept because it is the one checked against measured peaks and the
    one that decides: with two rules, the estimate said "fits" for jobs (a 32B model with
    85-93 GiB free) that the worker then refused.

    The layer-by-layer rule for models larger than memory is layerwise_peak, beside
    this one; callers pick by the job's mode.
    """
    try:
        itemsize = COMPUTE_DTYPE_BYTES[compute_dtype]
    except KeyError:
        raise ValueError(f"unknown compute dtype {compute_dtype!r}") from None
    bf16 = KEPT_BYTES_PER_PARAM * params
    weights = params * itemsize if weights_in_host else 0
    return PeakMemory("whole-model", weights, bf16 // 2, RUNTIME_BYTES, compute_dtype)


# -- layer by layer ----------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSizes:
    """What the layer-by-layer rule needs from a checkpoint's tensor list."""

    largest_layer_params: int  # the biggest decoder layer (model.layers.N.*)
    embedding_params: int  # model.embed_tokens: materialized once to embed the text
    head_bf16_bytes: int  # embeddings, final norm and lm_head, written together in BF16
    hidden: int
    layers: int = 0  # decoder layers (model.layers.N)
    # MoE experts stored one by one (model.layers.N.mlp.experts.E.*), which a layer read on
    # its own fuses into one tensor per projection, as transformers does: a second copy.
    experts_apart: bool = False

    @property
    def bf16_bytes(self) -> int:
        """The whole model in BF16, every layer counted as the largest."""
        return self.layers * KEPT_BYTES_PER_PARAM * self.largest_layer_params + self.head_bf16_bytes


_EXPERT_APART = re.compile(r"\.experts\.\d+\.")


def layer_sizes(tensors: Iterable[tuple[str, Sequence[int]]]) -> LayerSizes:
    """LayerSizes from (name, shape) of every tensor (safetensors headers or a config)."""
    layers: dict[str, int] = {}
    embedding = head = hidden = 0
    experts_apart = False
    for name, shape in tensors:
        numel = math.prod(shape)
        if name.startswith("model.layers."):
            index = name.split(".")[2]
            layers[index] = layers.get(index, 0) + numel
            experts_apart = experts_apart or _EXPERT_APART.search(name) is not None
        else:
            head += KEPT_BYTES_PER_PARAM * numel
            if name == "model.embed_tokens.weight" and len(shape) == 2:
                embedding, hidden = numel, int(shape[1])
    return LayerSizes(
        max(layers.values(), default=0), embedding, head, hidden, len(layers), experts_apart
    )


def activation_bytes(samples: int, seq_len: int, hidden: int, compute_dtype: str) -> int:
    """The calibration hidden states of one layer boundary: samples x seq_len x hidden."""
    return samples * seq_len * hidden * COMPUTE_DTYPE_BYTES[compute_dtype]


def layerwise_peak(
    sizes: LayerSizes,
    calib_samples: int,
    calib_seq_len: int,
    compute_dtype: str,
    weights_in_host: bool,
    spill: bool = False,
    eval_samples: int = 0,
    runtime: int = RUNTIME_BYTES,
) -> PeakMemory:
    """Peak host memory of quantizing one decoder layer at a time (nvfp4_worker.layerwise).

        need = W (the largest of one decoder layer and the embedding matrix, in the
               compute dtype, where it sits in host memory)
             + A (the calibration activations, a layer's inputs and its outputs:
               2 x samples x seq_len x hidden in the compute dtype; spilled to disk, one
               calibration batch of each; with `eval_samples` held-out windows, their
               two streams too, the original model's and the quantized one's, inputs
               and outputs: 4 x eval_samples x seq_len x hidden)
             + with held-out windows, one window's logits and log-probabilities in
               float32 (2 x seq_len x vocab x 4 bytes), made at the end of each pass
             + the largest shard being written (embeddings, norm and lm_head in BF16,
               or one layer read in BF16 and written quantized: about 2.6 bytes per
               parameter, or 4 where MoE experts stored apart are read and then fused
               into one copy; whichever is larger)
             + 2 GiB (torch, ModelOpt, the CUDA context, tokenizer, calibration text), or
               in the worker, what its process holds at the preflight plus a margin
               (`runtime`, nvfp4_worker.memory.layerwise_runtime), if that is less

    The activations always sit in host memory (one batch at a time goes to a GPU), so on
    a discrete GPU W counts as 0 here and the GPU holds one layer, one batch and the
    embedding matrix while the text is embedded.
    """
    try:
        itemsize = COMPUTE_DTYPE_BYTES[compute_dtype]
    except KeyError:
        raise ValueError(f"unknown compute dtype {compute_dtype!r}") from None
    resident = max(sizes.largest_layer_params, sizes.embedding_params)
    weights = resident * itemsize if weights_in_host else 0
    acts = 2 * activation_bytes(calib_samples, calib_seq_len, sizes.hidden, compute_dtype)
    acts += 4 * activation_bytes(eval_samples, calib_seq_len, sizes.hidden, compute_dtype)
    if spill:  # one batch of inputs and one of outputs of each stream
        streams = 2 + (4 if eval_samples else 0)
        batch = max(CALIB_BATCH_TOKENS, calib_seq_len) * sizes.hidden * itemsize
        acts = min(acts, streams * batch)
    vocab = sizes.embedding_params // sizes.hidden if sizes.hidden else 0
    logits = 2 * calib_seq_len * vocab * 4 if eval_samples else 0
    # A layer is read in BF16 (2 bytes a parameter) while its quantized tensors (about
    # 0.6 bytes a parameter in NVFP4) are written.
    # MoE experts stored apart are read (2 bytes) and fused into a copy (2 more) first.
    per_param = 4.0 if sizes.experts_apart else 2.6
    writing = max(sizes.head_bf16_bytes, int(per_param * sizes.largest_layer_params))
    return PeakMemory("layerwise", weights, acts + max(writing, logits), runtime, compute_dtype)


# -- the whole model on discrete cards ---------------------------------------------------

# What a card holds of a whole-model job per byte of BF16 weights placed on it: the weights
# and half again (export's quantized copies, a batch of activations), as whole_model_peak
# counts them. Measured: an 8B model, B = 15.3 GiB, peaked at 22.2 GiB on an H200 (1.45 B).
GPU_BYTES_PER_WEIGHT_BYTE = 1.5
# Per card, beyond what torch counts: the CUDA context and the allocator's slack.
GPU_RESERVE_BYTES = GIB


def gpu_need(weight_bytes: int, cards: int = 1) -> int:
    """GPU memory a whole-model job needs for `weight_bytes` of BF16 weights on `cards`."""
    return int(GPU_BYTES_PER_WEIGHT_BYTE * weight_bytes) + cards * GPU_RESERVE_BYTES


def gpu_placement(sizes: LayerSizes, free: Sequence[int]) -> list[int] | None:
    """The BF16 weight bytes each discrete card may take when the whole model is quantized
    on the cards whose free memory is `free` (bytes, in device order), one entry per card
    used; None when they cannot hold it. One card when the model fits the first;
    otherwise the cards of gpu_assignment, each with all the room it has (the worker
    passes these to accelerate as max_memory)."""
    capacity = [max(0, int((f - GPU_RESERVE_BYTES) / GPU_BYTES_PER_WEIGHT_BYTE)) for f in free]
    if not capacity:
        return None
    if sizes.bf16_bytes <= capacity[0]:
        return [capacity[0]]
    cards = gpu_assignment(sizes, capacity)
    return None if cards is None else capacity[: max(cards) + 1]


def gpu_assignment(sizes: LayerSizes, capacity: Sequence[int]) -> list[int] | None:
    """The card of each part of the model, in order (the embeddings, each decoder layer,
    the head: final norm and lm_head), as accelerate's "sequential" placement makes it
    within `capacity` (BF16 weight bytes a card may hold): each part, none split, on the
    first card with room left; the first card keeps room for the largest part, as
    accelerate does for it. Every layer is counted as the largest one. None when the
    parts do not fit."""
    embedding = KEPT_BYTES_PER_PARAM * sizes.embedding_params
    layer = KEPT_BYTES_PER_PARAM * sizes.largest_layer_params
    tail = max(0, sizes.head_bf16_bytes - embedding)  # final norm and an untied lm_head
    parts = [embedding, *[layer] * sizes.layers, tail]
    room = list(capacity)
    if room:
        room[0] = max(0, room[0] - max(parts))
    cards, card = [], 0
    for part in parts:
        while card < len(room) and part > room[card]:
            card += 1
        if card == len(room):
            return None
        room[card] -= part
        cards.append(card)
    return cards
